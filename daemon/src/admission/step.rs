//! Step admission: before a step starts, kilnd re-checks every input workspace it will mount.
//!
//! For a workspace an earlier step wrote, the producer's DSSE envelope is loaded from the CAS by
//! the digest recorded when it was signed (the CAS checks the content address), must re-serialize to
//! that same digest, must verify with the node's key, must be the statement of that step, and its
//! subjects must hash to the workspace digest the job carries forward. Then, for every input, the
//! tree digest is recomputed from the files on disk. Any difference fails the job before the step
//! runs: "workspace <ws> modified after step <producer> signed it". This closes the window between
//! two steps in which something on the host (or a step escaping its sandbox) could swap the files
//! a later step builds from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use kiln_common::Digest;
use kiln_common::digest::{TreeEntry, tree_digest};
use kiln_common::dsse::{Envelope, envelope_digest};
use kiln_common::intoto::{StepStatement, sha256_of};
use kiln_common::keys::PublicKey;

use crate::pipeline::workspace;
use crate::store::Cas;

/// The step that wrote a workspace, the digest of its signed envelope and the key that signed it
/// (all three kept in kilnd's memory from the moment it was signed, never re-read from disk).
#[derive(Debug, Clone)]
pub struct Producer {
    /// Step name.
    pub step: String,
    /// Digest of its DSSE envelope, as recorded when it was signed.
    pub envelope: Digest,
    /// The key that signed it: the node key, or the step's workload key certified by the node key.
    pub key: PublicKey,
}

/// Everything step admission needs, owned (it runs on a blocking thread: hashing is I/O).
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// `<work dir>/ws`: input workspaces live at `<ws_root>/<name>`.
    pub ws_root: PathBuf,
    /// The step's input workspaces.
    pub inputs: Vec<String>,
    /// Tree digest the job carries for each workspace so far (sources and step outputs).
    pub expected: BTreeMap<String, Digest>,
    /// Producer of each step-written workspace.
    pub producers: BTreeMap<String, Producer>,
}

/// Check a step's inputs (see the module documentation); `Err` is the job's failure reason.
pub async fn admit(cas: Cas, inputs: StepInputs) -> Result<(), String> {
    tokio::task::spawn_blocking(move || check(&cas, &inputs))
        .await
        .map_err(|e| format!("step admission task failed: {e}"))?
}

fn check(cas: &Cas, inputs: &StepInputs) -> Result<(), String> {
    for ws in &inputs.inputs {
        // A workspace never produced is reported by the scheduler itself.
        let Some(expected) = inputs.expected.get(ws) else {
            continue;
        };
        let producer = inputs.producers.get(ws);
        let signed = match producer {
            Some(p) => Some(verify_producer(cas, ws, p, expected)?),
            None => None,
        };
        let on_disk = workspace::collect(&inputs.ws_root.join(ws), None)
            .map_err(|e| format!("step admission: workspace {ws}: {e}"))?
            .entries;
        if tree_digest(&on_disk) != *expected {
            let what = match producer {
                Some(p) => format!("workspace {ws} modified after step {} signed it", p.step),
                None => format!("workspace {ws} modified after it was seeded from its source"),
            };
            let changes = signed
                .as_deref()
                .map(|signed| describe_changes(signed, &on_disk))
                .unwrap_or_default();
            return Err(if changes.is_empty() {
                what
            } else {
                format!("{what} ({changes})")
            });
        }
    }
    Ok(())
}

/// The producer's attestation of `ws`, re-verified; returns the signed file list.
fn verify_producer(
    cas: &Cas,
    ws: &str,
    producer: &Producer,
    expected: &Digest,
) -> Result<Vec<TreeEntry>, String> {
    let fail = |why: String| {
        format!(
            "workspace {ws} modified after step {} signed it: its attestation {} {why}",
            producer.step, producer.envelope
        )
    };
    let bytes = cas
        .get(&producer.envelope)
        .map_err(|e| fail(format!("cannot be read: {e}")))?;
    let envelope: Envelope =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("is not a DSSE envelope: {e}")))?;
    if envelope_digest(&envelope) != producer.envelope {
        return Err(fail("is not in its canonical form".into()));
    }
    let statement: StepStatement = envelope
        .verify(std::slice::from_ref(&producer.key))
        .and_then(|payload| payload.decode_statement())
        .map_err(|e| fail(format!("does not verify: {e}")))?;
    let params = &statement.predicate.build_definition;
    if params.external_parameters.step != producer.step
        || params.internal_parameters.output_workspace.as_deref() != Some(ws)
    {
        return Err(fail(format!(
            "is the statement of step {:?} writing {:?}",
            params.external_parameters.step, params.internal_parameters.output_workspace
        )));
    }
    let mut signed = Vec::with_capacity(statement.subject.len());
    for subject in &statement.subject {
        match (&subject.name, sha256_of(&subject.digest)) {
            (Some(path), Some(digest)) => signed.push(TreeEntry {
                path: path.clone(),
                digest,
            }),
            _ => return Err(fail("has a subject without name or sha256".into())),
        }
    }
    if tree_digest(&signed) != *expected {
        return Err(fail(format!(
            "attests {} but the job carries {expected}",
            tree_digest(&signed)
        )));
    }
    Ok(signed)
}

