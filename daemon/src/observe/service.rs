//! The node's one observer, shared by every running step: one task drains the ring buffer and
//! routes each event by its cgroup id to the step that owns that cgroup.
//!
//! A step's lifecycle: [`ObserverService::attach`] with the step's cgroup id after the cgroup
//! exists and BEFORE the helper that joins it is spawned (so the step's first instruction is
//! observed); the step runs; after its teardown verified the cgroup empty and removed,
//! [`StepObservation::finish`] drains until quiet, stops filtering on the cgroup and returns the
//! events with the cgroup's lost count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

use super::{CgroupId, Event, EventStream, ObserveError, Observer, ObserverConfig};

/// Consecutive empty flush rounds before a finished step's trace is sealed. Records are committed
/// before the task that wrote them can leave its cgroup, so the rounds only cover a record another
/// CPU still holds reserved in front of them — a BPF program commits within microseconds, and each
/// round is a round trip through the router task. (A 30 ms quiet period here used to be the
/// largest per-step cost: 85 ms of a `true` step, see scripts/bench/steps.)
const QUIET_ROUNDS: usize = 3;
/// How long the node must have no observed step before the syscall programs are detached
/// (attaching them costs the next step little; detaching waits for RCU, off the step's path).
const DETACH_IDLE: std::time::Duration = std::time::Duration::from_secs(2);
/// Flush rounds after which a still-busy ring is given up on (the remainder counts as lost).
const MAX_FLUSH_ROUNDS: usize = 2000;

/// cgroup id -> the step's receiver of event batches (one send per cgroup per drained batch,
/// not per event: the router keeps up with the ring at a fraction of the cost).
type Routes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Vec<Event>>>>>;

/// The loaded observer and its ring-buffer router.
#[derive(Debug)]
pub struct ObserverService {
    observer: Mutex<Observer>,
    routes: Routes,
    flush: mpsc::Sender<oneshot::Sender<()>>,
    ring_bytes: u32,
}

/// Observation of one step's cgroup; finish it (or drop it, which stops filtering without a
/// trace).
#[derive(Debug)]
pub struct StepObservation {
    service: Arc<ObserverService>,
    id: CgroupId,
    events: mpsc::UnboundedReceiver<Vec<Event>>,
    finished: bool,
    /// The programs' skip count (`recursion_misses`, all programs) when observation began.
    misses_at_start: u64,
}

/// What the kernel reported for one step.
#[derive(Debug)]
pub struct StepEvents {
    /// Every event, in ring order.
    pub events: Vec<Event>,
    /// Events of the step the kernel could not deliver.
    pub lost: u64,
    /// The cgroup observed.
    pub cgroup: CgroupId,
}

impl ObserverService {
    /// Loads and attaches the BPF programs and starts the router task. Must run in a tokio
    /// runtime.
    pub fn start(config: &ObserverConfig) -> Result<Arc<Self>, ObserveError> {
        let (observer, stream) = Observer::load(config)?;
        let routes: Routes = Arc::default();
        let (flush, flush_rx) = mpsc::channel(16);
        tokio::spawn(route(stream, routes.clone(), flush_rx));
        Ok(Arc::new(Self {
            observer: Mutex::new(observer),
            routes,
            flush,
            ring_bytes: config.ring_bytes,
        }))
    }

    /// The ring buffer size in bytes.
    pub fn ring_bytes(&self) -> u32 {
        self.ring_bytes
    }

    /// Starts observing cgroup `id` and returns its event receiver. Call before anything runs
    /// in the cgroup.
    pub fn attach(self: &Arc<Self>, id: CgroupId) -> Result<StepObservation, ObserveError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Route first, filter next: no event of the cgroup can arrive unrouted.
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.0, tx);
        let observed = {
            let mut observer = self.observer.lock().unwrap_or_else(PoisonError::into_inner);
            observer
                .recursion_misses()
                .and_then(|misses| observer.observe_cgroup(id).map(|()| misses))
        };
        let misses_at_start = match observed {
            Ok(misses) => misses,
            Err(err) => {
                self.remove_route(id);
                return Err(err);
            }
        };
        Ok(StepObservation {
            service: self.clone(),
            id,
            events: rx,
            finished: false,
            misses_at_start,
        })
    }

    /// Asks the router to drain the ring now; returns when it has.
    async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.flush.send(done).await.is_ok() {
            let _ = wait.await;
        }
    }

    fn remove_route(&self, id: CgroupId) {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id.0);
    }

    fn unobserve(self: &Arc<Self>, id: CgroupId) -> Result<u64, ObserveError> {
        let lost = self
            .observer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unobserve_cgroup(id);
        // Once the node stays idle, stop paying for the syscall tracepoints.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let service = Arc::downgrade(self);
            runtime.spawn(async move {
                tokio::time::sleep(DETACH_IDLE).await;
                // Detaching waits for RCU: a blocking thread, not a worker.
                let _ = tokio::task::spawn_blocking(move || {
                    if let Some(service) = service.upgrade() {
                        service
                            .observer
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .detach_syscalls_if_idle();
                    }
                })
                .await;
            });
        }
        lost
    }

    /// Takes (and clears) the kernel's per-file write totals of cgroup `id`, and how many could
    /// not be read.
    fn take_writes(&self, id: CgroupId) -> (Vec<Event>, u64) {
        self.observer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_pending_writes(id)
    }
}

