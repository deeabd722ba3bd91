//! Node attestor (seed component): the TPM 2.0 identity of this node and its measured state.
//!
//! - [`tpm`]: the one wrapper around the TPM (ESAPI context on its own thread): EK certificate
//!   and public, AK, TPM-resident node signing key and its certification, quotes, PCRs,
//!   ActivateCredential for enrollment, signing with the node key.
//! - [`node`]: the attestor as kilnd runs it (start, per-job identity document, enrollment
//!   answers, rotation).
//! - [`workload`]: the workload attestor: ephemeral per-step keys and their X.509 certificates
//!   signed by the node key.
//! - [`measure`]: measured start — PCR 23 extended with kilnd's binary, config and profiles,
//!   with a replayable event log.
//!
//! Verification of everything produced here is pure Rust in [`kiln_common::attest`].

pub mod measure;
pub mod node;
pub mod tpm;
pub mod workload;

pub use measure::{MeasureError, StartMeasurements, measure_start};
pub use node::{NodeAttestor, NodeAttestorConfig, NodeAttestorError};
pub use tpm::{Endorsement, Quote, Tpm, TpmConfig, TpmError};
pub use workload::{WorkloadError, WorkloadKey};
