//! End-to-end tests of the publish step (issue 6): the SBOM and test-result attestations a
//! publish step signs, `kiln export` (directory and OCI image layout) and offline `kiln verify`
//! of the export with kilnd stopped.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;
use std::path::Path;

use kiln_common::Digest;
use kiln_common::dsse::Envelope;
use kiln_e2e::{Kilnd, expect_code, follow, pipeline_file, privileged, stderr, stdout, submit};

/// Content of the pinned dependency the fetch step writes (no network needed).
const DEP: &str = "libdep 1.0\n";

/// source `src` -> fetch `deps` (pinned) -> build `build` -> test -> publish `dist`.
fn pipeline(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/main.txt"), "app main\n").unwrap();
    let pin = Digest::of(DEP.as_bytes()).hex();
    let text = format!(
        r#"version = 1
name = "publish-e2e"
[workspaces.src]
source = "src"
[workspaces.deps]
[workspaces.build]
[workspaces.dist]

[[steps]]
name = "deps"
kind = "fetch"
profile = "fetch"
inputs = ["src"]
output = "deps"
pins = [{{ path = "libdep-1.0.txt", sha256 = "{pin}", url = "https://deps.example.org/libdep-1.0.txt" }}]
script = "printf 'libdep 1.0\n' > /workspace/deps/libdep-1.0.txt"

[[steps]]
name = "compile"
kind = "build"
inputs = ["src", "deps"]
output = "build"
script = "cat /workspace/src/main.txt /workspace/deps/libdep-1.0.txt > /workspace/build/app"

[[steps]]
name = "check"
kind = "test"
inputs = ["build"]
script = "grep -q 'app main' /workspace/build/app && echo 'check: ok'"

[[steps]]
name = "package"
kind = "publish"
inputs = ["build"]
output = "dist"
script = "cp /workspace/build/app /workspace/dist/app.txt && cd /workspace/dist && sha256sum app.txt > SHA256SUMS"
"#
    );
    pipeline_file(dir, "publish.toml", &text)
}

fn statement(path: &Path) -> serde_json::Value {
    let envelope: Envelope = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    serde_json::to_value(envelope.decode_statement::<serde_json::Value>().unwrap()).unwrap()
}

/// An independent check of an OCI image layout (not `kiln_common::oci`): every blob's sha256
/// is its name, every descriptor's digest and size match a blob. Returns (blobs, manifests).
fn check_oci_layout(dir: &Path) -> (usize, Vec<serde_json::Value>) {
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let mut sizes = BTreeMap::new();
    for entry in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(Digest::of(&bytes).hex(), name, "blob {name} content");
        sizes.insert(format!("sha256:{name}"), bytes.len() as u64);
    }
    let check = |d: &serde_json::Value| {
        let digest = d["digest"].as_str().unwrap();
        assert_eq!(
            sizes.get(digest).copied(),
            d["size"].as_u64(),
            "descriptor {d} against its blob"
        );
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    let mut manifests = Vec::new();
    for d in index["manifests"].as_array().unwrap() {
        check(d);
        let hex = d["digest"].as_str().unwrap().trim_start_matches("sha256:");
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(hex)).unwrap())
                .unwrap();
        assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        check(&m["config"]);
        for layer in m["layers"].as_array().unwrap() {
            check(layer);
            assert!(
                layer["annotations"]["org.opencontainers.image.title"].is_string(),
                "{layer}"
            );
        }
        if !m["subject"].is_null() {
            check(&m["subject"]);
        }
        manifests.push(m);
    }
    (sizes.len(), manifests)
}

