//! End-to-end: the real kilnd (root, namespaces), the real CLI, the example pipeline, and the
//! bad-input and tamper cases of the foundation issue.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::many_single_char_names,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::{
    Kilnd, expect_code, follow, host_processes_with, pipeline_file, privileged, repo, status,
    stderr, stdout, submit, wait_for_step_state,
};

#[test]
fn example_pipeline_end_to_end_with_tamper_cases() {
    if !privileged("example_pipeline_end_to_end_with_tamper_cases") {
        return;
    }
    let k = Kilnd::start("");
    let example = repo().join("examples/hello-c/pipeline.toml");
    let job = submit(&k, &example, &["--param", "greeting=hello from the test"]);
    let f = follow(&k, &job);
    expect_code(&f, 0, "follow example job");
    assert!(stdout(&f).contains("job succeeded"), "{}", stdout(&f));

    let st = status(&k, &job);
    assert_eq!(st["state"], "succeeded");
    for s in st["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "succeeded", "{s}");
        assert!(
            s["attestation"].is_string(),
            "step without attestation: {s}"
        );
        assert!(s["log"].is_string(), "step without log: {s}");
    }
    assert_eq!(st["params"]["greeting"], "hello from the test");

    let out = k.dir.path().join("out");
    let o = k.kiln(&["artifacts", &job, "--out", out.to_str().unwrap()]);
    expect_code(&o, 0, "artifacts");
    let artifact = out.join("hello-c.tar.gz");
    assert!(artifact.is_file(), "{}", stdout(&o));
    // Artifacts are never overwritten: a second download into the same directory fails.
    expect_code(
        &k.kiln(&["artifacts", &job, "--out", out.to_str().unwrap()]),
        1,
        "artifacts twice",
    );

    let key = k.dir.path().join("node.pub");
    let o = k.kiln(&["node", "--public-key"]);
    expect_code(&o, 0, "node key");
    std::fs::write(&key, stdout(&o)).unwrap();

    let verify = |path: &Path, extra: &[&str]| {
        let mut args = vec![
            "verify",
            path.to_str().unwrap(),
            "--trusted-key",
            key.to_str().unwrap(),
            // This daemon signs with a software key (no swtpm): say that is acceptable.
            "--allow-software-key",
        ];
        args.extend_from_slice(extra);
        k.kiln(&args)
    };
    let o = verify(&artifact, &[]);
    expect_code(&o, 0, "verify");
    assert!(
        stdout(&o).contains("verified hello-c.tar.gz"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("package"),
        "chain should name the package step: {}",
        stdout(&o)
    );

    // The artifact reproduces the build: the program inside prints the parameter.
    let unpack = k.dir.path().join("unpack");
    std::fs::create_dir(&unpack).unwrap();
    let t = Command::new("tar")
        .arg("-xzf")
        .arg(&artifact)
        .arg("-C")
        .arg(&unpack)
        .status()
        .unwrap();
    assert!(t.success());

    // Tampered artifact: one byte flipped.
    let tampered = k.dir.path().join("tampered");
    std::fs::create_dir(&tampered).unwrap();
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(tampered.join("hello-c.tar.gz"), &bytes).unwrap();
    let bundle = out.join("kiln-bundle.json");
    let o = verify(
        &tampered.join("hello-c.tar.gz"),
        &["--bundle", bundle.to_str().unwrap()],
    );
    expect_code(&o, 1, "verify tampered artifact");
    assert!(stderr(&o).contains("hello-c.tar.gz"), "{}", stderr(&o));
    assert!(
        stderr(&o).to_lowercase().contains("modified") || stderr(&o).contains("subject"),
        "{}",
        stderr(&o)
    );

    // Tampered envelope: the package step's payload altered (signature no longer matches).
    let mut b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    let payload = b["steps"]["package"]["payload"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut chars: Vec<char> = payload.chars().collect();
    let i = chars.len() / 3;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    b["steps"]["package"]["payload"] = serde_json::Value::String(chars.into_iter().collect());
    let bad_bundle = k.dir.path().join("bad-bundle.json");
    std::fs::write(&bad_bundle, serde_json::to_vec(&b).unwrap()).unwrap();
    let o = verify(&artifact, &["--bundle", bad_bundle.to_str().unwrap()]);
    expect_code(&o, 1, "verify tampered envelope");
    assert!(stderr(&o).contains("signature"), "{}", stderr(&o));

    // Wrong key: a key this node never used.
    let other = k.dir.path().join("other.pub");
    let keygen = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl ecparam -genkey -name prime256v1 | openssl ec -pubout -out {}",
            other.display()
        ))
        .output()
        .unwrap();
    assert!(
        keygen.status.success(),
        "{}",
        String::from_utf8_lossy(&keygen.stderr)
    );
    let o = k.kiln(&[
        "verify",
        artifact.to_str().unwrap(),
        "--trusted-key",
        other.to_str().unwrap(),
        "--allow-software-key",
    ]);
    expect_code(&o, 1, "verify with wrong key");
    assert!(stderr(&o).contains("trusted"), "{}", stderr(&o));

    // Lookup by subject digest.
    let o = k.kiln(&["--json", "attestations", artifact.to_str().unwrap()]);
    expect_code(&o, 0, "attestations by subject");
    let refs: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(refs[0]["job_id"], job.as_str());
    assert_eq!(refs[0]["step"], "package");

    // curl works on the socket, as docs/api.md says.
    let c = Command::new("curl")
        .args([
            "-s",
            "--unix-socket",
            k.socket.to_str().unwrap(),
            &format!("http://kiln/v1/jobs/{job}"),
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&c.stdout).unwrap();
    assert_eq!(v["state"], "succeeded");

    // A blob corrupted on disk is detected on read, never served.
    let digest = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "package")
        .unwrap()["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["path"] == "hello-c.tar.gz")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let hex = digest.trim_start_matches("sha256:");
    let blob = k.state().join("cas/sha256").join(&hex[..2]).join(hex);
    std::fs::set_permissions(&blob, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut content = std::fs::read(&blob).unwrap();
    content[10] ^= 0xff;
    std::fs::write(&blob, content).unwrap();
    let o = k.kiln(&[
        "artifacts",
        &job,
        "--out",
        k.dir.path().join("out2").to_str().unwrap(),
    ]);
    expect_code(&o, 1, "artifacts with a corrupted blob");
    assert!(stderr(&o).contains("corrupted"), "{}", stderr(&o));
}

#[test]
fn bad_pipelines_are_rejected_with_their_location() {
    if !privileged("bad_pipelines_are_rejected_with_their_location") {
        return;
    }
    let k = Kilnd::start("");
    let d = k.dir.path();
    let cases: &[(&str, &str, &str)] = &[
        (
            "malformed.toml",
            "version = 1\nname = \"x\"\n[[steps]\n",
            "malformed.toml:3:",
        ),
        (
            "kind.toml",
            "version = 1\nname = \"x\"\n[workspaces.out]\n[[steps]]\nname = \"a\"\nkind = \"deploy\"\noutput = \"out\"\nrun = [\"true\"]\n",
            "kind.toml:6:",
        ),
        (
            "param.toml",
            "version = 1\nname = \"x\"\n[workspaces.out]\n[[steps]]\nname = \"a\"\nkind = \"build\"\noutput = \"out\"\nrun = [\"echo\", \"${params.nope}\"]\n",
            "nope",
        ),
        (
            "escape.toml",
            "version = 1\nname = \"x\"\n[workspaces.src]\nsource = \"../../etc\"\n[[steps]]\nname = \"a\"\nkind = \"build\"\ninputs = [\"src\"]\nrun = [\"true\"]\n",
            "escape.toml:4:",
        ),
    ];
    for (name, text, expected) in cases {
        let f = pipeline_file(d, name, text);
        let o = k.kiln(&["submit", f.to_str().unwrap()]);
        expect_code(&o, 2, name);
        assert!(
            stderr(&o).contains(expected),
            "{name}: expected {expected:?} in:\n{}",
            stderr(&o)
        );
    }
    // The daemon validates too (a client may skip local checks): 422 with located details.
    let body = serde_json::json!({ "pipeline": cases[1].1, "file_name": "kind.toml" }).to_string();
    let c = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            k.socket.to_str().unwrap(),
        ])
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            "http://kiln/v1/jobs",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&c.stdout);
    assert!(text.ends_with("422"), "{text}");
    assert!(text.contains("kind.toml:6:"), "{text}");

    // Parameters: wrong type and undeclared name are both reported.
    let f = pipeline_file(
        d,
        "typed.toml",
        "version = 1\nname = \"x\"\n[params.count]\ntype = \"int\"\ndefault = 1\n[workspaces.out]\n[[steps]]\nname = \"a\"\nkind = \"build\"\noutput = \"out\"\nrun = [\"echo\", \"${params.count}\"]\n",
    );
    let o = k.kiln(&[
        "submit",
        f.to_str().unwrap(),
        "--param",
        "count=many",
        "--param",
        "colour=red",
    ]);
    expect_code(&o, 2, "bad params");
    assert!(
        stderr(&o).contains("count") && stderr(&o).contains("colour"),
        "{}",
        stderr(&o)
    );

    // Unknown job.
    expect_code(&k.kiln(&["status", "no-such-job"]), 5, "unknown job");
    // Nothing was admitted.
    let o = k.kiln(&["--json", "jobs"]);
    assert_eq!(stdout(&o).trim(), "[]");
}

