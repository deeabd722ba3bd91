//! The input document of verification policies (`kiln verify ARTIFACT --policy FILE.rego`).
//!
//! After [`crate::verify::verify_artifact`] has checked the whole chain, [`PolicyInput::build`]
//! lays the verified job out as one JSON document for a policy engine: the artifact, the pipeline
//! (digest and accepted signer), the parameters, and every step in execution order with what its
//! signed provenance says (kind, outcome, profile, network, teardown, signer, inputs, outputs).
//! The document is reference material for policy authors: docs/policy.md describes every field.
//!
//! Building it decodes the bundle's envelopes **without** checking signatures again: call it only
//! with a bundle that `verify_artifact` accepted (which verified every envelope it decodes here).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::digest::Digest;
use crate::dsse::DsseError;
use crate::intoto::{JobStatement, StepStatement, sha256_of};
use crate::verify::{ArtifactRef, Bundle, VerifiedArtifact};

/// `input` of a verification policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInput {
    /// The verified artifact.
    pub artifact: ArtifactInput,
    /// The job that built it.
    pub job: JobInput,
    /// The pipeline definition the job ran.
    pub pipeline: PipelineInput,
    /// Parameter values after defaults.
    pub parameters: BTreeMap<String, String>,
    /// Workspaces seeded from submitted sources: name → tree digest.
    pub sources: BTreeMap<String, Digest>,
    /// Every step of the job in execution order (skipped ones too).
    pub steps: Vec<StepInput>,
    /// Names of the steps whose links `verify` checked, from the producing step back to the
    /// sources (the artifact's own chain; `steps` may hold more).
    pub chain: Vec<String>,
    /// The extra attestations `verify` checked (a publish step's SBOM and test results).
    pub attestations: Vec<AttestationInput>,
}

/// One entry of `input.attestations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationInput {
    /// The step that signed it.
    pub step: String,
    /// Its byproduct name (`sbom`, `test-result:<test step>`).
    pub name: String,
    /// The statement's predicate type.
    pub predicate_type: String,
    /// Subjects (name → sha256 digest).
    pub subjects: Vec<FileInput>,
    /// The predicate as signed.
    pub predicate: serde_json::Value,
}

/// `input.artifact`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactInput {
    /// File name.
    pub name: String,
    /// Content digest.
    pub digest: Digest,
    /// The attested subject it matched (path in its workspace).
    pub subject: String,
    /// The step that produced it.
    pub step: String,
}

/// `input.job`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobInput {
    /// Job id.
    pub id: String,
    /// `succeeded`, `failed`, `cancelled`.
    pub outcome: String,
    /// SLSA builder id of the node.
    pub builder_id: String,
    /// The key that signed the job statement.
    pub signer: SignerInput,
    /// RFC 3339.
    pub started_on: String,
    /// RFC 3339.
    pub finished_on: String,
}

/// `input.pipeline`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineInput {
    /// Pipeline name.
    pub name: String,
    /// sha256 of the pipeline file.
    pub digest: Digest,
    /// keyid of the signer the node's admission policy accepted; `null` if admitted unsigned.
    pub signer: Option<String>,
}

/// A signing key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignerInput {
    /// DSSE keyid.
    pub keyid: String,
    /// `software` or `tpm`.
    pub kind: String,
}

