//! Signed pipeline definitions: a DSSE envelope over a pipeline file's exact bytes.
//!
//! `kiln pipeline sign FILE --key KEY.pem` writes `FILE.dsse`: payload = the file, byte for byte,
//! payload type [`PIPELINE_PAYLOAD_TYPE`], one ECDSA P-256 signature (keyid = the signer's
//! [`PublicKey::keyid`]). kilnd's job admission accepts the definition only if the envelope verifies
//! with a signer the policy allows for the pipeline's name **and** its payload is exactly the
//! submitted text, so a file edited after signing is refused even though its signature is valid.

use crate::digest::Digest;
use crate::dsse::{DsseError, Envelope};
use crate::keys::{PublicKey, SigningKey};

/// DSSE payload type of a signed pipeline file (TOML).
pub const PIPELINE_PAYLOAD_TYPE: &str = "application/vnd.kiln.pipeline+toml";

/// File name suffix of the envelope next to a pipeline file (`pipeline.toml.dsse`).
pub const SIGNATURE_SUFFIX: &str = "dsse";

/// Why a signed definition was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The envelope is not signed by an allowed key, or its signature does not verify.
    #[error("pipeline signature: {0}")]
    Signature(#[source] DsseError),
    /// The envelope signs something else than a pipeline file.
    #[error("pipeline signature has payload type {found:?}, expected {PIPELINE_PAYLOAD_TYPE:?}")]
    PayloadType {
        /// Payload type found.
        found: String,
    },
    /// The signature is valid but for other bytes than the submitted file.
    #[error(
        "pipeline file was modified after it was signed: the signature covers {signed}, the submitted file is {submitted}"
    )]
    Modified {
        /// sha256 of the signed payload.
        signed: Digest,
        /// sha256 of the submitted file.
        submitted: Digest,
    },
}

/// Sign `text` (the exact bytes of a pipeline file) with `key`.
pub fn sign(text: &[u8], key: &SigningKey) -> Result<Envelope, DsseError> {
    Envelope::sign(PIPELINE_PAYLOAD_TYPE, text, key)
}

/// Verify that `envelope` is a pipeline signature by one of `allowed` over exactly `text`;
/// returns the keyid of the signer.
pub fn verify(
    envelope: &Envelope,
    text: &[u8],
    allowed: &[PublicKey],
) -> Result<String, DefinitionError> {
    let verified = envelope
        .verify(allowed)
        .map_err(DefinitionError::Signature)?;
    if verified.payload_type != PIPELINE_PAYLOAD_TYPE {
        return Err(DefinitionError::PayloadType {
            found: verified.payload_type,
        });
    }
    if verified.payload != text {
        return Err(DefinitionError::Modified {
            signed: Digest::of(&verified.payload),
            submitted: Digest::of(text),
        });
    }
    Ok(verified.keyid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate().unwrap().0
    }

    #[test]
    fn signed_definition_verifies_and_names_its_signer() {
        let signer = key();
        let text = b"version = 1\nname = \"hello\"\n";
        let env = sign(text, &signer).unwrap();
        assert_eq!(env.payload_type, PIPELINE_PAYLOAD_TYPE);
        let keyid = verify(&env, text, &[signer.public_key()]).unwrap();
        assert_eq!(keyid, signer.public_key().keyid());
    }

    #[test]
    fn other_key_modified_file_and_payload_type_are_refused() {
        let signer = key();
        let text = b"version = 1\nname = \"hello\"\n";
        let env = sign(text, &signer).unwrap();
        let err = verify(&env, text, &[key().public_key()]).unwrap_err();
        assert!(
            err.to_string().contains("no signature from a trusted key"),
            "{err}"
        );
        let err = verify(
            &env,
            b"version = 1\nname = \"evil\"\n",
            &[signer.public_key()],
        )
        .unwrap_err();
        assert!(matches!(err, DefinitionError::Modified { .. }), "{err}");
        assert!(err.to_string().contains("modified after it was signed"));
        let other = Envelope::sign("application/vnd.in-toto+json", text, &signer).unwrap();
        let err = verify(&other, text, &[signer.public_key()]).unwrap_err();
        assert!(matches!(err, DefinitionError::PayloadType { .. }), "{err}");
    }
}
