//! in-toto Statement v1, SLSA Provenance v1 and kiln's job predicate: the attestation payloads.
//!
//! Field names follow the published specs exactly (in-toto attestation framework v1,
//! <https://slsa.dev/provenance/v1>). kiln-specific data lives only where the specs leave room for it:
//! `buildDefinition.internalParameters`, `runDetails.metadata` is not extended, and the job-level
//! statement uses kiln's own predicate type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// `_type` of every in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// DSSE payload type of in-toto statements.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// SLSA Provenance v1 predicate type.
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";
/// kiln's job-level predicate: links every step envelope of one job.
pub const KILN_JOB_PREDICATE: &str = "urn:kiln:predicate:job:v1";
/// `buildDefinition.buildType` of a kiln pipeline step.
pub const KILN_STEP_BUILD_TYPE: &str = "urn:kiln:buildtype:pipeline-step:v1";
/// Media type of the bundle `kiln artifacts` writes and `kiln verify` reads.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.kiln.bundle.v1+json";

/// A `DigestSet`: algorithm → lowercase hex. kiln always fills `sha256`.
pub type DigestSet = BTreeMap<String, String>;

/// A `DigestSet` holding one sha256 digest.
pub fn digest_set(d: &Digest) -> DigestSet {
    BTreeMap::from([("sha256".to_owned(), d.hex())])
}

/// The sha256 entry of a `DigestSet`, if present and well-formed.
pub fn sha256_of(set: &DigestSet) -> Option<Digest> {
    set.get("sha256").and_then(|h| Digest::from_hex(h).ok())
}

/// An in-toto `ResourceDescriptor` (subset kiln uses).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceDescriptor {
    /// Name: a subject's path relative to its workspace, or a dependency's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// URI, e.g. `urn:kiln:workspace:src`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Digests.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: DigestSet,
    /// Media type.
    #[serde(default, rename = "mediaType", skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
}

/// in-toto Statement v1 with a predicate of type `P`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Statement<P> {
    /// Always [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub statement_type: String,
    /// What the statement is about.
    pub subject: Vec<ResourceDescriptor>,
    /// Predicate type URI.
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// The predicate.
    pub predicate: P,
}

/// SLSA Provenance v1 predicate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    /// What was asked.
    pub build_definition: BuildDefinition,
    /// What happened.
    pub run_details: RunDetails,
}

/// SLSA `buildDefinition`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    /// [`KILN_STEP_BUILD_TYPE`].
    pub build_type: String,
    /// Caller-controlled inputs: see [`ExternalParameters`].
    pub external_parameters: ExternalParameters,
    /// Builder-controlled inputs: see [`InternalParameters`].
    pub internal_parameters: InternalParameters,
    /// Input workspaces: `uri = urn:kiln:workspace:<name>`, `digest.sha256` = tree digest
    /// ([`crate::digest::tree_digest`]) of the workspace as the step saw it.
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

/// kiln's `externalParameters` for a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalParameters {
    /// Pipeline name.
    pub pipeline: String,
    /// sha256 of the pipeline file's exact bytes, `sha256:<hex>`.
    pub pipeline_digest: Digest,
    /// Step name within the pipeline.
    pub step: String,
    /// Every parameter value after defaults were applied.
    pub parameters: BTreeMap<String, String>,
}

