//! Trace assembly: a step's kernel events → the NDJSON trace (docs/trace.md), its summary, and
//! the runtime-trace v0.1 predicate. Pure: no kernel, no store, no key.
//!
//! Secrets: environment values are never captured by the kernel side; argument values
//! containing a declared secret are redacted here, before anything is stored or signed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};

use kiln_common::Digest;
use kiln_common::intoto::{STATEMENT_TYPE, Statement};
use kiln_common::trace::{
    self, DeniedRecord, ExecRecord, ExitRecord, FileRecord, ForkRecord, Monitor, MonitorLog,
    MonitoredProcess, NetRecord, ProcessRecord, RuntimeTracePredicate, SockRecord, TraceHeader,
    TraceMetadata, TraceRecord, TraceSeal, TraceStatement, TraceSummary, WriteRecord,
};

use super::event::{Event, FileOp};
use super::materials::{Candidates, Use};
use super::syscalls;
use super::tree::ProcessTree;

/// zstd level of stored traces (fast; NDJSON compresses ~10x at level 3 already).
const ZSTD_LEVEL: i32 = 3;
/// Caps of the signed `monitorLog` lists (the blob has everything).
const MAX_PROCESSES: usize = 512;
const MAX_NETWORK: usize = 256;
const MAX_FILES: usize = 1024;

/// What the pipeline knows about the observed step.
#[derive(Debug, Clone)]
pub struct StepContext<'a> {
    /// Job id.
    pub job_id: &'a str,
    /// Step name.
    pub step: &'a str,
    /// The node's builder id (`monitoredProcess.hostID`).
    pub builder_id: &'a str,
    /// RFC 3339.
    pub started_on: &'a str,
    /// RFC 3339.
    pub finished_on: &'a str,
    /// Strings to redact from captured arguments.
    pub secrets: &'a [String],
    /// The observer filtered on the cgroup before the helper was spawned.
    pub attached_before_start: bool,
    /// Observation ended after the cgroup was verified empty and removed.
    pub until_last_exit: bool,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// Hash the materials the step used (reads files: blocking I/O). Off only where no
    /// filesystem should be touched (unit tests of the format).
    pub hash_materials: bool,
}

