//! Real confinement tests: steps run through the `kiln-sandbox` helper under the `hermetic`
//! profile's compiled seccomp filter, rlimits and Landlock ruleset, and each test tries to defeat one
//! control. The C attempts (`tests/seccomp/attack.c`) call each syscall with arguments the kernel
//! would answer differently (EBADF, EFAULT, EINVAL, or success): only the filter answers EPERM
//! (ENOSYS for clone3) without looking at them. Outside CI the tests skip (with a printed reason)
//! when not root; under `CI=true` they fail.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed setup is a failed test"
)]

mod support;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use support::{
    assert_exited, have_root, hermetic, output_dir, readable_dir, run, step_spec, workspace,
};

use kilnd::sandbox::{
    Access, LandlockEnforcement, Profile, SandboxOutcome, SandboxSpec, WorkspaceMount,
};
use tempfile::TempDir;

/// The attack program, compiled once on the host into a directory the step can read.
fn attack_dir() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = readable_dir();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seccomp/attack.c");
        let status = std::process::Command::new("cc")
            .args(["-Wall", "-Wextra", "-Werror", "-O1", "-o"])
            .arg(dir.path().join("attack"))
            .arg(&source)
            .status()
            .unwrap();
        assert!(status.success(), "cc {} failed", source.display());
        dir
    })
    .path()
}

struct Fixture {
    _dirs: Vec<TempDir>,
    output: PathBuf,
    spec: SandboxSpec,
}

/// A hermetic step running `argv` with workspaces `tools` (the attack program, read-only) and
/// `out` (read-write, the working directory).
fn fixture(argv: &[&str]) -> Fixture {
    let profile = hermetic();
    let root = TempDir::new().unwrap();
    let output = output_dir((profile.uid, profile.gid));
    let workspaces = vec![
        workspace("tools", attack_dir(), Access::ReadOnly),
        workspace("out", output.path(), Access::ReadWrite),
    ];
    let spec = spec_for(&profile, &root, argv, workspaces, "/workspace/out");
    Fixture {
        output: output.path().to_owned(),
        _dirs: vec![root, output],
        spec,
    }
}

/// The shared step spec with `TMPDIR=/tmp` too, the working directory `cwd` and a 60 s timeout (a
/// whole C build runs in one).
fn spec_for(
    profile: &Profile,
    root: &TempDir,
    argv: &[&str],
    workspaces: Vec<WorkspaceMount>,
    cwd: &str,
) -> SandboxSpec {
    let mut spec = step_spec(profile, root.path(), argv, workspaces);
    spec.env.push(("TMPDIR".into(), "/tmp".into()));
    spec.cwd = cwd.into();
    spec.timeout_ms = 60_000;
    spec
}

async fn run_sh(script: &str) -> (SandboxOutcome, String) {
    let fixture = fixture(&["sh", "-c", script]);
    run(&fixture.spec).await
}

/// Runs the attack program with `attempts` and returns `name -> result` ("ok" or an errno name).
async fn attempt(attempts: &[&str]) -> Vec<(String, String)> {
    let mut argv = vec!["/workspace/tools/attack"];
    argv.extend_from_slice(attempts);
    let fixture = fixture(&argv);
    let (outcome, log) = run(&fixture.spec).await;
    assert_exited(&outcome, 0, &log);
    let results: Vec<(String, String)> = log
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(name, result)| (name.to_owned(), result.to_owned()))
        .collect();
    assert_eq!(
        results
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        attempts,
        "log:\n{log}"
    );
    results
}

/// Every attempt must have been answered `expected` by the filter.
async fn assert_blocked(attempts: &[&str], expected: &str) {
    for (name, result) in attempt(attempts).await {
        assert_eq!(result, expected, "{name} was not blocked by seccomp");
    }
}

