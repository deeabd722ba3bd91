//! Offline verification of an artifact against its attestation bundle: what `kiln verify` runs.
//!
//! The chain checked, each link failing with its own [`VerifyError`] variant:
//! 1. the bundle's media type; the job envelope is signed by a trusted key and carries kiln's job
//!    predicate;
//! 2. every step envelope is signed by a trusted key and is exactly the envelope the job statement
//!    lists for that step (by [`envelope_digest`]); no listed step is missing, none is extra; each
//!    step statement names the job's pipeline digest and its real signer;
//! 3. some step statement has the artifact's digest among its subjects;
//! 4. from that step back through every step it depends on, each input workspace digest equals the
//!    job's recorded source or the tree digest of the outputs of the step that wrote it, and the
//!    producing step succeeded.
//!
//! Pure Rust over [`crate::dsse`] and [`crate::keys`]: no TPM or network needed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::attest::NodeIdentity;
use crate::digest::{Digest, TreeEntry, tree_digest};
use crate::dsse::{DsseError, Envelope, envelope_digest};
use crate::intoto::{
    BUNDLE_MEDIA_TYPE, JobPredicate, JobStatement, KILN_JOB_PREDICATE, Provenance,
    SLSA_PROVENANCE_V1, StepStatement, sha256_of,
};
use crate::keys::PublicKey;
use crate::trust::{SignerTrust, Trust, TrustError, VerifiedNodeChain};
use crate::x509::VerificationMaterial;

/// `resolvedDependencies` URI prefix of an input workspace.
const WORKSPACE_URI_PREFIX: &str = "urn:kiln:workspace:";
/// The only step outcome whose outputs `verify` vouches for.
const SUCCEEDED: &str = "succeeded";

/// The attestations of one job, as `kiln artifacts` writes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// Always [`BUNDLE_MEDIA_TYPE`].
    pub media_type: String,
    /// The job's id.
    pub job_id: String,
    /// DSSE envelope of the job's [`JobStatement`].
    pub job: Envelope,
    /// Step name → DSSE envelope of the step's [`StepStatement`].
    pub steps: BTreeMap<String, Envelope>,
    /// Step name → DSSE envelope of the step's runtime trace ([`crate::trace::TraceStatement`]),
    /// for the steps that were observed. Absent in bundles from before the observer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub traces: BTreeMap<String, Envelope>,
    /// The node identity document the job statement links (`nodeIdentity`): EK certificate, AK,
    /// certified node key, the job's quote, PCR values and event log. Absent for software-key
    /// nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_identity: Option<NodeIdentity>,
    /// Signing keyid → its workload certificate (Sigstore bundle v0.3 `verificationMaterial`
    /// with an `x509CertificateChain`), for every workload key that signed an envelope here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub verification_material: BTreeMap<String, VerificationMaterial>,
    /// Further attestations of the job's steps: a publish step's SBOM and test results, each
    /// signed by that step's workload key and named (by envelope digest) among the byproducts
    /// of its provenance. Absent in bundles from before the publish step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attestations: Vec<StepAttestation>,
}

/// An attestation a step made besides its provenance (see [`Bundle::attestations`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepAttestation {
    /// The step that signed it.
    pub step: String,
    /// Its byproduct name in the step's provenance ([`crate::intoto::SBOM_BYPRODUCT`],
    /// `test-result:<test step>`).
    pub name: String,
    /// The DSSE envelope (an in-toto Statement).
    pub envelope: Envelope,
}

/// An extra attestation that verified (see [`Bundle::attestations`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedAttestation {
    /// Signing step.
    pub step: String,
    /// Byproduct name.
    pub name: String,
    /// The statement's predicate type.
    pub predicate_type: String,
    /// Envelope digest.
    pub envelope_digest: Digest,
    /// Number of subjects (each an attested output of the job).
    pub subjects: usize,
    /// One of its subjects is the verified artifact.
    pub covers_artifact: bool,
}

/// The artifact to verify: its file name and content digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRef {
    /// File name (final path component), e.g. `hello.tar.gz`; used to explain mismatches.
    pub name: String,
    /// sha256 of the file's content.
    pub digest: Digest,
}

impl ArtifactRef {
    /// Hash the file at `path`; the name is its final component.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        let digest = Digest::of_reader(std::fs::File::open(path)?)?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Self { name, digest })
    }
}

/// What a successful verification established (printed by `kiln verify --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedArtifact {
    /// The attested subject matching the artifact (path relative to its workspace).
    pub subject_name: String,
    /// The step that produced it.
    pub step: String,
    /// The job.
    pub job_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// sha256 of the pipeline file.
    pub pipeline_digest: Digest,
    /// The producing step's SLSA `builder.id`.
    pub builder_id: String,
    /// Keyid of the trusted key that signed the producing step's statement.
    pub signer_keyid: String,
    /// What protects that key (`software`, `tpm`).
    pub signing_key_kind: String,
    /// Steps whose links were checked, from the producing step back to the sources.
    pub chain: Vec<String>,
    /// TPM-rooted verification: the node links that verified (EK → AK → quote → node key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<VerifiedNodeChain>,
    /// The bundle's extra attestations (SBOM, test results), each checked: signed by its step's
    /// key, linked from its step's provenance, subjects attested by the job.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attestations: Vec<VerifiedAttestation>,
    /// Every key that verified an envelope of the bundle (raw-key trust: the trusted keys;
    /// TPM trust: the certified workload keys), for checks of further envelopes signed by them
    /// (runtime traces).
    #[serde(skip)]
    pub signer_keys: Vec<PublicKey>,
}

/// An attested subject: which step attested which file with which digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestedSubject {
    /// Step whose statement lists it.
    pub step: String,
    /// Subject name (path relative to the step's output workspace).
    pub name: String,
    /// Attested digest.
    pub digest: Digest,
}