/// Errors of trace assembly.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// Serializing or compressing the NDJSON failed.
    #[error("writing the compressed trace failed")]
    Write(#[source] std::io::Error),
    /// A record did not serialize (should not happen: plain data).
    #[error("serializing a trace record failed")]
    Serialize(#[source] serde_json::Error),
}

/// An assembled trace, ready to store and sign.
#[derive(Debug)]
pub struct AssembledTrace {
    /// zstd-compressed NDJSON.
    pub blob: Vec<u8>,
    /// The last record, also sealed in the predicate.
    pub summary: TraceSummary,
    /// The signed summaries.
    pub monitor_log: MonitorLog,
    /// Whether `monitor_log` was cut to its caps.
    pub truncated: bool,
}

/// Builds the trace of one step from its events and losses.
pub fn assemble(
    events: &[Event],
    lost: u64,
    ctx: &StepContext<'_>,
) -> Result<AssembledTrace, AssembleError> {
    let mut records = Vec::with_capacity(events.len() + 16);
    records.push(TraceRecord::Header(TraceHeader {
        schema: trace::TRACE_SCHEMA.into(),
        job_id: ctx.job_id.into(),
        step: ctx.step.into(),
        cgroup_id: ctx.cgroup_id,
        secrets_declared: ctx.secrets.iter().filter(|s| !s.is_empty()).count(),
    }));
    let mut summary = TraceSummary {
        lost,
        attached_before_start: ctx.attached_before_start,
        until_last_exit: ctx.until_last_exit,
        ..TraceSummary::default()
    };
    let mut files = FileAccessSummary::default();
    let mut network = Vec::new();
    let mut ordered: Vec<&Event> = events.iter().collect();
    ordered.sort_by_key(|e| e.header().ktime_ns); // stable: ties keep ring order
    // (pid, fd) -> path of the file it opened last: names the files of write totals.
    let mut open_fds: HashMap<(u32, i32), String> = HashMap::new();
    // The step's processes: whoever exec'd in the cgroup (the step's program: kiln's helper
    // execs nothing there) and what they forked. Everything else is kiln's sandbox setup.
    let mut step_processes: HashSet<u32> = HashSet::new();
    let mut candidates = Candidates::default();
    for event in ordered {
        match event {
            Event::Exec(exec) => {
                step_processes.insert(exec.header.tgid);
            }
            Event::Fork(fork) => {
                if step_processes.contains(&fork.header.tgid)
                    || step_processes.contains(&fork.parent_tgid)
                {
                    step_processes.insert(fork.child_tgid);
                }
            }
            Event::Exit(_) => {}
            Event::File(_)
            | Event::Write(_)
            | Event::Net(_)
            | Event::Denied(_)
            | Event::Sock(_) => {
                // The helper's mounts and opens before the step's first execve (and its reaping
                // after it) name host paths: not part of the step's trace (docs/trace.md).
                if !step_processes.contains(&event.header().tgid) {
                    summary.setup_events_omitted += 1;
                    continue;
                }
            }
        }
        let mut record = to_record(event, ctx.secrets);
        match &mut record {
            TraceRecord::File(file)
                if file.op == "open" && file.result >= 0 && !file.path_pseudo =>
            {
                open_fds.insert((file.pid, file.result as i32), file.path.clone());
                if file.access.as_deref() == Some("read") {
                    candidates.add(&file.path, Use::Read);
                }
            }
            TraceRecord::Exec(exec) if exec.exe_pseudo => summary.fileless_execs += 1,
            TraceRecord::Exec(exec) => {
                // A memfd script: its interpreter is still a file (a material).
                summary.fileless_execs += u64::from(exec.script_pseudo);
                candidates.add(&exec.exe, Use::Exec);
            }
            TraceRecord::Write(write) if write.path_pseudo => {}
            TraceRecord::Write(write) => {
                // Totals swept at step end have no kernel path: the last open of that fd.
                if write.path.is_none() {
                    write.path = open_fds.get(&(write.pid, write.fd)).cloned();
                }
                if let Some(path) = &write.path {
                    files
                        .written
                        .entry(path.clone())
                        .or_default()
                        .insert("write");
                }
            }
            _ => {}
        }
        summary.events.count(&record);
        files.add(&record);
        match &record {
            TraceRecord::Net(net) => network.push(serde_json::json!({
                "ip": net.ip, "port": net.port, "path": net.path,
                "protocol": net.family, "op": net.op, "result": net.result,
                "invokingProcess": { "pid": net.pid },
            })),
            TraceRecord::Sock(sock) => network.push(serde_json::json!({
                "ip": sock.ip, "port": sock.port, "protocol": sock.protocol,
                "op": sock.hook, "invokingProcess": { "pid": sock.pid },
            })),
            _ => {}
        }
        records.push(record);
    }
    if ctx.hash_materials {
        let (materials, omitted) = candidates.hash();
        summary.materials = materials;
        summary.materials_omitted = omitted;
    }
    summary.connections = network.len() as u64;
    summary.files_read = files.read_only().count() as u64;
    summary.files_written = files.written.len() as u64;

    let tree = ProcessTree::assemble(events);
    let mut processes = Vec::new();
    for (depth, node) in tree.walk() {
        let exec = node.last_exec();
        let record = ProcessRecord {
            depth: depth as u32,
            pid: node.pid,
            ppid: node.ppid,
            exe: exec.map(|e| trace::redact(&e.exe.to_string_lossy(), ctx.secrets)),
            argv: exec
                .map(|e| {
                    e.argv
                        .iter()
                        .map(|a| trace::redact(&a.to_string_lossy(), ctx.secrets))
                        .collect()
                })
                .unwrap_or_default(),
            execs: node.execs.len() as u32,
            exit_code: node.exit.filter(|x| x.signal == 0).map(|x| x.code),
            signal: node.exit.filter(|x| x.signal != 0).map(|x| x.signal),
            duration_ms: node.duration().map(|d| d.as_secs_f64() * 1e3),
        };
        processes.push(serde_json::json!({
            "pid": record.pid, "ppid": record.ppid, "processBinary": record.exe,
            "arguments": record.argv, "exitCode": record.exit_code, "signal": record.signal,
        }));
        records.push(TraceRecord::Process(record));
    }
    summary.complete = summary.is_complete();
    records.push(TraceRecord::Summary(summary.clone()));

    let mut file_access: Vec<serde_json::Value> = files
        .written
        .iter()
        .map(|(path, ops)| file_entry(path, ops))
        .collect();
    file_access.extend(
        files
            .read_only()
            .map(|path| file_entry(path, &BTreeSet::from(["read"]))),
    );
    let truncated = processes.len() > MAX_PROCESSES
        || network.len() > MAX_NETWORK
        || file_access.len() > MAX_FILES;
    processes.truncate(MAX_PROCESSES);
    network.truncate(MAX_NETWORK);
    file_access.truncate(MAX_FILES);

    Ok(AssembledTrace {
        blob: compress(&records)?,
        summary,
        monitor_log: MonitorLog {
            process: processes,
            network,
            file_access,
        },
        truncated,
    })
}

/// The signed statement for an assembled trace stored as blob `digest`.
pub fn statement(
    assembled: &AssembledTrace,
    digest: &Digest,
    ctx: &StepContext<'_>,
) -> TraceStatement {
    let blob = trace::blob_descriptor(&format!("trace:{}", ctx.step), digest);
    Statement {
        statement_type: STATEMENT_TYPE.into(),
        subject: vec![blob.clone()],
        predicate_type: trace::RUNTIME_TRACE_V01.into(),
        predicate: RuntimeTracePredicate {
            monitor: Monitor {
                monitor_type: trace::KILN_MONITOR_TYPE.into(),
                trace_policy: serde_json::json!({
                    "programs": ["tp_btf/sched_process_exec", "tp_btf/sched_process_fork",
                                 "tp_btf/sched_process_exit", "tp_btf/sys_exit",
                                 "cgroup/connect4", "cgroup/connect6", "cgroup/sendmsg4",
                                 "cgroup/sendmsg6"],
                    "filter": "cgroup v2 id of the step",
                    "argvMaxBytes": kiln_ebpf::ARGV_MAX,
                    "pathMaxBytes": kiln_ebpf::PATH_MAX,
                    "environment": "never captured",
                    "sandboxSetup": "records of processes other than the step's are left out",
                    "materials": {
                        "maxFiles": super::materials::MAX_MATERIALS,
                        "maxFileBytes": super::materials::MAX_FILE_BYTES,
                        "maxStepBytes": super::materials::MAX_STEP_BYTES,
                        "excluded": super::materials::EXCLUDED,
                    },
                }),
            },
            monitored_process: MonitoredProcess {
                host_id: ctx.builder_id.into(),
                process_type: trace::MONITORED_PROCESS_TYPE.into(),
                event: format!("{}/{}", ctx.job_id, ctx.step),
            },
            monitor_log: assembled.monitor_log.clone(),
            metadata: Some(TraceMetadata {
                build_started_on: ctx.started_on.into(),
                build_finished_on: ctx.finished_on.into(),
            }),
            kiln_trace: TraceSeal {
                trace: blob,
                summary: assembled.summary.clone(),
                summary_truncated: assembled.truncated,
            },
        },
    }
}

/// Decompresses a stored trace blob into NDJSON.
pub fn decompress(blob: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::stream::decode_all(blob)
}

fn compress(records: &[TraceRecord]) -> Result<Vec<u8>, AssembleError> {
    let encoder =
        zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(AssembleError::Write)?;
    // serde_json writes a record in many small pieces: buffer them, so zstd sees large writes.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, encoder);
    for record in records {
        serde_json::to_writer(&mut out, record).map_err(AssembleError::Serialize)?;
        out.write_all(b"\n").map_err(AssembleError::Write)?;
    }
    out.into_inner()
        .map_err(|err| AssembleError::Write(err.into_error()))?
        .finish()
        .map_err(AssembleError::Write)
}

fn file_entry(path: &str, ops: &BTreeSet<&'static str>) -> serde_json::Value {
    serde_json::json!({
        "name": path,
        "uri": format!("file://{path}"),
        "annotations": { "access": ops.iter().collect::<Vec<_>>() },
    })
}

/// Distinct files by what was done to them.
#[derive(Default)]
struct FileAccessSummary {
    read: BTreeSet<String>,
    written: BTreeMap<String, BTreeSet<&'static str>>,
}

impl FileAccessSummary {
    fn add(&mut self, record: &TraceRecord) {
        let TraceRecord::File(file) = record else {
            return;
        };
        // A pipe or memfd reopened through /proc/PID/fd: no file of the tree.
        if file.result < 0 || file.path_pseudo {
            return;
        }
        let op: &'static str = match (file.op.as_str(), file.access.as_deref()) {
            ("open", Some("read")) => {
                self.read.insert(file.path.clone());
                return;
            }
            // O_PATH: a handle, neither read nor written (the sandbox's mount setup).
            ("open", Some("path")) => return,
            ("open" | "truncate", _) => "write",
            ("rename", _) => "rename",
            ("unlink" | "rmdir", _) => "delete",
            ("mkdir", _) => "create",
            ("symlink", _) => {
                // `path` is the link's text; the new link is `path2`.
                if let Some(path2) = &file.path2 {
                    self.written
                        .entry(path2.clone())
                        .or_default()
                        .insert("link");
                }
                return;
            }
            ("link", _) => "link",
            ("chmod" | "chown", _) => "metadata",
            _ => return,
        };
        self.written
            .entry(file.path.clone())
            .or_default()
            .insert(op);
        if let Some(path2) = &file.path2 {
            self.written.entry(path2.clone()).or_default().insert(op);
        }
    }

    fn read_only(&self) -> impl Iterator<Item = &String> {
        self.read
            .iter()
            .filter(|path| !self.written.contains_key(path.as_str()))
    }
}

