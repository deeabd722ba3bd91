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
//! Every re-run runs like the step's first run: in the same size-capped output workspace when the
//! profile sets `[limits] workspace_size` (`sandbox::outputfs::OutputWorkspace`), and observed
//! when the observer is loaded (refused when it is required and not), its trace sealed and
//! signed like a step's: a reproducible step's provenance names the second run's trace
//! (byproduct `runtime-trace-rerun`), a rebuild's report names it (`trace`) or says
//! `observed: false`. The re-run's outputs are only compared, never kept.
//!
//! Who may rebuild (docs/api.md): root, or the uid that submitted the job (`SO_PEERCRED` at
//! submit); the recorded definition must pass today's job admission (with the signature it was
//! submitted with); a step that declares secrets is only rebuilt for root, because it would run
//! with today's secret values and the report's file names go back to the caller.

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
use tracing::{error, info, warn};

use super::{JobRun, Node, describe_end, workspace};
use crate::sandbox::outputfs::OutputWorkspace;
use crate::sandbox::{self, Access, Profile, SandboxSpec};
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
    /// The signed runtime-trace envelope of the second run (observed like the first): the
    /// step's provenance names it as the byproduct [`RERUN_TRACE_BYPRODUCT`].
    pub rerun_trace: Option<Digest>,
}

/// Byproduct name of the second run's trace in a `reproducible = true` step's provenance.
pub const RERUN_TRACE_BYPRODUCT: &str = "runtime-trace-rerun";

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
    /// The caller may not rebuild this job (or these steps).
    #[error("job {job}: {reason}")]
    Forbidden {
        /// Job.
        job: String,
        /// Why.
        reason: String,
    },
    /// The job's definition does not pass today's job admission.
    #[error("job {job} cannot be rebuilt: its pipeline is not admitted today: {}", problems.join("; "))]
    Refused {
        /// Job.
        job: String,
        /// Every problem admission found.
        problems: Vec<String>,
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

/// Where a re-run of a step runs: its cgroups and trace are `job_id`/`step`; its output
/// workspace is written on `output_disk`, or on a tmpfs at `outfs_point` when the profile caps
/// it (`[limits] workspace_size`, the same [`OutputWorkspace`] as the step's first run).
struct Rerun<'a> {
    job_id: &'a str,
    step: &'a str,
    output_disk: PathBuf,
    outfs_point: PathBuf,
    profile: &'a Profile,
}

/// What a re-run did.
#[derive(Debug)]
struct RerunOutcome {
    /// The output files and the worker's wall time, or why the re-run failed.
    result: Result<(Vec<TreeEntry>, u64), String>,
    /// The worker ran under the observer.
    observed: bool,
    /// The signed runtime-trace envelope of the worker, if observed.
    trace: Option<Digest>,
}

impl RerunOutcome {
    fn failed(reason: String) -> Self {
        Self {
            result: Err(reason),
            observed: false,
            trace: None,
        }
    }
}

