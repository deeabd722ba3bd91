//! Node attestor (seed component): the TPM 2.0 identity of this node and its measured state.
//!
//! - [`tpm`]: the one wrapper around the TPM (ESAPI context on its own thread): EK certificate
//!   and public, AK, TPM-resident node signing key and its certification, quotes, PCRs,
//!   ActivateCredential for enrollment, signing with the node key.
//! - [`measure`]: measured start — PCR 23 extended with kilnd's binary, config and profiles,
//!   with a replayable event log.
//!
//! Verification of everything produced here is pure Rust in [`kiln_common::attest`].

pub mod measure;
pub mod tpm;

pub use measure::{MeasureError, StartMeasurements, measure_start};
pub use tpm::{Endorsement, Quote, Tpm, TpmConfig, TpmError};
