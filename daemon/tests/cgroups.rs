//! Real cgroup tests: steps run through the `kiln-sandbox` helper in their own cgroups (v2 for
//! identity and `cgroup.kill`, v1 memory/pids/cpu for limits) and each test tries to defeat a
//! control: fork bomb, memory bomb, daemons that try to outlive the step, a CPU hog. Outside CI
//! they skip (with a printed reason) when not root; under `CI=true` they fail.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed setup is a failed test"
)]

mod support;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use support::{
    assert_exited, have_root, hermetic, host_processes_with, marker, output_dir, run, run_refused,
    run_with, step_spec, workspace,
};

use kilnd::sandbox::cgroup::{self, CgroupPaths, Controller, LimitHit, Limits};
use kilnd::sandbox::teardown::processes_in;
use kilnd::sandbox::{Access, SandboxOutcome, SandboxSpec, StepEnd};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

struct Fixture {
    _root: TempDir,
    output: TempDir,
    spec: SandboxSpec,
    cgroups: CgroupPaths,
}

/// A job id unique to this test run and call.
fn job_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A hermetic step running `sh -c script` with one workspace, `out`, in fresh step cgroups with
/// `limits`.
fn fixture(script: &str, limits: Limits) -> Fixture {
    let profile = hermetic();
    let root = TempDir::new().unwrap();
    let output = output_dir((profile.uid, profile.gid));
    std::fs::set_permissions(output.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cgroups = cgroup::create_step(&job_id(), "step", &limits).unwrap();
    let workspaces = vec![workspace("out", output.path(), Access::ReadWrite)];
    let mut spec = step_spec(&profile, root.path(), &["sh", "-c", script], workspaces);
    spec.timeout_ms = 30_000;
    spec.cgroups = Some(cgroups.clone());
    Fixture {
        _root: root,
        output,
        spec,
        cgroups,
    }
}

impl Drop for Fixture {
    /// A test that failed half-way must not leave its cgroups behind (a passing test has already
    /// had them removed by the teardown under test; then this finds nothing to do).
    fn drop(&mut self) {
        if !self.cgroups.unified.exists() {
            return;
        }
        let _ = cgroup::write_control(&self.cgroups.unified.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cgroup::remove_step_dirs(&self.cgroups).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The teardown was verified and removed every cgroup directory of the step (and its v2 job
/// directory); no process is left in them.
fn assert_torn_down(outcome: &SandboxOutcome, cgroups: &CgroupPaths, log: &str) {
    let report = outcome.teardown.as_ref().unwrap();
    assert!(
        report.verified && report.problems.is_empty(),
        "teardown: {report:?}\nlog:\n{log}"
    );
    for (_, dir) in cgroups.all() {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    let job_dir = cgroups.unified.parent().unwrap();
    assert!(!job_dir.exists(), "{} left behind", job_dir.display());
    assert_eq!(processes_in(cgroups), Vec::new());
}

/// A sleep duration unique to this test run, used to find leftover processes on the host.
fn sleep_marker(salt: u32) -> String {
    marker(2000, salt)
}

fn limits(memory_bytes: u64, pids: u64, cpu_millicores: u64) -> Limits {
    Limits {
        memory_bytes,
        pids,
        cpu_millicores,
    }
}

#[tokio::test]
async fn normal_step_is_torn_down_and_verified() {
    if !have_root("cgroup") {
        return;
    }
    let f = fixture(
        "echo built > /workspace/out/result; exit 0",
        Limits::default(),
    );
    let (outcome, log) = run(&f.spec).await;
    assert_exited(&outcome, 0, &log);
    assert_eq!(outcome.limits_hit, Vec::new());
    assert_torn_down(&outcome, &f.cgroups, &log);
    assert_eq!(
        std::fs::read_to_string(f.output.path().join("result")).unwrap(),
        "built\n"
    );
}

#[tokio::test]
async fn step_processes_are_in_the_step_cgroups_while_running() {
    if !have_root("cgroup") {
        return;
    }
    let f = fixture("sleep 2", Limits::default());
    let cgroup_id = f.cgroups.cgroup_id().unwrap();
    assert_eq!(
        cgroup_id,
        std::fs::metadata(&f.cgroups.unified).unwrap().ino()
    );
    let spec = f.spec.clone();
    let running = tokio::spawn(async move { run(&spec).await });
    // The helper, the namespace's pid 1, and the step's `sleep` (once it has exec'd).
    let procs_file = f.cgroups.unified.join("cgroup.procs");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (pids, commands) = loop {
        let pids: Vec<u32> = std::fs::read_to_string(&procs_file)
            .unwrap()
            .lines()
            .map(|line| line.parse().unwrap())
            .collect();
        let commands: Vec<String> = pids
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
            .map(|comm| comm.trim().to_owned())
            .collect();
        if commands.iter().any(|c| c == "sleep") {
            break (pids, commands);
        }
        assert!(
            Instant::now() < deadline,
            "step never showed up: {commands:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(pids.len() >= 3, "helper, pid 1 and the step: {commands:?}");
    assert!(
        commands.iter().any(|c| c == "kiln-sandbox"),
        "the helper itself joined before forking: {commands:?}"
    );
    assert!(
        commands.iter().any(|c| c == "sleep"),
        "the step's program is inside: {commands:?}"
    );
    // Every process is in all four of the step's cgroups (what the /proc scan checks afterwards).
    let found: Vec<u32> = processes_in(&f.cgroups)
        .iter()
        .map(|(pid, _)| *pid)
        .collect();
    for pid in &pids {
        assert!(found.contains(pid), "{pid} not found by the /proc scan");
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        for (controller, dir) in f.cgroups.all() {
            let own = cgroup::own_cgroup(&text, controller).unwrap();
            assert_eq!(
                Path::new(controller.mount().to_str().unwrap()).join(own.trim_start_matches('/')),
                dir,
                "pid {pid} in {}",
                controller.name()
            );
        }
    }
    let pids_current: u64 = std::fs::read_to_string(f.cgroups.pids.join("pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pids_current >= 3, "pids.current = {pids_current}");
    let (outcome, log) = running.await.unwrap();
    assert_exited(&outcome, 0, &log);
    assert_torn_down(&outcome, &f.cgroups, &log);
}

#[tokio::test]
async fn fork_bomb_hits_the_pids_limit_and_the_host_is_fine() {
    if !have_root("cgroup") {
        return;
    }
    let mark = sleep_marker(1);
    // The classic bomb with a plain name (dash does not let a function be called `:`); it churns
    // until the step's main shell ends, which ends the namespace.
    let script = format!("b(){{ b|b& }}; b; sleep 1; echo after-bomb {mark}; exit 0");
    let f = fixture(&script, limits(256 << 20, 64, 1000));
    let started = Instant::now();
    let (outcome, log) = run(&f.spec).await;
    let hit = outcome
        .limits_hit
        .iter()
        .find(|hit| matches!(hit, LimitHit::Pids { .. }))
        .unwrap_or_else(|| panic_with(&outcome, &log));
    assert!(
        matches!(hit, LimitHit::Pids { limit: 64, refused_forks } if *refused_forks > 0),
        "{hit:?}"
    );
    assert_eq!(hit.to_string(), "process limit reached: 64");
    assert!(started.elapsed() < Duration::from_secs(25), "bounded");
    assert_torn_down(&outcome, &f.cgroups, &log);
    assert_eq!(host_processes_with(&mark), Vec::<String>::new());
    // The host can still fork.
    assert!(
        std::process::Command::new("true")
            .status()
            .unwrap()
            .success()
    );
}

fn panic_with(outcome: &SandboxOutcome, log: &str) -> ! {
    let tail = &log[log.len().saturating_sub(2000)..];
    unreachable!("no limit hit reported: {outcome:?}\nlog tail:\n{tail}")
}

#[tokio::test]
async fn memory_bomb_is_oom_killed_inside_the_step_only() {
    if !have_root("cgroup") {
        return;
    }
    // A host process that must survive the bomb.
    let mut canary = std::process::Command::new("sleep")
        .arg(sleep_marker(2))
        .spawn()
        .unwrap();
    // tail buffers everything until the first newline: /dev/zero has none.
    let f = fixture(
        "head -c 3G /dev/zero | tail > /dev/null; echo bomb-rc=$?; exit 1",
        limits(64 << 20, 512, 2000),
    );
    let (outcome, log) = run(&f.spec).await;
    assert_exited(&outcome, 1, &log);
    assert!(log.contains("bomb-rc=137"), "tail was SIGKILLed: {log}");
    assert_eq!(
        outcome.limits_hit,
        vec![LimitHit::Memory {
            limit_bytes: 64 << 20,
            oom_kills: 1
        }],
        "log:\n{log}"
    );
    assert_eq!(
        outcome.limits_hit[0].to_string(),
        "out of memory: limit 64 MiB"
    );
    assert_torn_down(&outcome, &f.cgroups, &log);
    assert!(
        canary.try_wait().unwrap().is_none(),
        "a host process was killed"
    );
    canary.kill().unwrap();
    canary.wait().unwrap();
}

#[tokio::test]
async fn daemons_do_not_survive_the_step() {
    if !have_root("cgroup") {
        return;
    }
    let (setsid, double_fork, nohup) = (sleep_marker(3), sleep_marker(4), sleep_marker(5));
    let script = format!(
        "(setsid sleep {setsid} &); sh -c '(sleep {double_fork} &) &'; nohup sleep {nohup} >/dev/null 2>&1 & sleep 0.2; exit 0"
    );
    let f = fixture(&script, Limits::default());
    let (outcome, log) = run(&f.spec).await;
    assert_exited(&outcome, 0, &log);
    assert_torn_down(&outcome, &f.cgroups, &log);
    for mark in [setsid, double_fork, nohup] {
        assert_eq!(host_processes_with(&mark), Vec::<String>::new());
    }
}

#[tokio::test]
async fn cpu_quota_caps_busy_loops() {
    if !have_root("cgroup") {
        return;
    }
    // Two busy loops could use both cores (2 s of CPU per second); the quota is half a core.
    let f = fixture(
        "while :; do :; done & while :; do :; done",
        limits(256 << 20, 512, 500),
    );
    let spec = f.spec.clone();
    let cancel = CancellationToken::new();
    let running = {
        let cancel = cancel.clone();
        tokio::spawn(async move { run_with(&spec, cancel).await })
    };
    let usage = || -> u64 {
        let stat = std::fs::read_to_string(f.cgroups.unified.join("cpu.stat")).unwrap();
        cgroup::keyed_counter(&stat, "usage_usec")
    };
    // Let both loops start, then measure over one second of wall time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, t0) = (usage(), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (after, elapsed) = (usage(), t0.elapsed());
    cancel.cancel();
    let (outcome, log) = running.await.unwrap();
    let cores = (after - before) as f64 / elapsed.as_micros() as f64;
    assert!(
        // Upper bound: the quota (plus CFS slack at period edges). Lower bound only shows the
        // loops ran: other load on the host may take CPU from them.
        (0.02..=0.7).contains(&cores),
        "busy loops used {cores:.2} cores under a 0.5-core quota"
    );
    assert_eq!(outcome.end, StepEnd::Cancelled, "log:\n{log}");
    assert_torn_down(&outcome, &f.cgroups, &log);
}

#[tokio::test]
async fn cgroup_paths_outside_kiln_are_refused() {
    if !have_root("cgroup") {
        return;
    }
    let mut f = fixture("true", Limits::default());
    let step_cgroups = f.cgroups.clone();
    // The helper must never join (nor kilnd kill) kilnd's own cgroup.
    f.spec.cgroups.as_mut().unwrap().unified = Controller::Unified.mount();
    let err = run_refused(&f.spec).await;
    assert!(err.to_string().contains("invalid sandbox spec"), "{err}");
    assert!(Controller::Unified.mount().exists());
    // The real step cgroups were created by the fixture; remove them (no process ever joined).
    assert_eq!(cgroup::remove_step_dirs(&step_cgroups).len(), 0);
}

#[tokio::test]
async fn step_sees_only_its_own_cgroup_namespace() {
    if !have_root("cgroup") {
        return;
    }
    let f = fixture("cat /proc/self/cgroup", Limits::default());
    let (outcome, log) = run(&f.spec).await;
    assert_exited(&outcome, 0, &log);
    // Outside the namespace the step's cgroups are .../kiln/<job>/<step>; inside, every hierarchy
    // it was joined to is the namespace root, so no host cgroup path leaks.
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "no /proc/self/cgroup output:\n{log}");
    for l in &lines {
        let path = l.splitn(3, ':').nth(2).unwrap_or_default();
        assert!(
            !path.contains("kiln"),
            "host cgroup path visible in the step: {l}\n{log}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("0::/") && l.trim_end() == "0::/"),
        "v2 cgroup is not the namespace root:\n{log}"
    );
    assert_torn_down(&outcome, &f.cgroups, &log);
}

#[tokio::test]
async fn sweep_kills_and_removes_only_the_interrupted_job_s_cgroups() {
    if !have_root("cgroups") {
        return;
    }
    // Two jobs' step cgroups with a process each, as a crashed kilnd would leave them.
    let (interrupted, other) = (job_id(), job_id());
    let spawn_into = |job: &str| {
        let paths = cgroup::create_step(job, "step", &limits(64 << 20, 16, 500)).unwrap();
        let child = std::process::Command::new("sleep")
            .arg(sleep_marker(7))
            .spawn()
            .unwrap();
        for (_, dir) in paths.all() {
            cgroup::write_control(&dir.join("cgroup.procs"), &child.id().to_string()).unwrap();
        }
        (paths, child)
    };
    let (gone_paths, mut gone) = spawn_into(&interrupted);
    let (kept_paths, mut kept) = spawn_into(&other);

    let left = cgroup::sweep_job(&interrupted);
    assert!(left.is_empty(), "left behind: {left:?}");
    let status = gone.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the interrupted job's process was not killed"
    );
    for (_, dir) in gone_paths.all() {
        assert!(!dir.exists(), "{} survived the sweep", dir.display());
    }
    // The other job (another kilnd instance's, or a running one) is untouched.
    assert!(
        kept.try_wait().unwrap().is_none(),
        "the other job's process was killed"
    );
    for (_, dir) in kept_paths.all() {
        assert!(dir.is_dir(), "{} was removed", dir.display());
    }
    assert!(cgroup::sweep_job(&other).is_empty());
    assert!(kept.wait().is_ok());
    assert!(kept_paths.unified.parent().is_some_and(|p| !p.exists()));
}
