//! The scheduler (seed: "scheduling & orchestration" + "pipeline framework"): admits a submitted
//! pipeline, queues it, and runs each step in dependency order in a fresh single-use worker,
//! then attests every step and the job.
//!
//! A job owns `<state>/work/<job id>/<workspace>/` directories while it runs; every output file
//! is copied into the CAS as it is attested, so the directories are deleted when the job ends.

pub mod ingest;
pub mod observed;
pub mod rebuild;
pub mod workspace;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use kiln_common::Digest;
use kiln_common::api::{
    Event, EventKind, JobState, StepState, SubmitJobRequest, SubmitJobResponse,
};
use kiln_common::digest::{TreeEntry, tree_digest};
use kiln_common::intoto::{JobPredicate, JobStepRef};
use kiln_common::spec::{ParamErrors, Pipeline, SpecErrors};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Config;
use crate::provenance::{self, NodeSigner, StepRecord};
use crate::sandbox::{
    self, Access, Profile, Sandbox, SandboxOutcome, SandboxSpec, StepEnd, WorkspaceMount,
};
use crate::store::Store;
use crate::store::db::{NewJob, StepOutputs, StepUpdate};

/// Why a submission was refused. Nothing is stored for a refused job.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The pipeline file does not parse or validate.
    #[error("invalid pipeline")]
    Spec(#[from] SpecErrors),
    /// Parameters violate their declarations.
    #[error("invalid parameters")]
    Params(#[from] ParamErrors),
    /// Other admission failures, one message each.
    #[error("job refused")]
    Refused(Vec<String>),
    /// The daemon is stopping.
    #[error("kilnd is shutting down")]
    ShuttingDown,
    /// Internal storage failure.
    #[error("store: {0}")]
    Store(String),
}

impl SubmitError {
    /// Individual problems, for the API's `details`.
    pub fn details(&self) -> Vec<String> {
        match self {
            Self::Spec(e) => e.0.iter().map(ToString::to_string).collect(),
            Self::Params(e) => e.0.iter().map(ToString::to_string).collect(),
            Self::Refused(v) => v.clone(),
            Self::ShuttingDown | Self::Store(_) => Vec::new(),
        }
    }
}

/// Live state of a queued or running job.
#[derive(Debug)]
pub struct JobHandle {
    /// Cancels the job (child of the daemon's shutdown token).
    pub cancel: CancellationToken,
    events: broadcast::Sender<Event>,
    /// Sequence numbers and the logs of running steps. Every event is numbered, persisted and
    /// broadcast under this lock, so a follower that subscribes under it sees each event exactly
    /// once: either in the replay or live.
    stream: Mutex<StreamState>,
}

#[derive(Debug, Default)]
struct StreamState {
    seq: u64,
    /// Log so far of each running step (capped at `max_log_bytes`); removed when the step's
    /// terminal event is emitted, by which time the log is a CAS blob named in the step's row.
    running_logs: HashMap<String, Vec<u8>>,
}

/// What a follower of a job's events starts from.
#[derive(Debug)]
pub struct FollowStart {
    /// Persisted state events after the requested sequence number.
    pub replay: Vec<Event>,
    /// Output so far of steps that are running now.
    pub running_logs: HashMap<String, Vec<u8>>,
    /// Live events after the replay; `None` if the job has already ended.
    pub live: Option<broadcast::Receiver<Event>>,
}

/// The node: configuration, store, signer, profiles and the running jobs.
#[derive(Debug)]
pub struct Node {
    /// Configuration.
    pub config: Config,
    /// Store.
    pub store: Store,
    /// Signing identity.
    pub signer: NodeSigner,
    /// Sandbox profiles by name.
    pub profiles: BTreeMap<String, Profile>,
    /// Host name (reported by `GET /v1/node`).
    pub hostname: String,
    /// Admission controller: signature policy, secret directory.
    pub admission: crate::admission::Admission,
    sandbox: Sandbox,
    /// The pipeline observer shared by every step (or why it is not loaded).
    observer: observed::NodeObserver,
    jobs: Mutex<HashMap<String, Arc<JobHandle>>>,
    slots: Arc<Semaphore>,
    /// Cancelled on SIGTERM: cancels every job.
    pub shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Current time, RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Immutable inputs of one job run.
#[derive(Debug)]
struct JobRun {
    id: String,
    pipeline: Pipeline,
    pipeline_digest: Digest,
    /// keyid of the accepted pipeline signer (admission); `None` if admitted unsigned.
    pipeline_signer: Option<String>,
    params: BTreeMap<String, String>,
    sources: BTreeMap<String, Digest>,
    /// Source step → its git repository on the node (resolved at admission).
    repos: BTreeMap<String, PathBuf>,
    /// `SOURCE_DATE_EPOCH` for later steps: the commit time a git source step recorded.
    source_date_epoch: Mutex<Option<u64>>,
    handle: Arc<JobHandle>,
    work_dir: PathBuf,
}

/// The result of one step, for the job statement and for later steps.
#[derive(Debug)]
struct StepResult {
    state: StepState,
    envelope: Option<Digest>,
    outputs: Option<Vec<TreeEntry>>,
}

impl Node {
    /// Assemble a node; `recover` marks jobs interrupted by a previous crash as failed.
    pub fn new(
        config: Config,
        store: Store,
        signer: NodeSigner,
        profiles: BTreeMap<String, Profile>,
        sandbox_helper: PathBuf,
        admission: crate::admission::Admission,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let repaired = store.db.recover_interrupted(&now())?;
        for id in &repaired {
            warn!(job = %id, "job was interrupted by a previous kilnd stop; marked failed");
            // Its steps' workers may have outlived that kilnd: kill them and remove their cgroups
            // before anything else runs.
            for (path, err) in sandbox::cgroup::sweep_job(id) {
                error!(job = %id, path = %path.display(), %err, "cannot remove a leftover step cgroup of an interrupted job");
            }
        }
        // Work directories of interrupted jobs hold nothing that is not in the CAS.
        let work = config.state_dir.join("work");
        if work.exists() {
            let _ = std::fs::remove_dir_all(&work);
        }
        let hostname = nix::unistd::gethostname()
            .map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned());
        let slots = Arc::new(Semaphore::new(config.jobs.max_concurrent));
        let observer = observed::NodeObserver::start(&config.observer);
        Ok(Arc::new(Self {
            config,
            store,
            signer,
            profiles,
            hostname,
            admission,
            sandbox: Sandbox::new(sandbox_helper),
            observer,
            jobs: Mutex::new(HashMap::new()),
            slots,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }))
    }

    /// The live handle of a queued or running job.
    pub fn job_handle(&self, id: &str) -> Option<Arc<JobHandle>> {
        self.jobs.lock().ok().and_then(|j| j.get(id).cloned())
    }

    /// Cancel a job. Returns false if it is not queued or running.
    pub fn cancel(&self, id: &str) -> bool {
        self.job_handle(id).is_some_and(|h| {
            h.cancel.cancel();
            true
        })
    }

    /// Admit a job and queue it. `submitter_uid` is the peer's uid (`SO_PEERCRED`), recorded
    /// with the job: only that uid and root may rebuild it.
    pub fn submit(
        self: &Arc<Self>,
        req: SubmitJobRequest,
        submitter_uid: u32,
    ) -> Result<SubmitJobResponse, SubmitError> {
        if self.shutdown.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        // Job admission (signature, secret scan, parameters, secrets): every problem is collected,
        // the scheduler's own checks below add theirs, and nothing is stored unless all pass.
        let crate::admission::AdmittedJob {
            pipeline,
            params,
            signer: pipeline_signer,
            mut problems,
        } = self.admission.admit_job(&req)?;
        for step in &pipeline.steps {
            if !self.profiles.contains_key(&step.profile) {
                problems.push(format!(
                    "step {:?}: unknown sandbox profile {:?} (available: {})",
                    step.name,
                    step.profile,
                    self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            if let Some(image) = &step.image
                && !crate::image::is_known(&self.store, image)
            {
                problems.push(format!(
                    "step {:?}: image {image} is not on this node (import it with `kiln image import`)",
                    step.name
                ));
            }
        }
        let mut repos = BTreeMap::new();
        for step in &pipeline.steps {
            match ingest::admit(step, &req.repos, &self.store.cas) {
                Ok(Some(repo)) => {
                    repos.insert(step.name.clone(), repo);
                }
                Ok(None) => {}
                Err(problem) => problems.push(problem),
            }
        }
        for (ws, decl) in &pipeline.workspaces {
            match (&decl.source, req.sources.get(ws)) {
                (Some(_), None) => problems.push(format!(
                    "workspace {ws:?} declares a source but none was uploaded"
                )),
                (Some(_), Some(d)) if !self.store.cas.contains(d) => {
                    problems.push(format!(
                        "workspace {ws:?}: source blob {d} was not uploaded"
                    ));
                }
                _ => {}
            }
        }
        for ws in req.sources.keys() {
            if pipeline
                .workspaces
                .get(ws)
                .is_none_or(|d| d.source.is_none())
            {
                problems.push(format!(
                    "source uploaded for workspace {ws:?}, which does not declare a source"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(SubmitError::Refused(problems));
        }
        let pipeline_digest = self
            .store
            .cas
            .put_bytes(req.pipeline.as_bytes())
            .map_err(|e| SubmitError::Store(e.to_string()))?;
        // The signature as submitted: `kiln rebuild` re-admits the definition with it.
        let signature = req
            .signature
            .as_ref()
            .map(|envelope| {
                let bytes = serde_json::to_vec(envelope).map_err(|e| e.to_string())?;
                self.store.cas.put_bytes(&bytes).map_err(|e| e.to_string())
            })
            .transpose()
            .map_err(SubmitError::Store)?;
        let id = uuid::Uuid::now_v7().to_string();
        let order = pipeline.execution_order();
        let steps = order
            .iter()
            .map(|&i| {
                let s = &pipeline.steps[i];
                (s.name.as_str(), s.kind.as_str(), s.output.as_deref())
            })
            .collect();
        self.store
            .db
            .insert_job(&NewJob {
                id: &id,
                pipeline: &pipeline.name,
                pipeline_digest: &pipeline_digest,
                params: &params,
                created_at: &now(),
                steps,
                submitter_uid: Some(submitter_uid),
                signature,
            })
            .map_err(|e| SubmitError::Store(e.to_string()))?;
        let (events, _) = broadcast::channel(1024);
        let handle = Arc::new(JobHandle {
            cancel: self.shutdown.child_token(),
            events,
            stream: Mutex::new(StreamState::default()),
        });
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(id.clone(), handle.clone());
        }
        let run = JobRun {
            work_dir: self.config.state_dir.join("work").join(&id),
            id: id.clone(),
            pipeline,
            pipeline_digest,
            pipeline_signer,
            params,
            sources: req.sources,
            repos,
            source_date_epoch: Mutex::new(None),
            handle,
        };
        info!(job = %id, pipeline = %run.pipeline.name, %pipeline_digest, signer = run.pipeline_signer.as_deref().unwrap_or("unsigned"), "job admitted");
        self.emit(
            &run,
            EventKind::Job {
                state: JobState::Queued,
                error: None,
            },
        );
        let node = self.clone();
        let span = info_span!("job", job = %id);
        self.tracker
            .spawn(async move { node.run_job(run).await }.instrument(span));
        Ok(SubmitJobResponse {
            id,
            pipeline_digest,
        })
    }

    /// Start following a job: replay, running logs and the live channel, taken atomically.
    pub fn follow(&self, id: &str, after: u64) -> Result<FollowStart, crate::store::DbError> {
        if let Some(handle) = self.job_handle(id)
            && let Ok(stream) = handle.stream.lock()
        {
            return Ok(FollowStart {
                live: Some(handle.events.subscribe()),
                replay: self.store.db.events_after(id, after)?,
                running_logs: stream.running_logs.clone(),
            });
        }
        Ok(FollowStart {
            replay: self.store.db.events_after(id, after)?,
            running_logs: HashMap::new(),
            live: None,
        })
    }

    /// Number, persist (state events) and broadcast an event.
    fn emit(&self, run: &JobRun, kind: EventKind) {
        let Ok(mut stream) = run.handle.stream.lock() else {
            return;
        };
        self.emit_locked(run, &mut stream, kind);
    }

    fn emit_locked(&self, run: &JobRun, stream: &mut StreamState, kind: EventKind) {
        stream.seq += 1;
        if let EventKind::Step { step, state, .. } = &kind
            && state.is_terminal()
        {
            stream.running_logs.remove(step);
        }
        let event = Event {
            seq: stream.seq,
            time: now(),
            kind,
        };
        if !matches!(event.kind, EventKind::Log { .. })
            && let Err(err) = self.store.db.append_event(&run.id, &event)
        {
            error!(?err, "cannot persist job event");
        }
        // Sending fails only when nobody listens.
        let _ = run.handle.events.send(event);
    }

    /// Append a chunk of a running step's output (kept up to `max_log_bytes`) and broadcast it.
    fn emit_log(&self, run: &JobRun, step: &str, chunk: &[u8]) {
        let limit = self.config.jobs.max_log_bytes as usize;
        let Ok(mut stream) = run.handle.stream.lock() else {
            return;
        };
        let log = stream.running_logs.entry(step.to_owned()).or_default();
        let take = chunk.len().min(limit.saturating_sub(log.len()));
        log.extend_from_slice(&chunk[..take]);
        if take < chunk.len() && log.len() == limit {
            log.extend_from_slice(format!("\nkiln: log truncated at {limit} bytes\n").as_bytes());
        }
        if chunk.is_empty() {
            return;
        }
        let data = String::from_utf8_lossy(chunk).into_owned();
        self.emit_locked(
            run,
            &mut stream,
            EventKind::Log {
                step: step.to_owned(),
                data,
            },
        );
    }

    /// The log a running step has written so far.
    fn running_log(run: &JobRun, step: &str) -> Vec<u8> {
        run.handle
            .stream
            .lock()
            .ok()
            .and_then(|s| s.running_logs.get(step).cloned())
            .unwrap_or_default()
    }

    async fn run_job(self: Arc<Self>, run: JobRun) {
        let started = now();
        let outcome = tokio::select! {
            permit = self.slots.clone().acquire_owned() => match permit {
                Ok(permit) => {
                    let r = self.run_steps(&run, &started).await;
                    drop(permit);
                    r
                }
                Err(_) => Err((JobState::Cancelled, "scheduler closed".to_owned())),
            },
            () = run.handle.cancel.cancelled() => Err((JobState::Cancelled, self.cancel_reason())),
        };
        let (state, error, steps, sources) = match outcome {
            Ok((steps, sources)) => {
                let failed = steps.iter().find(|s| s.outcome != "succeeded");
                match failed {
                    None => (JobState::Succeeded, None, steps, sources),
                    Some(s) if s.outcome == "cancelled" => (
                        JobState::Cancelled,
                        Some(self.cancel_reason()),
                        steps,
                        sources,
                    ),
                    Some(s) => (
                        JobState::Failed,
                        // The step's own reason (a step admission failure names the tampered
                        // workspace) makes the job's error self-explanatory.
                        Some(
                            match self.store.db.job(&run.id).ok().flatten().and_then(|job| {
                                job.steps
                                    .into_iter()
                                    .find(|st| st.name == s.name)
                                    .and_then(|st| st.error)
                            }) {
                                Some(reason) => {
                                    format!("step {:?} {}: {reason}", s.name, s.outcome)
                                }
                                None => format!("step {:?} {}", s.name, s.outcome),
                            },
                        ),
                        steps,
                        sources,
                    ),
                }
            }
            Err((state, msg)) => (state, Some(msg), Vec::new(), BTreeMap::new()),
        };
        // Sign the job statement even for failed jobs: it is the record of what happened. With a
        // TPM it is signed by its own certified workload key and links the job's node identity
        // document (quote over the job nonce) and every workload certificate.
        let finished_on = now();
        let (job_signer, links) = match self
            .signer
            .finish_job(&run.id, &self.store.cas, &started, &finished_on)
            .await
        {
            Ok((signer, links)) => (Some(signer), links),
            Err(err) => {
                error!(%err, "cannot certify the job statement's key");
                self.signer.abandon_job(&run.id);
                (None, provenance::JobLinks::default())
            }
        };
        let predicate = JobPredicate {
            job_id: run.id.clone(),
            pipeline: run.pipeline.name.clone(),
            pipeline_digest: run.pipeline_digest,
            pipeline_signer: run.pipeline_signer.clone(),
            parameters: run.params.clone(),
            sources,
            steps,
            outcome: state.as_str().into(),
            builder_id: self.signer.builder_id.clone(),
            signing_key: job_signer
                .as_ref()
                .map_or_else(|| self.signer.info.clone(), |s| s.info.clone()),
            started_on: started,
            finished_on,
            node_identity: links.node_identity,
            nonce: links.nonce,
            workload_certificates: links.workload_certificates,
        };
        let statement = provenance::job_statement(predicate);
        let job_id = run.id.clone();
        if let Some(job_signer) = &job_signer
            && let Err(err) = self.attest(job_signer, &statement, |d| {
                self.store.db.record_job_attestation(&job_id, d, &now())
            })
        {
            error!(%err, "cannot attest the job");
        }
        if let Err(err) = self
            .store
            .db
            .set_job_state(&run.id, state, error.as_deref(), &now())
        {
            error!(?err, "cannot record job state");
        }
        if let Err(err) = std::fs::remove_dir_all(&run.work_dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            warn!(?err, dir = %run.work_dir.display(), "cannot remove job work directory");
        }
        info!(
            state = state.as_str(),
            error = error.as_deref().unwrap_or(""),
            "job finished"
        );
        self.emit(&run, EventKind::Job { state, error });
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.remove(&run.id);
        }
    }

    fn cancel_reason(&self) -> String {
        if self.shutdown.is_cancelled() {
            "cancelled: kilnd is shutting down".into()
        } else {
            "cancelled by user".into()
        }
    }

    /// Run every step; returns the step references and the seeded sources' tree digests.
    async fn run_steps(
        &self,
        run: &JobRun,
        started: &str,
    ) -> Result<(Vec<JobStepRef>, BTreeMap<String, Digest>), (JobState, String)> {
        if let Err(err) = self
            .store
            .db
            .set_job_state(&run.id, JobState::Running, None, started)
        {
            error!(?err, "cannot record job state");
        }
        self.emit(
            run,
            EventKind::Job {
                state: JobState::Running,
                error: None,
            },
        );
        // Node attestation at job start: a fresh nonce quoted by the TPM (no-op without a TPM).
        self.signer
            .begin_job(&run.id)
            .await
            .map_err(|err| (JobState::Failed, format!("node attestation failed: {err}")))?;
        let sources = self
            .seed_sources(run)
            .await
            .map_err(|msg| (JobState::Failed, msg))?;
        let mut ws_digests = sources.clone();
        // Who signed each step-written workspace: step admission re-verifies it before a reader.
        let mut producers = BTreeMap::new();
        let mut refs = Vec::new();
        let mut blocked = false;
        for idx in run.pipeline.execution_order() {
            let step = &run.pipeline.steps[idx];
            if blocked || run.handle.cancel.is_cancelled() {
                let state = if run.handle.cancel.is_cancelled() {
                    StepState::Cancelled
                } else {
                    StepState::Skipped
                };
                self.set_step(run, &step.name, state, None, None);
                refs.push(JobStepRef {
                    name: step.name.clone(),
                    outcome: state.as_str().into(),
                    envelope_digest: None,
                });
                continue;
            }
            let span = info_span!("step", step = %step.name);
            let inputs = crate::admission::step::StepInputs {
                ws_root: run.work_dir.join("ws"),
                inputs: step.inputs.clone(),
                expected: ws_digests.clone(),
                producers: producers.clone(),
            };
            if let Err(reason) = crate::admission::step::admit(self.store.cas.clone(), inputs)
                .instrument(span.clone())
                .await
            {
                error!(step = %step.name, %reason, "step admission failed");
                self.set_step(run, &step.name, StepState::Failed, None, Some(reason));
                refs.push(JobStepRef {
                    name: step.name.clone(),
                    outcome: StepState::Failed.as_str().into(),
                    envelope_digest: None,
                });
                blocked = true;
                continue;
            }
            let result = self.run_step(run, idx, &ws_digests).instrument(span).await;
            if let (Some(out), Some(envelope)) = (&step.output, result.envelope) {
                if let Some(key) = self.signer.step_key(&run.id, &step.name) {
                    producers.insert(
                        out.clone(),
                        crate::admission::step::Producer {
                            step: step.name.clone(),
                            envelope,
                            key,
                        },
                    );
                } else {
                    // Readers then get the on-disk digest check only.
                    warn!(step = %step.name, "no signing key recorded for the step: its attestation cannot be re-verified before its readers");
                }
            }
            if let (Some(out), Some(entries)) = (&step.output, &result.outputs) {
                ws_digests.insert(out.clone(), tree_digest(entries));
            }
            refs.push(JobStepRef {
                name: step.name.clone(),
                outcome: result.state.as_str().into(),
                envelope_digest: result.envelope,
            });
            blocked = result.state != StepState::Succeeded;
        }
        Ok((refs, sources))
    }

    /// Unpack each uploaded source archive into its workspace; returns workspace → tree digest.
    async fn seed_sources(&self, run: &JobRun) -> Result<BTreeMap<String, Digest>, String> {
        let mut out = BTreeMap::new();
        for (ws, blob) in &run.sources {
            let archive = self
                .store
                .cas
                .get(blob)
                .map_err(|e| format!("source for workspace {ws:?}: {e}"))?;
            let dest = run.work_dir.join("ws").join(ws);
            let (ws2, dest2) = (ws.clone(), dest.clone());
            let digest = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dest2)
                    .map_err(|e| format!("cannot create {}: {e}", dest2.display()))?;
                workspace::unpack_source(&archive, &dest2, &ws2).map_err(|e| e.to_string())?;
                let c = workspace::collect(&dest2, None).map_err(|e| e.to_string())?;
                Ok::<_, String>(tree_digest(&c.entries))
            })
            .await
            .map_err(|e| format!("source unpack task failed: {e}"))??;
            info!(workspace = %ws, %digest, "source workspace seeded");
            out.insert(ws.clone(), digest);
        }
        Ok(out)
    }

    fn set_step(
        &self,
        run: &JobRun,
        step: &str,
        state: StepState,
        exit_code: Option<i32>,
        error: Option<String>,
    ) {
        let t = now();
        let update = StepUpdate {
            state: Some(state),
            exit_code,
            error: error.clone(),
            started_at: (state == StepState::Running).then(|| t.clone()),
            finished_at: state.is_terminal().then(|| t.clone()),
            ..StepUpdate::default()
        };
        if let Err(err) = self.store.db.update_step(&run.id, step, &update) {
            error!(?err, "cannot record step state");
        }
        self.emit(
            run,
            EventKind::Step {
                step: step.to_owned(),
                state,
                exit_code,
                error,
            },
        );
    }

    async fn run_step(
        &self,
        run: &JobRun,
        idx: usize,
        ws_digests: &BTreeMap<String, Digest>,
    ) -> StepResult {
        let step = &run.pipeline.steps[idx];
        let failed = |state, msg: String| {
            self.set_step(run, &step.name, state, None, Some(msg));
            StepResult {
                state,
                envelope: None,
                outputs: None,
            }
        };
        let Some(profile) = self.profiles.get(&step.profile) else {
            return failed(
                StepState::Failed,
                format!("unknown profile {:?}", step.profile),
            );
        };
        // A pinned build environment (`image = "sha256:…"`): the image's tree on this node,
        // materialized and verified on first use, replaces the profile's host paths.
        let image = match step.image {
            None => None,
            Some(digest) => match crate::image::materialize(&self.store, digest).await {
                Ok(image) => Some(image),
                Err(e) => {
                    return failed(
                        StepState::Failed,
                        format!("build environment: {}", crate::error_chain(&e)),
                    );
                }
            },
        };
        let rendered = run.pipeline.render_step(idx, &run.params);
        // The step's declared secrets: read now, kept in memory only (the helper gets them on its
        // stdin and mounts them at /run/secrets), and redacted from its log.
        let secrets = match self.admission.secrets.read(&step.secrets) {
            Ok(secrets) => secrets,
            Err(e) => return failed(StepState::Failed, e),
        };
        let ws_root = run.work_dir.join("ws");
        let mut mounts = Vec::new();
        let mut inputs = Vec::new();
        for ws in &step.inputs {
            let Some(d) = ws_digests.get(ws) else {
                return failed(
                    StepState::Failed,
                    format!("input workspace {ws:?} was never produced"),
                );
            };
            inputs.push((ws.clone(), *d));
            mounts.push(WorkspaceMount {
                name: ws.clone(),
                host_path: ws_root.join(ws),
                access: Access::ReadOnly,
            });
        }
        let mut output_fs = None;
        if let Some(out) = &step.output {
            // `[limits] workspace_size`: the step writes on a tmpfs of that size, not the disk.
            let host_path = match sandbox::outputfs::OutputWorkspace::prepare(
                &ws_root.join(out),
                &run.work_dir.join("outfs").join(&step.name),
                profile.workspace_size_bytes,
                // Host ids: with `[userns]` the step's mapped uid/gid.
                profile.host_ids().0,
                profile.host_ids().1,
            ) {
                Ok(ws) => output_fs.insert(ws).dir(),
                Err(e) => {
                    return failed(
                        StepState::Failed,
                        format!("cannot prepare output workspace {out:?}: {e}"),
                    );
                }
            };
            mounts.push(WorkspaceMount {
                name: out.clone(),
                host_path,
                access: Access::ReadWrite,
            });
        }
        // A source step with git/tarball runs kilnd's own ingest command (see `ingest`).
        let mut rendered = rendered;
        let ingest_repo = run.repos.get(&step.name).map(PathBuf::as_path);
        if let Some(out) = &step.output {
            match ingest::prepare(step, ingest_repo, &run.work_dir, &self.store.cas, out) {
                Ok(Some(ingest)) => {
                    rendered.argv = ingest.argv;
                    mounts.push(ingest.mount);
                }
                Ok(None) => {}
                Err(e) => return failed(StepState::Failed, e),
            }
        }
        let source_date_epoch = run.source_date_epoch.lock().ok().and_then(|e| *e);
        let cwd = PathBuf::from(step.workdir_path());
        // A clean environment: the profile's defaults, overridden by the step's own `env`
        // (which may not set KILN_* names: the spec reserves them).
        let mut env = BTreeMap::from([
            ("PATH".to_owned(), profile.path_env.clone()),
            ("HOME".to_owned(), "/tmp".to_owned()),
            ("TMPDIR".to_owned(), "/tmp".to_owned()),
            ("KILN_JOB_ID".to_owned(), run.id.clone()),
            ("KILN_STEP".to_owned(), step.name.clone()),
        ]);
        if let Some(epoch) = source_date_epoch {
            env.insert("SOURCE_DATE_EPOCH".to_owned(), epoch.to_string());
        }
        env.extend(rendered.env);
        // A fetch step reaches the outside only through kilnd's allowlisting proxy (`fetch`).
        let mut fetch = crate::fetch::FetchSession::for_step(step, self.admission.fetch_cap());
        if let Some(fetch) = &fetch {
            env.extend(fetch.environment());
        }
        let root_dir = self.config.state_dir.join("run").join("root");
        if let Err(e) = std::fs::create_dir_all(&root_dir) {
            return failed(
                StepState::Failed,
                format!("cannot create {}: {e}", root_dir.display()),
            );
        }
        if let Err(reason) = self.observer_gate() {
            return failed(StepState::Failed, reason);
        }
        // The step's own cgroups, with the profile's limits: the helper joins them before it forks,
        // `Sandbox::run` kills and removes them and verifies the teardown.
        let cgroups = match sandbox::cgroup::create_step(&run.id, &step.name, &profile.limits) {
            Ok(paths) => paths,
            Err(e) => {
                return failed(
                    StepState::Failed,
                    format!("cannot create the step's cgroups: {e}"),
                );
            }
        };
        // Observe the cgroup before the helper that joins it exists: the step's first
        // instruction is then already in the trace.
        let observation = match self.observe_step(&cgroups) {
            Ok(observation) => observation,
            Err(reason) => {
                for (path, err) in sandbox::cgroup::remove_step_dirs(&cgroups) {
                    warn!(%err, path = %path.display(), "cannot remove an unused step cgroup");
                }
                return failed(StepState::Failed, reason);
            }
        };
        let mut spec = SandboxSpec {
            argv: rendered.argv,
            env: env.into_iter().collect(),
            cwd,
            hostname: "kiln-worker".into(),
            root_dir,
            host_paths: if image.is_some() {
                Vec::new()
            } else {
                profile.host_paths.clone()
            },
            image_root: image.as_ref().map(|i| i.root.clone()),
            // Before `workspaces` takes `mounts`: the Landlock rules follow the same workspaces
            // (and the image's bound entries instead of the host paths).
            confinement: match &image {
                Some(i) => profile.confinement_with_root(&i.bound, &mounts),
                None => profile.confinement(&mounts),
            },
            workspaces: mounts,
            timeout_ms: step.timeout.as_millis() as u64,
            uid: profile.uid,
            gid: profile.gid,
            tmp_size_bytes: profile.tmp_size_bytes,
            cgroups: Some(cgroups),
            secrets: secrets
                .iter()
                .map(|(name, value)| (name.clone(), value.0.clone()))
                .collect(),
        };
        if let Some(fetch) = &fetch {
            fetch.confine(&mut spec.confinement);
        }
        // The first run's spec: a step with an output is recorded for `kiln rebuild`, and a
        // `reproducible = true` one runs again with it (pipeline/rebuild.rs).
        let first_spec = step.output.is_some().then(|| spec.clone());
        // The step's workload key: ephemeral (TPM mode), certified when the step ends, wiped when
        // `workload` is dropped at the end of this function.
        let mut workload = match self.signer.workload(&run.id, Some(&step.name)) {
            Ok(w) => w,
            Err(e) => return failed(StepState::Failed, format!("workload key: {e}")),
        };
        let started_on = now();
        self.set_step(run, &step.name, StepState::Running, None, None);
        info!(argv = ?spec.argv.first(), "step started");

        let (log_tx, log_rx) = mpsc::channel(64);
        let collector = self.collect_log(
            run,
            &step.name,
            log_rx,
            crate::admission::Redactor::new(&secrets),
        );
        let (outcome, ()) = tokio::join!(
            crate::fetch::run_sandbox(
                &self.sandbox,
                &spec,
                log_tx,
                run.handle.cancel.child_token(),
                fetch.as_mut()
            ),
            collector
        );
        let finished_on = now();
        // The node key certifies the step's key for the step's lifetime before anything about
        // the step is signed.
        let certified = workload
            .certify(&started_on, &finished_on)
            .await
            .map_err(|e| format!("cannot certify the step's workload key: {e}"));

        let teardown_verified = outcome
            .as_ref()
            .is_ok_and(|o| o.teardown.as_ref().is_some_and(|t| t.verified));
        let (mut state, exit_code, mut error, duration_ms) = match outcome {
            Ok(o) => {
                let (state, code, err) = describe_end(&o, step.timeout);
                (state, code, err, Some(o.wall_ms))
            }
            Err(e) => (StepState::Failed, None, Some(format!("sandbox: {e}")), None),
        };
        // A capped output workspace that filled up: writes failed, the outputs are incomplete.
        if let Some(reason) = output_fs
            .as_ref()
            .and_then(sandbox::outputfs::OutputWorkspace::full)
            && state != StepState::Cancelled
        {
            state = StepState::Failed;
            error = Some(match error {
                Some(earlier) => format!("{reason}; then {earlier}"),
                None => reason,
            });
        }
        let mut outputs = None;
        if state == StepState::Succeeded
            && let Some(out) = &step.output
        {
            let dir = output_fs.as_ref().map_or_else(
                || ws_root.join(out),
                sandbox::outputfs::OutputWorkspace::dir,
            );
            let cas = self.store.cas.clone();
            match tokio::task::spawn_blocking(move || workspace::collect(&dir, Some(&cas))).await {
                Ok(Ok(c)) => {
                    for s in &c.skipped_symlinks {
                        let note = format!(
                            "kiln: symlink {s} is not attested (symlinks are never followed)\n"
                        );
                        self.emit_log(run, &step.name, note.as_bytes());
                    }
                    outputs = Some(c.entries);
                }
                Ok(Err(e)) => {
                    state = StepState::Failed;
                    error = Some(format!("collecting outputs: {e}"));
                }
                Err(e) => {
                    state = StepState::Failed;
                    error = Some(format!("collecting outputs: {e}"));
                }
            }
        }
        // Collected outputs move from the tmpfs to the on-disk workspace; the tmpfs goes.
        if let Some(ofs) = output_fs.take()
            && let Err(e) = ofs.settle(outputs.is_some()).await
        {
            state = StepState::Failed;
            error = Some(e);
            outputs = None;
        }
        // A fetch step: its inputs must be unchanged and every fetched file pinned; a failure
        // fails the step and its outputs are not vouched for.
        let fetch_record = match fetch {
            Some(fetch) => {
                let (record, notes, failure) = fetch
                    .verify(ws_root.clone(), inputs.clone(), outputs.clone())
                    .await;
                for note in notes {
                    self.emit_log(run, &step.name, format!("{note}\n").as_bytes());
                }
                if let Some(reason) = failure {
                    if state == StepState::Succeeded {
                        state = StepState::Failed;
                    }
                    error = Some(match error {
                        Some(earlier) => format!("{reason} (after: {earlier})"),
                        None => reason,
                    });
                    outputs = None;
                }
                Some(record)
            }
            None => None,
        };
        // Record how to rebuild the step; a `reproducible = true` step runs a second time now,
        // before any reader of its output, and fails if the outputs differ.
        let rerun = if state == StepState::Succeeded {
            self.after_step(run, step, first_spec, &inputs, outputs.as_deref())
                .await
        } else {
            rebuild::AfterStep::default()
        };
        if let Some(reason) = &rerun.failure {
            state = StepState::Failed;
            error = Some(reason.clone());
        }
        // A publish step attests an SBOM and the test results about its outputs, signed by its
        // workload key; its provenance names them (publish/).
        let mut publish_byproducts = Vec::new();
        if step.kind == kiln_common::spec::StepKind::Publish
            && state == StepState::Succeeded
            && certified.is_ok()
            && let (Some(out), Some(entries)) = (&step.output, &outputs)
        {
            let mut workspaces = ws_digests.clone();
            workspaces.insert(out.clone(), tree_digest(entries));
            let input = crate::publish::PublishInput {
                job_id: &run.id,
                pipeline: &run.pipeline,
                pipeline_digest: run.pipeline_digest,
                step: &step.name,
                workspaces: &workspaces,
                artifacts: entries,
            };
            match self.publish_attestations(&workload, &input) {
                Ok(byproducts) => publish_byproducts = byproducts,
                Err(e) => {
                    state = StepState::Failed;
                    error = Some(e);
                }
            }
        }
        // The helper exited and the teardown removed the cgroups: seal what the kernel saw,
        // signed by the step's (certified) workload key; the provenance names it.
        let observed = observation.is_some();
        let trace = match observation.filter(|_| certified.is_ok()) {
            Some(observation) => match self
                .seal_trace(
                    &workload,
                    &run.id,
                    &step.name,
                    observation,
                    &secrets
                        .iter()
                        .map(|(_, value)| value.0.clone())
                        .collect::<Vec<_>>(),
                    teardown_verified,
                    (&started_on, &finished_on),
                )
                .await
            {
                Ok(sealed) => Some(sealed.envelope),
                Err(e) => {
                    error!(err = %e, "cannot seal the step's trace");
                    state = StepState::Failed;
                    error = Some(e);
                    None
                }
            },
            None => None,
        };
        let log = Self::running_log(run, &step.name);
        let source =
            ingest::record(step, ingest_repo, &log).filter(|_| state == StepState::Succeeded);
        if let Some(kiln_common::intoto::SourceIngest::Git {
            commit_time: Some(time),
            ..
        }) = &source
            && let Ok(mut epoch) = run.source_date_epoch.lock()
        {
            epoch.get_or_insert(*time);
        }
        let log_digest = match self.store.cas.put_bytes(&log) {
            Ok(d) => Some(d),
            Err(err) => {
                error!(?err, "cannot store step log");
                None
            }
        };
        let rec = StepRecord {
            job_id: &run.id,
            pipeline: &run.pipeline.name,
            pipeline_digest: run.pipeline_digest,
            params: &run.params,
            step: &step.name,
            kind: step.kind.as_str(),
            profile: &step.profile,
            inputs: &inputs,
            output: match (&step.output, &outputs) {
                (Some(ws), Some(entries)) => Some((ws.as_str(), entries.as_slice())),
                _ => None,
            },
            exit_code,
            outcome: state.as_str(),
            started_on: &started_on,
            finished_on: &finished_on,
            log: log_digest,
            teardown_verified,
            observed,
            trace,
            pipeline_signer: run.pipeline_signer.as_deref(),
            image: step.image,
            source: source.as_ref(),
            source_date_epoch,
            fetch: fetch_record.as_ref(),
        };
        let mut statement = provenance::step_statement(&rec, &workload);
        statement
            .predicate
            .build_definition
            .internal_parameters
            .reproducible = rerun.reproducible;
        statement
            .predicate
            .run_details
            .byproducts
            .extend(publish_byproducts);
        // A reproducible step's second run was observed too: its trace is named beside the first.
        if let Some(trace) = &rerun.rerun_trace {
            statement.predicate.run_details.byproducts.push(
                kiln_common::trace::envelope_descriptor(rebuild::RERUN_TRACE_BYPRODUCT, trace),
            );
        }
        // Final = no later step transforms it (steps without outputs, like tests, only read).
        let final_output = step.output.as_ref().is_some_and(|ws| {
            !run.pipeline
                .steps
                .iter()
                .any(|s| s.output.is_some() && s.inputs.contains(ws))
        });
        let attested = match (&step.output, &outputs) {
            (Some(ws), Some(entries)) => Some(StepOutputs {
                workspace: ws,
                final_output,
                entries,
            }),
            _ => None,
        };
        let envelope = match certified.and_then(|()| {
            self.attest(&workload, &statement, |d| {
                self.store.db.record_attested_outputs(
                    &run.id,
                    &step.name,
                    attested.as_ref(),
                    d,
                    &finished_on,
                )
            })
        }) {
            Ok(d) => Some(d),
            Err(e) => {
                state = StepState::Failed;
                error = Some(e);
                None
            }
        };
        let update = StepUpdate {
            duration_ms,
            log: log_digest,
            attestation: envelope,
            ..StepUpdate::default()
        };
        if let Err(err) = self.store.db.update_step(&run.id, &step.name, &update) {
            error!(?err, "cannot record step result");
        }
        info!(
            state = state.as_str(),
            ?exit_code,
            error = error.as_deref().unwrap_or(""),
            "step finished"
        );
        self.set_step(run, &step.name, state, exit_code, error);
        StepResult {
            state,
            envelope,
            outputs,
        }
    }

    /// Sign a statement, store the envelope in the CAS, then index it with `record` (only after
    /// the blob is durable, so the index never points at a missing envelope).
    /// `signer` is the workload's ([`NodeSigner::workload`]): the step's own key for every
    /// statement about a step, the job statement's key for the job.
    pub(crate) fn attest<P: serde::Serialize>(
        &self,
        signer: &provenance::WorkloadSigner<'_>,
        statement: &kiln_common::intoto::Statement<P>,
        record: impl FnOnce(&Digest) -> Result<(), crate::store::DbError>,
    ) -> Result<Digest, String> {
        let (bytes, digest) = signer
            .sign_statement(statement)
            .map_err(|e| format!("cannot sign provenance: {e}"))?;
        self.store
            .cas
            .put_bytes(&bytes)
            .map_err(|e| format!("cannot store attestation: {e}"))?;
        record(&digest).map_err(|e| format!("cannot index attestation: {e}"))?;
        Ok(digest)
    }

    /// Forward log chunks as events (the running log keeps up to `max_log_bytes` of them), with
    /// the step's secret values replaced by `[REDACTED:NAME]` before they are kept or broadcast.
    async fn collect_log(
        &self,
        run: &JobRun,
        step: &str,
        mut rx: mpsc::Receiver<bytes::Bytes>,
        mut redactor: crate::admission::Redactor,
    ) {
        // A step that prints nothing still has a (empty) running log.
        self.emit_log(run, step, b"");
        while let Some(chunk) = rx.recv().await {
            self.emit_log(run, step, &redactor.push(&chunk));
        }
        self.emit_log(run, step, &redactor.finish());
    }

    /// Stop accepting jobs, cancel running ones, and wait (up to the configured grace) for them to
    /// record their final state.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.config.jobs.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("jobs did not finish recording within the shutdown grace period");
        }
    }
}

