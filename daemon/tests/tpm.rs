//! Real TPM tests against swtpm: enrollment, quotes, measured start, node key certification and
//! signing, each control with a test that tries to defeat it.
//!
//! Every test starts its own swtpm (fresh state, free port) through `scripts/swtpm` and stops it
//! on drop (kill by pid file), so tests run in parallel without sharing PCRs and nothing keeps
//! running after a failed test. Outside CI the tests skip with a printed reason when swtpm is
//! missing; under `CI=true` they fail.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] fns: a failed setup is a failed test"
)]

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use kiln_common::attest::{
    self, AttestError, CredentialChallenge, EnrolledNode, MEASURED_START_PCR, MeasurementEvent,
    NodeIdentity, PcrValues, QUOTE_PCRS,
};
use kiln_common::digest::Digest;
use kiln_e2e::Swtpm;
use kilnd::attest::measure::{StartMeasurements, measure_event, measure_start};
use kilnd::attest::{Tpm, TpmConfig, TpmError};
use tempfile::TempDir;

/// Silence libtss2's own stderr logging. `set_var` is only sound while no other thread reads
/// the environment: every test calls this first, before any TSS code runs in the process, and
/// `Once` blocks the other tests until it is done.
fn quiet_tss() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TSS2_LOG").is_none() {
            // SAFETY: no thread of this process has called into libtss2 (or anything else that
            // reads the C environment) yet: all tests call quiet_tss() before their first TSS
            // call, and Once makes them wait here until the variable is set.
            unsafe { std::env::set_var("TSS2_LOG", "all+none") };
        }
    });
}

/// What the TPM tests need of the harness's swtpm (`kiln_e2e::Swtpm`, shared with the
/// end-to-end tests): kilnd's TPM config for it, an open handle, its EK CA bundle.
trait TpmFixture {
    fn config(&self) -> TpmConfig;
    async fn open(&self) -> Tpm;
    fn ca_bundle(&self) -> Vec<Vec<u8>>;
}

impl TpmFixture for Swtpm {
    fn config(&self) -> TpmConfig {
        TpmConfig {
            tcti: self.tcti.clone(),
            state_dir: self.dir.path().join("kiln"),
        }
    }

    async fn open(&self) -> Tpm {
        Tpm::open(self.config()).await.unwrap()
    }

    fn ca_bundle(&self) -> Vec<Vec<u8>> {
        attest::parse_ca_bundle(&std::fs::read(&self.ca_bundle).unwrap()).unwrap()
    }
}

