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
            Event::Exec(exec) => Some(exec),
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

use std::collections::BTreeSet;
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
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let service = ObserverService::start(&ObserverConfig::default()).expect("start observer");
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
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let service = ObserverService::start(&ObserverConfig::default()).expect("start observer");
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

/// `strace -f` lines of `execve` and `openat`: (pid, syscall, first path arg, flags, result).
fn parse_strace(text: &str) -> Vec<(u32, String, String, String, i64)> {
    let mut unfinished: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<u32>() else {
            continue;
        };
        let rest = rest.trim_start();
        let full = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            unfinished.insert(pid, head.to_owned());
            continue;
        } else if let Some(tail) = rest.strip_prefix("<... ") {
            let Some(head) = unfinished.remove(&pid) else {
                continue;
            };
            let tail = tail.split_once("resumed>").map_or("", |(_, t)| t);
            format!("{head}{tail}")
        } else {
            rest.to_owned()
        };
        let Some((name, args)) = full.split_once('(') else {
            continue;
        };
        if name != "execve" && name != "openat" {
            continue;
        }
        let Some((args, result)) = args.rsplit_once(") = ") else {
            continue;
        };
        let result: i64 = result
            .split_whitespace()
            .next()
            .and_then(|r| r.parse().ok())
            .unwrap_or(-1);
        let quoted: Vec<&str> = args.split('"').collect();
        let path = quoted.get(1).copied().unwrap_or_default().to_owned();
        let flags = quoted.get(2).copied().unwrap_or_default().to_owned();
        calls.push((pid, name.to_owned(), path, flags, result));
    }
    calls
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compile_matches_strace_execs_and_files() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "strace is missing (apt-get install strace) and CI=true forbids skipping"
        );
        eprintln!("skipping: strace not installed");
        return;
    }
    let (mut observer, mut stream, cgroup) = observe_new_cgroup(&ObserverConfig::default());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-c/src");
    let work = tempfile::tempdir().expect("tempdir");
    let cwd = work.path().canonicalize().expect("canonical");
    std::fs::copy(src.join("hello.c"), cwd.join("hello.c")).expect("copy hello.c");
    let log = cwd.join("strace.out");
    // The hello-c compile command (examples/hello-c/pipeline.toml), under strace, observed.
    let log_arg = log.display().to_string();
    let mut cmd = cgroup.command(
        "/usr/bin/strace",
        &[
            "-f",
            "-qq",
            "-s",
            "4096",
            "-e",
            "trace=execve,openat",
            "-o",
            &log_arg,
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
        ],
    );
    cmd.current_dir(&cwd);
    let strace_pid = {
        let child = cmd.spawn().expect("spawn strace");
        let pid = child.id().expect("pid");
        assert!(wait(child).await.success(), "compile under strace failed");
        pid
    };
    let events = collect_until_quiet(&mut stream).await;
    assert_eq!(observer.unobserve_cgroup(cgroup.id).expect("unobserve"), 0);

    // kiln's view, without strace's own process (it is not part of the build).
    let mut kiln_execs = BTreeSet::new();
    let mut kiln_written = BTreeSet::new();
    let mut kiln_read = BTreeSet::new();
    for event in &events {
        if event.header().tgid == strace_pid {
            continue;
        }
        match event {
            Event::Exec(exec) => {
                kiln_execs.insert(exec.filename.display().to_string());
            }
            Event::File(FileOp {
                nr: 257,
                result,
                path,
                base,
                flags,
                real,
                ..
            }) if *result >= 0 => {
                let base = base.as_deref().unwrap_or(Path::new("/"));
                let resolved = lexical(base, &path.to_string_lossy());
                assert!(
                    real.is_some(),
                    "a successful open has its real path: {resolved}"
                );
                if kilnd::observe::syscalls::open_access(*flags) == "read" {
                    kiln_read.insert(resolved);
                } else {
                    kiln_written.insert(resolved);
                }
            }
            _ => {}
        }
    }
    // strace's view.
    let text = std::fs::read_to_string(&log).expect("strace log");
    let mut strace_execs = BTreeSet::new();
    let mut strace_written = BTreeSet::new();
    let mut strace_read = BTreeSet::new();
    for (_pid, name, path, flags, result) in parse_strace(&text) {
        if result < 0 {
            continue;
        }
        if name == "execve" {
            strace_execs.insert(path);
        } else if flags.contains("O_WRONLY")
            || flags.contains("O_RDWR")
            || flags.contains("O_CREAT")
        {
            strace_written.insert(lexical(&cwd, &path));
        } else if !flags.contains("O_PATH") {
            strace_read.insert(lexical(&cwd, &path));
        }
    }
    // Allowed difference: strace opens its own output file before the tracee starts; kiln
    // sees that open in strace's process, which is excluded above.
    strace_written.remove(&log.display().to_string());
    eprintln!(
        "vs strace: {} execs, {} files written, {} files read",
        kiln_execs.len(),
        kiln_written.len(),
        kiln_read.len()
    );
    assert!(
        kiln_execs.len() >= 4,
        "cc, cc1, as, collect2, ld: {kiln_execs:?}"
    );
    assert_eq!(kiln_execs, strace_execs, "executed binaries");
    assert_eq!(kiln_written, strace_written, "files opened for writing");
    assert_eq!(kiln_read, strace_read, "files opened for reading");
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
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let service = ObserverService::start(&ObserverConfig::default()).expect("start observer");
    // A real listener on loopback: the step's connect must succeed (the hooks only observe).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind listener");
    let port = listener.local_addr().expect("addr").port();
    let accept = std::thread::spawn(move || listener.accept().map(drop));
    // A host process connecting at the same time must not appear.
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind host listener");
    let host_port = host_listener.local_addr().expect("addr").port();
    let host = std::thread::spawn(move || std::net::TcpStream::connect(("127.0.0.1", host_port)));
    // TCP connect (connect4), UDP connect (connect4), unconnected UDP send (sendmsg6).
    let script = format!(
        "python3 -c 'import socket as S\n\
         t = S.create_connection((\"127.0.0.1\", {port})); t.close()\n\
         u = S.socket(S.AF_INET, S.SOCK_DGRAM); u.connect((\"127.0.0.1\", 9))\n\
         v = S.socket(S.AF_INET6, S.SOCK_DGRAM); v.sendto(b\"x\", (\"::1\", 9))'"
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
    let summary = summary_of(&records);
    assert_eq!(summary.events.sock, socks.len() as u64);
    assert!(summary.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_setup_paths_do_not_leak_into_the_trace() {
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let service = ObserverService::start(&ObserverConfig::default()).expect("start observer");
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
    let _serial = SERIAL.lock().await;
    if !kernel_available() {
        return;
    }
    let service = ObserverService::start(&ObserverConfig::default()).expect("start observer");
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