/// Map a worker's end to a step state, exit code and reason. A teardown that was not verified
/// fails the step whatever its exit (nothing it produced can be vouched for); so does a limit the
/// kernel enforced (which fork or allocation failed decides what the step produced), with the
/// limit as the reason ("out of memory: limit 2 GiB").
fn describe_end(
    outcome: &SandboxOutcome,
    timeout: std::time::Duration,
) -> (StepState, Option<i32>, Option<String>) {
    let (state, code, reason) = describe_exit(&outcome.end, timeout);
    let mut reasons: Vec<String> = Vec::new();
    if state != StepState::Cancelled && !outcome.limits_hit.is_empty() {
        reasons.extend(outcome.limits_hit.iter().map(ToString::to_string));
        if let Some(reason) = &reason {
            reasons.push(format!("then {reason}"));
        }
    }
    if let Some(teardown) = &outcome.teardown
        && !teardown.verified
    {
        if reasons.is_empty()
            && let Some(reason) = &reason
        {
            reasons.push(reason.clone());
        }
        reasons.push(format!(
            "teardown not verified: {}",
            teardown.problems.join("; ")
        ));
    }
    if reasons.is_empty() {
        (state, code, reason)
    } else {
        let state = match state {
            StepState::Cancelled => state,
            // A limit, not the clock, is why it never finished.
            StepState::TimedOut if outcome.limits_hit.is_empty() => state,
            _ => StepState::Failed,
        };
        (state, code, Some(reasons.join("; ")))
    }
}

