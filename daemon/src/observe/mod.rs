//! Pipeline observer: loads kiln's BPF programs (`kiln_ebpf`), filters them in the kernel to
//! the cgroups of running steps, and turns the ring buffer into events and process trees.
//!
//! Owns: loading and attaching (aya 0.14, tp_btf only: kprobes, fentry and BPF LSM do not load
//! on the target kernel), the `observed_cgroups` filter, the ring-buffer consumer
//! ([`EventStream`]), lost-event accounting, and trace assembly ([`ProcessTree`]).
//!
//! Lifecycle for a step: [`Observer::observe_cgroup`] with the step's cgroup v2 id BEFORE the
//! worker execs; consume [`EventStream`] (events carry `cgroup_id` to route them); after the
//! last process exited, drain, then [`Observer::unobserve_cgroup`], which returns the events
//! lost for that cgroup. A trace is complete only if that is 0.
//!
//! Requires root (CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN for cgroup ids and bpffs) and kernel
//! BTF. No RLIMIT_MEMLOCK change: memcg accounts BPF memory on 6.x kernels.

pub mod assemble;
mod event;
pub mod materials;
mod service;
mod stream;
mod sys;
pub mod syscalls;
mod tree;

use std::path::PathBuf;
use std::time::Duration;

use aya::maps::{
    Array as BpfArray, HashMap as BpfHashMap, MapData, MapError, MapType, PerCpuArray, RingBuf,
};
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSockAddr, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader};

pub use event::{
    DecodeError, Denied, Event, Exec, Exit, FileOp, Fork, Header, Net, Sock, Write, decode,
};
pub use service::{ObserverService, StepEvents, StepObservation};
pub use stream::EventStream;
pub use sys::{BPFFS, CgroupId, KERNEL_BTF, ensure_bpffs};
pub use tree::{ExitStatus, ProcessNode, ProcessTree};

/// The BPF object's name in errors.
const PROCESS_OBJECT: &str = "observer.bpf.o";
/// Default [`ObserverConfig::sock_cgroup`].
pub const DEFAULT_SOCK_CGROUP: &str = "/sys/fs/cgroup/unified";

/// Tuning of one [`Observer`]. The defaults are the measured ones (DESIGN.md, Observer).
#[derive(Debug, Clone)]
pub struct ObserverConfig {
    /// Ring buffer bytes: a power of two and a multiple of the page size. Default 16 MiB;
    /// 256 KiB rings were measured to drop events under a storm.
    pub ring_bytes: u32,
    /// Unread bytes in the ring that make a submit wake the consumer (capped at a quarter of
    /// the ring). Default 256 KiB.
    pub wakeup_threshold_bytes: u64,
    /// Longest time between forced wakeups while events flow. Default 10 ms.
    pub wakeup_interval: Duration,
    /// The consumer also drains this often without a wakeup (the tail of a burst). Default 25 ms.
    pub poll_interval: Duration,
    /// Mount bpffs at /sys/fs/bpf if it is not there. Default true.
    pub mount_bpffs: bool,
    /// The cgroup v2 directory the socket hooks (connect4/6, sendmsg4/6) attach to, with
    /// bpf_links (alongside any other program there); it must contain every step's cgroup. Default the cgroup2 root,
    /// /sys/fs/cgroup/unified on this host (DESIGN.md).
    pub sock_cgroup: PathBuf,
}

impl Default for ObserverConfig {
    fn default() -> Self {
        Self {
            ring_bytes: 16 << 20,
            wakeup_threshold_bytes: 256 << 10,
            wakeup_interval: Duration::from_millis(10),
            poll_interval: Duration::from_millis(25),
            mount_bpffs: true,
            sock_cgroup: PathBuf::from(DEFAULT_SOCK_CGROUP),
        }
    }
}

