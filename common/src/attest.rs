//! Node attestation, verifier side, in pure Rust (no TPM library): TPM 2.0 structures, quote and
//! certification checks, measured-start event log replay, EK certificate chain, and the verifier's
//! half of enrollment (TPM2_MakeCredential).
//!
//! The trust chain it checks, each link with its own [`AttestError`] variant:
//! EK certificate → CA bundle ([`verify_ek_certificate`]); EK public ↔ EK certificate
//! ([`ek_matches_certificate`]); AK ↔ EK ([`make_credential`] at enrollment, answered by the TPM's
//! ActivateCredential); quote signed by the AK, fresh (qualifying data), PCR values matching the
//! quoted digest ([`verify_quote`]); event log replaying to the quoted PCR ([`replay_event_log`]);
//! PCR values against an expected policy ([`check_pcr_policy`]); node key certified by the AK
//! ([`verify_certify`]). [`NodeIdentity::verify`] runs them in that order.
//!
//! Binary layouts are those of TPM 2.0 Library Part 2 (big-endian, `TPM2B` = u16 size + bytes):
//! `TPMS_ATTEST`, `TPMT_SIGNATURE`, `TPMT_PUBLIC`, `TPML_PCR_SELECTION`.
//!
//! Decisions (see also docs/ when written):
//! - PCR bank: sha256 only (swtpm activates only that bank; real TPMs all have it).
//! - Quote selection [`QUOTE_PCRS`]: 0–7 (firmware, boot loader, Secure Boot state: the platform's
//!   boot chain) and [`MEASURED_START_PCR`] 23, where kilnd measures its binary, config and
//!   profiles. PCR 23 is resettable at locality 0, so it proves kilnd's state only as far as the
//!   host's root is trusted not to reset and re-extend it; its event log makes every value
//!   explainable.
//! - Quote qualifying data = sha256(node key `SubjectPublicKeyInfo` DER || job nonce)
//!   ([`quote_qualifying_data`]): one quote proves freshness and binds the node signing key.
//! - AK and node key: ECC P-256, ECDSA/SHA-256; the TPM's r and s are left-padded to 32 bytes and
//!   checked with ring's `ECDSA_P256_SHA256_FIXED`.

use std::collections::BTreeMap;
use std::fmt;

use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::pem::Pem;
use x509_parser::time::ASN1Time;

use crate::digest::Digest;
use crate::keys::{KeyError, PublicKey};

/// `TPM_GENERATED_VALUE`: the magic every TPM-produced `TPMS_ATTEST` starts with.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_CERTIFY`.
pub const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
/// `TPM_ST_ATTEST_QUOTE`.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000b;
/// `TPM_ALG_NULL`.
pub const TPM_ALG_NULL: u16 = 0x0010;
/// `TPM_ALG_RSA`.
pub const TPM_ALG_RSA: u16 = 0x0001;
/// `TPM_ALG_ECC`.
pub const TPM_ALG_ECC: u16 = 0x0023;
/// `TPM_ALG_ECDSA`.
pub const TPM_ALG_ECDSA: u16 = 0x0018;
/// `TPM_ALG_AES`.
pub const TPM_ALG_AES: u16 = 0x0006;
/// `TPM_ALG_CFB`.
pub const TPM_ALG_CFB: u16 = 0x0043;
/// `TPM_ECC_NIST_P256`.
pub const TPM_ECC_NIST_P256: u16 = 0x0003;
/// The PCR kilnd extends at start with its binary, config and profiles (the "application
/// support" PCR, free for software use and resettable at locality 0).
pub const MEASURED_START_PCR: u8 = 23;
/// The PCRs (sha256 bank) every kiln quote covers, ascending.
pub const QUOTE_PCRS: [u8; 9] = [0, 1, 2, 3, 4, 5, 6, 7, MEASURED_START_PCR];

/// `TPMA_OBJECT` bits checked here (Part 2, 8.3).
pub mod object_attributes {
    /// The object cannot be duplicated: its private part never leaves this TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// The object's parent cannot change.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM generated the sensitive part (nobody ever knew the private key).
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// Signs only TPM-generated structures (attestation keys).
    pub const RESTRICTED: u32 = 1 << 16;
    /// A decryption (storage) key.
    pub const DECRYPT: u32 = 1 << 17;
    /// A signing key.
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
}
use object_attributes as attr;

/// Errors of attestation parsing and verification; each names the broken link of the chain.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// A TPM structure ends before a field.
    #[error(
        "{structure} is truncated: {field} needs {needed} bytes at offset {offset}, {available} left"
    )]
    Truncated {
        /// Structure being parsed, e.g. `TPMS_ATTEST`.
        structure: &'static str,
        /// Field being read.
        field: &'static str,
        /// Offset of the field.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// Bytes after the end of a TPM structure.
    #[error("{structure} has {count} trailing bytes after its end")]
    TrailingBytes {
        /// Structure parsed.
        structure: &'static str,
        /// Number of extra bytes.
        count: usize,
    },
    /// A `TPMS_ATTEST` without `TPM_GENERATED_VALUE`: not produced by a TPM.
    #[error("attestation magic must be 0xff544347 (TPM_GENERATED_VALUE), got {found:#010x}")]
    BadMagic {
        /// The magic found.
        found: u32,
    },
    /// A `TPMS_ATTEST` of another type (e.g. a certification offered as a quote).
    #[error("attestation type must be {expected:#06x}, got {found:#06x}")]
    WrongAttestType {
        /// Type required.
        expected: u16,
        /// Type found.
        found: u16,
    },
    /// An algorithm kiln does not use where it found it.
    #[error("{structure}.{field} must be {expected}, got algorithm {found:#06x}")]
    UnsupportedAlgorithm {
        /// Structure.
        structure: &'static str,
        /// Field.
        field: &'static str,
        /// What kiln accepts.
        expected: &'static str,
        /// Algorithm id found.
        found: u16,
    },
    /// An ECDSA r or s longer than 32 bytes.
    #[error("ecdsa signature component {component} must be at most 32 bytes, got {len}")]
    SignatureComponent {
        /// `r` or `s`.
        component: &'static str,
        /// Its length.
        len: usize,
    },
    /// A key that is not an ECC P-256 key with an uncompressed point.
    #[error("{role} key is not a usable ecc p-256 key")]
    KeyNotP256 {
        /// `attestation` or `node signing`.
        role: &'static str,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// A key whose TPM attributes do not fit its role.
    #[error(
        "{role} key has object attributes {found:#010x}: it must have {required:#010x} set and {forbidden:#010x} clear"
    )]
    KeyAttributes {
        /// `attestation`, `node signing` or `endorsement`.
        role: &'static str,
        /// Attributes found.
        found: u32,
        /// Bits that must be set.
        required: u32,
        /// Bits that must be clear.
        forbidden: u32,
    },
    /// The AK's signature over a quote does not verify.
    #[error("quote signature does not verify with the attestation key {ak_name}")]
    QuoteSignature {
        /// Hex name of the AK.
        ak_name: String,
    },
    /// The AK's signature over a certification does not verify.
    #[error("node key certification signature does not verify with the attestation key {ak_name}")]
    CertifySignature {
        /// Hex name of the AK.
        ak_name: String,
    },
    /// The quote's qualifying data is not sha256(node key || nonce): replayed, or for another
    /// job or key.
    #[error(
        "quote qualifying data is {found}, expected {expected} = sha256(node key || job nonce): a replayed quote or one for another job or node key"
    )]
    QuoteQualifyingData {
        /// Hex of what was expected.
        expected: String,
        /// Hex of what the quote carries.
        found: String,
    },
    /// The certification's qualifying data is not the expected value.
    #[error("node key certification qualifying data is {found}, expected {expected}")]
    CertifyQualifyingData {
        /// Hex expected.
        expected: String,
        /// Hex found.
        found: String,
    },
    /// The quote covers other PCRs than those required.
    #[error("quote covers sha256 pcrs {found:?}, expected {expected:?}")]
    PcrSelection {
        /// Required PCRs.
        expected: Vec<u8>,
        /// Quoted PCRs (sha256 bank; other banks make this fail too).
        found: Vec<u8>,
    },
    /// A quoted PCR without a value in the document.
    #[error("pcr {pcr} is quoted but its value is missing")]
    MissingPcrValue {
        /// PCR index.
        pcr: u8,
    },
    /// The PCR values do not hash to the digest the TPM signed.
    #[error("pcr values do not match the quote: they hash to {computed}, the tpm signed {quoted}")]
    PcrDigest {
        /// Hex digest signed by the TPM.
        quoted: String,
        /// Hex digest of the values offered.
        computed: String,
    },
    /// The event log does not replay to the quoted PCR value.
    #[error(
        "event log does not replay to pcr {pcr}: {events} events give {replayed}, the quoted value is {quoted}"
    )]
    EventLogReplay {
        /// PCR index.
        pcr: u8,
        /// Number of events for that PCR.
        events: usize,
        /// Hex value the log replays to.
        replayed: String,
        /// Hex quoted value.
        quoted: String,
    },
    /// A line of a JSON-lines event log that does not parse.
    #[error("event log line {line} is not a measurement event")]
    EventLogLine {
        /// 1-based line number.
        line: usize,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// A PCR value differs from the expected-PCR policy.
    #[error("pcr {pcr} is {found}, the policy expects {expected}")]
    PcrPolicy {
        /// PCR index.
        pcr: u8,
        /// Hex expected.
        expected: String,
        /// Hex found (or `missing`).
        found: String,
    },
    /// The certification is of another key than the one presented.
    #[error(
        "the certification is of the tpm object named {certified}, not of the presented node key {presented}"
    )]
    CertifiedName {
        /// Hex name in the certification.
        certified: String,
        /// Hex name of the presented key.
        presented: String,
    },
    /// The AK presented is not the enrolled one.
    #[error("attestation key {presented} is not the enrolled key {enrolled}")]
    AkNotEnrolled {
        /// Hex name presented.
        presented: String,
        /// Hex name enrolled.
        enrolled: String,
    },
    /// The CA bundle has no certificate or a PEM block that does not parse.
    #[error("ek ca bundle: {reason}")]
    CaBundle {
        /// What is wrong.
        reason: String,
    },
    /// An X.509 certificate that does not parse.
    #[error("{role} certificate does not parse")]
    CertificateParse {
        /// `ek` or `ca`.
        role: &'static str,
        /// Parser error.
        #[source]
        source: x509_parser::nom::Err<X509Error>,
    },
    /// No certificate of the bundle issued the EK certificate.
    #[error("ek certificate issuer {issuer:?} is not in the ca bundle")]
    EkIssuerUnknown {
        /// Issuer DN.
        issuer: String,
    },
    /// The issuer named by the EK certificate did not sign it.
    #[error("ek certificate signature does not verify with ca {issuer:?}")]
    EkCertSignature {
        /// Issuer DN.
        issuer: String,
        /// Verifier error.
        #[source]
        source: X509Error,
    },
    /// A certificate of the chain outside its validity period.
    #[error(
        "{role} certificate {subject:?} is not valid at {at}: valid from {not_before} to {not_after}"
    )]
    CertificateValidity {
        /// `ek` or `ca`.
        role: &'static str,
        /// Subject DN.
        subject: String,
        /// Time checked (unix seconds).
        at: i64,
        /// Start (unix seconds).
        not_before: i64,
        /// End (unix seconds).
        not_after: i64,
    },
    /// The issuing certificate is not a CA.
    #[error("issuer {subject:?} of the ek certificate is not a ca (basicConstraints cA is false)")]
    IssuerNotCa {
        /// Subject DN.
        subject: String,
    },
    /// The EK certificate's key is not RSA (kiln enrolls with the RSA-2048 EK).
    #[error("ek certificate key must be rsa, got {found}")]
    EkCertKeyType {
        /// What was found.
        found: String,
    },
    /// The EK public key from the TPM is not the certified one.
    #[error(
        "the tpm's ek public key (modulus {tpm_modulus_prefix}…) is not the key in the ek certificate (modulus {cert_modulus_prefix}…)"
    )]
    EkCertMismatch {
        /// First bytes (hex) of the TPM's modulus.
        tpm_modulus_prefix: String,
        /// First bytes (hex) of the certificate's modulus.
        cert_modulus_prefix: String,
    },
    /// The EK is not an RSA storage key with AES-128-CFB and sha256 names (the default template).
    #[error(
        "ek must be an rsa restricted decryption key with aes-128-cfb and sha256 names: {reason}"
    )]
    EkTemplate {
        /// What differs.
        reason: &'static str,
    },
    /// An AK name that is not sha256 (0x000b || 32 bytes).
    #[error("object name must be 0x000b followed by a 32-byte sha256 digest, got {len} bytes")]
    NameFormat {
        /// Length found.
        len: usize,
    },
    /// A credential longer than a sha256 digest.
    #[error("credential must be 1..=32 bytes, got {len}")]
    CredentialLength {
        /// Length found.
        len: usize,
    },
    /// RSA-OAEP encryption to the EK failed.
    #[error("rsa-oaep encryption of the credential seed to the ek failed")]
    EkEncrypt {
        /// rsa crate error.
        #[source]
        source: rsa::Error,
    },
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
    /// The TPM's answer to the credential challenge is wrong: the AK is not in the EK's TPM.
    #[error(
        "credential activation answer does not match the challenge: the attestation key is not resident in the tpm of the certified ek"
    )]
    ActivationMismatch,
}

