//! TPM benchmark (scripts/bench/tpm), against a private swtpm:
//! - TPM cost per job and per step: TPM2_Quote (the job's identity document), TPM2_Certify of
//!   the node key (cached by kilnd; measured uncached here), a workload certificate (rcgen +
//!   TPM2_Sign by the node key), against signing the same certificate with a software key;
//! - verification of a 5-step TPM-rooted chain in-process, against the same chain under the
//!   raw-key path, and the wall time of the `kiln verify` process (target ≤ 30 ms).
//!
//! Environment: `BENCH_N` (samples per measure, default 30), `BIN` (where `kiln` is, default
//! target/release).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark driver: a failed setup is a failed run"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kiln_common::attest::{self, PcrValues};
use kiln_common::digest::Digest;
use kiln_common::dsse::Envelope;
use kiln_common::intoto::{self, Statement};
use kiln_common::trust::{NodeRecord, TpmTrust, Trust, node_id};
use kiln_common::verify::{ArtifactRef, Bundle, verify_artifact_with};
use kiln_common::x509::VerificationMaterial;
use kilnd::attest::measure::StartMeasurements;
use kilnd::attest::workload::WorkloadKey;
use kilnd::attest::{NodeAttestor, NodeAttestorConfig, Tpm, TpmConfig};
use kilnd::provenance::NodeSigner;
use kilnd::store::Cas;
use serde_json::json;

const STEPS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

async fn time<F: std::future::Future<Output = ()>>(n: usize, mut f: impl FnMut() -> F) -> Duration {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f().await;
        samples.push(start.elapsed());
    }
    median(samples)
}