/// Errors of the observer.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// kiln-ebpf was built with `KILN_SKIP_BPF=1`.
    #[error(
        "kiln-ebpf was built with KILN_SKIP_BPF=1 and embeds no BPF programs; rebuild it with clang-19 and bpftool installed"
    )]
    NotBuilt,
    /// No kernel BTF: tp_btf programs and CO-RE need CONFIG_DEBUG_INFO_BTF.
    #[error(
        "kernel BTF not found at {path} (the observer needs a kernel built with CONFIG_DEBUG_INFO_BTF)"
    )]
    BtfMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Kernel BTF exists but could not be parsed.
    #[error("parsing kernel BTF at {KERNEL_BTF} failed")]
    BtfParse(#[source] aya::BtfError),
    /// The kernel lacks a program or map type the observer needs.
    #[error("the kernel does not support {kind} (needed for {needed_for})")]
    Unsupported {
        kind: String,
        needed_for: &'static str,
    },
    /// Probing kernel support failed in an unexpected way.
    #[error("probing kernel support for BPF {kind} failed")]
    Probe {
        kind: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A ring size the kernel would refuse.
    #[error(
        "ring buffer size must be a power of two and a multiple of the page size ({page_size} bytes), got {bytes}"
    )]
    InvalidRingSize { bytes: u32, page_size: u64 },
    /// Creating maps or relocating the object failed.
    #[error("loading BPF object {object} failed")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    /// The object lacks a program or map this code expects (object and code out of sync).
    #[error("BPF object {object} has no {what} named {name}")]
    Missing {
        object: &'static str,
        what: &'static str,
        name: &'static str,
    },
    /// The verifier or the kernel refused a program (the source chain has the verifier log).
    #[error("loading BPF program {program} (tp_btf/{tracepoint}) failed")]
    ProgramLoad {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching BPF program {program} to tp_btf/{tracepoint} failed")]
    Attach {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: ProgramError,
    },
    /// A cgroup socket hook did not load or attach.
    #[error("{operation} BPF program {program} (cgroup/{hook}) on {cgroup} failed")]
    SockHook {
        program: &'static str,
        hook: &'static str,
        operation: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },
    /// A loaded program's kernel info (its skip counter) could not be read.
    #[error("reading the kernel's info (recursion_misses) of BPF program {program} failed")]
    ProgramInfo {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A map has an unexpected type or a map operation failed.
    #[error("BPF map {map}: {operation} failed")]
    Map {
        map: &'static str,
        operation: &'static str,
        #[source]
        source: MapError,
    },
    #[error("mounting bpffs at {path} failed")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} is not on a cgroup v2 filesystem (f_type {fs_type:#x})")]
    NotCgroup2 { path: PathBuf, fs_type: u64 },
    #[error("reading cgroup {path} failed")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// [`Observer::load`] was called outside a tokio runtime.
    #[error("the observer must be loaded inside a tokio runtime (its consumer is an AsyncFd)")]
    NoRuntime,
    #[error("registering the ring buffer with the tokio reactor failed")]
    Register {
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for ring buffer readiness failed")]
    Poll {
        #[source]
        source: std::io::Error,
    },
}

/// The loaded and attached observer. Dropping it detaches the programs and frees the maps.
pub struct Observer {
    observed: BpfHashMap<MapData, u64, u64>,
    /// The prefilter bitmap in front of `observed` (`observed_filter`).
    filter: BpfArray<MapData, u64>,
    write_totals: BpfHashMap<MapData, WriteKeyPod, WriteTotalPod>,
    /// `write_totals` entries per cgroup (the BPF side's quota counter).
    write_entries: BpfHashMap<MapData, u64, i64>,
    lost: PerCpuArray<MapData, u64>,
    /// Links of the [`kiln_ebpf::maps::ON_DEMAND`] programs while attached.
    on_demand: Vec<(&'static str, BtfTracePointLinkId)>,
    /// Owns the programs and their links: dropping it detaches them. The kernel keeps the maps
    /// alive for as long as a program references them, so field order does not matter.
    ebpf: Ebpf,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field(
                "observed_cgroups",
                &self.observed.keys().flatten().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// Loads the `process` programs, attaches them, and returns the observer and the consumer
    /// of its ring buffer. Must run inside a tokio runtime. No cgroup is observed yet.
    pub fn load(config: &ObserverConfig) -> Result<(Self, EventStream), ObserveError> {
        if !kiln_ebpf::BPF_BUILT {
            return Err(ObserveError::NotBuilt);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ObserveError::NoRuntime);
        }
        let page_size = sys::page_size();
        if !config.ring_bytes.is_power_of_two()
            || !u64::from(config.ring_bytes).is_multiple_of(page_size)
        {
            return Err(ObserveError::InvalidRingSize {
                bytes: config.ring_bytes,
                page_size,
            });
        }
        sys::require_kernel_btf()?;
        require_ringbuf()?;
        if config.mount_bpffs {
            // Nothing is pinned yet; bpffs is for pinned maps/links later, so a failure here is
            // reported but does not stop observation.
            if let Err(err) = sys::ensure_bpffs() {
                tracing::warn!(%err, "bpffs unavailable; continuing without it");
            }
        }
        let btf = Btf::from_sys_fs().map_err(ObserveError::BtfParse)?;

        let threshold = config
            .wakeup_threshold_bytes
            .min(u64::from(config.ring_bytes) / 4);
        let interval_ns = u64::try_from(config.wakeup_interval.as_nanos()).unwrap_or(u64::MAX);
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            // `procs` (per-process state) is a BPF_MAP_TYPE_TASK_STORAGE, which aya 0.14
            // creates but has no userspace type for (userspace never touches it).
            .allow_unsupported_maps()
            .map_max_entries(kiln_ebpf::maps::EVENTS, config.ring_bytes)
            .override_global(kiln_ebpf::maps::WAKEUP_THRESHOLD, &threshold, true)
            .override_global(kiln_ebpf::maps::WAKEUP_INTERVAL_NS, &interval_ns, true)
            .load(kiln_ebpf::OBSERVER_BPF)
            .map_err(|source| ObserveError::Load {
                object: PROCESS_OBJECT,
                source,
            })?;

        // Maps first: the filter must exist (empty: nothing observed) before programs run.
        let observed =
            BpfHashMap::try_from(take_map(&mut ebpf, kiln_ebpf::maps::OBSERVED_CGROUPS)?).map_err(
                map_err(
                    kiln_ebpf::maps::OBSERVED_CGROUPS,
                    "open as HashMap<u64, u64>",
                ),
            )?;
        let filter =
            BpfArray::try_from(take_map(&mut ebpf, kiln_ebpf::maps::OBSERVED_FILTER)?).map_err(
                map_err(kiln_ebpf::maps::OBSERVED_FILTER, "open as Array<u64>"),
            )?;
        let lost =
            PerCpuArray::try_from(take_map(&mut ebpf, kiln_ebpf::maps::LOST_EVENTS)?).map_err(
                map_err(kiln_ebpf::maps::LOST_EVENTS, "open as PerCpuArray<u64>"),
            )?;
        let write_totals =
            BpfHashMap::try_from(take_map(&mut ebpf, kiln_ebpf::maps::WRITE_TOTALS)?).map_err(
                map_err(
                    kiln_ebpf::maps::WRITE_TOTALS,
                    "open as HashMap<WriteKey, WriteTotal>",
                ),
            )?;
        let write_entries =
            BpfHashMap::try_from(take_map(&mut ebpf, kiln_ebpf::maps::WRITE_ENTRIES)?).map_err(
                map_err(kiln_ebpf::maps::WRITE_ENTRIES, "open as HashMap<u64, i64>"),
            )?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, kiln_ebpf::maps::EVENTS)?)
            .map_err(map_err(kiln_ebpf::maps::EVENTS, "open as RingBuf"))?;
        let stream = EventStream::new(ring, config.poll_interval)?;

        for &(program, tracepoint) in kiln_ebpf::maps::PROGRAMS {
            let prog: &mut BtfTracePoint =
                program_mut(&mut ebpf, program)?
                    .try_into()
                    .map_err(|source| ObserveError::ProgramLoad {
                        program,
                        tracepoint,
                        source,
                    })?;
            prog.load(tracepoint, &btf).map_err(|source| match source {
                // The kernel BTF has no btf_trace_<tracepoint> typedef: no such tracepoint.
                ProgramError::Btf(_) => ObserveError::Unsupported {
                    kind: format!(
                        "tp_btf tracepoint {tracepoint} (no btf_trace_{tracepoint} in kernel BTF)"
                    ),
                    needed_for: program,
                },
                source => ObserveError::ProgramLoad {
                    program,
                    tracepoint,
                    source,
                },
            })?;
            if !kiln_ebpf::maps::ON_DEMAND.contains(&program) {
                prog.attach().map_err(|source| ObserveError::Attach {
                    program,
                    tracepoint,
                    source,
                })?;
            }
        }
        attach_sock_hooks(&mut ebpf, &config.sock_cgroup)?;
        tracing::info!(
            ring_bytes = config.ring_bytes,
            wakeup_threshold_bytes = threshold,
            sock_cgroup = %config.sock_cgroup.display(),
            "observer attached (tp_btf sched_process_exec/fork/exit, sys_exit while a step is observed; cgroup connect4/6, sendmsg4/6)"
        );
        Ok((
            Self {
                observed,
                filter,
                write_totals,
                write_entries,
                lost,
                on_demand: Vec::new(),
                ebpf,
            },
            stream,
        ))
    }

    /// Starts recording every process in cgroup `id` (idempotent; keeps its lost count).
    pub fn observe_cgroup(&mut self, id: CgroupId) -> Result<(), ObserveError> {
        match self.observed.get(&id.0, 0) {
            Ok(_) => {}
            Err(MapError::KeyNotFound) => self
                .observed
                .insert(id.0, 0, 0)
                .map_err(map_err(kiln_ebpf::maps::OBSERVED_CGROUPS, "insert"))?,
            Err(source) => {
                return Err(map_err(kiln_ebpf::maps::OBSERVED_CGROUPS, "lookup")(source));
            }
        }
        // The id first, the prefilter bit next: once the bit is set, the lookup finds the id.
        self.set_filter_bit(id, true)?;
        // Last, the syscall programs, if this is the only observed cgroup: before the caller
        // starts anything in the cgroup.
        if let Err(err) = self.attach_on_demand() {
            let _ = self.unobserve_cgroup(id);
            return Err(err);
        }
        Ok(())
    }

    /// Attaches the [`kiln_ebpf::maps::ON_DEMAND`] programs unless they are attached.
    fn attach_on_demand(&mut self) -> Result<(), ObserveError> {
        if !self.on_demand.is_empty() {
            return Ok(());
        }
        for &program in kiln_ebpf::maps::ON_DEMAND {
            let tracepoint = kiln_ebpf::maps::PROGRAMS
                .iter()
                .find(|(name, _)| *name == program)
                .map_or("?", |(_, tracepoint)| *tracepoint);
            let attached = program_mut(&mut self.ebpf, program).and_then(|prog| {
                let prog: &mut BtfTracePoint =
                    prog.try_into().map_err(|source| ObserveError::Attach {
                        program,
                        tracepoint,
                        source,
                    })?;
                prog.attach().map_err(|source| ObserveError::Attach {
                    program,
                    tracepoint,
                    source,
                })
            });
            match attached {
                Ok(link) => self.on_demand.push((program, link)),
                Err(err) => {
                    self.detach_on_demand();
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Detaches the [`kiln_ebpf::maps::ON_DEMAND`] programs if no cgroup is observed (an idle
    /// node then pays nothing per syscall). Returns whether they are detached.
    pub fn detach_syscalls_if_idle(&mut self) -> bool {
        if self.observed.keys().next().is_some() {
            return false;
        }
        self.detach_on_demand();
        true
    }

    fn detach_on_demand(&mut self) {
        for (program, link) in self.on_demand.drain(..) {
            let detached = self
                .ebpf
                .program_mut(program)
                .and_then(|prog| <&mut BtfTracePoint>::try_from(prog).ok())
                .map(|prog| prog.detach(link));
            if !matches!(detached, Some(Ok(()))) {
                tracing::warn!(program, "detaching an on-demand observer program failed");
            }
        }
    }

    /// Stops recording cgroup `id` and returns how many of its events were lost (0 if it was
    /// not observed). Call after draining the stream.
    pub fn unobserve_cgroup(&mut self, id: CgroupId) -> Result<u64, ObserveError> {
        let lost = self.lost_in_cgroup(id)?.unwrap_or(0);
        match self.observed.remove(&id.0) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(map_err(kiln_ebpf::maps::OBSERVED_CGROUPS, "remove")(source));
            }
        }
        // After the filter entry: the BPF side creates a counter only for observed cgroups.
        // (None there when the cgroup never wrote: the kernel's ENOENT.)
        match self.write_entries.remove(&id.0) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(err))
                if err.io_error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(map_err(kiln_ebpf::maps::WRITE_ENTRIES, "remove")(source));
            }
        }
        // Clear the bit only if no other observed cgroup shares it.
        let bit = filter_bit(id);
        let shared = self
            .observed
            .keys()
            .filter_map(Result::ok)
            .any(|other| filter_bit(CgroupId(other)) == bit);
        if !shared {
            self.set_filter_bit(id, false)?;
        }
        Ok(lost)
    }

    fn set_filter_bit(&mut self, id: CgroupId, set: bool) -> Result<(), ObserveError> {
        let (word, mask) = filter_bit(id);
        let map = kiln_ebpf::maps::OBSERVED_FILTER;
        let bits = self.filter.get(&word, 0).map_err(map_err(map, "lookup"))?;
        let bits = if set { bits | mask } else { bits & !mask };
        self.filter
            .set(word, bits, 0)
            .map_err(map_err(map, "update"))
    }

    /// Events lost so far for cgroup `id`, or `None` if it is not observed.
    pub fn lost_in_cgroup(&self, id: CgroupId) -> Result<Option<u64>, ObserveError> {
        match self.observed.get(&id.0, 0) {
            Ok(lost) => Ok(Some(lost)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_err(kiln_ebpf::maps::OBSERVED_CGROUPS, "lookup")(source)),
        }
    }

    /// Takes the kernel's per-file write totals of cgroup `id` that neither a close nor its
    /// process's exit emitted (the exit program ends fds below 4096, up to the highest one the
    /// process's state recorded), as events, each naming its file as it was at the first write;
    /// and how many totals could not be read (each one a write record lost).
    ///
    /// Also drops the totals and entry counters of cgroups no longer observed: what a program
    /// already past the cgroup filter added while a step was abandoned (dropped mid-run) would
    /// otherwise hold map space for as long as kilnd runs.
    pub fn take_pending_writes(&mut self, id: CgroupId) -> (Vec<Event>, u64) {
        let now = sys::monotonic_ns();
        let mut unreadable = 0u64;
        let mut keys = Vec::new();
        let mut stale = Vec::new();
        // Listed once, not looked up per key: the map holds every running step's totals.
        let observed: std::collections::HashSet<u64> =
            self.observed.keys().filter_map(Result::ok).collect();
        for key in self.write_totals.keys() {
            match key {
                Ok(key) if key.0.cgroup_id == id.0 => keys.push(key),
                Ok(key) if !observed.contains(&key.0.cgroup_id) => stale.push(key),
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(%err, cgroup = %id, "cannot list the pending write totals");
                    unreadable += 1;
                }
            }
        }
        let mut events = Vec::with_capacity(keys.len());
        for key in keys {
            match self.write_totals.get(&key, 0) {
                Ok(total) => events.push(Event::Write(Write::from_kernel(
                    Header {
                        ktime_ns: now,
                        cgroup_id: id.0,
                        pid: key.0.tgid,
                        tgid: key.0.tgid,
                    },
                    key.0.fd,
                    (total.0.bytes, total.0.writes),
                    total.0.path(),
                    total.0.wflags,
                ))),
                // Ended by its process meanwhile (emitted to the ring, not lost).
                Err(MapError::KeyNotFound) => {}
                Err(err) => {
                    tracing::warn!(%err, cgroup = %id, fd = key.0.fd, "cannot read a pending write total");
                    unreadable += 1;
                }
            }
            let _ = self.write_totals.remove(&key);
        }
        let stale_counters: Vec<u64> = self
            .write_entries
            .keys()
            .filter_map(Result::ok)
            .filter(|cgroup| *cgroup != id.0 && !observed.contains(cgroup))
            .collect();
        if !stale.is_empty() || !stale_counters.is_empty() {
            tracing::debug!(
                totals = stale.len(),
                counters = stale_counters.len(),
                "dropping write totals of cgroups no longer observed"
            );
        }
        for key in stale {
            let _ = self.write_totals.remove(&key);
        }
        for cgroup in stale_counters {
            let _ = self.write_entries.remove(&cgroup);
        }
        (events, unreadable)
    }

    /// Invocations the kernel skipped, all programs together, since load: a program already
    /// running on a CPU is not entered again there (`recursion_misses`). Each skip is an event
    /// no record holds, of any cgroup. Programs whose count cannot be read are errors.
    pub fn recursion_misses(&self) -> Result<u64, ObserveError> {
        let mut total = 0u64;
        for (name, program) in self.ebpf.programs() {
            let misses = program
                .fd()
                .map_err(std::io::Error::other)
                .and_then(|fd| sys::prog_recursion_misses(std::os::fd::AsFd::as_fd(fd)))
                .map_err(|source| ObserveError::ProgramInfo {
                    program: name.to_owned(),
                    source,
                })?;
            total = total.saturating_add(misses);
        }
        Ok(total)
    }

    /// Events lost since load, all cgroups, summed over the per-CPU counters.
    pub fn lost(&self) -> Result<u64, ObserveError> {
        let per_cpu = self
            .lost
            .get(&0, 0)
            .map_err(map_err(kiln_ebpf::maps::LOST_EVENTS, "lookup"))?;
        Ok(per_cpu.iter().sum())
    }
}

