//! ECDSA P-256 / SHA-256 keys (ring): the node signing key and the public keys verifiers trust.
//!
//! Formats are the ones every other tool speaks: private keys as unencrypted PKCS#8 (PEM label
//! `PRIVATE KEY`, what `openssl pkcs8 -topk8 -nocrypt` writes), public keys as X.509
//! `SubjectPublicKeyInfo` (PEM label `PUBLIC KEY`, what `openssl ec -pubout` writes), signatures as
//! ASN.1 DER `ECDSA-Sig-Value` (what `openssl dgst -sign` writes and most DSSE verifiers expect).
//! A key's id is `sha256:<hex>` of its `SubjectPublicKeyInfo` DER, the DSSE `keyid` kiln writes.
//!
//! PEM and the one DER structure we need are handled by hand: a P-256 `SubjectPublicKeyInfo` is a
//! fixed 26-byte prefix followed by the 65-byte uncompressed point, so no ASN.1 crate is needed.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};

use crate::digest::Digest;

/// PEM label of a PKCS#8 private key.
const PRIVATE_KEY_LABEL: &str = "PRIVATE KEY";
/// PEM label of a `SubjectPublicKeyInfo`.
const PUBLIC_KEY_LABEL: &str = "PUBLIC KEY";

/// DER of a P-256 `SubjectPublicKeyInfo` up to the point: SEQUENCE(89) { SEQUENCE(19) { OID
/// id-ecPublicKey, OID prime256v1 }, BIT STRING(66) with 0 unused bits }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// Length of an uncompressed P-256 point: 0x04 || X (32) || Y (32).
const POINT_LEN: usize = 65;
/// Dotted OID of id-ecPublicKey.
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// Dotted OID of prime256v1 (secp256r1, NIST P-256).
const OID_PRIME256V1: &str = "1.2.840.10045.3.1.7";

/// Errors loading, using or exporting keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// ring could not generate a key (the system random source failed).
    #[error("cannot generate an ecdsa p-256 key: the system random source failed")]
    Generate,
    /// ring rejected a PKCS#8 document (wrong algorithm or curve, encrypted, inconsistent).
    #[error("pkcs#8 document is not an unencrypted ecdsa p-256 private key: {reason}")]
    Pkcs8Rejected {
        /// ring's reason, e.g. `WrongAlgorithm`.
        reason: String,
    },
    /// No `-----BEGIN …-----` line at all.
    #[error("no pem block found: expected a line \"-----BEGIN {expected}-----\"")]
    PemMissingBegin {
        /// Label looked for.
        expected: &'static str,
    },
    /// A PEM block with another label, e.g. `EC PRIVATE KEY` (SEC1) instead of `PRIVATE KEY`.
    #[error("expected a pem block labelled {expected:?}, found {found:?}")]
    PemLabel {
        /// Label looked for.
        expected: &'static str,
        /// Label found.
        found: String,
    },
    /// The block is not closed by its `-----END …-----` line.
    #[error("pem block {label:?} has no \"-----END {label}-----\" line")]
    PemMissingEnd {
        /// Label of the unterminated block.
        label: &'static str,
    },
    /// The body of a PEM block is not base64.
    #[error("pem block {label:?} is not valid base64: {source}")]
    PemBase64 {
        /// Label of the block.
        label: &'static str,
        /// Decoder error.
        #[source]
        source: base64::DecodeError,
    },
    /// A `SubjectPublicKeyInfo` whose DER cannot be parsed.
    #[error("public key is not a der subjectpublickeyinfo: {reason}")]
    MalformedSpki {
        /// What was wrong.
        reason: &'static str,
    },
    /// A public key of another algorithm (RSA, Ed25519, …).
    #[error(
        "public key must be ecdsa p-256 (id-ecPublicKey {OID_EC_PUBLIC_KEY}), got algorithm {found}"
    )]
    UnsupportedAlgorithm {
        /// Name and dotted OID of the algorithm found.
        found: String,
    },
    /// An EC public key on another curve (P-384, secp256k1, …).
    #[error("ec public key must be on curve prime256v1 ({OID_PRIME256V1}), got curve {found}")]
    UnsupportedCurve {
        /// Name and dotted OID of the curve found.
        found: String,
    },
    /// The point is not a 65-byte uncompressed point.
    #[error(
        "p-256 public key must be an uncompressed point (65 bytes starting with 0x04), got {len} bytes starting with {first:#04x}"
    )]
    PointEncoding {
        /// Length of the point found.
        len: usize,
        /// Its first byte (0x02/0x03 = compressed), 0 if empty.
        first: u8,
    },
    /// ring failed to sign.
    #[error("ecdsa p-256 signing failed")]
    Sign,
    /// A signature that does not verify with the given key and message.
    #[error("signature does not verify with public key {keyid}")]
    BadSignature {
        /// Id of the key tried.
        keyid: String,
    },
}

