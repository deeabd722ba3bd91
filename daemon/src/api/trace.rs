//! `GET /v1/jobs/{id}/steps/{step}/trace`: a step's runtime trace as NDJSON (docs/trace.md),
//! decompressed from its CAS blob. The blob is found through the step's signed provenance
//! (byproduct `runtime-trace`) and its trace envelope, so only attested traces are served.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_common::trace::TRACE_NDJSON_MEDIA_TYPE;

use super::ApiError;
use crate::observe::assemble;
use crate::pipeline::Node;

pub async fn step_trace(
    State(node): State<Arc<Node>>,
    Path((id, step)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let not_found = |message: String| ApiError::new(StatusCode::NOT_FOUND, message);
    let job = node
        .store
        .db
        .job(&id)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .ok_or_else(|| not_found(format!("job {id} not found")))?;
    let status = job
        .steps
        .iter()
        .find(|s| s.name == step)
        .ok_or_else(|| not_found(format!("job {id} has no step {step:?}")))?;
    let provenance = status
        .attestation
        .and_then(|d| node.load_envelope(&d))
        .ok_or_else(|| {
            not_found(format!(
                "step {step:?} is {} and has no attestation yet",
                status.state.as_str()
            ))
        })?;
    let blob = Node::trace_envelope_digest(&provenance)
        .and_then(|d| node.load_envelope(&d))
        .and_then(|trace| Node::trace_blob_digest(&trace))
        .ok_or_else(|| {
            not_found(format!(
                "step {step:?} has no runtime trace (it ran unobserved, or before the observer)"
            ))
        })?;
    let cas = node.store.cas.clone();
    let ndjson = tokio::task::spawn_blocking(move || {
        let compressed = cas.get(&blob).map_err(|e| e.to_string())?;
        assemble::decompress(&compressed).map_err(|e| format!("trace blob {blob}: {e}"))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        tracing::error!(error = %e, "cannot read a stored trace");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)
    })?;
    Ok((
        [(header::CONTENT_TYPE, TRACE_NDJSON_MEDIA_TYPE)],
        Body::from(ndjson),
    )
        .into_response())
}