/// The word and bit of cgroup `id` in the `observed_filter` prefilter (as common.bpf.h).
fn filter_bit(id: CgroupId) -> (u32, u64) {
    let words = kiln_ebpf::maps::FILTER_BITS / 64;
    let word = u32::try_from((id.0 / 64) % words).unwrap_or(0);
    (word, 1 << (id.0 % 64))
}

/// [`kiln_ebpf::WriteKey`] as a map key (aya's `Pod`).
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
struct WriteKeyPod(kiln_ebpf::WriteKey);
/// [`kiln_ebpf::WriteTotal`] as a map value (aya's `Pod`).
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
struct WriteTotalPod(kiln_ebpf::WriteTotal);

// SAFETY: repr(transparent) over repr(C) structs of integers without padding (kiln-ebpf's
// layout test): every bit pattern is valid and every byte is initialized.
unsafe impl aya::Pod for WriteKeyPod {}
// SAFETY: as above.
unsafe impl aya::Pod for WriteTotalPod {}

/// A clear error before loading when the kernel has no ring buffers. (Tracing support is not
/// probed here: aya's probe loads an fentry program, which fails on kernels without fentry
/// even though tp_btf works; a missing tp_btf shows up as [`ObserveError::Unsupported`] or
/// [`ObserveError::ProgramLoad`] with the verifier log instead.)
fn require_ringbuf() -> Result<(), ObserveError> {
    let supported =
        aya::sys::is_map_supported(MapType::RingBuf).map_err(|source| ObserveError::Probe {
            kind: "map type ringbuf",
            source: Box::new(source),
        })?;
    if supported {
        Ok(())
    } else {
        Err(ObserveError::Unsupported {
            kind: "map type ringbuf".to_owned(),
            needed_for: "the event transport (Linux >= 5.8)",
        })
    }
}

