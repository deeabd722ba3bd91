//! Real tests of how the `kiln-sandbox` helper builds a worker fast without weakening it: the
//! network namespace created by pid 1 while the supervisor builds the root (the step must end up
//! in a fresh one, never the host's), the read-only flags applied to whole mount trees in one
//! `mount_setattr` (submounts of a read-only bind must be read-only too), and the opt-in phase
//! timing (`KILN_SANDBOX_TIMING=1`). Root only; under `CI=true` a missing capability fails.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed setup is a failed test"
)]

mod support;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use kilnd::sandbox::{SandboxOutcome, SandboxSpec, StepEnd};
use support::{Step, assert_exited, have_root, hermetic, mount_options, run};

/// A hermetic step running `sh -c script` with the `in` (read-only) and `out` workspaces, in `/`,
/// with only `PATH` set and its own hostname.
fn fixture(script: &str) -> Step {
    let mut step = Step::new(&hermetic(), &["sh", "-c", script]);
    step.spec.env.retain(|(name, _)| name == "PATH");
    step.spec.cwd = "/".into();
    step.spec.hostname = "kiln-setup".into();
    step
}

/// A tmpfs mounted on the host (kilnd's namespace) for the test's duration.
struct HostMount(std::path::PathBuf);

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn step_gets_a_fresh_network_namespace_never_the_host_s() {
    if !have_root("sandbox setup") {
        return;
    }
    let host = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    let single = fixture("stat -L -c %i /proc/self/ns/net");
    let (outcome, log) = run(&single.spec).await;
    assert_exited(&outcome, 0, &log);
    let step: u64 = log.trim().parse().unwrap();
    assert_ne!(step, host, "the step runs in the host's network namespace");
    // Two steps alive at once never share one (a finished step's inode number may be reused).
    let both = fixture("stat -L -c %i /proc/self/ns/net; sleep 0.3");
    let (a, b) = tokio::join!(run(&both.spec), run(&single.spec));
    assert_exited(&a.0, 0, &a.1);
    assert_exited(&b.0, 0, &b.1);
    let (a, b): (u64, u64) = (a.1.trim().parse().unwrap(), b.1.trim().parse().unwrap());
    assert!(
        a != host && b != host && a != b,
        "host {host}, steps {a} and {b}"
    );
}

#[tokio::test]
async fn submounts_of_a_read_only_bind_are_read_only_too() {
    if !have_root("sandbox setup") {
        return;
    }
    let fixture = fixture(
        "grep -E ' /workspace/in(/nested)? ' /proc/self/mountinfo; \
         if echo x > /workspace/in/nested/f; then echo WROTE; fi 2>/dev/null; echo END",
    );
    // A writable, setuid-allowing tmpfs nested inside the input workspace on the host: the
    // recursive bind brings it along, and it must arrive read-only, nosuid, nodev like its parent.
    let nested = fixture.input.path().join("nested");
    std::fs::create_dir(&nested).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &nested,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("mode=0777"),
    )
    .unwrap();
    let _mounted = HostMount(nested.clone());
    let (outcome, log) = run(&fixture.spec).await;
    assert_exited(&outcome, 0, &log);
    let nested_options = mount_options(&log, "/workspace/in/nested")
        .unwrap_or_else(|| panic!("the nested mount is missing in the sandbox: {log}"));
    assert!(
        nested_options.starts_with("ro,nosuid,nodev"),
        "nested mount: {nested_options}\n{log}"
    );
    assert!(
        mount_options(&log, "/workspace/in").is_some_and(|o| o.starts_with("ro,nosuid,nodev")),
        "{log}"
    );
    assert!(!log.contains("WROTE"), "{log}");
    assert!(!nested.join("f").exists());
    // The host's mount itself stays writable: only the sandbox's copy was restricted.
    std::fs::write(nested.join("host-side"), b"ok").unwrap();
}

/// Runs the helper binary directly with `spec` on stdin; returns (stdout, stderr).
fn run_helper(spec: &SandboxSpec, timing: bool) -> (String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln-sandbox"));
    command
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if timing {
        command.env("KILN_SANDBOX_TIMING", "1");
    }
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(spec).unwrap())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn phase_timing_is_opt_in_and_covers_every_phase() {
    if !have_root("sandbox setup") {
        return;
    }
    let fixture = fixture("echo step-ran");
    let (stdout, stderr) = run_helper(&fixture.spec, true);
    let outcome: SandboxOutcome = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(outcome.end, StepEnd::Exited { code: 0 }, "{stderr}");
    assert!(stderr.contains("step-ran"), "{stderr}");
    let marks: Vec<(f64, &str)> = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("kiln-sandbox timing: +"))
        .map(|rest| {
            let (ms, phase) = rest.split_once(" ms ").unwrap();
            (ms.parse().unwrap(), phase)
        })
        .collect();
    for phase in [
        "supervisor spec read and validated",
        "supervisor namespaces unshared",
        "supervisor mount tmpfs",
        "supervisor bind /usr on",
        "supervisor pivot_root to",
        "init forked",
        "init network namespace unshared",
        "init supervisor's part of the root is ready",
        "init mount proc on /proc",
        "step forked",
        "step landlock ruleset prepared",
        "step privileges dropped and verified",
        "step seccomp installed, execve",
        "init step reaped",
        "supervisor report received",
    ] {
        assert!(
            marks.iter().any(|(_, p)| p.starts_with(phase)),
            "no mark {phase:?} in:\n{stderr}"
        );
    }
    // One clock for all three processes: within a process the marks never go back, and the
    // report comes last.
    for role in ["supervisor", "init", "step"] {
        let times: Vec<f64> = marks
            .iter()
            .filter(|(_, p)| p.starts_with(role))
            .map(|(t, _)| *t)
            .collect();
        assert!(times.is_sorted(), "{role}: {times:?}");
    }
    let last = marks.iter().map(|(t, _)| *t).fold(0.0, f64::max);
    assert_eq!(marks.last().map(|(t, _)| *t), Some(last), "{stderr}");

    // Off by default (kilnd clears the helper's environment): not a single mark in the log.
    let (stdout, stderr) = run_helper(&fixture.spec, false);
    assert!(stdout.contains("\"exited\""), "{stdout}");
    assert_eq!(stderr, "step-ran\n");
}