#[test]
fn oversized_and_stalled_requests_are_refused() {
    if !privileged("oversized_and_stalled_requests_are_refused") {
        return;
    }
    let k = Kilnd::start(
        "[api]\nmax_request_bytes = 4096\nmax_blob_bytes = 2048\nrequest_timeout = \"1s\"\n",
    );
    let d = k.dir.path();
    let big = "x".repeat(8000);
    let f = pipeline_file(
        d,
        "big.toml",
        &format!(
            "version = 1\nname = \"x\"\ndescription = \"{big}\"\n[workspaces.out]\n[[steps]]\nname = \"a\"\nkind = \"build\"\noutput = \"out\"\nrun = [\"true\"]\n"
        ),
    );
    let o = k.kiln(&["submit", f.to_str().unwrap()]);
    expect_code(&o, 2, "oversized pipeline");
    assert!(stderr(&o).contains("413"), "{}", stderr(&o));

    std::fs::create_dir(d.join("src")).unwrap();
    std::fs::write(d.join("src/big.c"), "y".repeat(10_000)).unwrap();
    let f = pipeline_file(
        d,
        "src.toml",
        "version = 1\nname = \"x\"\n[workspaces.src]\nsource = \"src\"\n[[steps]]\nname = \"a\"\nkind = \"build\"\ninputs = [\"src\"]\nrun = [\"true\"]\n",
    );
    let o = k.kiln(&["submit", f.to_str().unwrap()]);
    expect_code(&o, 2, "oversized blob");
    assert!(stderr(&o).contains("limit of 2048 bytes"), "{}", stderr(&o));

    // A client that announces a body and stalls is cut off with 408 after request_timeout.
    let mut conn = std::os::unix::net::UnixStream::connect(&k.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"POST /v1/jobs HTTP/1.1\r\nhost: kiln\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"pipe")
        .unwrap();
    let t = Instant::now();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn peers_are_authorized_by_credentials() {
    if !privileged("peers_are_authorized_by_credentials") {
        return;
    }
    // nobody (65534) is in the audit group "nogroup" (gid 65534) here; no one is in the submit group.
    let k =
        Kilnd::start("[api]\nsubmit_group = \"kiln-e2e-nonexistent\"\naudit_group = \"nogroup\"\n");
    let as_user = |gid: &str, args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ]);
        c.arg(kiln_e2e::bin("kiln"))
            .arg("--socket")
            .arg(&k.socket)
            .args(args)
            .current_dir("/");
        c.output().unwrap()
    };
    let o = as_user("65534", &["jobs"]);
    expect_code(&o, 0, "audit group may read");
    let example = repo().join("examples/hello-c/pipeline.toml");
    let o = as_user("65534", &["submit", example.to_str().unwrap()]);
    expect_code(&o, 4, "audit group may not submit");
    assert!(stderr(&o).contains("not authorized"), "{}", stderr(&o));
    let o = as_user("65533", &["jobs"]);
    expect_code(&o, 4, "stranger may not read");
}