/// One kernel event as a trace record: every string the step chose (arguments, paths, socket
/// paths) with declared secrets redacted.
fn to_record(event: &Event, secrets: &[String]) -> TraceRecord {
    let lossy = |p: &std::path::Path| trace::redact(&p.to_string_lossy(), secrets);
    match event {
        Event::Exec(exec) => {
            let flag_names = [
                (kiln_ebpf::EXEC_FILENAME_TRUNCATED, "filename"),
                (kiln_ebpf::EXEC_ARGV_TRUNCATED, "argv"),
                (kiln_ebpf::EXEC_ARGV_FAULT, "argv-fault"),
                (kiln_ebpf::EXEC_EXE_TRUNCATED, "exe"),
                (kiln_ebpf::EXEC_CWD_TRUNCATED, "cwd"),
            ];
            TraceRecord::Exec(ExecRecord {
                t: exec.header.ktime_ns,
                pid: exec.header.tgid,
                ppid: exec.ppid,
                filename: lossy(&exec.filename),
                exe: lossy(&exec.exe),
                cwd: lossy(&exec.cwd),
                argv: exec
                    .argv
                    .iter()
                    .map(|a| trace::redact(&a.to_string_lossy(), secrets))
                    .collect(),
                argc: exec.argc,
                uid: exec.uid,
                gid: exec.gid,
                truncated: flag_names
                    .iter()
                    .filter(|(bit, _)| exec.flags & bit != 0)
                    .map(|(_, name)| (*name).to_owned())
                    .collect(),
                exe_pseudo: exec.flags & kiln_ebpf::EXEC_EXE_DETACHED != 0,
                script_pseudo: exec.flags & kiln_ebpf::EXEC_SCRIPT_DETACHED != 0,
            })
        }
        Event::Fork(fork) => TraceRecord::Fork(ForkRecord {
            t: fork.header.ktime_ns,
            parent: fork.parent_tgid,
            child: fork.child_tgid,
        }),
        Event::Exit(exit) => TraceRecord::Exit(ExitRecord {
            t: exit.header.ktime_ns,
            pid: exit.header.tgid,
            code: exit.code,
            signal: exit.signal,
        }),
        Event::File(file) => TraceRecord::File(file_record(file, secrets)),
        Event::Write(write) => TraceRecord::Write(WriteRecord {
            t: write.header.ktime_ns,
            pid: write.header.tgid,
            fd: write.fd,
            path: write.path.as_deref().map(lossy),
            bytes: write.bytes,
            writes: write.writes,
            path_pseudo: write.pseudo,
            args_shared: write.args_shared,
        }),
        Event::Net(net) => TraceRecord::Net(NetRecord {
            t: net.header.ktime_ns,
            pid: net.header.tgid,
            op: syscalls::name(net.nr).unwrap_or("socket").to_owned(),
            family: match net.family {
                1 => "unix".to_owned(),
                2 => "inet".to_owned(),
                10 => "inet6".to_owned(),
                other => format!("af-{other}"),
            },
            ip: net.ip.map(|ip| ip.to_string()),
            port: net.ip.map(|_| net.port),
            path: net.unix_path.as_ref().map(|p| {
                let text = match p.split_first() {
                    Some((0, name)) => format!("@{}", String::from_utf8_lossy(name)),
                    _ => String::from_utf8_lossy(p).into_owned(),
                };
                trace::redact(&text, secrets)
            }),
            result: net.result,
        }),
        Event::Sock(sock) => TraceRecord::Sock(SockRecord {
            t: sock.header.ktime_ns,
            pid: sock.header.tgid,
            hook: match sock.hook {
                kiln_ebpf::SOCK_CONNECT4 => "connect4".to_owned(),
                kiln_ebpf::SOCK_CONNECT6 => "connect6".to_owned(),
                kiln_ebpf::SOCK_SENDMSG4 => "sendmsg4".to_owned(),
                kiln_ebpf::SOCK_SENDMSG6 => "sendmsg6".to_owned(),
                other => format!("hook-{other}"),
            },
            ip: sock.ip.to_string(),
            port: sock.port,
            protocol: match sock.protocol {
                6 => "tcp".to_owned(),
                17 => "udp".to_owned(),
                other => format!("ipproto-{other}"),
            },
        }),
        Event::Denied(denied) => TraceRecord::Denied(DeniedRecord {
            t: denied.header.ktime_ns,
            pid: denied.header.tgid,
            nr: denied.nr,
            syscall: syscalls::name(denied.nr).map(str::to_owned),
            result: denied.result,
        }),
    }
}

