//! Workload attestor: an ephemeral ECDSA P-256 key per step (and per job statement), held in
//! memory only and wiped when dropped, and its short-lived X.509 certificate signed by the
//! TPM-resident node key.
//!
//! Certificate (RFC 5280 v3, built with rcgen; the issuer's signature comes from the TPM through
//! rcgen's `SigningKey` trait, [`TpmIssuerKey`]):
//! - subjectAltName: one URI, [`kiln_common::x509::workload_uri`]
//!   (`urn:kiln:node:<node id>/job/<job>/step/<step>`);
//! - validity: the step's start (rounded down to the second) to its end (rounded up) plus
//!   [`WORKLOAD_GRACE_SECS`]; issued when the step ends, so the window is the step's real
//!   lifetime;
//! - basicConstraints cA=false, keyUsage digitalSignature, extendedKeyUsage codeSigning,
//!   random 128-bit serial; issuer DN `CN=kiln node <node id prefix>, O=kiln`.
//!
//! There is no X.509 certificate for the node key: the verifier gets it from the node identity
//! document, where the AK certified it (TPM2_Certify) and the job's quote binds it.

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_common::Digest;
use kiln_common::keys::PublicKey;
use kiln_common::x509::WORKLOAD_GRACE_SECS;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};

use super::tpm::{Tpm, TpmError};

// The ephemeral key pair is wiped by overwriting its bytes (see `Drop for WorkloadKey`): that is
// only sound, and frees everything, if ring's key pair owns no heap memory and has no destructor.
const _: () = assert!(!std::mem::needs_drop::<EcdsaKeyPair>());
const _: () = assert!(!std::mem::needs_drop::<ring::pkcs8::Document>());

/// Errors of the workload attestor.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The system random source failed.
    #[error("cannot generate an ephemeral workload key: the system random source failed")]
    Random,
    /// ring refused its own fresh key (cannot happen with a sane ring).
    #[error("cannot load the ephemeral workload key: {reason}")]
    Key {
        /// ring's message.
        reason: String,
    },
    /// Signing with the ephemeral key failed.
    #[error("signing with the ephemeral workload key failed")]
    Sign,
    /// A time outside what a certificate can express.
    #[error("workload certificate time {secs} (unix seconds) is out of range")]
    Time {
        /// The value.
        secs: i64,
    },
    /// rcgen refused the certificate (this includes a failed TPM signature).
    #[error("cannot build the workload certificate for {uri}: {reason}")]
    Certificate {
        /// SAN URI.
        uri: String,
        /// rcgen's message (for a TPM failure: the decoded TPM error, logged separately).
        reason: String,
    },
    /// The certificate task died.
    #[error("the workload certificate task failed: {0}")]
    Join(String),
}

/// An ephemeral ECDSA P-256 key, in memory only. Dropping it overwrites the private scalar.
pub struct WorkloadKey {
    /// Always initialised until `drop`, which wipes it.
    pair: Box<MaybeUninit<EcdsaKeyPair>>,
    public: PublicKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("keyid", &self.public.keyid())
            .finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, WorkloadError> {
        let rng = SystemRandom::new();
        let mut document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| WorkloadError::Random)?;
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, document.as_ref(), &rng)
                .map_err(|err| WorkloadError::Key {
                    reason: err.to_string(),
                });
        // SAFETY: `Document` is a fixed-size byte array and a length, with no destructor (asserted
        // above) and no pointers; all-zero bytes are a valid (empty) document, and it is not used
        // again. This wipes the PKCS#8 copy of the private key off the stack.
        unsafe { zeroize::zeroize_flat_type(&raw mut document) };
        let pair = pair?;
        let point: &[u8] = pair.public_key().as_ref();
        let public = <&[u8; 65]>::try_from(point)
            .ok()
            .and_then(|p| PublicKey::from_uncompressed_point(p).ok())
            .ok_or_else(|| WorkloadError::Key {
                reason: "ring's p-256 public key is not a 65-byte point".to_owned(),
            })?;
        Ok(Self {
            pair: Box::new(MaybeUninit::new(pair)),
            public,
            rng,
        })
    }

    fn pair(&self) -> &EcdsaKeyPair {
        // SAFETY: `pair` is initialised in `generate` and only de-initialised (wiped) in `drop`.
        unsafe { self.pair.assume_init_ref() }
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Sign `message` (SHA-256 inside); ASN.1 DER signature.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, WorkloadError> {
        self.pair()
            .sign(&self.rng, message)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|_| WorkloadError::Sign)
    }
}

impl Drop for WorkloadKey {
    fn drop(&mut self) {
        // SAFETY: `EcdsaKeyPair` holds only inline scalars, byte arrays and `&'static`
        // references, no heap memory and no destructor (asserted at compile time above), so
        // overwriting it leaks nothing; inside a `MaybeUninit` any bytes are a valid value and
        // the box frees the memory without reading it. The key is never used after this.
        unsafe { zeroize::zeroize_flat_type(&raw mut *self.pair) };
    }
}

