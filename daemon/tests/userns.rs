//! `[userns]` profiles: the step runs in a user namespace of its own, its ids inside are the
//! profile's `uid`/`gid`, and on the host its processes and files belong to `host_uid + uid`. Each
//! test runs a real step through the `kiln-sandbox` helper as root. Outside CI they skip (with a
//! printed reason) when not root; under `CI=true` they fail.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed setup is a failed test"
)]

mod support;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;
use support::{
    Step, assert_exited, assert_unprivileged, have_root, hermetic, marker, run, run_refused,
    run_with, status_field,
};

use kilnd::sandbox::{Access, LandlockEnforcement, Profile, StepEnd, UserNamespace};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// Ids inside the user namespace (not 65534: the test must see the profile's, not a default).
const INSIDE_ID: u32 = 1000;
const HOST_UID: u32 = 300_000;
const HOST_GID: u32 = 310_000;
const COUNT: u32 = 65536;

/// The shipped hermetic profile with a `[userns]` section and ids 1000/1000 inside.
fn userns_profile() -> Profile {
    let mut profile = hermetic();
    assert!(
        profile.userns.is_none(),
        "shipped profiles have no [userns]"
    );
    profile.uid = INSIDE_ID;
    profile.gid = INSIDE_ID;
    profile.userns = Some(UserNamespace {
        host_uid: HOST_UID,
        host_gid: HOST_GID,
        count: COUNT,
    });
    profile
}

/// A `[userns]` step running `sh -c script` with the `in` and `out` workspaces (the output
/// belongs to the step's mapped host ids) and one secret, `TOKEN`.
fn fixture(script: &str) -> Step {
    let profile = userns_profile();
    assert_eq!(
        profile.host_ids(),
        (HOST_UID + INSIDE_ID, HOST_GID + INSIDE_ID)
    );
    let mut step = Step::new(&profile, &["sh", "-c", script]);
    step.spec.secrets = vec![("TOKEN".into(), "s3cret".into())];
    step
}

#[tokio::test]
async fn step_runs_with_the_profile_ids_inside_and_mapped_ids_outside() {
    if !have_root("userns") {
        return;
    }
    let f = fixture(
        "echo uid=$(id -u) gid=$(id -g) groups=$(id -G); \
         echo uid_map: $(cat /proc/self/uid_map); echo gid_map: $(cat /proc/self/gid_map); \
         echo setgroups: $(cat /proc/self/setgroups); \
         echo made > /workspace/out/made.txt && mkdir /workspace/out/sub && echo x > sub/y; \
         echo secret=$(cat /run/secrets/TOKEN); \
         echo in=$(cat /workspace/in/input.txt)",
    );
    let (outcome, log) = run(&f.spec).await;
    assert_exited(&outcome, 0, &log);
    assert!(
        log.contains("uid=1000 gid=1000 groups=1000\n"),
        "ids inside are the profile's, no other group: {log}"
    );
    assert!(
        log.contains("uid_map: 0 300000 65536\n") && log.contains("gid_map: 0 310000 65536\n"),
        "the mapping is the profile's: {log}"
    );
    assert!(log.contains("setgroups: deny\n"), "{log}");
    // The secrets tmpfs is the step's (readable as its mapped uid), inputs are readable.
    assert!(log.contains("secret=s3cret\n"), "{log}");
    assert!(log.contains("in=input data\n"), "{log}");
    // On the host, what the step wrote belongs to host_uid + uid, host_gid + gid.
    for path in ["made.txt", "sub", "sub/y"] {
        let meta = std::fs::symlink_metadata(f.output.path().join(path)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (HOST_UID + INSIDE_ID, HOST_GID + INSIDE_ID),
            "{path} owner on the host"
        );
    }
    assert_eq!(
        outcome.landlock,
        Some(LandlockEnforcement::FullyEnforced),
        "Landlock still enforced inside the user namespace"
    );
}

#[tokio::test]
async fn step_processes_are_the_mapped_uid_on_the_host() {
    if !have_root("userns") {
        return;
    }
    let marker = marker(4242, 0);
    let f = fixture(&format!("exec sleep {marker}"));
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let spec = f.spec.clone();
        let cancel = cancel.clone();
        async move { run_with(&spec, cancel).await }
    });
    // Find the step's `sleep` in the host's /proc and read its ids as the host sees them.
    let mut seen = None;
    for _ in 0..200 {
        seen = host_ids_of(&marker);
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    cancel.cancel();
    let (outcome, log) = run.await.unwrap();
    let (uid_line, gid_line) = seen.unwrap_or_else(|| panic!("step never seen; log:\n{log}"));
    assert_eq!(uid_line, "301000\t301000\t301000\t301000", "host Uid line");
    assert_eq!(gid_line, "311000\t311000\t311000\t311000", "host Gid line");
    assert_ne!(outcome.end, StepEnd::Exited { code: 0 }, "cancelled: {log}");
}