/// A broken link in the chain from trusted keys to the artifact.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not a kiln bundle.
    #[error("bundle media type must be {BUNDLE_MEDIA_TYPE:?}, got {found:?}")]
    MediaType {
        /// Media type found.
        found: String,
    },
    /// The job envelope does not verify or does not decode.
    #[error("job attestation: {0}")]
    JobEnvelope(#[source] DsseError),
    /// The job statement carries another predicate.
    #[error("job statement predicate type must be {KILN_JOB_PREDICATE:?}, got {found:?}")]
    JobPredicateType {
        /// Predicate type found.
        found: String,
    },
    /// The bundle's job id differs from the signed one.
    #[error("bundle is for job {bundle:?} but its signed job statement is for job {statement:?}")]
    JobIdMismatch {
        /// `jobId` of the bundle.
        bundle: String,
        /// `jobId` of the signed job predicate.
        statement: String,
    },
    /// The job statement lists one step name twice.
    #[error("job statement lists step {step:?} twice")]
    DuplicateStep {
        /// Step name.
        step: String,
    },
    /// A step envelope does not verify or does not decode.
    #[error("step {step:?} attestation: {source}")]
    StepEnvelope {
        /// Step name (bundle key).
        step: String,
        /// What failed.
        #[source]
        source: DsseError,
    },
    /// A step statement carries another predicate than SLSA Provenance v1.
    #[error("step {step:?} statement predicate type must be {SLSA_PROVENANCE_V1:?}, got {found:?}")]
    StepPredicateType {
        /// Step name.
        step: String,
        /// Predicate type found.
        found: String,
    },
    /// A bundle entry holds the statement of another step.
    #[error("bundle entry for step {step:?} holds the attestation of step {found:?}")]
    StepNameMismatch {
        /// Bundle key.
        step: String,
        /// `externalParameters.step` of the statement.
        found: String,
    },
    /// The job lists an envelope for a step the bundle lacks.
    #[error(
        "job statement lists step {step:?} with envelope {expected} but the bundle has no envelope for it"
    )]
    StepMissing {
        /// Step name.
        step: String,
        /// Digest the job lists.
        expected: Digest,
    },
    /// The bundle has an envelope the job does not attest.
    #[error(
        "bundle has an envelope for step {step:?} ({found}) that the job statement does not attest: the envelope was added or swapped"
    )]
    StepNotInJob {
        /// Bundle key.
        step: String,
        /// Digest of the extra envelope.
        found: Digest,
    },
    /// A step envelope is validly signed but is not the one the job lists.
    #[error(
        "step {step:?} envelope has {found} but the job statement lists {expected}: the envelope was replaced"
    )]
    EnvelopeMismatch {
        /// Step name.
        step: String,
        /// Digest the job lists.
        expected: Digest,
        /// Digest of the bundle's envelope.
        found: Digest,
    },
    /// A statement's `signingKey.keyid` is not the key that actually signed it.
    #[error("{attestation} statement claims signing key {claimed} but was signed by {actual}")]
    SignerMismatch {
        /// `job <id>` or `step <name>`.
        attestation: String,
        /// keyid recorded in the statement.
        claimed: String,
        /// keyid of the key that verified.
        actual: String,
    },
    /// A step statement names another pipeline than the job's.
    #[error("step {step:?} was built from pipeline {found} but the job ran pipeline {expected}")]
    PipelineMismatch {
        /// Step name.
        step: String,
        /// The job's pipeline digest.
        expected: Digest,
        /// The step's pipeline digest.
        found: Digest,
    },
    /// A step subject lacks a name or a sha256 digest.
    #[error("step {step:?} subject #{index} has no name or no valid sha256 digest")]
    MalformedSubject {
        /// Step name.
        step: String,
        /// Index in `subject`.
        index: usize,
    },
    /// No step attests the artifact's digest.
    #[error("{}", describe_subject_mismatch(.artifact, .digest, .same_name.as_deref()))]
    SubjectMismatch {
        /// Artifact file name.
        artifact: String,
        /// Artifact digest.
        digest: Digest,
        /// An attested subject with the same file name (and so another digest), if any.
        same_name: Option<Box<AttestedSubject>>,
    },
    /// An input workspace dependency without a sha256 digest.
    #[error("step {step:?} depends on workspace {workspace:?} without a sha256 digest")]
    MissingDependencyDigest {
        /// Step name.
        step: String,
        /// Workspace name.
        workspace: String,
    },
    /// An input workspace digest matching neither the job's source nor its producer's outputs.
    #[error(
        "chain broken at step {step:?}: it used workspace {workspace:?} with {found} but the job attests {expected} for it"
    )]
    ChainBroken {
        /// Consuming step.
        step: String,
        /// Workspace name.
        workspace: String,
        /// Source digest or tree digest of the producing step's subjects.
        expected: Digest,
        /// Digest the consuming step recorded.
        found: Digest,
    },
    /// An input workspace that is neither a job source nor any attested step's output.
    #[error(
        "step {step:?} used workspace {workspace:?} ({found}) which neither the job's sources nor any attested step produced"
    )]
    UnattestedWorkspace {
        /// Consuming step.
        step: String,
        /// Workspace name.
        workspace: String,
        /// Digest the consuming step recorded.
        found: Digest,
    },
    /// A link of the trust root (TPM chain, workload certificate, key kind) is broken.
    #[error("{attestation}: {source}")]
    Trust {
        /// `node`, `job <id>` or `step <name>`.
        attestation: String,
        /// The broken link (boxed: the TPM chain's errors are large).
        #[source]
        source: Box<TrustError>,
    },
    /// An extra attestation names a step the job does not attest.
    #[error("attestation {name:?} of step {step:?}: the job attests no such step")]
    AttestationStepUnknown {
        /// Step named.
        step: String,
        /// Byproduct name.
        name: String,
    },
    /// An extra attestation that its step's provenance does not name.
    #[error(
        "attestation {name:?} ({found}) of step {step:?} is not among the step's attested byproducts: it was added or replaced"
    )]
    AttestationNotLinked {
        /// Step.
        step: String,
        /// Byproduct name.
        name: String,
        /// Envelope digest.
        found: Digest,
    },
    /// A step's provenance names an attestation the bundle lacks.
    #[error("step {step:?} attests byproduct {name:?} ({expected}) but the bundle lacks it")]
    AttestationMissing {
        /// Step.
        step: String,
        /// Byproduct name.
        name: String,
        /// Digest the provenance names.
        expected: Digest,
    },
    /// An extra attestation's signature or statement is invalid.
    #[error("attestation {name:?} of step {step:?}: {source}")]
    AttestationEnvelope {
        /// Step.
        step: String,
        /// Byproduct name.
        name: String,
        /// What failed.
        #[source]
        source: DsseError,
    },
    /// An extra attestation signed by another key than its step's provenance.
    #[error(
        "attestation {name:?} of step {step:?} was signed by {actual} but the step's provenance by {expected}"
    )]
    AttestationSigner {
        /// Step.
        step: String,
        /// Byproduct name.
        name: String,
        /// The step's signer.
        expected: String,
        /// The attestation's signer.
        actual: String,
    },
    /// An extra attestation about something the job did not produce.
    #[error(
        "attestation {name:?} of step {step:?} has subject {subject:?} ({digest}), which no step of the job attests"
    )]
    AttestationSubject {
        /// Step.
        step: String,
        /// Byproduct name.
        name: String,
        /// Subject name.
        subject: String,
        /// Its digest (zero when missing).
        digest: Digest,
    },
    /// The step that produced the artifact did not succeed.
    #[error("step {step:?} that produced the artifact ended {outcome:?}, not \"succeeded\"")]
    StepNotSucceeded {
        /// Step name.
        step: String,
        /// Its outcome.
        outcome: String,
    },
}