fn file_record(file: &FileOp, secrets: &[String]) -> FileRecord {
    let op = syscalls::file_op(file.nr, file.flags);
    let is_open = op == "open";
    let arg = file.path.to_string_lossy().into_owned();
    let redact = |text: String| trace::redact(&text, secrets);
    // A file in no directory has a pseudo name, not a path: as the opened file (real), or as
    // the directory argument the path is taken from (fchdir, `AT_EMPTY_PATH` on a memfd).
    let base_pseudo = file.evflags & kiln_ebpf::FILE_BASE_DETACHED != 0;
    let (path, path_pseudo) = match (&file.real, op) {
        // The opened file itself, symlinks resolved, as the kernel sees it; for a chdir that
        // succeeded, the new cwd (walked at sys_exit, when the old one is gone).
        (Some(real), "open" | "chdir") if file.result >= 0 => (
            real.to_string_lossy().into_owned(),
            file.evflags & kiln_ebpf::FILE_REAL_DETACHED != 0,
        ),
        // fchdir: the directory open as the fd.
        _ if file.nr == 81 => (
            file.base
                .as_deref()
                .map(|b| b.to_string_lossy().into_owned())
                .unwrap_or_default(),
            base_pseudo,
        ),
        // A symlink's first argument is the link's text, not a path of this process.
        (_, "symlink") => (arg.clone(), false),
        _ => (
            resolve(&file.path, file.base.as_deref()),
            base_pseudo && file.path.as_os_str().is_empty(),
        ),
    };
    FileRecord {
        t: file.header.ktime_ns,
        pid: file.header.tgid,
        op: op.to_owned(),
        syscall: syscalls::name(file.nr).map_or_else(|| format!("nr-{}", file.nr), str::to_owned),
        path: redact(path),
        arg: redact(arg),
        path2: file
            .path2
            .as_ref()
            .map(|p| redact(resolve(p, file.base2.as_deref()))),
        flags: is_open.then_some(file.flags),
        access: is_open.then(|| syscalls::open_access(file.flags).to_owned()),
        result: file.result,
        args_shared: file.evflags & kiln_ebpf::FILE_ARGS_SHARED != 0,
        path_pseudo,
    }
}

