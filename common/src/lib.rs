//! kiln-common: everything both sides of the trust boundary share.
//!
//! - [`digest`]: SHA-256 content addresses and workspace tree digests.
//! - [`spec`]: the pipeline spec v1 (TOML), parsed and validated with `file:line:col` errors.
//! - [`dsse`], [`intoto`], [`keys`]: DSSE envelopes, in-toto Statement v1 / SLSA Provenance v1
//!   types, ECDSA P-256 keys.
//! - [`definition`]: signed pipeline definitions (DSSE over the file's bytes).
//! - [`policy`]: the input document of verification policies (`kiln verify --policy`).
//! - [`secretscan`]: the admission scan for hard-coded secrets in pipeline files.
//! - [`trace`]: runtime-trace records (NDJSON) and predicate, and the completeness check.
//! - [`verify`]: offline verification of an artifact against its attestation bundle.
//! - [`trust`]: trust roots of verification: TPM-rooted (EK CA + enrolled node, revocation
//!   list) or raw keys; [`x509`]: workload certificates.
//! - [`attest`]: TPM node attestation checks (EK chain, enrollment challenge, quote, certify,
//!   event log), pure Rust.
//! - [`api`]: the kilnd HTTP/JSON API's request and response types.
//! - [`sbom`]: the CycloneDX SBOM a publish step attests; [`oci`]: OCI image layout export.

pub mod api;
pub mod attest;
pub mod definition;
pub mod digest;
pub mod dsse;
pub mod intoto;
pub mod keys;
pub mod oci;
pub mod policy;
pub mod sbom;
pub mod secretscan;
pub mod spec;
pub mod trace;
pub mod trust;
pub mod verify;
pub mod x509;

pub use digest::Digest;