type Result<T, E = AttestError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Binary reader

/// Big-endian cursor over a TPM structure; every read names the field for error messages.
struct Reader<'a> {
    structure: &'static str,
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(structure: &'static str, bytes: &'a [u8]) -> Self {
        Self {
            structure,
            bytes,
            offset: 0,
        }
    }

    fn take(&mut self, field: &'static str, needed: usize) -> Result<&'a [u8]> {
        let rest = &self.bytes[self.offset..];
        let Some(out) = rest.get(..needed) else {
            return Err(AttestError::Truncated {
                structure: self.structure,
                field,
                offset: self.offset,
                needed,
                available: rest.len(),
            });
        };
        self.offset += needed;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A `TPM2B_*`: u16 size, then that many bytes.
    fn tpm2b(&mut self, field: &'static str) -> Result<&'a [u8]> {
        let len = self.u16(field)?;
        self.take(field, usize::from(len))
    }

    fn finish(self) -> Result<()> {
        let count = self.bytes.len() - self.offset;
        if count == 0 {
            Ok(())
        } else {
            Err(AttestError::TrailingBytes {
                structure: self.structure,
                count,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TPMS_ATTEST

/// A parsed `TPMS_ATTEST` (the bytes a TPM signs for Quote and Certify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    /// `qualifiedSigner`: qualified name of the signing key.
    pub qualified_signer: Vec<u8>,
    /// `extraData`: the caller's qualifying data (nonce binding).
    pub extra_data: Vec<u8>,
    /// `clockInfo.clock` (ms).
    pub clock: u64,
    /// `clockInfo.resetCount`.
    pub reset_count: u32,
    /// `clockInfo.restartCount`.
    pub restart_count: u32,
    /// `clockInfo.safe`.
    pub safe: bool,
    /// `firmwareVersion`.
    pub firmware_version: u64,
    /// The type-specific part.
    pub attested: Attested,
}

/// The type-specific part of a `TPMS_ATTEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attested {
    /// `TPMS_QUOTE_INFO`.
    Quote {
        /// `pcrSelect`.
        pcr_select: Vec<PcrSelection>,
        /// `pcrDigest`: hash (the AK's scheme hash) of the selected PCR values, concatenated.
        pcr_digest: Vec<u8>,
    },
    /// `TPMS_CERTIFY_INFO`.
    Certify {
        /// Name of the certified object (nameAlg || H(TPMT_PUBLIC)).
        name: Vec<u8>,
        /// Its qualified name.
        qualified_name: Vec<u8>,
    },
}

/// One `TPMS_PCR_SELECTION`: a bank and the PCR indices selected in it (ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    /// Hash algorithm of the bank (`TPM_ALG_SHA256` = 0x000b).
    pub hash_alg: u16,
    /// Selected PCR indices, ascending.
    pub pcrs: Vec<u8>,
}

impl Attest {
    /// Parse a `TPMS_ATTEST` of type quote or certify (others are refused).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new("TPMS_ATTEST", bytes);
        let magic = r.u32("magic")?;
        if magic != TPM_GENERATED_VALUE {
            return Err(AttestError::BadMagic { found: magic });
        }
        let kind = r.u16("type")?;
        let qualified_signer = r.tpm2b("qualifiedSigner")?.to_vec();
        let extra_data = r.tpm2b("extraData")?.to_vec();
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        let safe = r.u8("clockInfo.safe")? != 0;
        let firmware_version = r.u64("firmwareVersion")?;
        let attested = match kind {
            TPM_ST_ATTEST_QUOTE => {
                let count = r.u32("pcrSelect.count")?;
                let mut pcr_select = Vec::new();
                for _ in 0..count {
                    let hash_alg = r.u16("pcrSelect.hash")?;
                    let size = r.u8("pcrSelect.sizeofSelect")?;
                    let bitmap = r.take("pcrSelect.pcrSelect", usize::from(size))?;
                    pcr_select.push(PcrSelection {
                        hash_alg,
                        pcrs: bitmap_to_pcrs(bitmap),
                    });
                }
                let pcr_digest = r.tpm2b("pcrDigest")?.to_vec();
                Attested::Quote {
                    pcr_select,
                    pcr_digest,
                }
            }
            TPM_ST_ATTEST_CERTIFY => Attested::Certify {
                name: r.tpm2b("certifyInfo.name")?.to_vec(),
                qualified_name: r.tpm2b("certifyInfo.qualifiedName")?.to_vec(),
            },
            other => {
                return Err(AttestError::WrongAttestType {
                    expected: TPM_ST_ATTEST_QUOTE,
                    found: other,
                });
            }
        };
        r.finish()?;
        Ok(Self {
            qualified_signer,
            extra_data,
            clock,
            reset_count,
            restart_count,
            safe,
            firmware_version,
            attested,
        })
    }
}

/// PCR indices set in a `pcrSelect` bitmap (byte i bit j = PCR 8i + j), ascending.
fn bitmap_to_pcrs(bitmap: &[u8]) -> Vec<u8> {
    let mut pcrs = Vec::new();
    for (i, byte) in bitmap.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                pcrs.push((i * 8 + bit) as u8);
            }
        }
    }
    pcrs
}

// ---------------------------------------------------------------------------------------------
// TPMT_SIGNATURE

/// An ECDSA signature from a `TPMT_SIGNATURE`, r and s left-padded to 32 bytes each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcdsaSignature {
    /// r, 32 bytes big-endian.
    pub r: [u8; 32],
    /// s, 32 bytes big-endian.
    pub s: [u8; 32],
}

impl EcdsaSignature {
    /// Parse a `TPMT_SIGNATURE`; only ECDSA with SHA-256 is accepted.
    pub fn parse_tpmt(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new("TPMT_SIGNATURE", bytes);
        let sig_alg = r.u16("sigAlg")?;
        if sig_alg != TPM_ALG_ECDSA {
            return Err(AttestError::UnsupportedAlgorithm {
                structure: "TPMT_SIGNATURE",
                field: "sigAlg",
                expected: "ecdsa (0x0018)",
                found: sig_alg,
            });
        }
        let hash = r.u16("signature.hash")?;
        if hash != TPM_ALG_SHA256 {
            return Err(AttestError::UnsupportedAlgorithm {
                structure: "TPMT_SIGNATURE",
                field: "signature.hash",
                expected: "sha256 (0x000b)",
                found: hash,
            });
        }
        let sig_r = pad32("r", r.tpm2b("signatureR")?)?;
        let sig_s = pad32("s", r.tpm2b("signatureS")?)?;
        r.finish()?;
        Ok(Self { r: sig_r, s: sig_s })
    }

    /// From r and s as a TPM returns them (possibly shorter than 32 bytes).
    pub fn from_components(r: &[u8], s: &[u8]) -> Result<Self> {
        Ok(Self {
            r: pad32("r", r)?,
            s: pad32("s", s)?,
        })
    }

    /// `r || s`, the fixed-length form ring verifies.
    pub fn to_fixed(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.r);
        out[32..].copy_from_slice(&self.s);
        out
    }

    /// ASN.1 DER `ECDSA-Sig-Value` (what [`PublicKey::verify`] and DSSE verifiers expect).
    pub fn to_der(&self) -> Vec<u8> {
        let r = der_integer(&self.r);
        let s = der_integer(&self.s);
        let mut out = Vec::with_capacity(2 + r.len() + s.len());
        out.push(0x30);
        // At most 2 * (2 + 33) = 70 bytes: the short length form always fits.
        out.push((r.len() + s.len()) as u8);
        out.extend_from_slice(&r);
        out.extend_from_slice(&s);
        out
    }
}

