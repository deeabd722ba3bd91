//! kiln-common: everything both sides of the trust boundary share.
//!
//! - [`digest`]: SHA-256 content addresses and workspace tree digests.
//! - [`spec`]: the pipeline spec v1 (TOML), parsed and validated with `file:line:col` errors.
//! - [`dsse`], [`intoto`], [`keys`]: DSSE envelopes, in-toto Statement v1 / SLSA Provenance v1
//!   types, ECDSA P-256 keys.
//! - [`verify`]: offline verification of an artifact against its attestation bundle.
//! - [`attest`]: TPM node attestation checks (EK chain, enrollment challenge, quote, certify,
//!   event log), pure Rust.
//! - [`api`]: the kilnd HTTP/JSON API's request and response types.

pub mod api;
pub mod attest;
pub mod digest;
pub mod dsse;
pub mod intoto;
pub mod keys;
pub mod spec;
pub mod verify;

pub use digest::Digest;
