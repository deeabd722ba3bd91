//! DSSE v1 envelopes (<https://github.com/secure-systems-lab/dsse>): signing, verification, and
//! the one digest by which the job statement names a step's envelope.
//!
//! The signature covers `PAE(payloadType, payload)`, never the JSON, so the payload type is
//! authenticated and the JSON around it may be re-serialized. kiln writes standard base64 and DER
//! ECDSA signatures, and `keyid` = [`PublicKey::keyid`]; as the spec demands, verification accepts
//! standard or URL-safe base64 (padded or not), and treats `keyid` only as a hint to pick the key.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::intoto::{PAYLOAD_TYPE, STATEMENT_TYPE, Statement};
use crate::keys::{KeyError, PublicKey, SigningKey};

/// A DSSE JSON envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// What the payload is, e.g. [`PAYLOAD_TYPE`] for in-toto statements; authenticated.
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// The serialized body, base64 (kiln writes the standard alphabet with padding).
    pub payload: String,
    /// Signatures over `PAE(payloadType, payload bytes)`.
    pub signatures: Vec<Signature>,
}

/// One signature of an [`Envelope`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Unauthenticated hint naming the key (`sha256:<hex>` of its SPKI for kiln); may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub keyid: String,
    /// The signature, base64 of an ASN.1 DER ECDSA signature.
    pub sig: String,
}

/// The payload of an envelope that verified, and which trusted key verified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPayload {
    /// The envelope's (authenticated) payload type.
    pub payload_type: String,
    /// The decoded payload bytes.
    pub payload: Vec<u8>,
    /// [`PublicKey::keyid`] of the trusted key whose signature verified.
    pub keyid: String,
}

