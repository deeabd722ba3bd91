//! Shared by the daemon's privileged integration tests (`mod support;` in each test crate; cargo
//! builds no test target of its own from a subdirectory of tests/): the root gate, the shipped
//! hermetic profile, a step's host directories and spec, running it through the real
//! `kiln-sandbox` helper, and reading what the step printed.

#![allow(dead_code, reason = "each test crate uses a subset of these helpers")]
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kilnd::sandbox::{
    Access, Profile, Sandbox, SandboxError, SandboxOutcome, SandboxSpec, StepEnd, WorkspaceMount,
    load_profiles, prepare_output_dir,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// True if the tests can run as root; prints why not outside CI, fails under `CI=true`.
pub fn have_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} tests need root (namespaces, mounts) and CI=true forbids skipping"
    );
    eprintln!("SKIPPED: {what} tests need root (namespaces, mounts); run as root");
    false
}

/// Host processes whose command line contains `marker`.
pub fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

/// A sleep duration unique to this test run and `salt` (`<seconds>.<pid><salt>`), used to find a
/// step's processes (or their leftovers) among the host's; `seconds` keeps test files apart.
pub fn marker(seconds: u32, salt: u32) -> String {
    format!("{seconds}.{}{salt:03}", std::process::id())
}

/// The shipped `hermetic` profile (profiles/hermetic.toml), as kilnd loads it.
pub fn hermetic() -> Profile {
    let profiles =
        load_profiles(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).unwrap();
    profiles["hermetic"].clone()
}

/// A fresh host directory the step's unprivileged user can enter and read (mode 0755).
pub fn readable_dir() -> TempDir {
    let dir = TempDir::new().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A fresh output directory handed to `(uid, gid)` on the host, as kilnd prepares one.
pub fn output_dir((uid, gid): (u32, u32)) -> TempDir {
    let dir = TempDir::new().unwrap();
    prepare_output_dir(dir.path(), uid, gid).unwrap();
    dir
}

/// The workspace `/workspace/<name>` bound from `host_path`.
pub fn workspace(name: &str, host_path: &Path, access: Access) -> WorkspaceMount {
    WorkspaceMount {
        name: name.into(),
        host_path: host_path.to_owned(),
        access,
    }
}

/// A step of `profile` running `argv` with `workspaces`, its root built under `root_dir`, confined
/// as the profile says (its seccomp filter, rlimits and Landlock rules for these workspaces). The
/// rest is what most tests want and each changes what it is about: environment `PATH` (the
/// profile's) and `HOME=/tmp`, working directory `/workspace/out`, hostname `kiln-step`, a 20 s
/// timeout, no secrets, no cgroups (tests/cgroups.rs adds them).
pub fn step_spec(
    profile: &Profile,
    root_dir: &Path,
    argv: &[&str],
    workspaces: Vec<WorkspaceMount>,
) -> SandboxSpec {
    SandboxSpec {
        argv: argv.iter().map(ToString::to_string).collect(),
        env: vec![
            ("PATH".into(), profile.path_env.clone()),
            ("HOME".into(), "/tmp".into()),
        ],
        cwd: "/workspace/out".into(),
        hostname: "kiln-step".into(),
        root_dir: root_dir.to_owned(),
        host_paths: profile.host_paths.clone(),
        image_root: None,
        confinement: profile.confinement(&workspaces),
        secrets: Vec::new(),
        workspaces,
        timeout_ms: 20_000,
        uid: profile.uid,
        gid: profile.gid,
        tmp_size_bytes: profile.tmp_size_bytes,
        cgroups: None,
    }
}

/// A [`step_spec`] with its host directories (removed on drop): workspace `in` read-only (holding
/// `input.txt`, "input data\n") and `out` read-write, handed to the step's host ids as kilnd does
/// (pipeline/mod.rs; with `[userns]` those are the mapped ones).
pub struct Step {
    _root: TempDir,
    pub input: TempDir,
    pub output: TempDir,
    pub spec: SandboxSpec,
}

impl Step {
    pub fn new(profile: &Profile, argv: &[&str]) -> Self {
        let root = TempDir::new().unwrap();
        let input = readable_dir();
        std::fs::write(input.path().join("input.txt"), "input data\n").unwrap();
        let output = output_dir(profile.host_ids());
        let workspaces = vec![
            workspace("in", input.path(), Access::ReadOnly),
            workspace("out", output.path(), Access::ReadWrite),
        ];
        let spec = step_spec(profile, root.path(), argv, workspaces);
        Self {
            _root: root,
            input,
            output,
            spec,
        }
    }
}

/// The `kiln-sandbox` helper built with these tests.
pub fn sandbox() -> Sandbox {
    Sandbox::new(env!("CARGO_BIN_EXE_kiln-sandbox"))
}

/// Runs `spec` to its end; the outcome and everything the step wrote to stdout and stderr.
pub async fn run(spec: &SandboxSpec) -> (SandboxOutcome, String) {
    run_with(spec, CancellationToken::new()).await
}

/// [`run`], cancelled when `cancel` is.
pub async fn run_with(spec: &SandboxSpec, cancel: CancellationToken) -> (SandboxOutcome, String) {
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

/// Runs a `spec` that must be refused before any step starts; the error.
pub async fn run_refused(spec: &SandboxSpec) -> SandboxError {
    let (log_tx, _log_rx) = tokio::sync::mpsc::channel(1);
    sandbox()
        .run(spec, log_tx, CancellationToken::new())
        .await
        .unwrap_err()
}

pub fn assert_exited(outcome: &SandboxOutcome, code: i32, log: &str) {
    assert_eq!(outcome.end, StepEnd::Exited { code }, "log:\n{log}");
}

/// The value of `field` (`"Uid:"`) in `/proc/<pid>/status` text; empty if it is missing.
pub fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .unwrap_or_default()
        .trim()
}

/// The `/proc/self/status` the step printed in `log` is a process without privileges: real,
/// effective, saved and filesystem uid and gid all `id`, every capability set empty,
/// `no_new_privs` set.
pub fn assert_unprivileged(log: &str, id: u32) {
    let ids = format!("{id}\t{id}\t{id}\t{id}");
    for (field, want) in [
        ("Uid:", ids.as_str()),
        ("Gid:", ids.as_str()),
        ("CapInh:", "0000000000000000"),
        ("CapPrm:", "0000000000000000"),
        ("CapEff:", "0000000000000000"),
        ("CapBnd:", "0000000000000000"),
        ("CapAmb:", "0000000000000000"),
        ("NoNewPrivs:", "1"),
    ] {
        assert_eq!(status_field(log, field), want, "{field} in log:\n{log}");
    }
}

/// Options field (6th) of the mountinfo line whose mount point is `mount_point`.
pub fn mount_options<'a>(mountinfo: &'a str, mount_point: &str) -> Option<&'a str> {
    mountinfo
        .lines()
        .find(|line| line.split(' ').nth(4) == Some(mount_point))
        .and_then(|line| line.split(' ').nth(5))
}
