//! Trust roots of `kiln verify`: which keys may sign a bundle's envelopes.
//!
//! Two modes ([`Trust`]):
//! - **TPM-rooted** ([`TpmTrust`]): the verifier trusts an EK CA bundle and an enrolled node
//!   record ([`NodeRecord`], written by `kiln node enroll`), never a raw key. The chain, each
//!   link failing with its own [`TrustError`] variant:
//!   EK certificate → CA bundle; EK certificate = the enrolled one; AK = the enrolled one
//!   (credential activation at enrollment proved it lives in that EK's TPM); node key certified
//!   by the AK; quote signed by the AK with qualifying data sha256(node key || job nonce) — the
//!   nonce is the one in the signed job statement; PCR values = quoted digest; event log replays
//!   to PCR 23; optional expected-PCR policy; the identity document is the one the job statement
//!   links; node key not revoked ([`RevocationList`], signed by an operator key) → each
//!   envelope's workload certificate signed by that node key, naming this node, job and step,
//!   valid over the statement's start … end ([`crate::x509`]) → DSSE signature by the
//!   certificate's key.
//! - **Raw keys** (`--trusted-key`): envelopes must be signed by one of the given keys. A
//!   statement that says `signingKey.kind = "software"` is refused unless the verifier allows
//!   software keys explicitly.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::attest::{self, AttestError, EnrolledNode, NodeIdentity, PcrValues, SignedAttest};
use crate::digest::Digest;
use crate::dsse::{DsseError, Envelope};
use crate::keys::{PublicKey, SigningKey};
use crate::x509::{self, CertError, VerificationMaterial, WorkloadCertificate};

/// `signingKey.kind` of a key in a file on the node (no hardware protection).
pub const KIND_SOFTWARE: &str = "software";
/// `signingKey.kind` of a workload key certified by the TPM-resident node key.
pub const KIND_TPM: &str = "tpm";
/// DSSE payload type of a revocation list.
pub const REVOCATIONS_PAYLOAD_TYPE: &str = "application/vnd.kiln.revocations.v1+json";

/// A broken link of the TPM-rooted chain (or of the raw-key policy).
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The bundle has no node identity document but the verifier requires the TPM chain.
    #[error(
        "bundle has no node identity document: the job was not signed by a tpm-backed node (signed with a software key?)"
    )]
    MissingNodeIdentity,
    /// The job statement does not link a node identity document or a nonce.
    #[error("job statement links no node identity document and nonce")]
    MissingJobEvidence,
    /// The job nonce is not hex.
    #[error("job statement nonce {nonce:?} is not hex")]
    Nonce {
        /// The value.
        nonce: String,
    },
    /// EK certificate chain.
    #[error("link ek certificate → ca bundle: {0}")]
    EkChain(#[source] AttestError),
    /// The EK certificate is not the enrolled one.
    #[error(
        "link ek certificate → enrolled node: the bundle's ek certificate is {found}, the enrolled node's is {enrolled}: another tpm"
    )]
    EkNotEnrolled {
        /// sha256 of the enrolled EK certificate.
        enrolled: Digest,
        /// sha256 of the bundle's EK certificate.
        found: Digest,
    },
    /// AK, certify, quote, PCRs, event log or policy.
    #[error("link {link}: {0}", link = node_link(.0))]
    NodeIdentity(#[source] AttestError),
    /// The identity document is not the one the job statement links.
    #[error(
        "link job statement → node identity: the statement links {linked}, the bundle's document is {found}"
    )]
    IdentityDigest {
        /// Digest in the job statement.
        linked: Digest,
        /// Digest of the bundle's document.
        found: Digest,
    },
    /// The node key is on the revocation list.
    #[error(
        "link node key → revocation list: node key {keyid} is revoked (list issued {issued_on})"
    )]
    NodeKeyRevoked {
        /// keyid of the node key.
        keyid: String,
        /// When the list was issued.
        issued_on: String,
    },
    /// The revocation list's envelope does not verify with the operator key.
    #[error("revocation list is not signed by the operator key: {0}")]
    RevocationSignature(#[source] DsseError),
    /// The revocation list does not parse.
    #[error("revocation list payload is not a revocation list: {reason}")]
    RevocationFormat {
        /// Why.
        reason: String,
    },
    /// No certificate for a signature's keyid.
    #[error(
        "link node key → workload certificate: the bundle has no certificate for signing key {keyid}"
    )]
    MissingCertificate {
        /// keyid of the signature.
        keyid: String,
    },
    /// The envelope's signature count is not 1.
    #[error("dsse envelope must have exactly 1 signature, got {count}")]
    SignatureCount {
        /// Number found.
        count: usize,
    },
    /// The workload certificate fails.
    #[error("link node key → workload certificate: {0}")]
    Certificate(#[source] CertError),
    /// A statement signed by a key of another kind than the trust mode allows.
    #[error(
        "statement signing key kind is {found:?}: software keys are refused unless explicitly allowed (--allow-software-key)"
    )]
    SoftwareKey {
        /// Kind found.
        found: String,
    },
    /// TPM mode: the statement does not say it is signed by a TPM-certified key.
    #[error("statement signing key kind is {found:?}, expected \"tpm\"")]
    KindNotTpm {
        /// Kind found.
        found: String,
    },
}

