//! kilnd: the kiln node daemon.
//!
//! One module per Secure Software Factory component:
//! - [`admission`]: admission controller: signed definitions, secret scan, secrets, step admission.
//! - [`fetch`]: the fetch step's allowlisting proxy, hash pins and source re-check.
//! - [`api`]: HTTP/JSON API on the Unix socket, authorization by peer credentials.
//! - [`attest`]: node attestor: the TPM wrapper (EK, AK, node key, quotes) and measured start.
//! - [`pipeline`]: job queue and scheduler; runs each step in a fresh worker.
//! - [`sandbox`]: the single-use build worker (`kiln-sandbox` helper) and its profiles.
//! - [`provenance`]: in-toto/SLSA statements for steps and jobs, signed as DSSE.
//! - [`publish`]: a publish step's SBOM and test-result attestations.
//! - [`store`]: SQLite index + content-addressed blob store.
//! - [`image`]: pinned build environments (root filesystem images by digest).
//! - [`config`]: `/etc/kiln/kilnd.toml`; [`daemon`]: start-up and shutdown.

pub mod admission;
pub mod api;
pub mod attest;
pub mod config;
pub mod daemon;
pub mod fetch;
pub mod image;
pub mod observe;
pub mod pipeline;
pub mod provenance;
pub mod publish;
pub mod sandbox;
pub mod store;

/// An error and its `source()` chain on one line, `: `-separated (for logs and step reasons).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
