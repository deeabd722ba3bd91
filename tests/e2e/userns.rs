//! End to end through kilnd: a profile with a `[userns]` section (issue 3, build item 1). The
//! shipped profiles have none; this test copies them and adds one to `hermetic`, then runs a
//! two-step job: the steps see their profile uid inside, their outputs belong to the mapped host
//! uid, and kilnd prepares, collects and hands the outputs on as usual.
//!
//! Run: `cargo test -p kiln-e2e --test userns` (as root).

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_e2e::{Kilnd, expect_code, follow, pipeline_file, privileged, status, submit};

const HOST_UID: u32 = 400_000;
const HOST_GID: u32 = 410_000;

/// A copy of the repository's profiles, `hermetic` with a `[userns]` section.
fn userns_profiles(dir: &Path) -> PathBuf {
    kiln_e2e::edited_profiles(dir, |path, text| {
        assert!(!text.contains("[userns]"), "{}", path.display());
        if path.file_stem().is_some_and(|s| s == "hermetic") {
            format!(
                "{text}\n[userns]\nhost_uid = {HOST_UID}\nhost_gid = {HOST_GID}\ncount = 65536\n"
            )
        } else {
            text
        }
    })
}

const PIPELINE: &str = r#"version = 1
name = "userns"
[workspaces.a]
[workspaces.b]
[[steps]]
name = "first"
kind = "build"
output = "a"
script = "echo artifact > /workspace/a/f.txt"
[[steps]]
name = "second"
kind = "build"
inputs = ["a"]
output = "b"
script = '''
cp /workspace/a/f.txt /workspace/b/copy.txt
id -u > /workspace/b/uid.txt
cat /proc/self/uid_map > /workspace/b/uid_map.txt
if unshare -U true 2>/dev/null; then echo escaped > /workspace/b/escaped.txt; fi
echo done > /workspace/b/done.txt
while [ ! -e /workspace/a/go ]; do sleep 0.05; done
'''
"#;

#[test]
fn a_userns_profile_runs_steps_as_mapped_ids_end_to_end() {
    if !privileged("a_userns_profile_runs_steps_as_mapped_ids_end_to_end") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let profiles = userns_profiles(work.path());
    let mut k = Kilnd::start("");
    k.stop();
    let text = std::fs::read_to_string(&k.config).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("profiles_dir = ") {
                format!("profiles_dir = \"{}\"", profiles.display())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&k.config, text).unwrap();
    k.spawn();

    let file = pipeline_file(work.path(), "userns.toml", PIPELINE);
    let job = submit(&k, &file, &[]);
    // While the second step waits: its live output workspace and the first step's collected
    // output, as the host sees them.
    let live = k.wait_for_output(&job, "second", "b", "done.txt");
    let input = k.in_kilnd_ns(&k.state().join("work").join(&job).join("ws").join("a"));
    for path in [
        live.join("copy.txt"),
        live.join("uid.txt"),
        input.join("f.txt"),
    ] {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (HOST_UID + 65534, HOST_GID + 65534),
            "{} on the host",
            path.display()
        );
    }
    std::fs::write(input.join("go"), b"").unwrap();
    expect_code(&follow(&k, &job), 0, &format!("userns job\n{}", k.log()));
    let st = status(&k, &job);
    for s in st["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "succeeded", "{s}");
        assert!(s["attestation"].is_string(), "{s}");
    }
    // kilnd collected the outputs as usual: download them.
    let out = work.path().join("artifacts");
    let o = k.kiln(&["artifacts", &job, "--all", "--out", out.to_str().unwrap()]);
    expect_code(&o, 0, "artifacts");
    let read = |rel: &str| std::fs::read_to_string(out.join(rel)).unwrap();
    assert_eq!(read("first/f.txt"), "artifact\n");
    assert_eq!(read("second/copy.txt"), "artifact\n");
    assert_eq!(
        read("second/uid.txt"),
        "65534\n",
        "the profile's uid inside"
    );
    assert_eq!(
        read("second/uid_map.txt")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", "400000", "65536"]
    );
    assert!(
        !out.join("second/escaped.txt").exists(),
        "unshare -U must fail"
    );
}