#[test]
fn failing_step_is_attested_and_later_steps_skipped() {
    if !privileged("failing_step_is_attested_and_later_steps_skipped") {
        return;
    }
    let k = Kilnd::start("");
    let f = pipeline_file(
        k.dir.path(),
        "fail.toml",
        "version = 1\nname = \"fail\"\n[workspaces.a]\n[[steps]]\nname = \"first\"\nkind = \"build\"\noutput = \"a\"\nscript = \"echo oops-from-step; exit 3\"\n[[steps]]\nname = \"second\"\nkind = \"test\"\ninputs = [\"a\"]\nrun = [\"true\"]\n",
    );
    let job = submit(&k, &f, &[]);
    // Follow only after the job has ended: the stored log must be replayed, not lost.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&k, &job)["state"] != "failed" {
        assert!(
            Instant::now() < deadline,
            "job never failed: {}",
            status(&k, &job)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = follow(&k, &job);
    expect_code(&o, 1, "follow failing job");
    assert!(
        stdout(&o).contains("[first] oops-from-step"),
        "live log missing:\n{}",
        stdout(&o)
    );
    let st = status(&k, &job);
    assert_eq!(st["state"], "failed");
    assert_eq!(st["steps"][0]["state"], "failed");
    assert_eq!(st["steps"][0]["exit_code"], 3);
    assert!(st["steps"][0]["attestation"].is_string());
    assert_eq!(st["steps"][1]["state"], "skipped");
    let o = k.kiln(&["logs", &job, "first"]);
    assert!(stdout(&o).contains("oops-from-step"));
}

#[test]
fn timeout_kills_the_whole_step() {
    if !privileged("timeout_kills_the_whole_step") {
        return;
    }
    let k = Kilnd::start("");
    let f = pipeline_file(
        k.dir.path(),
        "slow.toml",
        "version = 1\nname = \"slow\"\n[[steps]]\nname = \"sleepy\"\nkind = \"run\"\ntimeout = \"1s\"\nscript = \"sleep 3011 & (setsid sleep 3012 &) ; sleep 3013\"\n",
    );
    let job = submit(&k, &f, &[]);
    let t = Instant::now();
    expect_code(&follow(&k, &job), 1, "follow timed-out job");
    assert!(t.elapsed() < Duration::from_secs(20));
    let st = status(&k, &job);
    assert_eq!(st["steps"][0]["state"], "timed-out");
    assert!(
        st["steps"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s")
    );
    std::thread::sleep(Duration::from_millis(200));
    for m in ["sleep 3011", "sleep 3012", "sleep 3013"] {
        assert!(
            host_processes_with(m).is_empty(),
            "{m} survived the step: {:?}",
            host_processes_with(m)
        );
    }
}

#[test]
fn sigterm_cancels_running_jobs_and_keeps_state_consistent() {
    if !privileged("sigterm_cancels_running_jobs_and_keeps_state_consistent") {
        return;
    }
    let mut k = Kilnd::start("");
    let f = pipeline_file(
        k.dir.path(),
        "long.toml",
        "version = 1\nname = \"long\"\n[workspaces.o]\n[[steps]]\nname = \"long\"\nkind = \"run\"\noutput = \"o\"\nrun = [\"sleep\", \"3021\"]\n[[steps]]\nname = \"after\"\nkind = \"run\"\ninputs = [\"o\"]\nrun = [\"true\"]\n",
    );
    let job = submit(&k, &f, &[]);
    wait_for_step_state(&k, &job, "long", "running", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_processes_with("sleep 3021").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the step never started its process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = k.stop();
    assert!(s.success(), "kilnd exit status {s}\n{}", k.log());
    assert!(
        host_processes_with("sleep 3021").is_empty(),
        "worker survived kilnd shutdown"
    );
    assert!(!k.socket.exists(), "socket left behind");
    k.spawn();
    let st = status(&k, &job);
    assert_eq!(st["state"], "cancelled", "{st}");
    assert_eq!(st["steps"][0]["state"], "cancelled");
    assert_eq!(st["steps"][1]["state"], "cancelled");
    assert!(
        st["attestation"].is_string(),
        "cancelled job must still be attested: {st}"
    );
    assert!(
        !k.state().join("work").join(&job).exists(),
        "work dir left behind"
    );
}

#[test]
fn step_provenance_records_verified_teardown() {
    if !privileged("step_provenance_records_verified_teardown") {
        return;
    }
    let k = Kilnd::start("");
    // A daemon that tries to outlive the step must not stop the teardown from being verified.
    let f = pipeline_file(
        k.dir.path(),
        "teardown.toml",
        "version = 1\nname = \"teardown\"\n[workspaces.out]\n[[steps]]\nname = \"make\"\nkind = \"build\"\noutput = \"out\"\nscript = \"(setsid sleep 3031 &); echo made > /workspace/out/made.txt\"\n",
    );
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 0, "follow teardown job");
    let out = k.dir.path().join("out");
    let o = k.kiln(&["artifacts", &job, "--out", out.to_str().unwrap()]);
    expect_code(&o, 0, "artifacts");
    let bundle: kiln_common::verify::Bundle =
        serde_json::from_slice(&std::fs::read(out.join("kiln-bundle.json")).unwrap()).unwrap();
    let statement = bundle.steps["make"]
        .decode_statement::<serde_json::Value>()
        .unwrap();
    let internal = &statement.predicate["buildDefinition"]["internalParameters"];
    assert_eq!(internal["teardownVerified"], true, "{internal}");
    assert!(
        host_processes_with("sleep 3031").is_empty(),
        "the step's daemon survived"
    );
    // The step's cgroups are gone. kilnd inherited this test's cgroups, and kiln nests its own
    // below them: `<mount>/<own cgroup>/kiln/<job>[/-]make`.
    for dir in step_cgroup_dirs(&job, "make") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// The cgroup directories kilnd (a child of this test, so in its cgroups) makes for step `step`
/// of job `job`: `<own>/kiln/<job>/<step>` and `<own>/kiln/<job>` in v2,
/// `<own>/kiln/<job>-<step>` in the v1 memory, pids and cpu hierarchies.
fn step_cgroup_dirs(job: &str, step: &str) -> Vec<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut dirs = Vec::new();
    for (hierarchy, controller, leaf) in [
        ("unified", "", format!("{job}/{step}")),
        ("memory", "memory", format!("{job}-{step}")),
        ("pids", "pids", format!("{job}-{step}")),
        ("cpu", "cpu", format!("{job}-{step}")),
    ] {
        let path = own
            .lines()
            .find_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
                let matches = if controller.is_empty() {
                    controllers.is_empty()
                } else {
                    controllers.split(',').any(|c| c == controller)
                };
                matches.then_some(path)
            })
            .unwrap();
        let kiln = Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(path.trim_start_matches('/'))
            .join("kiln");
        dirs.push(kiln.join(&leaf));
        if controller.is_empty() {
            dirs.push(kiln.join(job));
        }
    }
    dirs
}

