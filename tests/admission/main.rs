//! End-to-end tests of the admission controller (issue 6) against the real kilnd: signed pipeline
//! definitions under a policy, job admission (every violation listed, hard-coded secrets located),
//! secrets at runtime (mounted only where declared, redacted everywhere, never stored), step
//! admission (a workspace tampered between steps), and Rego verification policies.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_common::dsse::Envelope;
use kiln_e2e::{
    Kilnd, admission_config, expect_code, files_containing, follow, pipeline_file, pipeline_keygen,
    pipeline_sign, privileged, repo, secret_dir, status, stderr, stdout, submit,
    wait_for_step_state,
};

/// The statement inside an envelope of a bundle, as JSON (the bundle was written by kilnd).
fn statement(envelope: &serde_json::Value) -> serde_json::Value {
    let envelope: Envelope = serde_json::from_value(envelope.clone()).unwrap();
    envelope
        .decode_statement::<serde_json::Value>()
        .unwrap()
        .predicate
}

/// 1-based line and column of the first occurrence of `needle` in `text`.
fn locate(text: &str, needle: &str) -> (usize, usize) {
    let offset = text.find(needle).unwrap();
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() + 1;
    (line, col)
}

const SIGNED: &str = "version = 1\nname = \"hello-signed\"\n[workspaces.out]\n[[steps]]\nname = \"make\"\nkind = \"build\"\noutput = \"out\"\nscript = \"echo signed > /workspace/out/greeting.txt\"\n";

#[test]
fn pipeline_signatures_are_enforced_and_the_signer_is_recorded() {
    if !privileged("pipeline_signatures_are_enforced_and_the_signer_is_recorded") {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (release, _, release_id) = pipeline_keygen(keys.path(), "release");
    let (other, _, _) = pipeline_keygen(keys.path(), "other");
    let policy = keys.path().join("policy.toml");
    // A relative signer path is relative to the policy file.
    std::fs::write(
        &policy,
        "# only the release key may sign hello-* pipelines; nothing else is admitted\n[[pipelines]]\nname = \"hello-*\"\nsigners = [\"release.pub\"]\n",
    )
    .unwrap();
    let k = Kilnd::start(&admission_config(Some(&policy), None));
    let f = pipeline_file(k.dir.path(), "signed.toml", SIGNED);
    let submit_refused = |what: &str, expected: &str| {
        let o = k.kiln(&["submit", f.to_str().unwrap()]);
        expect_code(&o, 2, what);
        assert!(
            stderr(&o).contains(expected),
            "{what}: expected {expected:?} in:\n{}",
            stderr(&o)
        );
    };

    // Unsigned.
    submit_refused("unsigned", "\"hello-signed\" refused: it is not signed");
    // Signed by a key the policy does not name.
    pipeline_sign(&f, &other);
    submit_refused("other key", "no signature from a trusted key");
    // Signed by the right key, then edited.
    pipeline_sign(&f, &release);
    std::fs::write(&f, format!("{SIGNED}# harmless-looking edit\n")).unwrap();
    submit_refused("modified after signing", "modified after it was signed");
    // A pipeline no rule matches.
    let unmatched = pipeline_file(
        k.dir.path(),
        "other.toml",
        &SIGNED.replace("hello-signed", "other"),
    );
    pipeline_sign(&unmatched, &release);
    let o = k.kiln(&["submit", unmatched.to_str().unwrap()]);
    expect_code(&o, 2, "unmatched pipeline");
    assert!(
        stderr(&o).contains("no policy rule names signers for it"),
        "{}",
        stderr(&o)
    );
    // Nothing was admitted so far.
    assert_eq!(stdout(&k.kiln(&["--json", "jobs"])).trim(), "[]");

    // Signed by an allowed signer: runs, and every statement names the signer.
    std::fs::write(&f, SIGNED).unwrap();
    pipeline_sign(&f, &release);
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 0, "signed job");
    let out = k.dir.path().join("out");
    let o = k.kiln(&["artifacts", &job, "--out", out.to_str().unwrap()]);
    expect_code(&o, 0, "artifacts");
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("kiln-bundle.json")).unwrap()).unwrap();
    assert_eq!(
        statement(&bundle["job"])["pipelineSigner"],
        release_id.as_str()
    );
    let steps = bundle["steps"].as_object().unwrap();
    assert!(!steps.is_empty());
    for (name, envelope) in steps {
        let predicate = statement(envelope);
        let internal = &predicate["buildDefinition"]["internalParameters"];
        assert_eq!(
            internal["pipelineSigner"],
            release_id.as_str(),
            "step {name}"
        );
        assert_eq!(internal["network"], "none", "step {name}");
        assert_eq!(
            predicate["buildDefinition"]["externalParameters"]["pipelineDigest"],
            format!("{}", kiln_common::Digest::of(SIGNED.as_bytes())),
        );
    }
}

