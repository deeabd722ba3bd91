//! Workload certificates (seed: "workload attestor"), verifier side: the short-lived X.509
//! certificate kilnd issues for each step's (and each job statement's) ephemeral key, signed by
//! the TPM-resident node key.
//!
//! What a certificate must say, each failure with its own [`CertError`] variant:
//! - signature algorithm ecdsa-with-SHA256, signature by the node key of the verified node
//!   identity document (the key the AK certified and the quote binds);
//! - exactly the subjectAltName URI naming the node, job and step ([`workload_uri`]);
//! - an ECDSA P-256 subject key (the key whose id the DSSE signature carries);
//! - a validity window containing the statement's `startedOn` … `finishedOn`. The window is
//!   checked against the times in the signed statement, not the verifier's clock: a step
//!   certificate lives for minutes, and the statement (signed inside the window) is what it
//!   vouches for — the same model as Sigstore's short-lived certificates, where the signing time
//!   comes from the evidence, not from "now".
//!
//! Bundles carry certificates as Sigstore bundle v0.3 verification material
//! ([`VerificationMaterial`]: `x509CertificateChain.certificates[].rawBytes`), keyed by keyid.

use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::keys::{KeyError, PublicKey};

/// OID of ecdsa-with-SHA256 (RFC 5758).
const OID_ECDSA_WITH_SHA256: &str = "1.2.840.10045.4.3.2";
/// Grace added after the end of a step to a workload certificate's `notAfter`.
pub const WORKLOAD_GRACE_SECS: i64 = 30;

/// `urn:kiln:node:<node id>/job/<job>` (the job statement's certificate) or
/// `urn:kiln:node:<node id>/job/<job>/step/<step>`.
pub fn workload_uri(node_id: &str, job: &str, step: Option<&str>) -> String {
    match step {
        Some(step) => format!("urn:kiln:node:{node_id}/job/{job}/step/{step}"),
        None => format!("urn:kiln:node:{node_id}/job/{job}"),
    }
}

/// Errors of workload certificate checks; each names what is wrong with which certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The DER does not parse as an X.509 certificate.
    #[error("workload certificate does not parse: {reason}")]
    Parse {
        /// Parser message.
        reason: String,
    },
    /// Another signature algorithm than ecdsa-with-SHA256.
    #[error("workload certificate signature algorithm must be ecdsa-with-SHA256, got {found}")]
    SignatureAlgorithm {
        /// OID found.
        found: String,
    },
    /// The node key did not sign the certificate.
    #[error(
        "workload certificate {subject_uri} is not signed by the node key {node_keyid}: issued by another node or key"
    )]
    NotSignedByNodeKey {
        /// The certificate's URI (or `(none)`).
        subject_uri: String,
        /// keyid of the attested node key.
        node_keyid: String,
    },
    /// The SAN URI names another node, job or step.
    #[error("workload certificate names {found:?}, expected {expected:?}")]
    WrongSubject {
        /// URI the verifier expects.
        expected: String,
        /// URIs found in the subjectAltName.
        found: Vec<String>,
    },
    /// The subject key is not ECDSA P-256.
    #[error("workload certificate subject key is not ecdsa p-256")]
    SubjectKey {
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The certificate's key is not the one whose keyid signed.
    #[error("workload certificate key is {found}, but the signature names {expected}")]
    KeyMismatch {
        /// keyid of the signature.
        expected: String,
        /// keyid of the certificate's key.
        found: String,
    },
    /// A statement time that is not RFC 3339.
    #[error("statement time {value:?} is not RFC 3339")]
    Time {
        /// The value.
        value: String,
    },
    /// The statement starts before the certificate is valid.
    #[error(
        "workload certificate {uri} is not yet valid at the statement's start {at} (valid from {not_before} to {not_after})"
    )]
    NotYetValid {
        /// SAN URI.
        uri: String,
        /// Statement start (RFC 3339).
        at: String,
        /// notBefore, RFC 3339.
        not_before: String,
        /// notAfter, RFC 3339.
        not_after: String,
    },
    /// The statement ends after the certificate expired.
    #[error(
        "workload certificate {uri} expired before the statement's end {at} (valid from {not_before} to {not_after})"
    )]
    Expired {
        /// SAN URI.
        uri: String,
        /// Statement end (RFC 3339).
        at: String,
        /// notBefore, RFC 3339.
        not_before: String,
        /// notAfter, RFC 3339.
        not_after: String,
    },
}