/// Loads the cgroup socket-address programs and attaches them, as bpf_links, to `cgroup` (a
/// cgroup v2 directory containing the steps' cgroups) alongside whatever else is attached there.
fn attach_sock_hooks(ebpf: &mut Ebpf, cgroup: &std::path::Path) -> Result<(), ObserveError> {
    let dir = std::fs::File::open(cgroup).map_err(|source| ObserveError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    for &(program, hook) in kiln_ebpf::maps::SOCK_PROGRAMS {
        let err = |operation: &'static str| {
            move |source| ObserveError::SockHook {
                program,
                hook,
                operation,
                cgroup: cgroup.to_owned(),
                source: Box::new(source),
            }
        };
        let prog: &mut CgroupSockAddr = program_mut(ebpf, program)?
            .try_into()
            .map_err(err("loading"))?;
        prog.load().map_err(err("loading"))?;
        // A bpf_link (kernel >= 5.7) is always attached alongside the cgroup's other programs
        // and takes no flags: BPF_F_ALLOW_MULTI there is EINVAL, so the mode is "single" here.
        prog.attach(&dir, CgroupAttachMode::Single)
            .map_err(err("attaching"))?;
    }
    Ok(())
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ObserveError> {
    ebpf.take_map(name).ok_or(ObserveError::Missing {
        object: PROCESS_OBJECT,
        what: "map",
        name,
    })
}

fn program_mut<'e>(
    ebpf: &'e mut Ebpf,
    name: &'static str,
) -> Result<&'e mut aya::programs::Program, ObserveError> {
    ebpf.program_mut(name).ok_or(ObserveError::Missing {
        object: PROCESS_OBJECT,
        what: "program",
        name,
    })
}

fn map_err(map: &'static str, operation: &'static str) -> impl FnOnce(MapError) -> ObserveError {
    move |source| ObserveError::Map {
        map,
        operation,
        source,
    }
}