/// Which link of the node identity document an attestation error breaks.
fn node_link(err: &AttestError) -> &'static str {
    match err {
        AttestError::AkNotEnrolled { .. } => "enrolled node → attestation key",
        AttestError::CertifySignature { .. }
        | AttestError::CertifyQualifyingData { .. }
        | AttestError::CertifiedName { .. }
        | AttestError::KeyAttributes { .. }
        | AttestError::KeyNotP256 { .. } => "attestation key → node key certification",
        AttestError::EventLogReplay { .. } | AttestError::EventLogLine { .. } => {
            "quote → measured-start event log"
        }
        AttestError::PcrPolicy { .. } => "quote → expected-pcr policy",
        _ => "attestation key → quote",
    }
}

/// A node record, as `kiln node enroll` writes it: what enrollment proved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// EK certificate digest and AK public (the AK proved to live in the EK's TPM).
    #[serde(flatten)]
    pub enrolled: EnrolledNode,
    /// kiln's node id: hex sha256 of the EK certificate ([`node_id`]).
    pub node_id: String,
    /// Node key `TPMT_PUBLIC` at enrollment, base64 (informational: bundles carry the current
    /// key with its certification).
    #[serde(with = "crate::attest::b64")]
    pub node_key_public: Vec<u8>,
    /// keyid of the node key at enrollment.
    pub node_keyid: String,
    /// TPM2_Certify of that node key by the AK.
    pub node_key_certify: SignedAttest,
    /// Subject of the CA that issued the EK certificate.
    pub ek_issuer: String,
    /// When the node was enrolled, RFC 3339.
    pub enrolled_on: String,
}

/// `GET /v1/node/identity`: what a node presents for enrollment and `kiln node show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeEndorsement {
    /// Node id ([`node_id`]).
    pub node_id: String,
    /// EK certificate DER, base64.
    #[serde(with = "crate::attest::b64")]
    pub ek_certificate: Vec<u8>,
    /// EK `TPMT_PUBLIC`, base64.
    #[serde(with = "crate::attest::b64")]
    pub ek_public: Vec<u8>,
    /// AK `TPMT_PUBLIC`, base64.
    #[serde(with = "crate::attest::b64")]
    pub ak_public: Vec<u8>,
    /// Current node key `TPMT_PUBLIC`, base64.
    #[serde(with = "crate::attest::b64")]
    pub node_key_public: Vec<u8>,
    /// keyid of the current node key.
    pub node_keyid: String,
    /// TPM2_Certify of the node key by the AK.
    pub node_key_certify: SignedAttest,
    /// The TCTI kilnd uses.
    pub tcti: String,
    /// Measured-start event log.
    pub event_log: Vec<attest::MeasurementEvent>,
}

/// `POST /v1/node/activate` answer: the secret ActivateCredential recovered, base64.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivateResponse {
    /// The recovered credential.
    #[serde(with = "crate::attest::b64")]
    pub secret: Vec<u8>,
}