#[tokio::test]
async fn namespace_creation_is_denied_but_plain_fork_works() {
    if !have_root("seccomp") {
        return;
    }
    // The filter must not break ordinary process creation: fork and clone without namespace flags.
    assert_blocked(&["fork", "clone"], "ok").await;
    // Unprivileged user namespaces are enabled on this host: without the filter these succeed.
    assert_blocked(
        &[
            "clone_newuser",
            "clone_newns",
            "clone_newnet",
            "clone_newpid",
            "unshare_user",
            "unshare_mount",
            "unshare_bad_flags",
        ],
        "EPERM",
    )
    .await;
}

#[tokio::test]
async fn clone3_fails_with_enosys_so_libc_falls_back() {
    if !have_root("seccomp") {
        return;
    }
    assert_blocked(&["clone3", "clone3_newuser"], "ENOSYS").await;
}

#[tokio::test]
async fn setns_into_other_namespaces_is_denied() {
    if !have_root("seccomp") {
        return;
    }
    // setns(-1) would be EBADF in the kernel; /proc/1/ns/* of the (root) reaper, or the step's own
    // namespace files when those cannot be opened.
    assert_blocked(
        &[
            "setns_bad_fd",
            "setns_mnt",
            "setns_net",
            "setns_user",
            "setns_pid",
        ],
        "EPERM",
    )
    .await;
}

#[tokio::test]
async fn unshare_and_mount_tools_fail() {
    if !have_root("seccomp") {
        return;
    }
    let (outcome, log) = run_sh(
        r#"unshare -U true; echo user-rc=$?
unshare -m true; echo mount-ns-rc=$?
unshare -r id; echo map-root-rc=$?
mount -t tmpfs none /tmp; echo mount-rc=$?
python3 - <<'EOF'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.unshare(0x10000000)  # CLONE_NEWUSER
print("python-unshare", rc, os.strerror(ctypes.get_errno()))
if hasattr(os, "unshare"):  # Python >= 3.12
    try:
        os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNS)
        print("OS-UNSHARE-SUCCEEDED")
    except PermissionError:
        print("os.unshare: PermissionError")
EOF
"#,
    )
    .await;
    assert_exited(&outcome, 0, &log);
    for rc in ["user-rc", "mount-ns-rc", "map-root-rc", "mount-rc"] {
        assert!(
            log.contains(&format!("{rc}=")) && !log.contains(&format!("{rc}=0")),
            "{rc}: {log}"
        );
    }
    assert!(log.contains("Operation not permitted"), "{log}");
    assert!(
        log.contains("python-unshare -1 Operation not permitted"),
        "{log}"
    );
    // Python >= 3.12 has os.unshare: it must raise; older ones only try the ctypes call.
    assert!(!log.contains("OS-UNSHARE-SUCCEEDED"), "{log}");
}

#[tokio::test]
async fn mount_family_and_chroot_are_denied() {
    if !have_root("seccomp") {
        return;
    }
    assert_blocked(
        &[
            "mount",
            "umount2",
            "pivot_root",
            "open_tree",
            "fsopen",
            "move_mount",
            "chroot",
        ],
        "EPERM",
    )
    .await;
}

#[tokio::test]
async fn kernel_extension_and_tracing_are_denied() {
    if !have_root("seccomp") {
        return;
    }
    assert_blocked(
        &[
            "bpf",
            "perf_event_open",
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
        ],
        "EPERM",
    )
    .await;
}

#[tokio::test]
async fn other_processes_memory_is_out_of_reach() {
    if !have_root("seccomp") {
        return;
    }
    // PTRACE_TRACEME and process_vm_*(self) succeed without the filter.
    assert_blocked(
        &[
            "ptrace_traceme",
            "ptrace_attach_1",
            "process_vm_readv",
            "process_vm_writev",
        ],
        "EPERM",
    )
    .await;
}

#[tokio::test]
async fn keyring_io_uring_userfaultfd_and_file_handles_are_denied() {
    if !have_root("seccomp") {
        return;
    }
    assert_blocked(
        &[
            "keyctl",
            "add_key",
            "request_key",
            "io_uring_setup",
            "userfaultfd",
            "open_by_handle_at",
            "name_to_handle_at",
        ],
        "EPERM",
    )
    .await;
}

