//! Runtime traces: the NDJSON records of a step's trace (docs/trace.md), the in-toto
//! runtime-trace v0.1 predicate kiln signs for it, and the offline check behind
//! `kiln verify --require-complete-trace`.
//!
//! Owns the trace *format* on both sides of the trust boundary: kilnd writes these records and
//! predicates (daemon/src/observe), `kiln trace` reads the records and `kiln verify` checks the
//! predicates. Nothing here touches the kernel.
//!
//! Binding: a step's SLSA provenance lists the trace envelope as the byproduct named
//! [`TRACE_BYPRODUCT`] (digest = sha256 of the envelope's exact JSON bytes); the trace
//! predicate's [`TraceSeal::trace`] names the compressed NDJSON blob by its sha256. The job
//! statement signs the provenance envelope, so the chain job → step → trace → blob is signed at
//! every link.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::dsse::{DsseError, Envelope, envelope_digest};
use crate::intoto::{DigestSet, ResourceDescriptor, SLSA_PROVENANCE_V1, Statement, StepStatement};
use crate::keys::PublicKey;
use crate::verify::{Bundle, VerifyError};

/// Predicate type of the in-toto runtime-trace predicate, version 0.1.
pub const RUNTIME_TRACE_V01: &str = "https://in-toto.io/attestation/runtime-trace/v0.1";
/// `monitor.type`: kiln's eBPF observer.
pub const KILN_MONITOR_TYPE: &str = "urn:kiln:monitor:ebpf:v1";
/// `monitoredProcess.type`: a kiln pipeline step (same URI as the provenance's buildType).
pub const MONITORED_PROCESS_TYPE: &str = crate::intoto::KILN_STEP_BUILD_TYPE;
/// `schema` of the trace header record.
pub const TRACE_SCHEMA: &str = "urn:kiln:trace:v1";
/// Media type of a stored trace blob: zstd-compressed NDJSON of [`TraceRecord`]s.
pub const TRACE_BLOB_MEDIA_TYPE: &str = "application/vnd.kiln.trace.v1+ndjson+zstd";
/// Media type of the decompressed stream the API serves.
pub const TRACE_NDJSON_MEDIA_TYPE: &str = "application/x-ndjson";
/// `runDetails.byproducts[].name` of the trace envelope in a step's provenance.
pub const TRACE_BYPRODUCT: &str = "runtime-trace";
/// Media type of a DSSE envelope byproduct.
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// What replaces a secret inside a captured argument.
pub const REDACTED: &str = "[REDACTED]";

/// One line of a trace's NDJSON. Times (`t`, `*Ns`) are CLOCK_MONOTONIC nanoseconds of the
/// node; paths and arguments are UTF-8 (other bytes replaced by U+FFFD).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum TraceRecord {
    /// First line.
    Header(TraceHeader),
    /// A successful execve.
    Exec(ExecRecord),
    /// A new process.
    Fork(ForkRecord),
    /// A process ended.
    Exit(ExitRecord),
    /// A path-based file operation (open, rename, unlink, mkdir, link, chmod, chown, truncate,
    /// chdir), with its result.
    File(FileRecord),
    /// Bytes written to one open file, aggregated in the kernel until close or step end.
    Write(WriteRecord),
    /// A socket operation (connect, bind, sendto) with its address and result.
    Net(NetRecord),
    /// A syscall that returned EPERM (the seccomp profile's errno, or a permission check).
    Denied(DeniedRecord),
    /// A connect or UDP send destination, seen by a cgroup socket hook before routing.
    Sock(SockRecord),
    /// Derived: one process of the assembled tree, in depth-first order.
    Process(ProcessRecord),
    /// Last line.
    Summary(TraceSummary),
}

/// The trace's first record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceHeader {
    /// [`TRACE_SCHEMA`].
    pub schema: String,
    /// Job id.
    pub job_id: String,
    /// Step name.
    pub step: String,
    /// cgroup v2 id the observer filtered on.
    pub cgroup_id: u64,
    /// Argument values replaced by [`REDACTED`] (how many secrets were declared, not which).
    pub secrets_declared: usize,
}