/// Start a swtpm unless the tests must skip.
fn swtpm() -> Option<Swtpm> {
    quiet_tss();
    kiln_e2e::have_swtpm("tpm").then(Swtpm::start)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Enroll `tpm` with the verifier functions; returns the enrolled record.
async fn enroll(tpm: &Tpm, ca: &[Vec<u8>]) -> EnrolledNode {
    let ek = tpm.endorsement().await.unwrap();
    let ak = tpm.ak_public().await.unwrap();
    let (pending, challenge) =
        attest::start_enrollment(&ek.certificate, ca, &ek.public, &ak, now()).unwrap();
    let answer = tpm.activate_credential(challenge).await.unwrap();
    pending.finish(&answer).unwrap()
}

/// Measured start over small files standing in for kilnd's binary, config and profiles.
async fn measured_start(tpm: &Tpm, dir: &Path) -> (Vec<MeasurementEvent>, PathBuf) {
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(dir.join("kilnd"), b"\x7fELF pretend kilnd").unwrap();
    std::fs::write(dir.join("kilnd.toml"), b"[tpm]\n").unwrap();
    std::fs::write(dir.join("profiles/hermetic.toml"), b"name = 'hermetic'\n").unwrap();
    std::fs::write(dir.join("profiles/fetch.toml"), b"name = 'fetch'\n").unwrap();
    std::fs::write(dir.join("profiles/README"), b"not a profile\n").unwrap();
    let what = StartMeasurements {
        binary: dir.join("kilnd"),
        config: Some(dir.join("kilnd.toml")),
        profiles_dir: Some(dir.join("profiles")),
    };
    let log = dir.join("measured-start.jsonl");
    let events = measure_start(tpm, &what, &log).await.unwrap();
    (events, log)
}

#[tokio::test]
async fn enrollment_succeeds_and_the_ek_chain_is_checked() {
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    let ca = swtpm.ca_bundle();
    let enrolled = enroll(&tpm, &ca).await;
    let ek = tpm.endorsement().await.unwrap();
    assert_eq!(enrolled.ek_certificate_digest, Digest::of(&ek.certificate));
    assert_eq!(enrolled.ak_public, tpm.ak_public().await.unwrap());

    // A wrong answer is refused.
    let ak = tpm.ak_public().await.unwrap();
    let (pending, _) =
        attest::start_enrollment(&ek.certificate, &ca, &ek.public, &ak, now()).unwrap();
    assert!(matches!(
        pending.finish(&[0u8; 32]),
        Err(AttestError::ActivationMismatch)
    ));

    // An EK certificate checked against a bundle without its issuer is refused.
    let foreign_ca = attest::parse_ca_bundle(FOREIGN_CA_PEM.as_bytes()).unwrap();
    let err =
        attest::start_enrollment(&ek.certificate, &foreign_ca, &ek.public, &ak, now()).unwrap_err();
    assert!(matches!(err, AttestError::EkIssuerUnknown { .. }), "{err}");
    // … and one checked at a time before the CA and the EK certificate existed (1970).
    let err = attest::start_enrollment(&ek.certificate, &ca, &ek.public, &ak, 0).unwrap_err();
    assert!(
        matches!(err, AttestError::CertificateValidity { .. }),
        "{err}"
    );
}

/// ActivateCredential failed in the TPM (not before reaching it).
fn assert_activation_refused(err: &TpmError) {
    assert!(
        matches!(
            err,
            TpmError::Command {
                command: "TPM2_ActivateCredential",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn activation_with_an_ak_from_a_different_tpm_fails() {
    let Some(node) = swtpm() else { return };
    let other = Swtpm::start();
    let tpm = node.open().await;
    let other_tpm = other.open().await;
    let ca = node.ca_bundle();

    // The attacker shows the genuine EK certificate of `node` and the AK of `other`.
    let ek = tpm.endorsement().await.unwrap();
    let foreign_ak = other_tpm.ak_public().await.unwrap();
    let (pending, challenge) =
        attest::start_enrollment(&ek.certificate, &ca, &ek.public, &foreign_ak, now()).unwrap();

    // `other` cannot activate: the seed is encrypted to `node`'s EK.
    let err = other_tpm
        .activate_credential(challenge.clone())
        .await
        .unwrap_err();
    assert_activation_refused(&err);
    println!("other tpm: {err}");
    // `node` cannot activate it with its own AK: the credential is bound to the other AK's name.
    let err = tpm.activate_credential(challenge).await.unwrap_err();
    assert_activation_refused(&err);
    println!("right tpm, wrong ak: {err}");
    drop(pending);

    // The other TPM's EK does not match the node's EK certificate either.
    let other_ek = other_tpm.endorsement().await.unwrap();
    let err = attest::start_enrollment(&ek.certificate, &ca, &other_ek.public, &foreign_ak, now())
        .unwrap_err();
    assert!(matches!(err, AttestError::EkCertMismatch { .. }), "{err}");
}

#[tokio::test]
async fn quote_verifies_with_its_nonce_and_a_replayed_quote_is_rejected() {
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    let enrolled = enroll(&tpm, &swtpm.ca_bundle()).await;
    let (events, log) = measured_start(&tpm, swtpm.dir.path()).await;
    assert_eq!(events.len(), 4, "binary, config, 2 profiles: {events:?}");
    assert_eq!(
        attest::parse_event_log(&std::fs::read_to_string(&log).unwrap()).unwrap(),
        events
    );

    let job1 = b"job-1 nonce".to_vec();
    let identity = tpm
        .node_identity(job1.clone(), events.clone())
        .await
        .unwrap();
    let verified = identity
        .verify(&enrolled, &job1, &PcrValues::new())
        .unwrap();
    let (_, node_key) = tpm.node_key().await.unwrap();
    assert_eq!(verified.node_key, node_key);
    assert_eq!(
        identity.pcrs.keys().copied().collect::<Vec<_>>(),
        QUOTE_PCRS.to_vec()
    );
    assert_eq!(
        identity.pcrs[&MEASURED_START_PCR],
        attest::replay_pcr(&events, MEASURED_START_PCR)
    );

    // The document survives JSON.
    let json = serde_json::to_string(&identity).unwrap();
    let back: NodeIdentity = serde_json::from_str(&json).unwrap();
    back.verify(&enrolled, &job1, &PcrValues::new()).unwrap();

    // Job 2 is offered job 1's quote.
    let err = identity
        .verify(&enrolled, b"job-2 nonce", &PcrValues::new())
        .unwrap_err();
    assert!(
        matches!(err, AttestError::QuoteQualifyingData { .. }),
        "{err}"
    );
    println!("replay: {err}");

    // A document from a node that was not enrolled (its AK differs) is refused.
    let mut stranger = enrolled.clone();
    stranger.ak_public = identity.node_key_public.clone();
    let err = identity
        .verify(&stranger, &job1, &PcrValues::new())
        .unwrap_err();
    assert!(matches!(err, AttestError::AkNotEnrolled { .. }), "{err}");
}

#[tokio::test]
async fn a_changed_pcr_fails_the_expected_pcr_policy() {
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    let enrolled = enroll(&tpm, &swtpm.ca_bundle()).await;
    let (mut events, log) = measured_start(&tpm, swtpm.dir.path()).await;
    let first = tpm
        .node_identity(b"n1".to_vec(), events.clone())
        .await
        .unwrap();
    let policy = first.pcrs.clone();
    first.verify(&enrolled, b"n1", &policy).unwrap();

    // A new (logged) measurement: the log replays, but PCR 23 is not the approved value.
    measure_event(
        &tpm,
        MeasurementEvent {
            pcr: MEASURED_START_PCR,
            digest: Digest::of(b"a different config"),
            description: "kilnd config reload".to_owned(),
        },
        &log,
        &mut events,
    )
    .await
    .unwrap();
    let second = tpm.node_identity(b"n2".to_vec(), events).await.unwrap();
    let err = second.verify(&enrolled, b"n2", &policy).unwrap_err();
    assert!(
        matches!(
            err,
            AttestError::PcrPolicy {
                pcr: MEASURED_START_PCR,
                ..
            }
        ),
        "{err}"
    );
    println!("policy: {err}");
    // Without the policy it verifies.
    second.verify(&enrolled, b"n2", &PcrValues::new()).unwrap();
}

#[tokio::test]
async fn an_event_log_that_does_not_replay_is_rejected() {
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    let enrolled = enroll(&tpm, &swtpm.ca_bundle()).await;
    let (events, _) = measured_start(&tpm, swtpm.dir.path()).await;

    // A log that hides the real binary behind another digest.
    let mut lying = events.clone();
    lying[0].digest = Digest::of(b"the binary the operator approved");
    let identity = tpm.node_identity(b"n".to_vec(), lying).await.unwrap();
    let err = identity
        .verify(&enrolled, b"n", &PcrValues::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            AttestError::EventLogReplay {
                pcr: MEASURED_START_PCR,
                ..
            }
        ),
        "{err}"
    );
    println!("lying log: {err}");

    // An unlogged extend (someone else on the host) breaks the replay of the honest log.
    tpm.pcr_extend(MEASURED_START_PCR, Digest::of(b"unlogged"))
        .await
        .unwrap();
    let identity = tpm.node_identity(b"n".to_vec(), events).await.unwrap();
    let err = identity
        .verify(&enrolled, b"n", &PcrValues::new())
        .unwrap_err();
    assert!(
        matches!(err, AttestError::EventLogReplay { events: 4, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn forged_quotes_are_rejected() {
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    let enrolled = enroll(&tpm, &swtpm.ca_bundle()).await;
    let (events, _) = measured_start(&tpm, swtpm.dir.path()).await;
    let identity = tpm.node_identity(b"n".to_vec(), events).await.unwrap();
    let none = PcrValues::new();

    // A flipped bit in s.
    let mut forged = identity.clone();
    let last = forged.quote.signature.len() - 1;
    forged.quote.signature[last] ^= 1;
    let err = forged.verify(&enrolled, b"n", &none).unwrap_err();
    assert!(matches!(err, AttestError::QuoteSignature { .. }), "{err}");
    println!("forged signature: {err}");

    // The quoted bytes changed (e.g. extraData rewritten for another nonce).
    let mut forged = identity.clone();
    let last = forged.quote.attest.len() - 1;
    forged.quote.attest[last] ^= 1;
    let err = forged.verify(&enrolled, b"n", &none).unwrap_err();
    assert!(matches!(err, AttestError::QuoteSignature { .. }), "{err}");

    // A quote signed by another TPM's AK.
    let other = Swtpm::start();
    let other_tpm = other.open().await;
    let other_identity = other_tpm
        .node_identity(b"n".to_vec(), Vec::new())
        .await
        .unwrap();
    let mut forged = identity.clone();
    forged.quote = other_identity.quote;
    let err = forged.verify(&enrolled, b"n", &none).unwrap_err();
    assert!(matches!(err, AttestError::QuoteSignature { .. }), "{err}");

    // PCR values that are not the quoted ones.
    let mut forged = identity.clone();
    forged.pcrs.insert(0, Digest::of(b"a nicer firmware"));
    let err = forged.verify(&enrolled, b"n", &none).unwrap_err();
    assert!(matches!(err, AttestError::PcrDigest { .. }), "{err}");

    // A certification offered as a quote.
    let mut forged = identity.clone();
    forged.quote = identity.node_key_certify.clone();
    let err = forged.verify(&enrolled, b"n", &none).unwrap_err();
    assert!(matches!(err, AttestError::WrongAttestType { .. }), "{err}");
}

#[tokio::test]
async fn node_key_certification_verifies_and_signs_and_another_key_is_rejected() {
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    let ak = tpm.ak_public().await.unwrap();
    let (node_public, node_key) = tpm.node_key().await.unwrap();

    let certify = tpm.certify_node_key(b"fresh".to_vec()).await.unwrap();
    let certified = attest::verify_certify(&ak, &certify, &node_public, b"fresh").unwrap();
    assert_eq!(certified, node_key);
    let err = attest::verify_certify(&ak, &certify, &node_public, b"stale").unwrap_err();
    assert!(
        matches!(err, AttestError::CertifyQualifyingData { .. }),
        "{err}"
    );

    // The node key signs; the DER signature verifies with its SubjectPublicKeyInfo.
    let message = b"workload certificate tbs bytes";
    let signature = tpm.sign(message).await.unwrap();
    node_key.verify(message, &signature).unwrap();
    assert!(node_key.verify(b"other bytes", &signature).is_err());

    // Another TPM's node key presented with this certification.
    let other = Swtpm::start();
    let other_tpm = other.open().await;
    let (other_public, _) = other_tpm.node_key().await.unwrap();
    let err = attest::verify_certify(&ak, &certify, &other_public, b"fresh").unwrap_err();
    assert!(matches!(err, AttestError::CertifiedName { .. }), "{err}");
    println!("other key: {err}");
    // Another TPM's certification of its own key, checked with this AK.
    let other_certify = other_tpm.certify_node_key(b"fresh".to_vec()).await.unwrap();
    let err = attest::verify_certify(&ak, &other_certify, &other_public, b"fresh").unwrap_err();
    assert!(matches!(err, AttestError::CertifySignature { .. }), "{err}");
    // The AK itself is not a node key (restricted).
    let ak_certify = tpm.certify_node_key(Vec::new()).await.unwrap();
    let err = attest::verify_certify(&ak, &ak_certify, &ak, &[]).unwrap_err();
    assert!(matches!(err, AttestError::KeyAttributes { .. }), "{err}");
}

#[tokio::test]
async fn keys_survive_a_restart_of_kilnd() {
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    let ak = tpm.ak_public().await.unwrap();
    let (_, node_key) = tpm.node_key().await.unwrap();
    let certify = tpm.node_key_certification().await.unwrap();
    drop(tpm);

    let tpm = swtpm.open().await;
    assert_eq!(tpm.ak_public().await.unwrap(), ak);
    assert_eq!(tpm.node_key().await.unwrap().1, node_key);
    assert_eq!(tpm.node_key_certification().await.unwrap(), certify);
    let signature = tpm.sign(b"after restart").await.unwrap();
    node_key.verify(b"after restart", &signature).unwrap();
    for name in ["ak.priv", "node-key.priv"] {
        let mode = std::fs::metadata(swtpm.config().state_dir.join(name))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}

#[tokio::test]
async fn bad_tcti_and_absent_tpm_are_reported() {
    quiet_tss();
    let dir = TempDir::new().unwrap();
    let err = Tpm::open(TpmConfig {
        tcti: "nonsense:".to_owned(),
        state_dir: dir.path().to_owned(),
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, TpmError::Tcti { .. } | TpmError::Open { .. }),
        "{err}"
    );
    let port = kiln_e2e::free_port_pair();
    let err = Tpm::open(TpmConfig {
        tcti: format!("swtpm:host=127.0.0.1,port={port}"),
        state_dir: dir.path().to_owned(),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, TpmError::Open { .. }), "{err}");
    println!("absent tpm: {err}");
}

/// Median wall time of `runs` calls.
async fn median<F, Fut>(runs: usize, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f().await;
        times.push(start.elapsed());
    }
    times.sort();
    times[runs / 2]
}

/// TPM cost per operation against swtpm (printed; run with --nocapture, and --release for the
/// figures of a release build).
#[tokio::test]
async fn tpm_costs() {
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    // Create the keys outside the timings.
    let ak = tpm.ak_public().await.unwrap();
    let (node_public, _) = tpm.node_key().await.unwrap();
    let runs = 15;
    let quote = median(runs, || async {
        tpm.quote(b"nonce".to_vec()).await.unwrap();
    })
    .await;
    let certify = median(runs, || async {
        tpm.certify_node_key(Vec::new()).await.unwrap();
    })
    .await;
    let sign = median(runs, || async {
        tpm.sign(b"tbs").await.unwrap();
    })
    .await;
    let extend = median(runs, || async {
        tpm.pcr_extend(16, Digest::of(b"x")).await.unwrap();
    })
    .await;
    let ek = tpm.endorsement().await.unwrap();
    let ca = swtpm.ca_bundle();
    let activate = median(5, || async {
        let (pending, challenge) =
            attest::start_enrollment(&ek.certificate, &ca, &ek.public, &ak, now()).unwrap();
        let answer = tpm.activate_credential(challenge).await.unwrap();
        pending.finish(&answer).unwrap();
    })
    .await;
    let identity = tpm.node_identity(b"n".to_vec(), Vec::new()).await.unwrap();
    let enrolled = EnrolledNode {
        ek_certificate_digest: Digest::of(&ek.certificate),
        ak_public: ak.clone(),
    };
    let start = Instant::now();
    for _ in 0..100 {
        // The document's log is empty: PCR 23 replays to zeros only before any extend.
        let _ = identity.verify(&enrolled, b"n", &PcrValues::new());
        attest::verify_certify(&ak, &identity.node_key_certify, &node_public, &[]).unwrap();
    }
    let verify = start.elapsed() / 100;
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "tpm costs ({profile} build, swtpm over tcp, median of {runs}): quote {quote:?}, certify {certify:?}, \
         sign {sign:?}, pcr_extend {extend:?}, enrollment round (make+activate) {activate:?}; \
         identity verify + certify verify {verify:?}"
    );
}

/// Writes a node identity document for the pure parser tests in kiln-common when
/// `KILN_CAPTURE_IDENTITY=path` is set.
#[tokio::test]
async fn capture_identity_document() {
    let Ok(path) = std::env::var("KILN_CAPTURE_IDENTITY") else {
        return;
    };
    let Some(swtpm) = swtpm() else { return };
    let tpm = swtpm.open().await;
    let (events, _) = measured_start(&tpm, swtpm.dir.path()).await;
    let identity = tpm
        .node_identity(b"captured nonce".to_vec(), events)
        .await
        .unwrap();
    let ek = tpm.endorsement().await.unwrap();
    let challenge: CredentialChallenge = {
        let ak = tpm.ak_public().await.unwrap();
        attest::start_enrollment(&ek.certificate, &swtpm.ca_bundle(), &ek.public, &ak, now())
            .unwrap()
            .1
    };
    let capture = serde_json::json!({
        "identity": identity,
        "ek_public": hex::encode(&ek.public),
        "ca_bundle": std::fs::read_to_string(&swtpm.ca_bundle).unwrap(),
        "challenge": challenge,
    });
    std::fs::write(path, serde_json::to_string_pretty(&capture).unwrap()).unwrap();
}

/// A self-signed CA that issued nothing here (openssl req -x509 -newkey ec, P-256).
const FOREIGN_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBlDCCATugAwIBAgIUIlPhEzaWZgQYxch1H3TF2U9YlaYwCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUa2lsbiB0ZXN0IGZvcmVpZ24gY2EwIBcNMjYxMTI1MTIyOTA4
WhgPMjEyNjExMDExMjI5MDhaMB8xHTAbBgNVBAMMFGtpbG4gdGVzdCBmb3JlaWdu
IGNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEbzrtpPDObBa9rsSjjxNK+OKA
/OCxs5gaspFThhoAoDlktuGZGfZjg7ZC3LLfbjKw/mK937u6iW2JnVCI8ZHUXKNT
MFEwHQYDVR0OBBYEFBYSZzcsa6lxc6tHlVvMkizlVBw+MB8GA1UdIwQYMBaAFBYS
Zzcsa6lxc6tHlVvMkizlVBw+MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwID
RwAwRAIgXz/HDSZfuX3H5vFPuMrKSKFVTuDca5VLaS/7dAu4SQgCIEJo3LKNW3+u
ET7Z46CMvFuigcsBm8K2KdhOsOOKuXqd
-----END CERTIFICATE-----
";

// ---------------------------------------------------------------------------------------------
// Workload attestor and TPM-rooted verification of a whole bundle

mod rooted {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use kiln_common::attest::{self, AttestError, NodeIdentity, PcrValues};
    use kiln_common::digest::Digest;
    use kiln_common::dsse::Envelope;
    use kiln_common::intoto::{self, Statement};
    use kiln_common::keys::SigningKey;
    use kiln_common::trust::{NodeRecord, RevocationList, TpmTrust, Trust, TrustError, node_id};
    use kiln_common::verify::{ArtifactRef, Bundle, VerifyError, verify_artifact_with};
    use kiln_common::x509::{CertError, VerificationMaterial, workload_uri};
    use kilnd::attest::measure::StartMeasurements;
    use kilnd::attest::workload::{CertificateRequest, issue_certificate};
    use kilnd::attest::{NodeAttestor, NodeAttestorConfig, Tpm};
    use kilnd::provenance::{NodeSigner, WorkloadSigner};
    use kilnd::store::Cas;
    use serde_json::json;
    use tempfile::TempDir;

    use super::{Swtpm, TpmFixture, now, swtpm};

    pub(super) const ARTIFACT: &[u8] = b"the artifact bytes";

    /// A node: swtpm, the attestor kilnd runs, its signer and CAS, and its enrolled record.
    pub(super) struct Node {
        pub swtpm: Swtpm,
        pub signer: NodeSigner,
        pub cas: Cas,
        pub record: NodeRecord,
        pub _dir: TempDir,
    }

    pub(super) async fn node() -> Option<Node> {
        let swtpm = swtpm()?;
        let dir = TempDir::new().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("profiles")).unwrap();
        std::fs::write(d.join("kilnd"), b"\x7fELF pretend kilnd").unwrap();
        std::fs::write(d.join("kilnd.toml"), b"[tpm]\n").unwrap();
        std::fs::write(d.join("profiles/hermetic.toml"), b"name = 'hermetic'\n").unwrap();
        let attestor = NodeAttestor::start(NodeAttestorConfig {
            tpm: swtpm.config(),
            ek_ca_bundle: Some(swtpm.ca_bundle.clone()),
            measurements: StartMeasurements {
                binary: d.join("kilnd"),
                config: Some(d.join("kilnd.toml")),
                profiles_dir: Some(d.join("profiles")),
            },
            event_log: d.join("measured-start.jsonl"),
        })
        .await
        .unwrap();
        // Enrollment, the operator's side (what `kiln node enroll` does).
        let identity = attestor.endorsement().await.unwrap();
        let (pending, challenge) = attest::start_enrollment(
            &identity.ek_certificate,
            &swtpm.ca_bundle(),
            &identity.ek_public,
            &identity.ak_public,
            now(),
        )
        .unwrap();
        let secret = attestor.activate(challenge).await.unwrap();
        let enrolled = pending.finish(&secret).unwrap();
        let record = NodeRecord {
            node_id: node_id(&enrolled.ek_certificate_digest),
            enrolled,
            node_key_public: identity.node_key_public,
            node_keyid: identity.node_keyid,
            node_key_certify: identity.node_key_certify,
            ek_issuer: "swtpm-localca".into(),
            enrolled_on: "now".into(),
        };
        let cas = Cas::open(&d.join("cas")).unwrap();
        Some(Node {
            swtpm,
            signer: NodeSigner::tpm(Arc::new(attestor)),
            cas,
            record,
            _dir: dir,
        })
    }

    pub(super) fn rfc3339(t: std::time::SystemTime) -> String {
        humantime::format_rfc3339_millis(t).to_string()
    }

    /// A one-step job ("build" writes the artifact); `certify_step` overrides the window the
    /// step's certificate is issued for.
    pub(super) async fn job(
        node: &Node,
        job_id: &str,
        certify_step: Option<(&str, &str)>,
    ) -> Bundle {
        let signer = &node.signer;
        let started = rfc3339(std::time::SystemTime::now());
        signer.begin_job(job_id).await.unwrap();
        let mut step: WorkloadSigner<'_> = signer.workload(job_id, Some("build")).unwrap();
        let step_started = rfc3339(std::time::SystemTime::now());
        let step_finished = rfc3339(std::time::SystemTime::now());
        let (cert_from, cert_to) = certify_step.unwrap_or((&step_started, &step_finished));
        step.certify(cert_from, cert_to).await.unwrap();
        let pipeline_digest = Digest::of(b"pipeline");
        let statement = Statement {
            statement_type: intoto::STATEMENT_TYPE.into(),
            subject: vec![intoto::ResourceDescriptor {
                name: Some("dist/app.bin".into()),
                uri: None,
                digest: intoto::digest_set(&Digest::of(ARTIFACT)),
                media_type: None,
            }],
            predicate_type: intoto::SLSA_PROVENANCE_V1.into(),
            predicate: json!({
                "buildDefinition": {
                    "buildType": intoto::KILN_STEP_BUILD_TYPE,
                    "externalParameters": {"pipeline": "p", "pipelineDigest": pipeline_digest, "step": "build", "parameters": {}},
                    "internalParameters": {"kind": "build", "profile": "hermetic", "outputWorkspace": "out", "exitCode": 0, "outcome": "succeeded", "signingKey": step.info},
                    "resolvedDependencies": []
                },
                "runDetails": {
                    "builder": {"id": step.builder_id},
                    "metadata": {"invocationId": format!("{job_id}/build"), "startedOn": step_started, "finishedOn": step_finished}
                }
            }),
        };
        let (step_bytes, step_digest) = step.sign_statement(&statement).unwrap();
        drop(step);
        let finished = rfc3339(std::time::SystemTime::now());
        let (job_signer, links) = signer
            .finish_job(job_id, &node.cas, &started, &finished)
            .await
            .unwrap();
        let job_statement = Statement {
            statement_type: intoto::STATEMENT_TYPE.into(),
            subject: vec![],
            predicate_type: intoto::KILN_JOB_PREDICATE.into(),
            predicate: json!({
                "jobId": job_id, "pipeline": "p", "pipelineDigest": pipeline_digest,
                "parameters": {}, "sources": {},
                "steps": [{"name": "build", "outcome": "succeeded", "envelopeDigest": step_digest}],
                "outcome": "succeeded", "builderId": job_signer.builder_id,
                "signingKey": job_signer.info, "startedOn": started, "finishedOn": finished,
                "nodeIdentity": links.node_identity, "nonce": links.nonce,
                "workloadCertificates": links.workload_certificates,
            }),
        };
        let (job_bytes, _) = job_signer.sign_statement(&job_statement).unwrap();
        let identity: NodeIdentity =
            serde_json::from_slice(&node.cas.get(&links.node_identity.unwrap()).unwrap()).unwrap();
        let verification_material = links
            .workload_certificates
            .iter()
            .map(|(keyid, d)| {
                (
                    keyid.clone(),
                    VerificationMaterial::leaf(node.cas.get(d).unwrap()),
                )
            })
            .collect();
        Bundle {
            media_type: intoto::BUNDLE_MEDIA_TYPE.into(),
            job_id: job_id.into(),
            job: serde_json::from_slice(&job_bytes).unwrap(),
            steps: BTreeMap::from([(
                "build".to_owned(),
                serde_json::from_slice::<Envelope>(&step_bytes).unwrap(),
            )]),
            traces: BTreeMap::new(),
            node_identity: Some(identity),
            verification_material,
            attestations: Vec::new(),
        }
    }

    pub(super) fn trust(node: &Node) -> TpmTrust {
        TpmTrust {
            ek_ca: node.swtpm.ca_bundle(),
            node: node.record.clone(),
            pcr_policy: PcrValues::new(),
            revocations: None,
            at: now(),
        }
    }

    pub(super) fn verify(bundle: &Bundle, trust: &TpmTrust) -> Result<(), VerifyError> {
        let artifact = ArtifactRef {
            name: "app.bin".into(),
            digest: Digest::of(ARTIFACT),
        };
        verify_artifact_with(&artifact, bundle, Trust::Tpm(trust)).map(|_| ())
    }

    /// The broken link of a failed verification.
    pub(super) fn link(err: VerifyError) -> TrustError {
        match err {
            VerifyError::Trust { source, .. } => *source,
            other => panic!("expected a broken trust link, got: {other}"),
        }
    }

    /// A workload certificate for `uri`, signed by another TPM's node key.
    pub(super) async fn foreign_certificate(
        other: &Swtpm,
        uri: String,
        subject: kiln_common::keys::PublicKey,
    ) -> Vec<u8> {
        let tpm = Arc::new(Tpm::open(other.config()).await.unwrap());
        let (_, other_key) = tpm.node_key().await.unwrap();
        let now = std::time::SystemTime::now();
        issue_certificate(
            tpm,
            &other_key,
            CertificateRequest {
                uri,
                node_id: "other".into(),
                subject,
                not_before: now - std::time::Duration::from_mins(1),
                ends: now + std::time::Duration::from_mins(1),
            },
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_tpm_rooted_bundle_verifies_and_each_broken_link_is_named() {
        let Some(node) = node().await else { return };
        let trust = trust(&node);
        let bundle = job(&node, "job-1", None).await;
        verify(&bundle, &trust).unwrap();
        // Every envelope is signed by its own workload key, certified by the node key.
        assert_eq!(bundle.verification_material.len(), 2);
        let step_keyid = &bundle.steps["build"].signatures[0].keyid;
        assert_ne!(step_keyid, &bundle.job.signatures[0].keyid);
        assert_ne!(step_keyid, &node.record.node_keyid);

        // Replayed quote: job 2's statement with job 1's identity document (old nonce).
        let mut replayed = job(&node, "job-2", None).await;
        replayed.node_identity = bundle.node_identity.clone();
        let err = link(verify(&replayed, &trust).unwrap_err());
        println!("replayed quote: {err}");
        assert!(
            matches!(
                err,
                TrustError::NodeIdentity(AttestError::QuoteQualifyingData { .. })
            ),
            "{err}"
        );

        // Changed PCR: an expected-PCR policy that the node's PCR 23 does not meet.
        let mut strict = trust.clone();
        strict.pcr_policy.insert(23, Digest::of(b"another kilnd"));
        let err = link(verify(&bundle, &strict).unwrap_err());
        println!("pcr policy: {err}");
        assert!(
            matches!(
                err,
                TrustError::NodeIdentity(AttestError::PcrPolicy { pcr: 23, .. })
            ),
            "{err}"
        );
        // The same policy with the real values holds.
        let mut exact = trust.clone();
        exact.pcr_policy = bundle.node_identity.as_ref().unwrap().pcrs.clone();
        verify(&bundle, &exact).unwrap();

        // An event log that does not replay to the quoted PCR 23.
        let mut forged_log = bundle.clone();
        forged_log.node_identity.as_mut().unwrap().event_log[0].digest =
            Digest::of(b"a clean kilnd");
        let err = link(verify(&forged_log, &trust).unwrap_err());
        println!("event log: {err}");
        assert!(
            matches!(
                err,
                TrustError::NodeIdentity(AttestError::EventLogReplay { .. })
            ),
            "{err}"
        );

        // Forged quote signature.
        let mut forged = bundle.clone();
        let quote = &mut forged.node_identity.as_mut().unwrap().quote;
        let end = quote.signature.len() - 1;
        quote.signature[end] ^= 1;
        let err = link(verify(&forged, &trust).unwrap_err());
        println!("forged quote: {err}");
        assert!(
            matches!(
                err,
                TrustError::NodeIdentity(AttestError::QuoteSignature { .. })
            ),
            "{err}"
        );

        // Revoked node key (operator-signed list).
        let (operator, _) = SigningKey::generate().unwrap();
        let list = RevocationList {
            revoked_node_keys: [node.record.node_keyid.clone()].into(),
            issued_on: "2026-01-01T00:00:00Z".into(),
        };
        let envelope = list.sign(&operator).unwrap();
        let mut revoking = trust.clone();
        revoking.revocations =
            Some(RevocationList::verify(&envelope, &operator.public_key()).unwrap());
        let err = link(verify(&bundle, &revoking).unwrap_err());
        println!("revoked: {err}");
        assert!(matches!(err, TrustError::NodeKeyRevoked { .. }), "{err}");
        // A list signed by someone else is refused outright.
        let (intruder, _) = SigningKey::generate().unwrap();
        assert!(matches!(
            RevocationList::verify(&list.sign(&intruder).unwrap(), &operator.public_key()),
            Err(TrustError::RevocationSignature(_))
        ));

        // The bundle of a node that was never enrolled here (another TPM's EK).
        let Some(other) = super::rooted::node().await else {
            return;
        };
        let other_bundle = job(&other, "job-1", None).await;
        // Its EK certificate was issued a moment ago: check the chain at the current time.
        let mut fresh = trust.clone();
        fresh.at = now();
        let err = link(verify(&other_bundle, &fresh).unwrap_err());
        println!("other node: {err}");
        assert!(matches!(err, TrustError::EkNotEnrolled { .. }), "{err}");

        // A step certificate signed by another node's key, naming this node, job and step.
        let mut swapped = bundle.clone();
        let step_key = swapped
            .verification_material
            .keys()
            .find(|k| *k == step_keyid)
            .unwrap()
            .clone();
        let subject = kiln_common::x509::verify_workload_certificate(
            swapped.verification_material[&step_key].leaf_der().unwrap(),
            &kiln_common::attest::parse_node_key(
                &bundle.node_identity.as_ref().unwrap().node_key_public,
            )
            .unwrap()
            .1,
            &workload_uri(&node.record.node_id, "job-1", Some("build")),
        )
        .unwrap()
        .key;
        let foreign = foreign_certificate(
            &other.swtpm,
            workload_uri(&node.record.node_id, "job-1", Some("build")),
            subject,
        )
        .await;
        swapped
            .verification_material
            .insert(step_key, VerificationMaterial::leaf(foreign));
        let err = link(verify(&swapped, &trust).unwrap_err());
        println!("foreign certificate: {err}");
        assert!(
            matches!(
                err,
                TrustError::Certificate(CertError::NotSignedByNodeKey { .. })
            ),
            "{err}"
        );

        // The job certificate presented for the step (right key, wrong SAN): refused by name.
        let mut renamed = bundle.clone();
        let job_keyid = renamed.job.signatures[0].keyid.clone();
        renamed.steps.get_mut("build").unwrap().signatures[0].keyid = job_keyid;
        let err = link(verify(&renamed, &trust).unwrap_err());
        println!("wrong san: {err}");
        assert!(
            matches!(err, TrustError::Certificate(CertError::WrongSubject { .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_workload_certificates_are_rejected() {
        let Some(node) = node().await else { return };
        let trust = trust(&node);
        // Certified for a window that ended before the step's statement.
        let bundle = job(
            &node,
            "job-old",
            Some(("2020-01-01T00:00:00Z", "2020-01-01T00:01:00Z")),
        )
        .await;
        let err = link(verify(&bundle, &trust).unwrap_err());
        println!("expired: {err}");
        assert!(
            matches!(err, TrustError::Certificate(CertError::Expired { .. })),
            "{err}"
        );
        // Certified for a window that starts after the step.
        let later = rfc3339(std::time::SystemTime::now() + std::time::Duration::from_hours(1));
        let much_later = rfc3339(std::time::SystemTime::now() + std::time::Duration::from_hours(2));
        let bundle = job(&node, "job-future", Some((&later, &much_later))).await;
        let err = link(verify(&bundle, &trust).unwrap_err());
        println!("not yet valid: {err}");
        assert!(
            matches!(err, TrustError::Certificate(CertError::NotYetValid { .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn rotated_node_key_still_verifies_old_bundles_until_revoked() {
        let Some(node) = node().await else { return };
        let trust = trust(&node);
        let before = job(&node, "job-before", None).await;
        let attestor = node.signer.attestor().unwrap().clone();
        let old_key = attestor.node_key().keyid();
        let rotated = attestor.rotate().await.unwrap();
        assert_ne!(rotated.node_keyid, old_key);
        let after = job(&node, "job-after", None).await;
        verify(&before, &trust).unwrap();
        verify(&after, &trust).unwrap();
        let (operator, _) = SigningKey::generate().unwrap();
        let mut revoking = trust.clone();
        revoking.revocations = Some(RevocationList {
            revoked_node_keys: [old_key].into(),
            issued_on: "now".into(),
        });
        let _ = operator;
        assert!(matches!(
            link(verify(&before, &revoking).unwrap_err()),
            TrustError::NodeKeyRevoked { .. }
        ));
        verify(&after, &revoking).unwrap();
    }
}