/// The (Uid, Gid) lines of `/proc/<pid>/status` of the host process running `sleep <marker>`.
fn host_ids_of(marker: &str) -> Option<(String, String)> {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline != format!("sleep\0{marker}\0").as_bytes() {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
        return Some((
            status_field(&status, "Uid:").to_owned(),
            status_field(&status, "Gid:").to_owned(),
        ));
    }
    None
}

#[tokio::test]
async fn step_cannot_become_root_or_regain_capabilities() {
    if !have_root("userns") {
        return;
    }
    // Attempts, each printing its result: a new user namespace (seccomp denies unshare), setuid(0)
    // and setgid(0) directly, two setuid-root binaries (host uid 0 is not even mapped), and the
    // privileged operations a root of this user namespace could do on namespaces it owned (the
    // UTS, mount and network namespaces are owned by the host's: nothing).
    let f = fixture(
        "unshare -U -r id -u; echo unshare-rc=$?; \
         perl -e 'use POSIX; print POSIX::setuid(0) ? \"setuid-ok\\n\" : \"setuid-failed $!\\n\"; print POSIX::setgid(0) ? \"setgid-ok\\n\" : \"setgid-failed $!\\n\"'; \
         mount -t tmpfs none /tmp; echo mount-rc=$?; \
         su -c 'id -u' root </dev/null; echo su-rc=$?; \
         hostname evil; echo hostname-rc=$?; \
         echo x > /usr/kiln-userns-test; echo usr-write-rc=$?; \
         echo y > /workspace/in/new; echo input-write-rc=$?; \
         cat /proc/self/status; echo uid-after=$(id -u)",
    );
    let (outcome, log) = run(&f.spec).await;
    assert_exited(&outcome, 0, &log);
    for forbidden in [
        "unshare-rc=0",
        "setuid-ok",
        "setgid-ok",
        "mount-rc=0",
        "su-rc=0",
        "hostname-rc=0",
        "usr-write-rc=0",
        "input-write-rc=0",
    ] {
        assert!(!log.contains(forbidden), "{forbidden} in log:\n{log}");
    }
    assert!(
        log.contains("setuid-failed Operation not permitted"),
        "setuid(0) refused: {log}"
    );
    assert_unprivileged(&log, INSIDE_ID);
    assert_eq!(status_field(&log, "Groups:"), "", "Groups: in log:\n{log}");
    assert!(log.contains("uid-after=1000\n"), "{log}");
    assert!(!Path::new("/usr/kiln-userns-test").exists());
    assert!(!f.input.path().join("new").exists());
}

#[tokio::test]
async fn ids_outside_the_mapped_range_are_refused() {
    if !have_root("userns") {
        return;
    }
    let mut f = fixture("true");
    f.spec.uid = COUNT; // one past the range: would be an unmapped id
    let err = run_refused(&f.spec).await;
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    assert!(
        message.contains("uid 65536 is outside the mapped range 0..65536"),
        "{message}"
    );
    // The helper's own check (it trusts no caller): same refusal, before anything is created.
    assert!(
        f.spec
            .validate()
            .is_err_and(|e| e.to_string().starts_with("confinement.userns:")),
        "validate"
    );
}

#[tokio::test]
async fn kilnd_output_path_works_for_mapped_ids() {
    if !have_root("userns") {
        return;
    }
    // kilnd's own output path (pipeline/mod.rs): the capped output workspace (a tmpfs handed to
    // the step's host ids), collection, then the copy back to the disk directory.
    let (owner, group) = userns_profile().host_ids();
    let scratch = TempDir::new().unwrap();
    let disk = scratch.path().join("ws");
    let workspace = kilnd::sandbox::outputfs::OutputWorkspace::prepare(
        &disk,
        &scratch.path().join("outfs"),
        Some(16 << 20),
        owner,
        group,
    )
    .unwrap();
    let mut f = fixture(
        "mkdir -p lib && echo artifact > lib/a.txt && ln -s /etc/shadow lib/evil && echo ok",
    );
    for mount in &mut f.spec.workspaces {
        if mount.access == Access::ReadWrite {
            mount.host_path = workspace.dir();
        }
    }
    let (outcome, log) = run(&f.spec).await;
    assert_exited(&outcome, 0, &log);
    assert_eq!(workspace.full(), None);
    let collected = kilnd::pipeline::workspace::collect(&workspace.dir(), None).unwrap();
    assert_eq!(collected.entries.len(), 1, "{:?}", collected.entries);
    assert_eq!(collected.skipped_symlinks, ["lib/evil -> /etc/shadow"]);
    workspace.settle(true).await.unwrap();
    let meta = std::fs::symlink_metadata(disk.join("lib/a.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (owner, group));
    assert_eq!(
        std::fs::read_to_string(disk.join("lib/a.txt")).unwrap(),
        "artifact\n"
    );
}
