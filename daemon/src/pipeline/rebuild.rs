//! Reproducibility: run a step a second time in a fresh worker with the same inputs and compare
//! the two output trees.
//!
//! - In a job, a `reproducible = true` step is run again right after its first run (before any
//!   step that reads its output): same sandbox spec (argv, environment, profile confinement,
//!   input workspaces read-only), a new empty output directory and new cgroups. The result goes
//!   into the step's provenance (`internalParameters.reproducible`); a mismatch fails the step:
//!   a step declared reproducible that is not is a broken promise, and its outputs must not be
//!   vouched for.
//! - After a job, `kiln rebuild JOB [STEP]` runs its steps again against their recorded inputs:
//!   when a step with an output succeeds, kilnd records its sandbox recipe (the spec without
//!   secret values, which are re-read at rebuild time) and a manifest of each input workspace
//!   (path, digest, executable bit; the files are CAS blobs). A rebuild recreates those
//!   workspaces, checks each against the tree digest the step attested, runs the recipe and
//!   compares the outputs with the attested ones.
//!
//! The second run is not observed and not attested: it only produces the comparison.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_common::Digest;
use kiln_common::api::{RebuildReport, StepRebuild, StepState};
use kiln_common::digest::{TreeEntry, tree_digest};
use kiln_common::intoto::Reproducibility;
use kiln_common::spec::Step;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{JobRun, Node, describe_end, workspace};
use crate::sandbox::{self, Access, SandboxSpec};
use crate::store::db::RebuildRecord;

/// How a step's worker was specified, minus secret values (see the module documentation).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Recipe {
    /// The spec; `secrets` empty, `cgroups` none.
    spec: SandboxSpec,
    /// Secret names to re-read.
    secret_names: Vec<String>,
    /// Profile name (its cgroup limits apply again).
    profile: String,
}

/// One file of an input workspace, enough to recreate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ManifestEntry {
    path: String,
    digest: Digest,
    executable: bool,
}

/// What [`Node::after_step`] found.
#[derive(Debug, Default)]
pub(super) struct AfterStep {
    /// For a `reproducible = true` step: the comparison of its two runs.
    pub reproducible: Option<Reproducibility>,
    /// Why the step must fail (not reproducible, or the second run failed).
    pub failure: Option<String>,
}

/// Why a rebuild could not run.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Unknown job.
    #[error("job {0} not found")]
    NoJob(String),
    /// The job has not ended.
    #[error("job {job} is {state}: only a finished job can be rebuilt")]
    NotFinished {
        /// Job.
        job: String,
        /// Its state.
        state: String,
    },
    /// The named step does not exist or has no recorded run.
    #[error("job {job} has no step {step:?} that can be rebuilt ({reason})")]
    NoStep {
        /// Job.
        job: String,
        /// Step.
        step: String,
        /// Why.
        reason: String,
    },
    /// Index failure.
    #[error("{0}")]
    Db(#[from] crate::store::DbError),
}

fn manifest_of(
    dir: &Path,
    cas: &crate::store::Cas,
) -> Result<(Digest, Vec<ManifestEntry>), String> {
    let collected = workspace::collect(dir, Some(cas)).map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    for e in &collected.entries {
        let meta = std::fs::symlink_metadata(dir.join(&e.path))
            .map_err(|err| format!("{}: {err}", dir.join(&e.path).display()))?;
        entries.push(ManifestEntry {
            path: e.path.clone(),
            digest: e.digest,
            executable: meta.permissions().mode() & 0o111 != 0,
        });
    }
    Ok((tree_digest(&collected.entries), entries))
}

/// Recreate a workspace from its manifest under `dir`; returns its tree digest.
fn materialize(
    dir: &Path,
    manifest: &[ManifestEntry],
    cas: &crate::store::Cas,
) -> Result<Digest, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in manifest {
        let rel = Path::new(&entry.path);
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "manifest path {:?} leaves the workspace",
                entry.path
            ));
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let bytes = cas
            .get(&entry.digest)
            .map_err(|e| format!("{}: {e}", entry.path))?;
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = if entry.executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let collected = workspace::collect(dir, None).map_err(|e| e.to_string())?;
    Ok(tree_digest(&collected.entries))
}

