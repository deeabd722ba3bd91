//! Real-kernel tests of the observer (`kilnd::observe`): load and attach the BPF programs,
//! run processes in a fresh cgroup v2 directory, and check what the kernel reported.
//!
//! Needs root, kernel BTF and cgroup2 at /sys/fs/cgroup/unified. Outside CI a missing
//! capability skips with a printed reason; under CI=true it fails. The tests share the kernel
//! and measure rates, so they run one at a time.
#![expect(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers outside #[test] fns: a failed setup is a failed test"
)]

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kilnd::observe::{
    CgroupId, Event, EventStream, Observer, ObserverConfig, ProcessNode, ProcessTree,
};
use tokio::process::{Child, Command};

const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
const QUIET: Duration = Duration::from_millis(150);

/// One test at a time: they share the kernel's tracepoints and measure rates.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The serial lock and a started observer service, or `None` where the kernel cannot run it
/// (outside CI; [`kernel_available`] fails under CI=true).
async fn start_service() -> Option<(tokio::sync::MutexGuard<'static, ()>, Arc<ObserverService>)> {
    let serial = SERIAL.lock().await;
    if !kernel_available() {
        return None;
    }
    let service = ObserverService::start(&ObserverConfig::default()).expect("start observer");
    Some((serial, service))
}

/// Whether the kernel-facing tests can run here; prints why not, and fails under CI=true.
fn kernel_available() -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("not root")
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("no kernel BTF at /sys/kernel/btf/vmlinux")
    } else if !Path::new(CGROUP2_ROOT).join("cgroup.procs").exists() {
        Some("no cgroup2 at /sys/fs/cgroup/unified")
    } else if !kiln_ebpf::BPF_BUILT {
        Some("kiln-ebpf built with KILN_SKIP_BPF=1")
    } else {
        None
    };
    match missing {
        None => true,
        Some(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("observer tests cannot run under CI=true: {reason}")
        }
        Some(reason) => {
            eprintln!("skipping observer test: {reason}");
            false
        }
    }
}

/// A fresh cgroup v2 directory, removed (after killing what is left in it) on drop.
struct TestCgroup {
    path: PathBuf,
    id: CgroupId,
}

impl TestCgroup {
    fn new() -> Self {
        let name = format!("kiln-test-{}", uuid::Uuid::now_v7().simple());
        let path = Path::new(CGROUP2_ROOT).join(name);
        std::fs::create_dir(&path).expect("create test cgroup");
        let id = CgroupId::of_path(&path).expect("cgroup id");
        Self { path, id }
    }

    /// A command that joins this cgroup between fork and exec, so its very first exec is
    /// already inside (like the sandbox worker).
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let procs = OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls write(2),
        // which is async-signal-safe, on an fd opened before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || join_cgroup(&procs));
        }
        cmd
    }
}

/// Writes "0" (= the calling process) to an open cgroup.procs.
fn join_cgroup(procs: &File) -> std::io::Result<()> {
    // SAFETY: the fd is open for the lifetime of `procs`; the buffer is a valid 1-byte slice.
    let written = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if written == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "warning: could not remove test cgroup {}",
            self.path.display()
        );
    }
}

/// A loaded observer watching a fresh cgroup.
fn observe_new_cgroup(config: &ObserverConfig) -> (Observer, EventStream, TestCgroup) {
    let (mut observer, stream) = Observer::load(config).expect("load observer");
    let cgroup = TestCgroup::new();
    observer.observe_cgroup(cgroup.id).expect("observe");
    (observer, stream, cgroup)
}

async fn wait(mut child: Child) -> ExitStatus {
    child.wait().await.expect("wait for child")
}

async fn collect_until_quiet(stream: &mut EventStream) -> Vec<Event> {
    let mut events = Vec::new();
    stream.drain_until_quiet(&mut events, QUIET).await;
    events
}

fn argv(node: &ProcessNode) -> Vec<String> {
    node.argv()
        .unwrap_or_default()
        .iter()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect()
}

fn count(events: &[Event], pred: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|event| pred(event)).count()
}

