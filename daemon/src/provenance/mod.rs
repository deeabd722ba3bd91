//! Runtime provenance (seed: "workload attestor", until the TPM issue): in-toto Statement v1 with
//! SLSA Provenance v1 per step, kiln's job statement linking every step envelope, and the node key
//! that signs them as DSSE envelopes.
//!
//! Until the TPM node key lands the key is a software ECDSA P-256 key in
//! `<state>/keys/node-key.p8` (mode 0600, directory 0700), and every predicate says
//! `signingKey.kind = "software"` so verifiers can tell.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_common::Digest;
use kiln_common::digest::TreeEntry;
use kiln_common::dsse::{self, Envelope};
use kiln_common::intoto::{
    self, BuildDefinition, BuildMetadata, Builder, ExternalParameters, InternalParameters,
    JobPredicate, JobStatement, JobStepRef, Provenance, ResourceDescriptor, RunDetails,
    SigningKeyInfo, Statement, StepStatement,
};
use kiln_common::keys::{PublicKey, SigningKey};
use serde::Serialize;

/// Node key failures.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// Reading or writing the key file.
    #[error("node key {path}: {source}")]
    KeyFile {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file has group/other permissions: refuse to use a possibly leaked key.
    #[error("node key {path} has mode {mode:o}; it must be 0600 (owner only)")]
    KeyMode {
        /// Path.
        path: PathBuf,
        /// Mode found.
        mode: u32,
    },
    /// The key file does not hold a P-256 PKCS#8 key.
    #[error("node key {path} is not a valid ECDSA P-256 PKCS#8 key: {message}")]
    KeyInvalid {
        /// Path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The node's signing identity.
#[derive(Debug)]
pub struct NodeSigner {
    key: SigningKey,
    public: PublicKey,
    /// Key description put in every predicate.
    pub info: SigningKeyInfo,
    /// `urn:kiln:node:<keyid hex>`.
    pub builder_id: String,
}

impl NodeSigner {
    /// Load `<state>/keys/node-key.p8`, creating it on first start.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, ProvenanceError> {
        let dir = state_dir.join("keys");
        let path = dir.join("node-key.p8");
        let file_err = |source| ProvenanceError::KeyFile {
            path: path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(file_err)?;
        let key = match fs::read(&path) {
            Ok(der) => {
                let mode = fs::metadata(&path).map_err(file_err)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(ProvenanceError::KeyMode { path, mode });
                }
                SigningKey::from_pkcs8_der(&der).map_err(|e| ProvenanceError::KeyInvalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (key, pkcs8) =
                    SigningKey::generate().map_err(|e| ProvenanceError::Sign(e.to_string()))?;
                // create_new + 0600: never clobber an existing key, never readable by others.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(file_err)?;
                f.write_all(pkcs8.as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(file_err)?;
                tracing::warn!(path = %path.display(), "created a software node key: attestations say signingKey.kind = software until a TPM key is configured");
                key
            }
            Err(e) => return Err(file_err(e)),
        };
        let public = key.public_key();
        let keyid = public.keyid();
        let hex = keyid.trim_start_matches("sha256:").to_owned();
        Ok(Self {
            key,
            public,
            info: SigningKeyInfo {
                kind: "software".into(),
                keyid,
            },
            builder_id: format!("urn:kiln:node:{hex}"),
        })
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Sign a statement; returns the envelope's exact stored bytes and their digest.
    pub fn sign_statement<P: Serialize>(
        &self,
        st: &Statement<P>,
    ) -> Result<(Vec<u8>, Digest), ProvenanceError> {
        let payload = serde_json::to_vec(st).map_err(|e| ProvenanceError::Sign(e.to_string()))?;
        let env = Envelope::sign(intoto::PAYLOAD_TYPE, &payload, &self.key)
            .map_err(|e| ProvenanceError::Sign(e.to_string()))?;
        // The stored bytes are exactly what `envelope_digest` hashes.
        let bytes = env.to_json_bytes();
        let digest = dsse::envelope_digest(&env);
        Ok((bytes, digest))
    }
}

/// Everything a step statement records.
#[derive(Debug, Clone)]
pub struct StepRecord<'a> {
    /// Job id.
    pub job_id: &'a str,
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Pipeline digest.
    pub pipeline_digest: Digest,
    /// Bound parameters.
    pub params: &'a BTreeMap<String, String>,
    /// Step name.
    pub step: &'a str,
    /// Step kind.
    pub kind: &'a str,
    /// Profile.
    pub profile: &'a str,
    /// Input workspaces and their tree digests as mounted.
    pub inputs: &'a [(String, Digest)],
    /// Output workspace and its files (the subjects).
    pub output: Option<(&'a str, &'a [TreeEntry])>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// `succeeded`, `failed`, `timed-out`, `cancelled`.
    pub outcome: &'a str,
    /// RFC 3339.
    pub started_on: &'a str,
    /// RFC 3339.
    pub finished_on: &'a str,
    /// Log blob digest.
    pub log: Option<Digest>,
    /// Whether kilnd verified that nothing of the step's worker survived.
    pub teardown_verified: bool,
}

/// Build a step's SLSA provenance statement.
pub fn step_statement(rec: &StepRecord<'_>, signer: &NodeSigner) -> StepStatement {
    let subject = rec
        .output
        .map(|(_, entries)| {
            entries
                .iter()
                .map(|e| ResourceDescriptor {
                    name: Some(e.path.clone()),
                    uri: None,
                    digest: intoto::digest_set(&e.digest),
                    media_type: None,
                })
                .collect()
        })
        .unwrap_or_default();
    let resolved_dependencies = rec
        .inputs
        .iter()
        .map(|(ws, d)| ResourceDescriptor {
            name: Some(ws.clone()),
            uri: Some(format!("urn:kiln:workspace:{ws}")),
            digest: intoto::digest_set(d),
            media_type: None,
        })
        .collect();
    let byproducts = rec
        .log
        .iter()
        .map(|d| ResourceDescriptor {
            name: Some("log".into()),
            uri: None,
            digest: intoto::digest_set(d),
            media_type: Some("text/plain".into()),
        })
        .collect();
    Statement {
        statement_type: intoto::STATEMENT_TYPE.into(),
        subject,
        predicate_type: intoto::SLSA_PROVENANCE_V1.into(),
        predicate: Provenance {
            build_definition: BuildDefinition {
                build_type: intoto::KILN_STEP_BUILD_TYPE.into(),
                external_parameters: ExternalParameters {
                    pipeline: rec.pipeline.into(),
                    pipeline_digest: rec.pipeline_digest,
                    step: rec.step.into(),
                    parameters: rec.params.clone(),
                },
                internal_parameters: InternalParameters {
                    kind: rec.kind.into(),
                    profile: rec.profile.into(),
                    output_workspace: rec.output.map(|(ws, _)| ws.to_owned()),
                    exit_code: rec.exit_code,
                    outcome: rec.outcome.into(),
                    signing_key: signer.info.clone(),
                    teardown_verified: rec.teardown_verified,
                },
                resolved_dependencies,
            },
            run_details: RunDetails {
                builder: Builder {
                    id: signer.builder_id.clone(),
                },
                metadata: BuildMetadata {
                    invocation_id: format!("{}/{}", rec.job_id, rec.step),
                    started_on: rec.started_on.into(),
                    finished_on: rec.finished_on.into(),
                },
                byproducts,
            },
        },
    }
}

/// Build the job statement: subjects are the step envelopes.
pub fn job_statement(predicate: JobPredicate) -> JobStatement {
    let subject = predicate
        .steps
        .iter()
        .filter_map(|s: &JobStepRef| {
            s.envelope_digest.map(|d| ResourceDescriptor {
                name: Some(format!("step:{}", s.name)),
                uri: None,
                digest: intoto::digest_set(&d),
                media_type: Some("application/vnd.dsse.envelope.v1+json".into()),
            })
        })
        .collect();
    Statement {
        statement_type: intoto::STATEMENT_TYPE.into(),
        subject,
        predicate_type: intoto::KILN_JOB_PREDICATE.into(),
        predicate,
    }
}