/// Bytes of a PKCS#8 private key document. They are overwritten with zeros when dropped, so a
/// private key does not linger in freed heap memory. (Only this copy: ring's own key schedule is
/// out of our reach.)
pub struct Pkcs8Bytes(Vec<u8>);

impl Pkcs8Bytes {
    /// The DER bytes of the PKCS#8 document.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The document as PEM, label `PRIVATE KEY`. The returned string holds the key in the clear
    /// and is not wiped: write it out (mode 0600) and drop it.
    pub fn to_pem(&self) -> String {
        pem_encode(PRIVATE_KEY_LABEL, &self.0)
    }
}

impl AsRef<[u8]> for Pkcs8Bytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pkcs8Bytes {
    fn drop(&mut self) {
        // Wipe the whole allocation (spare capacity may hold an earlier copy of the secret).
        self.0.resize(self.0.capacity(), 0);
        self.0.fill(0);
        // black_box keeps the compiler from eliding the fill as a dead store before the free.
        std::hint::black_box(&mut self.0);
    }
}

impl fmt::Debug for Pkcs8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs8Bytes(<{} bytes redacted>)", self.0.len())
    }
}

/// An ECDSA P-256 / SHA-256 private key that produces DER signatures.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8: Pkcs8Bytes,
    rng: SystemRandom,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("keyid", &self.public_key().keyid())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh random key, and its PKCS#8 document for the caller to persist.
    pub fn generate() -> Result<(Self, Pkcs8Bytes), KeyError> {
        let rng = SystemRandom::new();
        let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| KeyError::Generate)?;
        let key = Self::from_pkcs8_der(document.as_ref())?;
        Ok((key, Pkcs8Bytes(document.as_ref().to_vec())))
    }

    /// Load an unencrypted PKCS#8 DER document holding a P-256 key (with its public key, as ring
    /// and OpenSSL write it).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng).map_err(
            |err| KeyError::Pkcs8Rejected {
                reason: err.to_string(),
            },
        )?;
        Ok(Self {
            pair,
            pkcs8: Pkcs8Bytes(der.to_vec()),
            rng,
        })
    }

    /// Load a PEM `PRIVATE KEY` (unencrypted PKCS#8) block. SEC1 `EC PRIVATE KEY` files are
    /// refused: convert them with `openssl pkcs8 -topk8 -nocrypt`.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        Self::from_pkcs8_der(pem_decode(pem, PRIVATE_KEY_LABEL)?.as_bytes())
    }

    /// The key as PEM `PRIVATE KEY` (see [`Pkcs8Bytes::to_pem`] about the returned string).
    pub fn to_pkcs8_pem(&self) -> String {
        self.pkcs8.to_pem()
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut spki_der = Vec::with_capacity(P256_SPKI_PREFIX.len() + POINT_LEN);
        spki_der.extend_from_slice(&P256_SPKI_PREFIX);
        // ring's P-256 public key is always the 65-byte uncompressed point.
        spki_der.extend_from_slice(self.pair.public_key().as_ref());
        PublicKey { spki_der }
    }

    /// Sign `msg` (hashed with SHA-256 inside); the signature is ASN.1 DER.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let sig = self.pair.sign(&self.rng, msg).map_err(|_| KeyError::Sign)?;
        Ok(sig.as_ref().to_vec())
    }
}