/// kiln's node id: hex sha256 of the EK certificate DER (stable across node key rotation).
pub fn node_id(ek_certificate_digest: &Digest) -> String {
    ek_certificate_digest.hex()
}

/// A list of revoked node keys, signed (DSSE, [`REVOCATIONS_PAYLOAD_TYPE`]) by an operator key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevocationList {
    /// keyids (`sha256:<hex>` of the SPKI) of revoked node keys.
    pub revoked_node_keys: BTreeSet<String>,
    /// RFC 3339.
    pub issued_on: String,
}

impl RevocationList {
    /// Sign the list with the operator key.
    pub fn sign(&self, operator: &SigningKey) -> Result<Envelope, DsseError> {
        let payload = serde_json::to_vec(self).map_err(DsseError::Statement)?;
        Envelope::sign(REVOCATIONS_PAYLOAD_TYPE, &payload, operator)
    }

    /// Verify a signed list with the operator key and decode it.
    pub fn verify(envelope: &Envelope, operator: &PublicKey) -> Result<Self, TrustError> {
        let verified = envelope
            .verify(std::slice::from_ref(operator))
            .map_err(TrustError::RevocationSignature)?;
        if verified.payload_type != REVOCATIONS_PAYLOAD_TYPE {
            return Err(TrustError::RevocationFormat {
                reason: format!(
                    "payload type must be {REVOCATIONS_PAYLOAD_TYPE:?}, got {:?}",
                    verified.payload_type
                ),
            });
        }
        serde_json::from_slice(&verified.payload).map_err(|e| TrustError::RevocationFormat {
            reason: e.to_string(),
        })
    }
}

/// What the verifier trusts for a TPM-rooted verification.
#[derive(Debug, Clone)]
pub struct TpmTrust {
    /// DER certificates of the EK CA bundle.
    pub ek_ca: Vec<Vec<u8>>,
    /// The enrolled node.
    pub node: NodeRecord,
    /// Expected PCR values (empty: no policy).
    pub pcr_policy: PcrValues,
    /// Verified revocation list, if any.
    pub revocations: Option<RevocationList>,
    /// Verification time (unix seconds) for the EK certificate chain.
    pub at: i64,
}

/// The trust root of a verification.
#[derive(Debug, Clone, Copy)]
pub enum Trust<'a> {
    /// Raw trusted keys (`--trusted-key`).
    Keys {
        /// The keys.
        keys: &'a [PublicKey],
        /// Accept statements whose `signingKey.kind` is `software`.
        allow_software_key: bool,
    },
    /// TPM-rooted.
    Tpm(&'a TpmTrust),
}

/// The node links that verified (TPM mode), for `kiln verify` to print.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedNodeChain {
    /// Node id.
    pub node_id: String,
    /// EK certificate issuer.
    pub ek_issuer: String,
    /// EK certificate digest.
    pub ek_certificate: Digest,
    /// AK name, hex.
    pub ak_name: String,
    /// keyid of the node key.
    pub node_keyid: String,
    /// The job nonce, hex.
    pub nonce: String,
    /// Quoted PCRs → values.
    pub pcrs: PcrValues,
    /// Number of measured-start events replayed.
    pub events: usize,
    /// Whether an expected-PCR policy was checked.
    pub pcr_policy: bool,
    /// Whether a revocation list was checked.
    pub revocations: bool,
}