/// Errors signing, verifying or decoding envelopes.
#[derive(Debug, thiserror::Error)]
pub enum DsseError {
    /// The envelope carries no signature at all.
    #[error("dsse envelope has no signatures")]
    NoSignatures,
    /// The `payload` field is not base64.
    #[error("dsse envelope payload is not valid base64: {source}")]
    PayloadBase64 {
        /// Decoder error.
        #[source]
        source: base64::DecodeError,
    },
    /// A signature from a trusted key is not base64.
    #[error("dsse signature by {keyid} is not valid base64: {source}")]
    SignatureBase64 {
        /// The signature's keyid (may be empty).
        keyid: String,
        /// Decoder error.
        #[source]
        source: base64::DecodeError,
    },
    /// No signature names (or, without a keyid, is verified by) a trusted key.
    #[error("no signature from a trusted key: envelope signed by {}", describe_keyids(.keyids))]
    UntrustedSigner {
        /// The keyids of every signature in the envelope.
        keyids: Vec<String>,
    },
    /// A signature names a trusted key but does not verify: payload or type were changed.
    #[error("signature by {keyid} does not verify: envelope or payload was modified")]
    BadSignature {
        /// The trusted key's id.
        keyid: String,
    },
    /// The envelope carries another payload type than the one expected.
    #[error("dsse payload type must be {expected:?}, got {found:?}")]
    WrongPayloadType {
        /// Expected payload type.
        expected: &'static str,
        /// Payload type found.
        found: String,
    },
    /// The payload is not JSON of the expected statement shape.
    #[error("dsse payload is not a valid in-toto statement: {0}")]
    Statement(#[source] serde_json::Error),
    /// The statement's `_type` is not in-toto Statement v1.
    #[error("in-toto statement _type must be {STATEMENT_TYPE:?}, got {found:?}")]
    StatementType {
        /// `_type` found.
        found: String,
    },
    /// Signing failed.
    #[error("cannot sign dsse envelope: {0}")]
    Sign(#[source] KeyError),
}

fn describe_keyids(keyids: &[String]) -> String {
    let named: Vec<&str> = keyids
        .iter()
        .map(|k| {
            if k.is_empty() {
                "<no keyid>"
            } else {
                k.as_str()
            }
        })
        .collect();
    named.join(", ")
}

/// DSSE v1 Pre-Authentication Encoding: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`,
/// lengths in decimal ASCII without leading zeros.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let type_len = payload_type.len().to_string();
    let body_len = payload.len().to_string();
    let mut out = Vec::with_capacity(
        10 + type_len.len() + payload_type.len() + body_len.len() + payload.len(),
    );
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(type_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// The envelope's content address: sha256 of [`Envelope::to_json_bytes`]. The job statement
/// lists step envelopes by this digest, and the daemon stores exactly those bytes.
pub fn envelope_digest(envelope: &Envelope) -> Digest {
    Digest::of(&envelope.to_json_bytes())
}

impl Envelope {
    /// Sign `payload` as `payload_type` with `key`: one signature, keyid = the key's id.
    pub fn sign(payload_type: &str, payload: &[u8], key: &SigningKey) -> Result<Self, DsseError> {
        let sig = key
            .sign(&pae(payload_type, payload))
            .map_err(DsseError::Sign)?;
        Ok(Self {
            payload_type: payload_type.to_owned(),
            payload: STANDARD.encode(payload),
            signatures: vec![Signature {
                keyid: key.public_key().keyid(),
                sig: STANDARD.encode(sig),
            }],
        })
    }

    /// Verify that at least one signature is by one of the `trusted` keys, and return the
    /// payload. A signature counts when its keyid names a trusted key that verifies it, or, when
    /// its keyid is empty, when any trusted key verifies it. Signatures by unknown keys are
    /// skipped, as the DSSE multi-signature rules prescribe.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<VerifiedPayload, DsseError> {
        if self.signatures.is_empty() {
            return Err(DsseError::NoSignatures);
        }
        let payload = self.payload_bytes()?;
        let message = pae(&self.payload_type, &payload);
        let mut failed_keyid = None;
        for signature in &self.signatures {
            let candidates: Vec<(&PublicKey, String)> = trusted
                .iter()
                .map(|key| (key, key.keyid()))
                .filter(|(_, id)| signature.keyid.is_empty() || *id == signature.keyid)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let der =
                decode_base64(&signature.sig).map_err(|source| DsseError::SignatureBase64 {
                    keyid: signature.keyid.clone(),
                    source,
                })?;
            if let Some((_, keyid)) = candidates
                .into_iter()
                .find(|(key, _)| key.verify(&message, &der).is_ok())
            {
                return Ok(VerifiedPayload {
                    payload_type: self.payload_type.clone(),
                    payload,
                    keyid,
                });
            }
            // An empty keyid that no trusted key verifies is indistinguishable from a foreign
            // signer; only a named trusted key that fails proves modification.
            if !signature.keyid.is_empty() && failed_keyid.is_none() {
                failed_keyid = Some(signature.keyid.clone());
            }
        }
        Err(match failed_keyid {
            Some(keyid) => DsseError::BadSignature { keyid },
            None => DsseError::UntrustedSigner {
                keyids: self.signatures.iter().map(|s| s.keyid.clone()).collect(),
            },
        })
    }

    /// Decode the payload as an in-toto Statement v1, checking the payload type and `_type`.
    /// This does **not** verify any signature: for anything trusted, use [`Envelope::verify`]
    /// then [`VerifiedPayload::decode_statement`].
    pub fn decode_statement<P: DeserializeOwned>(&self) -> Result<Statement<P>, DsseError> {
        decode_statement(&self.payload_type, &self.payload_bytes()?)
    }

    /// The canonical JSON bytes of this envelope (serde field order, no whitespace): what the
    /// store keeps and [`envelope_digest`] hashes.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        #[expect(
            clippy::expect_used,
            reason = "serializing a struct of strings into a Vec cannot fail"
        )]
        let bytes = serde_json::to_vec(self).expect("envelope serializes");
        bytes
    }

    fn payload_bytes(&self) -> Result<Vec<u8>, DsseError> {
        decode_base64(&self.payload).map_err(|source| DsseError::PayloadBase64 { source })
    }
}

impl VerifiedPayload {
    /// Decode the verified payload as an in-toto Statement v1, checking the payload type and
    /// `_type`.
    pub fn decode_statement<P: DeserializeOwned>(&self) -> Result<Statement<P>, DsseError> {
        decode_statement(&self.payload_type, &self.payload)
    }
}

fn decode_statement<P: DeserializeOwned>(
    payload_type: &str,
    payload: &[u8],
) -> Result<Statement<P>, DsseError> {
    /// Only `_type`, read first so a foreign statement is named as such rather than as a
    /// missing-field error.
    #[derive(Deserialize)]
    struct TypeOnly {
        #[serde(rename = "_type")]
        statement_type: String,
    }
    if payload_type != PAYLOAD_TYPE {
        return Err(DsseError::WrongPayloadType {
            expected: PAYLOAD_TYPE,
            found: payload_type.to_owned(),
        });
    }
    let head: TypeOnly = serde_json::from_slice(payload).map_err(DsseError::Statement)?;
    if head.statement_type != STATEMENT_TYPE {
        return Err(DsseError::StatementType {
            found: head.statement_type,
        });
    }
    serde_json::from_slice(payload).map_err(DsseError::Statement)
}

