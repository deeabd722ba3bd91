//! End-to-end tests of reproducibility (issue 6): `reproducible = true` steps run twice in a job,
//! and `kiln rebuild` re-runs a finished job's steps against their recorded inputs. Every re-run
//! writes its output on the profile's capped workspace and is observed; only root or the
//! submitter may rebuild, under today's admission, and steps with secrets only for root.
//!
//! Run: `cargo test -p kiln-e2e --test rebuild` (as root).

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_common::Digest;
use kiln_common::dsse::Envelope;
use kiln_e2e::{
    Kilnd, admission_config, expect_code, follow, pipeline_file, pipeline_keygen, pipeline_sign,
    privileged, repo, secret_dir, status, stderr, stdout, submit,
};

fn one_step(dir: &Path, name: &str, reproducible: bool, script: &str) -> std::path::PathBuf {
    let text = format!(
        "version = 1\nname = \"{name}\"\n[workspaces.out]\n[[steps]]\nname = \"make\"\nkind = \"build\"\noutput = \"out\"\nreproducible = {reproducible}\nscript = '''\n{script}\n'''\n"
    );
    pipeline_file(dir, &format!("{name}.toml"), &text)
}

/// The provenance statement of a step, from the CAS.
fn provenance(k: &Kilnd, job: &str, step: &str) -> serde_json::Value {
    let st = status(k, job);
    let s = st["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == step)
        .unwrap();
    let digest: Digest = s["attestation"].as_str().unwrap().parse().unwrap();
    let hex = digest.hex();
    let bytes = std::fs::read(k.state().join("cas/sha256").join(&hex[..2]).join(&hex)).unwrap();
    let envelope: Envelope = serde_json::from_slice(&bytes).unwrap();
    serde_json::to_value(envelope.decode_statement::<serde_json::Value>().unwrap()).unwrap()
}

#[test]
fn a_reproducible_step_runs_twice_and_a_clock_in_the_output_fails_it() {
    if !privileged("a_reproducible_step_runs_twice_and_a_clock_in_the_output_fails_it") {
        return;
    }
    let k = Kilnd::start("");
    let work = tempfile::tempdir().unwrap();

    let stable = one_step(
        work.path(),
        "stable",
        true,
        "echo 'same every time' > /workspace/out/a.txt\nmkdir /workspace/out/sub\nprintf 'x' > /workspace/out/sub/b.bin",
    );
    let job = submit(&k, &stable, &[]);
    expect_code(&follow(&k, &job), 0, &format!("stable job\n{}", k.log()));
    let p = provenance(&k, &job, "make");
    assert_eq!(
        p["predicate"]["buildDefinition"]["internalParameters"]["reproducible"],
        serde_json::json!({ "match": true }),
        "{p}"
    );

    let clock = one_step(
        work.path(),
        "clock",
        true,
        "echo fixed > /workspace/out/fixed.txt\ndate +%s%N > /workspace/out/stamp.txt",
    );
    let job = submit(&k, &clock, &[]);
    expect_code(&follow(&k, &job), 1, "clock job must fail");
    let st = status(&k, &job);
    let error = st["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("not reproducible: 1 file(s) differ") && error.contains("stamp.txt"),
        "{error}"
    );
    let p = provenance(&k, &job, "make");
    let internal = &p["predicate"]["buildDefinition"]["internalParameters"];
    assert_eq!(internal["outcome"], "failed");
    let r = &internal["reproducible"];
    assert_eq!(r["match"], false);
    let diffs = r["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{r}");
    assert_eq!(diffs[0]["path"], "stamp.txt");
    assert!(diffs[0]["first"].is_string() && diffs[0]["second"].is_string());
    assert_ne!(diffs[0]["first"], diffs[0]["second"]);
    // A step that is not declared reproducible runs once and records nothing.
    let once = one_step(
        work.path(),
        "once",
        false,
        "date +%s%N > /workspace/out/stamp.txt",
    );
    let job = submit(&k, &once, &[]);
    expect_code(&follow(&k, &job), 0, "undeclared");
    let p = provenance(&k, &job, "make");
    assert!(p["predicate"]["buildDefinition"]["internalParameters"]["reproducible"].is_null());
}

#[test]
fn kiln_rebuild_matches_hello_c_and_names_a_differing_file() {
    if !privileged("kiln_rebuild_matches_hello_c_and_names_a_differing_file") {
        return;
    }
    let k = Kilnd::start("");
    let example = repo().join("examples/hello-c/pipeline.toml");
    let job = submit(&k, &example, &[]);
    expect_code(&follow(&k, &job), 0, &format!("hello-c\n{}", k.log()));

    let started = std::time::Instant::now();
    let o = k.kiln(&["--json", "rebuild", &job]);
    let took = started.elapsed();
    expect_code(&o, 0, &format!("rebuild hello-c\n{}", k.log()));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["match"], true, "{report}");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["compile", "package"], "{report}");
    eprintln!("kiln rebuild hello-c (2 steps): {took:?}");

    // One step by name; text output.
    let o = k.kiln(&["rebuild", &job, "package"]);
    expect_code(&o, 0, "rebuild package");
    assert!(stdout(&o).starts_with("package"), "{}", stdout(&o));
    assert!(stdout(&o).contains("match"), "{}", stdout(&o));
    // Unknown step: not found.
    expect_code(
        &k.kiln(&["rebuild", &job, "nope"]),
        5,
        "rebuild unknown step",
    );

    // A build writing the clock: the rebuild differs and names the file.
    let work = tempfile::tempdir().unwrap();
    let clock = one_step(
        work.path(),
        "clock-rebuild",
        false,
        "echo fixed > /workspace/out/fixed.txt\ndate +%s%N > /workspace/out/stamp.txt",
    );
    let job = submit(&k, &clock, &[]);
    expect_code(&follow(&k, &job), 0, "clock job");
    let o = k.kiln(&["--json", "rebuild", &job]);
    expect_code(&o, 1, "rebuild of a clock");
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["match"], false);
    let diffs = report["steps"][0]["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{report}");
    assert_eq!(diffs[0]["path"], "stamp.txt");
}

