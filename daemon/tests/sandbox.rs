//! Real sandbox tests: run steps through the `kiln-sandbox` helper as root and try to defeat each
//! control. Outside CI they skip (with a printed reason) when not root; under `CI=true` they fail.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed setup is a failed test"
)]

mod support;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{have_root, host_processes_with};

use kilnd::sandbox::{
    Access, Sandbox, SandboxOutcome, SandboxSpec, StepEnd, WorkspaceMount, load_profiles,
    prepare_output_dir,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const NOBODY: u32 = 65534;

struct Fixture {
    _root: TempDir,
    input: TempDir,
    output: TempDir,
    spec: SandboxSpec,
}

fn fixture(argv: &[&str]) -> Fixture {
    let profiles =
        load_profiles(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).unwrap();
    let hermetic = &profiles["hermetic"];
    let root = TempDir::new().unwrap();
    let input = TempDir::new().unwrap();
    std::fs::set_permissions(input.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(input.path().join("input.txt"), "input data\n").unwrap();
    let output = TempDir::new().unwrap();
    prepare_output_dir(output.path(), hermetic.uid, hermetic.gid).unwrap();
    let workspaces = vec![
        WorkspaceMount {
            name: "in".into(),
            host_path: input.path().to_owned(),
            access: Access::ReadOnly,
        },
        WorkspaceMount {
            name: "out".into(),
            host_path: output.path().to_owned(),
            access: Access::ReadWrite,
        },
    ];
    let spec = SandboxSpec {
        argv: argv.iter().map(ToString::to_string).collect(),
        env: vec![
            ("PATH".into(), hermetic.path_env.clone()),
            ("HOME".into(), "/tmp".into()),
            (
                "KILN_TEST_SECRET".into(),
                "value with spaces=and equals".into(),
            ),
        ],
        cwd: "/workspace/out".into(),
        hostname: "kiln-step".into(),
        root_dir: root.path().to_owned(),
        host_paths: hermetic.host_paths.clone(),
        image_root: None,
        // The hermetic profile's seccomp filter, rlimits and Landlock rules (tests/seccomp.rs
        // tries to defeat them).
        confinement: hermetic.confinement(&workspaces),
        secrets: Vec::new(),
        workspaces,
        timeout_ms: 20_000,
        uid: hermetic.uid,
        gid: hermetic.gid,
        tmp_size_bytes: hermetic.tmp_size_bytes,
        // Cgroups, limits and teardown are tested in tests/cgroups.rs.
        cgroups: None,
    };
    Fixture {
        _root: root,
        input,
        output,
        spec,
    }
}

fn sandbox() -> Sandbox {
    Sandbox::new(env!("CARGO_BIN_EXE_kiln-sandbox"))
}

async fn run_with(spec: &SandboxSpec, cancel: CancellationToken) -> (SandboxOutcome, String) {
    let (log_tx, mut log_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    let collector = tokio::spawn(async move {
        let mut log = Vec::new();
        while let Some(chunk) = log_rx.recv().await {
            log.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&log).into_owned()
    });
    let outcome = sandbox().run(spec, log_tx, cancel).await.unwrap();
    let log = collector.await.unwrap();
    (outcome, log)
}

async fn run(spec: &SandboxSpec) -> (SandboxOutcome, String) {
    run_with(spec, CancellationToken::new()).await
}

async fn run_sh(script: &str) -> (SandboxOutcome, String, Fixture) {
    let fixture = fixture(&["sh", "-c", script]);
    let (outcome, log) = run(&fixture.spec).await;
    (outcome, log, fixture)
}

fn assert_exited(outcome: &SandboxOutcome, code: i32, log: &str) {
    assert_eq!(outcome.end, StepEnd::Exited { code }, "log:\n{log}");
}

/// A sleep duration unique to this test run, used to find leftover processes on the host.
fn marker(salt: u32) -> String {
    format!("1000.{}{salt:03}", std::process::id())
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
    for (field, want) in [
        ("Uid:", "65534\t65534\t65534\t65534"),
        ("Gid:", "65534\t65534\t65534\t65534"),
        ("CapInh:", "0000000000000000"),
        ("CapPrm:", "0000000000000000"),
        ("CapEff:", "0000000000000000"),
        ("CapBnd:", "0000000000000000"),
        ("CapAmb:", "0000000000000000"),
        ("NoNewPrivs:", "1"),
    ] {
        let line = log
            .lines()
            .find(|line| line.starts_with(field))
            .unwrap_or_default();
        assert_eq!(
            line.trim_start_matches(field).trim(),
            want,
            "{field} in log:\n{log}"
        );
    }
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
    let mount_line = |name: &str| {
        log.lines()
            .find(|l| l.contains(&format!(" /workspace/{name} ")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(mount_line("in").contains(" ro,nosuid,nodev"), "{log}");
    assert!(mount_line("out").contains(" rw,nosuid,nodev"), "{log}");
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
    let opts = |mount_point: &str| {
        log.lines()
            .find(|l| l.split(' ').nth(4) == Some(mount_point))
            .and_then(|l| l.split(' ').nth(5))
            .unwrap_or_default()
            .to_owned()
    };
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
    let (daemon, step) = (marker(1), marker(2));
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
    let daemon = marker(3);
    let (outcome, log, _f) = run_sh(&format!("(setsid sleep {daemon} &); sleep 0.1; exit 3")).await;
    assert_exited(&outcome, 3, &log);
    assert_eq!(host_processes_with(&daemon), Vec::<String>::new());
}

#[tokio::test]
async fn cancel_kills_the_namespace() {
    if !have_root("sandbox") {
        return;
    }
    let step = marker(4);
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