/// "a.txt changed, b.txt added, c.txt removed" (first few).
fn describe_changes(signed: &[TreeEntry], on_disk: &[TreeEntry]) -> String {
    let before: BTreeMap<&str, &Digest> = signed
        .iter()
        .map(|e| (e.path.as_str(), &e.digest))
        .collect();
    let after: BTreeMap<&str, &Digest> = on_disk
        .iter()
        .map(|e| (e.path.as_str(), &e.digest))
        .collect();
    let paths: BTreeSet<&str> = before.keys().chain(after.keys()).copied().collect();
    let changes: Vec<String> = paths
        .into_iter()
        .filter_map(|p| match (before.get(p), after.get(p)) {
            (Some(a), Some(b)) if a != b => Some(format!("{p} changed")),
            (Some(_), None) => Some(format!("{p} removed")),
            (None, Some(_)) => Some(format!("{p} added")),
            _ => None,
        })
        .collect();
    let shown = changes.len().min(5);
    let mut text = changes[..shown].join(", ");
    if changes.len() > shown {
        let _ = write!(text, ", and {} more", changes.len() - shown);
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kiln_common::intoto::{
        BuildDefinition, BuildMetadata, Builder, ExternalParameters, InternalParameters,
        Provenance, ResourceDescriptor, RunDetails, SigningKeyInfo, Statement, digest_set,
    };
    use kiln_common::keys::SigningKey;

    use super::*;

    fn statement(step: &str, ws: &str, files: &[TreeEntry]) -> StepStatement {
        Statement {
            statement_type: kiln_common::intoto::STATEMENT_TYPE.into(),
            subject: files
                .iter()
                .map(|e| ResourceDescriptor {
                    name: Some(e.path.clone()),
                    uri: None,
                    digest: digest_set(&e.digest),
                    media_type: None,
                })
                .collect(),
            predicate_type: kiln_common::intoto::SLSA_PROVENANCE_V1.into(),
            predicate: Provenance {
                build_definition: BuildDefinition {
                    build_type: "t".into(),
                    external_parameters: ExternalParameters {
                        pipeline: "p".into(),
                        pipeline_digest: Digest::of(b"p"),
                        step: step.into(),
                        parameters: BTreeMap::new(),
                    },
                    internal_parameters: InternalParameters {
                        kind: "build".into(),
                        profile: "hermetic".into(),
                        output_workspace: Some(ws.into()),
                        exit_code: Some(0),
                        outcome: "succeeded".into(),
                        signing_key: SigningKeyInfo {
                            kind: "software".into(),
                            keyid: String::new(),
                        },
                        teardown_verified: true,
                        observed: false,
                        pipeline_signer: None,
                        network: None,
                        source: None,
                        source_date_epoch: None,
                        reproducible: None,
                        fetch: None,
                        image: None,
                    },
                    resolved_dependencies: Vec::new(),
                },
                run_details: RunDetails {
                    builder: Builder { id: "b".into() },
                    metadata: BuildMetadata {
                        invocation_id: "j/s".into(),
                        started_on: String::new(),
                        finished_on: String::new(),
                    },
                    byproducts: Vec::new(),
                },
            },
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        cas: Cas,
        inputs: StepInputs,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(&dir.path().join("cas")).unwrap();
        let ws_root = dir.path().join("ws");
        std::fs::create_dir_all(ws_root.join("out")).unwrap();
        std::fs::write(ws_root.join("out/a.txt"), "built").unwrap();
        let files = workspace::collect(&ws_root.join("out"), None)
            .unwrap()
            .entries;
        let key = SigningKey::generate().unwrap().0;
        let payload = serde_json::to_vec(&statement("make", "out", &files)).unwrap();
        let env = Envelope::sign(kiln_common::intoto::PAYLOAD_TYPE, &payload, &key).unwrap();
        let envelope = cas.put_bytes(&env.to_json_bytes()).unwrap();
        let inputs = StepInputs {
            ws_root,
            inputs: vec!["out".into()],
            expected: BTreeMap::from([("out".to_owned(), tree_digest(&files))]),
            producers: BTreeMap::from([(
                "out".to_owned(),
                Producer {
                    step: "make".into(),
                    envelope,
                    key: key.public_key(),
                },
            )]),
        };
        Setup {
            _dir: dir,
            cas,
            inputs,
        }
    }

    #[test]
    fn untouched_inputs_pass_and_tampered_files_are_named() {
        let s = setup();
        check(&s.cas, &s.inputs).unwrap();
        std::fs::write(s.inputs.ws_root.join("out/a.txt"), "evil").unwrap();
        std::fs::write(s.inputs.ws_root.join("out/b.txt"), "new").unwrap();
        let err = check(&s.cas, &s.inputs).unwrap_err();
        assert_eq!(
            err,
            "workspace out modified after step make signed it (a.txt changed, b.txt added)"
        );
    }

    #[test]
    fn attestation_by_another_key_or_for_other_files_is_refused() {
        let s = setup();
        let mut inputs = s.inputs.clone();
        if let Some(p) = inputs.producers.get_mut("out") {
            p.key = SigningKey::generate().unwrap().0.public_key();
        }
        let err = check(&s.cas, &inputs).unwrap_err();
        assert!(
            err.starts_with("workspace out modified after step make signed it: its attestation")
                && err.contains("does not verify"),
            "{err}"
        );
        let mut inputs = s.inputs.clone();
        inputs
            .expected
            .insert("out".into(), Digest::of(b"something else"));
        let err = check(&s.cas, &inputs).unwrap_err();
        assert!(err.contains("but the job carries"), "{err}");
    }
}
