//! Real sandbox tests: run steps through the `kiln-sandbox` helper as root and try to defeat each
//! control. Outside CI they skip (with a printed reason) when not root; under `CI=true` they fail.

mod support;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{
    Step, assert_exited, assert_unprivileged, have_root, hermetic, host_processes_with, marker,
    mount_options, run, run_with,
};

use kilnd::sandbox::{SandboxOutcome, StepEnd};
use tokio_util::sync::CancellationToken;

const NOBODY: u32 = 65534;

/// A hermetic step running `argv` (`in` and `out` workspaces), with one more variable whose value
/// has spaces and `=`. The profile's seccomp filter, rlimits and Landlock rules apply
/// (tests/seccomp.rs tries to defeat them); cgroups, limits and teardown are tested in
/// tests/cgroups.rs.
fn fixture(argv: &[&str]) -> Step {
    let mut step = Step::new(&hermetic(), argv);
    step.spec.env.push((
        "KILN_TEST_SECRET".into(),
        "value with spaces=and equals".into(),
    ));
    step
}

async fn run_sh(script: &str) -> (SandboxOutcome, String, Step) {
    let fixture = fixture(&["sh", "-c", script]);
    let (outcome, log) = run(&fixture.spec).await;
    (outcome, log, fixture)
}

/// A sleep duration unique to this test run, used to find leftover processes on the host.
fn sleep_marker(salt: u32) -> String {
    marker(1000, salt)
}

#[tokio::test]
async fn exit_code_and_signal_are_reported() {
    if !have_root("sandbox") {
        return;
    }
    let (outcome, log, _f) = run_sh("echo to-stdout; echo to-stderr >&2; exit 7").await;
    assert_exited(&outcome, 7, &log);
    assert!(
        log.contains("to-stdout\n") && log.contains("to-stderr\n"),
        "both streams go to the log: {log}"
    );
    let (outcome, log, _f) = run_sh("kill -SEGV $$").await;
    assert_eq!(outcome.end, StepEnd::Signaled { signal: 11 }, "log:\n{log}");
}

#[tokio::test]
async fn step_is_unprivileged_even_via_setuid_binaries() {
    if !have_root("sandbox") {
        return;
    }
    // /usr/bin/mount is setuid root on the host: nosuid + no_new_privs + empty bounding set must
    // keep it unprivileged.
    let (outcome, log, _f) =
        run_sh("cat /proc/self/status; id -u; id -G; mount -t tmpfs none /tmp; echo mount-rc=$?")
            .await;
    assert_exited(&outcome, 0, &log);
    assert_unprivileged(&log, NOBODY);
    assert!(
        log.contains("\n65534\n65534\n"),
        "uid and groups are nobody only: {log}"
    );
    assert!(!log.contains("mount-rc=0"), "mount must fail: {log}");
}

#[tokio::test]
async fn environment_is_exactly_the_spec() {
    if !have_root("sandbox") {
        return;
    }
    let fixture = fixture(&["env"]);
    let (outcome, log) = run(&fixture.spec).await;
    assert_exited(&outcome, 0, &log);
    let mut got: Vec<&str> = log.lines().collect();
    got.sort_unstable();
    let mut want: Vec<String> = fixture
        .spec
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    want.sort_unstable();
    assert_eq!(got, want);
}

#[tokio::test]
async fn hostname_is_the_spec_s_and_host_is_untouched() {
    if !have_root("sandbox") {
        return;
    }
    let host_before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let (outcome, log, _f) =
        run_sh("cat /proc/sys/kernel/hostname; hostname other 2>&1; echo rc=$?").await;
    assert_exited(&outcome, 0, &log);
    assert!(log.starts_with("kiln-step\n"), "{log}");
    assert!(
        !log.contains("rc=0"),
        "changing the hostname must fail: {log}"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_before
    );
}

#[tokio::test]
async fn pid_namespace_hides_host_processes() {
    if !have_root("sandbox") {
        return;
    }
    let (outcome, log, _f) = run_sh("echo pid=$$; ps -e -o pid=,comm=; ls /proc").await;
    assert_exited(&outcome, 0, &log);
    assert!(
        log.starts_with("pid=2\n"),
        "the step is pid 2 (pid 1 is the reaper): {log}"
    );
    let pids: Vec<u32> = log
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(!pids.is_empty(), "{log}");
    assert!(
        pids.iter().all(|&pid| pid <= 5),
        "only the sandbox's own processes: {pids:?}\n{log}"
    );
    assert!(!log.contains("kill: 1") && !log.contains("kilnd"), "{log}");
}