/// Stop kilnd, rewrite its config with `edit`, start it again on the same state.
fn restart_with(k: &mut Kilnd, edit: impl FnOnce(String) -> String) {
    k.stop();
    let text = std::fs::read_to_string(&k.config).unwrap();
    std::fs::write(&k.config, edit(text)).unwrap();
    k.spawn();
}

/// A copy of the repository's profiles with `[limits] workspace_size = "2MiB"`.
fn small_workspace_profiles(dir: &Path) -> PathBuf {
    kiln_e2e::edited_profiles(dir, |path, text| {
        assert!(
            text.contains("workspace_size = \"1GiB\""),
            "{}",
            path.display()
        );
        text.replace("workspace_size = \"1GiB\"", "workspace_size = \"2MiB\"")
    })
}

/// A reproducible step whose second run writes more than a 2 MiB cap: its first run writes a
/// little and waits for the test's signal (a file appearing in its read-only input, through the
/// bind mount); the second run sees the signal and writes 3 MiB.
const TWICE: &str = r#"version = 1
name = "twice"
[workspaces.in]
[workspaces.out]
[[steps]]
name = "prep"
kind = "build"
output = "in"
script = "echo x > /workspace/in/seed"
[[steps]]
name = "make"
kind = "build"
inputs = ["in"]
output = "out"
reproducible = true
script = '''
echo small > /workspace/out/a
if [ -e /workspace/in/go ]; then head -c 3145728 /dev/zero > /workspace/out/big || true; exit 0; fi
while [ ! -e /workspace/in/go ]; do sleep 0.05; done
'''
"#;