/// TPM link checks for the node behind a job: everything up to (and including) the node key.
pub fn verify_node(
    trust: &TpmTrust,
    identity: Option<&NodeIdentity>,
    linked_identity: Option<Digest>,
    nonce_hex: Option<&str>,
) -> Result<(PublicKey, VerifiedNodeChain), TrustError> {
    let identity = identity.ok_or(TrustError::MissingNodeIdentity)?;
    let (Some(linked), Some(nonce_hex)) = (linked_identity, nonce_hex) else {
        return Err(TrustError::MissingJobEvidence);
    };
    let nonce = hex::decode(nonce_hex).map_err(|_| TrustError::Nonce {
        nonce: nonce_hex.to_owned(),
    })?;
    let ek = attest::verify_ek_certificate(&identity.ek_certificate, &trust.ek_ca, trust.at)
        .map_err(TrustError::EkChain)?;
    let found = Digest::of(&identity.ek_certificate);
    if found != trust.node.enrolled.ek_certificate_digest {
        return Err(TrustError::EkNotEnrolled {
            enrolled: trust.node.enrolled.ek_certificate_digest,
            found,
        });
    }
    let verified = identity
        .verify(&trust.node.enrolled, &nonce, &trust.pcr_policy)
        .map_err(TrustError::NodeIdentity)?;
    let document = identity_document_digest(identity);
    if document != linked {
        return Err(TrustError::IdentityDigest {
            linked,
            found: document,
        });
    }
    let keyid = verified.node_key.keyid();
    if let Some(list) = &trust.revocations
        && list.revoked_node_keys.contains(&keyid)
    {
        return Err(TrustError::NodeKeyRevoked {
            keyid,
            issued_on: list.issued_on.clone(),
        });
    }
    let ak_name = attest::TpmPublic::parse(&identity.ak_public)
        .map(|ak| hex::encode(ak.name()))
        .unwrap_or_default();
    Ok((
        verified.node_key,
        VerifiedNodeChain {
            node_id: node_id(&found),
            ek_issuer: ek.issuer,
            ek_certificate: found,
            ak_name,
            node_keyid: keyid,
            nonce: nonce_hex.to_owned(),
            pcrs: identity.pcrs.clone(),
            events: identity.event_log.len(),
            pcr_policy: !trust.pcr_policy.is_empty(),
            revocations: trust.revocations.is_some(),
        },
    ))
}

/// The digest a job statement links: sha256 of the document's JSON as kilnd stores it
/// (`serde_json::to_vec`, field order fixed by the struct, PCRs in a sorted map).
pub fn identity_document_digest(identity: &NodeIdentity) -> Digest {
    // Serializing a struct of strings, maps and numbers cannot fail.
    Digest::of(&serde_json::to_vec(identity).unwrap_or_default())
}

/// Resolves which key may sign each envelope of a bundle.
#[derive(Debug)]
pub(crate) enum SignerTrust<'a> {
    /// Raw keys.
    Keys {
        keys: &'a [PublicKey],
        allow_software_key: bool,
    },
    /// TPM: the attested node key, the node id for the SAN, the bundle's certificates.
    Tpm {
        node_key: PublicKey,
        node_id: String,
        job_id: String,
        material: &'a BTreeMap<String, VerificationMaterial>,
    },
}

impl SignerTrust<'_> {
    /// The keys that may sign `envelope` (scope: the job statement when `step` is `None`), and
    /// the certificate whose window the statement must fit.
    pub(crate) fn keys_for(
        &self,
        envelope: &Envelope,
        step: Option<&str>,
    ) -> Result<(Vec<PublicKey>, Option<WorkloadCertificate>), TrustError> {
        match self {
            Self::Keys { keys, .. } => Ok((keys.to_vec(), None)),
            Self::Tpm {
                node_key,
                node_id,
                job_id,
                material,
            } => {
                let [signature] = envelope.signatures.as_slice() else {
                    return Err(TrustError::SignatureCount {
                        count: envelope.signatures.len(),
                    });
                };
                let der = material
                    .get(&signature.keyid)
                    .and_then(VerificationMaterial::leaf_der)
                    .ok_or_else(|| TrustError::MissingCertificate {
                        keyid: signature.keyid.clone(),
                    })?;
                let uri = x509::workload_uri(node_id, job_id, step);
                let cert = x509::verify_workload_certificate(der, node_key, &uri)
                    .map_err(TrustError::Certificate)?;
                if cert.key.keyid() != signature.keyid {
                    return Err(TrustError::Certificate(CertError::KeyMismatch {
                        expected: signature.keyid.clone(),
                        found: cert.key.keyid(),
                    }));
                }
                Ok((vec![cert.key.clone()], Some(cert)))
            }
        }
    }

    /// Check a decoded statement's key kind and time window against the trust mode.
    pub(crate) fn check_statement(
        &self,
        cert: Option<&WorkloadCertificate>,
        kind: &str,
        started_on: &str,
        finished_on: &str,
    ) -> Result<(), TrustError> {
        match self {
            Self::Keys {
                allow_software_key, ..
            } => {
                if kind == KIND_SOFTWARE && !allow_software_key {
                    return Err(TrustError::SoftwareKey {
                        found: kind.to_owned(),
                    });
                }
                Ok(())
            }
            Self::Tpm { .. } => {
                if kind != KIND_TPM {
                    return Err(TrustError::KindNotTpm {
                        found: kind.to_owned(),
                    });
                }
                if let Some(cert) = cert {
                    cert.check_window(started_on, finished_on)
                        .map_err(TrustError::Certificate)?;
                }
                Ok(())
            }
        }
    }
}