/// `arg` made absolute against `base` (the cwd or dirfd directory walked in the kernel) and
/// normalized lexically: `.` dropped, `..` removes the previous component (not above `/`).
/// Lexical `..` differs from the kernel's only when the previous component is a symlink;
/// opens that succeeded carry the kernel's own resolution instead (docs/trace.md).
fn resolve(arg: &Path, base: Option<&Path>) -> String {
    let joined: PathBuf = match base {
        Some(base) if arg.is_relative() => base.join(arg),
        _ => arg.to_owned(),
    };
    let mut out = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::ParentDir => {
                if out.parent().is_some() {
                    out.pop();
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::path::PathBuf;

    use super::*;
    use crate::observe::event::{Exec, Exit, Header, Write};

    fn header(t: u64, pid: u32) -> Header {
        Header {
            ktime_ns: t,
            cgroup_id: 9,
            pid,
            tgid: pid,
        }
    }

    fn ctx(secrets: &[String]) -> StepContext<'_> {
        StepContext {
            job_id: "job",
            step: "compile",
            builder_id: "urn:kiln:node:00",
            started_on: "2025-01-01T00:00:00Z",
            finished_on: "2025-01-01T00:00:01Z",
            secrets,
            attached_before_start: true,
            until_last_exit: true,
            cgroup_id: 9,
            hash_materials: false,
        }
    }

    fn events() -> Vec<Event> {
        vec![
            Event::Exec(Box::new(Exec {
                header: header(10, 5),
                ppid: 1,
                start_ns: 1,
                uid: 0,
                gid: 0,
                euid: 0,
                egid: 0,
                filename: PathBuf::from("/bin/cc"),
                exe: PathBuf::from("/usr/bin/gcc-12"),
                cwd: PathBuf::from("/workspace/src"),
                argv: ["cc", "--token=hunter2", "-c"].map(OsString::from).to_vec(),
                argc: 3,
                flags: 0,
            })),
            Event::Exit(Exit {
                header: header(20, 5),
                code: 0,
                signal: 0,
                core_dumped: false,
                start_ns: 1,
            }),
        ]
    }

    fn lines(blob: &[u8]) -> Vec<TraceRecord> {
        String::from_utf8(decompress(blob).unwrap())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn trace_has_header_events_tree_and_summary_with_secrets_redacted() {
        let secrets = vec!["hunter2".to_owned()];
        let assembled = assemble(&events(), 0, &ctx(&secrets)).unwrap();
        let records = lines(&assembled.blob);
        assert!(
            matches!(&records[0], TraceRecord::Header(h) if h.step == "compile" && h.secrets_declared == 1)
        );
        assert!(
            matches!(&records[1], TraceRecord::Exec(e) if e.argv == ["cc", "--token=[REDACTED]", "-c"])
        );
        assert!(
            matches!(&records[3], TraceRecord::Process(p) if p.exit_code == Some(0) && p.argv[1] == "--token=[REDACTED]")
        );
        let TraceRecord::Summary(summary) = records.last().unwrap() else {
            panic!("no summary last");
        };
        assert!(summary.complete);
        assert_eq!((summary.events.exec, summary.events.exit), (1, 1));
        let text = String::from_utf8(decompress(&assembled.blob).unwrap()).unwrap();
        assert!(!text.contains("hunter2"));
        let st = statement(&assembled, &Digest::of(&assembled.blob), &ctx(&secrets));
        let json = serde_json::to_string(&st).unwrap();
        assert!(!json.contains("hunter2"));
        assert!(
            json.contains(
                "\"predicateType\":\"https://in-toto.io/attestation/runtime-trace/v0.1\""
            )
        );
        assert!(json.contains("\"monitoredProcess\":{\"hostID\""));
        assert!(json.contains("\"kilnTrace\":{\"trace\""));
    }

    #[test]
    fn secrets_in_paths_are_redacted_too() {
        let secrets = vec!["hunter2".to_owned()];
        let mut events = events();
        if let Event::Exec(exec) = &mut events[0] {
            exec.cwd = PathBuf::from("/workspace/hunter2");
        }
        events.push(open(12, 5, "/tmp/hunter2/key"));
        events.push(Event::Write(Write {
            header: header(13, 5),
            fd: 3,
            bytes: 1,
            writes: 1,
            path: Some(PathBuf::from("/workspace/out/hunter2.txt")),
            pseudo: false,
            args_shared: false,
        }));
        let assembled = assemble(&events, 0, &ctx(&secrets)).unwrap();
        let text = String::from_utf8(decompress(&assembled.blob).unwrap()).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        for redacted in [
            "/tmp/[REDACTED]/key",
            "/workspace/out/[REDACTED].txt",
            "/workspace/[REDACTED]",
        ] {
            assert!(text.contains(redacted), "{redacted}: {text}");
        }
    }

    #[test]
    fn relative_paths_resolve_against_their_directory() {
        let base = Path::new("/workspace/src");
        assert_eq!(
            resolve(Path::new("hello.c"), Some(base)),
            "/workspace/src/hello.c"
        );
        assert_eq!(
            resolve(Path::new("../build/./x"), Some(base)),
            "/workspace/build/x"
        );
        assert_eq!(resolve(Path::new("/etc/../../tmp"), Some(base)), "/tmp");
        assert_eq!(resolve(Path::new("rel"), None), "rel");
    }

    fn open(t: u64, pid: u32, path: &str) -> Event {
        Event::File(Box::new(FileOp {
            header: header(t, pid),
            nr: 257,
            result: 3,
            flags: 0,
            mode: 0,
            dirfd: -100,
            dirfd2: -100,
            path: PathBuf::from(path),
            path2: None,
            base: None,
            base2: None,
            real: Some(PathBuf::from(path)),
            evflags: kiln_ebpf::FILE_HAS_REAL,
        }))
    }

    fn fork(t: u64, parent: u32, child: u32) -> Event {
        Event::Fork(crate::observe::Fork {
            header: header(t, parent),
            parent_tgid: parent,
            child_tgid: child,
            child_start_ns: t,
        })
    }

    #[test]
    fn sandbox_setup_records_never_reach_the_trace() {
        let Event::Exec(mut exec) = events().remove(0) else {
            panic!("not an exec");
        };
        exec.header = header(10, 4);
        let events = vec![
            // The helper (pid 3) builds the root from host paths, forks the worker (4), which
            // confines itself before its execve.
            open(1, 3, "/var/lib/kiln/roots/job-1/rootfs"),
            fork(2, 3, 4),
            open(3, 4, "/var/lib/kiln/work/job-1/src"),
            Event::Exec(exec),
            // The step and its child.
            open(11, 4, "/workspace/src/hello.c"),
            fork(12, 4, 5),
            open(13, 5, "/usr/include/stdio.h"),
            // The helper again, after the step's exec (reaping, its status pipe).
            open(14, 3, "/var/lib/kiln/status"),
        ];
        let assembled = assemble(&events, 0, &ctx(&[])).unwrap();
        let text = String::from_utf8(decompress(&assembled.blob).unwrap()).unwrap();
        assert!(!text.contains("/var/lib/kiln"), "{text}");
        assert!(text.contains("/workspace/src/hello.c"));
        assert!(
            text.contains("/usr/include/stdio.h"),
            "the step's children are the step's"
        );
        assert_eq!(assembled.summary.setup_events_omitted, 3);
        assert_eq!(assembled.summary.events.file, 2);
        assert_eq!(
            assembled.summary.events.fork, 2,
            "the process tree keeps kiln's own processes"
        );
    }

    #[test]
    fn lost_events_make_the_trace_incomplete() {
        let assembled = assemble(&events(), 2, &ctx(&[])).unwrap();
        assert!(!assembled.summary.complete);
        assert_eq!(assembled.summary.lost, 2);
    }
}