#[test]
fn reruns_and_rebuilds_write_on_the_capped_output_workspace() {
    if !privileged("reruns_and_rebuilds_write_on_the_capped_output_workspace") {
        return;
    }
    let mut k = Kilnd::start("");
    let work = tempfile::tempdir().unwrap();
    // 3 MiB of output: fine under the repository's 1 GiB cap.
    let big = one_step(
        work.path(),
        "big",
        false,
        "head -c 3145728 /dev/zero > /workspace/out/big",
    );
    let big_job = submit(&k, &big, &[]);
    expect_code(&follow(&k, &big_job), 0, &format!("big job\n{}", k.log()));

    // Today the profiles cap the output workspace at 2 MiB: the rebuild must hit it too.
    let profiles = small_workspace_profiles(work.path());
    restart_with(&mut k, |text| {
        text.lines()
            .map(|l| {
                if l.starts_with("profiles_dir = ") {
                    format!("profiles_dir = \"{}\"", profiles.display())
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let o = k.kiln(&["--json", "rebuild", &big_job]);
    expect_code(&o, 1, &format!("rebuild over the cap\n{}", k.log()));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let error = report["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("output workspace full: limit 2 MiB"),
        "the rebuild must fail on the capped workspace: {report}"
    );

    let twice = pipeline_file(work.path(), "twice.toml", TWICE);
    let job = submit(&k, &twice, &[]);
    k.wait_for_output(&job, "make", "out", "a");
    let input = k.state().join("work").join(&job).join("ws").join("in");
    std::fs::write(k.in_kilnd_ns(&input.join("go")), b"").unwrap();
    expect_code(
        &follow(&k, &job),
        1,
        "the second run over the cap fails the step",
    );
    let st = status(&k, &job);
    let error = st["steps"][1]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(
            "reproducibility check: the second run failed: output workspace full: limit 2 MiB"
        ),
        "{st}"
    );
    // The second run was observed: the step's provenance names its trace.
    let p = provenance(&k, &job, "make");
    let byproducts = p["predicate"]["runDetails"]["byproducts"]
        .as_array()
        .unwrap();
    assert!(
        byproducts
            .iter()
            .any(|b| b["name"] == "runtime-trace-rerun"),
        "{p}"
    );
}

/// The CLI as `uid` (group 65534, no supplementary groups).
fn kiln_as(k: &Kilnd, uid: u32, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            "--regid=65534",
            "--clear-groups",
            "--",
        ])
        .arg(kiln_e2e::bin("kiln"))
        .arg("--socket")
        .arg(&k.socket)
        .args(args)
        .current_dir("/")
        .output()
        .unwrap()
}

#[test]
fn only_root_or_the_submitter_may_rebuild_and_secrets_need_root() {
    if !privileged("only_root_or_the_submitter_may_rebuild_and_secrets_need_root") {
        return;
    }
    let secrets = tempfile::tempdir().unwrap();
    let secrets = secret_dir(secrets.path(), &[("TOKEN", "s3cret-token-value")]);
    // Group nogroup (65534) may submit: uids 65534 and 65533 are both submitters.
    let k = Kilnd::start(&format!(
        "[api]\nsubmit_group = \"nogroup\"\n{}",
        admission_config(None, Some(&secrets))
    ));
    let as_submitter = |file: &Path| {
        let o = kiln_as(&k, 65534, &["--json", "submit", file.to_str().unwrap()]);
        expect_code(&o, 0, &format!("submit as 65534\n{}", stderr(&o)));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let job = v["id"].as_str().unwrap().to_owned();
        expect_code(&follow(&k, &job), 0, &format!("job\n{}", k.log()));
        job
    };
    let plain = one_step(
        k.dir.path(),
        "plain",
        false,
        "echo same > /workspace/out/a.txt",
    );
    let job = as_submitter(&plain);

    let o = kiln_as(&k, 65533, &["rebuild", &job]);
    expect_code(&o, 4, "another member of the submit group");
    assert!(
        stderr(&o).contains("submitted by uid 65534, and only that uid and root may"),
        "{}",
        stderr(&o)
    );
    let o = kiln_as(&k, 65534, &["--json", "rebuild", &job]);
    expect_code(&o, 0, &format!("the submitter\n{}", k.log()));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["match"], true, "{report}");
    // Observed like any step: the report names the signed trace of the rebuild's worker.
    assert_eq!(report["steps"][0]["observed"], true, "{report}");
    let trace: Digest = report["steps"][0]["trace"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let hex = trace.hex();
    let bytes = std::fs::read(k.state().join("cas/sha256").join(&hex[..2]).join(&hex)).unwrap();
    let envelope: Envelope = serde_json::from_slice(&bytes).unwrap();
    let statement =
        serde_json::to_value(envelope.decode_statement::<serde_json::Value>().unwrap()).unwrap();
    assert_eq!(
        statement["predicateType"],
        "https://in-toto.io/attestation/runtime-trace/v0.1"
    );
    expect_code(&k.kiln(&["rebuild", &job]), 0, "root");

    // A step that declares a secret: its re-run would get today's value, so root only.
    let secret_step = pipeline_file(
        k.dir.path(),
        "with-secret.toml",
        "version = 1\nname = \"with-secret\"\n[workspaces.out]\n[[steps]]\nname = \"make\"\n\
         kind = \"build\"\noutput = \"out\"\nsecrets = [\"TOKEN\"]\n\
         script = 'test -s /run/secrets/TOKEN && echo used > /workspace/out/a.txt'\n",
    );
    let job = as_submitter(&secret_step);
    for args in [
        vec!["rebuild", job.as_str()],
        vec!["rebuild", job.as_str(), "make"],
    ] {
        let o = kiln_as(&k, 65534, &args);
        expect_code(&o, 4, "a step with secrets, not root");
        assert!(
            stderr(&o).contains("\"make\" declare secrets: only root may rebuild"),
            "{}",
            stderr(&o)
        );
    }
    let o = k.kiln(&["--json", "rebuild", &job]);
    expect_code(
        &o,
        0,
        &format!("root rebuilds a step with secrets\n{}", k.log()),
    );
}

#[test]
fn a_rebuild_is_admitted_again_under_todays_policy() {
    if !privileged("a_rebuild_is_admitted_again_under_todays_policy") {
        return;
    }
    let mut k = Kilnd::start("");
    let keys = tempfile::tempdir().unwrap();
    let (release, _, _) = pipeline_keygen(keys.path(), "release");
    // Admitted unsigned while no policy is configured.
    let unsigned = one_step(
        k.dir.path(),
        "hello-unsigned",
        false,
        "echo same > /workspace/out/a.txt",
    );
    let unsigned_job = submit(&k, &unsigned, &[]);
    expect_code(&follow(&k, &unsigned_job), 0, "unsigned job");
    let signed = one_step(
        k.dir.path(),
        "hello-signed",
        false,
        "echo signed > /workspace/out/a.txt",
    );
    pipeline_sign(&signed, &release);
    let signed_job = submit(&k, &signed, &[]);
    expect_code(&follow(&k, &signed_job), 0, "signed job");

    // Today's policy: hello-* must be signed by the release key.
    let policy = keys.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[pipelines]]\nname = \"hello-*\"\nsigners = [\"release.pub\"]\n",
    )
    .unwrap();
    restart_with(&mut k, |text| {
        format!("{text}\n{}", admission_config(Some(&policy), None))
    });
    let o = k.kiln(&["rebuild", &unsigned_job]);
    expect_code(
        &o,
        2,
        "an unsigned pipeline under a policy that requires a signature",
    );
    let err = stderr(&o);
    assert!(
        err.contains("not admitted today") && err.contains("it is not signed"),
        "{err}"
    );
    // The signature recorded at submit is checked again, and still passes.
    let o = k.kiln(&["--json", "rebuild", &signed_job]);
    expect_code(&o, 0, &format!("the signed pipeline\n{}", k.log()));
}
