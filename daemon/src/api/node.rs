//! Node attestor endpoints: the node's TPM identity (enrollment, `kiln node show`), the answer
//! to an enrollment challenge, node key rotation; and the node evidence a bundle carries.
//!
//! - `GET /v1/node/identity` → [`NodeEndorsement`] (audit role).
//! - `POST /v1/node/activate` with a [`CredentialChallenge`] → [`ActivateResponse`] (root only:
//!   enrollment is an operator action).
//! - `POST /v1/node/rotate-key` → the new [`NodeEndorsement`] (root only).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_common::attest::{CredentialChallenge, NodeIdentity};
use kiln_common::dsse::Envelope;
use kiln_common::intoto::JobStatement;
use kiln_common::trust::ActivateResponse;
use kiln_common::x509::VerificationMaterial;

use super::ApiError;
use super::auth::Peer;
use crate::attest::NodeAttestor;
use crate::pipeline::Node;

type ApiResult<T> = Result<T, ApiError>;

fn attestor(node: &Node) -> ApiResult<&Arc<NodeAttestor>> {
    node.signer.attestor().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "this node signs with a software key (kilnd --insecure-software-key): it has no tpm identity",
        )
    })
}

fn root_only(peer: &Peer, what: &str) -> ApiResult<()> {
    if peer.uid == 0 {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("uid {} is not authorized: only root may {what}", peer.uid),
        ))
    }
}

fn tpm_failure(err: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %err, "tpm request failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
}

/// `GET /v1/node/identity`.
pub async fn identity(State(node): State<Arc<Node>>) -> ApiResult<Response> {
    let endorsement = attestor(&node)?.endorsement().await.map_err(tpm_failure)?;
    Ok(Json(endorsement).into_response())
}

/// `POST /v1/node/activate`.
pub async fn activate(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Bytes,
) -> ApiResult<Response> {
    root_only(&peer, "answer an enrollment challenge")?;
    let challenge: CredentialChallenge = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid credential challenge: {e}"),
        )
    })?;
    match attestor(&node)?.activate(challenge).await {
        Ok(secret) => Ok(Json(ActivateResponse { secret }).into_response()),
        // The TPM refuses a challenge made for another EK or AK (integrity check): the caller's
        // fault, reported as such.
        Err(err) => {
            tracing::warn!(error = %err, "credential activation refused");
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("credential activation failed: {err}"),
            ))
        }
    }
}

/// `POST /v1/node/rotate-key`.
pub async fn rotate_key(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> ApiResult<Response> {
    root_only(&peer, "rotate the node key")?;
    let endorsement = attestor(&node)?.rotate().await.map_err(tpm_failure)?;
    tracing::warn!(node_key = %endorsement.node_keyid, "node key rotated");
    Ok(Json(endorsement).into_response())
}

/// The node identity document and workload certificates a job statement links, loaded from the
/// CAS for the bundle (none for a software-key job).
pub(super) fn node_evidence(
    node: &Node,
    job: &Envelope,
) -> ApiResult<(Option<NodeIdentity>, BTreeMap<String, VerificationMaterial>)> {
    let internal = |e: String| {
        tracing::error!(error = %e, "cannot assemble the bundle's node evidence");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)
    };
    // kilnd's own envelope, read back from the CAS: decoding without verifying is enough here.
    let statement: JobStatement = job
        .decode_statement()
        .map_err(|e| internal(format!("stored job statement: {e}")))?;
    let predicate = statement.predicate;
    let identity = match predicate.node_identity {
        Some(digest) => {
            let bytes = node
                .store
                .cas
                .get(&digest)
                .map_err(|e| internal(format!("node identity {digest}: {e}")))?;
            Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| internal(format!("node identity {digest}: {e}")))?,
            )
        }
        None => None,
    };
    let mut material = BTreeMap::new();
    for (keyid, digest) in predicate.workload_certificates {
        let der = node
            .store
            .cas
            .get(&digest)
            .map_err(|e| internal(format!("workload certificate {digest}: {e}")))?;
        material.insert(keyid, VerificationMaterial::leaf(der));
    }
    Ok((identity, material))
}
