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
/// Predicate type of the test results a publish step attests (in-toto test-result v0.1).
pub const TEST_RESULT_V01: &str = "https://in-toto.io/attestation/test-result/v0.1";
/// Predicate type of a CycloneDX SBOM in an in-toto statement (the in-toto predicate registry's
/// CycloneDX entry).
pub const CYCLONEDX_BOM: &str = "https://cyclonedx.org/bom";
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
    /// The step's network: `none` (an empty network namespace, loopback down) for every step
    /// but `kind = "fetch"`, which gets `proxy` (an otherwise empty network namespace whose
    /// only reachable address is kilnd's allowlisting proxy; see `fetch`); absent in statements
    /// from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// What a source step ingested (`git` or `tarball`); absent for other steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceIngest>,
    /// `SOURCE_DATE_EPOCH` the step ran with: the commit time of the job's git source step;
    /// absent when the job has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<u64>,
    /// A `reproducible = true` step was run a second time in a fresh worker with the same
    /// inputs: whether both output trees are identical, else the differing files. Absent for
    /// steps not declared reproducible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reproducible: Option<Reproducibility>,
    /// A `kind = "fetch"` step: every connection its proxy saw (allowed and denied) and the
    /// result of every hash pin; absent for other steps (which have no network path at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchRecord>,
    /// The step's build environment image (`image = "sha256:…"`: the digest of its tree
    /// manifest, `kiln image import`), also listed in `resolvedDependencies` as `kiln:image`;
    /// absent when the step ran on the profile's read-only host toolchain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Digest>,
}

/// What kilnd recorded about a fetch step's network and its pinned downloads (docs/pipeline.md,
/// "Fetch steps").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchRecord {
    /// The proxy the step was given (`http://127.0.0.1:3128`), its only way out.
    pub proxy: String,
    /// Destinations the proxy admitted (`host:port`): the step's `allow_hosts`, capped by the
    /// node's admission policy.
    pub allow_hosts: Vec<String>,
    /// Every connection attempt through the proxy, in arrival order.
    pub connections: Vec<FetchConnection>,
    /// Attempts beyond the recording limit (counted, not itemised).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub connections_not_itemised: u64,
    /// One entry per output file and per pin: how each was checked.
    pub pins: Vec<PinCheck>,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One connection attempt through the fetch proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchConnection {
    /// When it arrived (RFC 3339, UTC).
    pub time: String,
    /// `CONNECT` (a TLS tunnel) or the method of a plain-HTTP request (`GET`, …).
    pub method: String,
    /// Requested host (as the step wrote it, lowercased).
    pub host: String,
    /// Requested port.
    pub port: u16,
    /// The address kilnd resolved and connected to; absent when it never got that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Whether the proxy let it through.
    pub allowed: bool,
    /// Why it was denied or failed (`not in allow_hosts`, `resolves to 10.0.0.1 (private)…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes from the step to the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination to the step.
    pub bytes_received: u64,
}

/// The check of one fetched file or one pin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PinCheck {
    /// Path relative to the output workspace (for a lockfile pin not fetched: the file name).
    pub path: String,
    /// `pins` or `lockfile:<path>`; absent for an unpinned file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_by: Option<String>,
    /// The pinned digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Digest>,
    /// The digest of the file in the output; absent when it was not fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<Digest>,
    /// Where the pin says it comes from (`pins[].url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `ok`, `mismatch`, `missing` (pinned, not fetched) or `unpinned`.
    pub result: String,
}

/// The outcome of running a step twice with the same inputs (`reproducible = true`,
/// `kiln rebuild`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reproducibility {
    /// Both runs wrote exactly the same files with the same contents.
    #[serde(rename = "match")]
    pub matches: bool,
    /// The files that differ, by path; empty when they match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<FileDifference>,
}

/// One file whose content differs between two runs (a `None` digest: the run did not write it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDifference {
    /// Path relative to the output workspace.
    pub path: String,
    /// Digest in the first (attested) run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<Digest>,
    /// Digest in the second run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second: Option<Digest>,
}

impl Reproducibility {
    /// Compare two output trees (path → digest).
    pub fn compare(
        first: &[crate::digest::TreeEntry],
        second: &[crate::digest::TreeEntry],
    ) -> Self {
        let a: BTreeMap<&str, Digest> = first.iter().map(|e| (e.path.as_str(), e.digest)).collect();
        let b: BTreeMap<&str, Digest> =
            second.iter().map(|e| (e.path.as_str(), e.digest)).collect();
        let mut paths: Vec<&str> = a.keys().chain(b.keys()).copied().collect();
        paths.sort_unstable();
        paths.dedup();
        let differences: Vec<FileDifference> = paths
            .into_iter()
            .filter(|p| a.get(p) != b.get(p))
            .map(|p| FileDifference {
                path: p.to_owned(),
                first: a.get(p).copied(),
                second: b.get(p).copied(),
            })
            .collect();
        Self {
            matches: differences.is_empty(),
            differences,
        }
    }
}

/// What a source step ingested, as recorded in its provenance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum SourceIngest {
    /// The tree of a pinned commit of a git repository on the node.
    #[serde(rename_all = "camelCase")]
    Git {
        /// Absolute repository path on the node.
        repo: String,
        /// Pinned commit id.
        commit: String,
        /// The commit's git tree id, as git reported it inside the sandbox.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tree: Option<String>,
        /// Committer time (seconds since the epoch); the job's `SOURCE_DATE_EPOCH`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit_time: Option<u64>,
    },
    /// A tar archive pinned by digest.
    Tarball {
        /// Path as written in the pipeline (relative to the pipeline file).
        path: String,
        /// The archive's digest (the pin).
        sha256: Digest,
    },
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

/// Byproduct name, in a publish step's provenance, of its SBOM envelope.
pub const SBOM_BYPRODUCT: &str = "sbom";
/// Byproduct name prefix, in a publish step's provenance, of a test step's result envelope
/// (`test-result:<test step>`).
pub const TEST_RESULT_BYPRODUCT_PREFIX: &str = "test-result:";

/// in-toto test-result v0.1 predicate ([`TEST_RESULT_V01`]), with kiln's record of the test
/// step in `kiln` (in-toto consumers ignore unknown fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    /// `PASSED` or `FAILED` (kiln has no warnings).
    pub result: String,
    /// The test's configuration: the pipeline file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configuration: Vec<ResourceDescriptor>,
    /// The test run: `urn:kiln:job:<job id>:step:<step>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Passed tests: the step name when it exited 0.
    #[serde(default)]
    pub passed_tests: Vec<String>,
    /// Always empty.
    #[serde(default)]
    pub warned_tests: Vec<String>,
    /// Failed tests: the step name when it did not succeed.
    #[serde(default)]
    pub failed_tests: Vec<String>,
    /// kiln's record of the test step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kiln: Option<TestRun>,
}

/// kiln's record of one test step, inside a [`TestResult`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestRun {
    /// Test step name.
    pub step: String,
    /// Step outcome (`succeeded`, `failed`, ...).
    pub outcome: String,
    /// Exit code of the test command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Worker wall time, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The step's log (a CAS blob).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<Digest>,
    /// The test step's own provenance envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Digest>,
    /// The input workspaces it read (`urn:kiln:workspace:<name>`, tree digest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<ResourceDescriptor>,
}