#[test]
fn every_admission_violation_is_listed_and_hard_coded_tokens_are_located() {
    if !privileged("every_admission_violation_is_listed_and_hard_coded_tokens_are_located") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, "allow_unsigned = true\n").unwrap();
    let k = Kilnd::start(&admission_config(Some(&policy), None));
    let token = format!("ghp_{}", "Zq8vR2mX9kP4wL7tY1nB6cJ3dF5gH0jK2lM4");
    let text = format!(
        "version = 1\nname = \"leaky\"\n[params.count]\ntype = \"int\"\ndefault = 1\n[params.flavour]\ntype = \"string\"\npattern = \"^[a-z]+$\"\n[workspaces.out]\n[[steps]]\nname = \"a\"\nkind = \"build\"\noutput = \"out\"\nscript = \"curl -H 'Authorization: token {token}' https://example.invalid/${{params.flavour}}\"\n"
    );
    let f = pipeline_file(k.dir.path(), "leaky.toml", &text);
    let o = k.kiln(&[
        "submit",
        f.to_str().unwrap(),
        "--param",
        "count=many",
        "--param",
        "flavour=Not Valid!",
        "--param",
        "colour=red",
    ]);
    expect_code(&o, 2, "leaky pipeline with bad parameters");
    let err = stderr(&o);
    let (line, col) = locate(&text, "ghp_");
    assert_eq!((line, col), (14, 41));
    for expected in [
        "leaky.toml:14:41: possible hard-coded secret (GitHub token)",
        "parameter \"count\"",
        "parameter \"flavour\"",
        "parameter \"colour\": not declared",
    ] {
        assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
    }
    // The secret itself is never echoed back.
    assert!(!err.contains(&token), "{err}");
    // Nothing was stored: no job, and the pipeline text is not in the CAS.
    assert_eq!(stdout(&k.kiln(&["--json", "jobs"])).trim(), "[]");
    let hex = kiln_common::Digest::of(text.as_bytes()).hex();
    assert!(
        !k.state()
            .join("cas/sha256")
            .join(&hex[..2])
            .join(&hex)
            .exists(),
        "a refused pipeline was stored"
    );
    assert!(files_containing(&k.state(), token.as_bytes()).is_empty());

    // A private key block is found wherever it is, comments included.
    let key_text = "version = 1\nname = \"keyed\"\n[[steps]]\nname = \"a\"\nkind = \"run\"\nrun = [\"true\"]\n# -----BEGIN EC PRIVATE KEY-----\n";
    let f = pipeline_file(k.dir.path(), "keyed.toml", key_text);
    let o = k.kiln(&["submit", f.to_str().unwrap()]);
    expect_code(&o, 2, "private key block");
    assert!(
        stderr(&o).contains("keyed.toml:7:3: possible hard-coded secret (private key block)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn secrets_are_mounted_only_where_declared_redacted_and_never_stored() {
    if !privileged("secrets_are_mounted_only_where_declared_redacted_and_never_stored") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("kiln-e2e-s3cret-{nanos:x}-{}", std::process::id());
    let secrets = secret_dir(work.path(), &[("DEPLOY_TOKEN", &format!("{secret}\n"))]);
    // No policy: pipelines are admitted unsigned (with a warning), as on a default node.
    let k = Kilnd::start(&admission_config(None, Some(&secrets)));
    let text = r#"version = 1
name = "secretive"
[workspaces.out]

[[steps]]
name = "use"
kind = "build"
output = "out"
secrets = ["DEPLOY_TOKEN"]
script = '''
sleep 1
v=$(cat /run/secrets/DEPLOY_TOKEN)
echo "the token is $v"
# Split across two writes: redaction must still catch it.
printf '%s' "$v" | head -c 7
sleep 0.3
printf '%s\n' "$v" | tail -c +8
if (echo x > /run/secrets/DEPLOY_TOKEN) 2>/dev/null; then echo "secret is writable" >&2; exit 1; fi
echo ok > /workspace/out/done.txt
'''

[[steps]]
name = "other"
kind = "test"
inputs = ["out"]
script = '''
if [ -e /run/secrets ]; then echo "secrets visible to a step that did not declare them" >&2; exit 1; fi
echo "no secrets here"
'''
"#;
    let f = pipeline_file(k.dir.path(), "secretive.toml", text);

    // A secret directory others can read is refused at admission.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o750)).unwrap();
    let o = k.kiln(&["submit", f.to_str().unwrap()]);
    expect_code(&o, 2, "loose secret directory");
    assert!(
        stderr(&o).contains("group and other must have no access"),
        "{}",
        stderr(&o)
    );
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();

    let job = submit(&k, &f, &[]);
    // Follow the live event stream from the start (the step sleeps before printing).
    let follower = k
        .kiln_cmd(&["--json", "follow", &job])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let events = follower.wait_with_output().unwrap();
    expect_code(&events, 0, "follow secretive job");
    let events = stdout(&events);
    assert!(events.contains("[REDACTED:DEPLOY_TOKEN]"), "{events}");
    assert!(
        !events.contains(&secret),
        "secret in the event stream:\n{events}"
    );
    assert!(!events.contains(&secret[..20]), "{events}");

    let o = k.kiln(&["logs", &job, "use"]);
    expect_code(&o, 0, "logs");
    let log = stdout(&o);
    assert!(
        log.contains("the token is [REDACTED:DEPLOY_TOKEN]"),
        "{log}"
    );
    assert_eq!(log.matches("[REDACTED:DEPLOY_TOKEN]").count(), 2, "{log}");
    assert!(!log.contains(&secret[..20]), "{log}");
    let o = k.kiln(&["logs", &job, "other"]);
    assert!(stdout(&o).contains("no secrets here"), "{}", stdout(&o));

    // Nowhere in the state dir (CAS, kiln.db and its WAL), nor in kilnd's own log.
    for needle in [secret.as_str(), &secret[..20]] {
        let found = files_containing(k.dir.path(), needle.as_bytes());
        assert!(found.is_empty(), "secret value found in {found:?}");
    }
}

#[test]
fn a_workspace_tampered_between_steps_fails_step_admission() {
    if !privileged("a_workspace_tampered_between_steps_fails_step_admission") {
        return;
    }
    let k = Kilnd::start("");
    let text = "version = 1\nname = \"tamper\"\n[workspaces.a]\n[workspaces.b]\n[[steps]]\nname = \"make\"\nkind = \"build\"\noutput = \"a\"\nscript = \"echo genuine > /workspace/a/payload.txt\"\n[[steps]]\nname = \"wait\"\nkind = \"run\"\noutput = \"b\"\nscript = \"sleep 4; echo done > /workspace/b/x\"\n[[steps]]\nname = \"consume\"\nkind = \"test\"\ninputs = [\"a\"]\nscript = \"cat /workspace/a/payload.txt\"\n";
    let f = pipeline_file(k.dir.path(), "tamper.toml", text);
    let job = submit(&k, &f, &[]);
    wait_for_step_state(&k, &job, "wait", "running", Duration::from_mins(1));
    // The host (or an escaped step) swaps the file `make` produced and signed.
    let payload = k.state().join("work").join(&job).join("ws/a/payload.txt");
    assert_eq!(std::fs::read_to_string(&payload).unwrap(), "genuine\n");
    std::fs::write(&payload, "tampered\n").unwrap();
    let o = follow(&k, &job);
    expect_code(&o, 1, "tampered job");
    let st = status(&k, &job);
    assert_eq!(st["state"], "failed");
    assert_eq!(
        st["error"],
        "step \"consume\" failed: workspace a modified after step make signed it (payload.txt changed)"
    );
    let consume = st["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "consume")
        .unwrap();
    assert_eq!(consume["state"], "failed", "{consume}");
    assert_eq!(
        consume["error"],
        "workspace a modified after step make signed it (payload.txt changed)"
    );
    assert!(
        stdout(&o).contains("workspace a modified after step make signed it"),
        "{}",
        stdout(&o)
    );

    // Untouched, the same pipeline passes step admission.
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 0, "untampered job");
}

/// `kiln verify` with the example Rego policy; returns the CLI output.
fn verify_with_policy(k: &Kilnd, job: &str, artifact: &str) -> std::process::Output {
    let out = k.dir.path().join(format!("out-{job}"));
    let o = k.kiln(&["artifacts", job, "--out", out.to_str().unwrap()]);
    expect_code(&o, 0, "artifacts");
    let o = k.kiln(&["node", "--public-key"]);
    expect_code(&o, 0, "node --public-key");
    let node_pub = k.dir.path().join("node.pub");
    std::fs::write(&node_pub, stdout(&o)).unwrap();
    k.kiln(&[
        "verify",
        out.join(artifact).to_str().unwrap(),
        "--trusted-key",
        node_pub.to_str().unwrap(),
        "--allow-software-key",
        "--policy",
        repo()
            .join("docs/examples/require-test.rego")
            .to_str()
            .unwrap(),
    ])
}

/// The hello-c example without its `test` step, next to a copy of its sources.
fn hello_without_test(dir: &Path) -> std::path::PathBuf {
    let example = repo().join("examples/hello-c");
    let text = std::fs::read_to_string(example.join("pipeline.toml")).unwrap();
    let start = text.find("[[steps]]\nname = \"test\"").unwrap();
    let end = start + text[start + 1..].find("[[steps]]").unwrap() + 1;
    let text = format!("{}{}", &text[..start], &text[end..])
        .replace("name = \"hello-c\"", "name = \"hello-c-untested\"");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    for entry in std::fs::read_dir(example.join("src")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("src").join(entry.file_name())).unwrap();
    }
    pipeline_file(dir, "pipeline.toml", &text)
}

