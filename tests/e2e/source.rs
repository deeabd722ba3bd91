//! Source steps (issue 6, seed Stage 1): a git repository pinned by commit and a tarball pinned
//! by sha256, ingested by kilnd's own command in a sandbox; the commit time becomes the job's
//! SOURCE_DATE_EPOCH; the provenance names the commit; wrong pins are refused.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::many_single_char_names,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_common::verify::Bundle;
use kiln_e2e::{
    Kilnd, expect_code, follow, pipeline_file, privileged, status, stderr, stdout, submit,
};

/// Runs git in `dir` with fixed identities and dates; returns stdout.
fn git(dir: &Path, args: &[&str], date: &str) -> String {
    let o = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "kiln test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "kiln test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln.invalid")
        .env("GIT_AUTHOR_DATE", date)
        .env("GIT_COMMITTER_DATE", date)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {}", stderr(&o));
    stdout(&o).trim().to_owned()
}

/// A repository with two commits; returns (first commit, its time, second commit).
fn make_repo(dir: &Path) -> (String, u64, String) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "-b", "main"], "@0 +0000");
    std::fs::write(dir.join("version.txt"), "one\n").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/file.c"), "int x;\n").unwrap();
    git(dir, &["add", "-A"], "@0 +0000");
    git(dir, &["commit", "-q", "-m", "one"], "@1700000000 +0000");
    let first = git(dir, &["rev-parse", "HEAD"], "@0 +0000");
    std::fs::write(dir.join("version.txt"), "two\n").unwrap();
    git(dir, &["commit", "-q", "-am", "two"], "@1800000000 +0000");
    let second = git(dir, &["rev-parse", "HEAD"], "@0 +0000");
    // The sandbox user (nobody) reads the repository through a read-only bind.
    for entry in walk(dir) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    (first, 1_700_000_000, second)
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Runs GNU tar with `args`; it must succeed.
fn tar(args: &[&str]) {
    let o = Command::new("tar").args(args).output().unwrap();
    assert!(o.status.success(), "tar {args:?}: {}", stderr(&o));
}

fn pipeline(source: &str) -> String {
    format!(
        r#"version = 1
name = "ingest"
[workspaces.src]
[workspaces.out]
[[steps]]
name = "checkout"
kind = "source"
output = "src"
{source}
[[steps]]
name = "build"
kind = "build"
inputs = ["src"]
output = "out"
script = 'cp -r /workspace/src/. /workspace/out/; echo "${{SOURCE_DATE_EPOCH:-unset}}" > /workspace/out/epoch.txt'
"#
    )
}

/// The attestation bundle of a finished job (downloaded with its artifacts).
fn bundle(k: &Kilnd, job: &str) -> Bundle {
    let out = k.dir.path().join(format!("out-{job}"));
    let o = k.kiln(&["artifacts", job, "--out", out.to_str().unwrap()]);
    expect_code(&o, 0, "artifacts");
    serde_json::from_slice(&std::fs::read(out.join("kiln-bundle.json")).unwrap()).unwrap()
}

/// Runs the ingest pipeline with `source` as the checkout step's source key; it must succeed.
/// Returns the job, the directory its artifacts were downloaded to, and its bundle.
fn run_ok(k: &Kilnd, file: &str, source: &str) -> (String, PathBuf, Bundle) {
    let f = pipeline_file(k.dir.path(), file, &pipeline(source));
    let job = submit(k, &f, &[]);
    expect_code(&follow(k, &job), 0, &format!("follow {file}"));
    let b = bundle(k, &job);
    let out = k.dir.path().join(format!("out-{job}"));
    (job, out, b)
}

/// The SLSA predicate of `step` in `bundle`.
fn predicate(bundle: &Bundle, step: &str) -> serde_json::Value {
    bundle.steps[step]
        .decode_statement::<serde_json::Value>()
        .unwrap()
        .predicate
}