#[test]
fn a_killed_kilnd_leaves_no_worker_or_cgroup_after_restart() {
    if !privileged("a_killed_kilnd_leaves_no_worker_or_cgroup_after_restart") {
        return;
    }
    let mut k = Kilnd::start("");
    let marker = format!("3031.{}", std::process::id());
    let f = pipeline_file(
        k.dir.path(),
        "crash.toml",
        &format!(
            "version = 1\nname = \"crash\"\n[[steps]]\nname = \"make\"\nkind = \"build\"\nscript = \"(setsid sleep {marker} &); sleep {marker}\"\n"
        ),
    );
    let job = submit(&k, &f, &[]);
    wait_for_step_state(&k, &job, "make", "running", Duration::from_secs(20));
    // The step's worker is running, in its cgroups; kilnd dies without any cleanup.
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_processes_with(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the step never started its sleeps"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut child = k.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // Restart on the same state: the job is marked failed, nothing of its worker is left.
    k.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host_processes_with(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "workers survived the restart: {:?}",
            host_processes_with(&marker)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for dir in step_cgroup_dirs(&job, "make") {
        assert!(!dir.exists(), "{} survived the restart", dir.display());
    }
    let st = status(&k, &job);
    assert_eq!(st["state"], "failed", "{st}");
}

// ---------------------------------------------------------------------------------------------
// Node attestor and workload attestor (TPM issue): real swtpm per test.

/// A two-step pipeline (build writes `dist/app.txt`, check reads it).
const TINY_PIPELINE: &str = "version = 1\nname = \"tiny\"\n[workspaces.dist]\n[[steps]]\nname = \"build\"\nkind = \"build\"\noutput = \"dist\"\nscript = 'echo built > /workspace/dist/app.txt'\nprofile = \"hermetic\"\n[[steps]]\nname = \"check\"\nkind = \"test\"\ninputs = [\"dist\"]\nscript = 'test -s /workspace/dist/app.txt'\nprofile = \"hermetic\"\n";

/// Run the tiny pipeline to success and download its artifacts into `out`; returns the job id.
fn run_tiny(k: &Kilnd, out: &Path) -> String {
    let file = pipeline_file(k.dir.path(), "tiny.toml", TINY_PIPELINE);
    let job = submit(k, &file, &[]);
    let f = follow(k, &job);
    expect_code(&f, 0, "follow tiny job");
    let o = k.kiln(&["artifacts", &job, "--out", out.to_str().unwrap()]);
    expect_code(&o, 0, "artifacts");
    job
}

fn tpm_test(name: &str) -> Option<kiln_e2e::Swtpm> {
    (privileged(name) && kiln_e2e::have_swtpm(name)).then(kiln_e2e::Swtpm::start)
}

#[test]
fn tpm_node_enrolls_and_artifacts_verify_back_to_the_ek_certificate() {
    let Some(swtpm) = tpm_test("tpm_node_enrolls_and_artifacts_verify_back_to_the_ek_certificate")
    else {
        return;
    };
    // The TPM chain is under test here, not the observer: run steps even where BPF is absent.
    let k = Kilnd::start_with_tpm(&swtpm, "[observer]\nrequired = false\n");
    let d = k.dir.path();
    let ca = swtpm.ca_bundle.to_str().unwrap();

    let o = k.kiln(&["node", "show"]);
    expect_code(&o, 0, "node show");
    assert!(stdout(&o).contains("key kind       tpm"), "{}", stdout(&o));
    let o = k.kiln(&["node"]);
    expect_code(&o, 0, "node");
    assert!(stdout(&o).contains("tpm"), "{}", stdout(&o));

    let node = d.join("node.json");
    let o = k.kiln(&[
        "node",
        "enroll",
        "--ek-ca",
        ca,
        "--out",
        node.to_str().unwrap(),
    ]);
    expect_code(&o, 0, "enroll");
    assert!(
        stdout(&o).contains("the ak lives in the tpm of the ek"),
        "{}",
        stdout(&o)
    );
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(&node).unwrap()).unwrap();
    let old_key = record["nodeKeyid"].as_str().unwrap().to_owned();
    let out = d.join("out");
    run_tiny(&k, &out);
    let artifact = out.join("app.txt");
    let verify = |bundle: &Path, extra: &[&str]| {
        let mut args = vec![
            "verify",
            artifact.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
            "--node",
            node.to_str().unwrap(),
            "--ek-ca",
            ca,
        ];
        args.extend_from_slice(extra);
        k.kiln(&args)
    };
    let bundle_path = out.join("kiln-bundle.json");
    let o = verify(&bundle_path, &[]);
    expect_code(&o, 0, "tpm-rooted verify");
    for link in [
        "ek certificate",
        "attestation key",
        "quote",
        "measured start",
        "node key",
        "workload certs",
        "dsse",
    ] {
        assert!(
            stdout(&o).contains(link),
            "missing link {link}:\n{}",
            stdout(&o)
        );
    }
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bundle_path).unwrap()).unwrap();
    assert!(bundle["nodeIdentity"]["quote"].is_object(), "{bundle}");
    assert_eq!(
        bundle["verificationMaterial"].as_object().unwrap().len(),
        3,
        "job + 2 steps"
    );
    let write_bundle = |name: &str, value: &serde_json::Value| {
        let p = d.join(name);
        std::fs::write(&p, serde_json::to_vec(value).unwrap()).unwrap();
        p
    };

    // A software-key path cannot stand in: the tpm bundle with a raw key is refused.
    let pem = d.join("node.pub");
    std::fs::write(&pem, stdout(&k.kiln(&["node", "--public-key"]))).unwrap();
    let o = k.kiln(&[
        "verify",
        artifact.to_str().unwrap(),
        "--trusted-key",
        pem.to_str().unwrap(),
    ]);
    expect_code(&o, 1, "raw node key on a tpm bundle");

    // Expected-PCR policy: a changed PCR 23 fails it.
    let policy = d.join("policy.json");
    std::fs::write(
        &policy,
        format!("{{\"23\": \"sha256:{}\"}}", "00".repeat(32)),
    )
    .unwrap();
    let o = verify(&bundle_path, &["--pcr-policy", policy.to_str().unwrap()]);
    expect_code(&o, 1, "pcr policy");
    assert!(
        stderr(&o).contains("pcr 23 is") && stderr(&o).contains("the policy expects"),
        "{}",
        stderr(&o)
    );

    // An event log that does not replay.
    let mut forged = bundle.clone();
    forged["nodeIdentity"]["event_log"][0]["description"] = "kilnd binary /usr/bin/kilnd".into();
    forged["nodeIdentity"]["event_log"][0]["digest"] = format!("sha256:{}", "11".repeat(32)).into();
    let o = verify(&write_bundle("log.json", &forged), &[]);
    expect_code(&o, 1, "forged event log");
    assert!(
        stderr(&o).contains("event log does not replay"),
        "{}",
        stderr(&o)
    );

    // A forged quote signature.
    let mut forged = bundle.clone();
    let sig = forged["nodeIdentity"]["quote"]["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let flipped = if sig.ends_with("A=") {
        sig.replace("A=", "B=")
    } else {
        format!("{}A{}", &sig[..sig.len() - 2], &sig[sig.len() - 1..])
    };
    forged["nodeIdentity"]["quote"]["signature"] = flipped.into();
    let o = verify(&write_bundle("quote.json", &forged), &[]);
    expect_code(&o, 1, "forged quote");
    assert!(
        stderr(&o).contains("quote signature does not verify"),
        "{}",
        stderr(&o)
    );

    // A replayed quote: this job's statement with another job's identity document.
    let out2 = d.join("out2");
    run_tiny(&k, &out2);
    let other: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("kiln-bundle.json")).unwrap()).unwrap();
    let mut replayed = bundle.clone();
    replayed["nodeIdentity"] = other["nodeIdentity"].clone();
    let o = verify(&write_bundle("replayed.json", &replayed), &[]);
    expect_code(&o, 1, "replayed quote");
    assert!(stderr(&o).contains("replayed quote"), "{}", stderr(&o));

    // A step certificate swapped for another step's (right node, wrong step name).
    let mut swapped = bundle.clone();
    let material = swapped["verificationMaterial"].as_object().unwrap().clone();
    let keys: Vec<&String> = material.keys().collect();
    let (a, b) = (keys[0].clone(), keys[1].clone());
    swapped["verificationMaterial"][&a] = material[&b].clone();
    swapped["verificationMaterial"][&b] = material[&a].clone();
    let o = verify(&write_bundle("swapped.json", &swapped), &[]);
    expect_code(&o, 1, "swapped certificates");
    assert!(
        stderr(&o).contains("workload certificate"),
        "{}",
        stderr(&o)
    );

    // Rotation: a new node key; the old bundle still verifies until the operator revokes it.
    let node_keyid = || -> String {
        let o = k.kiln(&["--json", "node"]);
        expect_code(&o, 0, "node");
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["keyid"].as_str().unwrap().to_owned()
    };
    let before = node_keyid();
    let o = k.kiln(&["node", "rotate-key"]);
    expect_code(&o, 0, "rotate-key");
    // The API reports the current node key, not the one kilnd started with.
    assert_ne!(
        node_keyid(),
        before,
        "GET /v1/node still names the rotated-out key"
    );
    let o = verify(&bundle_path, &[]);
    expect_code(&o, 0, "old bundle after rotation");
    let out3 = d.join("out3");
    run_tiny(&k, &out3);
    let (operator, _) = kiln_common::keys::SigningKey::generate().unwrap();
    let operator_key = d.join("operator.pem");
    std::fs::write(&operator_key, operator.to_pkcs8_pem()).unwrap();
    let operator_pub = d.join("operator.pub");
    std::fs::write(&operator_pub, operator.public_key().to_pem()).unwrap();
    let revocations = d.join("revocations.json");
    let o = k.kiln(&[
        "node",
        "revoke",
        "--operator-key",
        operator_key.to_str().unwrap(),
        "--node-key",
        &old_key,
        "--out",
        revocations.to_str().unwrap(),
    ]);
    expect_code(&o, 0, "revoke");
    let rev = [
        "--revocations",
        revocations.to_str().unwrap(),
        "--operator-key",
        operator_pub.to_str().unwrap(),
    ];
    let o = verify(&bundle_path, &rev);
    expect_code(&o, 1, "revoked node key");
    assert!(stderr(&o).contains("is revoked"), "{}", stderr(&o));
    let new_artifact = out3.join("app.txt");
    let o = k.kiln(&[
        "verify",
        new_artifact.to_str().unwrap(),
        "--node",
        node.to_str().unwrap(),
        "--ek-ca",
        ca,
        rev[0],
        rev[1],
        rev[2],
        rev[3],
    ]);
    expect_code(&o, 0, "new key after revoking the old one");
    // A revocation list signed by another key is refused.
    let (intruder, _) = kiln_common::keys::SigningKey::generate().unwrap();
    std::fs::write(&operator_pub, intruder.public_key().to_pem()).unwrap();
    let o = verify(&bundle_path, &rev);
    expect_code(&o, 2, "revocation list by another key");
    assert!(
        stderr(&o).contains("not signed by the operator key"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn software_key_needs_the_flag_on_both_sides() {
    if !privileged("software_key_needs_the_flag_on_both_sides") {
        return;
    }
    // kilnd refuses to start without a TPM unless --insecure-software-key is given.
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(kiln_e2e::bin("kilnd"))
        .args(["--state-dir"])
        .arg(dir.path().join("state"))
        .args(["--socket"])
        .arg(dir.path().join("s.sock"))
        .args(["--profiles-dir"])
        .arg(repo().join("profiles"))
        .env_remove("KILN_TPM_TCTI")
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("--insecure-software-key"),
        "{}",
        stderr(&o)
    );

    // The software path still works, and its attestations say so: verify refuses them unless
    // --allow-software-key.
    let k = Kilnd::start("[observer]\nrequired = false\n");
    let out = k.dir.path().join("out");
    run_tiny(&k, &out);
    let pem = k.dir.path().join("node.pub");
    std::fs::write(&pem, stdout(&k.kiln(&["node", "--public-key"]))).unwrap();
    let artifact = out.join("app.txt");
    let o = k.kiln(&[
        "verify",
        artifact.to_str().unwrap(),
        "--trusted-key",
        pem.to_str().unwrap(),
    ]);
    expect_code(&o, 1, "software key without --allow-software-key");
    assert!(
        stderr(&o).contains("software keys are refused"),
        "{}",
        stderr(&o)
    );
    let o = k.kiln(&[
        "verify",
        artifact.to_str().unwrap(),
        "--trusted-key",
        pem.to_str().unwrap(),
        "--allow-software-key",
    ]);
    expect_code(&o, 0, "software key allowed");
    assert!(stdout(&o).contains("software key"), "{}", stdout(&o));
}

// ---------------------------------------------------------------------------------------------
// Pipeline observer: every step's runtime trace, `kiln trace`, `--require-complete-trace`.

#[test]
fn observed_pipeline_has_complete_signed_traces() {
    if !privileged("observed_pipeline_has_complete_signed_traces") {
        return;
    }
    let k = Kilnd::start("");
    let example = repo().join("examples/hello-c/pipeline.toml");
    let job = submit(&k, &example, &[]);
    expect_code(&follow(&k, &job), 0, "follow observed job");

    // The process tree holds the compile's execs, with exits; the summary says complete.
    let o = k.kiln(&["trace", &job, "compile"]);
    expect_code(&o, 0, "kiln trace");
    let text = stdout(&o);
    for needle in [
        "cc -O2",
        "cc1",
        "as --64",
        "/usr/bin/ld",
        "complete    yes",
        "lost        0",
    ] {
        assert!(
            text.contains(needle),
            "kiln trace lacks {needle:?}:\n{text}"
        );
    }
    assert!(
        text.contains("/workspace/build/hello"),
        "the output file is a written file:\n{text}"
    );
    // --json streams the records: header first, summary last, execs in between.
    let o = k.kiln(&["--json", "trace", &job, "compile"]);
    expect_code(&o, 0, "kiln --json trace");
    let records: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.first().unwrap()["type"], "header");
    assert_eq!(records.last().unwrap()["type"], "summary");
    assert_eq!(records.last().unwrap()["complete"], true);
    assert!(
        records
            .iter()
            .any(|r| r["type"] == "exec" && r["exe"].as_str().unwrap().ends_with("/cc1")),
        "no cc1 exec in the trace"
    );
    // Materials actually used: the compiler proper, executed, with the digest of the host file
    // the sandbox bound at that path.
    let summary = records.last().unwrap();
    let cc1 = summary["materials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["path"].as_str().unwrap().ends_with("/cc1"))
        .unwrap_or_else(|| panic!("cc1 is not among the materials: {summary}"));
    let on_host = std::fs::read(cc1["path"].as_str().unwrap()).unwrap();
    assert_eq!(cc1["sha256"], kiln_common::Digest::of(&on_host).hex());
    assert!(
        cc1["usedAs"].as_array().unwrap().contains(&"exec".into()),
        "{cc1}"
    );
    // kiln's own sandbox setup (the helper's mounts of host paths) is left out of the trace,
    // and no record names kilnd's state directory (a host path).
    assert!(
        summary["setupEventsOmitted"].as_u64().unwrap() > 0,
        "{summary}"
    );
    let state = k.state().display().to_string();
    for r in &records {
        assert!(
            !r.to_string().contains(&state),
            "host path in the trace: {r}"
        );
    }
    // All steps: the default shows every attested step.
    let o = k.kiln(&["trace", &job]);
    expect_code(&o, 0, "kiln trace (all steps)");
    for step in ["==> compile", "==> test", "==> package"] {
        assert!(stdout(&o).contains(step), "{}", stdout(&o));
    }

    // Offline: the chain's traces are signed, bound to the provenance, and complete.
    let out = k.dir.path().join("out");
    expect_code(
        &k.kiln(&["artifacts", &job, "--out", out.to_str().unwrap()]),
        0,
        "artifacts",
    );
    let key = k.dir.path().join("node.pub");
    std::fs::write(&key, stdout(&k.kiln(&["node", "--public-key"]))).unwrap();
    let artifact = out.join("hello-c.tar.gz");
    let bundle_path = out.join("kiln-bundle.json");
    let verify = |bundle: &Path| {
        k.kiln(&[
            "verify",
            artifact.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
            "--trusted-key",
            key.to_str().unwrap(),
            "--allow-software-key",
            "--require-complete-trace",
        ])
    };
    let o = verify(&bundle_path);
    expect_code(&o, 0, "verify --require-complete-trace");
    assert!(
        stdout(&o).contains("trace     compile complete"),
        "{}",
        stdout(&o)
    );

    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bundle_path).unwrap()).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut b = bundle.clone();
        edit(&mut b);
        let path = k.dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec(&b).unwrap()).unwrap();
        verify(&path)
    };
    // Trace envelope removed.
    let o = variant("no-trace.json", &|b| {
        b["traces"].as_object_mut().unwrap().remove("compile");
    });
    expect_code(&o, 1, "verify without the compile trace");
    assert!(stderr(&o).contains("bundle has none"), "{}", stderr(&o));
    // Trace payload tampered (claims fewer events): its signature fails.
    let o = variant("tampered-trace.json", &|b| {
        let env = &mut b["traces"]["compile"];
        let payload = base64_decode(env["payload"].as_str().unwrap());
        let forged = String::from_utf8(payload)
            .unwrap()
            .replace("\"lost\":0", "\"lost\":00");
        env["payload"] = serde_json::Value::String(base64_encode(forged.as_bytes()));
    });
    expect_code(&o, 1, "verify with a tampered trace");
    assert!(stderr(&o).contains("trace"), "{}", stderr(&o));
    // Another step's (validly signed) trace swapped in.
    let o = variant("swapped-trace.json", &|b| {
        b["traces"]["compile"] = b["traces"]["package"].clone();
    });
    expect_code(&o, 1, "verify with a swapped trace");
    assert!(
        stderr(&o).contains("the trace was replaced"),
        "{}",
        stderr(&o)
    );
    // Without the flag, a bundle without traces still verifies (old bundles parse).
    let o = variant("old-bundle.json", &|b| {
        b.as_object_mut().unwrap().remove("traces");
    });
    expect_code(&o, 1, "old bundle with --require-complete-trace");
    let o = k.kiln(&[
        "verify",
        artifact.to_str().unwrap(),
        "--bundle",
        k.dir.path().join("old-bundle.json").to_str().unwrap(),
        "--trusted-key",
        key.to_str().unwrap(),
        "--allow-software-key",
    ]);
    expect_code(&o, 0, "old bundle without the flag");
}

