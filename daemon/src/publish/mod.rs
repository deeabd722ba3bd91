//! The publish step's attestations (seed: "artifact repository"): when a `kind = "publish"`
//! step succeeds, kilnd attests, about the files it wrote,
//! - an SBOM (CycloneDX 1.5, [`kiln_common::sbom`]): the pinned downloads of the job's fetch
//!   steps (pipeline pins with their URLs, checked against what the fetch steps recorded), the
//!   job's sources (tree digests; git commit or tarball pin of source steps) and the files the
//!   build and publish steps were observed reading (their runtime traces);
//! - one in-toto test-result v0.1 statement per test step that ran before it, whose subjects are
//!   the attested files that test read, with its outcome, exit code, duration and log digest.
//!
//! Each is signed by the publish step's workload key, stored in the CAS, indexed in SQLite, and
//! named with its envelope digest among the byproducts of the step's provenance (`sbom`,
//! `test-result:<test step>`), so the job statement covers them through the step's envelope.

use std::collections::BTreeMap;

use kiln_common::Digest;
use kiln_common::api::{StepState, StepStatus};
use kiln_common::digest::{TreeEntry, tree_digest};
use kiln_common::dsse::Envelope;
use kiln_common::intoto::{
    self, CYCLONEDX_BOM, ResourceDescriptor, SBOM_BYPRODUCT, STATEMENT_TYPE, SourceIngest,
    Statement, StepStatement, TEST_RESULT_BYPRODUCT_PREFIX, TEST_RESULT_V01, TestResult, TestRun,
};
use kiln_common::sbom::{self, FetchedDependency, ObservedMaterial, SbomInput, SourceInput};
use kiln_common::spec::{Pipeline, StepKind};

use crate::pipeline::Node;
use crate::provenance::WorkloadSigner;
use crate::store::db::StepAttestationRow;
use crate::store::{Cas, Db};

/// At most this many observed reads per step go into the SBOM (the trace's own summary is
/// bounded too; the full trace stays the reference).
const MAX_MATERIALS_PER_STEP: usize = 2000;

/// Why the publish attestations could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The index failed.
    #[error("publish: {0}")]
    Db(#[from] crate::store::DbError),
    /// A blob the attestations are built from is missing or unreadable.
    #[error("publish: {what} {digest}: {source}")]
    Blob {
        /// What it is.
        what: String,
        /// Its digest.
        digest: Digest,
        /// Cause (boxed: the CAS error is large).
        #[source]
        source: Box<crate::store::CasError>,
    },
    /// A stored envelope does not decode.
    #[error("publish: {what}: {source}")]
    Decode {
        /// What it is.
        what: String,
        /// Cause.
        #[source]
        source: kiln_common::dsse::DsseError,
    },
    /// A stored blob is not a DSSE envelope.
    #[error("publish: {what} is not a dsse envelope: {source}")]
    NotEnvelope {
        /// What it is.
        what: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The job is not in the index.
    #[error("publish: job {0} is not in the index")]
    NoJob(String),
}

/// What the attestations are about.
#[derive(Debug, Clone)]
pub struct PublishInput<'a> {
    /// Job id.
    pub job_id: &'a str,
    /// The pipeline.
    pub pipeline: &'a Pipeline,
    /// Its digest.
    pub pipeline_digest: Digest,
    /// The publish step.
    pub step: &'a str,
    /// Tree digest of every workspace so far (sources and step outputs).
    pub workspaces: &'a BTreeMap<String, Digest>,
    /// The files the publish step wrote: the subjects.
    pub artifacts: &'a [TreeEntry],
}

/// One statement to sign.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Byproduct name.
    pub name: String,
    /// The statement.
    pub statement: Statement<serde_json::Value>,
    /// Its subjects, for the index.
    pub subjects: Vec<TreeEntry>,
}

fn load_envelope(cas: &Cas, what: &str, digest: &Digest) -> Result<Envelope, PublishError> {
    let bytes = cas.get(digest).map_err(|source| PublishError::Blob {
        what: what.to_owned(),
        digest: *digest,
        source: Box::new(source),
    })?;
    serde_json::from_slice(&bytes).map_err(|source| PublishError::NotEnvelope {
        what: what.to_owned(),
        source,
    })
}

fn provenance(cas: &Cas, step: &StepStatus) -> Result<Option<StepStatement>, PublishError> {
    let Some(digest) = &step.attestation else {
        return Ok(None);
    };
    let what = format!("provenance of step {:?}", step.name);
    let envelope = load_envelope(cas, &what, digest)?;
    envelope
        .decode_statement()
        .map(Some)
        .map_err(|source| PublishError::Decode { what, source })
}