#[test]
fn git_source_pinned_by_commit() {
    if !privileged("git_source_pinned_by_commit") {
        return;
    }
    let k = Kilnd::start("");
    let (first, time, second) = make_repo(&k.dir.path().join("app"));
    std::fs::set_permissions(k.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // The first commit, though the branch has moved on: the pin decides, not the branch.
    let (_, out, b) = run_ok(
        &k,
        "git.toml",
        &format!("git = {{ repo = \"app\", commit = \"{first}\" }}"),
    );
    assert_eq!(
        std::fs::read_to_string(out.join("version.txt")).unwrap(),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("sub/file.c")).unwrap(),
        "int x;\n"
    );
    assert!(
        !out.join(".git").exists(),
        "the repository itself was copied"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("epoch.txt"))
            .unwrap()
            .trim(),
        time.to_string(),
        "SOURCE_DATE_EPOCH is the pinned commit's time"
    );

    let p = predicate(&b, "checkout");
    let internal = &p["buildDefinition"]["internalParameters"];
    assert_eq!(internal["source"]["type"], "git", "{internal}");
    assert_eq!(internal["source"]["commit"], first.as_str());
    assert_eq!(internal["source"]["commitTime"], time);
    let tree = internal["source"]["tree"].as_str().unwrap();
    assert_eq!(
        tree,
        git(
            &k.dir.path().join("app"),
            &["rev-parse", &format!("{first}^{{tree}}")],
            "@0 +0000"
        )
    );
    let deps = p["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    assert!(
        deps.iter()
            .any(|d| d["digest"]["gitCommit"] == first.as_str()),
        "{deps:?}"
    );
    let build = predicate(&b, "build");
    assert_eq!(
        build["buildDefinition"]["internalParameters"]["sourceDateEpoch"], time,
        "{build}"
    );

    // A commit that is not in the repository: the step fails, saying so.
    let missing = "0".repeat(40);
    let f = pipeline_file(
        k.dir.path(),
        "missing.toml",
        &pipeline(&format!(
            "git = {{ repo = \"app\", commit = \"{missing}\" }}"
        )),
    );
    let job = submit(&k, &f, &[]);
    let o = follow(&k, &job);
    assert_ne!(o.status.code(), Some(0));
    let logs = k.kiln(&["logs", &job, "checkout"]);
    assert!(
        stdout(&logs).contains(&format!("commit {missing} is not in the repository")),
        "{}",
        stdout(&logs)
    );
    assert_eq!(
        status(&k, &job)["steps"][1]["state"],
        "skipped",
        "{}",
        status(&k, &job)
    );

    // Not a repository: refused at admission, naming the step.
    let f = pipeline_file(
        k.dir.path(),
        "norepo.toml",
        &pipeline(&format!(
            "git = {{ repo = \"/proc\", commit = \"{second}\" }}"
        )),
    );
    let o = k.kiln(&["submit", f.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("step \"checkout\": /proc is not a git repository"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn tarball_source_pinned_by_sha256() {
    if !privileged("tarball_source_pinned_by_sha256") {
        return;
    }
    let k = Kilnd::start("");
    let tree = k.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("pkg")).unwrap();
    std::fs::write(tree.join("pkg/main.c"), "int main(void){return 0;}\n").unwrap();
    let tarball = k.dir.path().join("pkg.tar.gz");
    tar(&[
        "-czf",
        tarball.to_str().unwrap(),
        "-C",
        tree.to_str().unwrap(),
        "pkg",
    ]);
    let sha = kiln_common::Digest::of(&std::fs::read(&tarball).unwrap());

    let (_, out, b) = run_ok(
        &k,
        "tar.toml",
        &format!(
            "tarball = {{ path = \"pkg.tar.gz\", sha256 = \"{}\" }}",
            sha.hex()
        ),
    );
    assert!(out.join("pkg/main.c").is_file());
    let p = predicate(&b, "checkout");
    assert_eq!(
        p["buildDefinition"]["internalParameters"]["source"]["sha256"],
        sha.to_string()
    );

    // The file changed after the pipeline pinned it: the CLI refuses before uploading.
    std::fs::write(tree.join("pkg/main.c"), "int main(void){return 1;}\n").unwrap();
    tar(&[
        "-czf",
        tarball.to_str().unwrap(),
        "-C",
        tree.to_str().unwrap(),
        "pkg",
    ]);
    let f = k.dir.path().join("tar.toml");
    let o = k.kiln(&["submit", f.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains(&format!("but the pipeline pins {sha}")),
        "{}",
        stderr(&o)
    );

    // An archive whose members climb out with `..`: nothing lands outside the output
    // workspace (GNU tar refuses such members and the sandbox has nowhere else to write).
    let evil = k.dir.path().join("evil.tar");
    tar(&[
        "-cf",
        evil.to_str().unwrap(),
        "-C",
        tree.to_str().unwrap(),
        "--transform",
        "s,^pkg,../../escaped,",
        "pkg",
    ]);
    let sha = kiln_common::Digest::of(&std::fs::read(&evil).unwrap());
    let f = pipeline_file(
        k.dir.path(),
        "evil.toml",
        &pipeline(&format!(
            "tarball = {{ path = \"evil.tar\", sha256 = \"{}\" }}",
            sha.hex()
        )),
    );
    let job = submit(&k, &f, &[]);
    let _ = follow(&k, &job);
    assert!(!k.state().join("escaped").exists());
    assert!(!k.state().join("work/escaped").exists());
    assert!(!Path::new("/escaped").exists());
}

#[test]
fn repository_state_cannot_change_what_the_pinned_commit_checks_out() {
    if !privileged("repository_state_cannot_change_what_the_pinned_commit_checks_out") {
        return;
    }
    let k = Kilnd::start("");
    let repo = k.dir.path().join("app");
    let (good, _, evil) = make_repo(&repo);
    // State outside what the commit id pins: a replace ref swapping the pinned commit for
    // another one, and a smudge filter (repository config + info/attributes) that runs a
    // command at checkout and forges the record line kilnd reads.
    git(&repo, &["replace", &good, &evil], "@0 +0000");
    git(
        &repo,
        &[
            "config",
            "filter.pwn.smudge",
            &format!(
                "sh -c 'echo PWNED; echo kiln-source: commit={good} tree={} time=1 >&2'",
                "0".repeat(40)
            ),
        ],
        "@0 +0000",
    );
    std::fs::write(repo.join(".git/info/attributes"), "* filter=pwn\n").unwrap();
    for entry in walk(&repo) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    let (job, out, b) = run_ok(
        &k,
        "pinned.toml",
        &format!("git = {{ repo = \"app\", commit = \"{good}\" }}"),
    );
    assert_eq!(
        std::fs::read_to_string(out.join("version.txt")).unwrap(),
        "one\n",
        "the replace ref or the filter changed the checkout"
    );
    let logs = stdout(&k.kiln(&["logs", &job, "checkout"]));
    assert!(
        !logs.contains("PWNED"),
        "the repository's filter ran: {logs}"
    );
    let p = predicate(&b, "checkout");
    let tree = git(
        &repo,
        &[
            "--no-replace-objects",
            "rev-parse",
            &format!("{good}^{{tree}}"),
        ],
        "@0 +0000",
    );
    assert_eq!(
        p["buildDefinition"]["internalParameters"]["source"]["tree"],
        tree.as_str()
    );
}