/// Only the process family's events (exec, fork, exit): storms count these exactly.
fn process_events(events: &[Event]) -> usize {
    count(events, |e| {
        matches!(e, Event::Exec(_) | Event::Fork(_) | Event::Exit(_))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_in_cgroup_is_traced_and_outsider_is_not() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let (mut observer, mut stream, cgroup) = observe_new_cgroup(&ObserverConfig::default());

    let script = "echo a | tr a b; ls / >/dev/null";
    let outsider_marker = format!("kiln-outsider-{}", std::process::id());
    let mut inside = cgroup.command("/bin/sh", &["-c", script]);
    // A cwd under three mounts (cgroup2 on tmpfs on sysfs on /): the dentry walk crosses them.
    inside.current_dir(&cgroup.path);
    let inside = inside.spawn().expect("spawn pipeline");
    let outsider = Command::new("/bin/sh")
        .args([
            "-c",
            &format!("for i in 1 2 3; do /bin/echo {outsider_marker}; done"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn outsider");
    let sh_pid = inside.id().expect("pipeline pid");
    let outsider_pid = outsider.id().expect("outsider pid");
    let (inside_status, outsider_status) = tokio::join!(wait(inside), wait(outsider));
    assert!(inside_status.success() && outsider_status.success());

    let events = collect_until_quiet(&mut stream).await;
    assert!(
        events
            .iter()
            .all(|event| event.header().cgroup_id == cgroup.id.0),
        "every event is tagged with the observed cgroup"
    );
    let tree = ProcessTree::assemble(&events);
    eprintln!("{}", tree.render());

    // The shell: the root, its first image is sh with the full argv, cwd resolved across mounts.
    assert_eq!(tree.roots.len(), 1, "one root: {tree:#?}");
    let sh = &tree.nodes[tree.roots[0]];
    assert_eq!(sh.pid, sh_pid);
    let sh_exec = &sh.execs[0];
    assert_eq!(sh_exec.argv, ["/bin/sh", "-c", script].map(OsString::from));
    assert_eq!(sh_exec.filename, Path::new("/bin/sh"));
    assert_eq!(
        sh_exec.exe,
        Path::new("/usr/bin/dash"),
        "exe resolves the /bin and sh symlinks"
    );
    assert_eq!(sh_exec.cwd, cgroup.path);
    assert!(sh_exec.is_complete());
    assert_eq!(sh_exec.uid, 0);

    // tr: a child of sh.
    let tr: Vec<&ProcessNode> = tree
        .nodes
        .iter()
        .filter(|n| argv(n) == ["tr", "a", "b"])
        .collect();
    assert_eq!(tr.len(), 1, "{tree:#?}");
    assert_eq!(tr[0].parent, Some(tree.roots[0]));
    assert_eq!(tr[0].ppid, Some(sh_pid));
    assert!(tr[0].fork_observed);
    assert_eq!(
        tr[0].last_exec().map(|e| e.exe.as_path()),
        Some(Path::new("/usr/bin/tr"))
    );

    // ls: sh itself (dash execs the last command in place) or a child of sh.
    let ls: Vec<&ProcessNode> = tree
        .walk()
        .into_iter()
        .map(|(_, node)| node)
        .filter(|node| {
            node.execs
                .iter()
                .any(|e| e.argv == ["ls", "/"].map(OsString::from))
        })
        .collect();
    assert_eq!(ls.len(), 1, "{tree:#?}");
    assert!(ls[0].pid == sh_pid || ls[0].ppid == Some(sh_pid));

    // echo is a builtin: its side of the pipe is a forked subshell without exec.
    assert!(
        sh.children
            .iter()
            .any(|&c| tree.nodes[c].execs.is_empty() && tree.nodes[c].fork_observed),
        "{tree:#?}"
    );
    for node in &tree.nodes {
        let exit = node
            .exit
            .unwrap_or_else(|| panic!("no exit for {}: {tree:#?}", node.pid));
        assert_eq!((exit.code, exit.signal), (0, 0), "pid {}", node.pid);
        assert!(node.duration().is_some_and(|d| d > Duration::ZERO));
    }

    // The process started at the same time outside the cgroup never appears.
    assert!(events.iter().all(|e| e.header().tgid != outsider_pid));
    assert!(!format!("{events:?}").contains(&outsider_marker));

    assert_eq!(observer.lost().expect("lost"), 0);
    assert_eq!(stream.malformed(), 0);
    assert_eq!(observer.unobserve_cgroup(cgroup.id).expect("unobserve"), 0);
}

/// `n` execs of /bin/true from one shell: 1 exec + n * (fork + exec + exit) + 1 exit.
fn exec_storm(n: usize) -> (String, usize) {
    (
        format!("i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done"),
        2 + 3 * n,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_programs_skip_counter_is_read_and_a_storm_skips_nothing() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let (mut observer, mut stream, cgroup) = observe_new_cgroup(&ObserverConfig::default());
    let before = observer
        .recursion_misses()
        .expect("read recursion_misses of every program");
    let (script, expected) = exec_storm(300);
    assert!(
        wait(
            cgroup
                .command("/bin/sh", &["-c", &script])
                .spawn()
                .expect("spawn")
        )
        .await
        .success()
    );
    let events = collect_until_quiet(&mut stream).await;
    assert!(
        process_events(&events) >= expected,
        "the storm was observed"
    );
    // A skip is an event nobody recorded: kilnd adds any skip during a step to its losses.
    assert_eq!(observer.recursion_misses().expect("read again"), before);
    assert_eq!(observer.unobserve_cgroup(cgroup.id).expect("unobserve"), 0);
}

/// `n` forks without exec (subshells): 1 exec + n * (fork + exit) + 1 exit.
fn fork_storm(n: usize) -> (String, usize) {
    (
        format!("i=0; while [ $i -lt {n} ]; do ( : ); i=$((i+1)); done"),
        2 + 2 * n,
    )
}

/// Runs `script` in the cgroup while consuming the stream; returns events and storm duration.
async fn run_consuming(
    cgroup: &TestCgroup,
    stream: &mut EventStream,
    script: &str,
) -> (Vec<Event>, Duration) {
    let start = Instant::now();
    let mut child = cgroup
        .command("/bin/sh", &["-c", script])
        .spawn()
        .expect("spawn storm");
    let mut events = Vec::new();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.expect("wait storm"),
            batch = stream.next_batch(&mut events) => { batch.expect("next batch"); }
        }
    };
    let elapsed = start.elapsed();
    assert!(status.success());
    stream.drain_until_quiet(&mut events, QUIET).await;
    (events, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_with_default_ring_delivers_every_event() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let cgroup = TestCgroup::new();
    let forks = 5_000;
    let (fork_script, fork_expected) = fork_storm(forks);
    let run_unconsumed = || async {
        let start = Instant::now();
        let child = cgroup
            .command("/bin/sh", &["-c", &fork_script])
            .spawn()
            .expect("spawn");
        assert!(wait(child).await.success());
        start.elapsed()
    };

    // The same fork storm three ways, interleaved over rounds (best of each, to damp noise from
    // other work on the host): no programs attached; attached but this cgroup not observed
    // (what every other process on the host pays); observed, consumed concurrently.
    let (mut bare, mut attached, mut traced) = (Duration::MAX, Duration::MAX, Duration::MAX);
    let mut delivered = 0;
    for _round in 0..3 {
        bare = bare.min(run_unconsumed().await);
        let (mut observer, mut stream) =
            Observer::load(&ObserverConfig::default()).expect("load observer");
        attached = attached.min(run_unconsumed().await);
        observer.observe_cgroup(cgroup.id).expect("observe");
        let (events, elapsed) = run_consuming(&cgroup, &mut stream, &fork_script).await;
        assert_eq!(
            process_events(&events),
            fork_expected,
            "fork storm: every event delivered"
        );
        assert_eq!(count(&events, |e| matches!(e, Event::Fork(_))), forks);
        assert_eq!(count(&events, |e| matches!(e, Event::Exit(_))), forks + 1);
        assert_eq!(observer.lost().expect("lost"), 0);
        traced = traced.min(elapsed);
        delivered = process_events(&events);
    }
    let ratio = |d: Duration| d.as_secs_f64() / bare.as_secs_f64();
    eprintln!(
        "fork storm (best of 3): {forks} forks, {delivered} events in {traced:.2?} = {:.0} \
         events/s (fork-bound); no programs {bare:.2?}, attached+unobserved {:.2}x, \
         observed {:.2}x",
        delivered as f64 / traced.as_secs_f64(),
        ratio(attached),
        ratio(traced),
    );

    let (mut observer, mut stream) =
        Observer::load(&ObserverConfig::default()).expect("load observer");
    observer.observe_cgroup(cgroup.id).expect("observe");
    // Consumer capacity: the storm fills the ring with nobody reading, then the drain alone is
    // timed (decode included).
    run_unconsumed().await;
    let mut events = Vec::with_capacity(fork_expected);
    let start = Instant::now();
    while stream.drain(&mut events) > 0 {}
    let drain = start.elapsed();
    assert_eq!(process_events(&events), fork_expected);
    assert_eq!(observer.lost().expect("lost"), 0);
    eprintln!(
        "consumer drain: {} events in {drain:.2?} = {:.0} events/s",
        events.len(),
        events.len() as f64 / drain.as_secs_f64()
    );

    let execs = 2_000;
    let (exec_script, exec_expected) = exec_storm(execs);
    let (events, elapsed) = run_consuming(&cgroup, &mut stream, &exec_script).await;
    let trues = count(
        &events,
        |e| matches!(e, Event::Exec(x) if x.argv == [OsString::from("/bin/true")]),
    );
    assert_eq!(trues, execs, "every exec delivered");
    assert_eq!(process_events(&events), exec_expected);
    assert_eq!(observer.lost().expect("lost"), 0);
    assert_eq!(observer.lost_in_cgroup(cgroup.id).expect("lost"), Some(0));
    assert_eq!(stream.malformed(), 0);
    eprintln!(
        "exec storm: {execs} execs, {} events in {elapsed:.2?} = {:.0} events/s, lost 0",
        events.len(),
        events.len() as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_ring_reports_every_lost_event() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let execs = 500;
    let (script, _) = exec_storm(execs);
    // The same storm with the default ring first: how many events it makes (every kind).
    let expected = {
        let (mut observer, mut stream, cgroup) = observe_new_cgroup(&ObserverConfig::default());
        let (events, _) = run_consuming(&cgroup, &mut stream, &script).await;
        assert_eq!(observer.unobserve_cgroup(cgroup.id).expect("unobserve"), 0);
        events.len()
    };
    // 16 KiB holds a few dozen (variable-size) exec records; nothing consumes while the storm
    // runs.
    let config = ObserverConfig {
        ring_bytes: 16 << 10,
        ..ObserverConfig::default()
    };
    let (mut observer, mut stream, cgroup) = observe_new_cgroup(&config);
    let status = wait(
        cgroup
            .command("/bin/sh", &["-c", &script])
            .spawn()
            .expect("spawn"),
    )
    .await;
    assert!(status.success());
    let events = collect_until_quiet(&mut stream).await;
    let lost = observer.lost().expect("lost");
    eprintln!(
        "tiny ring (16 KiB): {} delivered, {lost} lost of {expected}",
        events.len()
    );
    assert!(lost > 0, "a full ring must report losses");
    assert_eq!(
        events.len() as u64 + lost,
        expected as u64,
        "delivered + lost accounts for every event"
    );
    assert_eq!(
        observer.unobserve_cgroup(cgroup.id).expect("unobserve"),
        lost
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ring_size_is_refused() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let config = ObserverConfig {
        ring_bytes: 3 << 20,
        ..ObserverConfig::default()
    };
    let err = Observer::load(&config).expect_err("3 MiB is not a power of two");
    assert!(err.to_string().contains("power of two"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_flagged_not_silent() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let (observer, mut stream, cgroup) = observe_new_cgroup(&ObserverConfig::default());

    // A working directory deeper than the walk follows, and more argv than is captured.
    let scratch = tempfile::tempdir().expect("tempdir");
    let depth = kiln_ebpf::PATH_COMPONENTS_MAX + 12;
    let deep: PathBuf = std::iter::once(scratch.path().to_owned())
        .chain(std::iter::repeat_n(PathBuf::from("d"), depth))
        .collect();
    std::fs::create_dir_all(&deep).expect("create deep dir");
    let args: Vec<String> = (0..300).map(|i| format!("arg{i:04}")).collect();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = cgroup.command("/bin/true", &arg_refs);
    cmd.current_dir(&deep);
    assert!(wait(cmd.spawn().expect("spawn")).await.success());

    let events = collect_until_quiet(&mut stream).await;
    let execs: Vec<&kilnd::observe::Exec> = events
        .iter()
        .filter_map(|e| match e {
            Event::Exec(exec) => Some(exec.as_ref()),
            _ => None,
        })
        .collect();
    assert_eq!(execs.len(), 1);
    let exec = execs[0];
    assert_eq!(exec.argc, 301, "argc counts every argument");
    assert_ne!(exec.flags & kiln_ebpf::EXEC_ARGV_TRUNCATED, 0);
    let captured: usize = exec.argv.iter().map(|a| a.len() + 1).sum();
    assert!(captured <= kiln_ebpf::ARGV_MAX + 1, "{captured}");
    assert_eq!(exec.argv[0], "/bin/true");
    assert_eq!(exec.argv[1], "arg0000");
    assert_ne!(exec.flags & kiln_ebpf::EXEC_CWD_TRUNCATED, 0);
    assert!(
        exec.cwd.is_relative(),
        "a cut path must not pose as absolute: {:?}",
        exec.cwd
    );
    assert_eq!(
        exec.cwd.components().count(),
        kiln_ebpf::PATH_COMPONENTS_MAX
    );
    assert_eq!(exec.exe, Path::new("/usr/bin/true"));
    assert_eq!(exec.flags & kiln_ebpf::EXEC_EXE_TRUNCATED, 0);
    assert!(!exec.is_complete());
    assert_eq!(observer.lost().expect("lost"), 0);
}

// ---------------------------------------------------------------------------------------------
// The node's shared observer (routing), trace assembly, file events, and completeness vs strace.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use kiln_common::trace::{FileRecord, TraceRecord};
use kilnd::observe::assemble::{self, StepContext};
use kilnd::observe::{FileOp, ObserverService};

fn context(cgroup: &TestCgroup, lost_ok: bool) -> StepContext<'static> {
    let _ = lost_ok;
    StepContext {
        job_id: "job",
        step: "step",
        builder_id: "urn:kiln:node:test",
        started_on: "2025-01-01T00:00:00Z",
        finished_on: "2025-01-01T00:00:01Z",
        secrets: &[],
        attached_before_start: true,
        until_last_exit: true,
        cgroup_id: cgroup.id.0,
        hash_materials: true,
    }
}

/// The trace's records, decompressed.
fn records(blob: &[u8]) -> Vec<TraceRecord> {
    String::from_utf8(assemble::decompress(blob).expect("decompress"))
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("record"))
        .collect()
}

fn file_records(records: &[TraceRecord]) -> Vec<&FileRecord> {
    records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::File(f) => Some(f),
            _ => None,
        })
        .collect()
}

/// The record of the unlink whose argument is `name` (or ends with it: a path the test chose).
fn unlink_of<'a>(records: &'a [TraceRecord], name: &str) -> &'a FileRecord {
    file_records(records)
        .into_iter()
        .find(|f| f.op == "unlink" && f.arg.ends_with(name))
        .unwrap_or_else(|| panic!("no unlink of {name}: {records:#?}"))
}

/// Compiles the C program `source` into `dir/name` (cc -O2 `flags`).
fn compile_c(dir: &Path, name: &str, source: &str, flags: &[&str]) {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).expect("write the C source");
    let cc = std::process::Command::new("cc")
        .args(["-O2"])
        .args(flags)
        .arg("-o")
        .arg(dir.join(name))
        .arg(&src)
        .status()
        .expect("cc");
    assert!(cc.success(), "compile {name}");
}

/// Runs `script` under /bin/sh in a fresh cgroup observed through `service`; returns the
/// trace records and the lost count.
async fn traced_script(service: &Arc<ObserverService>, script: &str) -> (Vec<TraceRecord>, u64) {
    let cgroup = TestCgroup::new();
    let observation = service.attach(cgroup.id).expect("attach");
    let status = wait(
        cgroup
            .command("/bin/sh", &["-c", script])
            .spawn()
            .expect("spawn"),
    )
    .await;
    assert!(status.success(), "script failed: {script}");
    let collected = observation.finish().await.expect("finish");
    let assembled = assemble::assemble(&collected.events, collected.lost, &context(&cgroup, false))
        .expect("assemble");
    (records(&assembled.blob), collected.lost)
}

fn exec_argvs(records: &[TraceRecord]) -> Vec<Vec<String>> {
    records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Exec(e) => Some(e.argv.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_traces_do_not_mix_and_host_processes_never_appear() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let script = |marker: &str| {
        format!("i=0; while [ $i -lt 50 ]; do /bin/echo {marker} >/dev/null; i=$((i+1)); done")
    };
    let host = Command::new("/bin/sh")
        .args(["-c", &script("kiln-host-marker")])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn host process");
    let (script_a, script_b) = (script("kiln-step-a"), script("kiln-step-b"));
    let (a, b) = tokio::join!(
        traced_script(&service, &script_a),
        traced_script(&service, &script_b),
    );
    assert!(wait(host).await.success());
    for ((records, lost), mine, other) in [
        (&a, "kiln-step-a", "kiln-step-b"),
        (&b, "kiln-step-b", "kiln-step-a"),
    ] {
        assert_eq!(*lost, 0);
        let argvs = exec_argvs(records);
        let mine_count = argvs.iter().filter(|a| a.iter().any(|x| x == mine)).count();
        assert_eq!(mine_count, 50, "every echo of {mine} is in its own trace");
        let text = format!("{records:?}");
        assert!(
            !text.contains(other),
            "{other} leaked into the trace of {mine}"
        );
        assert!(
            !text.contains("kiln-host-marker"),
            "a host process appears in {mine}'s trace"
        );
        let TraceRecord::Summary(summary) = records.last().expect("records") else {
            panic!("trace does not end with its summary");
        };
        assert!(summary.complete);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_ring_storm_trace_is_marked_incomplete() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let config = ObserverConfig {
        // One page: the smallest ring the kernel takes. Records are variable-size (~100 bytes
        // for an exec's fork/exit, more for execs and opens), so a page holds a few dozen.
        ring_bytes: 4 << 10,
        // Nobody drains between polls long enough for the storm to overflow the ring.
        poll_interval: Duration::from_secs(5),
        ..ObserverConfig::default()
    };
    let service = ObserverService::start(&config).expect("start observer");
    // Two exec loops at once keep both cores busy, so the consumer cannot drain a page in time
    // (one loop alone was sometimes fully drained: ~80 events per exec of /bin/true).
    let (storm, _) = exec_storm(1000);
    let script = format!("({storm}) & ({storm}); wait");
    let (records, lost) = traced_script(&service, &script).await;
    let TraceRecord::Summary(summary) = records.last().expect("records") else {
        panic!("trace does not end with its summary");
    };
    eprintln!(
        "tiny ring storm: {} delivered, {lost} lost",
        summary.events.total()
    );
    assert!(
        lost > 0,
        "a one-page ring under two exec storms must lose events"
    );
    assert_eq!(summary.lost, lost);
    assert!(
        !summary.complete,
        "a trace with losses must not claim completeness"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_paths_resolve_relative_dotdot_symlink_chdir_rename_and_dirfd() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().canonicalize().expect("canonical tempdir");
    let d = d.display();
    // python3 for openat with a real dirfd (the shell only has AT_FDCWD), including a
    // directory renamed while open.
    let py = "import os\n\
              d = os.open('sub', os.O_RDONLY | os.O_DIRECTORY)\n\
              os.close(os.open('fdrel.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d))\n\
              os.mkdir('olddir')\n\
              o = os.open('olddir', os.O_RDONLY | os.O_DIRECTORY)\n\
              os.rename('olddir', 'newdir')\n\
              os.close(os.open('moved.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=o))\n";
    let script = format!(
        "set -e; cd {d}; echo x > rel.txt; mkdir sub; cd sub; echo y > ../up.txt; cd ..; \
         : > target.txt; ln -s {d}/target.txt link; echo z > link; mv up.txt renamed.txt; \
         /usr/bin/python3 -c \"{py}\""
    );
    let (records, lost) = traced_script(&service, &script).await;
    assert_eq!(lost, 0);
    let files = file_records(&records);
    let find = |op: &str, arg: &str| -> &FileRecord {
        files
            .iter()
            .copied()
            .find(|f| f.op == op && f.arg == arg && f.result >= 0)
            .unwrap_or_else(|| panic!("no successful {op} of {arg:?} in {files:#?}"))
    };
    // Relative to the cwd.
    assert_eq!(find("open", "rel.txt").path, format!("{d}/rel.txt"));
    // `..` from a chdir'ed subdirectory.
    assert_eq!(find("open", "../up.txt").path, format!("{d}/up.txt"));
    // Through a symlink: the file actually opened.
    let link = find("open", "link");
    assert_eq!(link.path, format!("{d}/target.txt"));
    assert_eq!(link.access.as_deref(), Some("write"));
    let symlink = find("symlink", &format!("{d}/target.txt"));
    assert_eq!(symlink.path2.as_deref(), Some(format!("{d}/link").as_str()));
    // chdir itself is recorded.
    assert!(
        files
            .iter()
            .any(|f| f.op == "chdir" && f.path == format!("{d}/sub"))
    );
    // rename: both ends resolved.
    let rename = find("rename", "up.txt");
    assert_eq!(rename.path, format!("{d}/up.txt"));
    assert_eq!(
        rename.path2.as_deref(),
        Some(format!("{d}/renamed.txt").as_str())
    );
    // openat with a dirfd.
    assert_eq!(find("open", "fdrel.txt").path, format!("{d}/sub/fdrel.txt"));
    // A dirfd whose directory was renamed while open: the kernel's current name.
    assert_eq!(
        find("open", "moved.txt").path,
        format!("{d}/newdir/moved.txt")
    );
    // Bytes written are aggregated per file.
    let writes: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Write(w) if w.path.as_deref() == Some(&format!("{d}/rel.txt")) => Some(w),
            _ => None,
        })
        .collect();
    assert_eq!(writes.len(), 1, "{records:#?}");
    assert_eq!(writes[0].bytes, 2);
}

// Completeness against `strace -f`: one command, run once under strace inside an observed
// cgroup, seen by both. Paths are compared as the program named them, resolved lexically
// against the directory they are relative to, and as the file actually opened.
//
// How the strace side learns that directory: `-y` makes strace decode every fd argument and
// result with its path (read from /proc while the tracee is stopped in the syscall), so
// `openat(AT_FDCWD</w/sub>, "a", …) = 3</w/sub/a>` carries the cwd (or the dirfd's directory)
// at that moment and the opened file. open(2) and creat(2) have no dirfd to decode: for them
// the cwd is tracked per pid from the log (the last decoded AT_FDCWD, chdir, fchdir, and a
// forked child inheriting its parent's at the fork). Calls are taken in the order they were
// entered, so a child's first call always comes after its parent's fork.
// (Threads sharing a cwd through CLONE_FS are tracked as separate pids: fine for openat,
// whose decoded AT_FDCWD is read fresh; the commands here run no threads that chdir.)

/// What strace records: the compared syscalls, plus the ones the per-pid cwd needs.
const STRACE_TRACE: &str =
    "trace=execve,open,openat,openat2,creat,chdir,fchdir,clone,clone3,fork,vfork";

/// What a run executed and opened, as kiln or as strace saw it.
#[derive(Debug, Default)]
struct Accesses {
    /// Successful `execve`s, by the path as passed.
    execs: BTreeSet<String>,
    /// Successful opens for reading, by path argument resolved against its directory.
    read: BTreeSet<String>,
    /// Successful opens for writing (write-only, read-write, `O_CREAT`, `O_TRUNC`, creat).
    written: BTreeSet<String>,
    /// The files actually opened for reading (symlinks resolved).
    read_real: BTreeSet<String>,
    /// The files actually opened for writing.
    written_real: BTreeSet<String>,
    /// Failed opens (`-errno`): the probes of search paths, by resolved path.
    failed: BTreeSet<String>,
    /// Successful opens as "syscall path" (open, creat, openat, openat2).
    by_syscall: BTreeSet<String>,
}

impl Accesses {
    /// Files one open touched: `path` resolved, `real` the opened file. `O_PATH` opens neither
    /// read nor write data and are left out on both sides.
    fn add_open(
        &mut self,
        syscall: &str,
        flags: u32,
        ok: bool,
        path: String,
        real: Option<String>,
    ) {
        let access = kilnd::observe::syscalls::open_access(flags);
        if access == "path" {
            return;
        }
        if !ok {
            self.failed.insert(path);
            return;
        }
        self.by_syscall.insert(format!("{syscall} {path}"));
        let (by_path, by_real) = if access == "read" {
            (&mut self.read, &mut self.read_real)
        } else {
            (&mut self.written, &mut self.written_real)
        };
        by_path.insert(path);
        by_real.insert(real.unwrap_or_else(|| "<no real path>".to_owned()));
    }
}

/// kiln's view of a run, without the tracer's own process (`skip_tgid`, not part of the run).
fn kiln_accesses(events: &[Event], skip_tgid: u32) -> Accesses {
    let mut seen = Accesses::default();
    for event in events {
        if event.header().tgid == skip_tgid {
            continue;
        }
        match event {
            Event::Exec(exec) => {
                seen.execs.insert(exec.filename.display().to_string());
            }
            Event::File(file) if matches!(file.nr, 2 | 85 | 257 | 437) => {
                let FileOp {
                    nr,
                    result,
                    path,
                    base,
                    flags,
                    real,
                    ..
                } = file.as_ref();
                let path = path.to_string_lossy();
                // kiln records no base for an absolute path. No base for a relative path would
                // be an observer defect: it is kept as given, so it shows up as a difference.
                let resolved = match base.as_deref() {
                    Some(base) => lexical(base, &path),
                    None if path.starts_with('/') => lexical(Path::new("/"), &path),
                    None => path.clone().into_owned(),
                };
                assert!(
                    *result < 0 || real.is_some(),
                    "a successful open has its real path: {resolved}"
                );
                let syscall = kilnd::observe::syscalls::name(*nr).unwrap_or("?");
                let real = real.as_ref().map(|r| r.display().to_string());
                seen.add_open(syscall, *flags, *result >= 0, resolved, real);
            }
            _ => {}
        }
    }
    seen
}

/// One syscall of a `strace -f -y` log, its unfinished and resumed halves joined.
#[derive(Debug)]
struct StraceCall {
    pid: u32,
    name: String,
    /// The text between the parentheses.
    args: String,
    /// The text after ` = `: the result, its decoded path, the errno.
    ret: String,
}

impl StraceCall {
    /// The result as a number (`-1` for a failure; `None` for `?`).
    fn result(&self) -> Option<i64> {
        let digits: String = self
            .ret
            .chars()
            .take_while(|c| *c == '-' || c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    }

    /// The first quoted string argument (the path), as printed.
    fn path(&self) -> &str {
        self.args.split('"').nth(1).unwrap_or_default()
    }

    /// The text after the first quoted argument (flags, mode, `struct open_how`).
    fn after_path(&self) -> &str {
        self.args.split('"').nth(2).unwrap_or_default()
    }

    /// The path `-y` decoded for the first argument (a dirfd, or fchdir's fd).
    fn first_fd_path(&self) -> Option<&str> {
        let head = self.args.split('"').next().unwrap_or_default();
        fd_path(head.split(',').next().unwrap_or_default())
    }

    /// The path `-y` decoded for the returned fd.
    fn ret_fd_path(&self) -> Option<&str> {
        fd_path(self.ret.split_whitespace().next().unwrap_or_default())
    }
}

/// `3</a/b>` or `AT_FDCWD</a/b>` → `/a/b`.
fn fd_path(decoded: &str) -> Option<&str> {
    let (_, rest) = decoded.split_once('<')?;
    rest.trim_end().strip_suffix('>')
}

/// Parses a `strace -f` log into calls, in the order they were entered.
fn parse_strace(text: &str) -> Vec<StraceCall> {
    let mut calls: Vec<StraceCall> = Vec::new();
    let mut unfinished: HashMap<u32, usize> = HashMap::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<u32>() else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with("---") || rest.starts_with("+++") {
            continue; // signals, exits
        }
        if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            let Some((name, args)) = head.split_once('(') else {
                continue;
            };
            unfinished.insert(pid, calls.len());
            calls.push(StraceCall {
                pid,
                name: name.to_owned(),
                args: args.to_owned(),
                ret: String::new(),
            });
            continue;
        }
        // The result follows the last " = " (strace pads short lines before it).
        let Some((call, result)) = rest.rsplit_once(" = ") else {
            continue;
        };
        let call = call.trim_end();
        if let Some(resumed) = call.strip_prefix("<... ") {
            let Some(index) = unfinished.remove(&pid) else {
                continue;
            };
            let tail = resumed.split_once("resumed>").map_or("", |(_, t)| t);
            let entry = &mut calls[index];
            entry.args.push_str(tail.strip_suffix(')').unwrap_or(tail));
            result.clone_into(&mut entry.ret);
        } else if let Some((name, args)) = call.split_once('(') {
            calls.push(StraceCall {
                pid,
                name: name.to_owned(),
                args: args.strip_suffix(')').unwrap_or(args).to_owned(),
                ret: result.to_owned(),
            });
        }
    }
    calls
}

/// Numeric open flags from strace's symbolic ones (only the bits `open_access` looks at).
fn strace_open_flags(text: &str) -> u32 {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map(|flag| match flag {
            "O_WRONLY" => 0o1,
            "O_RDWR" => 0o2,
            "O_CREAT" => 0o100,
            "O_TRUNC" => 0o1000,
            "O_PATH" => 0o10_000_000,
            _ => 0,
        })
        .fold(0, |all, bit| all | bit)
}

/// strace's view of a run started in `cwd`.
fn strace_accesses(calls: &[StraceCall], cwd: &Path) -> Accesses {
    let mut seen = Accesses::default();
    let mut cwds: HashMap<u32, PathBuf> = HashMap::new();
    for call in calls {
        // Unknown pid: the command strace started, in `cwd`; every later one was forked.
        let here = cwds
            .entry(call.pid)
            .or_insert_with(|| cwd.to_owned())
            .clone();
        let result = call.result();
        let ok = result.is_some_and(|r| r >= 0);
        let (flags, base) = match call.name.as_str() {
            "execve" if ok => {
                seen.execs.insert(call.path().to_owned());
                continue;
            }
            "chdir" if ok => {
                cwds.insert(call.pid, PathBuf::from(lexical(&here, call.path())));
                continue;
            }
            "fchdir" if ok => {
                let dir = call.first_fd_path().expect("fchdir's fd decoded by -y");
                cwds.insert(call.pid, PathBuf::from(dir));
                continue;
            }
            "clone" | "clone3" | "fork" | "vfork" => {
                if let Some(child) = result.and_then(|r| u32::try_from(r).ok()) {
                    cwds.insert(child, here);
                }
                continue;
            }
            "open" => (strace_open_flags(call.after_path()), here),
            "creat" => (0o1 | 0o100 | 0o1000, here),
            "openat" | "openat2" => {
                let dir = call
                    .first_fd_path()
                    .unwrap_or_else(|| panic!("dirfd not decoded by -y: {call:?}"));
                if call.args.starts_with("AT_FDCWD<") {
                    cwds.insert(call.pid, PathBuf::from(dir));
                }
                (strace_open_flags(call.after_path()), PathBuf::from(dir))
            }
            _ => continue,
        };
        let real = call.ret_fd_path().map(str::to_owned);
        seen.add_open(&call.name, flags, ok, lexical(&base, call.path()), real);
    }
    seen
}

fn lexical(cwd: &Path, path: &str) -> String {
    let joined = cwd.join(path);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out.display().to_string()
}

/// Equal sets, or a panic naming what only one side has.
fn assert_same(what: &str, kiln: &BTreeSet<String>, strace: &BTreeSet<String>) {
    let only_kiln: Vec<&String> = kiln.difference(strace).collect();
    let only_strace: Vec<&String> = strace.difference(kiln).collect();
    assert!(
        only_kiln.is_empty() && only_strace.is_empty(),
        "{what} differ:\n  only kiln: {only_kiln:#?}\n  only strace: {only_strace:#?}"
    );
}

/// Whether strace is installed; prints why not, and fails under CI=true.
fn strace_available() -> bool {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "strace is missing (apt-get install strace) and CI=true forbids skipping"
    );
    eprintln!("skipping: strace not installed");
    false
}

/// Runs `argv` in `cwd` under `strace -f` inside a freshly observed cgroup and asserts that
/// kiln and strace saw the same executed binaries and the same files opened (for reading,
/// for writing, failed; by path as named, by file actually opened, and per open syscall).
/// At least `min_execs` distinct binaries must have run, so an observer that sees nothing
/// cannot pass. Returns kiln's view for the caller's own checks.
///
/// The only difference allowed: strace's own process (its exec, its log file) is not part of
/// the run and is left out of kiln's side; strace records nothing of itself.
async fn assert_matches_strace(argv: &[&str], cwd: &Path, min_execs: usize) -> Accesses {
    let (mut observer, mut stream, cgroup) = observe_new_cgroup(&ObserverConfig::default());
    let log_dir = tempfile::tempdir().expect("tempdir for the strace log");
    let log = log_dir.path().join("strace.out");
    let log_arg = log.display().to_string();
    let mut strace_args = vec![
        "-f",
        "-qq",
        "-y",
        "-s",
        "4096",
        "-e",
        STRACE_TRACE,
        "-o",
        &log_arg,
    ];
    strace_args.extend_from_slice(argv);
    let mut cmd = cgroup.command("/usr/bin/strace", &strace_args);
    // A fixed environment: the same binaries and PATH probes on every machine, C locale.
    cmd.current_dir(cwd)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C");
    let strace_pid = {
        let child = cmd.spawn().expect("spawn strace");
        let pid = child.id().expect("pid");
        assert!(wait(child).await.success(), "{argv:?} under strace failed");
        pid
    };
    let events = collect_until_quiet(&mut stream).await;
    assert_eq!(observer.lost().expect("lost"), 0, "kiln lost events");
    assert_eq!(observer.unobserve_cgroup(cgroup.id).expect("unobserve"), 0);

    let kiln = kiln_accesses(&events, strace_pid);
    let text = std::fs::read_to_string(&log).expect("strace log");
    let strace = strace_accesses(&parse_strace(&text), cwd);
    eprintln!(
        "{:?} vs strace: {} execs, {} files written, {} read, {} failed opens, {} opens",
        argv.first(),
        kiln.execs.len(),
        kiln.written.len(),
        kiln.read.len(),
        kiln.failed.len(),
        kiln.by_syscall.len(),
    );
    assert!(
        kiln.execs.len() >= min_execs,
        "expected at least {min_execs} distinct execs: {:?}",
        kiln.execs
    );
    assert_same("executed binaries", &kiln.execs, &strace.execs);
    assert_same("files opened for writing", &kiln.written, &strace.written);
    assert_same("files opened for reading", &kiln.read, &strace.read);
    assert_same(
        "real files written",
        &kiln.written_real,
        &strace.written_real,
    );
    assert_same("real files read", &kiln.read_real, &strace.read_real);
    assert_same("failed opens", &kiln.failed, &strace.failed);
    assert_same("opens per syscall", &kiln.by_syscall, &strace.by_syscall);
    kiln
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compile_matches_strace_execs_and_files() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() || !strace_available() {
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-c/src");
    let work = tempfile::tempdir().expect("tempdir");
    let cwd = work.path().canonicalize().expect("canonical");
    std::fs::copy(src.join("hello.c"), cwd.join("hello.c")).expect("copy hello.c");
    // The hello-c compile command (examples/hello-c/pipeline.toml).
    let compile = [
        "cc",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-std=c11",
        "-DGREETING=\"hello, kiln\"",
        "-o",
        "hello",
        "hello.c",
    ];
    let kiln = assert_matches_strace(&compile, &cwd, 4).await;
    let d = cwd.display();
    assert!(kiln.read.contains(&format!("{d}/hello.c")), "{kiln:#?}");
    assert!(kiln.written.contains(&format!("{d}/hello")), "{kiln:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_pipeline_matches_strace_execs_and_files() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() || !strace_available() {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let cwd = work.path().canonicalize().expect("canonical");
    std::fs::write(cwd.join("in.txt"), "b\na\nb\nc\n").expect("write in.txt");
    std::fs::create_dir(cwd.join("sub")).expect("mkdir sub");
    std::fs::write(cwd.join("sub/a.txt"), "alpha\n").expect("write a.txt");
    std::fs::write(cwd.join("sub/b.txt"), "beta\n").expect("write b.txt");
    std::os::unix::fs::symlink("a.txt", cwd.join("sub/link.txt")).expect("symlink");
    // open(2), creat(2) and openat2(2) directly (libc and the shell use openat), relative to a
    // cwd the process chdir'ed to: the cases without a dirfd for strace to decode.
    let raw = "import ctypes, os\n\
               libc = ctypes.CDLL(None, use_errno=True)\n\
               L = ctypes.c_long\n\
               def ok(fd):\n\
               \x20   assert fd >= 0, os.strerror(ctypes.get_errno())\n\
               \x20   os.close(fd)\n\
               os.chdir('sub')\n\
               ok(libc.syscall(L(2), b'link.txt', L(os.O_RDONLY)))\n\
               ok(libc.syscall(L(85), b'created.txt', L(0o644)))\n\
               how = (ctypes.c_uint64 * 3)(os.O_RDONLY, 0, 0)\n\
               ok(libc.syscall(L(437), L(-100), b'../in.txt', how, L(24)))\n\
               how = (ctypes.c_uint64 * 3)(os.O_WRONLY | os.O_CREAT, 0o644, 0)\n\
               ok(libc.syscall(L(437), L(-100), b'../via-openat2.txt', how, L(24)))\n\
               assert libc.syscall(L(2), b'missing.txt', L(os.O_RDONLY)) < 0\n";
    // Pipes, a subshell that changes directory, xargs, redirections that create, truncate and
    // append, relative paths and `..`.
    let script = format!(
        "set -e\n\
         cat in.txt | sort | uniq -c > counts.txt\n\
         ls sub | wc -l > n.txt\n\
         (cd sub && cat a.txt b.txt ../in.txt) | tr a-z A-Z >> counts.txt\n\
         find sub -name '*.txt' | sort | xargs cat > all.txt\n\
         /usr/bin/python3 -c \"{raw}\"\n"
    );
    let kiln = assert_matches_strace(&["/bin/sh", "-c", &script], &cwd, 10).await;
    let d = cwd.display();
    for read in [
        format!("{d}/in.txt"),
        format!("{d}/sub/a.txt"),
        format!("{d}/sub/link.txt"),
    ] {
        assert!(kiln.read.contains(&read), "{read} not read: {kiln:#?}");
    }
    for written in [
        "counts.txt",
        "n.txt",
        "all.txt",
        "sub/created.txt",
        "via-openat2.txt",
    ] {
        let path = format!("{d}/{written}");
        assert!(
            kiln.written.contains(&path),
            "{path} not written: {kiln:#?}"
        );
    }
    for (syscall, path) in [
        ("open", "sub/link.txt"),
        ("creat", "sub/created.txt"),
        ("openat2", "in.txt"),
    ] {
        let key = format!("{syscall} {d}/{path}");
        assert!(kiln.by_syscall.contains(&key), "no {key}: {kiln:#?}");
    }
    assert!(kiln.read_real.contains(&format!("{d}/sub/a.txt")));
    assert!(kiln.failed.contains(&format!("{d}/sub/missing.txt")));
    assert!(
        std::fs::read_to_string(cwd.join("counts.txt"))
            .expect("counts.txt")
            .contains("ALPHA")
    );
}

// ---------------------------------------------------------------------------------------------
// Network through the cgroup socket hooks, sandbox setup filtering, materials.

use kiln_common::trace::{Material, SockRecord, TraceSummary};

fn summary_of(records: &[TraceRecord]) -> &TraceSummary {
    match records.last() {
        Some(TraceRecord::Summary(summary)) => summary,
        other => panic!("trace does not end with its summary: {other:?}"),
    }
}

fn sock_records(records: &[TraceRecord]) -> Vec<&SockRecord> {
    records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Sock(sock) => Some(sock),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_udp_destinations_are_recorded_and_allowed() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    // A real listener on loopback: the step's connect must succeed (the hooks only observe).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind listener");
    let port = listener.local_addr().expect("addr").port();
    let accept = std::thread::spawn(move || listener.accept().map(drop));
    // A host process connecting at the same time must not appear.
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind host listener");
    let host_port = host_listener.local_addr().expect("addr").port();
    let host = std::thread::spawn(move || std::net::TcpStream::connect(("127.0.0.1", host_port)));
    // A port for the step's own listener (free a moment ago).
    let listen_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // TCP connect (connect4), UDP connect (connect4), unconnected UDP send (sendmsg6); a bound
    // listener, a listen on an unbound socket (the kernel picks the address), and a listen on
    // a UDP socket (fails: EOPNOTSUPP).
    let script = format!(
        "python3 -c 'import socket as S\n\
         t = S.create_connection((\"127.0.0.1\", {port})); t.close()\n\
         u = S.socket(S.AF_INET, S.SOCK_DGRAM); u.connect((\"127.0.0.1\", 9))\n\
         v = S.socket(S.AF_INET6, S.SOCK_DGRAM); v.sendto(b\"x\", (\"::1\", 9))\n\
         l = S.socket(); l.bind((\"127.0.0.1\", {listen_port})); l.listen(1)\n\
         a = S.socket(S.AF_INET6); a.listen(1)\n\
         d = S.socket(S.AF_INET, S.SOCK_DGRAM)\n\
         try: d.listen(1)\n\
         except OSError: pass'"
    );
    let (records, lost) = traced_script(&service, &script).await;
    assert!(
        accept.join().expect("accept thread").is_ok(),
        "the connect reached the listener"
    );
    assert!(host.join().expect("host thread").is_ok());
    assert_eq!(lost, 0);
    let socks = sock_records(&records);
    let seen: Vec<(&str, &str, u16, &str)> = socks
        .iter()
        .map(|s| (s.hook.as_str(), s.ip.as_str(), s.port, s.protocol.as_str()))
        .collect();
    assert!(
        seen.contains(&("connect4", "127.0.0.1", port, "tcp")),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("connect4", "127.0.0.1", 9, "udp")),
        "{seen:?}"
    );
    assert!(seen.contains(&("sendmsg6", "::1", 9, "udp")), "{seen:?}");
    assert!(
        !seen.iter().any(|s| s.2 == host_port),
        "a host process's connect leaked into the step's trace: {seen:?}"
    );
    // listen: the socket's local address from the kernel, and the result.
    let listens: Vec<(&str, Option<&str>, Option<u16>, i64)> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Net(n) if n.op == "listen" => {
                Some((n.family.as_str(), n.ip.as_deref(), n.port, n.result))
            }
            _ => None,
        })
        .collect();
    assert_eq!(listens.len(), 3, "{listens:?}");
    assert!(
        listens.contains(&("inet", Some("127.0.0.1"), Some(listen_port), 0)),
        "{listens:?}"
    );
    assert!(
        listens.iter().any(|l| l.0 == "inet6"
            && l.1 == Some("::")
            && l.2.is_some_and(|p| p != 0)
            && l.3 == 0),
        "an unbound listener is auto-bound to a port: {listens:?}"
    );
    assert!(
        listens.contains(&("af-0", None, None, -i64::from(libc::EOPNOTSUPP))),
        "{listens:?}"
    );
    let summary = summary_of(&records);
    assert_eq!(summary.events.sock, socks.len() as u64);
    assert!(summary.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_and_never_closed_are_counted_and_named() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().canonicalize().expect("canonical");
    // Written in three calls and never closed: the kernel closes it at exit, without a close
    // syscall, so only the exit program (or the end-of-step sweep) can report it. Plus a file closed normally, a
    // dup2 over a written fd (which closes it), a written fd closed by close_range (no close
    // syscall) whose number the next open reuses (each file keeps its own bytes), and copies by
    // sendfile and copy_file_range (cp uses the latter).
    let script = format!(
        "cd {d} && python3 -c 'import os\n\
         k = os.open(\"kept.txt\", os.O_WRONLY | os.O_CREAT, 0o600)\n\
         for _ in range(3): os.write(k, b\"abcd\")\n\
         c = os.open(\"closed.txt\", os.O_WRONLY | os.O_CREAT, 0o600); os.write(c, b\"xy\"); os.close(c)\n\
         r = os.open(\"replaced.txt\", os.O_WRONLY | os.O_CREAT, 0o600); os.write(r, b\"z\")\n\
         n = os.open(\"/dev/null\", os.O_WRONLY); os.dup2(n, r)\n\
         import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n\
         a = os.open(\"ranged.txt\", os.O_WRONLY | os.O_CREAT, 0o600); os.write(a, b\"aaa\")\n\
         assert libc.syscall(436, a, a, 0) == 0, ctypes.get_errno()\n\
         b = os.open(\"reused.txt\", os.O_WRONLY | os.O_CREAT, 0o600); assert b == a\n\
         os.write(b, b\"bbbbb\"); os.close(b)\n\
         src = os.open(\"kept.txt\", os.O_RDONLY)\n\
         out = os.open(\"sent.txt\", os.O_WRONLY | os.O_CREAT, 0o600)\n\
         assert os.sendfile(out, src, 0, 12) == 12; os.close(out)\n\
         out = os.open(\"copied.txt\", os.O_WRONLY | os.O_CREAT, 0o600)\n\
         assert os.copy_file_range(src, out, 12, 0) == 12; os.close(out)\n\
         os._exit(0)'",
        d = d.display()
    );
    let (records, lost) = traced_script(&service, &script).await;
    assert_eq!(lost, 0);
    let written: Vec<(Option<&str>, u64, u64)> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Write(w) => Some((w.path.as_deref(), w.bytes, w.writes)),
            _ => None,
        })
        .collect();
    for (name, bytes, writes) in [
        ("kept.txt", 12, 3),
        ("closed.txt", 2, 1),
        ("replaced.txt", 1, 1),
        ("ranged.txt", 3, 1),
        ("reused.txt", 5, 1),
        ("sent.txt", 12, 1),
        ("copied.txt", 12, 1),
    ] {
        let path = format!("{}/{name}", d.display());
        assert!(
            written.contains(&(Some(path.as_str()), bytes, writes)),
            "{name}: {written:?}"
        );
    }
    // The never-closed total is ended by its process's exit (before the kernel closes the
    // files), not left in the kernel map until the step ends: its record precedes the exit.
    let kept = format!("{}/kept.txt", d.display());
    let (kept_t, kept_pid) = records
        .iter()
        .find_map(|r| match r {
            TraceRecord::Write(w) if w.path.as_deref() == Some(kept.as_str()) => Some((w.t, w.pid)),
            _ => None,
        })
        .expect("kept.txt write");
    let exit_t = records
        .iter()
        .find_map(|r| match r {
            TraceRecord::Exit(x) if x.pid == kept_pid => Some(x.t),
            _ => None,
        })
        .expect("python's exit");
    assert!(kept_t <= exit_t, "write at {kept_t}, exit at {exit_t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_step_holds_at_most_its_quota_of_write_totals() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let (hog_dir, other_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    // 4300 files written and held open at once: 204 past the per-step quota of 4096.
    let hog = format!(
        "cd {} && python3 -c 'import os, resource\n\
         soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 6000), hard))\n\
         fds = [os.open(\"f%d\" % i, os.O_WRONLY | os.O_CREAT, 0o600) for i in range(4300)]\n\
         for fd in fds: os.write(fd, b\"x\")'",
        hog_dir.path().display()
    );
    let other = format!(
        "cd {} && i=0; while [ $i -lt 20 ]; do echo x > n$i.txt; i=$((i+1)); done",
        other_dir.path().display()
    );
    let ((hog_records, hog_lost), (other_records, other_lost)) = tokio::join!(
        traced_script(&service, &hog),
        traced_script(&service, &other)
    );
    assert!(
        hog_lost >= 204,
        "the hog's totals past its quota are lost: {hog_lost}"
    );
    assert!(!summary_of(&hog_records).complete, "and its trace says so");
    assert_eq!(other_lost, 0, "the other step is not affected");
    assert!(summary_of(&other_records).complete);
    let other_prefix = format!("{}/n", other_dir.path().display());
    let named = other_records
        .iter()
        .filter(|r| matches!(r, TraceRecord::Write(w) if w.path.as_deref().is_some_and(|p| p.starts_with(&other_prefix))))
        .count();
    assert_eq!(named, 20, "{other_records:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_arguments_in_shared_memory_are_flagged() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().canonicalize().expect("canonical");
    for name in [
        "in-shared.txt",
        "in-file.txt",
        "straddle.txt",
        "in-private.txt",
        "cached-private.txt",
        "remapped-shared.txt",
        "after-thread.txt",
    ] {
        std::fs::write(d.join(name), b"x").expect("fixture");
    }
    // One single-threaded process: a path in a MAP_SHARED mapping (another process holding the
    // mapping could rewrite it during the call), one in a private mapping of a file on a
    // writable mount (another process writing the file changes the uncopied page), then one in
    // its private memory.
    let script = format!(
        "cd {} && python3 -c 'import ctypes, mmap, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         m = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)\n\
         m[:14] = b\"in-shared.txt\\0\"\n\
         addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n\
         assert libc.unlink(ctypes.c_char_p(addr)) == 0, ctypes.get_errno()\n\
         open(\"names\", \"wb\").write(b\"in-file.txt\\0\")\n\
         f = os.open(\"names\", os.O_RDWR)\n\
         p = mmap.mmap(f, 12, flags=mmap.MAP_PRIVATE)\n\
         addr = ctypes.addressof(ctypes.c_char.from_buffer(p))\n\
         assert libc.unlink(ctypes.c_char_p(addr)) == 0, ctypes.get_errno()\n\
         libc.mmap.restype = ctypes.c_void_p\n\
         libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\n\
         base = libc.mmap(None, 8192, 3, 0x22, -1, 0)\n\
         assert libc.mmap(base + 4096, 4096, 3, 0x31, -1, 0) == base + 4096\n\
         ctypes.memmove(base + 4090, b\"straddle.txt\\0\", 13)\n\
         assert libc.unlink(ctypes.c_char_p(base + 4090)) == 0, ctypes.get_errno()\n\
         os.unlink(\"in-private.txt\")\n\
         page = libc.mmap(None, 4096, 3, 0x22, -1, 0)\n\
         ctypes.memmove(page, b\"cached-private.txt\\0\", 19)\n\
         assert libc.unlink(ctypes.c_char_p(page)) == 0, ctypes.get_errno()\n\
         mfd = os.memfd_create(\"names\")\n\
         os.ftruncate(mfd, 4096)\n\
         assert libc.mmap(page, 4096, 3, 0x11, mfd, 0) == page\n\
         ctypes.memmove(page, b\"remapped-shared.txt\\0\", 20)\n\
         assert libc.unlink(ctypes.c_char_p(page)) == 0, ctypes.get_errno()\n\
         import threading; t = threading.Thread(target=lambda: None); t.start(); t.join()\n\
         os.unlink(\"after-thread.txt\")'",
        d.display()
    );
    let (records, lost) = traced_script(&service, &script).await;
    assert_eq!(lost, 0);
    let unlink = |name: &str| unlink_of(&records, name);
    assert!(
        unlink("in-shared.txt").args_shared,
        "a path in a shared mapping"
    );
    assert!(
        unlink("in-file.txt").args_shared,
        "a path in a writable file's private mapping"
    );
    assert!(
        unlink("straddle.txt").args_shared,
        "a path starting in private memory and ending in a shared page"
    );
    // The verdict for a page is cached per process until its mappings change: the same page,
    // private when the first path was read from it, then mapped over (MAP_FIXED) by a memfd.
    assert!(
        !unlink("cached-private.txt").args_shared,
        "a path in private memory"
    );
    assert!(
        unlink("remapped-shared.txt").args_shared,
        "a path in a page that was private and is now shared (a stale cached verdict)"
    );
    // The process once had a second thread (gone by now, the counts back at 1): a thread could
    // have rewritten an argument and exited before the call returned, so the mark stays.
    assert!(
        unlink("after-thread.txt").args_shared,
        "a process that had another thread"
    );
    assert!(
        !unlink("in-private.txt").args_shared,
        "a path in private memory"
    );
}

/// A process that shared its memory with a child process it did not wait for (clone(CLONE_VM)
/// without CLONE_VFORK: both ran), after the child exited; and before that, one whose
/// posix_spawn child shared its memory only while the parent was suspended (CLONE_VFORK).
const CLONE_VM_C: &str = r#"
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;
static int child(void *arg) { (void)arg; return 0; }
/* The paths are copied to the stack: a literal would lie in this binary's private mapping of
 * a file on a writable mount, which is flagged on its own. */
static int unlink_copy(const char *name) {
	char path[64];
	strcpy(path, name);
	return unlink(path);
}
int main(void) {
	char *argv[] = {"true", NULL};
	pid_t pid;
	if (posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ) != 0) return 1;
	if (waitpid(pid, NULL, 0) != pid || unlink_copy("after-spawn.txt") != 0) return 2;
	char *stack = malloc(1 << 16);
	pid = clone(child, stack + (1 << 16), CLONE_VM | SIGCHLD, NULL);
	if (pid < 0 || waitpid(pid, NULL, 0) != pid) return 3;
	return unlink_copy("after-clone-vm.txt") != 0 ? 4 : 0;
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_shared_its_memory_with_a_running_child_stays_flagged() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().canonicalize().expect("canonical");
    compile_c(&d, "clonevm", CLONE_VM_C, &[]);
    for name in ["after-spawn.txt", "after-clone-vm.txt"] {
        std::fs::write(d.join(name), b"x").expect("fixture");
    }
    let script = format!("cd {} && ./clonevm", d.display());
    let (records, lost) = traced_script(&service, &script).await;
    assert_eq!(lost, 0);
    let unlink = |name: &str| unlink_of(&records, name);
    assert!(
        !unlink("after-spawn.txt").args_shared,
        "a posix_spawn parent is suspended while its child shares its memory"
    );
    assert!(
        unlink("after-clone-vm.txt").args_shared,
        "the CLONE_VM child ran beside its parent and could have rewritten its arguments"
    );
}