/// An ECDSA P-256 public key, held as its canonical `SubjectPublicKeyInfo` DER.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    /// Invariant: `P256_SPKI_PREFIX` followed by a 65-byte uncompressed point.
    spki_der: Vec<u8>,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PublicKey").field(&self.keyid()).finish()
    }
}

impl PublicKey {
    /// Parse a PEM `PUBLIC KEY` (`SubjectPublicKeyInfo`) block; only ECDSA P-256 is accepted, other
    /// algorithms and curves are refused with an error naming what was found.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        Self::from_spki_der(pem_decode(pem, PUBLIC_KEY_LABEL)?.as_bytes())
    }

    /// Parse a DER `SubjectPublicKeyInfo` (see [`PublicKey::from_pem`]).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let malformed = |reason| KeyError::MalformedSpki { reason };
        let (spki, trailing) = der_take(der, TAG_SEQUENCE).ok_or(malformed("not a sequence"))?;
        if !trailing.is_empty() {
            return Err(malformed("trailing bytes after the sequence"));
        }
        let (algorithm, rest) =
            der_take(spki, TAG_SEQUENCE).ok_or(malformed("no algorithm identifier"))?;
        let (bits, rest) = der_take(rest, TAG_BIT_STRING).ok_or(malformed("no bit string"))?;
        if !rest.is_empty() {
            return Err(malformed("trailing fields after the bit string"));
        }
        let (alg_oid, params) =
            der_take(algorithm, TAG_OID).ok_or(malformed("algorithm is not an oid"))?;
        let alg_oid = oid_to_dotted(alg_oid).ok_or(malformed("algorithm oid is malformed"))?;
        if alg_oid != OID_EC_PUBLIC_KEY {
            return Err(KeyError::UnsupportedAlgorithm {
                found: describe_oid(&alg_oid),
            });
        }
        let (curve_oid, rest) = der_take(params, TAG_OID)
            .ok_or(malformed("ec parameters are not a named curve oid"))?;
        if !rest.is_empty() {
            return Err(malformed("trailing fields after the curve oid"));
        }
        let curve_oid = oid_to_dotted(curve_oid).ok_or(malformed("curve oid is malformed"))?;
        if curve_oid != OID_PRIME256V1 {
            return Err(KeyError::UnsupportedCurve {
                found: describe_oid(&curve_oid),
            });
        }
        let point = bits
            .strip_prefix(&[0])
            .ok_or(malformed("bit string has unused bits"))?;
        Self::from_point(point)
    }

    /// From the raw uncompressed point `0x04 || X || Y` (as a TPM or ring hands it out).
    pub fn from_uncompressed_point(point: &[u8; 65]) -> Result<Self, KeyError> {
        Self::from_point(point)
    }

    fn from_point(point: &[u8]) -> Result<Self, KeyError> {
        if point.len() != POINT_LEN || point[0] != 0x04 {
            return Err(KeyError::PointEncoding {
                len: point.len(),
                first: point.first().copied().unwrap_or(0),
            });
        }
        let mut spki_der = Vec::with_capacity(P256_SPKI_PREFIX.len() + POINT_LEN);
        spki_der.extend_from_slice(&P256_SPKI_PREFIX);
        spki_der.extend_from_slice(point);
        Ok(Self { spki_der })
    }

    /// The `SubjectPublicKeyInfo` DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The key as PEM `PUBLIC KEY`, readable by `openssl pkey -pubin`.
    pub fn to_pem(&self) -> String {
        pem_encode(PUBLIC_KEY_LABEL, &self.spki_der)
    }

    /// `sha256:<hex>` of the `SubjectPublicKeyInfo` DER: the DSSE keyid kiln writes.
    pub fn keyid(&self) -> String {
        Digest::of(&self.spki_der).to_string()
    }

    /// Verify a DER ECDSA P-256 / SHA-256 signature over `msg`. A point that is not on the curve
    /// fails here like a wrong signature.
    pub fn verify(&self, msg: &[u8], der_sig: &[u8]) -> Result<(), KeyError> {
        let point = &self.spki_der[P256_SPKI_PREFIX.len()..];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(msg, der_sig)
            .map_err(|_| KeyError::BadSignature {
                keyid: self.keyid(),
            })
    }
}