/// Parse and verify a signed revocation list file (JSON DSSE envelope).
pub fn load_revocations(
    envelope_json: &[u8],
    operator: &PublicKey,
) -> Result<RevocationList, TrustError> {
    let envelope: Envelope =
        serde_json::from_slice(envelope_json).map_err(|e| TrustError::RevocationFormat {
            reason: format!("not a dsse envelope: {e}"),
        })?;
    RevocationList::verify(&envelope, operator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::fixture::{ARTIFACT, Fixture};
    use crate::verify::{ArtifactRef, VerifyError, verify_artifact_with};

    fn artifact() -> ArtifactRef {
        ArtifactRef {
            name: "hello.tar.gz".into(),
            digest: Digest::of(ARTIFACT),
        }
    }

    #[test]
    fn software_key_statements_need_an_explicit_allowance() {
        let fixture = Fixture::new();
        let bundle = fixture.bundle();
        let keys = [fixture.key.public_key()];
        let err = verify_artifact_with(
            &artifact(),
            &bundle,
            Trust::Keys {
                keys: &keys,
                allow_software_key: false,
            },
        )
        .unwrap_err();
        assert!(
            matches!(&err, VerifyError::Trust { source, .. } if matches!(**source, TrustError::SoftwareKey { .. })),
            "{err}"
        );
        verify_artifact_with(
            &artifact(),
            &bundle,
            Trust::Keys {
                keys: &keys,
                allow_software_key: true,
            },
        )
        .unwrap();
    }

    #[test]
    fn revocation_list_round_trips_and_refuses_other_signers() {
        let (operator, _) = SigningKey::generate().unwrap();
        let (other, _) = SigningKey::generate().unwrap();
        let list = RevocationList {
            revoked_node_keys: ["sha256:00".to_owned()].into(),
            issued_on: "2026-01-01T00:00:00Z".into(),
        };
        let envelope = list.sign(&operator).unwrap();
        let bytes = envelope.to_json_bytes();
        assert_eq!(
            load_revocations(&bytes, &operator.public_key()).unwrap(),
            list
        );
        assert!(matches!(
            load_revocations(&bytes, &other.public_key()),
            Err(TrustError::RevocationSignature(_))
        ));
    }

    #[test]
    fn a_software_bundle_under_tpm_trust_names_the_missing_identity() {
        let fixture = Fixture::new();
        let bundle = fixture.bundle();
        let trust = TpmTrust {
            ek_ca: Vec::new(),
            node: NodeRecord {
                enrolled: EnrolledNode {
                    ek_certificate_digest: Digest::of(b"ek"),
                    ak_public: Vec::new(),
                },
                node_id: "x".into(),
                node_key_public: Vec::new(),
                node_keyid: String::new(),
                node_key_certify: SignedAttest {
                    attest: Vec::new(),
                    signature: Vec::new(),
                },
                ek_issuer: String::new(),
                enrolled_on: String::new(),
            },
            pcr_policy: PcrValues::new(),
            revocations: None,
            at: 0,
        };
        let err = verify_artifact_with(&artifact(), &bundle, Trust::Tpm(&trust)).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Trust { source, .. } if matches!(**source, TrustError::MissingNodeIdentity)),
            "{err}"
        );
    }
}