/// Map how the step's process ended to a step state, exit code and reason.
fn describe_exit(
    end: &StepEnd,
    timeout: std::time::Duration,
) -> (StepState, Option<i32>, Option<String>) {
    match end {
        StepEnd::Exited { code: 0 } => (StepState::Succeeded, Some(0), None),
        StepEnd::Exited { code } => (
            StepState::Failed,
            Some(*code),
            Some(format!("exited with code {code}")),
        ),
        StepEnd::Signaled { signal } => {
            let name = nix::sys::signal::Signal::try_from(*signal)
                .map_or_else(|_| signal.to_string(), |s| s.as_str().to_owned());
            (
                StepState::Failed,
                None,
                Some(format!("killed by signal {name}")),
            )
        }
        StepEnd::TimedOut => (
            StepState::TimedOut,
            None,
            Some(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        ),
        StepEnd::ExecFailed { error } => (
            StepState::Failed,
            None,
            Some(format!("cannot start command: {error}")),
        ),
        StepEnd::SetupFailed { stage, error } => (
            StepState::Failed,
            None,
            Some(format!("sandbox setup failed at {stage}: {error}")),
        ),
        StepEnd::Cancelled => (StepState::Cancelled, None, Some("cancelled".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::sandbox::{LimitHit, TeardownReport};

    fn outcome(end: StepEnd, limits_hit: Vec<LimitHit>, verified: bool) -> SandboxOutcome {
        SandboxOutcome {
            end,
            wall_ms: 1,
            user_ms: 0,
            sys_ms: 0,
            max_rss_kib: 0,
            limits_hit,
            teardown: Some(TeardownReport {
                verified,
                problems: if verified {
                    Vec::new()
                } else {
                    vec!["process 42 is still in the step's cgroup".into()]
                },
            }),
            landlock: None,
        }
    }

    #[test]
    fn limits_and_teardown_explain_the_end() {
        let timeout = Duration::from_secs(5);
        let oom = LimitHit::Memory {
            limit_bytes: 2 << 30,
            oom_kills: 1,
        };
        let pids = LimitHit::Pids {
            limit: 512,
            refused_forks: 3,
        };
        assert_eq!(
            describe_end(&outcome(StepEnd::Exited { code: 0 }, vec![], true), timeout),
            (StepState::Succeeded, Some(0), None)
        );
        assert_eq!(
            describe_end(
                &outcome(StepEnd::Exited { code: 137 }, vec![oom.clone()], true),
                timeout
            ),
            (
                StepState::Failed,
                Some(137),
                Some("out of memory: limit 2 GiB; then exited with code 137".into())
            )
        );
        // A limit hit fails even a step that exited 0.
        let (state, _, reason) = describe_end(
            &outcome(StepEnd::Exited { code: 0 }, vec![oom], true),
            timeout,
        );
        assert_eq!(state, StepState::Failed);
        assert_eq!(reason.as_deref(), Some("out of memory: limit 2 GiB"));
        let (state, _, reason) =
            describe_end(&outcome(StepEnd::TimedOut, vec![pids], true), timeout);
        assert_eq!(state, StepState::Failed);
        assert_eq!(
            reason.as_deref(),
            Some("process limit reached: 512; then timed out after 5s")
        );
        let (state, _, reason) = describe_end(
            &outcome(StepEnd::Exited { code: 0 }, vec![], false),
            timeout,
        );
        assert_eq!(state, StepState::Failed);
        assert_eq!(
            reason.as_deref(),
            Some("teardown not verified: process 42 is still in the step's cgroup")
        );
        let (state, _, _) = describe_end(&outcome(StepEnd::Cancelled, vec![], false), timeout);
        assert_eq!(state, StepState::Cancelled);
    }
}
