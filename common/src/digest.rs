//! SHA-256 digests: the one content-address type used by the store, provenance and verification.
//!
//! Textual form is `sha256:<64 lowercase hex>`, as in OCI and in-toto `DigestSet` values (where the
//! map key carries the algorithm and the value is the bare hex).

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// A string that is not a `sha256:<hex>` digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestParseError {
    /// The string does not start with `sha256:`.
    #[error("digest must start with \"sha256:\", got {0:?}")]
    Algorithm(String),
    /// The hex part is not 64 lowercase hex characters.
    #[error("digest must be sha256: followed by 64 lowercase hex characters, got {0:?}")]
    Hex(String),
}

impl Digest {
    /// Digest of a byte string.
    pub fn of(bytes: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    /// Digest of everything a reader yields.
    pub fn of_reader(mut reader: impl Read) -> std::io::Result<Self> {
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher.finish())
    }

    /// From raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Bare lowercase hex (the value of an in-toto `DigestSet` entry `"sha256"`).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse bare 64-character lowercase hex.
    pub fn from_hex(s: &str) -> Result<Self, DigestParseError> {
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestParseError::Hex(s.to_owned()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestParseError::Hex(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestParseError::Algorithm(s.to_owned()))?;
        Self::from_hex(hex_part)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental SHA-256.
pub struct Hasher(ring::digest::Context);

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher(sha256)")
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }
    /// Feed bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// Final digest.
    pub fn finish(self) -> Digest {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Digest(out)
    }
}

/// One regular file of a workspace: its normalized relative path and content digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Path relative to the workspace root, `/`-separated, no `.`/`..`/empty components.
    pub path: String,
    /// SHA-256 of the file's content.
    pub digest: Digest,
}

/// The digest of a workspace tree: SHA-256 over the entries sorted by path, each rendered as
/// `<hex>  <path>\n` (exactly the output of `sha256sum` over the sorted files, so anyone can
/// recompute it with coreutils: `find . -type f | sort | xargs sha256sum | sed 's|  ./|  |' | sha256sum`).
/// An empty workspace hashes the empty string.
pub fn tree_digest(entries: &[TreeEntry]) -> Digest {
    let mut sorted: Vec<&TreeEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    let mut h = Hasher::new();
    for e in sorted {
        h.update(e.digest.hex().as_bytes());
        h.update(b"  ");
        h.update(e.path.as_bytes());
        h.update(b"\n");
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_round_trip() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(Digest::of_reader(&b"abc"[..]).unwrap(), d);
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(
            "md5:00".parse::<Digest>(),
            Err(DigestParseError::Algorithm(_))
        ));
        assert!(matches!(
            "sha256:ABC".parse::<Digest>(),
            Err(DigestParseError::Hex(_))
        ));
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(upper.parse::<Digest>().is_err());
    }

    #[test]
    fn tree_digest_matches_sha256sum_listing_and_is_order_independent() {
        let a = TreeEntry {
            path: "b/x".into(),
            digest: Digest::of(b"x"),
        };
        let b = TreeEntry {
            path: "a".into(),
            digest: Digest::of(b"a"),
        };
        let listing = format!(
            "{}  a\n{}  b/x\n",
            Digest::of(b"a").hex(),
            Digest::of(b"x").hex()
        );
        assert_eq!(
            tree_digest(&[a.clone(), b.clone()]),
            Digest::of(listing.as_bytes())
        );
        assert_eq!(tree_digest(&[b, a]), Digest::of(listing.as_bytes()));
        assert_eq!(tree_digest(&[]), Digest::of(b""));
    }
}