#[test]
fn publish_attests_sbom_and_tests_and_the_export_verifies_offline() {
    if !privileged("publish_attests_sbom_and_tests_and_the_export_verifies_offline") {
        return;
    }
    let mut k = Kilnd::start("");
    let work = tempfile::tempdir().unwrap();
    let file = pipeline(work.path());
    let job = submit(&k, &file, &[]);
    let o = follow(&k, &job);
    expect_code(&o, 0, &format!("job\n{}", k.log()));

    let export = work.path().join("export");
    let o = k.kiln(&["--json", "export", &job, export.to_str().unwrap(), "--oci"]);
    expect_code(&o, 0, "export");
    let artifact = export.join("app.txt");
    let artifact_digest = Digest::of(&std::fs::read(&artifact).unwrap());
    let app_digest = Digest::of(format!("app main\n{DEP}").as_bytes());
    assert_eq!(artifact_digest, app_digest);

    // The SBOM: about the published files, listing the pin (url, sha256, what the fetch step
    // recorded) and the source workspace.
    let sbom = statement(&export.join("attestations/package.sbom.dsse.json"));
    assert_eq!(sbom["predicateType"], "https://cyclonedx.org/bom");
    let subjects: Vec<&str> = sbom["subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["digest"]["sha256"].as_str().unwrap())
        .collect();
    assert!(subjects.contains(&artifact_digest.hex().as_str()), "{sbom}");
    let bom = &sbom["predicate"];
    assert_eq!(
        (bom["bomFormat"].as_str(), bom["specVersion"].as_str()),
        (Some("CycloneDX"), Some("1.5"))
    );
    let components = bom["components"].as_array().unwrap();
    let dep = components
        .iter()
        .find(|c| c["name"] == "libdep-1.0.txt")
        .unwrap_or_else(|| panic!("no pinned dependency in {bom}"));
    let pin = Digest::of(DEP.as_bytes()).hex();
    assert_eq!(dep["hashes"][0]["content"], pin.as_str());
    assert_eq!(
        dep["externalReferences"][0]["url"],
        "https://deps.example.org/libdep-1.0.txt"
    );
    assert!(
        dep["properties"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "kiln:recorded-sha256" && p["value"] == pin.as_str()),
        "{dep}"
    );
    assert!(
        components.iter().any(|c| c["name"] == "workspace:src"),
        "{bom}"
    );

    // The test result: about the build output the test read, with its exit and log.
    let test = statement(&export.join("attestations/package.test-result-check.dsse.json"));
    assert_eq!(
        test["predicateType"],
        "https://in-toto.io/attestation/test-result/v0.1"
    );
    assert_eq!(
        test["subject"][0]["digest"]["sha256"],
        app_digest.hex().as_str()
    );
    assert_eq!(test["predicate"]["result"], "PASSED");
    assert_eq!(test["predicate"]["passedTests"][0], "check");
    assert_eq!(test["predicate"]["kiln"]["exitCode"], 0);
    assert!(test["predicate"]["kiln"]["log"].is_string());

    // Indexed by subject.
    let o = k.kiln(&["--json", "attestations", artifact.to_str().unwrap()]);
    expect_code(&o, 0, "attestations");
    let refs: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(
        refs.as_array()
            .unwrap()
            .iter()
            .any(|r| r["attestation"] == "sbom" && r["step"] == "package"),
        "{refs}"
    );

    // The OCI layout, checked independently.
    let (blobs, manifests) = check_oci_layout(&export.join("oci"));
    let image = &manifests[0];
    assert!(
        image["layers"].as_array().unwrap().iter().any(
            |l| l["annotations"]["org.opencontainers.image.title"] == "app.txt"
                && l["digest"] == artifact_digest.to_string().as_str()
        ),
        "{image}"
    );
    let referrers: Vec<&serde_json::Value> = manifests
        .iter()
        .filter(|m| !m["subject"].is_null())
        .collect();
    let dsse = referrers
        .iter()
        .filter(|m| m["artifactType"] == "application/vnd.dsse.envelope.v1+json")
        .count();
    // job + 4 steps + SBOM + test result (+ traces when the observer ran).
    assert!(dsse >= 7, "{dsse} dsse referrers");
    assert!(blobs > dsse, "{blobs} blobs");

    // Offline: the node is stopped, the export alone verifies.
    k.stop();
    let verify = |bundle: Option<&Path>| {
        let mut args = vec![
            "--json".to_owned(),
            "verify".to_owned(),
            artifact.display().to_string(),
            "--trusted-key".to_owned(),
            export.join("keys/node.pub").display().to_string(),
            "--allow-software-key".to_owned(),
        ];
        if let Some(b) = bundle {
            args.extend(["--bundle".to_owned(), b.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        k.kiln(&args)
    };
    let o = verify(None);
    expect_code(&o, 0, "verify the export");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let attested: Vec<&str> = v["result"]["attestations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["coversArtifact"] == true)
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    // app.txt is a copy of the tested build output: both statements are about its digest.
    assert_eq!(attested, ["sbom", "test-result:check"], "{v}");

    // A bundle whose SBOM was dropped (its provenance still names it) fails.
    let mut bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(export.join("kiln-bundle.json")).unwrap()).unwrap();
    let all = bundle["attestations"].as_array().unwrap().clone();
    bundle["attestations"] = serde_json::Value::Array(
        all.iter()
            .filter(|a| a["name"] != "sbom")
            .cloned()
            .collect(),
    );
    let dropped = work.path().join("dropped.json");
    std::fs::write(&dropped, serde_json::to_vec(&bundle).unwrap()).unwrap();
    let o = verify(Some(&dropped));
    expect_code(&o, 1, "verify without the SBOM");
    assert!(stdout(&o).contains("bundle lacks it"), "{}", stdout(&o));

    // The SBOM swapped for the test result's envelope (validly signed, wrong one) fails.
    let test_envelope = all
        .iter()
        .find(|a| a["name"] == "test-result:check")
        .unwrap()["envelope"]
        .clone();
    bundle["attestations"] = serde_json::Value::Array(
        all.iter()
            .map(|a| {
                let mut a = a.clone();
                if a["name"] == "sbom" {
                    a["envelope"] = test_envelope.clone();
                }
                a
            })
            .collect(),
    );
    let swapped = work.path().join("swapped.json");
    std::fs::write(&swapped, serde_json::to_vec(&bundle).unwrap()).unwrap();
    let o = verify(Some(&swapped));
    expect_code(&o, 1, "verify with a swapped SBOM");
    assert!(
        stdout(&o).contains("not among the step's attested byproducts"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
}