#[tokio::test]
async fn host_administration_is_denied() {
    if !have_root("seccomp") {
        return;
    }
    assert_blocked(
        &[
            "reboot",
            "swapon",
            "acct",
            "clock_settime",
            "settimeofday",
            "adjtimex",
        ],
        "EPERM",
    )
    .await;
}

#[tokio::test]
async fn personality_cannot_weaken_the_process() {
    if !have_root("seccomp") {
        return;
    }
    assert_blocked(&["personality_query", "personality_linux"], "ok").await;
    // Both succeed without the filter (ASLR off / every readable mapping executable).
    assert_blocked(
        &["personality_no_aslr", "personality_read_implies_exec"],
        "EPERM",
    )
    .await;
}

#[tokio::test]
async fn rlimits_and_securebits_are_set_and_locked() {
    if !have_root("seccomp") {
        return;
    }
    let (outcome, log) = run_sh(
        "echo core=$(ulimit -c) nofile=$(ulimit -n) hard-nofile=$(ulimit -Hn) fsize=$(ulimit -f); \
         (ulimit -n 8192) 2>/dev/null && echo RAISED; \
         python3 -c 'import ctypes; print(\"securebits=%#x\" % ctypes.CDLL(None).prctl(27, 0, 0, 0, 0))'",
    )
    .await;
    assert_exited(&outcome, 0, &log);
    // fsize: dash's ulimit -f counts 512-byte blocks; 16 GiB.
    assert!(
        log.contains("core=0 nofile=4096 hard-nofile=4096 fsize=33554432"),
        "{log}"
    );
    assert!(
        !log.contains("RAISED"),
        "the step raised its nofile limit: {log}"
    );
    // NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE, each locked, and KEEP_CAPS locked off.
    assert!(log.contains("securebits=0xef"), "{log}");
}

#[tokio::test]
async fn an_rlimit_above_kilnd_s_hard_limit_is_clamped_never_loosened() {
    if !have_root("seccomp") {
        return;
    }
    // The test profile asks nofile = 65536; a host (a container, or this test's own lower limit)
    // may not let even root raise a hard limit (no CAP_SYS_RESOURCE). The step must still run,
    // with the inherited, lower limit — never above it, never failing setup.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let mut fixture = fixture(&["sh", "-c", "echo nofile=$(ulimit -n) hard=$(ulimit -Hn)"]);
    let asked = hard + 1000;
    fixture.spec.confinement.rlimits.nofile = asked;
    let (outcome, log) = run(&fixture.spec).await;
    assert_exited(&outcome, 0, &log);
    let can_raise = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap();
    let expected = if can_raise { asked } else { hard };
    assert!(
        log.contains(&format!("nofile={expected} hard={expected}")),
        "can raise: {can_raise}: {log}"
    );
}

#[tokio::test]
async fn landlock_denies_what_the_mounts_would_allow() {
    if !have_root("seccomp") {
        return;
    }
    // /proc is a read-write mount and /proc/self/comm is writable by its owner: only Landlock
    // ("read" on /proc) stops the write. TCP bind to 0.0.0.0 works in an empty network namespace:
    // only Landlock stops it.
    let (outcome, log) = run_sh(
        "echo ok > /workspace/out/allowed && echo wrote-output; \
         echo ok > /tmp/allowed && echo wrote-tmp; \
         echo ok > /dev/shm/allowed && echo wrote-shm; \
         echo ok > /dev/null && echo wrote-null; \
         (echo hacked > /proc/self/comm) 2>&1; echo comm-rc=$?; \
         python3 -c 'import socket; socket.socket().bind((\"0.0.0.0\", 8080)); print(\"BOUND\")' 2>&1 | tail -1",
    )
    .await;
    assert_exited(&outcome, 0, &log);
    assert_eq!(outcome.landlock, Some(LandlockEnforcement::FullyEnforced));
    for wrote in ["wrote-output", "wrote-tmp", "wrote-shm", "wrote-null"] {
        assert!(log.contains(wrote), "{wrote}: {log}");
    }
    assert!(
        log.contains("Permission denied") && !log.contains("comm-rc=0"),
        "{log}"
    );
    assert!(
        log.contains("PermissionError: [Errno 13] Permission denied") && !log.contains("BOUND"),
        "{log}"
    );
}