/// kiln's `internalParameters` for a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InternalParameters {
    /// Step kind (`build`, `test`, …).
    pub kind: String,
    /// Sandbox profile name.
    pub profile: String,
    /// The workspace this step wrote, whose files are the statement's subjects; `None` if the step
    /// has no output workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_workspace: Option<String>,
    /// Exit code of the step's command (steps that fail are still attested).
    pub exit_code: Option<i32>,
    /// How the step ended: `succeeded`, `failed`, `timed-out`, `cancelled`.
    pub outcome: String,
    /// Which key signed this statement and what protects it.
    pub signing_key: SigningKeyInfo,
    /// The node verified after the step that nothing of its worker survived: its cgroups were
    /// killed, emptied and removed, no process of them was left (a `/proc` scan), no mount under the
    /// sandbox root or a workspace remained, and the scratch root was empty. A step whose teardown
    /// is not verified fails. Absent (false) in statements from before the check existed.
    #[serde(default)]
    pub teardown_verified: bool,
    /// The eBPF observer recorded the step (its signed runtime trace is the byproduct named
    /// `runtime-trace`). False when the node ran it unobserved (`[observer] required = false`
    /// and the observer did not load); absent (false) in statements from before the observer.
    #[serde(default)]
    pub observed: bool,
    /// keyid of the key whose DSSE signature over the pipeline file the node's admission policy
    /// accepted (`kiln pipeline sign`); absent when the policy admitted it unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_signer: Option<String>,
    /// The step's network: `none` (an empty network namespace, loopback down), the only mode
    /// kilnd runs steps in today; absent in statements from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// Description of the node key that signed an attestation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeyInfo {
    /// `software` (a file in the state dir, mode 0600; `kilnd --insecure-software-key`) or `tpm`
    /// (an ephemeral workload key whose X.509 certificate the TPM-resident node key signed; see
    /// [`crate::trust`]).
    pub kind: String,
    /// DSSE keyid: `sha256:<hex>` of the key's `SubjectPublicKeyInfo` DER.
    pub keyid: String,
}

/// SLSA `runDetails`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDetails {
    /// Who ran it.
    pub builder: Builder,
    /// When and which invocation.
    pub metadata: BuildMetadata,
    /// Step log and other by-products (`name = "log"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub byproducts: Vec<ResourceDescriptor>,
}

/// SLSA `builder`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Builder {
    /// `urn:kiln:node:<keyid hex>`.
    pub id: String,
}

/// SLSA `metadata`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildMetadata {
    /// `<job id>/<step name>`.
    pub invocation_id: String,
    /// RFC 3339, UTC.
    pub started_on: String,
    /// RFC 3339, UTC.
    pub finished_on: String,
}

/// A step's provenance statement.
pub type StepStatement = Statement<Provenance>;

/// kiln's job predicate ([`KILN_JOB_PREDICATE`]); the statement's subjects are the step envelopes
/// (`name = "step:<name>"`, digest = sha256 of the envelope's exact JSON bytes as stored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobPredicate {
    /// Job id.
    pub job_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// sha256 of the pipeline file.
    pub pipeline_digest: Digest,
    /// Parameter values after defaults.
    pub parameters: BTreeMap<String, String>,
    /// Workspaces seeded from submitted sources: name → tree digest.
    pub sources: BTreeMap<String, Digest>,
    /// Steps in execution order.
    pub steps: Vec<JobStepRef>,
    /// Final job state (`succeeded`, `failed`, `cancelled`).
    pub outcome: String,
    /// `urn:kiln:node:<hex>`.
    pub builder_id: String,
    /// Signing key.
    pub signing_key: SigningKeyInfo,
    /// RFC 3339.
    pub started_on: String,
    /// RFC 3339.
    pub finished_on: String,
    /// sha256 of the node identity document ([`crate::attest::NodeIdentity`] as JSON) whose
    /// quote binds [`JobPredicate::nonce`] and the node key; absent for software-key nodes and
    /// in jobs from before the TPM node attestor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_identity: Option<Digest>,
    /// The job's fresh nonce (hex), drawn at job start and quoted by the TPM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Workload certificates issued for this job (every step's and this statement's): keyid →
    /// sha256 of the certificate DER, stored in the CAS.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub workload_certificates: BTreeMap<String, Digest>,
    /// keyid of the accepted signer of the pipeline file (see
    /// [`InternalParameters::pipeline_signer`]); absent when it was admitted unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_signer: Option<String>,
}

/// One step as listed by the job predicate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStepRef {
    /// Step name.
    pub name: String,
    /// `succeeded`, `failed`, `timed-out`, `cancelled`, `skipped`.
    pub outcome: String,
    /// Digest of the step's DSSE envelope bytes; `None` for skipped steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_digest: Option<Digest>,
}

/// A job's statement.
pub type JobStatement = Statement<JobPredicate>;