/// Left-pad a big-endian integer to 32 bytes; leading zeros beyond 32 bytes are stripped.
fn pad32(component: &'static str, value: &[u8]) -> Result<[u8; 32]> {
    let first_nonzero = value.iter().position(|&b| b != 0).unwrap_or(value.len());
    let value = &value[first_nonzero..];
    if value.len() > 32 {
        return Err(AttestError::SignatureComponent {
            component,
            len: value.len(),
        });
    }
    let mut out = [0u8; 32];
    out[32 - value.len()..].copy_from_slice(value);
    Ok(out)
}

/// DER INTEGER of a non-negative big-endian value: minimal, with a 0x00 when the top bit is set.
fn der_integer(value: &[u8; 32]) -> Vec<u8> {
    let first_nonzero = value.iter().position(|&b| b != 0).unwrap_or(31);
    let digits = &value[first_nonzero..];
    let pad = digits[0] & 0x80 != 0;
    let mut out = Vec::with_capacity(3 + digits.len());
    out.push(0x02);
    out.push((digits.len() + usize::from(pad)) as u8);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
    out
}

// ---------------------------------------------------------------------------------------------
// TPMT_PUBLIC

/// A parsed `TPMT_PUBLIC` (ECC or RSA), with the exact bytes its name is computed from.
#[derive(Clone, PartialEq, Eq)]
pub struct TpmPublic {
    bytes: Vec<u8>,
    /// `nameAlg`.
    pub name_alg: u16,
    /// `objectAttributes` (see [`object_attributes`]).
    pub attributes: u32,
    /// `parameters.symmetric.algorithm` (`TPM_ALG_NULL` for signing keys).
    pub symmetric_alg: u16,
    /// `parameters.symmetric.keyBits` (0 when the algorithm is NULL).
    pub symmetric_key_bits: u16,
    /// `parameters.symmetric.mode` (0 when the algorithm is NULL).
    pub symmetric_mode: u16,
    /// `parameters.scheme.scheme`.
    pub scheme: u16,
    /// `parameters.scheme.details.hashAlg` (0 when the scheme is NULL).
    pub scheme_hash: u16,
    /// The key.
    pub key: TpmKey,
}

/// The public key of a [`TpmPublic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmKey {
    /// ECC: curve id and coordinates.
    Ecc {
        /// `TPM_ECC_CURVE`.
        curve: u16,
        /// x, big-endian as the TPM gave it.
        x: Vec<u8>,
        /// y.
        y: Vec<u8>,
    },
    /// RSA: key size, exponent (0 = 65537) and modulus.
    Rsa {
        /// `keyBits`.
        key_bits: u16,
        /// `exponent` (0 means the default 65537).
        exponent: u32,
        /// Modulus, big-endian.
        modulus: Vec<u8>,
    },
}

impl fmt::Debug for TpmPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmPublic")
            .field("name", &hex::encode(self.name()))
            .field("attributes", &format_args!("{:#010x}", self.attributes))
            .finish_non_exhaustive()
    }
}

impl TpmPublic {
    /// Parse a `TPMT_PUBLIC` (not the `TPM2B_PUBLIC` with its size prefix).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        const S: &str = "TPMT_PUBLIC";
        let mut r = Reader::new(S, bytes);
        let kind = r.u16("type")?;
        let name_alg = r.u16("nameAlg")?;
        if name_alg != TPM_ALG_SHA256 {
            return Err(AttestError::UnsupportedAlgorithm {
                structure: S,
                field: "nameAlg",
                expected: "sha256 (0x000b)",
                found: name_alg,
            });
        }
        let attributes = r.u32("objectAttributes")?;
        r.tpm2b("authPolicy")?;
        let symmetric_alg = r.u16("parameters.symmetric.algorithm")?;
        let (symmetric_key_bits, symmetric_mode) = if symmetric_alg == TPM_ALG_NULL {
            (0, 0)
        } else {
            (
                r.u16("parameters.symmetric.keyBits")?,
                r.u16("parameters.symmetric.mode")?,
            )
        };
        let scheme = r.u16("parameters.scheme.scheme")?;
        let scheme_hash = if scheme == TPM_ALG_NULL {
            0
        } else {
            r.u16("parameters.scheme.details.hashAlg")?
        };
        let key = match kind {
            TPM_ALG_ECC => {
                if scheme == 0x001a {
                    // TPM_ALG_ECDAA carries a count.
                    r.u16("parameters.scheme.details.count")?;
                }
                let curve = r.u16("parameters.curveID")?;
                let kdf = r.u16("parameters.kdf.scheme")?;
                if kdf != TPM_ALG_NULL {
                    r.u16("parameters.kdf.details.hashAlg")?;
                }
                let x = r.tpm2b("unique.ecc.x")?.to_vec();
                let y = r.tpm2b("unique.ecc.y")?.to_vec();
                TpmKey::Ecc { curve, x, y }
            }
            TPM_ALG_RSA => {
                let key_bits = r.u16("parameters.keyBits")?;
                let exponent = r.u32("parameters.exponent")?;
                let modulus = r.tpm2b("unique.rsa")?.to_vec();
                TpmKey::Rsa {
                    key_bits,
                    exponent,
                    modulus,
                }
            }
            other => {
                return Err(AttestError::UnsupportedAlgorithm {
                    structure: S,
                    field: "type",
                    expected: "ecc (0x0023) or rsa (0x0001)",
                    found: other,
                });
            }
        };
        r.finish()?;
        Ok(Self {
            bytes: bytes.to_vec(),
            name_alg,
            attributes,
            symmetric_alg,
            symmetric_key_bits,
            symmetric_mode,
            scheme,
            scheme_hash,
            key,
        })
    }

    /// The marshalled `TPMT_PUBLIC`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The TPM name: `nameAlg || sha256(TPMT_PUBLIC)` (34 bytes).
    pub fn name(&self) -> Vec<u8> {
        let mut name = Vec::with_capacity(34);
        name.extend_from_slice(&self.name_alg.to_be_bytes());
        name.extend_from_slice(Digest::of(&self.bytes).as_bytes());
        name
    }

    /// The ECC P-256 key as a [`PublicKey`] (the `SubjectPublicKeyInfo` kiln signs and binds).
    pub fn p256_public_key(&self, role: &'static str) -> Result<PublicKey> {
        let not_p256 = |source| AttestError::KeyNotP256 { role, source };
        let TpmKey::Ecc { curve, x, y } = &self.key else {
            return Err(not_p256(KeyError::UnsupportedAlgorithm {
                found: "rsaEncryption (tpm rsa key)".to_owned(),
            }));
        };
        if *curve != TPM_ECC_NIST_P256 {
            return Err(not_p256(KeyError::UnsupportedCurve {
                found: format!("tpm curve {curve:#06x}"),
            }));
        }
        let mut point = [0u8; 65];
        point[0] = 0x04;
        let (Ok(px), Ok(py)) = (pad32("x", x), pad32("y", y)) else {
            return Err(not_p256(KeyError::PointEncoding {
                len: 1 + x.len() + y.len(),
                first: 0x04,
            }));
        };
        point[1..33].copy_from_slice(&px);
        point[33..].copy_from_slice(&py);
        PublicKey::from_uncompressed_point(&point).map_err(not_p256)
    }

    /// Check `required` bits set and `forbidden` bits clear.
    fn check_attributes(&self, role: &'static str, required: u32, forbidden: u32) -> Result<()> {
        if self.attributes & required == required && self.attributes & forbidden == 0 {
            Ok(())
        } else {
            Err(AttestError::KeyAttributes {
                role,
                found: self.attributes,
                required,
                forbidden,
            })
        }
    }
}

/// Attributes of a key that was born in the TPM and can never leave it.
const TPM_BOUND: u32 = attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN;

/// Parse and check an attestation key: ECC P-256, restricted signing, TPM-bound.
pub fn parse_attestation_key(tpmt_public: &[u8]) -> Result<(TpmPublic, PublicKey)> {
    let ak = TpmPublic::parse(tpmt_public)?;
    ak.check_attributes(
        "attestation",
        TPM_BOUND | attr::RESTRICTED | attr::SIGN_ENCRYPT,
        attr::DECRYPT,
    )?;
    let key = ak.p256_public_key("attestation")?;
    Ok((ak, key))
}

/// Parse and check a node signing key: ECC P-256, non-restricted signing, TPM-bound.
pub fn parse_node_key(tpmt_public: &[u8]) -> Result<(TpmPublic, PublicKey)> {
    let node = TpmPublic::parse(tpmt_public)?;
    node.check_attributes(
        "node signing",
        TPM_BOUND | attr::SIGN_ENCRYPT,
        attr::RESTRICTED | attr::DECRYPT,
    )?;
    let key = node.p256_public_key("node signing")?;
    Ok((node, key))
}

// ---------------------------------------------------------------------------------------------
// Quote, certify, PCRs, event log

/// PCR values of the sha256 bank, by index.
pub type PcrValues = BTreeMap<u8, Digest>;

/// A signed attestation: the marshalled `TPMS_ATTEST` and the `TPMT_SIGNATURE` over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAttest {
    /// `TPMS_ATTEST`, base64.
    #[serde(with = "b64")]
    pub attest: Vec<u8>,
    /// `TPMT_SIGNATURE`, base64.
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
}

/// sha256(node key `SubjectPublicKeyInfo` DER || job nonce): the qualifying data of every quote.
pub fn quote_qualifying_data(node_key: &PublicKey, nonce: &[u8]) -> [u8; 32] {
    let mut input = Vec::with_capacity(node_key.spki_der().len() + nonce.len());
    input.extend_from_slice(node_key.spki_der());
    input.extend_from_slice(nonce);
    *Digest::of(&input).as_bytes()
}

/// Verify the AK's ECDSA signature over `signed.attest`, then parse it.
fn verify_signed(
    ak: &TpmPublic,
    ak_key: &PublicKey,
    signed: &SignedAttest,
    quote: bool,
) -> Result<Attest> {
    let sig = EcdsaSignature::parse_tpmt(&signed.signature)?;
    // The point follows the fixed 26-byte P-256 SubjectPublicKeyInfo prefix.
    let point = &ak_key.spki_der()[26..];
    let ok = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(&signed.attest, &sig.to_fixed())
        .is_ok();
    if !ok {
        let ak_name = hex::encode(ak.name());
        return Err(if quote {
            AttestError::QuoteSignature { ak_name }
        } else {
            AttestError::CertifySignature { ak_name }
        });
    }
    Attest::parse(&signed.attest)
}

