//! The node attestor as kilnd runs it: the TPM opened at start, kilnd's measured start, the AK
//! and the certified node key ready, then per job a fresh quote (node identity document) and
//! per workload a certificate signed by the node key.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use kiln_common::attest::{
    self as verify, CredentialChallenge, MeasurementEvent, NodeIdentity, SignedAttest,
};
use kiln_common::digest::Digest;
use kiln_common::keys::PublicKey;
use kiln_common::trust::{NodeEndorsement, node_id};
use kiln_common::x509::workload_uri;

use super::measure::{MeasureError, StartMeasurements, measure_start};
use super::tpm::{Tpm, TpmConfig, TpmError};
use super::workload::{self, CertificateRequest, WorkloadError};

/// Errors of the node attestor.
#[derive(Debug, thiserror::Error)]
pub enum NodeAttestorError {
    /// A TPM command failed.
    #[error(transparent)]
    Tpm(#[from] TpmError),
    /// Measured start failed.
    #[error(transparent)]
    Measure(#[from] MeasureError),
    /// The configured EK CA bundle cannot be read.
    #[error("cannot read the ek ca bundle {path}: {source}")]
    CaBundle {
        /// File.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// This TPM's EK certificate does not verify against the configured CA bundle.
    #[error("this tpm's ek certificate does not verify against {path}")]
    EkCertificate {
        /// CA bundle file.
        path: PathBuf,
        /// Why.
        #[source]
        source: verify::AttestError,
    },
    /// A workload certificate could not be issued.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The node key changed (`kiln node rotate-key`) after the job's quote bound the old one.
    #[error(
        "the node key was rotated during the job (quoted {quoted}, current {current}): the job's workload certificates cannot chain to its quote"
    )]
    NodeKeyRotated {
        /// keyid the quote bound.
        quoted: String,
        /// Current keyid.
        current: String,
    },
}

/// How to start the node attestor.
#[derive(Debug, Clone)]
pub struct NodeAttestorConfig {
    /// TPM and key-blob directory.
    pub tpm: TpmConfig,
    /// CA bundle to check the EK certificate against at start.
    pub ek_ca_bundle: Option<PathBuf>,
    /// What to measure.
    pub measurements: StartMeasurements,
    /// Where the measured-start event log is written.
    pub event_log: PathBuf,
}

/// The running node attestor (shared by every job).
#[derive(Debug)]
pub struct NodeAttestor {
    tpm: Arc<Tpm>,
    node_id: String,
    node_key: RwLock<PublicKey>,
    event_log: Vec<MeasurementEvent>,
}

impl NodeAttestor {
    /// Open the TPM, run the measured start, make sure the AK and the node key exist and the node
    /// key's certification verifies (a cached one is reused while it does).
    pub async fn start(config: NodeAttestorConfig) -> Result<Self, NodeAttestorError> {
        let tpm = Arc::new(Tpm::open(config.tpm.clone()).await?);
        let endorsement = tpm.endorsement().await?;
        if let Some(path) = &config.ek_ca_bundle {
            let pem = std::fs::read(path).map_err(|source| NodeAttestorError::CaBundle {
                path: path.clone(),
                source,
            })?;
            let ek_error = |source| NodeAttestorError::EkCertificate {
                path: path.clone(),
                source,
            };
            let ca = verify::parse_ca_bundle(&pem).map_err(ek_error)?;
            let cert = verify::verify_ek_certificate(&endorsement.certificate, &ca, unix_now())
                .map_err(ek_error)?;
            verify::ek_matches_certificate(&endorsement.public, &cert).map_err(ek_error)?;
        }
        let event_log = measure_start(&tpm, &config.measurements, &config.event_log).await?;
        tpm.ak_public().await?;
        let (_, node_key) = tpm.node_key().await?;
        // Verified inside (a stale cached certification is replaced).
        tpm.node_key_certification().await?;
        let node_id = node_id(&Digest::of(&endorsement.certificate));
        tracing::info!(
            node_id = %node_id,
            node_key = %node_key.keyid(),
            tcti = %tpm.tcti(),
            "tpm node attestor ready: node key certified by the ak"
        );
        Ok(Self {
            tpm,
            node_id,
            node_key: RwLock::new(node_key),
            event_log,
        })
    }

    /// The node id (hex sha256 of the EK certificate).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The current node key.
    pub fn node_key(&self) -> PublicKey {
        match self.node_key.read() {
            Ok(key) => key.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The node identity document for a job's nonce: a fresh quote binding the nonce and the
    /// node key.
    pub async fn job_identity(&self, nonce: Vec<u8>) -> Result<NodeIdentity, NodeAttestorError> {
        Ok(self
            .tpm
            .node_identity(nonce, self.event_log.clone())
            .await?)
    }

    /// Issue a workload certificate for `subject` naming `job` (and `step`), valid from
    /// `started` to `ends` plus the grace, signed by the node key `node_key` (the one the job's
    /// quote bound; the TPM signs with its current node key, so a rotation during the job
    /// makes this fail rather than produce an unverifiable chain).
    pub async fn issue(
        &self,
        node_key: &PublicKey,
        job: &str,
        step: Option<&str>,
        subject: PublicKey,
        started: SystemTime,
        ends: SystemTime,
    ) -> Result<Vec<u8>, NodeAttestorError> {
        let current = self.node_key();
        if current != *node_key {
            return Err(NodeAttestorError::NodeKeyRotated {
                quoted: node_key.keyid(),
                current: current.keyid(),
            });
        }
        let request = CertificateRequest {
            uri: workload_uri(&self.node_id, job, step),
            node_id: self.node_id.clone(),
            subject,
            not_before: started,
            ends,
        };
        Ok(workload::issue_certificate(self.tpm.clone(), node_key, request).await?)
    }

    /// What enrollment and `kiln node show` need.
    pub async fn endorsement(&self) -> Result<NodeEndorsement, NodeAttestorError> {
        let endorsement = self.tpm.endorsement().await?;
        let ak_public = self.tpm.ak_public().await?;
        let (node_key_public, node_key) = self.tpm.node_key().await?;
        let node_key_certify: SignedAttest = self.tpm.node_key_certification().await?;
        Ok(NodeEndorsement {
            node_id: self.node_id.clone(),
            ek_certificate: endorsement.certificate,
            ek_public: endorsement.public,
            ak_public,
            node_key_public,
            node_keyid: node_key.keyid(),
            node_key_certify,
            tcti: self.tpm.tcti().to_owned(),
            event_log: self.event_log.clone(),
        })
    }

    /// Answer an enrollment challenge (TPM2_ActivateCredential).
    pub async fn activate(
        &self,
        challenge: CredentialChallenge,
    ) -> Result<Vec<u8>, NodeAttestorError> {
        Ok(self.tpm.activate_credential(challenge).await?)
    }

    /// Create and certify a new node key; the previous one is archived.
    pub async fn rotate(&self) -> Result<NodeEndorsement, NodeAttestorError> {
        let (_, key, _) = self.tpm.rotate_node_key().await?;
        match self.node_key.write() {
            Ok(mut slot) => *slot = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
        self.endorsement().await
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