/// A successful execve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecRecord {
    /// When.
    pub t: u64,
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Path as passed to execve.
    pub filename: String,
    /// The executable, resolved (symlinks followed) from the task's root.
    pub exe: String,
    /// Working directory.
    pub cwd: String,
    /// Arguments as captured (secrets redacted; cut at the capture limit).
    pub argv: Vec<String>,
    /// Number of arguments (also the ones not captured).
    pub argc: u32,
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Which fields were cut: `filename`, `argv`, `argv-fault`, `exe`, `cwd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub truncated: Vec<String>,
    /// `exe` is the name of a file in no directory (`memfd:NAME`), not a path: code that was
    /// never a file of the tree (fileless execution), so it cannot be a material.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exe_pseudo: bool,
    /// The program is a script that is a file in no directory (an fexecve of a memfd script:
    /// `exe` is its interpreter, `filename` `/dev/fd/N`): fileless too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub script_pseudo: bool,
}

/// A new process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForkRecord {
    /// When.
    pub t: u64,
    /// Parent process.
    pub parent: u32,
    /// New process.
    pub child: u32,
}

/// A process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    /// When.
    pub t: u64,
    /// Process id.
    pub pid: u32,
    /// Exit code (meaningful when `signal == 0`).
    pub code: u32,
    /// Terminating signal, 0 for a normal exit.
    pub signal: u32,
}

/// A path-based file operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileRecord {
    /// When the syscall returned.
    pub t: u64,
    /// Process id.
    pub pid: u32,
    /// `open`, `rename`, `unlink`, `rmdir`, `mkdir`, `link`, `symlink`, `chmod`, `chown`,
    /// `truncate`, `chdir`.
    pub op: String,
    /// The syscall's name (`openat`, `renameat2`, …).
    pub syscall: String,
    /// Absolute path: the argument resolved against the cwd or dirfd (lexically), or, for a
    /// successful open, the opened file's real path (symlinks followed).
    pub path: String,
    /// The path argument exactly as passed.
    pub arg: String,
    /// Second path (rename/link destination, or the symlink's own path), resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path2: Option<String>,
    /// open flags (O_*), when the operation has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<u32>,
    /// `read`, `write`, `read-write` or `path` for opens: for an open that succeeded, the
    /// access mode the kernel opened the file with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
    /// Return value: >= 0 success (an fd for opens), < 0 is -errno.
    pub result: i64,
    /// The process shared its memory, cwd or (with a dirfd) fd table with another task during
    /// the syscall, or a path argument lay in a shared mapping, so another task could have
    /// rewritten the path arguments after the kernel read them:
    /// `arg`, `path2` and, except for an open's real path, `path` are then the process's word,
    /// not the kernel's (docs/trace.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub args_shared: bool,
    /// `path` is the name of a file in no directory (`pipe:[INODE]`, `memfd:NAME`), not a path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub path_pseudo: bool,
}

/// Bytes written to one file descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteRecord {
    /// When (close, or the end of the step).
    pub t: u64,
    /// Process id.
    pub pid: u32,
    /// File descriptor.
    pub fd: i32,
    /// The file, when the open that returned `fd` is in the trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Bytes written.
    pub bytes: u64,
    /// Successful write calls.
    pub writes: u64,
    /// `path` is the name of a file in no directory (`pipe:[INODE]`, `socket:[INODE]`,
    /// `memfd:NAME`), not a path: not counted among the files written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub path_pseudo: bool,
    /// Some of the writes were Linux AIO requests, read back from user memory another task
    /// could have rewritten: `fd` and `bytes` are then the process's word (docs/trace.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub args_shared: bool,
}

/// A socket operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetRecord {
    /// When the syscall returned.
    pub t: u64,
    /// Process id.
    pub pid: u32,
    /// `connect`, `bind`, `sendto`, `listen` (with the socket's local address).
    pub op: String,
    /// `inet`, `inet6`, `unix`, or `af-<n>` (`af-0`: a failed listen, whose fd may not be a
    /// socket, has no address).
    pub family: String,
    /// IP address (inet/inet6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Port (inet/inet6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Socket path (unix; abstract names start with `@`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 0 success, < 0 -errno (steps run in an empty network namespace: -ENETUNREACH is usual).
    pub result: i64,
}

/// A syscall that returned -EPERM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeniedRecord {
    /// When.
    pub t: u64,
    /// Process id.
    pub pid: u32,
    /// x86_64 syscall number.
    pub nr: u32,
    /// Its name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscall: Option<String>,
    /// The (negative) errno returned.
    pub result: i64,
}

/// A connect (TCP or UDP) or an unconnected UDP send, seen by the cgroup socket hooks
/// (`cgroup/connect4`, `connect6`, `sendmsg4`, `sendmsg6`) before the kernel routes it: the
/// destination asked for, whatever the outcome (the matching `net` record, when the syscall is a
/// connect or sendto, has the result).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SockRecord {
    /// When.
    pub t: u64,
    /// Process id.
    pub pid: u32,
    /// `connect4`, `connect6`, `sendmsg4`, `sendmsg6`.
    pub hook: String,
    /// Destination address.
    pub ip: String,
    /// Destination port.
    pub port: u16,
    /// `tcp`, `udp`, or `ipproto-<n>`.
    pub protocol: String,
}

/// One process of the assembled tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    /// Depth in the tree (0 = a root).
    pub depth: u32,
    /// Process id.
    pub pid: u32,
    /// Parent process id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppid: Option<u32>,
    /// The last program it ran (resolved path); `None` for a fork that never exec'd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Its arguments (redacted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// How many programs it ran.
    pub execs: u32,
    /// Exit code, when its exit was observed and it was not killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u32>,
    /// Terminating signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<u32>,
    /// From fork (or first event) to exit, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

/// Event counts of a trace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventCounts {
    /// exec records.
    pub exec: u64,
    /// fork records.
    pub fork: u64,
    /// exit records.
    pub exit: u64,
    /// file records.
    pub file: u64,
    /// write summaries.
    pub write: u64,
    /// net records.
    pub net: u64,
    /// denied records.
    pub denied: u64,
    /// sock records (cgroup socket hooks).
    #[serde(default)]
    pub sock: u64,
}

impl EventCounts {
    /// All kernel events together.
    pub fn total(&self) -> u64 {
        self.exec
            + self.fork
            + self.exit
            + self.file
            + self.write
            + self.net
            + self.denied
            + self.sock
    }

    /// Counts `record` (derived records and header/summary do not count).
    pub fn count(&mut self, record: &TraceRecord) {
        match record {
            TraceRecord::Exec(_) => self.exec += 1,
            TraceRecord::Fork(_) => self.fork += 1,
            TraceRecord::Exit(_) => self.exit += 1,
            TraceRecord::File(_) => self.file += 1,
            TraceRecord::Write(_) => self.write += 1,
            TraceRecord::Net(_) => self.net += 1,
            TraceRecord::Denied(_) => self.denied += 1,
            TraceRecord::Sock(_) => self.sock += 1,
            TraceRecord::Header(_) | TraceRecord::Process(_) | TraceRecord::Summary(_) => {}
        }
    }
}

/// Why a trace is (in)complete, and how much of it there is: the trace's last record, and
/// (as [`TraceSeal`]) part of the signed predicate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceSummary {
    /// Kernel events in the trace, by kind.
    pub events: EventCounts,
    /// Events the kernel could not deliver for this step (ring full, per-task table full).
    pub lost: u64,
    /// The observer filtered on the step's cgroup before the step's helper was started, so
    /// the step's first instruction was already observed.
    pub attached_before_start: bool,
    /// Observation ended only after the step's cgroup was verified empty and removed.
    pub until_last_exit: bool,
    /// `lost == 0 && attached_before_start && until_last_exit`.
    pub complete: bool,
    /// Distinct files opened for reading only.
    pub files_read: u64,
    /// Distinct files opened for writing or created, renamed, unlinked.
    pub files_written: u64,
    /// Socket operations (attempts included): `net` and `sock` records.
    pub connections: u64,
    /// Records of kiln's own sandbox setup left out of the trace: every file, write, net, sock
    /// and denied record of a process that is not the step's (the helper and the worker before
    /// the step's first execve, and the helper after it). Their paths are host paths
    /// (docs/trace.md).
    #[serde(default)]
    pub setup_events_omitted: u64,
    /// Environment files the step executed or opened for reading (outside `/workspace`,
    /// `/tmp`, `/proc`, `/sys`, `/dev` and the secrets mount), with their sha256 hashed by kilnd
    /// after the step from the host path bound at the same place (docs/trace.md for the caps).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub materials: Vec<Material>,
    /// Material candidates not listed: over the count cap, or too large, unreadable or not a
    /// regular file (see [`Material`]); `materials` is then not the whole set.
    #[serde(default)]
    pub materials_omitted: u64,
    /// Programs executed from a file in no directory (a memfd: `fexecve`), binaries and scripts:
    /// code that was never a file of the tree, so no material describes it.
    #[serde(default, skip_serializing_if = "crate::intoto::is_zero")]
    pub fileless_execs: u64,
}

/// An environment file a step used, with its content digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Material {
    /// Absolute path (the same in the sandbox and on the host).
    pub path: String,
    /// sha256 of the content, hex.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// `exec` (run as a program or interpreter) and/or `read` (opened for reading).
    pub used_as: Vec<String>,
}

impl TraceSummary {
    /// The completeness rule.
    pub fn is_complete(&self) -> bool {
        self.lost == 0 && self.attached_before_start && self.until_last_exit
    }

    /// Why the trace is incomplete (empty when complete).
    pub fn incomplete_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.lost > 0 {
            reasons.push(format!("{} events lost", self.lost));
        }
        if !self.attached_before_start {
            reasons.push("observer attached after the step started".into());
        }
        if !self.until_last_exit {
            reasons.push("observation ended before the step's last process was gone".into());
        }
        if self.complete && !reasons.is_empty() {
            reasons.push("the trace claims complete = true against its own counts".into());
        }
        reasons
    }
}

/// The runtime-trace v0.1 predicate, extended (as the spec allows) with `kilnTrace`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeTracePredicate {
    /// The monitor.
    pub monitor: Monitor,
    /// The step observed.
    pub monitored_process: MonitoredProcess,
    /// What was seen (bounded summaries; the full trace is the blob in `kilnTrace.trace`).
    pub monitor_log: MonitorLog,
    /// Start and end of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TraceMetadata>,
    /// kiln's extension: the full trace's digest, counts, losses and completeness.
    pub kiln_trace: TraceSeal,
}

/// `monitor`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Monitor {
    /// [`KILN_MONITOR_TYPE`].
    #[serde(rename = "type")]
    pub monitor_type: String,
    /// What the observer records (program families, limits).
    #[serde(default)]
    pub trace_policy: serde_json::Value,
}

/// `monitoredProcess`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitoredProcess {
    /// The node's builder id (`urn:kiln:node:<keyid hex>`).
    #[serde(rename = "hostID")]
    pub host_id: String,
    /// [`MONITORED_PROCESS_TYPE`].
    #[serde(rename = "type")]
    pub process_type: String,
    /// `<job id>/<step>`: the provenance's `invocationId`.
    pub event: String,
}

/// `monitorLog`: bounded summaries (see [`TraceSeal::summary_truncated`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitorLog {
    /// Processes: `{pid, ppid, processBinary, arguments, exitCode, signal}`.
    #[serde(default)]
    pub process: Vec<serde_json::Value>,
    /// Socket operations: `{ip, port, protocol, path, op, result, invokingProcess: {pid}}`.
    #[serde(default)]
    pub network: Vec<serde_json::Value>,
    /// Files written, created, renamed or removed, then files read (ResourceDescriptors with
    /// `annotations.access`).
    #[serde(default)]
    pub file_access: Vec<serde_json::Value>,
}

/// `metadata`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceMetadata {
    /// RFC 3339.
    pub build_started_on: String,
    /// RFC 3339.
    pub build_finished_on: String,
}

/// `kilnTrace`: the evidence that makes the summary trustworthy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceSeal {
    /// The full trace blob (zstd NDJSON): `digest.sha256`, `mediaType`.
    pub trace: ResourceDescriptor,
    /// Counts, losses, completeness.
    #[serde(flatten)]
    pub summary: TraceSummary,
    /// `monitorLog` lists were cut to their caps (the blob has everything).
    #[serde(default)]
    pub summary_truncated: bool,
}

/// A trace statement.
pub type TraceStatement = Statement<RuntimeTracePredicate>;

/// Replaces every occurrence of each non-empty secret in `arg` by [`REDACTED`]: of the secret as
/// declared, and of the secret without its trailing line ending (a secret file usually ends in
/// one, and `$(cat FILE)` strips it). The places of all secrets are found in `arg` first and
/// merged, then replaced once, so overlapping secrets leave no part of either. A string that
/// ends in the first 4 or more bytes of a secret has that tail redacted too: captured strings
/// are cut at their limits (argv 1024 bytes, paths 256/512), possibly inside a secret.
pub fn redact(arg: &str, secrets: &[String]) -> String {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for secret in secrets {
        let bare = secret.trim_end_matches(['\r', '\n']);
        for needle in [secret.as_str(), bare] {
            if needle.is_empty() {
                continue;
            }
            let mut from = 0;
            while let Some(at) = arg.get(from..).and_then(|rest| rest.find(needle)) {
                let start = from + at;
                spans.push((start, start + needle.len()));
                // The next char, not the match's end: overlapping matches of one secret too.
                from = start + arg[start..].chars().next().map_or(1, char::len_utf8);
            }
            if let Some(k) = (4..needle.len())
                .rev()
                .find(|&k| needle.get(..k).is_some_and(|head| arg.ends_with(head)))
            {
                spans.push((arg.len() - k, arg.len()));
            }
        }
    }
    if spans.is_empty() {
        return arg.to_owned();
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(arg.len());
    let mut copied = 0;
    let mut spans = spans.into_iter().peekable();
    while let Some((start, mut end)) = spans.next() {
        while let Some(&(next_start, next_end)) = spans.peek() {
            if next_start > end {
                break;
            }
            end = end.max(next_end);
            spans.next();
        }
        out.push_str(&arg[copied..start]);
        out.push_str(REDACTED);
        copied = end;
    }
    out.push_str(&arg[copied..]);
    out
}

/// What `kiln verify --require-complete-trace` established for one step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceVerdict {
    /// Step name.
    pub step: String,
    /// sha256 of the trace blob.
    pub trace_digest: Digest,
    /// Kernel events.
    pub events: u64,
    /// Lost events (0).
    pub lost: u64,
}

/// Why a chain's traces do not prove a complete observation.
#[derive(Debug, thiserror::Error)]
pub enum TraceVerifyError {
    /// The step's provenance envelope does not verify or decode, or is not SLSA provenance
    /// (the same checks, and errors, as [`crate::verify`]'s).
    #[error(transparent)]
    Step(#[from] VerifyError),
    /// The step is missing from the bundle.
    #[error("step {step:?} has no attestation in the bundle")]
    StepMissing {
        /// Step.
        step: String,
    },
    /// The step's provenance says it ran without the observer.
    #[error("step {step:?} ran unobserved (its provenance says observed: false)")]
    Unobserved {
        /// Step.
        step: String,
    },
    /// The provenance lists no runtime-trace byproduct.
    #[error("step {step:?} provenance lists no {TRACE_BYPRODUCT:?} byproduct")]
    NoTraceByproduct {
        /// Step.
        step: String,
    },
    /// The bundle lacks the trace envelope the provenance names.
    #[error("step {step:?} provenance names trace envelope {expected} but the bundle has none")]
    TraceMissing {
        /// Step.
        step: String,
        /// Digest the provenance lists.
        expected: Digest,
    },
    /// The bundle's trace envelope is not the one the provenance names.
    #[error(
        "step {step:?} trace envelope has {found} but its provenance names {expected}: the trace was replaced"
    )]
    TraceMismatch {
        /// Step.
        step: String,
        /// Digest the provenance lists.
        expected: Digest,
        /// Digest of the bundle's envelope.
        found: Digest,
    },
    /// The trace envelope's signature or payload is bad.
    #[error("step {step:?} trace attestation: {source}")]
    TraceEnvelope {
        /// Step.
        step: String,
        /// Cause.
        #[source]
        source: DsseError,
    },
    /// The trace statement carries another predicate.
    #[error("step {step:?} trace predicate type must be {RUNTIME_TRACE_V01:?}, got {found:?}")]
    PredicateType {
        /// Step.
        step: String,
        /// Found.
        found: String,
    },
    /// The trace is about another step or job.
    #[error("step {step:?} trace is for {found:?}, expected {expected:?}")]
    WrongStep {
        /// Step.
        step: String,
        /// Expected `monitoredProcess.event`.
        expected: String,
        /// Found.
        found: String,
    },
    /// The trace is incomplete.
    #[error("step {step:?} trace is incomplete: {}", .reasons.join("; "))]
    Incomplete {
        /// Step.
        step: String,
        /// Why.
        reasons: Vec<String>,
    },
}

/// Checks that each step of `chain` (as [`crate::verify::verify_artifact`] returned it, after it
/// succeeded) has a signed, complete runtime trace bound to its provenance.
pub fn verify_complete_traces(
    bundle: &Bundle,
    trusted: &[PublicKey],
    chain: &[String],
) -> Result<Vec<TraceVerdict>, TraceVerifyError> {
    chain
        .iter()
        .map(|step| verify_step_trace(bundle, trusted, step))
        .collect()
}

fn verify_step_trace(
    bundle: &Bundle,
    trusted: &[PublicKey],
    step: &str,
) -> Result<TraceVerdict, TraceVerifyError> {
    let step_err = |source| VerifyError::StepEnvelope {
        step: step.to_owned(),
        source,
    };
    let envelope = bundle
        .steps
        .get(step)
        .ok_or_else(|| TraceVerifyError::StepMissing {
            step: step.to_owned(),
        })?;
    let provenance: StepStatement = envelope
        .verify(trusted)
        .map_err(step_err)?
        .decode_statement()
        .map_err(step_err)?;
    if provenance.predicate_type != SLSA_PROVENANCE_V1 {
        return Err(VerifyError::StepPredicateType {
            step: step.to_owned(),
            found: provenance.predicate_type,
        }
        .into());
    }
    let byproduct = provenance
        .predicate
        .run_details
        .byproducts
        .iter()
        .find(|b| b.name.as_deref() == Some(TRACE_BYPRODUCT));
    let Some(expected) = byproduct.and_then(|b| crate::intoto::sha256_of(&b.digest)) else {
        if !provenance
            .predicate
            .build_definition
            .internal_parameters
            .observed
        {
            return Err(TraceVerifyError::Unobserved {
                step: step.to_owned(),
            });
        }
        return Err(TraceVerifyError::NoTraceByproduct {
            step: step.to_owned(),
        });
    };
    let trace_envelope: &Envelope =
        bundle
            .traces
            .get(step)
            .ok_or_else(|| TraceVerifyError::TraceMissing {
                step: step.to_owned(),
                expected,
            })?;
    let found = envelope_digest(trace_envelope);
    if found != expected {
        return Err(TraceVerifyError::TraceMismatch {
            step: step.to_owned(),
            expected,
            found,
        });
    }
    let trace_err = |source| TraceVerifyError::TraceEnvelope {
        step: step.to_owned(),
        source,
    };
    let statement: TraceStatement = trace_envelope
        .verify(trusted)
        .map_err(trace_err)?
        .decode_statement()
        .map_err(trace_err)?;
    if statement.predicate_type != RUNTIME_TRACE_V01 {
        return Err(TraceVerifyError::PredicateType {
            step: step.to_owned(),
            found: statement.predicate_type,
        });
    }
    let invocation = &provenance.predicate.run_details.metadata.invocation_id;
    if statement.predicate.monitored_process.event != *invocation {
        return Err(TraceVerifyError::WrongStep {
            step: step.to_owned(),
            expected: invocation.clone(),
            found: statement.predicate.monitored_process.event,
        });
    }
    let seal = &statement.predicate.kiln_trace;
    let mut reasons = seal.summary.incomplete_reasons();
    if !seal.summary.complete && reasons.is_empty() {
        reasons.push("the trace says complete = false".into());
    }
    let trace_digest = crate::intoto::sha256_of(&seal.trace.digest);
    if trace_digest.is_none() {
        reasons.push("the trace blob has no sha256 digest".into());
    }
    match trace_digest {
        Some(trace_digest) if reasons.is_empty() => Ok(TraceVerdict {
            step: step.to_owned(),
            trace_digest,
            events: seal.summary.events.total(),
            lost: seal.summary.lost,
        }),
        _ => Err(TraceVerifyError::Incomplete {
            step: step.to_owned(),
            reasons,
        }),
    }
}

/// A `ResourceDescriptor` for the trace blob.
pub fn blob_descriptor(name: &str, digest: &Digest) -> ResourceDescriptor {
    ResourceDescriptor {
        name: Some(name.to_owned()),
        uri: None,
        digest: crate::intoto::digest_set(digest),
        media_type: Some(TRACE_BLOB_MEDIA_TYPE.into()),
    }
}

/// A `ResourceDescriptor` for a DSSE envelope byproduct.
pub fn envelope_descriptor(name: &str, digest: &Digest) -> ResourceDescriptor {
    ResourceDescriptor {
        name: Some(name.to_owned()),
        uri: None,
        digest: crate::intoto::digest_set(digest),
        media_type: Some(DSSE_MEDIA_TYPE.into()),
    }
}

/// An empty `DigestSet` (a file access whose content was not hashed).
pub fn no_digest() -> DigestSet {
    BTreeMap::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_every_occurrence() {
        let secrets = vec!["s3cr3t".to_owned(), String::new()];
        assert_eq!(
            redact("--token=s3cr3t,s3cr3t", &secrets),
            "--token=[REDACTED],[REDACTED]"
        );
        assert_eq!(redact("plain", &secrets), "plain");
    }

    #[test]
    fn redaction_matches_a_secret_without_its_line_ending_and_overlapping_secrets() {
        // A secret file written by `echo`, its value used through `$(cat …)`.
        let secrets = vec!["tok3n\n".to_owned()];
        assert_eq!(redact("X-Auth: tok3n", &secrets), "X-Auth: [REDACTED]");
        assert_eq!(redact("a tok3n\n b", &secrets), "a [REDACTED] b");
        // Two secrets sharing bytes: neither leaves a piece.
        let secrets = vec!["ab12".to_owned(), "12345".to_owned()];
        assert_eq!(redact("x-ab12345-y", &secrets), "x-[REDACTED]-y");
        // Overlapping occurrences of one secret, and multi-byte text around them.
        let secrets = vec!["aa".to_owned()];
        assert_eq!(redact("é-aaa-é", &secrets), "é-[REDACTED]-é");
        // A string cut inside a secret (argv at its capture limit).
        let secrets = vec!["s3cr3t-value".to_owned()];
        assert_eq!(redact("--token=s3cr3t-v", &secrets), "--token=[REDACTED]");
        assert_eq!(
            redact("--token=s3c", &secrets),
            "--token=s3c",
            "3 bytes say nothing"
        );
    }

    #[test]
    fn completeness_rule() {
        let mut s = TraceSummary {
            attached_before_start: true,
            until_last_exit: true,
            ..TraceSummary::default()
        };
        assert!(s.is_complete());
        s.lost = 3;
        assert!(!s.is_complete());
        s.complete = true;
        assert_eq!(
            s.incomplete_reasons(),
            [
                "3 events lost",
                "the trace claims complete = true against its own counts"
            ]
        );
    }

    #[test]
    fn records_are_tagged_ndjson() {
        let rec = TraceRecord::Exit(ExitRecord {
            t: 5,
            pid: 7,
            code: 1,
            signal: 0,
        });
        let line = serde_json::to_string(&rec).unwrap();
        assert_eq!(line, r#"{"type":"exit","t":5,"pid":7,"code":1,"signal":0}"#);
        assert_eq!(serde_json::from_str::<TraceRecord>(&line).unwrap(), rec);
    }
}