/// Files a step's runtime trace saw it read (`monitorLog.fileAccess` with access `read`).
fn observed_reads(
    cas: &Cas,
    step: &str,
    statement: &StepStatement,
) -> Result<Vec<ObservedMaterial>, PublishError> {
    let Some(trace) = statement
        .predicate
        .run_details
        .byproducts
        .iter()
        .find(|b| b.name.as_deref() == Some(kiln_common::trace::TRACE_BYPRODUCT))
        .and_then(|b| intoto::sha256_of(&b.digest))
    else {
        return Ok(Vec::new());
    };
    let what = format!("runtime trace of step {step:?}");
    let envelope = load_envelope(cas, &what, &trace)?;
    let trace: Statement<serde_json::Value> = envelope
        .decode_statement()
        .map_err(|source| PublishError::Decode { what, source })?;
    let accesses = trace.predicate["monitorLog"]["fileAccess"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(accesses
        .iter()
        .filter(|a| {
            a["annotations"]["access"]
                .as_array()
                .is_some_and(|ops| ops.iter().any(|op| op == "read"))
        })
        .filter_map(|a| a["name"].as_str())
        .take(MAX_MATERIALS_PER_STEP)
        .map(|path| ObservedMaterial {
            step: step.to_owned(),
            path: path.to_owned(),
        })
        .collect())
}

/// Build the SBOM and test-result statements (unsigned).
pub fn prepare(
    db: &Db,
    cas: &Cas,
    input: &PublishInput<'_>,
) -> Result<Vec<Prepared>, PublishError> {
    let job = db
        .job(input.job_id)?
        .ok_or_else(|| PublishError::NoJob(input.job_id.to_owned()))?;
    let done: Vec<&StepStatus> = job
        .steps
        .iter()
        .filter(|s| s.state.is_terminal() && s.state != StepState::Skipped && s.name != input.step)
        .collect();
    let mut bom = SbomInput {
        serial_number: format!("urn:uuid:{}", uuid::Uuid::now_v7()),
        timestamp: crate::pipeline::now(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        pipeline: input.pipeline.name.clone(),
        job_id: input.job_id.to_owned(),
        artifacts: input.artifacts.to_vec(),
        ..SbomInput::default()
    };
    // Sources uploaded with the job.
    for (ws, decl) in &input.pipeline.workspaces {
        if decl.source.is_some()
            && let Some(tree) = input.workspaces.get(ws)
        {
            bom.sources.push(SourceInput {
                workspace: ws.clone(),
                tree_digest: *tree,
                git: None,
                tarball: None,
            });
        }
    }
    let mut tests = Vec::new();
    for status in &done {
        let spec = input.pipeline.steps.iter().find(|s| s.name == status.name);
        let Some(spec) = spec else { continue };
        let statement = provenance(cas, status)?;
        match spec.kind {
            StepKind::Fetch => {
                let recorded: BTreeMap<&str, Digest> = status
                    .outputs
                    .iter()
                    .map(|e| (e.path.as_str(), e.digest))
                    .collect();
                let pins = spec
                    .fetch
                    .as_ref()
                    .map(|f| f.pins.as_slice())
                    .unwrap_or_default();
                for pin in pins {
                    bom.fetched.push(FetchedDependency {
                        step: status.name.clone(),
                        path: pin.path.clone(),
                        sha256: pin.sha256,
                        url: pin.url.clone(),
                        recorded: recorded.get(pin.path.as_str()).copied(),
                        pinned: true,
                    });
                }
                for e in &status.outputs {
                    if !pins.iter().any(|p| p.path == e.path) {
                        bom.fetched.push(FetchedDependency {
                            step: status.name.clone(),
                            path: e.path.clone(),
                            sha256: e.digest,
                            url: None,
                            recorded: Some(e.digest),
                            pinned: false,
                        });
                    }
                }
            }
            StepKind::Source => {
                let ingest = statement.as_ref().and_then(|s| {
                    s.predicate
                        .build_definition
                        .internal_parameters
                        .source
                        .clone()
                });
                if let Some(ws) = &status.output {
                    bom.sources.push(SourceInput {
                        workspace: ws.clone(),
                        tree_digest: tree_digest(&status.outputs),
                        git: match &ingest {
                            Some(SourceIngest::Git { repo, commit, .. }) => {
                                Some((repo.clone(), commit.clone()))
                            }
                            _ => None,
                        },
                        tarball: match &ingest {
                            Some(SourceIngest::Tarball { path, sha256 }) => {
                                Some((path.clone(), *sha256))
                            }
                            _ => None,
                        },
                    });
                }
            }
            StepKind::Build | StepKind::Publish => {
                if let Some(statement) = &statement {
                    bom.materials
                        .extend(observed_reads(cas, &status.name, statement)?);
                }
            }
            StepKind::Test => {
                if let Some(p) = test_result(&job.steps, input, status, statement.as_ref()) {
                    tests.push(p);
                }
            }
            StepKind::Run => {}
        }
    }
    let sbom = Prepared {
        name: SBOM_BYPRODUCT.into(),
        statement: Statement {
            statement_type: STATEMENT_TYPE.into(),
            subject: crate::provenance::subjects(input.artifacts),
            predicate_type: CYCLONEDX_BOM.into(),
            predicate: serde_json::to_value(sbom::cyclonedx(&bom)).unwrap_or_default(),
        },
        subjects: input.artifacts.to_vec(),
    };
    let mut out = vec![sbom];
    out.extend(tests);
    Ok(out)
}

/// A test step's result, about the attested files it read (outputs of the steps that wrote its
/// input workspaces); `None` when it read none (only sources): a statement needs a subject.
fn test_result(
    all: &[StepStatus],
    input: &PublishInput<'_>,
    test: &StepStatus,
    statement: Option<&StepStatement>,
) -> Option<Prepared> {
    let inputs: Vec<ResourceDescriptor> = statement
        .map(|s| s.predicate.build_definition.resolved_dependencies.clone())
        .unwrap_or_default();
    let mut read = Vec::new();
    for dep in &inputs {
        let Some(ws) = dep
            .uri
            .as_deref()
            .and_then(|u| u.strip_prefix("urn:kiln:workspace:"))
        else {
            continue;
        };
        let tree = intoto::sha256_of(&dep.digest);
        // The step that wrote the workspace the test saw (same tree digest).
        if let Some(producer) = all.iter().find(|s| {
            s.output.as_deref() == Some(ws)
                && s.state == StepState::Succeeded
                && Some(tree_digest(&s.outputs)) == tree
        }) {
            read.extend(producer.outputs.iter().cloned());
        }
    }
    if read.is_empty() {
        tracing::info!(test = %test.name, "test read no attested artifact: no test-result statement");
        return None;
    }
    read.sort_by(|a, b| (&a.path, a.digest).cmp(&(&b.path, b.digest)));
    read.dedup();
    let passed = test.state == StepState::Succeeded;
    let predicate = TestResult {
        result: if passed { "PASSED" } else { "FAILED" }.into(),
        configuration: vec![ResourceDescriptor {
            name: Some(input.pipeline.name.clone()),
            uri: None,
            digest: intoto::digest_set(&input.pipeline_digest),
            media_type: Some("application/toml".into()),
        }],
        url: Some(format!("urn:kiln:job:{}:step:{}", input.job_id, test.name)),
        passed_tests: if passed {
            vec![test.name.clone()]
        } else {
            Vec::new()
        },
        warned_tests: Vec::new(),
        failed_tests: if passed {
            Vec::new()
        } else {
            vec![test.name.clone()]
        },
        kiln: Some(TestRun {
            step: test.name.clone(),
            outcome: test.state.as_str().into(),
            exit_code: test.exit_code,
            duration_ms: test.duration_ms,
            log: test.log,
            provenance: test.attestation,
            inputs,
        }),
    };
    Some(Prepared {
        name: format!("{TEST_RESULT_BYPRODUCT_PREFIX}{}", test.name),
        statement: Statement {
            statement_type: STATEMENT_TYPE.into(),
            subject: crate::provenance::subjects(&read),
            predicate_type: TEST_RESULT_V01.into(),
            predicate: serde_json::to_value(predicate).unwrap_or_default(),
        },
        subjects: read,
    })
}

impl Node {
    /// Make, sign (with the publish step's workload key), store and index the publish
    /// attestations; returns the byproducts the step's provenance must name.
    pub(crate) fn publish_attestations(
        &self,
        signer: &WorkloadSigner<'_>,
        input: &PublishInput<'_>,
    ) -> Result<Vec<ResourceDescriptor>, String> {
        let prepared =
            prepare(&self.store.db, &self.store.cas, input).map_err(|e| e.to_string())?;
        let mut byproducts = Vec::new();
        for p in prepared {
            let digest = self.attest(signer, &p.statement, |d| {
                self.store.db.record_step_attestation(
                    input.job_id,
                    &StepAttestationRow {
                        step: input.step.to_owned(),
                        name: p.name.clone(),
                        predicate_type: p.statement.predicate_type.clone(),
                        envelope: *d,
                    },
                    &p.subjects,
                    &crate::pipeline::now(),
                )
            })?;
            tracing::info!(attestation = %p.name, %digest, "publish attestation signed");
            byproducts.push(kiln_common::trace::envelope_descriptor(&p.name, &digest));
        }
        Ok(byproducts)
    }
}
