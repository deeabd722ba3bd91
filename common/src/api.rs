//! The kilnd HTTP/JSON API's request, response and event types (documented in docs/api.md).
//!
//! Both the daemon and the CLI serialize exactly these types, so a field renamed here is renamed
//! on the wire for both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, TreeEntry};

/// API version prefix of every path.
pub const API_PREFIX: &str = "/v1";

/// `POST /v1/jobs` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJobRequest {
    /// The pipeline file's exact text (its sha256 is the pipeline digest).
    pub pipeline: String,
    /// File name used in validation messages (`pipeline.toml:3:1: …`).
    pub file_name: String,
    /// Parameter values as given on the command line.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Workspace name → digest of a previously uploaded tar blob (`POST /v1/blobs`) that seeds it.
    #[serde(default)]
    pub sources: BTreeMap<String, Digest>,
    /// Source step name → absolute path of its `git.repo` when the pipeline gives a relative one
    /// (resolved by the CLI against the pipeline file's directory; client and node share a host).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub repos: BTreeMap<String, String>,
    /// DSSE envelope over the exact pipeline text (payload type
    /// [`crate::definition::PIPELINE_PAYLOAD_TYPE`]), as `kiln pipeline sign` writes it; the
    /// admission policy decides whose signatures are accepted and whether it may be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::dsse::Envelope>,
}

/// `POST /v1/jobs` response (201).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitJobResponse {
    /// Job id.
    pub id: String,
    /// sha256 of the pipeline text.
    pub pipeline_digest: Digest,
}

/// `POST /v1/blobs` response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Content digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
}

/// Error body of every non-2xx response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One-line summary.
    pub error: String,
    /// Individual problems (validation errors, one per entry), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// Lifecycle of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Admitted, waiting for a worker slot.
    Queued,
    /// Steps are running.
    Running,
    /// Every step succeeded.
    Succeeded,
    /// A step failed or the job could not run.
    Failed,
    /// Cancelled by a user or by daemon shutdown.
    Cancelled,
}

impl JobState {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
    /// Parse the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
    /// No further transitions.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Lifecycle of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Worker running.
    Running,
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit, signal, or sandbox failure.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Cancelled.
    Cancelled,
    /// Not run because an earlier step did not succeed.
    Skipped,
}

impl StepState {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed-out",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }
    /// Parse the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::TimedOut,
            Self::Cancelled,
            Self::Skipped,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
    /// No further transitions.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

/// One line of `GET /v1/jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// State.
    pub state: JobState,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// sha256 of the pipeline text.
    pub pipeline_digest: Digest,
    /// Parameters after defaults.
    pub params: BTreeMap<String, String>,
    /// State.
    pub state: JobState,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Digest of the job-level DSSE envelope once the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<Digest>,
    /// Steps in execution order.
    pub steps: Vec<StepStatus>,
}

/// A step within [`JobStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStatus {
    /// Step name.
    pub name: String,
    /// Step kind.
    pub kind: String,
    /// State.
    pub state: StepState,
    /// Exit code of the step's command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed (signal, timeout, sandbox error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Wall time of the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Digest of the stored log blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<Digest>,
    /// Digest of the step's DSSE envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<Digest>,
    /// Output workspace name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Files of the output workspace (the provenance subjects).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<TreeEntry>,
}

/// One artifact as listed by `GET /v1/jobs/{id}/artifacts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Producing step.
    pub step: String,
    /// Output workspace of that step.
    pub workspace: String,
    /// Path relative to the workspace.
    pub path: String,
    /// Content digest (a blob in the CAS).
    pub digest: Digest,
    /// True when no later step reads this workspace: the pipeline's end products.
    pub final_output: bool,
}

/// Attestation index entry returned by `GET /v1/attestations?subject=…`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationRef {
    /// Job id.
    pub job_id: String,
    /// Step name.
    pub step: String,
    /// Subject name (path in its workspace).
    pub subject: String,
    /// Digest of the DSSE envelope (fetch it with `GET /v1/blobs/{digest}`).
    pub envelope: Digest,
    /// For an attestation other than the step's provenance: its name (`sbom`,
    /// `test-result:<test step>`) and predicate type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
    /// Predicate type of that attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicate_type: Option<String>,
}

/// `GET /v1/node`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `urn:kiln:node:<hex>`: the SLSA builder id.
    pub builder_id: String,
    /// DSSE keyid of the node signing key.
    pub keyid: String,
    /// `software` until the TPM node key lands.
    pub key_kind: String,
    /// Node public key, `SubjectPublicKeyInfo` PEM.
    pub public_key_pem: String,
    /// kilnd version.
    pub version: String,
    /// Host name.
    pub hostname: String,
}

/// One line of the NDJSON event stream `GET /v1/jobs/{id}/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Per-job sequence number, from 1, without gaps for state events.
    pub seq: u64,
    /// RFC 3339.
    pub time: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Event payloads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum EventKind {
    /// Job changed state.
    Job {
        /// New state.
        state: JobState,
        /// Failure reason.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Step changed state.
    Step {
        /// Step name.
        step: String,
        /// New state.
        state: StepState,
        /// Exit code when it ended.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// Failure reason.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Output of a running step (live only: not replayed; use the log endpoint for history).
    Log {
        /// Step name.
        step: String,
        /// Text (lossy UTF-8).
        data: String,
    },
}

/// `POST /v1/jobs/{id}/rebuild`: run a finished job's steps again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildRequest {
    /// One step; default: every succeeded `build` and `publish` step with an output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// The answer of `POST /v1/jobs/{id}/rebuild`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    /// Job id.
    pub job_id: String,
    /// Every step rebuilt, in execution order.
    pub steps: Vec<StepRebuild>,
    /// Every rebuilt step ran and matches its attested outputs.
    #[serde(rename = "match")]
    pub matches: bool,
}

/// One step run again against its recorded inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRebuild {
    /// Step name.
    pub step: String,
    /// Match and differences against the attested outputs (`first`) of the original run.
    #[serde(flatten)]
    pub result: crate::intoto::Reproducibility,
    /// Wall time of the rebuild's worker, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why the rebuild could not run or did not succeed (then `match` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The rebuild's worker ran under the pipeline observer. False: it ran UNOBSERVED (the
    /// observer is not loaded and `[observer] required = false`), or it never started.
    #[serde(default)]
    pub observed: bool,
    /// Digest of the signed runtime-trace envelope of the rebuild's worker (a CAS blob:
    /// `GET /v1/blobs/{digest}`), when it was observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Digest>,
}