#[tokio::test]
async fn landlock_confines_a_writable_mount_left_out_of_the_rules() {
    if !have_root("seccomp") {
        return;
    }
    // The output workspace stays a read-write bind mount, but its Landlock rule is removed: the
    // write must fail with EACCES (not EROFS: the mount would allow it).
    let mut fixture = fixture(&[
        "sh",
        "-c",
        "echo x > /workspace/out/file; echo out-rc=$?; echo x > /tmp/file && echo tmp-ok",
    ]);
    fixture.spec.cwd = "/".into();
    if let Some(landlock) = &mut fixture.spec.confinement.landlock {
        landlock
            .rules
            .retain(|rule| rule.path != Path::new("/workspace/out"));
    }
    let (outcome, log) = run(&fixture.spec).await;
    assert_exited(&outcome, 0, &log);
    assert!(log.contains("Permission denied"), "{log}");
    assert!(!log.contains("Read-only file system"), "{log}");
    assert!(
        log.contains("out-rc=") && !log.contains("out-rc=0"),
        "{log}"
    );
    assert!(log.contains("tmp-ok"), "{log}");
    assert!(!fixture.output.join("file").exists());

    // Disabled in the profile: recorded as such, and the same write succeeds.
    let mut fixture = fixture;
    fixture.spec.confinement.landlock = None;
    let (outcome, log) = run(&fixture.spec).await;
    assert_exited(&outcome, 0, &log);
    assert_eq!(outcome.landlock, Some(LandlockEnforcement::Disabled));
    assert!(log.contains("out-rc=0"), "{log}");
}

#[tokio::test]
async fn hello_c_example_builds_tests_and_packages_under_hermetic() {
    if !have_root("seccomp") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pipeline: toml::Table = toml::from_str(
        &std::fs::read_to_string(repo.join("examples/hello-c/pipeline.toml")).unwrap(),
    )
    .unwrap();
    let steps = pipeline["steps"].as_array().unwrap();
    let script = |index: usize| steps[index]["script"].as_str().unwrap().to_owned();

    let profile = hermetic();
    let src = readable_dir();
    std::fs::copy(
        repo.join("examples/hello-c/src/hello.c"),
        src.path().join("hello.c"),
    )
    .unwrap();
    std::fs::set_permissions(
        src.path().join("hello.c"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let build = output_dir((profile.uid, profile.gid));
    let dist = output_dir((profile.uid, profile.gid));
    let plan = [
        (
            script(0),
            vec![
                workspace("src", src.path(), Access::ReadOnly),
                workspace("build", build.path(), Access::ReadWrite),
            ],
            "/workspace/src",
        ),
        (
            script(1),
            vec![workspace("build", build.path(), Access::ReadOnly)],
            "/",
        ),
        (
            script(2),
            vec![
                workspace("build", build.path(), Access::ReadOnly),
                workspace("src", src.path(), Access::ReadOnly),
                workspace("dist", dist.path(), Access::ReadWrite),
            ],
            "/",
        ),
    ];
    for (index, (script, workspaces, cwd)) in plan.into_iter().enumerate() {
        let root = TempDir::new().unwrap();
        let mut spec = spec_for(
            &profile,
            &root,
            &["/bin/sh", "-eu", "-c", &script],
            workspaces,
            cwd,
        );
        spec.env.push(("GREETING".into(), "hello, kiln".into()));
        let (outcome, log) = run(&spec).await;
        assert_exited(&outcome, 0, &format!("step {index}:\n{log}"));
        assert_eq!(outcome.landlock, Some(LandlockEnforcement::FullyEnforced));
    }
    let sums = std::fs::read_to_string(dist.path().join("SHA256SUMS")).unwrap();
    assert!(sums.ends_with("  hello-c.tar.gz\n"), "{sums}");
    assert!(dist.path().join("hello-c.tar.gz").metadata().unwrap().len() > 0);
}