/// sha256 over the values of `pcrs`, in order (how the TPM computes `pcrDigest`).
pub fn pcr_digest(pcrs: &[u8], values: &PcrValues) -> Result<Digest> {
    let mut concatenated = Vec::with_capacity(pcrs.len() * 32);
    for &pcr in pcrs {
        let value = values
            .get(&pcr)
            .ok_or(AttestError::MissingPcrValue { pcr })?;
        concatenated.extend_from_slice(value.as_bytes());
    }
    Ok(Digest::of(&concatenated))
}

/// Verify a quote: AK signature (first, before trusting any content), type, qualifying data,
/// PCR selection = `expected_pcrs` in the sha256 bank, and that `pcr_values` hash to the signed
/// `pcrDigest`. `ak_public` is the AK's `TPMT_PUBLIC` (checked by [`parse_attestation_key`]).
pub fn verify_quote(
    ak_public: &[u8],
    quote: &SignedAttest,
    expected_qualifying_data: &[u8],
    expected_pcrs: &[u8],
    pcr_values: &PcrValues,
) -> Result<Attest> {
    let (ak, ak_key) = parse_attestation_key(ak_public)?;
    let attest = verify_signed(&ak, &ak_key, quote, true)?;
    let Attested::Quote {
        pcr_select,
        pcr_digest: quoted_digest,
    } = &attest.attested
    else {
        return Err(AttestError::WrongAttestType {
            expected: TPM_ST_ATTEST_QUOTE,
            found: TPM_ST_ATTEST_CERTIFY,
        });
    };
    if attest.extra_data != expected_qualifying_data {
        return Err(AttestError::QuoteQualifyingData {
            expected: hex::encode(expected_qualifying_data),
            found: hex::encode(&attest.extra_data),
        });
    }
    // Only the sha256 bank, exactly the expected PCRs (another bank makes the selection differ).
    let sha256_only = matches!(pcr_select.as_slice(), [only] if only.hash_alg == TPM_ALG_SHA256);
    let selected: Vec<u8> = pcr_select
        .iter()
        .flat_map(|s| s.pcrs.iter().copied())
        .collect();
    if !sha256_only || selected != expected_pcrs {
        return Err(AttestError::PcrSelection {
            expected: expected_pcrs.to_vec(),
            found: selected,
        });
    }
    let computed = pcr_digest(&selected, pcr_values)?;
    if computed.as_bytes().as_slice() != quoted_digest.as_slice() {
        return Err(AttestError::PcrDigest {
            quoted: hex::encode(quoted_digest),
            computed: computed.hex(),
        });
    }
    Ok(attest)
}

/// Verify the AK's certification of a node key: AK signature, type certify, qualifying data, and
/// that the certified name is the presented key's name; the key must be a TPM-bound,
/// non-restricted ECC P-256 signing key. Returns the node key.
pub fn verify_certify(
    ak_public: &[u8],
    certify: &SignedAttest,
    node_key_public: &[u8],
    expected_qualifying_data: &[u8],
) -> Result<PublicKey> {
    let (ak, ak_key) = parse_attestation_key(ak_public)?;
    let attest = verify_signed(&ak, &ak_key, certify, false)?;
    let Attested::Certify { name, .. } = &attest.attested else {
        return Err(AttestError::WrongAttestType {
            expected: TPM_ST_ATTEST_CERTIFY,
            found: TPM_ST_ATTEST_QUOTE,
        });
    };
    if attest.extra_data != expected_qualifying_data {
        return Err(AttestError::CertifyQualifyingData {
            expected: hex::encode(expected_qualifying_data),
            found: hex::encode(&attest.extra_data),
        });
    }
    let (node, node_key) = parse_node_key(node_key_public)?;
    let presented = node.name();
    if *name != presented {
        return Err(AttestError::CertifiedName {
            certified: hex::encode(name),
            presented: hex::encode(presented),
        });
    }
    Ok(node_key)
}

/// One measurement: a line of the JSON-lines event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasurementEvent {
    /// PCR extended.
    pub pcr: u8,
    /// The sha256 digest extended into it.
    pub digest: Digest,
    /// What was measured, e.g. `kilnd binary /usr/bin/kilnd`.
    pub description: String,
}