fn base64_decode(text: &str) -> Vec<u8> {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            child.wait_with_output()
        })
        .unwrap();
    out.stdout
}

fn base64_encode(bytes: &[u8]) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(bytes).unwrap();
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn systemd_socket_activation_serves_on_the_passed_socket() {
    if !privileged("systemd_socket_activation_serves_on_the_passed_socket") {
        return;
    }
    // Configure a daemon, then hand its socket to systemd-socket-activate instead: the daemon
    // must serve on the inherited fd (LISTEN_PID/LISTEN_FDS), not bind its configured path.
    let mut k = Kilnd::start("");
    assert!(k.stop().success());
    let _ = std::fs::remove_file(&k.socket);
    let activated = k.dir.path().join("activated.sock");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(k.dir.path().join("kilnd.log"))
        .unwrap();
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&activated)
        .arg(kiln_e2e::bin("kilnd"))
        .arg("--config")
        .arg(&k.config)
        .arg("--insecure-software-key")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    k.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !activated.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never bound its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts kilnd; the request waits in the listen backlog meanwhile.
    let o = Command::new(kiln_e2e::bin("kiln"))
        .arg("--socket")
        .arg(&activated)
        .args(["--json", "jobs"])
        .output()
        .unwrap();
    expect_code(&o, 0, "jobs over the activated socket");
    assert!(
        k.log().contains("using the socket passed by systemd"),
        "{}",
        k.log()
    );
    assert!(
        !k.socket.exists(),
        "kilnd bound its configured socket despite activation"
    );
    assert!(k.stop().success(), "{}", k.log());
    // The socket belongs to systemd: kilnd must not remove it on shutdown.
    assert!(activated.exists());
}