impl StepObservation {
    /// The observed cgroup.
    pub fn cgroup(&self) -> CgroupId {
        self.id
    }

    /// Call after every process of the cgroup is gone: drains the ring until no event of this
    /// cgroup arrives for a quiet period, stops observing, and returns the events and losses.
    pub async fn finish(mut self) -> Result<StepEvents, ObserveError> {
        self.finished = true;
        let mut events = Vec::new();
        let mut quiet_rounds = 0;
        for _ in 0..MAX_FLUSH_ROUNDS {
            self.service.flush().await;
            let before = events.len();
            while let Ok(batch) = self.events.try_recv() {
                events.extend(batch);
            }
            if events.len() == before {
                quiet_rounds += 1;
                if quiet_rounds >= QUIET_ROUNDS {
                    break;
                }
            } else {
                quiet_rounds = 0;
            }
            tokio::task::yield_now().await;
        }
        // Write totals a process's exit did not end (fds from 4096 up, or a process whose BPF
        // state could not be kept) are swept after the ring; unreadable ones are losses.
        let (pending, unreadable) = self.service.take_writes(self.id);
        events.extend(pending);
        // Invocations the kernel skipped while the step ran may have been the step's: counted
        // as its losses (conservative: a skip does not say whose event it was).
        let skipped = self
            .service
            .observer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recursion_misses()
            .map(|now| now.saturating_sub(self.misses_at_start));
        let lost = self.service.unobserve(self.id);
        self.service.remove_route(self.id);
        while let Ok(batch) = self.events.try_recv() {
            events.extend(batch);
        }
        Ok(StepEvents {
            events,
            lost: lost?.saturating_add(skipped?).saturating_add(unreadable),
            cgroup: self.id,
        })
    }
}

impl Drop for StepObservation {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(err) = self.service.unobserve(self.id) {
                tracing::warn!(%err, cgroup = %self.id, "cannot stop observing an abandoned step cgroup");
            }
            let _ = self.service.take_writes(self.id);
            self.service.remove_route(self.id);
        }
    }
}

/// The router: drains the ring (on wakeup, on its poll interval, and on flush requests) and
/// sends each event to the step observing its cgroup.
async fn route(
    mut stream: EventStream,
    routes: Routes,
    mut flush: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut batch = Vec::new();
    let mut unrouted: u64 = 0;
    loop {
        let mut flush_request = None;
        tokio::select! {
            result = stream.next_batch(&mut batch) => {
                if let Err(err) = result {
                    tracing::error!(%err, "observer ring buffer failed; traces from now on are incomplete");
                    return;
                }
            }
            request = flush.recv() => match request {
                Some(done) => flush_request = Some(done),
                None => return,
            },
        }
        if flush_request.is_some() {
            while stream.drain(&mut batch) > 0 {
                dispatch(&routes, &mut batch, &mut unrouted);
            }
        }
        dispatch(&routes, &mut batch, &mut unrouted);
        if let Some(done) = flush_request {
            let _ = done.send(());
        }
    }
}

fn dispatch(routes: &Routes, batch: &mut Vec<Event>, unrouted: &mut u64) {
    if batch.is_empty() {
        return;
    }
    // Split the batch by cgroup, keeping ring order within each (one step running: the whole
    // batch, moved, not copied).
    let first = batch[0].header().cgroup_id;
    let mut by_cgroup: HashMap<u64, Vec<Event>> = HashMap::new();
    if batch.iter().all(|event| event.header().cgroup_id == first) {
        // The next batch is likely as large: room for it now, not by doubling (each doubling
        // copies the batch to fresh pages). A batch waits in its step's channel until the step
        // ends: one much smaller than its room gives the rest back first.
        let next = Vec::with_capacity(batch.len());
        let mut events = std::mem::replace(batch, next);
        if events.capacity() > 2 * events.len() {
            events.shrink_to_fit();
        }
        by_cgroup.insert(first, events);
    } else {
        for event in batch.drain(..) {
            by_cgroup
                .entry(event.header().cgroup_id)
                .or_default()
                .push(event);
        }
    }
    let routes = routes.lock().unwrap_or_else(PoisonError::into_inner);
    for (cgroup_id, events) in by_cgroup {
        let count = events.len() as u64;
        match routes.get(&cgroup_id) {
            Some(tx) if tx.send(events).is_ok() => {}
            _ => {
                // Records of a cgroup whose step already finished (they cannot be a step's own
                // events: a step stops observing only after its cgroup is gone and drained).
                let before = *unrouted;
                *unrouted += count;
                if before.leading_zeros() != unrouted.leading_zeros() {
                    tracing::debug!(unrouted = *unrouted, "observer events without a step");
                }
            }
        }
    }
}