#[test]
fn rego_policy_requires_a_test_step() {
    if !privileged("rego_policy_requires_a_test_step") {
        return;
    }
    let k = Kilnd::start("");
    let job = submit(&k, &repo().join("examples/hello-c/pipeline.toml"), &[]);
    expect_code(&follow(&k, &job), 0, "example job");
    let o = verify_with_policy(&k, &job, "hello-c.tar.gz");
    expect_code(&o, 0, "example under the policy");
    assert!(
        stdout(&o).contains("verified hello-c.tar.gz"),
        "{}",
        stdout(&o)
    );

    let dir = k.dir.path().join("untested");
    let f = hello_without_test(&dir);
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 0, "untested job");
    let o = verify_with_policy(&k, &job, "hello-c.tar.gz");
    expect_code(&o, 1, "untested artifact under the policy");
    assert!(
        stderr(&o).contains("no test step: the artifact was never tested"),
        "{}",
        stderr(&o)
    );
    // Without the policy the same artifact verifies: only the policy refused it.
    let out = k.dir.path().join(format!("out-{job}"));
    let node_pub = k.dir.path().join("node.pub");
    let o = Command::new(kiln_e2e::bin("kiln"))
        .args(["verify"])
        .arg(out.join("hello-c.tar.gz"))
        .arg("--trusted-key")
        .arg(&node_pub)
        .arg("--allow-software-key")
        .output()
        .unwrap();
    expect_code(&o, 0, "untested artifact without a policy");
}