/// A step thread that rewrites `openat2`'s arguments while the call runs (the kernel has read
/// them at the start): O_RDWR on `target` becomes O_PATH on `decoy` in the process's memory
/// before sys_exit. Prints how many opens the kernel made O_RDWR on target while the argument
/// already read otherwise, and how many opens succeeded. Then an unlink from the same
/// (multi-threaded) process.
const ARG_RACER_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static struct open_how how;
static char path[4096];
static atomic_int gen, done;
static _Atomic long flipped_at;
static long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
static void *flip(void *unused) {
    int seen = 0;
    for (;;) {
        int g;
        while ((g = atomic_load(&gen)) == seen) {}
        seen = g;
        if (g < 0) return unused;
        long s = now();
        while (now() - s < 5000) {}
        how.flags = O_PATH;
        memcpy(path, "decoy", 6);
        atomic_store(&flipped_at, now());
        atomic_store(&done, g);
    }
}
int main(void) {
    int rewritten = 0, opened = 0, n = 200;
    pthread_t t;
    pthread_create(&t, 0, flip, 0);
    for (int i = 1; i <= n; i++) {
        char *p = path;
        for (int k = 0; k < 1990; k++) { *p++ = '.'; *p++ = '/'; }
        strcpy(p, "target");
        how.flags = O_RDWR;
        atomic_store(&gen, i);
        int fd = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
        long returned = now();
        while (atomic_load(&done) != i) {}
        /* Rewritten before the syscall returned, hence before its sys_exit. */
        if (fd >= 0 && (fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDWR && atomic_load(&flipped_at) < returned) rewritten++;
        if (fd >= 0) opened++, close(fd);
    }
    unlink("threaded.txt");
    printf("%d %d\n", rewritten, opened);
    return 0;
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_arguments_cannot_forge_access_and_are_flagged() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().canonicalize().expect("canonical");
    compile_c(&d, "racer", ARG_RACER_C, &["-pthread"]);
    for name in ["target", "threaded.txt", "single.txt"] {
        std::fs::write(d.join(name), b"x").expect("fixture");
    }
    let out = d.join("rewritten");
    let script = format!(
        "cd {d} && ./racer > {out} && rm single.txt",
        d = d.display(),
        out = out.display()
    );
    let (records, lost) = traced_script(&service, &script).await;
    assert_eq!(lost, 0);
    // How many arguments were rewritten before sys_exit, and how many opens succeeded: the
    // kernel opens `target` unless the rewrite came before it read the path (a preempted
    // caller: then it looked for `decoy`, which does not exist, and the open failed).
    let counts: Vec<usize> = std::fs::read_to_string(&out)
        .expect("racer output")
        .split_whitespace()
        .map(|n| n.parse().expect("a count"))
        .collect();
    let [rewritten, opened] = counts[..] else {
        panic!("racer output: {counts:?}");
    };
    // The attack worked on the process's memory (else this test proves nothing)...
    assert!(rewritten > 0, "the racer never rewrote an argument in time");
    let target = format!("{}/target", d.display());
    let opens: Vec<&FileRecord> = file_records(&records)
        .into_iter()
        .filter(|f| f.syscall == "openat2" && f.result >= 0)
        .collect();
    assert!(opened > 0, "no open of target succeeded");
    assert_eq!(
        opens.len(),
        opened,
        "every open that succeeded (each of target) was recorded"
    );
    for open in &opens {
        // ...but the trace has the kernel's file and access mode, and says the arguments are
        // the process's word.
        assert_eq!(open.path, target, "{open:?}");
        assert_eq!(open.access.as_deref(), Some("read-write"), "{open:?}");
        assert!(open.args_shared, "{open:?}");
    }
    let unlink = |name: &str| unlink_of(&records, name);
    assert!(unlink("threaded.txt").args_shared, "a threaded process");
    assert!(!unlink("single.txt").args_shared, "rm is single-threaded");
    eprintln!("racer rewrote {rewritten}/200 arguments before sys_exit; {opened} opens succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_setup_paths_do_not_leak_into_the_trace() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    // Stands for the host directories the sandbox helper builds the root from.
    let host_dir = tempfile::tempdir().expect("tempdir");
    let marker = host_dir.path().join("kiln-host-setup-marker");
    std::fs::write(&marker, b"host").expect("write marker");
    let marker_c = std::ffi::CString::new(marker.as_os_str().as_encoded_bytes()).expect("cstr");

    let cgroup = TestCgroup::new();
    let observation = service.attach(cgroup.id).expect("attach");
    let mut cmd = cgroup.command("/bin/cat", &["/etc/hostname"]);
    // Like the helper: inside the observed cgroup, touch host paths, then exec the step.
    // SAFETY: runs between fork and exec; open(2) and close(2) are async-signal-safe, the path
    // was allocated before the fork, nothing is allocated here.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(marker_c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    assert!(wait(cmd.spawn().expect("spawn")).await.success());
    let collected = observation.finish().await.expect("finish");
    // The raw events do have the setup open: the kernel saw it.
    assert!(
        format!("{:?}", collected.events).contains("kiln-host-setup-marker"),
        "the setup open was not observed at all, the test proves nothing"
    );
    let assembled = assemble::assemble(&collected.events, collected.lost, &context(&cgroup, false))
        .expect("assemble");
    let text = String::from_utf8(assemble::decompress(&assembled.blob).expect("decompress"))
        .expect("utf-8");
    assert!(
        !text.contains("kiln-host-setup-marker"),
        "a host path of the setup leaked into the trace"
    );
    assert!(
        text.contains("/etc/hostname"),
        "the step's own open is kept"
    );
    assert!(assembled.summary.setup_events_omitted >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materials_are_the_executed_and_read_environment_files_with_their_digests() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let scratch = tempfile::tempdir().expect("tempdir");
    let script = format!(
        "/bin/cat /etc/hostname >/dev/null && echo out > {0}/out && cat {0}/out >/dev/null",
        scratch.path().display()
    );
    let (records, lost) = traced_script(&service, &script).await;
    assert_eq!(lost, 0);
    let summary = summary_of(&records);
    let find = |path: &Path| -> &Material {
        let path = std::fs::canonicalize(path).expect("canonicalize");
        let path = path.to_str().expect("utf-8 path");
        summary
            .materials
            .iter()
            .find(|m| m.path == path)
            .unwrap_or_else(|| panic!("{path} is not a material: {:?}", summary.materials))
    };
    for (path, used_as) in [
        (Path::new("/bin/cat"), "exec"),
        (Path::new("/bin/sh"), "exec"),
        (Path::new("/etc/hostname"), "read"),
    ] {
        let material = find(path);
        let bytes = std::fs::read(path).expect("read");
        assert_eq!(
            material.sha256,
            kiln_common::Digest::of(&bytes).hex(),
            "{}",
            path.display()
        );
        assert_eq!(material.size, bytes.len() as u64);
        assert!(
            material.used_as.iter().any(|u| u == used_as),
            "{material:?}"
        );
    }
    assert!(
        summary.materials.iter().all(|m| !m.path.starts_with("/tmp")
            && !m.path.starts_with("/dev")
            && !m.path.starts_with("/proc")),
        "step-private and pseudo files are not materials: {:?}",
        summary.materials
    );
    assert_eq!(summary.materials_omitted, 0, "{records:?}");
}

/// File events of `/bin/cat /etc/hostname` in `cgroup`.
async fn hostname_opens(cgroup: &TestCgroup, stream: &mut EventStream) -> usize {
    let child = cgroup
        .command("/bin/cat", &["/etc/hostname"])
        .spawn()
        .expect("spawn cat");
    assert!(wait(child).await.success());
    let events = collect_until_quiet(stream).await;
    count(
        &events,
        |e| matches!(e, Event::File(f) if f.path == Path::new("/etc/hostname") && f.result >= 0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscall_programs_are_attached_only_while_a_cgroup_is_observed() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let (mut observer, mut stream, cgroup) = observe_new_cgroup(&ObserverConfig::default());
    let other = TestCgroup::new();
    observer
        .observe_cgroup(other.id)
        .expect("observe a second cgroup");
    assert_eq!(hostname_opens(&cgroup, &mut stream).await, 1);
    observer.unobserve_cgroup(other.id).expect("unobserve");
    assert!(
        !observer.detach_syscalls_if_idle(),
        "a cgroup is still observed: the syscall programs must stay"
    );
    assert_eq!(
        hostname_opens(&cgroup, &mut stream).await,
        1,
        "still observed after another cgroup left"
    );
    observer.unobserve_cgroup(cgroup.id).expect("unobserve");
    assert!(observer.detach_syscalls_if_idle());
    // Observing again attaches them again, before anything runs.
    observer.observe_cgroup(cgroup.id).expect("observe again");
    assert_eq!(hostname_opens(&cgroup, &mut stream).await, 1);
    assert_eq!(observer.lost().expect("lost"), 0);
}

/// `threadexit N`: N processes one after another, each of THREADS threads that leave at the
/// same moment (a barrier, then each its own exit(2), the main thread included: no
/// exit_group), so two of them can both be past the process's last-thread count at once.
const THREADS_EXIT_C: &str = r"
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#define THREADS 4
static pthread_barrier_t barrier;
static void *leave(void *unused) {
    pthread_barrier_wait(&barrier);
    syscall(SYS_exit, 0);
    return unused;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            pthread_t t;
            pthread_barrier_init(&barrier, 0, THREADS);
            for (int k = 1; k < THREADS; k++) pthread_create(&t, 0, leave, 0);
            leave(0);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || status != 0) return 1;
    }
    return 0;
}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_leaving_together_give_one_exit_record_per_process() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    compile_c(dir.path(), "threadexit", THREADS_EXIT_C, &["-pthread"]);
    let (mut observer, mut stream, cgroup) = observe_new_cgroup(&ObserverConfig::default());
    let processes = 1000;
    let script = format!("{} {processes}", dir.path().join("threadexit").display());
    let (events, _) = run_consuming(&cgroup, &mut stream, &script).await;
    let mut exits = std::collections::HashMap::<(u32, u64), usize>::new();
    for event in &events {
        if let Event::Exit(exit) = event {
            *exits.entry((exit.header.tgid, exit.start_ns)).or_default() += 1;
        }
    }
    assert!(exits.len() > processes, "every process's exit was seen");
    let repeated = exits.values().filter(|&&records| records > 1).count();
    assert_eq!(
        repeated,
        0,
        "{repeated} of {} processes have more than one exit record",
        exits.len()
    );
    assert_eq!(observer.unobserve_cgroup(cgroup.id).expect("unobserve"), 0);
}

/// Linux AIO (the `test` profile allows it): an unlink before `io_setup` and one after, a
/// PWRITE of 4096 bytes and a PWRITEV of 100 + 200 bytes to `aio.txt` (no write syscall), and a
/// PREAD from /dev/zero that is no write.
const AIO_C: &str = r#"
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
/* Paths copied to the stack: a literal would lie in this binary's private file mapping. */
static int unlink_copy(const char *name) {
    char path[64];
    strcpy(path, name);
    return unlink(path);
}
static char buf[4096], in[64];
int main(void) {
    if (unlink_copy("before-aio.txt") != 0) return 1;
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, 8, &ctx) != 0) return 2;
    int fd = open("aio.txt", O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int zero = open("/dev/zero", O_RDONLY);
    if (fd < 0 || zero < 0) return 3;
    memset(buf, 'a', sizeof buf);
    struct iovec iov[2] = {{buf, 100}, {buf, 200}};
    struct iocb w = {0}, wv = {0}, r = {0};
    w.aio_lio_opcode = IOCB_CMD_PWRITE;
    w.aio_fildes = fd;
    w.aio_buf = (unsigned long)buf;
    w.aio_nbytes = sizeof buf;
    wv.aio_lio_opcode = IOCB_CMD_PWRITEV;
    wv.aio_fildes = fd;
    wv.aio_buf = (unsigned long)iov;
    wv.aio_nbytes = 2;
    wv.aio_offset = sizeof buf;
    r.aio_lio_opcode = IOCB_CMD_PREAD;
    r.aio_fildes = zero;
    r.aio_buf = (unsigned long)in;
    r.aio_nbytes = sizeof in;
    struct iocb *list[3] = {&w, &wv, &r};
    if (syscall(SYS_io_submit, ctx, 3, list) != 3) return 4;
    struct io_event done[3];
    if (syscall(SYS_io_getevents, ctx, 3, 3, done, 0) != 3) return 5;
    close(fd);
    return unlink_copy("after-aio.txt") != 0 ? 6 : 0;
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_aio_writes_are_counted_and_its_process_flagged() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().canonicalize().expect("canonical");
    compile_c(&d, "aio", AIO_C, &[]);
    for name in ["before-aio.txt", "after-aio.txt"] {
        std::fs::write(d.join(name), b"x").expect("fixture");
    }
    let (records, lost) = traced_script(&service, &format!("cd {} && ./aio", d.display())).await;
    assert_eq!(lost, 0);
    assert_eq!(
        std::fs::metadata(d.join("aio.txt")).expect("aio.txt").len(),
        4396,
        "the AIO writes ran"
    );
    let aio_txt = format!("{}/aio.txt", d.display());
    let written: Vec<(Option<&str>, u64, u64, bool)> = records
        .iter()
        .filter_map(|r| match r {
            // (Not the test harness's join of the cgroup: a write to its cgroup.procs.)
            TraceRecord::Write(w)
                if !w
                    .path
                    .as_deref()
                    .is_some_and(|p| p.ends_with("cgroup.procs")) =>
            {
                Some((w.path.as_deref(), w.bytes, w.writes, w.args_shared))
            }
            _ => None,
        })
        .collect();
    // The requests are read back from user memory at sys_exit: the process's word.
    assert_eq!(
        written,
        [(Some(aio_txt.as_str()), 4096 + 100 + 200, 2, true)],
        "two AIO writes to aio.txt, the read not counted"
    );
    assert!(
        !unlink_of(&records, "before-aio.txt").args_shared,
        "a single-threaded process without AIO"
    );
    assert!(
        unlink_of(&records, "after-aio.txt").args_shared,
        "an AIO context can complete a read into the process's memory during the call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_totals_left_by_an_abandoned_cgroup_are_dropped() {
    use tokio::io::AsyncReadExt as _;
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let (mut observer, _stream, abandoned) = observe_new_cgroup(&ObserverConfig::default());
    // Writes to its stdout, which it keeps open (the write's sys_exit ran once it is read).
    let mut writer = abandoned
        .command("/bin/sh", &["-c", "echo ready; exec sleep 60"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut ready = [0u8; 6];
    writer
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut ready)
        .await
        .expect("ready");
    // The step is abandoned: it stops being observed, and nobody takes its write totals.
    observer
        .unobserve_cgroup(abandoned.id)
        .expect("unobserve the abandoned cgroup");
    // The next step's end sweeps the totals of cgroups no longer observed.
    let next = TestCgroup::new();
    observer.observe_cgroup(next.id).expect("observe");
    let (events, unreadable) = observer.take_pending_writes(next.id);
    assert!(events.is_empty() && unreadable == 0, "{events:?}");
    let (left, _) = observer.take_pending_writes(abandoned.id);
    assert!(
        left.is_empty(),
        "the abandoned cgroup's total was kept: {left:?}"
    );
    observer.unobserve_cgroup(next.id).expect("unobserve");
    writer.kill().await.expect("kill the writer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipes_sockets_and_memfds_are_named_not_taken_for_paths() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    // A write to a pipe, to a socket and to a memfd, and an exec of that memfd (fexecve).
    let script = "python3 -c 'import os, socket\n\
         r, w = os.pipe(); os.write(w, b\"abc\"); os.close(w)\n\
         a, b = socket.socketpair(); os.write(a.fileno(), b\"hello\"); a.close()\n\
         fd = os.memfd_create(\"tool\", 0)\n\
         os.write(fd, open(\"/bin/true\", \"rb\").read())\n\
         import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n\
         assert libc.fchownat(fd, b\"\", 0, 0, 0x1000) == 0, ctypes.get_errno()\n\
         pid = os.fork()\n\
         if pid == 0: os.execve(fd, [\"tool\"], {})\n\
         assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0\n\
         s = os.memfd_create(\"script\", 0); os.write(s, b\"#!/bin/sh\\nexit 0\\n\")\n\
         pid = os.fork()\n\
         if pid == 0: os.execve(s, [\"script\"], {})\n\
         assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0'";
    let (records, lost) = traced_script(&service, script).await;
    assert_eq!(lost, 0);
    let written: Vec<(&str, u64)> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Write(w) => Some((w.path.as_deref().unwrap_or("?"), w.bytes)),
            _ => None,
        })
        .collect();
    let inode_name = |prefix: &str, name: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix(":["))
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|ino| !ino.is_empty() && ino.bytes().all(|b| b.is_ascii_digit()))
    };
    assert!(
        written
            .iter()
            .any(|&(p, bytes)| inode_name("pipe", p) && bytes == 3),
        "{written:?}"
    );
    assert!(
        written
            .iter()
            .any(|&(p, bytes)| inode_name("socket", p) && bytes == 5),
        "{written:?}"
    );
    let true_size = std::fs::metadata("/bin/true").expect("/bin/true").len();
    assert!(written.contains(&("memfd:tool", true_size)), "{written:?}");
    assert!(
        !written.iter().any(|&(p, _)| p == "/"),
        "a file in no directory was shown as the root: {written:?}"
    );
    for record in &records {
        if let TraceRecord::Write(w) = record {
            let path = w.path.as_deref().unwrap_or("?");
            assert_eq!(w.path_pseudo, !path.starts_with('/'), "{w:?}");
        }
    }
    let exes: Vec<(&str, &str, bool, bool)> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Exec(e) => Some((
                e.filename.as_str(),
                e.exe.as_str(),
                e.exe_pseudo,
                e.script_pseudo,
            )),
            _ => None,
        })
        .collect();
    // The binary: exe is the memfd. The script: exe is its interpreter, run on /dev/fd/N.
    let binary = exes
        .iter()
        .filter(|e| e.1 == "memfd:tool")
        .collect::<Vec<_>>();
    assert!(matches!(binary[..], [(_, _, true, false)]), "{exes:?}");
    let script = exes.iter().filter(|e| e.3).collect::<Vec<_>>();
    assert!(
        matches!(script[..], [(filename, exe, false, true)]
            if filename.starts_with("/dev/fd/") && exe.ends_with("dash")),
        "{exes:?}"
    );
    assert_eq!(exes.iter().filter(|e| e.2).count(), 1, "{exes:?}");
    // fchownat(memfd, "", AT_EMPTY_PATH): the dirfd's file itself, no path of the tree.
    let chown: Vec<(&str, bool)> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::File(f) if f.syscall == "fchownat" => {
                Some((f.path.as_str(), f.path_pseudo))
            }
            _ => None,
        })
        .collect();
    assert_eq!(chown, [("memfd:tool", true)]);
    let summary = summary_of(&records);
    assert_eq!(summary.fileless_execs, 2);
    assert!(
        summary.materials.iter().all(|m| m.path.starts_with('/')),
        "{:?}",
        summary.materials
    );
}