/// Run `spec` with its output workspace at `output_dir` and fresh cgroups `cgroup_job/step`;
/// returns the output files and the worker's wall time.
async fn run_again(
    node: &Node,
    mut spec: SandboxSpec,
    secrets: Vec<(String, String)>,
    limits: &sandbox::Limits,
    (cgroup_job, cgroup_step): (&str, &str),
    output_dir: &Path,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(Vec<TreeEntry>, u64), String> {
    if output_dir.exists() {
        std::fs::remove_dir_all(output_dir)
            .map_err(|e| format!("{}: {e}", output_dir.display()))?;
    }
    if let Some(parent) = output_dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    sandbox::prepare_output_dir(output_dir, spec.uid, spec.gid).map_err(|e| e.to_string())?;
    for mount in &mut spec.workspaces {
        if mount.access == Access::ReadWrite {
            output_dir.clone_into(&mut mount.host_path);
        }
    }
    spec.secrets = secrets;
    spec.cgroups = Some(
        sandbox::cgroup::create_step(cgroup_job, cgroup_step, limits)
            .map_err(|e| format!("cannot create the rerun's cgroups: {e}"))?,
    );
    let (log_tx, mut log_rx) = mpsc::channel(64);
    // The second run's output is not kept: only the comparison is.
    let drain = async move { while log_rx.recv().await.is_some() {} };
    let timeout = std::time::Duration::from_millis(spec.timeout_ms);
    let (outcome, ()) = tokio::join!(node.sandbox.run(&spec, log_tx, cancel), drain);
    let outcome = outcome.map_err(|e| format!("sandbox: {e}"))?;
    let (state, _, reason) = describe_end(&outcome, timeout);
    if state != StepState::Succeeded {
        return Err(format!(
            "the second run {}: {}",
            state.as_str(),
            reason.unwrap_or_default()
        ));
    }
    let dir = output_dir.to_owned();
    let collected = tokio::task::spawn_blocking(move || workspace::collect(&dir, None))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok((collected.entries, outcome.wall_ms))
}

fn describe_differences(r: &Reproducibility) -> String {
    let shown: Vec<String> = r
        .differences
        .iter()
        .take(5)
        .map(|d| {
            let show = |x: Option<Digest>| x.map_or_else(|| "absent".to_owned(), |d| d.to_string());
            format!("{} ({} vs {})", d.path, show(d.first), show(d.second))
        })
        .collect();
    let more = r.differences.len().saturating_sub(shown.len());
    format!(
        "not reproducible: {} file(s) differ between two runs with the same inputs: {}{}",
        r.differences.len(),
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

impl Node {
    /// After a step's first run (its outputs collected, before it is attested): record how to
    /// rebuild it, and for a `reproducible = true` step run it again and compare. `spec` is the
    /// first run's spec (taken before it ran); `inputs` its input workspaces and digests.
    pub(super) async fn after_step(
        &self,
        run: &JobRun,
        step: &Step,
        spec: Option<SandboxSpec>,
        inputs: &[(String, Digest)],
        outputs: Option<&[TreeEntry]>,
    ) -> AfterStep {
        let (Some(spec), Some(outputs)) = (spec, outputs) else {
            return AfterStep::default();
        };
        let ws_root = run.work_dir.join("ws");
        if let Err(err) = self
            .record_rebuild(run, step, &spec, inputs, &ws_root)
            .await
        {
            warn!(%err, "cannot record the step for kiln rebuild");
        }
        if !step.reproducible {
            return AfterStep::default();
        }
        let Some(profile) = self.profiles.get(&step.profile) else {
            return AfterStep::default();
        };
        let Some(out) = &step.output else {
            return AfterStep::default();
        };
        info!("reproducibility check: running the step a second time");
        let output_dir = run.work_dir.join("rerun").join(&step.name).join(out);
        let secrets = spec.secrets.clone();
        let second = run_again(
            self,
            spec,
            secrets,
            &profile.limits,
            (&run.id, &format!("{}-rerun", step.name)),
            &output_dir,
            run.handle.cancel.child_token(),
        )
        .await;
        let _ = std::fs::remove_dir_all(run.work_dir.join("rerun"));
        match second {
            Ok((entries, wall_ms)) => {
                let result = Reproducibility::compare(outputs, &entries);
                info!(
                    matches = result.matches,
                    differences = result.differences.len(),
                    wall_ms,
                    "reproducibility check done"
                );
                AfterStep {
                    failure: (!result.matches).then(|| describe_differences(&result)),
                    reproducible: Some(result),
                }
            }
            Err(reason) => AfterStep {
                reproducible: None,
                failure: Some(format!("reproducibility check: {reason}")),
            },
        }
    }

    async fn record_rebuild(
        &self,
        run: &JobRun,
        step: &Step,
        spec: &SandboxSpec,
        inputs: &[(String, Digest)],
        ws_root: &Path,
    ) -> Result<(), String> {
        let mut stripped = spec.clone();
        stripped.secrets.clear();
        stripped.cgroups = None;
        let recipe = Recipe {
            spec: stripped,
            secret_names: step.secrets.clone(),
            profile: step.profile.clone(),
        };
        let cas = self.store.cas.clone();
        let dirs: Vec<(String, Digest, PathBuf)> = inputs
            .iter()
            .map(|(ws, d)| (ws.clone(), *d, ws_root.join(ws)))
            .collect();
        let bytes = serde_json::to_vec(&recipe).map_err(|e| e.to_string())?;
        let record = tokio::task::spawn_blocking(move || {
            let recipe = cas.put_bytes(&bytes).map_err(|e| e.to_string())?;
            let mut inputs = Vec::new();
            for (ws, expected, dir) in dirs {
                let (tree, manifest) = manifest_of(&dir, &cas)?;
                if tree != expected {
                    return Err(format!(
                        "input workspace {ws:?} changed during the step: {tree}, attested {expected}"
                    ));
                }
                let manifest = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
                inputs.push((ws, tree, cas.put_bytes(&manifest).map_err(|e| e.to_string())?));
            }
            Ok::<_, String>(RebuildRecord { recipe, inputs })
        })
        .await
        .map_err(|e| e.to_string())??;
        self.store
            .db
            .record_rebuild(&run.id, &step.name, &record)
            .map_err(|e| e.to_string())
    }

    /// `kiln rebuild`: run a finished job's steps again against their recorded inputs.
    pub async fn rebuild_job(
        &self,
        job_id: &str,
        only: Option<&str>,
    ) -> Result<RebuildReport, RebuildError> {
        let job = self
            .store
            .db
            .job(job_id)?
            .ok_or_else(|| RebuildError::NoJob(job_id.to_owned()))?;
        if !job.state.is_terminal() {
            return Err(RebuildError::NotFinished {
                job: job_id.to_owned(),
                state: job.state.as_str().to_owned(),
            });
        }
        let mut chosen = Vec::new();
        for s in &job.steps {
            let wanted = match only {
                Some(name) => s.name == name,
                None => {
                    matches!(s.kind.as_str(), "build" | "publish")
                        && s.state == StepState::Succeeded
                }
            };
            if !wanted {
                continue;
            }
            match self.store.db.rebuild_record(job_id, &s.name)? {
                Some(record) => chosen.push((s, record)),
                None if only.is_some() => {
                    return Err(RebuildError::NoStep {
                        job: job_id.to_owned(),
                        step: s.name.clone(),
                        reason: "it has no recorded run: it wrote no output or did not succeed"
                            .into(),
                    });
                }
                None => {}
            }
        }
        if let (Some(name), true) = (only, chosen.is_empty()) {
            return Err(RebuildError::NoStep {
                job: job_id.to_owned(),
                step: name.to_owned(),
                reason: "no such step".into(),
            });
        }
        // A rebuild takes a job slot like any job.
        let _permit = self.slots.clone().acquire_owned().await;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let cgroup_job = format!("rebuild-{id}");
        let dir = self.config.state_dir.join("work").join(&cgroup_job);
        let mut steps = Vec::new();
        for (status, record) in chosen {
            let result = self
                .rebuild_step(&dir, &cgroup_job, &status.name, &record, &status.outputs)
                .await;
            let entry = match result {
                Ok((result, wall_ms)) => StepRebuild {
                    step: status.name.clone(),
                    result,
                    duration_ms: Some(wall_ms),
                    error: None,
                },
                Err(error) => StepRebuild {
                    step: status.name.clone(),
                    result: Reproducibility::default(),
                    duration_ms: None,
                    error: Some(error),
                },
            };
            info!(job = %job_id, step = %entry.step, matches = entry.result.matches, error = entry.error.as_deref().unwrap_or(""), "step rebuilt");
            steps.push(entry);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(RebuildReport {
            job_id: job_id.to_owned(),
            matches: !steps.is_empty() && steps.iter().all(|s| s.result.matches),
            steps,
        })
    }

    async fn rebuild_step(
        &self,
        dir: &Path,
        cgroup_job: &str,
        step: &str,
        record: &RebuildRecord,
        attested: &[TreeEntry],
    ) -> Result<(Reproducibility, u64), String> {
        let cas = self.store.cas.clone();
        let recipe: Recipe = serde_json::from_slice(
            &cas.get(&record.recipe)
                .map_err(|e| format!("recipe {}: {e}", record.recipe))?,
        )
        .map_err(|e| format!("recipe {}: {e}", record.recipe))?;
        let step_dir = dir.join(step);
        let ws_root = step_dir.join("ws");
        let mut spec = recipe.spec;
        let mut hosts = BTreeMap::new();
        for (ws, expected, manifest) in &record.inputs {
            let manifest: Vec<ManifestEntry> = serde_json::from_slice(
                &cas.get(manifest)
                    .map_err(|e| format!("manifest of workspace {ws:?}: {e}"))?,
            )
            .map_err(|e| format!("manifest of workspace {ws:?}: {e}"))?;
            let target = ws_root.join(ws);
            let cas = cas.clone();
            let t = target.clone();
            let tree = tokio::task::spawn_blocking(move || materialize(&t, &manifest, &cas))
                .await
                .map_err(|e| e.to_string())??;
            if tree != *expected {
                return Err(format!(
                    "recreated input workspace {ws:?} has {tree} but the step attested {expected}"
                ));
            }
            hosts.insert(ws.clone(), target);
        }
        for mount in &mut spec.workspaces {
            if mount.access == Access::ReadOnly {
                let Some(host) = hosts.get(&mount.name) else {
                    return Err(format!(
                        "input workspace {:?} has no recorded manifest",
                        mount.name
                    ));
                };
                host.clone_into(&mut mount.host_path);
            }
        }
        let output = spec
            .workspaces
            .iter()
            .find(|m| m.access == Access::ReadWrite)
            .map(|m| m.name.clone())
            .ok_or_else(|| "the step has no output workspace".to_owned())?;
        let secrets = self
            .admission
            .secrets
            .read(&recipe.secret_names)?
            .into_iter()
            .map(|(name, value)| (name, value.0))
            .collect();
        let limits = self
            .profiles
            .get(&recipe.profile)
            .map(|p| p.limits)
            .ok_or_else(|| format!("profile {:?} is no longer loaded", recipe.profile))?;
        std::fs::create_dir_all(&spec.root_dir)
            .map_err(|e| format!("{}: {e}", spec.root_dir.display()))?;
        let (entries, wall_ms) = run_again(
            self,
            spec,
            secrets,
            &limits,
            (cgroup_job, step),
            &step_dir.join("out").join(output),
            self.shutdown.child_token(),
        )
        .await?;
        Ok((Reproducibility::compare(attested, &entries), wall_ms))
    }
}