/// Parse a JSON-lines event log (blank lines ignored).
pub fn parse_event_log(text: &str) -> Result<Vec<MeasurementEvent>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|source| AttestError::EventLogLine {
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// The value `pcr` has after extending its events in order from all zeros (PCR 23 is reset
/// before kilnd measures itself): `v = sha256(v || digest)`.
pub fn replay_pcr(events: &[MeasurementEvent], pcr: u8) -> Digest {
    let mut value = [0u8; 32];
    for event in events.iter().filter(|e| e.pcr == pcr) {
        let mut input = [0u8; 64];
        input[..32].copy_from_slice(&value);
        input[32..].copy_from_slice(event.digest.as_bytes());
        value = *Digest::of(&input).as_bytes();
    }
    Digest::from_bytes(value)
}

/// Check that the event log replays to the (quote-verified) value of `pcr`.
pub fn replay_event_log(events: &[MeasurementEvent], pcr: u8, values: &PcrValues) -> Result<()> {
    let quoted = values
        .get(&pcr)
        .ok_or(AttestError::MissingPcrValue { pcr })?;
    let replayed = replay_pcr(events, pcr);
    if replayed != *quoted {
        return Err(AttestError::EventLogReplay {
            pcr,
            events: events.iter().filter(|e| e.pcr == pcr).count(),
            replayed: replayed.hex(),
            quoted: quoted.hex(),
        });
    }
    Ok(())
}

/// Check PCR values against an expected-PCR policy (every listed PCR must have that value).
pub fn check_pcr_policy(values: &PcrValues, policy: &PcrValues) -> Result<()> {
    for (&pcr, expected) in policy {
        match values.get(&pcr) {
            Some(found) if found == expected => {}
            found => {
                return Err(AttestError::PcrPolicy {
                    pcr,
                    expected: expected.hex(),
                    found: found.map_or_else(|| "missing".to_owned(), Digest::hex),
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// EK certificate

/// A verified EK certificate's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkCertificate {
    /// Issuer DN.
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// RSA modulus (no leading zero), big-endian.
    pub modulus: Vec<u8>,
    /// RSA public exponent, big-endian (no leading zero).
    pub exponent: Vec<u8>,
}

/// DER certificates of a PEM bundle (blocks labelled `CERTIFICATE`; others are ignored).
pub fn parse_ca_bundle(pem: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut certs = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|err| AttestError::CaBundle {
            reason: format!("pem block {} does not parse: {err}", certs.len() + 1),
        })?;
        if block.label == "CERTIFICATE" {
            certs.push(block.contents);
        }
    }
    if certs.is_empty() {
        return Err(AttestError::CaBundle {
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

fn check_validity(role: &'static str, cert: &X509Certificate<'_>, at: i64) -> Result<()> {
    let validity = cert.validity();
    // A time the certificate cannot express fails closed (reported like an expiry).
    if let Ok(time) = ASN1Time::from_timestamp(at)
        && validity.not_before <= time
        && time <= validity.not_after
    {
        return Ok(());
    }
    Err(AttestError::CertificateValidity {
        role,
        subject: cert.subject().to_string(),
        at,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// Verify an EK certificate (DER, as read from NV 0x01c00002) against a CA bundle at time `at`
/// (unix seconds). Every certificate of the bundle is a trust anchor (like a CAfile with
/// partial chains allowed): the EK certificate must be signed by one of them that is a CA and
/// valid at `at`, and be valid itself. Returns the certified RSA key.
pub fn verify_ek_certificate(
    ek_der: &[u8],
    ca_bundle: &[Vec<u8>],
    at: i64,
) -> Result<EkCertificate> {
    let (_, ek) = x509_parser::parse_x509_certificate(ek_der)
        .map_err(|source| AttestError::CertificateParse { role: "ek", source })?;
    let issuer_raw = ek.issuer().as_raw();
    let issuer = ek.issuer().to_string();
    let mut last_signature_error = None;
    let mut found = None;
    for der in ca_bundle {
        let (_, ca) = x509_parser::parse_x509_certificate(der)
            .map_err(|source| AttestError::CertificateParse { role: "ca", source })?;
        if ca.subject().as_raw() != issuer_raw {
            continue;
        }
        match ek.verify_signature(Some(ca.public_key())) {
            Ok(()) => {
                if !ca.is_ca() {
                    return Err(AttestError::IssuerNotCa {
                        subject: ca.subject().to_string(),
                    });
                }
                check_validity("ca", &ca, at)?;
                found = Some(());
                break;
            }
            Err(err) => last_signature_error = Some(err),
        }
    }
    if found.is_none() {
        return Err(match last_signature_error {
            Some(source) => AttestError::EkCertSignature { issuer, source },
            None => AttestError::EkIssuerUnknown { issuer },
        });
    }
    check_validity("ek", &ek, at)?;
    let parsed = ek
        .public_key()
        .parsed()
        .map_err(|source| AttestError::CertificateParse {
            role: "ek",
            source: x509_parser::nom::Err::Error(source),
        })?;
    let x509_parser::public_key::PublicKey::RSA(rsa) = parsed else {
        return Err(AttestError::EkCertKeyType {
            found: ek.public_key().algorithm.algorithm.to_id_string(),
        });
    };
    Ok(EkCertificate {
        issuer,
        serial: hex::encode(ek.raw_serial()),
        modulus: strip_zeros(rsa.modulus).to_vec(),
        exponent: strip_zeros(rsa.exponent).to_vec(),
    })
}

fn strip_zeros(value: &[u8]) -> &[u8] {
    let first = value.iter().position(|&b| b != 0).unwrap_or(value.len());
    &value[first..]
}

/// The modulus and exponent of an RSA EK of the default template (AES-128-CFB for its storage
/// children, what MakeCredential's inner wrap uses).
fn rsa_ek_key(ek: &TpmPublic) -> Result<(&[u8], u32)> {
    let TpmKey::Rsa {
        exponent, modulus, ..
    } = &ek.key
    else {
        return Err(AttestError::EkTemplate {
            reason: "the ek is not an rsa key",
        });
    };
    if ek.symmetric_alg != TPM_ALG_AES
        || ek.symmetric_key_bits != 128
        || ek.symmetric_mode != TPM_ALG_CFB
    {
        return Err(AttestError::EkTemplate {
            reason: "symmetric parameters are not aes-128-cfb",
        });
    }
    // An exponent of 0 in a TPMT_PUBLIC means the default, 65537.
    Ok((modulus, if *exponent == 0 { 65537 } else { *exponent }))
}

/// Check that the EK public key the TPM reports (`TPMT_PUBLIC`) is the certified key, and that it
/// is an EK of the default RSA template (restricted decrypt, AES-128-CFB, sha256).
pub fn ek_matches_certificate(ek_public: &[u8], cert: &EkCertificate) -> Result<TpmPublic> {
    let ek = TpmPublic::parse(ek_public)?;
    ek.check_attributes(
        "endorsement",
        TPM_BOUND | attr::RESTRICTED | attr::DECRYPT,
        attr::SIGN_ENCRYPT,
    )?;
    let (modulus, tpm_exponent) = rsa_ek_key(&ek)?;
    let tpm_exponent = tpm_exponent.to_be_bytes();
    if strip_zeros(modulus) != cert.modulus.as_slice()
        || strip_zeros(&tpm_exponent) != cert.exponent.as_slice()
    {
        let prefix = |m: &[u8]| hex::encode(&strip_zeros(m)[..strip_zeros(m).len().min(8)]);
        return Err(AttestError::EkCertMismatch {
            tpm_modulus_prefix: prefix(modulus),
            cert_modulus_prefix: prefix(&cert.modulus),
        });
    }
    Ok(ek)
}

// ---------------------------------------------------------------------------------------------
// MakeCredential (TPM 2.0 Part 1, 24.4–24.6), pure Rust

/// A credential challenge for ActivateCredential: `TPM2B_ID_OBJECT` and `TPM2B_ENCRYPTED_SECRET`
/// contents (without their u16 size prefixes, as tss-esapi's `IdObject`/`EncryptedSecret` take
/// them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialChallenge {
    /// `credentialBlob`: integrity HMAC (TPM2B) || AES-CFB encrypted TPM2B credential.
    #[serde(with = "b64")]
    pub id_object: Vec<u8>,
    /// `secret`: the seed, RSA-OAEP-SHA256 encrypted to the EK with label "IDENTITY\0".
    #[serde(with = "b64")]
    pub encrypted_secret: Vec<u8>,
}

/// KDFa with HMAC-SHA256 (Part 1, 11.4.10.2): `bits` of
/// `HMAC(key, [i]32 || label || 0x00 || context_u || context_v || [bits]32)` for i = 1, 2, ….
pub fn kdfa_sha256(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let bytes = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut ctx = ring::hmac::Context::with_key(&hmac_key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// TPM2_MakeCredential in software: wrap `credential` so that only the TPM holding `ek` can
/// recover it, and only for the object named `ak_name` (ActivateCredential checks the name).
/// `ek` must be an RSA EK of the default template (checked by [`ek_matches_certificate`]).
pub fn make_credential(
    ek: &TpmPublic,
    ak_name: &[u8],
    credential: &[u8],
) -> Result<CredentialChallenge> {
    use aes::cipher::{AsyncStreamCipher as _, KeyIvInit as _};
    use rsa::{BigUint, Oaep, RsaPublicKey};

    if ak_name.len() != 34 || ak_name[..2] != TPM_ALG_SHA256.to_be_bytes() {
        return Err(AttestError::NameFormat { len: ak_name.len() });
    }
    if credential.is_empty() || credential.len() > 32 {
        return Err(AttestError::CredentialLength {
            len: credential.len(),
        });
    }
    let (modulus, exponent) = rsa_ek_key(ek)?;

    // The seed: as long as the EK's name digest.
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| AttestError::Random)?;
    let ek_key = RsaPublicKey::new(
        BigUint::from_bytes_be(modulus),
        BigUint::from_bytes_be(&exponent.to_be_bytes()),
    )
    .map_err(|source| AttestError::EkEncrypt { source })?;
    let encrypted_secret = ek_key
        .encrypt(
            &mut rsa::rand_core::OsRng,
            Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|source| AttestError::EkEncrypt { source })?;

    // Encrypt the TPM2B credential with the storage key, IV zero (Part 1, 24.4).
    let sym_key = kdfa_sha256(&seed, "STORAGE", ak_name, &[], 128);
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    enc_identity.extend_from_slice(&(credential.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(credential);
    let encryptor = cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &[0u8; 16])
        .map_err(|_| AttestError::EkTemplate {
            reason: "derived aes-128 key has the wrong length",
        })?;
    encryptor.encrypt(&mut enc_identity);

    // Outer integrity: HMAC(KDFa(seed, "INTEGRITY", 256 bits), encIdentity || name) (24.5).
    let hmac_key = kdfa_sha256(&seed, "INTEGRITY", &[], &[], 256);
    let mut ctx =
        ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hmac_key));
    ctx.update(&enc_identity);
    ctx.update(ak_name);
    let integrity = ctx.sign();

    let mut id_object = Vec::with_capacity(2 + 32 + enc_identity.len());
    id_object.extend_from_slice(&32u16.to_be_bytes());
    id_object.extend_from_slice(integrity.as_ref());
    id_object.extend_from_slice(&enc_identity);
    Ok(CredentialChallenge {
        id_object,
        encrypted_secret,
    })
}

/// The verifier's side of enrollment, step 1: check the EK certificate against the CA bundle at
/// `at`, the TPM's EK public against it, and the AK (restricted P-256 signing, TPM-bound); then
/// challenge the AK with a fresh random 32-byte secret. Keep the [`Enrollment`] and send the
/// challenge to the node; [`Enrollment::finish`] checks its answer.
pub fn start_enrollment(
    ek_certificate: &[u8],
    ca_bundle: &[Vec<u8>],
    ek_public: &[u8],
    ak_public: &[u8],
    at: i64,
) -> Result<(Enrollment, CredentialChallenge)> {
    let cert = verify_ek_certificate(ek_certificate, ca_bundle, at)?;
    let ek = ek_matches_certificate(ek_public, &cert)?;
    let (ak, _) = parse_attestation_key(ak_public)?;
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| AttestError::Random)?;
    let challenge = make_credential(&ek, &ak.name(), &secret)?;
    Ok((
        Enrollment {
            secret,
            ek_certificate_digest: Digest::of(ek_certificate),
            ak_public: ak_public.to_vec(),
        },
        challenge,
    ))
}

/// A pending enrollment (verifier side): the challenge's secret and what will be recorded.
pub struct Enrollment {
    secret: [u8; 32],
    ek_certificate_digest: Digest,
    ak_public: Vec<u8>,
}

impl fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrollment")
            .field("ek_certificate_digest", &self.ek_certificate_digest)
            .finish_non_exhaustive()
    }
}

/// An enrolled node: its EK certificate digest and the AK proven to live in the same TPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledNode {
    /// sha256 of the EK certificate DER.
    pub ek_certificate_digest: Digest,
    /// The AK's `TPMT_PUBLIC`, base64.
    #[serde(with = "b64")]
    pub ak_public: Vec<u8>,
}

impl Enrollment {
    /// Step 2: compare (in constant time) the secret ActivateCredential recovered with the one
    /// sent.
    pub fn finish(self, activated: &[u8]) -> Result<EnrolledNode> {
        let same_len = activated.len() == self.secret.len();
        let diff = self
            .secret
            .iter()
            .zip(activated)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if !same_len || diff != 0 {
            return Err(AttestError::ActivationMismatch);
        }
        Ok(EnrolledNode {
            ek_certificate_digest: self.ek_certificate_digest,
            ak_public: self.ak_public,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Node identity document

/// The node identity document linked from a job's attestation: everything a verifier needs to
/// go from the EK certificate to the node signing key and the node's measured state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeIdentity {
    /// EK certificate DER, base64.
    #[serde(with = "b64")]
    pub ek_certificate: Vec<u8>,
    /// AK `TPMT_PUBLIC`, base64.
    #[serde(with = "b64")]
    pub ak_public: Vec<u8>,
    /// Node signing key `TPMT_PUBLIC`, base64.
    #[serde(with = "b64")]
    pub node_key_public: Vec<u8>,
    /// TPM2_Certify of the node key by the AK (qualifying data empty: freshness and binding come
    /// from the quote).
    pub node_key_certify: SignedAttest,
    /// TPM2_Quote over [`QUOTE_PCRS`] with qualifying data [`quote_qualifying_data`].
    pub quote: SignedAttest,
    /// sha256 PCR values of the quoted PCRs.
    pub pcrs: PcrValues,
    /// Measured-start event log.
    pub event_log: Vec<MeasurementEvent>,
}

/// What [`NodeIdentity::verify`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNode {
    /// The TPM-resident node signing key.
    pub node_key: PublicKey,
    /// The verified quote.
    pub quote: Attest,
}

impl NodeIdentity {
    /// Verify the document for a job's `nonce`: the AK is the enrolled one, the node key is
    /// certified by it, the quote is signed by it and binds the node key and the nonce, the PCR
    /// values match the quote, the event log replays to PCR 23, and `policy` holds.
    pub fn verify(
        &self,
        enrolled: &EnrolledNode,
        nonce: &[u8],
        policy: &PcrValues,
    ) -> Result<VerifiedNode> {
        if self.ak_public != enrolled.ak_public {
            let name = |bytes: &[u8]| {
                TpmPublic::parse(bytes)
                    .map_or_else(|_| "(unparsable)".to_owned(), |p| hex::encode(p.name()))
            };
            return Err(AttestError::AkNotEnrolled {
                presented: name(&self.ak_public),
                enrolled: name(&enrolled.ak_public),
            });
        }
        let node_key = verify_certify(
            &self.ak_public,
            &self.node_key_certify,
            &self.node_key_public,
            &[],
        )?;
        let qualifying = quote_qualifying_data(&node_key, nonce);
        let quote = verify_quote(
            &self.ak_public,
            &self.quote,
            &qualifying,
            &QUOTE_PCRS,
            &self.pcrs,
        )?;
        replay_event_log(&self.event_log, MEASURED_START_PCR, &self.pcrs)?;
        check_pcr_policy(&self.pcrs, policy)?;
        Ok(VerifiedNode { node_key, quote })
    }
}

/// Serde helper: `Vec<u8>` as standard base64.
pub(crate) mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    };

    use super::*;

    /// A node identity document, EK public and CA bundle captured from swtpm 0.7.1 (the
    /// `capture_identity_document` test in daemon/tests/tpm.rs), nonce `captured nonce`.
    const CAPTURED: &str = r#"{
 "ca_bundle": "-----BEGIN CERTIFICATE-----\nMIIEKjCCApKgAwIBAgIUezUe8PeaR9IhXFjNyPpX6kGvInEwDQYJKoZIhvcNAQEL\nBQAwHzEdMBsGA1UEAxMUc3d0cG0tbG9jYWxjYS1yb290Y2EwIBcNMjYxMTI1MTIx\nODI1WhgPOTk5OTEyMzEyMzU5NTlaMBgxFjAUBgNVBAMTDXN3dHBtLWxvY2FsY2Ew\nggGiMA0GCSqGSIb3DQEBAQUAA4IBjwAwggGKAoIBgQCYsn0V5QSeF/WTFhJirsT7\nhKnGlzm2KkpeisqE5Gz4lgQ5jy2fgpF28zUznWHcU8x4nEsHwygZa2gmSiraVEFa\nZo3v/fV234yyuJS4mWdaWRz1UF+3RvYS6iaQ3hQderYYED+V6bikPmwaPMAYssgH\n1nZtLrzQxYAqm1N2rYnpunpeDEU51y1ho65w1m0ds/+6Ygi+m3X1tq1NdAd45Bt1\nrQBSMJmvNWG7//SYXsD6WLxPStcZ56fk9yCdwE/WMKQHlfPKln7HPRU3sJgXZ4/V\nZyAYS0T1Pjjx8C2XJEf53LHQXAPxsZ6SEEZbPCi0SDVqpfhyiEz2nHXfN3QL5dpY\nKyBT4h0PPGM3CnuwYKpU+15VIxs3b/e2Ap8D3KJ6IxZQ5oGAKpAZIP1MilR4yF0F\n11xdz0nm16Hc/frcSz05vUhDbrXvspBvwIxRNIBb2qPKnGr+sIYRNbvFEICsfkBB\n/kSb36vk9AfLSaj7pEQgfP4sDyNJLAWho8slyTxnPRECAwEAAaNjMGEwDwYDVR0T\nAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAgQwHQYDVR0OBBYEFIEEGbtsLx0QhCv8\nj4s4Kg8fXW5bMB8GA1UdIwQYMBaAFE6r0snHxeZKzeWMkqdDVh5QpmIKMA0GCSqG\nSIb3DQEBCwUAA4IBgQA0Adi1FUmnW4/Jzg3dC+3wMvucZwLcpQQ1A88cjo1KJMXU\nOxBol+/m4tcG5sTuNGg5/0hS9mZqd7p4pLi5ggZpn84XariXNRcCNFm/0DeaFYpF\nH5r5QDJF8w057nY7GX4bcHjjICDf2mtGLcflpqQ7kJ7lCaJvflxd4Bi2Sw1/MUP5\niX8zxrYhE/tySuZTRIpUy/jFX3fTlCQBjrLjV8KF83jedXZ7w5DPrEF9fbS/+Hgn\nkA7cngsUzwuCFBljenJa4t4gzEqIUk53/kQKYeuFZvVMt78UdPYEbOMbNDiUyaa4\nMmLiHnQXU3OGbVM0ntYYjelziUgkvqTdvOTGd0MLr74bB+bDzdDFL2/vxtrmVsZv\nFrrq4uczrp7baxvmwifDsfxQVh+xTfdckcTrjyPjFp3r/8YPUZ7TB2xB6Cr8GuDs\nU6by2tOzj/mAnGonr2nfBj1bnNTsMBTLOhOaB4CznAkelM6HiBQtpaIxixrStUT8\nzS94lKRjesbdn8Od3hY=\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nMIIEEDCCAnigAwIBAgIUQfOqBeF2xy2SE3STxxAF53VwbqQwDQYJKoZIhvcNAQEL\nBQAwHzEdMBsGA1UEAxMUc3d0cG0tbG9jYWxjYS1yb290Y2EwIBcNMjYxMTI1MTIx\nODI0WhgPOTk5OTEyMzEyMzU5NTlaMB8xHTAbBgNVBAMTFHN3dHBtLWxvY2FsY2Et\ncm9vdGNhMIIBojANBgkqhkiG9w0BAQEFAAOCAY8AMIIBigKCAYEAsHe5QyLYxv1H\nC2ydAHW6ESoXATVDNRJMZmSy7iFrNAb+9dNWFezsghQ9HrsowpsZBVhYQ2cyyQli\nYR9fBhV+SZAxGmireVB8/WtZ8fWx+UYxiea4dAs2jMSUkXhbWTGNscAaBIGyudKr\nxyFDWeJDUn3y9+LPwtqrVEpB2GzycNT57hLP2b6OzahhXhwV3ySlWndtS7aIFTT3\nEos/4C9mITnTVBbkZ4mSY4AhyulXX2IadXWRLbvJsWHLoBZNRYEVLsv1sjoq/iem\njw8ajR2o8e3fG7wBss9ql+1iZmBCd5C+tqSnU6LT7XxmPWgxySG4dYVJ1NYBnLaM\nGi40o9gA3RxFxJv2KE8sh1TDIWn80ENnA3ZAcGFSbr+RkMprw3KiquDgw8Frg1D7\nm1FvvM3EeTVP67N+2x5OvYKB+8yyMJ2tbi9lSrYEXG/sfwW3FSL1r6j9NiQ591if\nWXfkNT8eDIogU1+JzXx+0NQ6U7gz6CqrxZEsj4J1kQYKXqCc9ZpDAgMBAAGjQjBA\nMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgIEMB0GA1UdDgQWBBROq9LJ\nx8XmSs3ljJKnQ1YeUKZiCjANBgkqhkiG9w0BAQsFAAOCAYEAFJaF8rdDRNuWSgch\noaaGLVrP3XlKLFXY2syG2IY2Fo2hTUjie2SnToQf+UAKZEzn6tX8oKQScFZANKDf\nlZxW8ValwA4ZyFr+EQ4hGRsvP8EJV9EvV5Pn/xqkqfGcorgoic0Npnbwpr4QgkFx\nBTh1eYX1+Dq1j5HR3BTHDi2C6k9W0mjO2wEU5IEKNcWbynhjG/9/KW49Yr5tYeQM\nUQAQvhVAjGt3MS4+1EsfmMh/M1mQ27QSupFksAMVKjuNhAvfSM9RzgqDdxWhqOdj\nT8cSLhM+nbURO4E9vkNJOSzHKe9JNmLMgInUVIlOgrCnfsQ9cy1YY/RWm06pYP5D\n03tO0IC9RU5v2zBzSf4HayKIYwncoKcf7jjE4gOabIY2XIo7aW+dxhe6xp6gCnJJ\nTedT//+sPvUsFzcQgiZQPtGysI7ecbk/YXmbfWKHgzqXUKqyc/VTupwLwHe8Uf+/\nGckhrqVuux1yJJQiw/vIBW6CXiay3QHieuDBMQltLAy6m0Ea\n-----END CERTIFICATE-----\n",
 "ek_public": "0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080004300100800000000000100c48554f1d99d2fd20a8a1ef75a77928a0f74b531c234d63b6b5cf5517f72da51f9df3a2d3812191198eaaefd305701d57ed108dd9dd4b783c8c52095f153dfb6a0b7e621e6c6ac330fe2fda773e0b9a508d33c3ba503a94b92465a69645cd824074e5f46f11679fa30c4aa8a81f184804ddb4fee38934866d2252dd604f8d8a943b6bd3f6990aae676cc4628f912df738c4fe5086f269528406cd659e6702abbc502d7eaaaa0652e6ecb112761fcb2724a2126992763579f144b1a0c4280b8faf87a288fc4093f0c646bef217a23f64770d0a3cb6bd2efc2f08e62037e4a03a44d07c4990c1bcaee4c89ecbc70b0e083501066fe8c7bce01f33e573cb3827ffb",
 "identity": {
  "ak_public": "ACMACwAFAHIAAAAQABgACwADABAAICyeJvaLne8FgT5cFqOfzaMg2BO/vJpT4eDnEQphYO+eACDIZaaNfVqMNAyyiYD7xA6s8K8NEmsjliIreLktMlCYQw==",
  "ek_certificate": "MIID9DCCAlygAwIBAgIBMjANBgkqhkiG9w0BAQsFADAYMRYwFAYDVQQDEw1zd3RwbS1sb2NhbGNhMCAXDTI2MTEyNTEyMzAzMVoYDzk5OTkxMjMxMjM1OTU5WjASMRAwDgYDVQQDEwd1bmtub3duMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxIVU8dmdL9IKih73WneSig90tTHCNNY7a1z1UX9y2lH53zotOBIZEZjqrv0wVwHVftEI3Z3Ut4PIxSCV8VPftqC35iHmxqwzD+L9p3PguaUI0zw7pQOpS5JGWmlkXNgkB05fRvEWefowxKqKgfGEgE3bT+44k0hm0iUt1gT42KlDtr0/aZCq5nbMRij5Et9zjE/lCG8mlShAbNZZ5nAqu8UC1+qqoGUubssRJ2H8snJKISaZJ2NXnxRLGgxCgLj6+Hooj8QJPwxka+8heiP2R3DQo8tr0u/C8I5iA35KA6RNB8SZDBvK7kyJ7LxwsOCDUBBm/ox7zgHzPlc8s4J/+wIDAQABo4HMMIHJMBAGA1UdJQQJMAcGBWeBBQgBMFIGA1UdEQEB/wRIMEakRDBCMRYwFAYFZ4EFAgEMC2lkOjAwMDAxMDE0MRAwDgYFZ4EFAgIMBXN3dHBtMRYwFAYFZ4EFAgMMC2lkOjIwMTkxMDIzMAwGA1UdEwEB/wQCMAAwIgYDVR0JBBswGTAXBgVngQUCEDEOMAwMAzIuMAIBAAICAKQwHwYDVR0jBBgwFoAUgQQZu2wvHRCEK/yPizgqDx9dblswDgYDVR0PAQH/BAQDAgUgMA0GCSqGSIb3DQEBCwUAA4IBgQAAWr0ifN/WmrQf/N2OgjZ29320OGtT0nxIlQro1/8J4N+24BD1eo8NXNE+XBI86fA/ZcdTPSF+eFFGatmSuQo4Z5Eqh9dWmENCa6/8iGHhr9EVcCwyuyptEsqt8fV2f4hCHnhbj/METqQd6QorXUV9HbVbC/ZlpHaCgvOCvPk+OrlTWfKd/plOEaZRwDanLPNIQ6/aXICd33pM2NaIUw1nVKj24VTAGLPToPhJFIX7Rsa6xwrMwekUnn1BtAcVql0ViUA8hj2AEkA07iINgQQVWOm9vMj+l7AUv0VweabvAgLoFnKPOynZcsMRPhAwjgb43Hz8k6Xa/Gv6IGM9dC/XPqa/UMIu9d6VksQqdp9d633KfA/TAl9QON1HWMiiTMEnSdIDudkeWSGRQ+sdON7orE8hFqGX80m7T/9wKXqy37DJ6dSj1BMEqYO+PCIcW5j3ok797WRCcdYhrAFgMWVfdcVRFIMrPsy+khOxxBfa+A2X0awIK0lD9eIjkY3GLGI=",
  "event_log": [
   {
    "description": "kilnd binary /tmp/.tmpmjxWms/kilnd",
    "digest": "sha256:477f3312e8ef6e7b154a4213167c8ab17b13520223ba5c7e8900e37a39f0cbee",
    "pcr": 23
   },
   {
    "description": "kilnd config /tmp/.tmpmjxWms/kilnd.toml",
    "digest": "sha256:3c06cd598d5ac08a545251c5dab783de79825f509b7cb4cd6488545c6cc575c0",
    "pcr": 23
   },
   {
    "description": "sandbox profile /tmp/.tmpmjxWms/profiles/fetch.toml",
    "digest": "sha256:f3cd0a8f43d55dafd3b7048bdc636f8315f1fbe359554cf89b7c36b680508913",
    "pcr": 23
   },
   {
    "description": "sandbox profile /tmp/.tmpmjxWms/profiles/hermetic.toml",
    "digest": "sha256:2a8bf26197b13d31b4fa2bf163d2f914bb219e703f3a0dea6d007dd1ce595dd1",
    "pcr": 23
   }
  ],
  "node_key_certify": {
   "attest": "/1RDR4AXACIAC3ngw01IoWJQIdg2v5+Nv3OruF3AtjvdZoRGghIcSghwAAAAAAAAAAAAbgAAAAIAAAAAASAZECMAFjY2ACIAC7xTMBE35mh9bOkHL1sb/MAcdM5zojNomoE1U0A2lD1SACIACx1n94m2wLU12UOOf6eX5r367Y1wLtPb8ipTZ5CWZTR9",
   "signature": "ABgACwAg6+jWEOdQ8w8ZMW6476uumxfrGKXLleA1ivCrJGEBOTUAICo6StFp/Z7f3YSfCpnPxnYmFHlIpxh0aNx6KkEfX1Lo"
  },
  "node_key_public": "ACMACwAEAHIAAAAQABgACwADABAAIGf0TFE5HfkkwvtxWrSLCdbJAoD5SgQOqLbB6acC8NZQACC/Ux5M5//k6OKrhJtlCULRIG3GODYWS7RVpO3CvC2yjQ==",
  "pcrs": {
   "0": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
   "1": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
   "2": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
   "23": "sha256:e2b10814e4b547c61045229861dfc3982da0e8d9c5ce79956cac0cc0e15d43ed",
   "3": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
   "4": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
   "5": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
   "6": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
   "7": "sha256:0000000000000000000000000000000000000000000000000000000000000000"
  },
  "quote": {
   "attest": "/1RDR4AYACIAC3ngw01IoWJQIdg2v5+Nv3OruF3AtjvdZoRGghIcSghwACA+a3ptpirj7ujnot3DBNmLDtm6x0mYgqWnD7wuvaXzlgAAAAAAAAB2AAAAAgAAAAABIBkQIwAWNjYAAAABAAsD/wCAACA3LyparRghlc1ajzQPQfZxWA7s0vaalsc2WjLTY0rQrQ==",
   "signature": "ABgACwAgFxbOcT4FOVj7QvBzcwh0Bglxfj40vAdKEiPcodM550UAIBLcCx1TeFu9XG1YkxmIUYC0bjV/atuj+6YrbjZ31SrW"
  }
 }
}"#;
    const NONCE: &[u8] = b"captured nonce";
    /// 2027-01-15, inside the captured certificates' validity.
    const AT: i64 = 1_800_000_000;

    struct Captured {
        identity: NodeIdentity,
        ek_public: Vec<u8>,
        ca: Vec<Vec<u8>>,
    }

    fn captured() -> Captured {
        let value: serde_json::Value = serde_json::from_str(CAPTURED).unwrap();
        Captured {
            identity: serde_json::from_value(value["identity"].clone()).unwrap(),
            ek_public: hex::decode(value["ek_public"].as_str().unwrap()).unwrap(),
            ca: parse_ca_bundle(value["ca_bundle"].as_str().unwrap().as_bytes()).unwrap(),
        }
    }

    fn enrolled(c: &Captured) -> EnrolledNode {
        EnrolledNode {
            ek_certificate_digest: Digest::of(&c.identity.ek_certificate),
            ak_public: c.identity.ak_public.clone(),
        }
    }

    #[test]
    fn captured_quote_parses_field_by_field() {
        let c = captured();
        let attest = Attest::parse(&c.identity.quote.attest).unwrap();
        let (_, node_key) = parse_node_key(&c.identity.node_key_public).unwrap();
        assert_eq!(attest.extra_data, quote_qualifying_data(&node_key, NONCE));
        let ak = TpmPublic::parse(&c.identity.ak_public).unwrap();
        // qualifiedSigner is the AK's qualified name: same algorithm prefix, 34 bytes.
        assert_eq!(attest.qualified_signer.len(), 34);
        assert_eq!(attest.qualified_signer[..2], ak.name()[..2]);
        assert!(attest.safe);
        let Attested::Quote {
            pcr_select,
            pcr_digest: digest,
        } = &attest.attested
        else {
            panic!("not a quote: {attest:?}");
        };
        assert_eq!(
            pcr_select,
            &vec![PcrSelection {
                hash_alg: TPM_ALG_SHA256,
                pcrs: QUOTE_PCRS.to_vec()
            }]
        );
        assert_eq!(
            digest.as_slice(),
            pcr_digest(&QUOTE_PCRS, &c.identity.pcrs)
                .unwrap()
                .as_bytes()
        );
    }

    #[test]
    fn captured_identity_verifies_and_each_link_fails_on_its_own() {
        let c = captured();
        let enrolled = enrolled(&c);
        let verified = c
            .identity
            .verify(&enrolled, NONCE, &c.identity.pcrs)
            .unwrap();
        assert_eq!(
            verified.node_key,
            parse_node_key(&c.identity.node_key_public).unwrap().1
        );

        let err = c
            .identity
            .verify(&enrolled, b"other", &PcrValues::new())
            .unwrap_err();
        assert!(
            matches!(err, AttestError::QuoteQualifyingData { .. }),
            "{err}"
        );

        let mut bad = c.identity.clone();
        bad.quote.signature[10] ^= 0x80;
        let err = bad.verify(&enrolled, NONCE, &PcrValues::new()).unwrap_err();
        assert!(matches!(err, AttestError::QuoteSignature { .. }), "{err}");

        let mut bad = c.identity.clone();
        bad.node_key_certify.signature[10] ^= 0x80;
        let err = bad.verify(&enrolled, NONCE, &PcrValues::new()).unwrap_err();
        assert!(matches!(err, AttestError::CertifySignature { .. }), "{err}");

        let mut bad = c.identity.clone();
        bad.pcrs.insert(7, Digest::of(b"x"));
        let err = bad.verify(&enrolled, NONCE, &PcrValues::new()).unwrap_err();
        assert!(matches!(err, AttestError::PcrDigest { .. }), "{err}");

        let mut bad = c.identity.clone();
        bad.pcrs.remove(&23);
        let err = bad.verify(&enrolled, NONCE, &PcrValues::new()).unwrap_err();
        assert!(
            matches!(err, AttestError::MissingPcrValue { pcr: 23 }),
            "{err}"
        );

        let mut bad = c.identity.clone();
        bad.event_log.pop();
        let err = bad.verify(&enrolled, NONCE, &PcrValues::new()).unwrap_err();
        assert!(
            matches!(err, AttestError::EventLogReplay { events: 3, .. }),
            "{err}"
        );

        let mut policy = c.identity.pcrs.clone();
        policy.insert(0, Digest::of(b"expected firmware"));
        let err = c.identity.verify(&enrolled, NONCE, &policy).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "pcr 0 is {}, the policy expects {}",
                "0".repeat(64),
                Digest::of(b"expected firmware").hex()
            )
        );
        let mut policy = PcrValues::new();
        policy.insert(16, Digest::of(b"x"));
        let err = c.identity.verify(&enrolled, NONCE, &policy).unwrap_err();
        assert!(err.to_string().starts_with("pcr 16 is missing"), "{err}");

        // The certification of the node key presented for the AK (a key certified by nobody).
        let mut bad = c.identity.clone();
        bad.node_key_public = c.identity.ak_public.clone();
        let err = bad.verify(&enrolled, NONCE, &PcrValues::new()).unwrap_err();
        assert!(
            matches!(
                err,
                AttestError::KeyAttributes {
                    role: "node signing",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn quote_selection_must_be_the_documented_one() {
        let c = captured();
        let (_, node_key) = parse_node_key(&c.identity.node_key_public).unwrap();
        let qd = quote_qualifying_data(&node_key, NONCE);
        let err = verify_quote(
            &c.identity.ak_public,
            &c.identity.quote,
            &qd,
            &[0, 23],
            &c.identity.pcrs,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "quote covers sha256 pcrs [0, 1, 2, 3, 4, 5, 6, 7, 23], expected [0, 23]"
        );
    }

    #[test]
    fn tpm_public_names_and_attributes() {
        let c = captured();
        let (ak, ak_key) = parse_attestation_key(&c.identity.ak_public).unwrap();
        assert_eq!(ak.name().len(), 34);
        assert_eq!(ak.name()[..2], [0x00, 0x0b]);
        assert_eq!(ak.scheme, TPM_ALG_ECDSA);
        assert_eq!(ak.scheme_hash, TPM_ALG_SHA256);
        assert_eq!(ak_key.spki_der().len(), 91);
        // The certification names exactly this node key.
        let Attested::Certify { name, .. } = Attest::parse(&c.identity.node_key_certify.attest)
            .unwrap()
            .attested
        else {
            panic!("not a certification");
        };
        assert_eq!(
            name,
            TpmPublic::parse(&c.identity.node_key_public)
                .unwrap()
                .name()
        );
        // The AK is not a node key and the node key is not an AK.
        assert!(matches!(
            parse_node_key(&c.identity.ak_public),
            Err(AttestError::KeyAttributes { .. })
        ));
        assert!(matches!(
            parse_attestation_key(&c.identity.node_key_public),
            Err(AttestError::KeyAttributes { .. })
        ));
        // The EK: RSA 2048, AES-128-CFB, restricted decrypt.
        let ek = TpmPublic::parse(&c.ek_public).unwrap();
        assert!(
            matches!(&ek.key, TpmKey::Rsa { key_bits: 2048, modulus, .. } if modulus.len() == 256)
        );
        assert_eq!(
            (ek.symmetric_alg, ek.symmetric_key_bits, ek.symmetric_mode),
            (TPM_ALG_AES, 128, TPM_ALG_CFB)
        );
        assert!(matches!(
            ek.p256_public_key("attestation"),
            Err(AttestError::KeyNotP256 { .. })
        ));
    }

    #[test]
    fn malformed_structures_name_the_field() {
        let c = captured();
        let attest = &c.identity.quote.attest;
        let err = Attest::parse(&attest[..attest.len() - 3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "TPMS_ATTEST is truncated: pcrDigest needs 32 bytes at offset 113, 29 left"
        );
        let mut longer = attest.clone();
        longer.push(0);
        assert!(matches!(
            Attest::parse(&longer),
            Err(AttestError::TrailingBytes {
                structure: "TPMS_ATTEST",
                count: 1
            })
        ));
        let mut magic = attest.clone();
        magic[0] = 0;
        assert_eq!(
            Attest::parse(&magic).unwrap_err().to_string(),
            "attestation magic must be 0xff544347 (TPM_GENERATED_VALUE), got 0x00544347"
        );
        let mut kind = attest.clone();
        kind[5] = 0x14; // TPM_ST_ATTEST_TIME
        assert!(matches!(
            Attest::parse(&kind),
            Err(AttestError::WrongAttestType { found: 0x8014, .. })
        ));
        let mut rsa_sig = c.identity.quote.signature.clone();
        rsa_sig[1] = 0x14; // TPM_ALG_RSASSA
        assert!(matches!(
            EcdsaSignature::parse_tpmt(&rsa_sig),
            Err(AttestError::UnsupportedAlgorithm {
                field: "sigAlg",
                found: 0x0014,
                ..
            })
        ));
        assert!(matches!(
            TpmPublic::parse(&c.identity.ak_public[..20]),
            Err(AttestError::Truncated {
                structure: "TPMT_PUBLIC",
                ..
            })
        ));
        assert!(matches!(
            EcdsaSignature::from_components(&[1; 33], &[1; 32]),
            Err(AttestError::SignatureComponent {
                component: "r",
                len: 33
            })
        ));
    }

    #[test]
    fn bitmap_and_padding() {
        assert_eq!(bitmap_to_pcrs(&[0xff, 0x00, 0x80]), QUOTE_PCRS.to_vec());
        assert_eq!(bitmap_to_pcrs(&[0x01, 0x01]), vec![0, 8]);
        assert_eq!(pad32("r", &[0, 0, 1]).unwrap()[31], 1);
        // A leading zero byte on a 32-byte value (33 bytes) is accepted.
        let mut v = vec![0u8];
        v.extend_from_slice(&[0xff; 32]);
        assert_eq!(pad32("s", &v).unwrap(), [0xff; 32]);
    }

    #[test]
    fn fixed_signatures_convert_to_der_that_ring_verifies() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        // Many signatures so short r/s (leading zero bytes) and high bits are both exercised.
        for i in 0..200u32 {
            let msg = i.to_be_bytes();
            let fixed = pair.sign(&rng, &msg).unwrap();
            let sig = EcdsaSignature::from_components(&fixed.as_ref()[..32], &fixed.as_ref()[32..])
                .unwrap();
            assert_eq!(sig.to_fixed().as_slice(), fixed.as_ref());
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref())
                .verify(&msg, &sig.to_der())
                .unwrap();
        }
        // Small values: minimal encoding with a sign byte where needed.
        let mut r = [0u8; 32];
        r[31] = 0x80;
        let mut s = [0u8; 32];
        s[31] = 1;
        assert_eq!(
            EcdsaSignature { r, s }.to_der(),
            vec![0x30, 0x07, 0x02, 0x02, 0x00, 0x80, 0x02, 0x01, 0x01]
        );
    }

    #[test]
    fn event_log_lines_and_replay() {
        let c = captured();
        let text: String = c
            .identity
            .event_log
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        assert!(text.starts_with(r#"{"pcr":23,"digest":"sha256:"#), "{text}");
        assert_eq!(
            parse_event_log(&format!("\n{text}\n")).unwrap(),
            c.identity.event_log
        );
        let err = parse_event_log(&format!("{text}{{\"pcr\":23}}\n")).unwrap_err();
        assert!(
            matches!(err, AttestError::EventLogLine { line: 5, .. }),
            "{err}"
        );
        assert_eq!(
            replay_pcr(&c.identity.event_log, MEASURED_START_PCR),
            c.identity.pcrs[&MEASURED_START_PCR]
        );
        assert_eq!(replay_pcr(&[], 23), Digest::from_bytes([0; 32]));
        // One extend by hand: sha256(zeros || d).
        let d = Digest::of(b"kilnd");
        let mut input = vec![0u8; 32];
        input.extend_from_slice(d.as_bytes());
        let event = MeasurementEvent {
            pcr: 23,
            digest: d,
            description: String::new(),
        };
        assert_eq!(replay_pcr(&[event], 23), Digest::of(&input));
    }

    #[test]
    fn ek_certificate_chain() {
        let c = captured();
        let cert = verify_ek_certificate(&c.identity.ek_certificate, &c.ca, AT).unwrap();
        assert_eq!(cert.issuer, "CN=swtpm-localca");
        assert_eq!(cert.exponent, vec![1, 0, 1]);
        ek_matches_certificate(&c.ek_public, &cert).unwrap();

        // Only the root: the issuer is missing.
        let err = verify_ek_certificate(&c.identity.ek_certificate, &c.ca[1..], AT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ek certificate issuer \"CN=swtpm-localca\" is not in the ca bundle"
        );
        // Before the certificates existed.
        let err = verify_ek_certificate(&c.identity.ek_certificate, &c.ca, 0).unwrap_err();
        assert!(
            matches!(err, AttestError::CertificateValidity { role: "ca", .. }),
            "{err}"
        );
        // A tampered certificate no longer verifies.
        let mut tampered = c.identity.ek_certificate.clone();
        let n = tampered.len() - 20;
        tampered[n] ^= 1;
        let err = verify_ek_certificate(&tampered, &c.ca, AT).unwrap_err();
        assert!(matches!(err, AttestError::EkCertSignature { .. }), "{err}");
        // The EK public must be the certified key.
        let mut other = c.ek_public.clone();
        let n = other.len() - 1;
        other[n] ^= 1;
        assert!(matches!(
            ek_matches_certificate(&other, &cert),
            Err(AttestError::EkCertMismatch { .. })
        ));
        // Bundles.
        assert!(matches!(
            parse_ca_bundle(b"no pem here"),
            Err(AttestError::CaBundle { .. })
        ));
    }

    #[test]
    fn enrollment_challenge_shape_and_checks() {
        let c = captured();
        let (pending, challenge) = start_enrollment(
            &c.identity.ek_certificate,
            &c.ca,
            &c.ek_public,
            &c.identity.ak_public,
            AT,
        )
        .unwrap();
        // id object: TPM2B integrity HMAC (2 + 32) || encrypted TPM2B credential (2 + 32).
        assert_eq!(challenge.id_object.len(), 68);
        assert_eq!(challenge.id_object[..2], [0, 32]);
        assert_eq!(challenge.encrypted_secret.len(), 256);
        assert!(matches!(
            pending.finish(&[1; 32]),
            Err(AttestError::ActivationMismatch)
        ));

        let ek = TpmPublic::parse(&c.ek_public).unwrap();
        assert!(matches!(
            make_credential(&ek, &[0; 33], &[1; 32]),
            Err(AttestError::NameFormat { len: 33 })
        ));
        let name = TpmPublic::parse(&c.identity.ak_public).unwrap().name();
        assert!(matches!(
            make_credential(&ek, &name, &[1; 33]),
            Err(AttestError::CredentialLength { len: 33 })
        ));
        // Not an EK: an ECC key cannot be challenged.
        let ak = TpmPublic::parse(&c.identity.ak_public).unwrap();
        assert!(matches!(
            make_credential(&ak, &name, &[1; 32]),
            Err(AttestError::EkTemplate { .. })
        ));
        // An AK that is not restricted (the node key) is refused for enrollment.
        let err = start_enrollment(
            &c.identity.ek_certificate,
            &c.ca,
            &c.ek_public,
            &c.identity.node_key_public,
            AT,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                AttestError::KeyAttributes {
                    role: "attestation",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn kdfa_lengths_and_labels() {
        let a = kdfa_sha256(b"seed", "STORAGE", b"name", &[], 128);
        assert_eq!(a.len(), 16);
        let b = kdfa_sha256(b"seed", "INTEGRITY", &[], &[], 256);
        assert_eq!(b.len(), 32);
        // The first block is one HMAC over counter || label || 0 || contexts || bits.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"seed");
        let mut msg = Vec::new();
        msg.extend_from_slice(&1u32.to_be_bytes());
        msg.extend_from_slice(b"STORAGE\0name");
        msg.extend_from_slice(&128u32.to_be_bytes());
        assert_eq!(a, ring::hmac::sign(&key, &msg).as_ref()[..16]);
        assert_eq!(kdfa_sha256(b"seed", "X", &[], &[], 512).len(), 64);
    }
}