/// A seccomp filter (the sandbox's way of refusing) returning EPERM for io_setup, io_submit and
/// ptrace, then one attempt at each: none has a record of its own that carries its result.
const DENIED_C: &str = r"
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_io_setup, 3, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_io_submit, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ptrace, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
        return 1;
    unsigned long ctx = 0;
    if (syscall(SYS_io_setup, 8, &ctx) != -1 || errno != EPERM) return 2;
    if (syscall(SYS_io_submit, 0, 0, 0) != -1 || errno != EPERM) return 3;
    if (syscall(SYS_ptrace, 0, 0, 0, 0) != -1 || errno != EPERM) return 4;
    return 0;
}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscalls_refused_with_eperm_are_recorded() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().canonicalize().expect("canonical");
    compile_c(&d, "denied", DENIED_C, &[]);
    let (records, lost) = traced_script(&service, &format!("cd {} && ./denied", d.display())).await;
    assert_eq!(lost, 0);
    let denied: Vec<(Option<&str>, i64)> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Denied(d) => Some((d.syscall.as_deref(), d.result)),
            _ => None,
        })
        .collect();
    assert_eq!(
        denied,
        [
            (Some("io_setup"), -1),
            (Some("io_submit"), -1),
            (Some("ptrace"), -1)
        ]
    );
    assert_eq!(summary_of(&records).events.denied, 3);
}