/// Run `spec` again as `rerun` says, with today's limits of its profile, observed like any step
/// (the observer gate applies; the trace is sealed under `job_id`/`step`).
async fn run_again(
    node: &Node,
    mut spec: SandboxSpec,
    secrets: Vec<(String, String)>,
    rerun: &Rerun<'_>,
    cancel: tokio_util::sync::CancellationToken,
) -> RerunOutcome {
    let output_disk = &rerun.output_disk;
    if output_disk.exists()
        && let Err(e) = std::fs::remove_dir_all(output_disk)
    {
        return RerunOutcome::failed(format!("{}: {e}", output_disk.display()));
    }
    let output = match OutputWorkspace::prepare(
        output_disk,
        &rerun.outfs_point,
        rerun.profile.workspace_size_bytes,
        // Host ids: with `[userns]` the step's mapped uid/gid.
        spec.host_ids().0,
        spec.host_ids().1,
    ) {
        Ok(output) => output,
        Err(e) => return RerunOutcome::failed(format!("cannot prepare the output workspace: {e}")),
    };
    for mount in &mut spec.workspaces {
        if mount.access == Access::ReadWrite {
            mount.host_path = output.dir();
        }
    }
    if let Err(reason) = node.observer_gate() {
        let _ = output.settle(false).await;
        return RerunOutcome::failed(reason);
    }
    let cgroups =
        match sandbox::cgroup::create_step(rerun.job_id, rerun.step, &rerun.profile.limits) {
            Ok(cgroups) => cgroups,
            Err(e) => {
                let _ = output.settle(false).await;
                return RerunOutcome::failed(format!("cannot create the rerun's cgroups: {e}"));
            }
        };
    // Attached before the helper exists, as for a step's first run.
    let observation = match node.observe_step(&cgroups) {
        Ok(observation) => observation,
        Err(reason) => {
            for (path, err) in sandbox::cgroup::remove_step_dirs(&cgroups) {
                warn!(%err, path = %path.display(), "cannot remove an unused rerun cgroup");
            }
            let _ = output.settle(false).await;
            return RerunOutcome::failed(reason);
        }
    };
    let observed = observation.is_some();
    if !observed {
        warn!(
            step = rerun.step,
            "the rerun runs UNOBSERVED ([observer] required = false)"
        );
    }
    let secret_values: Vec<String> = secrets.iter().map(|(_, v)| v.clone()).collect();
    spec.secrets = secrets;
    spec.cgroups = Some(cgroups);
    let mut workload = match node.signer.workload(rerun.job_id, Some(rerun.step)) {
        Ok(w) => w,
        Err(e) => {
            let _ = output.settle(false).await;
            return RerunOutcome::failed(format!("workload key: {e}"));
        }
    };
    let (log_tx, mut log_rx) = mpsc::channel(64);
    // The rerun's log is not kept: only the comparison (and its trace) is.
    let drain = async move { while log_rx.recv().await.is_some() {} };
    let timeout = std::time::Duration::from_millis(spec.timeout_ms);
    let started_on = super::now();
    let (outcome, ()) = tokio::join!(node.sandbox.run(&spec, log_tx, cancel), drain);
    let finished_on = super::now();
    let teardown_verified = outcome
        .as_ref()
        .is_ok_and(|o| o.teardown.as_ref().is_some_and(|t| t.verified));
    let ended = match outcome {
        Err(e) => Err(format!("sandbox: {e}")),
        Ok(outcome) => {
            let (state, _, reason) = describe_end(&outcome, timeout);
            // A capped workspace that filled up: writes failed, the outputs are incomplete.
            match (output.full(), state) {
                (Some(full), _) => Err(format!(
                    "the second run failed: {full}{}",
                    reason.map(|r| format!("; then {r}")).unwrap_or_default()
                )),
                (None, StepState::Succeeded) => Ok(outcome.wall_ms),
                (None, state) => Err(format!(
                    "the second run {}: {}",
                    state.as_str(),
                    reason.unwrap_or_default()
                )),
            }
        }
    };
    let mut result = match ended {
        Ok(wall_ms) => {
            let dir = output.dir();
            tokio::task::spawn_blocking(move || workspace::collect(&dir, None))
                .await
                .map_err(|e| e.to_string())
                .and_then(|c| c.map_err(|e| e.to_string()))
                .map(|c| (c.entries, wall_ms))
        }
        Err(e) => Err(e),
    };
    // The rerun's outputs are compared, never kept: the tmpfs goes.
    if let Err(e) = output.settle(false).await {
        result = result.and(Err(e));
    }
    let mut trace = None;
    if let Some(observation) = observation {
        let sealed = match workload.certify(&started_on, &finished_on).await {
            Ok(()) => {
                node.seal_trace(
                    &workload,
                    rerun.job_id,
                    rerun.step,
                    observation,
                    &secret_values,
                    teardown_verified,
                    (&started_on, &finished_on),
                )
                .await
            }
            Err(e) => Err(format!("cannot certify the rerun's workload key: {e}")),
        };
        match sealed {
            Ok(sealed) => trace = Some(sealed.envelope),
            Err(e) => {
                error!(err = %e, step = rerun.step, "cannot seal the rerun's trace");
                result = result.and(Err(e));
            }
        }
    }
    RerunOutcome {
        result,
        observed,
        trace,
    }
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
        let rerun_name = format!("{}-rerun", step.name);
        let rerun = Rerun {
            job_id: &run.id,
            step: &rerun_name,
            output_disk: run.work_dir.join("rerun").join(&step.name).join(out),
            outfs_point: run.work_dir.join("outfs").join(&rerun_name),
            profile,
        };
        let secrets = spec.secrets.clone();
        let second = run_again(self, spec, secrets, &rerun, run.handle.cancel.child_token()).await;
        let _ = std::fs::remove_dir_all(run.work_dir.join("rerun"));
        let trace = second.trace;
        match second.result {
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
                    rerun_trace: trace,
                }
            }
            Err(reason) => AfterStep {
                reproducible: None,
                failure: Some(format!("reproducibility check: {reason}")),
                rerun_trace: trace,
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

    /// `kiln rebuild`: run a finished job's steps again against their recorded inputs, for
    /// `caller_uid` (the peer). Only root and the uid that submitted the job may; the recorded
    /// definition (with the signature it was submitted with) must pass today's job admission;
    /// a step that declares secrets is only rebuilt for root (it would get today's values, and
    /// the report's file names are the caller's to read).
    pub async fn rebuild_job(
        &self,
        job_id: &str,
        only: Option<&str>,
        caller_uid: u32,
    ) -> Result<RebuildReport, RebuildError> {
        let job = self
            .store
            .db
            .job(job_id)?
            .ok_or_else(|| RebuildError::NoJob(job_id.to_owned()))?;
        let origin = self
            .store
            .db
            .job_origin(job_id)?
            .ok_or_else(|| RebuildError::NoJob(job_id.to_owned()))?;
        if caller_uid != 0 && origin.submitter_uid != Some(caller_uid) {
            return Err(RebuildError::Forbidden {
                job: job_id.to_owned(),
                reason: match origin.submitter_uid {
                    Some(uid) => format!(
                        "uid {caller_uid} may not rebuild it: it was submitted by uid {uid}, and only that uid and root may"
                    ),
                    None => format!(
                        "uid {caller_uid} may not rebuild it: its submitter was not recorded, so only root may"
                    ),
                },
            });
        }
        if !job.state.is_terminal() {
            return Err(RebuildError::NotFinished {
                job: job_id.to_owned(),
                state: job.state.as_str().to_owned(),
            });
        }
        let pipeline = self.readmit(&job, origin.signature)?;
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
                Some(record) => {
                    let recipe = self.load_recipe(&record);
                    chosen.push((s, record, recipe));
                }
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
        if caller_uid != 0 {
            // The recipe's names, and today's definition's (the same text, re-admitted above).
            let with_secrets: Vec<String> = chosen
                .iter()
                .filter(|(s, _, recipe)| {
                    recipe.as_ref().is_ok_and(|r| !r.secret_names.is_empty())
                        || pipeline
                            .steps
                            .iter()
                            .any(|p| p.name == s.name && !p.secrets.is_empty())
                })
                .map(|(s, _, _)| format!("{:?}", s.name))
                .collect();
            if !with_secrets.is_empty() {
                return Err(RebuildError::Forbidden {
                    job: job_id.to_owned(),
                    reason: format!(
                        "step(s) {} declare secrets: only root may rebuild a step that declares secrets (it would run with today's values)",
                        with_secrets.join(", ")
                    ),
                });
            }
        }
        // A rebuild takes a job slot like any job.
        let _permit = self.slots.clone().acquire_owned().await;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let cgroup_job = format!("rebuild-{id}");
        let dir = self.config.state_dir.join("work").join(&cgroup_job);
        let mut steps = Vec::new();
        for (status, record, recipe) in chosen {
            let outcome = match recipe {
                Ok(recipe) => {
                    self.rebuild_step(&dir, &cgroup_job, &status.name, &record, recipe)
                        .await
                }
                Err(e) => RerunOutcome::failed(e),
            };
            let (result, duration_ms, error) = match outcome.result {
                Ok((entries, wall_ms)) => (
                    Reproducibility::compare(&status.outputs, &entries),
                    Some(wall_ms),
                    None,
                ),
                Err(error) => (Reproducibility::default(), None, Some(error)),
            };
            let entry = StepRebuild {
                step: status.name.clone(),
                result,
                duration_ms,
                error,
                observed: outcome.observed,
                trace: outcome.trace,
            };
            info!(job = %job_id, step = %entry.step, matches = entry.result.matches, observed = entry.observed, error = entry.error.as_deref().unwrap_or(""), "step rebuilt");
            steps.push(entry);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(RebuildReport {
            job_id: job_id.to_owned(),
            matches: !steps.is_empty() && steps.iter().all(|s| s.result.matches),
            steps,
        })
    }

    /// Job admission of the job's recorded definition, today: the pipeline text from the CAS,
    /// the signature it was submitted with, its bound parameters; the signature policy, the
    /// secret scan, the parameters, the declared secrets and fetch caps as for a new job.
    fn readmit(
        &self,
        job: &kiln_common::api::JobStatus,
        signature: Option<Digest>,
    ) -> Result<kiln_common::spec::Pipeline, RebuildError> {
        let refused = |problems: Vec<String>| RebuildError::Refused {
            job: job.id.clone(),
            problems,
        };
        let text = self
            .store
            .cas
            .get(&job.pipeline_digest)
            .map_err(|e| refused(vec![format!("pipeline {}: {e}", job.pipeline_digest)]))
            .and_then(|bytes| {
                String::from_utf8(bytes).map_err(|_| {
                    refused(vec![format!(
                        "pipeline {} is not UTF-8",
                        job.pipeline_digest
                    )])
                })
            })?;
        let signature = signature
            .map(|d| {
                self.store
                    .cas
                    .get(&d)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                    .map_err(|e| refused(vec![format!("the job's signature {d}: {e}")]))
            })
            .transpose()?;
        let req = kiln_common::api::SubmitJobRequest {
            pipeline: text,
            file_name: format!("{}.toml", job.pipeline),
            params: job.params.clone(),
            sources: BTreeMap::new(),
            repos: BTreeMap::new(),
            signature,
        };
        match self.admission.admit_job(&req) {
            Err(e) => Err(refused(match e.details() {
                d if d.is_empty() => vec![e.to_string()],
                d => d,
            })),
            Ok(admitted) if !admitted.problems.is_empty() => Err(refused(admitted.problems)),
            Ok(admitted) => {
                info!(job = %job.id, signer = admitted.signer.as_deref().unwrap_or("unsigned"), "rebuild: pipeline admitted again");
                Ok(admitted.pipeline)
            }
        }
    }

    fn load_recipe(&self, record: &RebuildRecord) -> Result<Recipe, String> {
        serde_json::from_slice(
            &self
                .store
                .cas
                .get(&record.recipe)
                .map_err(|e| format!("recipe {}: {e}", record.recipe))?,
        )
        .map_err(|e| format!("recipe {}: {e}", record.recipe))
    }

    async fn rebuild_step(
        &self,
        dir: &Path,
        cgroup_job: &str,
        step: &str,
        record: &RebuildRecord,
        recipe: Recipe,
    ) -> RerunOutcome {
        let step_dir = dir.join(step);
        let prepared = self.prepare_rebuild(&step_dir, record, recipe).await;
        let (spec, secrets, output, profile) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return RerunOutcome::failed(e),
        };
        let rerun = Rerun {
            job_id: cgroup_job,
            step,
            output_disk: step_dir.join("out").join(output),
            outfs_point: dir.join("outfs").join(step),
            profile,
        };
        run_again(self, spec, secrets, &rerun, self.shutdown.child_token()).await
    }

    /// The recorded inputs recreated and checked, the spec pointed at them, today's secret
    /// values and profile.
    async fn prepare_rebuild(
        &self,
        step_dir: &Path,
        record: &RebuildRecord,
        recipe: Recipe,
    ) -> Result<(SandboxSpec, Vec<(String, String)>, String, &Profile), String> {
        let cas = self.store.cas.clone();
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
        let profile = self
            .profiles
            .get(&recipe.profile)
            .ok_or_else(|| format!("profile {:?} is no longer loaded", recipe.profile))?;
        std::fs::create_dir_all(&spec.root_dir)
            .map_err(|e| format!("{}: {e}", spec.root_dir.display()))?;
        Ok((spec, secrets, output, profile))
    }
}
