//! The observer's part of running a step: the node's one [`ObserverService`], the gate that
//! refuses steps when it is required but not loaded, attaching to a step's cgroup before the
//! helper starts, and sealing the step's trace (CAS blob + signed runtime-trace statement).
//!
//! Order in `run_step`: [`Node::observer_gate`] before the cgroups exist, [`Node::observe_step`]
//! right after they exist and before the helper is spawned, [`Node::seal_trace`] after the
//! helper exited and the teardown removed the cgroups; the returned envelope digest goes into
//! the provenance as the `runtime-trace` byproduct.

use std::sync::Arc;

use kiln_common::Digest;
use kiln_common::dsse::Envelope;
use kiln_common::intoto::StepStatement;
use kiln_common::trace::{RUNTIME_TRACE_V01, TRACE_BYPRODUCT, TraceStatement};
use tracing::{error, info, warn};

use super::Node;
use crate::config::ObserverSection;
use crate::error_chain;
use crate::observe::assemble::{self, StepContext};
use crate::observe::{CgroupId, ObserverConfig, ObserverService, StepObservation};
use crate::sandbox::cgroup::CgroupPaths;

/// The node's observer, or why there is none.
#[derive(Debug)]
pub enum NodeObserver {
    /// Loaded and attached; shared by every step.
    Loaded(Arc<ObserverService>),
    /// Not loaded: steps refuse to run when `required`, else run unobserved.
    Unavailable {
        /// The load error, as logged at start.
        reason: String,
        /// `[observer] required`.
        required: bool,
    },
}

impl NodeObserver {
    /// Loads the observer (inside the tokio runtime). A failure is logged once, here.
    pub fn start(section: &ObserverSection) -> Self {
        let config = ObserverConfig {
            ring_bytes: section.ring_bytes,
            ..ObserverConfig::default()
        };
        match ObserverService::start(&config) {
            Ok(service) => {
                info!(ring_bytes = section.ring_bytes, "pipeline observer loaded");
                Self::Loaded(service)
            }
            Err(err) => {
                let reason = error_chain(&err);
                if section.required {
                    error!(
                        reason,
                        "pipeline observer did not load: steps will be refused ([observer] required = true)"
                    );
                } else {
                    warn!(
                        reason,
                        "pipeline observer did not load: steps run UNOBSERVED ([observer] required = false)"
                    );
                }
                Self::Unavailable {
                    reason,
                    required: section.required,
                }
            }
        }
    }

    /// Whether steps are observed.
    pub fn is_loaded(&self) -> bool {
        matches!(self, Self::Loaded(_))
    }
}

/// The owned facts of a step a [`StepContext`] borrows (to assemble on a blocking thread).
struct StepFacts {
    job_id: String,
    step: String,
    builder_id: String,
    started_on: String,
    finished_on: String,
    secrets: Vec<String>,
    until_last_exit: bool,
    cgroup_id: u64,
}

impl StepFacts {
    fn context(&self) -> StepContext<'_> {
        StepContext {
            job_id: &self.job_id,
            step: &self.step,
            builder_id: &self.builder_id,
            started_on: &self.started_on,
            finished_on: &self.finished_on,
            secrets: &self.secrets,
            attached_before_start: true,
            until_last_exit: self.until_last_exit,
            cgroup_id: self.cgroup_id,
            hash_materials: true,
        }
    }
}

/// What sealing a step's trace produced, for its provenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedTrace {
    /// Digest of the signed runtime-trace envelope.
    pub envelope: Digest,
    /// `kilnTrace.complete`.
    pub complete: bool,
    /// Lost events.
    pub lost: u64,
}

impl Node {
    /// Before a step's cgroups exist: the reason it must not run, if the observer is required
    /// and not loaded.
    pub(super) fn observer_gate(&self) -> Result<(), String> {
        match &self.observer {
            NodeObserver::Unavailable {
                reason,
                required: true,
            } => Err(format!(
                "the pipeline observer is not loaded ({reason}); steps do not run unobserved unless [observer] required = false"
            )),
            _ => Ok(()),
        }
    }