/// One entry of `input.steps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepInput {
    /// Step name.
    pub name: String,
    /// `succeeded`, `failed`, `timed-out`, `cancelled`, `skipped`.
    pub outcome: String,
    /// Whether the step has a signed statement (false for steps that never ran); the fields
    /// below are `null` (or empty) without one.
    pub attested: bool,
    /// `source`, `fetch`, `build`, `test`, `publish`, `run`.
    pub kind: Option<String>,
    /// Sandbox profile.
    pub profile: Option<String>,
    /// `none` (empty network namespace); `null` when the statement predates the field.
    pub network: Option<String>,
    /// The node verified nothing of the worker survived.
    pub teardown_verified: bool,
    /// The eBPF observer recorded the step.
    pub observed: bool,
    /// Exit code of the step's command.
    pub exit_code: Option<i32>,
    /// The key that signed the step statement.
    pub signer: Option<SignerInput>,
    /// SLSA builder id.
    pub builder_id: Option<String>,
    /// Pipeline digest the step statement names.
    pub pipeline_digest: Option<Digest>,
    /// Pipeline signer the step statement names.
    pub pipeline_signer: Option<String>,
    /// Input workspaces as the step saw them.
    pub inputs: Vec<WorkspaceInput>,
    /// The workspace it wrote.
    pub output_workspace: Option<String>,
    /// Files it wrote (its subjects).
    pub outputs: Vec<FileInput>,
    /// RFC 3339.
    pub started_on: Option<String>,
    /// RFC 3339.
    pub finished_on: Option<String>,
    /// Every resolved dependency of the step's provenance as signed (input workspaces, the git
    /// commit or tarball of a source step, the image of the build environment, …).
    pub dependencies: Vec<crate::intoto::ResourceDescriptor>,
    /// The step provenance's `internalParameters`, exactly as signed (`null` without a
    /// statement): everything kind-specific a policy may check — `source` (git commit),
    /// `sourceDateEpoch`, the fetch step's connections and pins, reproducibility, the image, …
    /// (docs/formats.md lists the fields).
    pub internal_parameters: serde_json::Value,
}

/// An input workspace of a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkspaceInput {
    /// Workspace name.
    pub workspace: String,
    /// Tree digest.
    pub digest: Option<Digest>,
}

/// A file a step wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileInput {
    /// Path in the output workspace.
    pub path: String,
    /// Content digest.
    pub digest: Option<Digest>,
}

/// A bundle whose statements cannot be decoded (only for bundles `verify` did not accept).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the policy input from attestation {attestation}: {source}")]
pub struct PolicyInputError {
    /// `job` or `step <name>`.
    pub attestation: String,
    /// Why.
    #[source]
    pub source: DsseError,
}

impl PolicyInput {
    /// Lay out a verified bundle (see the module documentation for the precondition).
    pub fn build(
        artifact: &ArtifactRef,
        bundle: &Bundle,
        verified: &VerifiedArtifact,
    ) -> Result<Self, PolicyInputError> {
        let job: JobStatement =
            bundle
                .job
                .decode_statement()
                .map_err(|source| PolicyInputError {
                    attestation: "job".into(),
                    source,
                })?;
        let job = job.predicate;
        let mut steps = Vec::with_capacity(job.steps.len());
        for step in &job.steps {
            let statement: Option<StepStatement> = match bundle.steps.get(&step.name) {
                Some(envelope) if step.envelope_digest.is_some() => Some(
                    envelope
                        .decode_statement()
                        .map_err(|source| PolicyInputError {
                            attestation: format!("step {}", step.name),
                            source,
                        })?,
                ),
                _ => None,
            };
            steps.push(step_input(&step.name, &step.outcome, statement.as_ref()));
        }
        let mut attestations = Vec::new();
        for extra in &bundle.attestations {
            let checked = verified
                .attestations
                .iter()
                .any(|a| a.step == extra.step && a.name == extra.name);
            if !checked {
                continue;
            }
            let statement = extra
                .envelope
                .decode_statement::<serde_json::Value>()
                .map_err(|source| PolicyInputError {
                    attestation: format!("{} of step {}", extra.name, extra.step),
                    source,
                })?;
            attestations.push(AttestationInput {
                step: extra.step.clone(),
                name: extra.name.clone(),
                predicate_type: statement.predicate_type.clone(),
                subjects: files(&statement.subject),
                predicate: statement.predicate,
            });
        }
        Ok(Self {
            artifact: ArtifactInput {
                name: artifact.name.clone(),
                digest: artifact.digest,
                subject: verified.subject_name.clone(),
                step: verified.step.clone(),
            },
            job: JobInput {
                id: job.job_id.clone(),
                outcome: job.outcome.clone(),
                builder_id: job.builder_id.clone(),
                signer: SignerInput {
                    keyid: job.signing_key.keyid.clone(),
                    kind: job.signing_key.kind.clone(),
                },
                started_on: job.started_on.clone(),
                finished_on: job.finished_on.clone(),
            },
            pipeline: PipelineInput {
                name: job.pipeline.clone(),
                digest: job.pipeline_digest,
                signer: job.pipeline_signer.clone(),
            },
            parameters: job.parameters.clone(),
            sources: job.sources.clone(),
            steps,
            chain: verified.chain.clone(),
            attestations,
        })
    }
}