/// Lenient decoders: DSSE verifiers must accept standard and URL-safe base64; padding optional.
const STANDARD_ANY_PAD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const URL_SAFE_ANY_PAD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    if text.contains(['-', '_']) {
        URL_SAFE_ANY_PAD.decode(text)
    } else {
        STANDARD_ANY_PAD.decode(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intoto::{JobPredicate, ResourceDescriptor};

    /// The published DSSE test vector (protocol.md, "Test Vectors").
    const VECTOR_TYPE: &str = "http://example.com/HelloWorld";
    const VECTOR_ENVELOPE: &str = r#"{"payload": "aGVsbG8gd29ybGQ=",
 "payloadType": "http://example.com/HelloWorld",
 "signatures": [{"sig": "A3JqsQGtVsJ2O2xqrI5IcnXip5GToJ3F+FnZ+O88SjtR6rDAajabZKciJTfUiHqJPcIAriEGAHTVeCUjW2JIZA=="}]}"#;
    const VECTOR_X: &str =
        "46950820868899156662930047687818585632848591499744589407958293238635476079160";
    const VECTOR_Y: &str =
        "5640078356564379163099075877009565129882514886557779369047442380624545832820";

    /// A decimal integer < 2^256 as 32 big-endian bytes.
    fn decimal_to_be32(decimal: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for digit in decimal.bytes() {
            let mut carry = u32::from(digit - b'0');
            for byte in out.iter_mut().rev() {
                let v = u32::from(*byte) * 10 + carry;
                *byte = (v & 0xff) as u8;
                carry = v >> 8;
            }
            assert_eq!(carry, 0);
        }
        out
    }

    /// Raw `r || s` (what the vector's Cryptodome signer wrote) as a DER ECDSA-Sig-Value.
    fn raw_to_der(raw: &[u8]) -> Vec<u8> {
        let int = |bytes: &[u8]| {
            let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
            let mut v = vec![0x02];
            if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
                v.push(u8::try_from(trimmed.len() + 1).unwrap());
                v.push(0);
            } else {
                v.push(u8::try_from(trimmed.len()).unwrap());
            }
            v.extend(trimmed);
            v
        };
        let body = [int(&raw[..32]), int(&raw[32..])].concat();
        [vec![0x30, u8::try_from(body.len()).unwrap()], body].concat()
    }

    fn statement_json() -> Vec<u8> {
        let statement = Statement {
            statement_type: STATEMENT_TYPE.to_owned(),
            subject: vec![ResourceDescriptor {
                name: Some("a".into()),
                uri: None,
                digest: crate::intoto::digest_set(&Digest::of(b"a")),
                media_type: None,
            }],
            predicate_type: "urn:test".to_owned(),
            predicate: serde_json::json!({"k": 1}),
        };
        serde_json::to_vec(&statement).unwrap()
    }

    #[test]
    fn pae_matches_spec_vector() {
        assert_eq!(
            pae(VECTOR_TYPE, b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    #[test]
    fn spec_vector_signature_verifies() {
        let mut point = [0u8; 65];
        point[0] = 0x04;
        point[1..33].copy_from_slice(&decimal_to_be32(VECTOR_X));
        point[33..].copy_from_slice(&decimal_to_be32(VECTOR_Y));
        let key = PublicKey::from_uncompressed_point(&point).unwrap();

        let mut envelope: Envelope = serde_json::from_str(VECTOR_ENVELOPE).unwrap();
        assert_eq!(envelope.signatures[0].keyid, "");
        let raw = decode_base64(&envelope.signatures[0].sig).unwrap();
        envelope.signatures[0].sig = STANDARD.encode(raw_to_der(&raw));
        let verified = envelope.verify(std::slice::from_ref(&key)).unwrap();
        assert_eq!(verified.payload, b"hello world");
        assert_eq!(verified.keyid, key.keyid());

        // Without a keyid, a key that does not verify is "untrusted", not "modified".
        let (other, _) = SigningKey::generate().unwrap();
        let err = envelope.verify(&[other.public_key()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no signature from a trusted key: envelope signed by <no keyid>"
        );
    }

    #[test]
    fn round_trip_and_statement_decoding() {
        let (key, _) = SigningKey::generate().unwrap();
        let payload = statement_json();
        let envelope = Envelope::sign(PAYLOAD_TYPE, &payload, &key).unwrap();
        assert_eq!(envelope.signatures.len(), 1);
        assert_eq!(envelope.signatures[0].keyid, key.public_key().keyid());

        let json = envelope.to_json_bytes();
        let text = std::str::from_utf8(&json).unwrap();
        assert!(text.starts_with(r#"{"payloadType":"application/vnd.in-toto+json","payload":""#));
        let parsed: Envelope = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed, envelope);
        assert_eq!(envelope_digest(&parsed), Digest::of(&json));

        let verified = parsed.verify(&[key.public_key()]).unwrap();
        assert_eq!(verified.payload, payload);
        let statement: Statement<serde_json::Value> = verified.decode_statement().unwrap();
        assert_eq!(statement.predicate_type, "urn:test");
        assert_eq!(
            parsed.decode_statement::<serde_json::Value>().unwrap(),
            statement
        );

        // URL-safe, unpadded encodings of the same bytes are accepted.
        let mut url_safe = envelope.clone();
        url_safe.payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&payload);
        url_safe.signatures[0].sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(STANDARD.decode(&envelope.signatures[0].sig).unwrap());
        url_safe.verify(&[key.public_key()]).unwrap();
    }

    #[test]
    fn flipped_payload_byte_is_bad_signature() {
        let (key, _) = SigningKey::generate().unwrap();
        let mut envelope = Envelope::sign(PAYLOAD_TYPE, &statement_json(), &key).unwrap();
        let mut payload = STANDARD.decode(&envelope.payload).unwrap();
        payload[10] ^= 0x01;
        envelope.payload = STANDARD.encode(&payload);
        let err = envelope.verify(&[key.public_key()]).unwrap_err();
        assert!(
            matches!(&err, DsseError::BadSignature { keyid } if *keyid == key.public_key().keyid())
        );
        assert_eq!(
            err.to_string(),
            format!(
                "signature by {} does not verify: envelope or payload was modified",
                key.public_key().keyid()
            )
        );

        // The payload type is authenticated too.
        let mut retyped = Envelope::sign(PAYLOAD_TYPE, &statement_json(), &key).unwrap();
        retyped.payload_type = "application/json".into();
        assert!(matches!(
            retyped.verify(&[key.public_key()]),
            Err(DsseError::BadSignature { .. })
        ));
    }

    #[test]
    fn other_key_is_untrusted_signer() {
        let (key, _) = SigningKey::generate().unwrap();
        let (other, _) = SigningKey::generate().unwrap();
        let envelope = Envelope::sign(PAYLOAD_TYPE, &statement_json(), &key).unwrap();
        let err = envelope.verify(&[other.public_key()]).unwrap_err();
        assert!(
            matches!(&err, DsseError::UntrustedSigner { keyids } if *keyids == [key.public_key().keyid()])
        );
        assert_eq!(
            err.to_string(),
            format!(
                "no signature from a trusted key: envelope signed by {}",
                key.public_key().keyid()
            )
        );
        // A second, trusted signature makes it verify.
        let mut both = envelope.clone();
        both.signatures.extend(
            Envelope::sign(PAYLOAD_TYPE, &statement_json(), &other)
                .unwrap()
                .signatures,
        );
        assert_eq!(
            both.verify(&[other.public_key()]).unwrap().keyid,
            other.public_key().keyid()
        );
        assert!(matches!(
            envelope.verify(&[]),
            Err(DsseError::UntrustedSigner { .. })
        ));
    }

    #[test]
    fn malformed_envelopes_are_named() {
        let (key, _) = SigningKey::generate().unwrap();
        let good = Envelope::sign(PAYLOAD_TYPE, &statement_json(), &key).unwrap();
        let trusted = [key.public_key()];

        let mut unsigned = good.clone();
        unsigned.signatures.clear();
        assert_eq!(
            unsigned.verify(&trusted).unwrap_err().to_string(),
            "dsse envelope has no signatures"
        );

        let mut bad_payload = good.clone();
        bad_payload.payload = "not base64!".into();
        assert!(matches!(
            bad_payload.verify(&trusted),
            Err(DsseError::PayloadBase64 { .. })
        ));

        let mut bad_sig = good.clone();
        bad_sig.signatures[0].sig = "%%%".into();
        assert!(matches!(
            bad_sig.verify(&trusted),
            Err(DsseError::SignatureBase64 { .. })
        ));

        let other_type = Envelope::sign("application/json", &statement_json(), &key).unwrap();
        let verified = other_type.verify(&trusted).unwrap();
        assert_eq!(
            verified
                .decode_statement::<serde_json::Value>()
                .unwrap_err()
                .to_string(),
            "dsse payload type must be \"application/vnd.in-toto+json\", got \"application/json\""
        );

        let v02 = br#"{"_type":"https://in-toto.io/Statement/v0.1","subject":[],"predicateType":"x","predicate":{}}"#;
        let old = Envelope::sign(PAYLOAD_TYPE, v02, &key).unwrap();
        assert!(matches!(
            old.decode_statement::<serde_json::Value>(),
            Err(DsseError::StatementType { found }) if found == "https://in-toto.io/Statement/v0.1"
        ));
        // Right _type, wrong predicate shape.
        assert!(matches!(
            good.decode_statement::<JobPredicate>(),
            Err(DsseError::Statement(_))
        ));
    }
}