/// PEM with the body wrapped at 64 columns (RFC 7468 strict form).
fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = String::with_capacity(body.len() + body.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // base64 output is ASCII, so splitting bytes at any index yields valid UTF-8 chunks.
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Decoded body of the first PEM block in `pem`, which must carry `label` (explanatory text
/// before it is skipped). Both the base64 text and the DER live in wiped buffers, since the block
/// may hold a private key.
fn pem_decode(pem: &str, label: &'static str) -> Result<Pkcs8Bytes, KeyError> {
    let mut lines = pem.lines().map(str::trim);
    let found = lines
        .by_ref()
        .find_map(|line| line.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or(KeyError::PemMissingBegin { expected: label })?;
    if found != label {
        return Err(KeyError::PemLabel {
            expected: label,
            found: found.to_owned(),
        });
    }
    let end = format!("-----END {label}-----");
    let mut body = Pkcs8Bytes(Vec::with_capacity(pem.len()));
    let mut closed = false;
    for line in lines {
        if line == end {
            closed = true;
            break;
        }
        body.0.extend_from_slice(line.as_bytes());
    }
    if !closed {
        return Err(KeyError::PemMissingEnd { label });
    }
    // Reserve the decoder's own estimate up front so it never reallocates (a reallocation would
    // free an unwiped copy).
    let mut der = Pkcs8Bytes(Vec::with_capacity(base64::decoded_len_estimate(
        body.0.len(),
    )));
    STANDARD
        .decode_vec(&body.0, &mut der.0)
        .map_err(|source| KeyError::PemBase64 { label, source })?;
    Ok(der)
}

const TAG_SEQUENCE: u8 = 0x30;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;

/// Split one DER TLV with `tag` off the front of `input`: (contents, rest). Definite lengths up to
/// 2 length bytes, which covers every key structure here.
fn der_take(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = match len0 {
        0..=0x7f => (usize::from(len0), rest),
        0x81 => {
            let (&b, rest) = rest.split_first()?;
            (usize::from(b), rest)
        }
        0x82 => {
            let (bytes, rest) = rest.split_at_checked(2)?;
            (usize::from(u16::from_be_bytes([bytes[0], bytes[1]])), rest)
        }
        _ => return None,
    };
    rest.split_at_checked(len)
}

/// Dotted-decimal form of DER OID contents.
fn oid_to_dotted(contents: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for (i, &b) in contents.iter().enumerate() {
        value = value.checked_mul(128)?.checked_add(u64::from(b & 0x7f))?;
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        } else if i + 1 == contents.len() {
            return None;
        }
    }
    if arcs.is_empty() {
        return None;
    }
    Some(
        arcs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// `name (oid)` for the OIDs people will actually feed us, else the bare OID.
fn describe_oid(dotted: &str) -> String {
    let name = match dotted {
        "1.2.840.113549.1.1.1" => "rsaEncryption",
        "1.3.101.112" => "Ed25519",
        "1.3.101.113" => "Ed448",
        "1.3.101.110" => "X25519",
        "1.2.840.10040.4.1" => "dsa",
        OID_EC_PUBLIC_KEY => "id-ecPublicKey",
        OID_PRIME256V1 => "prime256v1",
        "1.3.132.0.34" => "secp384r1",
        "1.3.132.0.35" => "secp521r1",
        "1.3.132.0.10" => "secp256k1",
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1",
        _ => return dotted.to_owned(),
    };
    format!("{name} ({dotted})")
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Command, Stdio};

    use super::*;

    /// Run openssl with `args`, feeding `stdin`; `None` (with a printed reason) when openssl is
    /// not installed outside CI. Under `CI=true` a missing openssl fails the test.
    fn openssl(args: &[&str], stdin: &[u8]) -> Option<Vec<u8>> {
        use std::io::Write as _;
        let child = Command::new("openssl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(err) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping openssl interop: cannot run openssl: {err}");
                return None;
            }
            Err(err) => panic!("openssl is required under CI=true: {err}"),
        };
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(out.stdout)
    }

    fn path(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn generate_sign_verify_and_pem_round_trips() {
        let (key, pkcs8) = SigningKey::generate().unwrap();
        let public = key.public_key();
        let sig = key.sign(b"hello").unwrap();
        public.verify(b"hello", &sig).unwrap();
        assert!(matches!(
            public.verify(b"hellO", &sig),
            Err(KeyError::BadSignature { keyid }) if keyid == public.keyid()
        ));

        let reloaded = SigningKey::from_pkcs8_pem(&key.to_pkcs8_pem()).unwrap();
        assert_eq!(reloaded.public_key(), public);
        assert_eq!(
            SigningKey::from_pkcs8_der(pkcs8.as_bytes())
                .unwrap()
                .public_key(),
            public
        );
        assert_eq!(PublicKey::from_pem(&public.to_pem()).unwrap(), public);
        assert_eq!(PublicKey::from_spki_der(public.spki_der()).unwrap(), public);

        let pem = public.to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(public.keyid(), Digest::of(public.spki_der()).to_string());
        assert!(format!("{key:?} {pkcs8:?}").contains("redacted"));
    }

    #[test]
    fn uncompressed_point_and_bad_encodings() {
        let (key, _) = SigningKey::generate().unwrap();
        let spki = key.public_key().spki_der().to_vec();
        let point: [u8; 65] = spki[26..].try_into().unwrap();
        assert_eq!(
            PublicKey::from_uncompressed_point(&point).unwrap(),
            key.public_key()
        );
        let mut compressed = point;
        compressed[0] = 0x02;
        let err = PublicKey::from_uncompressed_point(&compressed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p-256 public key must be an uncompressed point (65 bytes starting with 0x04), got 65 bytes starting with 0x02"
        );
        assert!(matches!(
            PublicKey::from_spki_der(&spki[..80]),
            Err(KeyError::MalformedSpki { .. })
        ));
        assert!(matches!(
            PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA"),
            Err(KeyError::PemMissingEnd { .. })
        ));
        assert!(matches!(
            PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----"),
            Err(KeyError::PemBase64 { .. })
        ));
        assert!(matches!(
            PublicKey::from_pem("nothing"),
            Err(KeyError::PemMissingBegin { .. })
        ));
        assert!(matches!(
            SigningKey::from_pkcs8_der(&[1, 2, 3]),
            Err(KeyError::Pkcs8Rejected { .. })
        ));
    }

    #[test]
    fn oid_rendering() {
        assert_eq!(
            oid_to_dotted(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]).unwrap(),
            OID_EC_PUBLIC_KEY
        );
        assert_eq!(oid_to_dotted(&[0x2b, 0x65, 0x70]).unwrap(), "1.3.101.112");
        assert_eq!(oid_to_dotted(&[0x2a, 0x86]), None);
    }

    #[test]
    fn interop_openssl_key_and_signature_verify_with_our_public_key() {
        let Some(sec1) = openssl(
            &["ecparam", "-genkey", "-name", "prime256v1", "-noout"],
            b"",
        ) else {
            return;
        };
        let pkcs8_pem = openssl(&["pkcs8", "-topk8", "-nocrypt"], &sec1)
            .and_then(|p| String::from_utf8(p).ok());
        let pkcs8_pem = pkcs8_pem.unwrap();
        let ours = SigningKey::from_pkcs8_pem(&pkcs8_pem).unwrap();

        // SEC1 "EC PRIVATE KEY" is refused with the label named.
        let err = SigningKey::from_pkcs8_pem(std::str::from_utf8(&sec1).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected a pem block labelled \"PRIVATE KEY\", found \"EC PRIVATE KEY\""
        );

        let pub_pem = openssl(&["ec", "-pubout"], &sec1).unwrap();
        let public = PublicKey::from_pem(std::str::from_utf8(&pub_pem).unwrap()).unwrap();
        assert_eq!(public, ours.public_key());
        // Our PEM is byte-identical to OpenSSL's.
        assert_eq!(public.to_pem().as_bytes(), pub_pem.as_slice());

        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key.pem");
        std::fs::write(&key_file, &pkcs8_pem).unwrap();
        let msg = b"kiln interop message";
        let sig = openssl(&["dgst", "-sha256", "-sign", path(&key_file)], msg).unwrap();
        public.verify(msg, &sig).unwrap();
        assert!(public.verify(b"other message", &sig).is_err());
    }

    #[test]
    fn interop_openssl_verifies_our_signature_with_our_pem() {
        let (key, _) = SigningKey::generate().unwrap();
        let msg = b"signed by kiln, checked by openssl";
        let sig = key.sign(msg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pub_file = dir.path().join("pub.pem");
        let sig_file = dir.path().join("sig.der");
        std::fs::write(&pub_file, key.public_key().to_pem()).unwrap();
        std::fs::write(&sig_file, &sig).unwrap();
        let Some(out) = openssl(
            &[
                "dgst",
                "-sha256",
                "-verify",
                path(&pub_file),
                "-signature",
                path(&sig_file),
            ],
            msg,
        ) else {
            return;
        };
        assert_eq!(String::from_utf8(out).unwrap().trim(), "Verified OK");

        // And OpenSSL reads our private key PEM back to the same public key.
        let key_file = dir.path().join("key.pem");
        std::fs::write(&key_file, key.to_pkcs8_pem()).unwrap();
        let pub_from_priv = openssl(&["pkey", "-in", path(&key_file), "-pubout"], b"").unwrap();
        assert_eq!(pub_from_priv, key.public_key().to_pem().into_bytes());
    }

    #[test]
    fn interop_other_algorithms_and_curves_are_named() {
        let Some(p384) = openssl(&["ecparam", "-genkey", "-name", "secp384r1", "-noout"], b"")
        else {
            return;
        };
        let pem = openssl(&["ec", "-pubout"], &p384).unwrap();
        let err = PublicKey::from_pem(std::str::from_utf8(&pem).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ec public key must be on curve prime256v1 (1.2.840.10045.3.1.7), got curve secp384r1 (1.3.132.0.34)"
        );

        let ed = openssl(&["genpkey", "-algorithm", "ed25519"], b"").unwrap();
        let pem = openssl(&["pkey", "-pubout"], &ed).unwrap();
        let err = PublicKey::from_pem(std::str::from_utf8(&pem).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "public key must be ecdsa p-256 (id-ecPublicKey 1.2.840.10045.2.1), got algorithm Ed25519 (1.3.101.112)"
        );
        // ring refuses a P-384 PKCS#8 document.
        let p384_pkcs8 = openssl(&["pkcs8", "-topk8", "-nocrypt"], &p384).unwrap();
        assert!(matches!(
            SigningKey::from_pkcs8_pem(std::str::from_utf8(&p384_pkcs8).unwrap()),
            Err(KeyError::Pkcs8Rejected { .. })
        ));
    }
}