fn describe_subject_mismatch(
    artifact: &str,
    digest: &Digest,
    same_name: Option<&AttestedSubject>,
) -> String {
    match same_name {
        Some(subject) => format!(
            "artifact {artifact} has {digest} but the attested subject {} has {}: the artifact was modified",
            subject.name, subject.digest
        ),
        None => format!(
            "artifact {artifact} has {digest}, which no step of this job attests: it was not built by this job or was modified"
        ),
    }
}

/// A step whose envelope verified and matches the job statement.
struct CheckedStep {
    name: String,
    /// The keys it was verified against.
    keys: Vec<PublicKey>,
    statement: StepStatement,
    signer_keyid: String,
    /// Subjects as tree entries (validated once).
    outputs: Vec<TreeEntry>,
    /// `tree_digest(outputs)`.
    output_tree: Digest,
}

impl CheckedStep {
    fn provenance(&self) -> &Provenance {
        &self.statement.predicate
    }
}

/// Verify `artifact` against `bundle`, trusting signatures only by `trusted` keys (statements of
/// any key kind, software included). See the module documentation for the links checked.
pub fn verify_artifact(
    artifact: &ArtifactRef,
    bundle: &Bundle,
    trusted: &[PublicKey],
) -> Result<VerifiedArtifact, VerifyError> {
    verify_artifact_with(
        artifact,
        bundle,
        Trust::Keys {
            keys: trusted,
            allow_software_key: true,
        },
    )
}