/// A workload certificate whose signature and name checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadCertificate {
    /// The subject (ephemeral workload) key.
    pub key: PublicKey,
    /// The SAN URI.
    pub uri: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
}

/// Verify a workload certificate: signed (ecdsa-with-SHA256) by `node_key`, SAN URI exactly
/// `expected_uri`, P-256 subject key. The validity window is checked by
/// [`WorkloadCertificate::check_window`].
pub fn verify_workload_certificate(
    der: &[u8],
    node_key: &PublicKey,
    expected_uri: &str,
) -> Result<WorkloadCertificate, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse {
        reason: e.to_string(),
    })?;
    let algorithm = cert.signature_algorithm.algorithm.to_id_string();
    if algorithm != OID_ECDSA_WITH_SHA256 {
        return Err(CertError::SignatureAlgorithm { found: algorithm });
    }
    let uris = san_uris(&cert);
    if node_key
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .is_err()
    {
        return Err(CertError::NotSignedByNodeKey {
            subject_uri: uris.first().cloned().unwrap_or_else(|| "(none)".to_owned()),
            node_keyid: node_key.keyid(),
        });
    }
    if uris.len() != 1 || uris[0] != expected_uri {
        return Err(CertError::WrongSubject {
            expected: expected_uri.to_owned(),
            found: uris,
        });
    }
    let key = PublicKey::from_spki_der(cert.public_key().raw)
        .map_err(|source| CertError::SubjectKey { source })?;
    let validity = cert.validity();
    Ok(WorkloadCertificate {
        key,
        uri: expected_uri.to_owned(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

fn san_uris(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// Unix seconds (with the fraction) of an RFC 3339 time.
fn parse_time(value: &str) -> Result<f64, CertError> {
    let time = humantime::parse_rfc3339_weak(value).map_err(|_| CertError::Time {
        value: value.to_owned(),
    })?;
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| CertError::Time {
            value: value.to_owned(),
        })?;
    Ok(since.as_secs_f64())
}

fn rfc3339(secs: i64) -> String {
    u64::try_from(secs).map_or_else(
        |_| secs.to_string(),
        |s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        },
    )
}

impl WorkloadCertificate {
    /// Check that the statement's `started_on` … `finished_on` (RFC 3339) lies in the validity
    /// window.
    pub fn check_window(&self, started_on: &str, finished_on: &str) -> Result<(), CertError> {
        let start = parse_time(started_on)?;
        let end = parse_time(finished_on)?;
        if start < self.not_before as f64 {
            return Err(CertError::NotYetValid {
                uri: self.uri.clone(),
                at: started_on.to_owned(),
                not_before: rfc3339(self.not_before),
                not_after: rfc3339(self.not_after),
            });
        }
        if end > self.not_after as f64 {
            return Err(CertError::Expired {
                uri: self.uri.clone(),
                at: finished_on.to_owned(),
                not_before: rfc3339(self.not_before),
                not_after: rfc3339(self.not_after),
            });
        }
        Ok(())
    }
}

/// Sigstore bundle v0.3 style verification material of one signing key: its certificate (leaf
/// first; kiln's chain is the leaf alone — the issuer is the TPM node key, attested by the
/// bundle's node identity document rather than by an X.509 CA).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMaterial {
    /// The certificate chain.
    pub x509_certificate_chain: X509CertificateChain,
}

/// `x509CertificateChain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct X509CertificateChain {
    /// Certificates, leaf first.
    pub certificates: Vec<X509CertificateBytes>,
}

/// One DER certificate, `rawBytes` base64 as in the Sigstore bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateBytes {
    /// DER, base64.
    #[serde(with = "crate::attest::b64")]
    pub raw_bytes: Vec<u8>,
}

impl VerificationMaterial {
    /// Material holding one leaf certificate.
    pub fn leaf(der: Vec<u8>) -> Self {
        Self {
            x509_certificate_chain: X509CertificateChain {
                certificates: vec![X509CertificateBytes { raw_bytes: der }],
            },
        }
    }

    /// The leaf certificate's DER, if any.
    pub fn leaf_der(&self) -> Option<&[u8]> {
        self.x509_certificate_chain
            .certificates
            .first()
            .map(|c| c.raw_bytes.as_slice())
    }
}