/// A child whose main thread leaves first with exit(5) (not exit_group) while a second thread
/// leaves 50 ms later with exit(9); the parent writes the exit code wait() reported (the last
/// thread's, on this kernel) to `status.txt`.
const LEADER_FIRST_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static void *late(void *unused) {
    struct timespec t = {0, 50 * 1000 * 1000};
    nanosleep(&t, 0);
    syscall(SYS_exit, 9);
    return unused;
}
int main(void) {
    pid_t pid = fork();
    if (pid == 0) {
        struct timespec t = {0, 20 * 1000 * 1000};
        nanosleep(&t, 0);
        pthread_t thread;
        pthread_create(&thread, 0, late, 0);
        syscall(SYS_exit, 5);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return 1;
    FILE *out = fopen("status.txt", "w");
    return !out || fprintf(out, "%d", WEXITSTATUS(status)) < 0 || fclose(out) != 0;
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_leader_left_first_is_one_process_exiting_as_wait_reports() {
    let Some((_serial, service)) = start_service().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().canonicalize().expect("canonical");
    compile_c(&d, "leaderfirst", LEADER_FIRST_C, &["-pthread"]);
    let (records, lost) =
        traced_script(&service, &format!("cd {} && ./leaderfirst", d.display())).await;
    assert_eq!(lost, 0);
    let waited: u32 = std::fs::read_to_string(d.join("status.txt"))
        .expect("status.txt")
        .parse()
        .expect("an exit code");
    // The last fork is leaderfirst's child (the shell's come before it); its second thread is
    // a clone within the process, not a fork record.
    let child = records
        .iter()
        .rev()
        .find_map(|r| match r {
            TraceRecord::Fork(f) => Some(f.child),
            _ => None,
        })
        .expect("the child's fork");
    // One process node (its exit matched to its fork, whichever thread left last), exiting as
    // wait() reported.
    let nodes: Vec<Option<u32>> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Process(p) if p.pid == child => Some(p.exit_code),
            _ => None,
        })
        .collect();
    assert_eq!(nodes, [Some(waited)], "child {child}");
}