#[tokio::test]
async fn network_is_empty_and_host_loopback_unreachable() {
    if !have_root("sandbox") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let fixture = fixture(&[
        "bash",
        "-c",
        &format!(
            "cat /proc/net/dev; echo END; if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo CONNECTED; else echo REFUSED; fi"
        ),
    ]);
    let (outcome, log) = run(&fixture.spec).await;
    assert_exited(&outcome, 0, &log);
    let interfaces: Vec<&str> = log
        .lines()
        .skip(2)
        .take_while(|line| *line != "END")
        .filter_map(|line| line.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(interfaces, ["lo"], "{log}");
    assert!(
        log.contains("REFUSED") && !log.contains("CONNECTED"),
        "{log}"
    );
    assert!(
        listener.accept().is_err(),
        "no connection reached the host listener"
    );
}

#[tokio::test]
async fn workspaces_input_read_only_output_writable() {
    if !have_root("sandbox") {
        return;
    }
    let (outcome, log, fixture) = run_sh(
        "cat /workspace/in/input.txt; \
         echo x > /workspace/in/new 2>&1; echo in-rc=$?; \
         rm /workspace/in/input.txt 2>&1; \
         echo result > /workspace/out/result.txt; echo out-rc=$?; \
         grep ' /workspace/' /proc/self/mountinfo",
    )
    .await;
    assert_exited(&outcome, 0, &log);
    assert!(log.contains("input data"), "{log}");
    assert!(
        log.contains("Read-only file system")
            && !log.contains("in-rc=0")
            && log.contains("out-rc=0"),
        "{log}"
    );
    assert!(!fixture.input.path().join("new").exists());
    assert!(fixture.input.path().join("input.txt").exists());
    let result = fixture.output.path().join("result.txt");
    assert_eq!(std::fs::read_to_string(&result).unwrap(), "result\n");
    assert_eq!(std::fs::metadata(&result).unwrap().uid(), NOBODY);
    for (workspace, options) in [("in", "ro,nosuid,nodev"), ("out", "rw,nosuid,nodev")] {
        assert!(
            mount_options(&log, &format!("/workspace/{workspace}"))
                .is_some_and(|o| o.starts_with(options)),
            "/workspace/{workspace}: {log}"
        );
    }
}

#[tokio::test]
async fn system_paths_and_root_are_read_only() {
    if !have_root("sandbox") {
        return;
    }
    let (outcome, log, _f) = run_sh(
        "for p in /usr/kiln-x /kiln-x /etc/kiln-x /dev/kiln-x /workspace/kiln-x; do \
           if echo x > $p; then echo WROTE $p; fi; done 2>/dev/null; \
         grep -E ' / | /usr | /dev | /proc | /tmp ' /proc/self/mountinfo; \
         echo tmp > /tmp/ok && cat /tmp/ok",
    )
    .await;
    assert_exited(&outcome, 0, &log);
    assert!(!log.contains("WROTE"), "{log}");
    assert!(!Path::new("/usr/kiln-x").exists());
    let opts = |mount_point: &str| mount_options(&log, mount_point).unwrap_or_default();
    assert!(opts("/").starts_with("ro,nosuid,nodev"), "root: {log}");
    assert!(opts("/usr").starts_with("ro,nosuid,nodev"), "/usr: {log}");
    assert!(
        opts("/dev").starts_with("ro,nosuid,nodev,noexec"),
        "/dev: {log}"
    );
    assert!(
        opts("/proc").starts_with("rw,nosuid,nodev,noexec"),
        "/proc: {log}"
    );
    assert!(opts("/tmp").starts_with("rw,nosuid,nodev"), "/tmp: {log}");
    assert!(log.ends_with("tmp\n"), "/tmp is writable: {log}");
}

#[tokio::test]
async fn tmp_is_private() {
    if !have_root("sandbox") {
        return;
    }
    let host_file = PathBuf::from(format!("/tmp/kiln-host-only-{}", std::process::id()));
    std::fs::write(&host_file, "host").unwrap();
    let name = host_file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (outcome, log, _f) = run_sh(&format!(
        "ls -A /tmp; test -e /tmp/{name} && echo VISIBLE; echo sandbox > /tmp/kiln-sandbox-only-{}",
        std::process::id()
    ))
    .await;
    std::fs::remove_file(&host_file).unwrap();
    assert_exited(&outcome, 0, &log);
    assert!(
        log.is_empty(),
        "sandbox /tmp starts empty and hides the host's: {log}"
    );
    assert!(!Path::new(&format!("/tmp/kiln-sandbox-only-{}", std::process::id())).exists());
}

#[tokio::test]
async fn timeout_kills_the_step_and_its_daemons() {
    if !have_root("sandbox") {
        return;
    }
    let (daemon, step) = (sleep_marker(1), sleep_marker(2));
    let mut fixture = fixture(&[
        "sh",
        "-c",
        &format!("(setsid sleep {daemon} &); sleep {step}"),
    ]);
    fixture.spec.timeout_ms = 700;
    let (outcome, log) = run(&fixture.spec).await;
    assert_eq!(outcome.end, StepEnd::TimedOut, "log:\n{log}");
    assert!(
        outcome.wall_ms >= 700 && outcome.wall_ms < 5_000,
        "{outcome:?}"
    );
    assert_eq!(host_processes_with(&daemon), Vec::<String>::new());
    assert_eq!(host_processes_with(&step), Vec::<String>::new());
}

#[tokio::test]
async fn daemons_die_when_the_step_exits() {
    if !have_root("sandbox") {
        return;
    }
    let daemon = sleep_marker(3);
    let (outcome, log, _f) = run_sh(&format!("(setsid sleep {daemon} &); sleep 0.1; exit 3")).await;
    assert_exited(&outcome, 3, &log);
    assert_eq!(host_processes_with(&daemon), Vec::<String>::new());
}

#[tokio::test]
async fn cancel_kills_the_namespace() {
    if !have_root("sandbox") {
        return;
    }
    let step = sleep_marker(4);
    let fixture = fixture(&[
        "sh",
        "-c",
        &format!("(setsid sleep {step} &); sleep {step}"),
    ]);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watched = step.clone();
    tokio::spawn(async move {
        // Cancel once both sleeps run (this also proves the host-side /proc scan sees them).
        for _ in 0..250 {
            if host_processes_with(&watched).len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            host_processes_with(&watched).len() >= 2,
            "the step's sleeps are visible from the host"
        );
        trigger.cancel();
    });
    let (outcome, _log) = run_with(&fixture.spec, cancel).await;
    assert_eq!(outcome.end, StepEnd::Cancelled);
    // SIGKILL of the helper reaches pid 1 through PDEATHSIG; the kernel then empties the namespace.
    let mut survivors = host_processes_with(&step);
    for _ in 0..50 {
        if survivors.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        survivors = host_processes_with(&step);
    }
    assert_eq!(survivors, Vec::<String>::new());
}

#[tokio::test]
async fn missing_command_is_exec_failed() {
    if !have_root("sandbox") {
        return;
    }
    let fixture = fixture(&["kiln-no-such-command", "arg"]);
    let (outcome, log) = run(&fixture.spec).await;
    match &outcome.end {
        StepEnd::ExecFailed { error } => assert!(
            error.starts_with("command not found: kiln-no-such-command"),
            "{error}"
        ),
        other => panic!("expected ExecFailed, got {other:?}; log:\n{log}"),
    }
    let mut fixture = fixture;
    fixture.spec.argv = vec!["/workspace/in/input.txt".into()];
    let (outcome, _log) = run(&fixture.spec).await;
    assert!(
        matches!(outcome.end, StepEnd::ExecFailed { ref error } if error.contains("permission denied")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn bad_cwd_is_setup_failed() {
    if !have_root("sandbox") {
        return;
    }
    let mut fixture = fixture(&["true"]);
    fixture.spec.cwd = "/nonexistent".into();
    let (outcome, _log) = run(&fixture.spec).await;
    assert!(
        matches!(outcome.end, StepEnd::SetupFailed { ref stage, .. } if stage == "cwd"),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn cc_compiles_and_runs_hello_world() {
    if !have_root("sandbox") {
        return;
    }
    let fixture = fixture(&[
        "sh",
        "-c",
        "cc -Wall -o /workspace/out/hello /workspace/in/hello.c && /workspace/out/hello",
    ]);
    std::fs::write(
        fixture.input.path().join("hello.c"),
        "#include <stdio.h>\nint main(void) { puts(\"hello from kiln\"); return 0; }\n",
    )
    .unwrap();
    let (outcome, log) = run(&fixture.spec).await;
    assert_exited(&outcome, 0, &log);
    assert_eq!(log, "hello from kiln\n");
    assert!(fixture.output.path().join("hello").exists());
    assert!(
        outcome.user_ms + outcome.sys_ms > 0 && outcome.max_rss_kib > 0,
        "{outcome:?}"
    );
}

#[tokio::test]
async fn concurrent_sandboxes_share_a_root_dir() {
    if !have_root("sandbox") {
        return;
    }
    let a = fixture(&["sh", "-c", "echo a > /tmp/f; sleep 0.2; cat /tmp/f"]);
    let mut b = fixture(&["sh", "-c", "echo b > /tmp/f; sleep 0.2; cat /tmp/f"]);
    b.spec.root_dir = a.spec.root_dir.clone();
    let ((outcome_a, log_a), (outcome_b, log_b)) = tokio::join!(run(&a.spec), run(&b.spec));
    assert_exited(&outcome_a, 0, &log_a);
    assert_exited(&outcome_b, 0, &log_b);
    assert_eq!((log_a.as_str(), log_b.as_str()), ("a\n", "b\n"));
    assert_eq!(
        std::fs::read_dir(&a.spec.root_dir).unwrap().count(),
        0,
        "the host root_dir stays empty"
    );
}