/// Verify `artifact` against `bundle` under a trust root: raw keys, or TPM-rooted (the EK CA
/// bundle and the enrolled node; [`crate::trust`] lists the links). See the module
/// documentation for the links checked after the signatures.
pub fn verify_artifact_with(
    artifact: &ArtifactRef,
    bundle: &Bundle,
    trust: Trust<'_>,
) -> Result<VerifiedArtifact, VerifyError> {
    // 1. The bundle and its job statement.
    if bundle.media_type != BUNDLE_MEDIA_TYPE {
        return Err(VerifyError::MediaType {
            found: bundle.media_type.clone(),
        });
    }
    let (signers, node) = signer_trust(bundle, trust)?;
    let job_attestation = format!("job {}", bundle.job_id);
    let (job_keys, job_cert) =
        signers
            .keys_for(&bundle.job, None)
            .map_err(|source| VerifyError::Trust {
                attestation: job_attestation.clone(),
                source: Box::new(source),
            })?;
    let job_payload = bundle
        .job
        .verify(&job_keys)
        .map_err(VerifyError::JobEnvelope)?;
    let job: JobStatement = job_payload
        .decode_statement()
        .map_err(VerifyError::JobEnvelope)?;
    if job.predicate_type != KILN_JOB_PREDICATE {
        return Err(VerifyError::JobPredicateType {
            found: job.predicate_type,
        });
    }
    let job = job.predicate;
    if job.job_id != bundle.job_id {
        return Err(VerifyError::JobIdMismatch {
            bundle: bundle.job_id.clone(),
            statement: job.job_id,
        });
    }
    if job.signing_key.keyid != job_payload.keyid {
        return Err(VerifyError::SignerMismatch {
            attestation: format!("job {}", job.job_id),
            claimed: job.signing_key.keyid,
            actual: job_payload.keyid,
        });
    }
    signers
        .check_statement(
            job_cert.as_ref(),
            &job.signing_key.kind,
            &job.started_on,
            &job.finished_on,
        )
        .map_err(|source| VerifyError::Trust {
            attestation: job_attestation,
            source: Box::new(source),
        })?;

    // 2. Every step envelope: trusted signer, listed by the job, same pipeline.
    let steps = check_steps(bundle, &job, &signers)?;

    // 2b. The steps' extra attestations (SBOM, test results).
    let attestations = check_attestations(bundle, &steps, artifact)?;

    // 3. Which step attests the artifact; 4. the chain behind it.
    let candidates = find_subject(artifact, &steps)?;
    let mut first_error = None;
    for (step_index, subject_name) in candidates {
        match check_chain(step_index, &steps, &job) {
            Ok(chain) => {
                let step = &steps[step_index];
                let internal = &step.provenance().build_definition.internal_parameters;
                return Ok(VerifiedArtifact {
                    subject_name,
                    step: step.name.clone(),
                    job_id: job.job_id.clone(),
                    pipeline: job.pipeline.clone(),
                    pipeline_digest: job.pipeline_digest,
                    builder_id: step.provenance().run_details.builder.id.clone(),
                    signer_keyid: step.signer_keyid.clone(),
                    signing_key_kind: internal.signing_key.kind.clone(),
                    chain,
                    node: node.clone(),
                    attestations: attestations.clone(),
                    signer_keys: signer_keys(&signers, &job_keys, &steps),
                });
            }
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    // find_subject returns at least one candidate, so an error was recorded.
    Err(first_error.unwrap_or_else(|| VerifyError::SubjectMismatch {
        artifact: artifact.name.clone(),
        digest: artifact.digest,
        same_name: None,
    }))
}

fn signer_keys(
    signers: &SignerTrust<'_>,
    job_keys: &[PublicKey],
    steps: &[CheckedStep],
) -> Vec<PublicKey> {
    match signers {
        SignerTrust::Keys { keys, .. } => keys.to_vec(),
        SignerTrust::Tpm { .. } => job_keys
            .iter()
            .chain(steps.iter().flat_map(|s| s.keys.iter()))
            .cloned()
            .collect(),
    }
}

/// The signer policy of a verification; for TPM trust, after the node links verified.
fn signer_trust<'a>(
    bundle: &'a Bundle,
    trust: Trust<'a>,
) -> Result<(SignerTrust<'a>, Option<VerifiedNodeChain>), VerifyError> {
    match trust {
        Trust::Keys {
            keys,
            allow_software_key,
        } => Ok((
            SignerTrust::Keys {
                keys,
                allow_software_key,
            },
            None,
        )),
        Trust::Tpm(tpm) => {
            let node_error = |source| VerifyError::Trust {
                attestation: "node".to_owned(),
                source: Box::new(source),
            };
            // The nonce and identity digest are read before the job signature is checked: the
            // quote binds that nonce to the node key, and the job envelope must then verify
            // with a certificate of that key, so a swapped nonce fails one of the two.
            let unverified: JobStatement = bundle
                .job
                .decode_statement()
                .map_err(VerifyError::JobEnvelope)?;
            let (node_key, chain) = crate::trust::verify_node(
                tpm,
                bundle.node_identity.as_ref(),
                unverified.predicate.node_identity,
                unverified.predicate.nonce.as_deref(),
            )
            .map_err(node_error)?;
            Ok((
                SignerTrust::Tpm {
                    node_key,
                    node_id: chain.node_id.clone(),
                    job_id: bundle.job_id.clone(),
                    material: &bundle.verification_material,
                },
                Some(chain),
            ))
        }
    }
}

/// Link 2: verify, match and decode every step envelope; the result is in job order.
fn check_steps(
    bundle: &Bundle,
    job: &JobPredicate,
    signers: &SignerTrust<'_>,
) -> Result<Vec<CheckedStep>, VerifyError> {
    let mut listed = BTreeMap::new();
    for step in &job.steps {
        if listed
            .insert(step.name.as_str(), step.envelope_digest)
            .is_some()
        {
            return Err(VerifyError::DuplicateStep {
                step: step.name.clone(),
            });
        }
    }
    let mut checked: BTreeMap<&str, CheckedStep> = BTreeMap::new();
    for (name, envelope) in &bundle.steps {
        let step_error = |source| VerifyError::StepEnvelope {
            step: name.clone(),
            source,
        };
        let trust_error = |source| VerifyError::Trust {
            attestation: format!("step {name:?}"),
            source: Box::new(source),
        };
        let (keys, cert) = signers
            .keys_for(envelope, Some(name))
            .map_err(trust_error)?;
        let verified = envelope.verify(&keys).map_err(step_error)?;
        let found = envelope_digest(envelope);
        let expected = match listed.get(name.as_str()) {
            Some(Some(expected)) => *expected,
            None | Some(None) => {
                return Err(VerifyError::StepNotInJob {
                    step: name.clone(),
                    found,
                });
            }
        };
        if found != expected {
            return Err(VerifyError::EnvelopeMismatch {
                step: name.clone(),
                expected,
                found,
            });
        }
        let statement: StepStatement = verified.decode_statement().map_err(step_error)?;
        if statement.predicate_type != SLSA_PROVENANCE_V1 {
            return Err(VerifyError::StepPredicateType {
                step: name.clone(),
                found: statement.predicate_type,
            });
        }
        let definition = &statement.predicate.build_definition;
        if definition.external_parameters.step != *name {
            return Err(VerifyError::StepNameMismatch {
                step: name.clone(),
                found: definition.external_parameters.step.clone(),
            });
        }
        let claimed = &definition.internal_parameters.signing_key.keyid;
        if *claimed != verified.keyid {
            return Err(VerifyError::SignerMismatch {
                attestation: format!("step {name:?}"),
                claimed: claimed.clone(),
                actual: verified.keyid,
            });
        }
        let metadata = &statement.predicate.run_details.metadata;
        signers
            .check_statement(
                cert.as_ref(),
                &definition.internal_parameters.signing_key.kind,
                &metadata.started_on,
                &metadata.finished_on,
            )
            .map_err(trust_error)?;
        if definition.external_parameters.pipeline_digest != job.pipeline_digest {
            return Err(VerifyError::PipelineMismatch {
                step: name.clone(),
                expected: job.pipeline_digest,
                found: definition.external_parameters.pipeline_digest,
            });
        }
        let outputs = statement
            .subject
            .iter()
            .enumerate()
            .map(|(index, subject)| {
                let path = subject.name.clone();
                let digest = sha256_of(&subject.digest);
                path.zip(digest)
                    .map(|(path, digest)| TreeEntry { path, digest })
                    .ok_or_else(|| VerifyError::MalformedSubject {
                        step: name.clone(),
                        index,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output_tree = tree_digest(&outputs);
        checked.insert(
            name,
            CheckedStep {
                name: name.clone(),
                keys,
                statement,
                signer_keyid: verified.keyid,
                outputs,
                output_tree,
            },
        );
    }
    // Every step the job attests with an envelope must be present, and the result follows the
    // job's execution order.
    let mut ordered = Vec::with_capacity(checked.len());
    for step in &job.steps {
        match (checked.remove(step.name.as_str()), step.envelope_digest) {
            (Some(found), _) => ordered.push(found),
            (None, Some(expected)) => {
                return Err(VerifyError::StepMissing {
                    step: step.name.clone(),
                    expected,
                });
            }
            (None, None) => {}
        }
    }
    Ok(ordered)
}

/// Link 2b: every extra attestation is named by its step's provenance (byproduct name and
/// envelope digest), signed by the key that signed that provenance, and about outputs the job
/// attests; every such byproduct a provenance names is in the bundle.
fn check_attestations(
    bundle: &Bundle,
    steps: &[CheckedStep],
    artifact: &ArtifactRef,
) -> Result<Vec<VerifiedAttestation>, VerifyError> {
    let attested: BTreeSet<Digest> = steps
        .iter()
        .flat_map(|s| s.outputs.iter().map(|e| e.digest))
        .collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for att in &bundle.attestations {
        let Some(step) = steps.iter().find(|s| s.name == att.step) else {
            return Err(VerifyError::AttestationStepUnknown {
                step: att.step.clone(),
                name: att.name.clone(),
            });
        };
        let found = envelope_digest(&att.envelope);
        let linked = step.provenance().run_details.byproducts.iter().any(|b| {
            b.name.as_deref() == Some(att.name.as_str()) && sha256_of(&b.digest) == Some(found)
        });
        if !linked {
            return Err(VerifyError::AttestationNotLinked {
                step: att.step.clone(),
                name: att.name.clone(),
                found,
            });
        }
        let envelope_error = |source| VerifyError::AttestationEnvelope {
            step: att.step.clone(),
            name: att.name.clone(),
            source,
        };
        let verified = att.envelope.verify(&step.keys).map_err(envelope_error)?;
        if verified.keyid != step.signer_keyid {
            return Err(VerifyError::AttestationSigner {
                step: att.step.clone(),
                name: att.name.clone(),
                expected: step.signer_keyid.clone(),
                actual: verified.keyid,
            });
        }
        let statement: crate::intoto::Statement<serde_json::Value> =
            verified.decode_statement().map_err(envelope_error)?;
        let mut covers_artifact = false;
        for subject in &statement.subject {
            let digest = sha256_of(&subject.digest);
            if digest.is_none_or(|d| !attested.contains(&d)) {
                return Err(VerifyError::AttestationSubject {
                    step: att.step.clone(),
                    name: att.name.clone(),
                    subject: subject.name.clone().unwrap_or_default(),
                    digest: digest.unwrap_or(Digest::from_bytes([0; 32])),
                });
            }
            covers_artifact |= digest == Some(artifact.digest);
        }
        seen.insert((att.step.as_str(), att.name.as_str()));
        out.push(VerifiedAttestation {
            step: att.step.clone(),
            name: att.name.clone(),
            predicate_type: statement.predicate_type,
            envelope_digest: found,
            subjects: statement.subject.len(),
            covers_artifact,
        });
    }
    for step in steps {
        for b in &step.provenance().run_details.byproducts {
            let Some(name) = b.name.as_deref() else {
                continue;
            };
            let is_attestation = name == crate::intoto::SBOM_BYPRODUCT
                || name.starts_with(crate::intoto::TEST_RESULT_BYPRODUCT_PREFIX);
            if is_attestation && !seen.contains(&(step.name.as_str(), name)) {
                return Err(VerifyError::AttestationMissing {
                    step: step.name.clone(),
                    name: name.to_owned(),
                    expected: sha256_of(&b.digest).unwrap_or(Digest::from_bytes([0; 32])),
                });
            }
        }
    }
    Ok(out)
}

/// Link 3: the steps (index, subject name) attesting the artifact's digest, best first: a subject
/// with the artifact's file name before others, later steps before earlier ones.
fn find_subject(
    artifact: &ArtifactRef,
    steps: &[CheckedStep],
) -> Result<Vec<(usize, String)>, VerifyError> {
    let file_name = |path: &str| path.rsplit('/').next().unwrap_or(path).to_owned();
    let mut candidates: Vec<(bool, usize, String)> = Vec::new();
    let mut same_name = None;
    for (index, step) in steps.iter().enumerate().rev() {
        for entry in &step.outputs {
            let name_matches = file_name(&entry.path) == artifact.name;
            if entry.digest == artifact.digest {
                candidates.push((!name_matches, index, entry.path.clone()));
            } else if name_matches && same_name.is_none() {
                same_name = Some(Box::new(AttestedSubject {
                    step: step.name.clone(),
                    name: entry.path.clone(),
                    digest: entry.digest,
                }));
            }
        }
    }
    if candidates.is_empty() {
        return Err(VerifyError::SubjectMismatch {
            artifact: artifact.name.clone(),
            digest: artifact.digest,
            same_name,
        });
    }
    // Stable sort keeps "later step first" within each group.
    candidates.sort_by_key(|(other_name, _, _)| *other_name);
    Ok(candidates
        .into_iter()
        .map(|(_, index, name)| (index, name))
        .collect())
}

/// Link 4: walk from the producing step through its input workspaces; returns the steps walked.
fn check_chain(
    producer: usize,
    steps: &[CheckedStep],
    job: &JobPredicate,
) -> Result<Vec<String>, VerifyError> {
    let mut chain = Vec::new();
    let mut seen = BTreeSet::from([producer]);
    let mut queue = VecDeque::from([producer]);
    while let Some(index) = queue.pop_front() {
        let step = &steps[index];
        chain.push(step.name.clone());
        for dependency in &step.provenance().build_definition.resolved_dependencies {
            let Some(workspace) = dependency
                .uri
                .as_deref()
                .and_then(|u| u.strip_prefix(WORKSPACE_URI_PREFIX))
            else {
                continue;
            };
            let found = sha256_of(&dependency.digest).ok_or_else(|| {
                VerifyError::MissingDependencyDigest {
                    step: step.name.clone(),
                    workspace: workspace.to_owned(),
                }
            })?;
            if job.sources.get(workspace) == Some(&found) {
                continue;
            }
            let producers: Vec<usize> = (0..steps.len())
                .filter(|&i| {
                    i != index
                        && steps[i]
                            .provenance()
                            .build_definition
                            .internal_parameters
                            .output_workspace
                            .as_deref()
                            == Some(workspace)
                })
                .collect();
            if let Some(&matching) = producers.iter().find(|&&i| steps[i].output_tree == found) {
                if seen.insert(matching) {
                    queue.push_back(matching);
                }
                continue;
            }
            let expected = producers
                .last()
                .map(|&i| steps[i].output_tree)
                .or_else(|| job.sources.get(workspace).copied());
            return Err(match expected {
                Some(expected) => VerifyError::ChainBroken {
                    step: step.name.clone(),
                    workspace: workspace.to_owned(),
                    expected,
                    found,
                },
                None => VerifyError::UnattestedWorkspace {
                    step: step.name.clone(),
                    workspace: workspace.to_owned(),
                    found,
                },
            });
        }
    }
    let step = &steps[producer];
    let outcome = &step
        .provenance()
        .build_definition
        .internal_parameters
        .outcome;
    if outcome != SUCCEEDED {
        return Err(VerifyError::StepNotSucceeded {
            step: step.name.clone(),
            outcome: outcome.clone(),
        });
    }
    Ok(chain)
}

/// A real, signed three-step job for tests: `build` (src → out), `test` (out), `package`
/// (out → pkg, writing `dist/hello.tar.gz`). Edit the statements, then call [`Fixture::bundle`],
/// which signs every step and a job statement listing exactly those envelopes.
#[cfg(test)]
pub(crate) mod fixture {
    use std::collections::BTreeMap;

    use crate::digest::{Digest, TreeEntry, tree_digest};
    use crate::dsse::{Envelope, envelope_digest};
    use crate::intoto::{
        BUNDLE_MEDIA_TYPE, BuildDefinition, BuildMetadata, Builder, ExternalParameters,
        InternalParameters, JobPredicate, JobStatement, JobStepRef, KILN_JOB_PREDICATE,
        KILN_STEP_BUILD_TYPE, PAYLOAD_TYPE, Provenance, ResourceDescriptor, RunDetails,
        SLSA_PROVENANCE_V1, STATEMENT_TYPE, SigningKeyInfo, StepStatement, digest_set,
    };
    use crate::keys::SigningKey;

    use super::{ArtifactRef, Bundle};

    /// Content of the packaged artifact.
    pub(crate) const ARTIFACT: &[u8] = b"\x1f\x8b pretend this is a tarball";

    pub(crate) struct Fixture {
        pub key: SigningKey,
        pub job: JobStatement,
        pub steps: Vec<StepStatement>,
    }

    fn entries(files: &[(&str, &[u8])]) -> Vec<TreeEntry> {
        files
            .iter()
            .map(|(path, content)| TreeEntry {
                path: (*path).to_owned(),
                digest: Digest::of(content),
            })
            .collect()
    }

    fn descriptor(
        name: Option<String>,
        uri: Option<String>,
        digest: &Digest,
    ) -> ResourceDescriptor {
        ResourceDescriptor {
            name,
            uri,
            digest: digest_set(digest),
            media_type: None,
        }
    }

    impl Fixture {
        pub(crate) fn new() -> Self {
            let (key, _) = SigningKey::generate().unwrap();
            let keyid = key.public_key().keyid();
            let signing_key = SigningKeyInfo {
                kind: "software".into(),
                keyid: keyid.clone(),
            };
            let builder_id = format!("urn:kiln:node:{}", keyid.trim_start_matches("sha256:"));
            let pipeline_digest = Digest::of(b"[pipeline]\nname = \"hello\"\n");
            let src = tree_digest(&entries(&[
                ("main.c", b"int main(){}"),
                ("Makefile", b"all:"),
            ]));
            let out = entries(&[("bin/hello", b"\x7fELF hello")]);
            let pkg = entries(&[
                ("dist/hello.tar.gz", ARTIFACT),
                ("dist/SHA256SUMS", b"sums"),
            ]);

            let step = |name: &str,
                        kind: &str,
                        inputs: &[(&str, Digest)],
                        output: Option<(&str, &[TreeEntry])>| {
                StepStatement {
                    statement_type: STATEMENT_TYPE.into(),
                    subject: output
                        .map(|(_, files)| {
                            files
                                .iter()
                                .map(|e| descriptor(Some(e.path.clone()), None, &e.digest))
                                .collect()
                        })
                        .unwrap_or_default(),
                    predicate_type: SLSA_PROVENANCE_V1.into(),
                    predicate: Provenance {
                        build_definition: BuildDefinition {
                            build_type: KILN_STEP_BUILD_TYPE.into(),
                            external_parameters: ExternalParameters {
                                pipeline: "hello".into(),
                                pipeline_digest,
                                step: name.into(),
                                parameters: BTreeMap::new(),
                            },
                            internal_parameters: InternalParameters {
                                kind: kind.into(),
                                profile: "hermetic".into(),
                                output_workspace: output.map(|(ws, _)| ws.to_owned()),
                                exit_code: Some(0),
                                outcome: "succeeded".into(),
                                signing_key: signing_key.clone(),
                                teardown_verified: true,
                                observed: true,
                                pipeline_signer: None,
                                network: Some("none".into()),
                                source: None,
                                source_date_epoch: None,
                                reproducible: None,
                                fetch: None,
                                image: None,
                            },
                            resolved_dependencies: inputs
                                .iter()
                                .map(|(ws, d)| {
                                    descriptor(None, Some(format!("urn:kiln:workspace:{ws}")), d)
                                })
                                .collect(),
                        },
                        run_details: RunDetails {
                            builder: Builder {
                                id: builder_id.clone(),
                            },
                            metadata: BuildMetadata {
                                invocation_id: format!("job-1/{name}"),
                                started_on: "2025-01-01T00:00:00Z".into(),
                                finished_on: "2025-01-01T00:00:01Z".into(),
                            },
                            byproducts: Vec::new(),
                        },
                    },
                }
            };
            let steps = vec![
                step("build", "build", &[("src", src)], Some(("out", &out))),
                step(
                    "test",
                    "test",
                    &[("src", src), ("out", tree_digest(&out))],
                    None,
                ),
                step(
                    "package",
                    "build",
                    &[("out", tree_digest(&out))],
                    Some(("pkg", &pkg)),
                ),
            ];
            let job = JobStatement {
                statement_type: STATEMENT_TYPE.into(),
                subject: Vec::new(),
                predicate_type: KILN_JOB_PREDICATE.into(),
                predicate: JobPredicate {
                    job_id: "job-1".into(),
                    pipeline: "hello".into(),
                    pipeline_digest,
                    parameters: BTreeMap::new(),
                    sources: BTreeMap::from([("src".to_owned(), src)]),
                    steps: Vec::new(),
                    outcome: "succeeded".into(),
                    builder_id,
                    signing_key,
                    started_on: "2025-01-01T00:00:00Z".into(),
                    finished_on: "2025-01-01T00:00:03Z".into(),
                    node_identity: None,
                    nonce: None,
                    workload_certificates: BTreeMap::new(),
                    pipeline_signer: None,
                },
            };
            Self { key, job, steps }
        }

        /// Sign one step statement.
        pub(crate) fn sign_step(&self, statement: &StepStatement) -> Envelope {
            Envelope::sign(
                PAYLOAD_TYPE,
                &serde_json::to_vec(statement).unwrap(),
                &self.key,
            )
            .unwrap()
        }

        /// Sign every step and a job statement that lists exactly those envelopes.
        pub(crate) fn bundle(&self) -> Bundle {
            let mut job = self.job.clone();
            let mut steps = BTreeMap::new();
            for statement in &self.steps {
                let name = statement
                    .predicate
                    .build_definition
                    .external_parameters
                    .step
                    .clone();
                let envelope = self.sign_step(statement);
                let digest = envelope_digest(&envelope);
                job.subject
                    .push(descriptor(Some(format!("step:{name}")), None, &digest));
                job.predicate.steps.push(JobStepRef {
                    name: name.clone(),
                    outcome: statement
                        .predicate
                        .build_definition
                        .internal_parameters
                        .outcome
                        .clone(),
                    envelope_digest: Some(digest),
                });
                steps.insert(name, envelope);
            }
            let job_envelope =
                Envelope::sign(PAYLOAD_TYPE, &serde_json::to_vec(&job).unwrap(), &self.key)
                    .unwrap();
            Bundle {
                media_type: BUNDLE_MEDIA_TYPE.into(),
                job_id: job.predicate.job_id.clone(),
                job: job_envelope,
                steps,
                traces: BTreeMap::new(),
                node_identity: None,
                verification_material: BTreeMap::new(),
                attestations: Vec::new(),
            }
        }

        /// The packaged artifact, unmodified.
        pub(crate) fn artifact() -> ArtifactRef {
            ArtifactRef {
                name: "hello.tar.gz".into(),
                digest: Digest::of(ARTIFACT),
            }
        }

        pub(crate) fn trusted(&self) -> Vec<crate::keys::PublicKey> {
            vec![self.key.public_key()]
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use super::fixture::{ARTIFACT, Fixture};
    use super::*;
    use crate::digest::Digest;
    use crate::keys::SigningKey;

    fn step_mut<'a>(fx: &'a mut Fixture, name: &str) -> &'a mut StepStatement {
        fx.steps
            .iter_mut()
            .find(|s| s.predicate.build_definition.external_parameters.step == name)
            .unwrap()
    }

    #[test]
    fn valid_bundle_verifies_the_whole_chain() {
        let fx = Fixture::new();
        let bundle = fx.bundle();
        // The bundle survives its JSON round trip (what `kiln artifacts` writes and verify reads).
        let bundle: Bundle = serde_json::from_slice(&serde_json::to_vec(&bundle).unwrap()).unwrap();
        let verified = verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()).unwrap();
        assert_eq!(verified.subject_name, "dist/hello.tar.gz");
        assert_eq!(verified.step, "package");
        assert_eq!(verified.job_id, "job-1");
        assert_eq!(verified.pipeline, "hello");
        assert_eq!(verified.chain, ["package", "build"]);
        assert_eq!(verified.signer_keyid, fx.key.public_key().keyid());
        assert_eq!(verified.signing_key_kind, "software");
        assert!(verified.builder_id.starts_with("urn:kiln:node:"));
        let json = serde_json::to_value(&verified).unwrap();
        assert_eq!(json["subjectName"], "dist/hello.tar.gz");
        assert_eq!(json["pipelineDigest"], verified.pipeline_digest.to_string());

        // An intermediate output verifies too, with a shorter chain.
        let binary = ArtifactRef {
            name: "hello".into(),
            digest: Digest::of(b"\x7fELF hello"),
        };
        let verified = verify_artifact(&binary, &bundle, &fx.trusted()).unwrap();
        assert_eq!((verified.step.as_str(), verified.chain.len()), ("build", 1));
    }

    #[test]
    fn tampered_artifact_is_subject_mismatch() {
        let fx = Fixture::new();
        let mut content = ARTIFACT.to_vec();
        content[5] ^= 0x20;
        let artifact = ArtifactRef {
            name: "hello.tar.gz".into(),
            digest: Digest::of(&content),
        };
        let err = verify_artifact(&artifact, &fx.bundle(), &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::SubjectMismatch { same_name: Some(s), .. } if s.step == "package")
        );
        assert_eq!(
            err.to_string(),
            format!(
                "artifact hello.tar.gz has {} but the attested subject dist/hello.tar.gz has {}: the artifact was modified",
                Digest::of(&content),
                Digest::of(ARTIFACT)
            )
        );
        let unknown = ArtifactRef {
            name: "other.bin".into(),
            digest: Digest::of(b"x"),
        };
        let err = verify_artifact(&unknown, &fx.bundle(), &fx.trusted()).unwrap_err();
        assert!(
            err.to_string()
                .contains("which no step of this job attests"),
            "{err}"
        );
    }

    #[test]
    fn tampered_envelope_payload_fails_its_signature() {
        let fx = Fixture::new();
        let mut bundle = fx.bundle();
        let envelope = bundle.steps.get_mut("build").unwrap();
        let payload = String::from_utf8(STANDARD.decode(&envelope.payload).unwrap()).unwrap();
        let forged = payload.replace("hermetic", "hermetiK");
        envelope.payload = STANDARD.encode(forged);
        let err = verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::StepEnvelope { step, source: DsseError::BadSignature { .. } } if step == "build"),
            "{err}"
        );
        assert!(err.to_string().contains("envelope or payload was modified"));

        let mut bundle = fx.bundle();
        let payload = String::from_utf8(STANDARD.decode(&bundle.job.payload).unwrap()).unwrap();
        bundle.job.payload = STANDARD.encode(payload.replace("job-1", "job-2"));
        let err = verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::JobEnvelope(DsseError::BadSignature { .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn wrong_trusted_key_is_untrusted_signer() {
        let fx = Fixture::new();
        let (other, _) = SigningKey::generate().unwrap();
        let err =
            verify_artifact(&Fixture::artifact(), &fx.bundle(), &[other.public_key()]).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::JobEnvelope(DsseError::UntrustedSigner { .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("job attestation: no signature from a trusted key")
        );

        // A step signed by an untrusted key inside a job signed by the trusted one.
        let mut bundle = fx.bundle();
        let intruder = Fixture::new();
        bundle
            .steps
            .insert("test".into(), intruder.sign_step(&fx.steps[1]));
        let err = verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::StepEnvelope { step, source: DsseError::UntrustedSigner { .. } } if step == "test"),
            "{err}"
        );
    }

    #[test]
    fn chain_break_is_named() {
        // package claims it read an `out` workspace that build never produced; everything is
        // re-signed, so only the chain is wrong.
        let mut fx = Fixture::new();
        let bogus = Digest::of(b"some other tree");
        step_mut(&mut fx, "package")
            .predicate
            .build_definition
            .resolved_dependencies[0]
            .digest = crate::intoto::digest_set(&bogus);
        let err = verify_artifact(&Fixture::artifact(), &fx.bundle(), &fx.trusted()).unwrap_err();
        let VerifyError::ChainBroken {
            step,
            workspace,
            expected,
            found,
        } = &err
        else {
            panic!("expected ChainBroken, got {err}");
        };
        assert_eq!(
            (step.as_str(), workspace.as_str(), *found),
            ("package", "out", bogus)
        );
        assert_eq!(
            *expected,
            tree_digest(&[TreeEntry {
                path: "bin/hello".into(),
                digest: Digest::of(b"\x7fELF hello")
            }])
        );

        // build read a source tree other than the one the job recorded.
        let mut fx = Fixture::new();
        step_mut(&mut fx, "build")
            .predicate
            .build_definition
            .resolved_dependencies[0]
            .digest = crate::intoto::digest_set(&bogus);
        let err = verify_artifact(&Fixture::artifact(), &fx.bundle(), &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::ChainBroken { step, workspace, expected, .. }
                if step == "build" && workspace == "src" && *expected == fx.job.predicate.sources["src"]),
            "{err}"
        );

        // A workspace nobody attests.
        let mut fx = Fixture::new();
        step_mut(&mut fx, "package")
            .predicate
            .build_definition
            .resolved_dependencies[0]
            .uri = Some("urn:kiln:workspace:elsewhere".into());
        let err = verify_artifact(&Fixture::artifact(), &fx.bundle(), &fx.trusted()).unwrap_err();
        assert!(
            matches!(err, VerifyError::UnattestedWorkspace { .. }),
            "{err}"
        );
    }

    #[test]
    fn envelope_not_listed_by_the_job_is_rejected() {
        let mut fx = Fixture::new();
        let bundle = fx.bundle();
        // A validly signed, different build statement swapped in after the job was signed.
        step_mut(&mut fx, "build")
            .predicate
            .run_details
            .metadata
            .finished_on = "2025-01-01T00:00:09Z".into();
        let swapped = fx.sign_step(&fx.steps[0]);
        let mut tampered = bundle.clone();
        tampered.steps.insert("build".into(), swapped.clone());
        let err = verify_artifact(&Fixture::artifact(), &tampered, &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::EnvelopeMismatch { step, found, .. }
                if step == "build" && *found == envelope_digest(&swapped)),
            "{err}"
        );
        assert!(err.to_string().ends_with("the envelope was replaced"));

        let mut extra = bundle.clone();
        extra.steps.insert("deploy".into(), swapped);
        let err = verify_artifact(&Fixture::artifact(), &extra, &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::StepNotInJob { step, .. } if step == "deploy"),
            "{err}"
        );

        let mut missing = bundle.clone();
        missing.steps.remove("test");
        let err = verify_artifact(&Fixture::artifact(), &missing, &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::StepMissing { step, .. } if step == "test"),
            "{err}"
        );

        // The test envelope filed under the build entry.
        let mut misfiled = bundle.clone();
        let test = misfiled.steps["test"].clone();
        misfiled.steps.insert("build".into(), test);
        assert!(matches!(
            verify_artifact(&Fixture::artifact(), &misfiled, &fx.trusted()),
            Err(VerifyError::EnvelopeMismatch { .. })
        ));
    }

    #[test]
    fn pipeline_digest_mismatch_is_rejected() {
        let mut fx = Fixture::new();
        let other = Digest::of(b"another pipeline");
        step_mut(&mut fx, "test")
            .predicate
            .build_definition
            .external_parameters
            .pipeline_digest = other;
        let err = verify_artifact(&Fixture::artifact(), &fx.bundle(), &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::PipelineMismatch { step, found, .. } if step == "test" && *found == other),
            "{err}"
        );
    }

    #[test]
    fn other_broken_links() {
        let fx = Fixture::new();
        let mut bundle = fx.bundle();
        bundle.media_type = "application/json".into();
        assert!(matches!(
            verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()),
            Err(VerifyError::MediaType { .. })
        ));

        let mut bundle = fx.bundle();
        bundle.job_id = "job-9".into();
        assert!(matches!(
            verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()),
            Err(VerifyError::JobIdMismatch { .. })
        ));

        let mut fx = Fixture::new();
        step_mut(&mut fx, "package")
            .predicate
            .build_definition
            .internal_parameters
            .outcome = "failed".into();
        let err = verify_artifact(&Fixture::artifact(), &fx.bundle(), &fx.trusted()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "step \"package\" that produced the artifact ended \"failed\", not \"succeeded\""
        );

        let mut fx = Fixture::new();
        step_mut(&mut fx, "build")
            .predicate
            .build_definition
            .internal_parameters
            .signing_key
            .keyid = "sha256:00".into();
        assert!(matches!(
            verify_artifact(&Fixture::artifact(), &fx.bundle(), &fx.trusted()),
            Err(VerifyError::SignerMismatch { .. })
        ));

        let mut fx = Fixture::new();
        fx.job.predicate_type = crate::intoto::SLSA_PROVENANCE_V1.into();
        assert!(matches!(
            verify_artifact(&Fixture::artifact(), &fx.bundle(), &fx.trusted()),
            Err(VerifyError::JobPredicateType { .. })
        ));
    }

    #[test]
    fn extra_attestations_are_linked_signed_and_about_job_outputs() {
        use crate::intoto::{
            CYCLONEDX_BOM, PAYLOAD_TYPE, ResourceDescriptor, STATEMENT_TYPE, Statement, digest_set,
        };
        let sign = |key: &SigningKey, name: &str, digest: Digest| {
            let statement = Statement {
                statement_type: STATEMENT_TYPE.into(),
                subject: vec![ResourceDescriptor {
                    name: Some(name.into()),
                    uri: None,
                    digest: digest_set(&digest),
                    media_type: None,
                }],
                predicate_type: CYCLONEDX_BOM.into(),
                predicate: serde_json::json!({ "bomFormat": "CycloneDX", "specVersion": "1.5" }),
            };
            Envelope::sign(PAYLOAD_TYPE, &serde_json::to_vec(&statement).unwrap(), key).unwrap()
        };
        let link = |fx: &mut Fixture, envelope: &Envelope| {
            step_mut(fx, "package")
                .predicate
                .run_details
                .byproducts
                .push(ResourceDescriptor {
                    name: Some("sbom".into()),
                    uri: None,
                    digest: digest_set(&envelope_digest(envelope)),
                    media_type: Some("application/vnd.dsse.envelope.v1+json".into()),
                });
        };
        let attach = |bundle: &mut Bundle, envelope: Envelope| {
            bundle.attestations.push(StepAttestation {
                step: "package".into(),
                name: "sbom".into(),
                envelope,
            });
        };
        let mut fx = Fixture::new();
        let sbom = sign(&fx.key, "dist/hello.tar.gz", Digest::of(ARTIFACT));
        link(&mut fx, &sbom);
        let mut bundle = fx.bundle();
        // Named by the provenance but left out of the bundle.
        let err = verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::AttestationMissing { step, name, .. } if step == "package" && name == "sbom"),
            "{err}"
        );
        attach(&mut bundle, sbom.clone());
        let bundle: Bundle = serde_json::from_slice(&serde_json::to_vec(&bundle).unwrap()).unwrap();
        let verified = verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()).unwrap();
        assert_eq!(verified.attestations.len(), 1);
        assert_eq!(verified.attestations[0].predicate_type, CYCLONEDX_BOM);
        assert!(verified.attestations[0].covers_artifact);

        // Another validly signed SBOM swapped in: not the one the provenance names.
        let mut swapped = bundle.clone();
        swapped.attestations[0].envelope = sign(&fx.key, "dist/SHA256SUMS", Digest::of(b"sums"));
        let err = verify_artifact(&Fixture::artifact(), &swapped, &fx.trusted()).unwrap_err();
        assert!(
            matches!(err, VerifyError::AttestationNotLinked { .. }),
            "{err}"
        );

        // Linked and signed, but about a file the job never produced.
        let mut fx = Fixture::new();
        let foreign = sign(&fx.key, "evil.bin", Digest::of(b"evil"));
        link(&mut fx, &foreign);
        let mut bundle = fx.bundle();
        attach(&mut bundle, foreign);
        let err = verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::AttestationSubject { subject, .. } if subject == "evil.bin"),
            "{err}"
        );

        // Linked, but signed by a key that did not sign the step.
        let mut fx = Fixture::new();
        let (other, _) = SigningKey::generate().unwrap();
        let forged = sign(&other, "dist/hello.tar.gz", Digest::of(ARTIFACT));
        link(&mut fx, &forged);
        let mut bundle = fx.bundle();
        attach(&mut bundle, forged);
        let err = verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::AttestationEnvelope {
                    source: DsseError::UntrustedSigner { .. },
                    ..
                }
            ),
            "{err}"
        );

        // For a step the job does not attest.
        let fx = Fixture::new();
        let mut bundle = fx.bundle();
        bundle.attestations.push(StepAttestation {
            step: "deploy".into(),
            name: "sbom".into(),
            envelope: sbom,
        });
        assert!(matches!(
            verify_artifact(&Fixture::artifact(), &bundle, &fx.trusted()),
            Err(VerifyError::AttestationStepUnknown { .. })
        ));
    }

    #[test]
    fn artifact_ref_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hello.tar.gz");
        std::fs::write(&path, ARTIFACT).unwrap();
        let artifact = ArtifactRef::from_file(&path).unwrap();
        assert_eq!(artifact, Fixture::artifact());
    }
}
