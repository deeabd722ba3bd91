//! End-to-end tests of reproducibility (issue 6): `reproducible = true` steps run twice in a job,
//! and `kiln rebuild` re-runs a finished job's steps against their recorded inputs.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::Path;

use kiln_common::Digest;
use kiln_common::dsse::Envelope;
use kiln_e2e::{
    Kilnd, expect_code, follow, pipeline_file, privileged, repo, status, stdout, submit,
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