    /// Right after the step's cgroups exist, before the helper is spawned: starts observing
    /// the step's cgroup v2. `Ok(None)`: run unobserved (allowed by the config).
    pub(super) fn observe_step(
        &self,
        cgroups: &CgroupPaths,
    ) -> Result<Option<StepObservation>, String> {
        let NodeObserver::Loaded(service) = &self.observer else {
            return Ok(None);
        };
        let attached = cgroups
            .cgroup_id()
            .map_err(|e| {
                format!(
                    "cannot read the cgroup id of {}: {e}",
                    cgroups.unified.display()
                )
            })
            .and_then(|id| {
                service
                    .attach(CgroupId(id))
                    .map_err(|e| format!("cannot observe the step's cgroup: {}", error_chain(&e)))
            });
        match attached {
            Ok(observation) => Ok(Some(observation)),
            Err(reason) if self.config.observer.required => Err(reason),
            Err(reason) => {
                warn!(reason, "step runs UNOBSERVED ([observer] required = false)");
                Ok(None)
            }
        }
    }

    /// After the helper exited and the teardown ran: drains the step's events, stores the trace
    /// in the CAS and signs its runtime-trace statement. `until_last_exit` is whether the
    /// teardown verified the step's cgroups empty and removed. Also seals the re-runs of a step
    /// (pipeline/rebuild.rs), under their own job id and step name.
    #[expect(
        clippy::too_many_arguments,
        reason = "each argument is a distinct fact of the step (run_step, rebuild.rs)"
    )]
    pub(super) async fn seal_trace(
        &self,
        signer: &crate::provenance::WorkloadSigner<'_>,
        job_id: &str,
        step: &str,
        observation: StepObservation,
        secrets: &[String],
        until_last_exit: bool,
        (started_on, finished_on): (&str, &str),
    ) -> Result<SealedTrace, String> {
        let cgroup_id = observation.cgroup().0;
        let collected = observation
            .finish()
            .await
            .map_err(|e| format!("draining the step's trace: {}", error_chain(&e)))?;
        let facts = StepFacts {
            job_id: job_id.to_owned(),
            step: step.to_owned(),
            builder_id: signer.builder_id.clone(),
            started_on: started_on.to_owned(),
            finished_on: finished_on.to_owned(),
            secrets: secrets.to_vec(),
            until_last_exit,
            cgroup_id,
        };
        // Assembly hashes the materials the step used (file reads) and compresses: off the
        // async workers.
        let (assembled, facts) = tokio::task::spawn_blocking(move || {
            let assembled = assemble::assemble(&collected.events, collected.lost, &facts.context());
            (assembled, facts)
        })
        .await
        .map_err(|e| format!("assembling the step's trace: the task failed: {e}"))?;
        let ctx = facts.context();
        let assembled =
            assembled.map_err(|e| format!("assembling the step's trace: {}", error_chain(&e)))?;
        let blob = self
            .store
            .cas
            .put_bytes(&assembled.blob)
            .map_err(|e| format!("storing the step's trace: {e}"))?;
        let statement = assemble::statement(&assembled, &blob, &ctx);
        let envelope = self.attest(signer, &statement, |_| Ok(()))?;
        let summary = &assembled.summary;
        info!(
            trace = %blob,
            events = summary.events.total(),
            execs = summary.events.exec,
            materials = summary.materials.len(),
            setup_events_omitted = summary.setup_events_omitted,
            lost = summary.lost,
            complete = summary.complete,
            "step trace sealed"
        );
        Ok(SealedTrace {
            envelope,
            complete: summary.complete,
            lost: summary.lost,
        })
    }

    /// The trace envelope digest a step's provenance envelope names, if any.
    pub fn trace_envelope_digest(provenance: &Envelope) -> Option<Digest> {
        let statement: StepStatement = provenance.decode_statement().ok()?;
        statement
            .predicate
            .run_details
            .byproducts
            .iter()
            .find(|b| b.name.as_deref() == Some(TRACE_BYPRODUCT))
            .and_then(|b| kiln_common::intoto::sha256_of(&b.digest))
    }

    /// The stored trace blob digest of a trace envelope.
    pub fn trace_blob_digest(trace: &Envelope) -> Option<Digest> {
        let statement: TraceStatement = trace.decode_statement().ok()?;
        (statement.predicate_type == RUNTIME_TRACE_V01)
            .then(|| kiln_common::intoto::sha256_of(&statement.predicate.kiln_trace.trace.digest))
            .flatten()
    }

    /// Loads a DSSE envelope from the CAS.
    pub fn load_envelope(&self, digest: &Digest) -> Option<Envelope> {
        let bytes = self.store.cas.get(digest).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether steps on this node are observed.
    pub fn observer_loaded(&self) -> bool {
        self.observer.is_loaded()
    }
}