/// The subject key as rcgen wants it: the raw uncompressed point.
struct SubjectKey<'a>(&'a [u8]);

impl PublicKeyData for SubjectKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// The TPM node key as an rcgen issuer key: `sign` hashes the TBSCertificate and asks the TPM
/// thread to sign the digest (blocking: call from `spawn_blocking`).
struct TpmIssuerKey {
    tpm: Arc<Tpm>,
    point: Vec<u8>,
    /// The TPM error of the last failed `sign`, for the caller's message.
    failure: std::sync::Mutex<Option<TpmError>>,
}

impl PublicKeyData for TpmIssuerKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TpmIssuerKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.tpm
            .sign_digest_blocking(Digest::of(msg))
            .map_err(|err| {
                if let Ok(mut slot) = self.failure.lock() {
                    *slot = Some(err);
                }
                rcgen::Error::RemoteKeyError
            })
    }
}

/// What a workload certificate is for.
#[derive(Debug, Clone)]
pub struct CertificateRequest {
    /// The SAN URI.
    pub uri: String,
    /// The node id (for the issuer DN).
    pub node_id: String,
    /// The ephemeral key.
    pub subject: PublicKey,
    /// Start of the workload.
    pub not_before: SystemTime,
    /// End of the workload (the grace is added here).
    pub ends: SystemTime,
}

fn unix(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn offset(secs: i64) -> Result<time::OffsetDateTime, WorkloadError> {
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| WorkloadError::Time { secs })
}

/// Issue a workload certificate signed by the TPM node key (`node_key_point`: its 65-byte
/// uncompressed point). Returns the certificate DER.
pub async fn issue_certificate(
    tpm: Arc<Tpm>,
    node_key: &PublicKey,
    request: CertificateRequest,
) -> Result<Vec<u8>, WorkloadError> {
    // The SPKI is the fixed 26-byte P-256 prefix followed by the point.
    let point = node_key.spki_der()[26..].to_vec();
    let uri = request.uri.clone();
    let task = tokio::task::spawn_blocking(move || build_certificate(tpm, point, &request));
    task.await
        .map_err(|err| WorkloadError::Join(err.to_string()))?
        .map_err(|reason| WorkloadError::Certificate { uri, reason })
}

fn build_certificate(
    tpm: Arc<Tpm>,
    point: Vec<u8>,
    request: &CertificateRequest,
) -> Result<Vec<u8>, String> {
    let not_before = unix(request.not_before).floor() as i64;
    let not_after = unix(request.ends).ceil() as i64 + WORKLOAD_GRACE_SECS;
    let mut params = CertificateParams::default();
    params.not_before = offset(not_before).map_err(|e| e.to_string())?;
    params.not_after = offset(not_after).map_err(|e| e.to_string())?;
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| "the system random source failed".to_owned())?;
    // A positive INTEGER of at most 16 bytes.
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let ia5 =
        rcgen::string::Ia5String::try_from(request.uri.as_str()).map_err(|e| e.to_string())?;
    params.subject_alt_names = vec![SanType::URI(ia5)];
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "kiln workload");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "kiln");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    params.use_authority_key_identifier_extension = true;

    let mut issuer_params = CertificateParams::default();
    issuer_params.distinguished_name = DistinguishedName::new();
    let short_id = request.node_id.get(..16).unwrap_or(&request.node_id);
    issuer_params
        .distinguished_name
        .push(DnType::CommonName, format!("kiln node {short_id}"));
    issuer_params
        .distinguished_name
        .push(DnType::OrganizationName, "kiln");
    issuer_params.key_identifier_method = KeyIdMethod::Sha256;
    let issuer_key = TpmIssuerKey {
        tpm,
        point,
        failure: std::sync::Mutex::new(None),
    };
    let issuer = Issuer::new(issuer_params, &issuer_key);
    let subject_point = &request.subject.spki_der()[26..];
    match params.signed_by(&SubjectKey(subject_point), &issuer) {
        Ok(cert) => Ok(cert.der().to_vec()),
        Err(err) => match issuer_key.failure.lock().map(|mut f| f.take()) {
            Ok(Some(tpm_err)) => Err(format!("node key signature: {tpm_err}")),
            _ => Err(err.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_key_signs_and_verifies() {
        let key = WorkloadKey::generate().unwrap();
        let sig = key.sign(b"statement").unwrap();
        key.public_key().verify(b"statement", &sig).unwrap();
        let other = WorkloadKey::generate().unwrap();
        assert_ne!(key.public_key(), other.public_key());
    }
}