#[tokio::main]
async fn main() {
    if std::env::var_os("TSS2_LOG").is_none() {
        // SAFETY: set before the first TSS call and before any other thread reads the
        // environment (the runtime's workers do not).
        unsafe { std::env::set_var("TSS2_LOG", "all+none") };
    }
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let bin = PathBuf::from(std::env::var("BIN").unwrap_or_else(|_| "target/release".into()));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The e2e harness's swtpm: private state, free ports, stopped on drop.
    let swtpm = kiln_e2e::Swtpm::start();
    let tcti = swtpm.tcti.clone();
    let ca_path = swtpm.ca_bundle.clone();
    let ca = attest::parse_ca_bundle(&std::fs::read(&ca_path).unwrap()).unwrap();

    std::fs::create_dir_all(d.join("profiles")).unwrap();
    std::fs::write(d.join("kilnd.toml"), b"[tpm]\n").unwrap();
    std::fs::write(d.join("profiles/hermetic.toml"), b"name = 'hermetic'\n").unwrap();
    let attestor = NodeAttestor::start(NodeAttestorConfig {
        tpm: TpmConfig {
            tcti: tcti.clone(),
            state_dir: d.join("kiln"),
        },
        ek_ca_bundle: Some(ca_path.clone()),
        measurements: StartMeasurements {
            binary: PathBuf::from("/proc/self/exe"),
            config: Some(d.join("kilnd.toml")),
            profiles_dir: Some(d.join("profiles")),
        },
        event_log: d.join("measured-start.jsonl"),
    })
    .await
    .unwrap();
    let identity = attestor.endorsement().await.unwrap();
    let (pending, challenge) = attest::start_enrollment(
        &identity.ek_certificate,
        &ca,
        &identity.ek_public,
        &identity.ak_public,
        0x7000_0000,
    )
    .unwrap();
    let enrolled = pending
        .finish(&attestor.activate(challenge).await.unwrap())
        .unwrap();
    let record = NodeRecord {
        node_id: node_id(&enrolled.ek_certificate_digest),
        enrolled,
        node_key_public: identity.node_key_public.clone(),
        node_keyid: identity.node_keyid.clone(),
        node_key_certify: identity.node_key_certify.clone(),
        ek_issuer: "swtpm-localca".into(),
        enrolled_on: rfc3339(SystemTime::now()),
    };

    // --- TPM costs (a second Tpm handle on the same swtpm would collide: use the attestor's
    // operations, plus a raw handle opened after the attestor is dropped for certify).
    let quote = time(n, || async {
        attestor.job_identity(vec![7; 32]).await.unwrap();
    })
    .await;
    let node_key = attestor.node_key();
    let now = SystemTime::now();
    let subject = WorkloadKey::generate().unwrap().public_key().clone();
    let cert_tpm = time(n, || {
        let attestor = &attestor;
        let node_key = node_key.clone();
        let subject = subject.clone();
        async move {
            attestor
                .issue(&node_key, "job", Some("step"), subject, now, now)
                .await
                .unwrap();
        }
    })
    .await;
    let keygen = time(n, || async {
        WorkloadKey::generate().unwrap();
    })
    .await;

    // --- A 5-step TPM-rooted job, and the same statements under a software key.
    let cas = Cas::open(&d.join("cas")).unwrap();
    let signer = NodeSigner::tpm(Arc::new(attestor));
    let job_id = "bench-job";
    let started = rfc3339(SystemTime::now());
    signer.begin_job(job_id).await.unwrap();
    let pipeline_digest = Digest::of(b"pipeline");
    let artifact = b"artifact of the last step";
    let mut steps = BTreeMap::new();
    let mut refs = Vec::new();
    let mut software_steps = BTreeMap::new();
    let mut software_refs = Vec::new();
    let (software_key, _) = kiln_common::keys::SigningKey::generate().unwrap();
    let software_info = json!({"kind": "software", "keyid": software_key.public_key().keyid()});
    let step_statement = |name: &str,
                          prev: Option<&str>,
                          info: &serde_json::Value,
                          t0: &str,
                          t1: &str| {
        let output: Vec<u8> = format!("{name} output").into_bytes();
        let subject_bytes: &[u8] = if name == "s5" { artifact } else { &output };
        let deps: Vec<serde_json::Value> = prev
            .map(|p| {
                let entries = vec![kiln_common::digest::TreeEntry {
                    path: format!("{p}.out"),
                    digest: Digest::of(format!("{p} output").as_bytes()),
                }];
                vec![json!({"name": format!("ws-{p}"), "uri": format!("urn:kiln:workspace:ws-{p}"), "digest": {"sha256": kiln_common::digest::tree_digest(&entries).hex()}})]
            })
            .unwrap_or_default();
        Statement {
            statement_type: intoto::STATEMENT_TYPE.into(),
            subject: vec![intoto::ResourceDescriptor {
                name: Some(if name == "s5" {
                    "app.bin".into()
                } else {
                    format!("{name}.out")
                }),
                uri: None,
                digest: intoto::digest_set(&Digest::of(subject_bytes)),
                media_type: None,
            }],
            predicate_type: intoto::SLSA_PROVENANCE_V1.into(),
            predicate: json!({
                "buildDefinition": {
                    "buildType": intoto::KILN_STEP_BUILD_TYPE,
                    "externalParameters": {"pipeline": "p", "pipelineDigest": pipeline_digest, "step": name, "parameters": {}},
                    "internalParameters": {"kind": "build", "profile": "hermetic", "outputWorkspace": format!("ws-{name}"), "exitCode": 0, "outcome": "succeeded", "signingKey": info},
                    "resolvedDependencies": deps
                },
                "runDetails": {"builder": {"id": "urn:kiln:node:x"}, "metadata": {"invocationId": name, "startedOn": t0, "finishedOn": t1}}
            }),
        }
    };
    let mut per_step = Vec::new();
    for i in 1..=STEPS {
        let name = format!("s{i}");
        let prev = (i > 1).then(|| format!("s{}", i - 1));
        let t = Instant::now();
        let mut workload = signer.workload(job_id, Some(&name)).unwrap();
        let t0 = rfc3339(SystemTime::now());
        let t1 = rfc3339(SystemTime::now());
        workload.certify(&t0, &t1).await.unwrap();
        let info = serde_json::to_value(&workload.info).unwrap();
        let (bytes, digest) = workload
            .sign_statement(&step_statement(&name, prev.as_deref(), &info, &t0, &t1))
            .unwrap();
        drop(workload);
        per_step.push(t.elapsed());
        steps.insert(
            name.clone(),
            serde_json::from_slice::<Envelope>(&bytes).unwrap(),
        );
        refs.push(json!({"name": name, "outcome": "succeeded", "envelopeDigest": digest}));
        let payload = serde_json::to_vec(&step_statement(
            &name,
            prev.as_deref(),
            &software_info,
            &t0,
            &t1,
        ))
        .unwrap();
        let env = Envelope::sign(intoto::PAYLOAD_TYPE, &payload, &software_key).unwrap();
        software_refs.push(json!({"name": name, "outcome": "succeeded", "envelopeDigest": kiln_common::dsse::envelope_digest(&env)}));
        software_steps.insert(name, env);
    }
    let finished = rfc3339(SystemTime::now());
    let (job_signer, links) = signer
        .finish_job(job_id, &cas, &started, &finished)
        .await
        .unwrap();
    let job_predicate = |info: &serde_json::Value,
                         refs: &[serde_json::Value],
                         links: Option<&kilnd::provenance::JobLinks>| {
        Statement {
            statement_type: intoto::STATEMENT_TYPE.into(),
            subject: vec![],
            predicate_type: intoto::KILN_JOB_PREDICATE.into(),
            predicate: json!({
                "jobId": job_id, "pipeline": "p", "pipelineDigest": pipeline_digest,
                "parameters": {}, "sources": {}, "steps": refs, "outcome": "succeeded",
                "builderId": "urn:kiln:node:x", "signingKey": info,
                "startedOn": started, "finishedOn": finished,
                "nodeIdentity": links.and_then(|l| l.node_identity),
                "nonce": links.and_then(|l| l.nonce.clone()),
                "workloadCertificates": links.map(|l| l.workload_certificates.clone()).unwrap_or_default(),
            }),
        }
    };
    let info = serde_json::to_value(&job_signer.info).unwrap();
    let (job_bytes, _) = job_signer
        .sign_statement(&job_predicate(&info, &refs, Some(&links)))
        .unwrap();
    let bundle = Bundle {
        media_type: intoto::BUNDLE_MEDIA_TYPE.into(),
        job_id: job_id.into(),
        job: serde_json::from_slice(&job_bytes).unwrap(),
        steps,
        traces: BTreeMap::new(),
        node_identity: Some(
            serde_json::from_slice(&cas.get(&links.node_identity.unwrap()).unwrap()).unwrap(),
        ),
        verification_material: links
            .workload_certificates
            .iter()
            .map(|(k, dg)| (k.clone(), VerificationMaterial::leaf(cas.get(dg).unwrap())))
            .collect(),
        attestations: Vec::new(),
    };
    let software_bundle = Bundle {
        media_type: intoto::BUNDLE_MEDIA_TYPE.into(),
        job_id: job_id.into(),
        job: Envelope::sign(
            intoto::PAYLOAD_TYPE,
            &serde_json::to_vec(&job_predicate(&software_info, &software_refs, None)).unwrap(),
            &software_key,
        )
        .unwrap(),
        steps: software_steps,
        traces: BTreeMap::new(),
        node_identity: None,
        verification_material: BTreeMap::new(),
        attestations: Vec::new(),
    };
    let trust = TpmTrust {
        ek_ca: ca.clone(),
        node: record.clone(),
        pcr_policy: PcrValues::new(),
        revocations: None,
        at: 0x7000_0000,
    };
    let artifact_ref = ArtifactRef {
        name: "app.bin".into(),
        digest: Digest::of(artifact),
    };
    let verified = verify_artifact_with(&artifact_ref, &bundle, Trust::Tpm(&trust)).unwrap();
    assert_eq!(verified.chain.len(), STEPS);
    let lib_tpm = time(n, || async {
        verify_artifact_with(&artifact_ref, &bundle, Trust::Tpm(&trust)).unwrap();
    })
    .await;
    let keys = [software_key.public_key()];
    let lib_keys = time(n, || async {
        verify_artifact_with(
            &artifact_ref,
            &software_bundle,
            Trust::Keys {
                keys: &keys,
                allow_software_key: true,
            },
        )
        .unwrap();
    })
    .await;

    // The `kiln verify` process, end to end (exec, file reads, verification, output).
    std::fs::write(d.join("app.bin"), artifact).unwrap();
    std::fs::write(d.join("bundle.json"), serde_json::to_vec(&bundle).unwrap()).unwrap();
    std::fs::write(d.join("node.json"), serde_json::to_vec(&record).unwrap()).unwrap();
    let kiln = repo().join(&bin).join("kiln");
    let cli = if kiln.is_file() {
        let run = || {
            let start = Instant::now();
            let o = Command::new(&kiln)
                .arg("verify")
                .arg(d.join("app.bin"))
                .arg("--bundle")
                .arg(d.join("bundle.json"))
                .arg("--node")
                .arg(d.join("node.json"))
                .arg("--ek-ca")
                .arg(&ca_path)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "kiln verify: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            start.elapsed()
        };
        Some(median((0..n).map(|_| run()).collect()))
    } else {
        println!(
            "(kiln binary {} missing: cli timing skipped)",
            kiln.display()
        );
        None
    };

    println!("kiln TPM benchmark (swtpm over TCP, {tcti}; median of {n})");
    println!(
        "  per job   TPM2_Quote + PCR read (identity document)   {:8.2} ms",
        ms(quote)
    );
    println!(
        "  per step  ephemeral P-256 key (ring)                  {:8.3} ms",
        ms(keygen)
    );
    println!(
        "  per step  workload certificate (rcgen + TPM2_Sign)    {:8.2} ms",
        ms(cert_tpm)
    );
    println!(
        "  per step  whole signer path (key, cert, DSSE), {STEPS} steps {:8.2} ms median",
        ms(median(per_step))
    );
    println!(
        "  verify {STEPS}-step chain in-process, tpm-rooted         {:8.2} ms",
        ms(lib_tpm)
    );
    println!(
        "  verify {STEPS}-step chain in-process, raw key (baseline) {:8.2} ms  (ratio {:.1}x)",
        ms(lib_keys),
        lib_tpm.as_secs_f64() / lib_keys.as_secs_f64()
    );
    if let Some(cli) = cli {
        println!(
            "  `kiln verify` process, tpm-rooted, {STEPS} steps          {:8.2} ms  (target <= 30 ms)",
            ms(cli)
        );
    }
    drop(signer);
    // Uncached TPM2_Certify of the node key (kilnd caches it; measured for the record).
    let tpm = Tpm::open(TpmConfig {
        tcti,
        state_dir: d.join("kiln"),
    })
    .await
    .unwrap();
    let certify = time(n, || async {
        tpm.certify_node_key(Vec::new()).await.unwrap();
    })
    .await;
    let sign = time(n, || async {
        tpm.sign_digest(Digest::of(b"tbs")).await.unwrap();
    })
    .await;
    let software = time(n, || async {
        let k = WorkloadKey::generate().unwrap();
        k.sign(b"tbs").unwrap();
    })
    .await;
    println!(
        "  (node key) TPM2_Certify by the AK, uncached           {:8.2} ms  (once per node key)",
        ms(certify)
    );
    println!(
        "  (node key) TPM2_Sign of a digest (load + sign + flush) {:8.2} ms  vs software key {:.3} ms",
        ms(sign),
        ms(software)
    );
}