/// Subjects of a statement as files (name → sha256).
fn files(subjects: &[crate::intoto::ResourceDescriptor]) -> Vec<FileInput> {
    subjects
        .iter()
        .map(|s| FileInput {
            path: s.name.clone().unwrap_or_default(),
            digest: sha256_of(&s.digest),
        })
        .collect()
}

fn step_input(name: &str, outcome: &str, statement: Option<&StepStatement>) -> StepInput {
    let Some(statement) = statement else {
        return StepInput {
            name: name.to_owned(),
            outcome: outcome.to_owned(),
            attested: false,
            kind: None,
            profile: None,
            network: None,
            teardown_verified: false,
            observed: false,
            exit_code: None,
            signer: None,
            builder_id: None,
            pipeline_digest: None,
            pipeline_signer: None,
            inputs: Vec::new(),
            output_workspace: None,
            outputs: Vec::new(),
            started_on: None,
            finished_on: None,
            dependencies: Vec::new(),
            internal_parameters: serde_json::Value::Null,
        };
    };
    let definition = &statement.predicate.build_definition;
    let internal = &definition.internal_parameters;
    let run = &statement.predicate.run_details;
    StepInput {
        name: name.to_owned(),
        outcome: outcome.to_owned(),
        attested: true,
        kind: Some(internal.kind.clone()),
        profile: Some(internal.profile.clone()),
        network: internal.network.clone(),
        teardown_verified: internal.teardown_verified,
        observed: internal.observed,
        exit_code: internal.exit_code,
        signer: Some(SignerInput {
            keyid: internal.signing_key.keyid.clone(),
            kind: internal.signing_key.kind.clone(),
        }),
        builder_id: Some(run.builder.id.clone()),
        pipeline_digest: Some(definition.external_parameters.pipeline_digest),
        pipeline_signer: internal.pipeline_signer.clone(),
        inputs: definition
            .resolved_dependencies
            .iter()
            .filter_map(|d| {
                let workspace = d.uri.as_deref()?.strip_prefix("urn:kiln:workspace:")?;
                Some(WorkspaceInput {
                    workspace: workspace.to_owned(),
                    digest: sha256_of(&d.digest),
                })
            })
            .collect(),
        output_workspace: internal.output_workspace.clone(),
        outputs: files(&statement.subject),
        started_on: Some(run.metadata.started_on.clone()),
        finished_on: Some(run.metadata.finished_on.clone()),
        dependencies: definition.resolved_dependencies.clone(),
        internal_parameters: serde_json::to_value(internal).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::fixture::{ARTIFACT, Fixture};
    use crate::verify::verify_artifact;

    #[test]
    fn input_lists_every_step_in_job_order_with_its_provenance() {
        let fixture = Fixture::new();
        let bundle = fixture.bundle();
        let artifact = ArtifactRef {
            name: "hello.tar.gz".into(),
            digest: Digest::of(ARTIFACT),
        };
        let verified = verify_artifact(&artifact, &bundle, &[fixture.key.public_key()]).unwrap();
        let input = PolicyInput::build(&artifact, &bundle, &verified).unwrap();
        let names: Vec<&str> = input.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["build", "test", "package"]);
        assert_eq!(input.steps[1].kind.as_deref(), Some("test"));
        assert_eq!(input.steps[0].network.as_deref(), Some("none"));
        assert!(
            input
                .steps
                .iter()
                .all(|s| s.teardown_verified && s.attested)
        );
        assert_eq!(input.artifact.step, "package");
        assert_eq!(input.pipeline.name, "hello");
        let json = serde_json::to_value(&input).unwrap();
        assert_eq!(json["steps"][0]["teardownVerified"], true);
        assert_eq!(json["steps"][2]["outputs"][0]["path"], "dist/hello.tar.gz");
        assert_eq!(json["pipeline"]["signer"], serde_json::Value::Null);
        assert_eq!(
            json["steps"][0]["internalParameters"]["teardownVerified"],
            true
        );
        assert_eq!(json["steps"][0]["internalParameters"]["kind"], "build");
        assert_eq!(
            json["steps"][1]["dependencies"][0]["uri"],
            "urn:kiln:workspace:src"
        );
    }
}
