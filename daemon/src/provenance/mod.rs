//! Runtime provenance: in-toto Statement v1 with SLSA Provenance v1 per step, kiln's job
//! statement linking every step envelope, and the keys that sign them as DSSE envelopes.
//!
//! With a TPM (the default) every step and the job statement are signed by their own ephemeral
//! workload key ([`crate::attest::workload`]), whose X.509 certificate the TPM-resident node key
//! signs; the job statement links the job's node identity document (fresh quote over the job
//! nonce) and every certificate; predicates say `signingKey.kind = "tpm"`. With
//! `kilnd --insecure-software-key` the key is a software ECDSA P-256 key in
//! `<state>/keys/node-key.p8` (mode 0600, directory 0700), and every predicate says
//! `signingKey.kind = "software"`, which `kiln verify` refuses unless told otherwise.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine as _;
use kiln_common::attest::NodeIdentity;
use kiln_common::trust::{KIND_SOFTWARE, KIND_TPM};
use ring::rand::{SecureRandom as _, SystemRandom};

use kiln_common::Digest;
use kiln_common::digest::TreeEntry;
use kiln_common::dsse::{self, Envelope};
use kiln_common::intoto::{
    self, BuildDefinition, BuildMetadata, Builder, ExternalParameters, InternalParameters,
    JobPredicate, JobStatement, JobStepRef, Provenance, ResourceDescriptor, RunDetails,
    SigningKeyInfo, Statement, StepStatement,
};
use kiln_common::keys::{PublicKey, SigningKey};
use serde::Serialize;

use crate::attest::{NodeAttestor, NodeAttestorError, WorkloadError, WorkloadKey};
use crate::store::Cas;

/// Node key failures.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// Reading or writing the key file.
    #[error("node key {path}: {source}")]
    KeyFile {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file has group/other permissions: refuse to use a possibly leaked key.
    #[error("node key {path} has mode {mode:o}; it must be 0600 (owner only)")]
    KeyMode {
        /// Path.
        path: PathBuf,
        /// Mode found.
        mode: u32,
    },
    /// The key file does not hold a P-256 PKCS#8 key.
    #[error("node key {path} is not a valid ECDSA P-256 PKCS#8 key: {message}")]
    KeyInvalid {
        /// Path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
    /// The node attestor (TPM) failed.
    #[error("node attestor: {0}")]
    Attestor(#[from] NodeAttestorError),
    /// The ephemeral workload key failed.
    #[error("workload key: {0}")]
    Workload(#[from] WorkloadError),
    /// A TPM-mode job without its start evidence (nonce and quote).
    #[error("job {0} has no node attestation evidence (its quote was not taken at job start)")]
    NoJobEvidence(String),
    /// Storing evidence in the CAS failed.
    #[error("cannot store attestation evidence: {0}")]
    Store(String),
}

/// The node's signing identity: a software key (`kilnd --insecure-software-key`), or the TPM
/// node attestor, which certifies an ephemeral workload key per step and per job statement.
#[derive(Debug)]
pub struct NodeSigner {
    mode: SignerMode,
    public: PublicKey,
    /// Description of the node key (kind `software` or `tpm`, its keyid).
    pub info: SigningKeyInfo,
    /// `urn:kiln:node:<keyid hex>` (software) or `urn:kiln:node:<node id>` (TPM: hex sha256 of
    /// the EK certificate, stable across node key rotation).
    pub builder_id: String,
    /// TPM mode: evidence of each running job (nonce, identity document, issued certificates).
    jobs: Mutex<HashMap<String, JobEvidence>>,
}

#[derive(Debug)]
enum SignerMode {
    Software(Box<SigningKey>),
    Tpm(Arc<NodeAttestor>),
}

/// What the node attestor produced for one job so far.
#[derive(Debug)]
struct JobEvidence {
    nonce: Vec<u8>,
    identity: NodeIdentity,
    /// The node key the quote bound.
    node_key: PublicKey,
    /// keyid → certificate DER of every workload key certified for the job.
    certificates: BTreeMap<String, Vec<u8>>,
}

/// What a job statement links from the node attestor (all empty for a software key).
#[derive(Debug, Default)]
pub struct JobLinks {
    /// Digest of the node identity document (stored in the CAS).
    pub node_identity: Option<Digest>,
    /// The job nonce, hex.
    pub nonce: Option<String>,
    /// keyid → certificate digest (stored in the CAS).
    pub workload_certificates: BTreeMap<String, Digest>,
}

impl NodeSigner {
    /// Load `<state>/keys/node-key.p8`, creating it on first start.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, ProvenanceError> {
        let dir = state_dir.join("keys");
        let path = dir.join("node-key.p8");
        let file_err = |source| ProvenanceError::KeyFile {
            path: path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(file_err)?;
        let key = match fs::read(&path) {
            Ok(der) => {
                let mode = fs::metadata(&path).map_err(file_err)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(ProvenanceError::KeyMode { path, mode });
                }
                SigningKey::from_pkcs8_der(&der).map_err(|e| ProvenanceError::KeyInvalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (key, pkcs8) =
                    SigningKey::generate().map_err(|e| ProvenanceError::Sign(e.to_string()))?;
                // create_new + 0600: never clobber an existing key, never readable by others.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(file_err)?;
                f.write_all(pkcs8.as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(file_err)?;
                tracing::warn!(path = %path.display(), "created a software node key: attestations say signingKey.kind = software");
                key
            }
            Err(e) => return Err(file_err(e)),
        };
        let public = key.public_key();
        let keyid = public.keyid();
        let hex = keyid.trim_start_matches("sha256:").to_owned();
        Ok(Self {
            mode: SignerMode::Software(Box::new(key)),
            public,
            info: SigningKeyInfo {
                kind: KIND_SOFTWARE.into(),
                keyid,
            },
            builder_id: format!("urn:kiln:node:{hex}"),
            jobs: Mutex::new(HashMap::new()),
        })
    }

    /// The TPM-backed signer.
    pub fn tpm(attestor: Arc<NodeAttestor>) -> Self {
        let public = attestor.node_key();
        Self {
            info: SigningKeyInfo {
                kind: KIND_TPM.into(),
                keyid: public.keyid(),
            },
            builder_id: format!("urn:kiln:node:{}", attestor.node_id()),
            public,
            mode: SignerMode::Tpm(attestor),
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// The node attestor, when the node key is in a TPM.
    pub fn attestor(&self) -> Option<&Arc<NodeAttestor>> {
        match &self.mode {
            SignerMode::Tpm(attestor) => Some(attestor),
            SignerMode::Software(_) => None,
        }
    }

    /// The node public key (TPM mode: the current node key).
    pub fn public_key(&self) -> PublicKey {
        match &self.mode {
            SignerMode::Tpm(attestor) => attestor.node_key(),
            SignerMode::Software(_) => self.public.clone(),
        }
    }

    /// The key that signed step `step` of job `job_id` (step admission re-verifies its envelope
    /// with it): the node key itself in software mode; in TPM mode the workload key of the
    /// certificate the node key issued for that step, the certificate re-verified against the node
    /// key. `None` if no such certificate was issued (yet).
    pub fn step_key(&self, job_id: &str, step: &str) -> Option<PublicKey> {
        match &self.mode {
            SignerMode::Software(_) => Some(self.public.clone()),
            SignerMode::Tpm(attestor) => {
                let uri = kiln_common::x509::workload_uri(attestor.node_id(), job_id, Some(step));
                let jobs = self.lock_jobs();
                let evidence = jobs.get(job_id)?;
                evidence.certificates.values().find_map(|der| {
                    kiln_common::x509::verify_workload_certificate(der, &evidence.node_key, &uri)
                        .ok()
                        .map(|cert| cert.key)
                })
            }
        }
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobEvidence>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// At job start (TPM mode): draw a fresh 32-byte nonce and quote it with the node key
    /// (qualifying data sha256(node key SPKI || nonce)); the identity document is kept for the
    /// job statement. A no-op for a software key.
    pub async fn begin_job(&self, job_id: &str) -> Result<(), ProvenanceError> {
        let SignerMode::Tpm(attestor) = &self.mode else {
            return Ok(());
        };
        let mut nonce = vec![0u8; 32];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ProvenanceError::Sign("the system random source failed".into()))?;
        let identity = attestor.job_identity(nonce.clone()).await?;
        let (_, node_key) = kiln_common::attest::parse_node_key(&identity.node_key_public)
            .map_err(|e| ProvenanceError::Sign(format!("node key from the tpm: {e}")))?;
        self.lock_jobs().insert(
            job_id.to_owned(),
            JobEvidence {
                nonce,
                identity,
                node_key,
                certificates: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// A signer for one workload of a job: the step `step`, or the job statement itself when
    /// `None`. TPM mode: a fresh in-memory key, certified by [`WorkloadSigner::certify`] when the
    /// workload ends and wiped when the signer is dropped. Software mode: the node key.
    pub fn workload(
        &self,
        job_id: &str,
        step: Option<&str>,
    ) -> Result<WorkloadSigner<'_>, ProvenanceError> {
        let key = match &self.mode {
            SignerMode::Software(key) => WorkloadKeyRef::Software(key),
            SignerMode::Tpm(_) => WorkloadKeyRef::Ephemeral(WorkloadKey::generate()?),
        };
        let info = match &key {
            WorkloadKeyRef::Software(_) => self.info.clone(),
            WorkloadKeyRef::Ephemeral(key) => SigningKeyInfo {
                kind: KIND_TPM.into(),
                keyid: key.public_key().keyid(),
            },
        };
        Ok(WorkloadSigner {
            node: self,
            job_id: job_id.to_owned(),
            step: step.map(str::to_owned),
            key,
            info,
            builder_id: self.builder_id.clone(),
        })
    }

    /// At job end: store the node identity document and the job's workload certificates in the
    /// CAS and return what the job statement links, with a certified signer for the job
    /// statement (covering `started_on` … `finished_on`). Software mode: the node key, no links.
    pub async fn finish_job(
        &self,
        job_id: &str,
        cas: &Cas,
        started_on: &str,
        finished_on: &str,
    ) -> Result<(WorkloadSigner<'_>, JobLinks), ProvenanceError> {
        let mut signer = self.workload(job_id, None)?;
        if matches!(self.mode, SignerMode::Software(_)) {
            return Ok((signer, JobLinks::default()));
        }
        signer.certify(started_on, finished_on).await?;
        let evidence = self
            .lock_jobs()
            .remove(job_id)
            .ok_or_else(|| ProvenanceError::NoJobEvidence(job_id.to_owned()))?;
        let store = |bytes: &[u8]| {
            cas.put_bytes(bytes)
                .map_err(|e| ProvenanceError::Store(e.to_string()))
        };
        let identity = serde_json::to_vec(&evidence.identity)
            .map_err(|e| ProvenanceError::Sign(e.to_string()))?;
        let node_identity = store(&identity)?;
        let mut workload_certificates = BTreeMap::new();
        for (keyid, der) in &evidence.certificates {
            workload_certificates.insert(keyid.clone(), store(der)?);
        }
        Ok((
            signer,
            JobLinks {
                node_identity: Some(node_identity),
                nonce: Some(hex::encode(&evidence.nonce)),
                workload_certificates,
            },
        ))
    }

    /// Forget a job's evidence (a job that ended without a statement).
    pub fn abandon_job(&self, job_id: &str) {
        self.lock_jobs().remove(job_id);
    }
}

/// The key a [`WorkloadSigner`] signs with.
#[derive(Debug)]
enum WorkloadKeyRef<'a> {
    Software(&'a SigningKey),
    Ephemeral(WorkloadKey),
}

/// Signs the statements of one workload (a step, or the job statement) with its own key.
#[derive(Debug)]
pub struct WorkloadSigner<'a> {
    node: &'a NodeSigner,
    job_id: String,
    step: Option<String>,
    key: WorkloadKeyRef<'a>,
    /// Key description put in the statements (`tpm`: the workload key's keyid).
    pub info: SigningKeyInfo,
    /// The node's builder id.
    pub builder_id: String,
}

fn parse_time(value: &str) -> Result<SystemTime, ProvenanceError> {
    humantime::parse_rfc3339_weak(value)
        .map_err(|e| ProvenanceError::Sign(format!("time {value:?}: {e}")))
}

impl WorkloadSigner<'_> {
    /// TPM mode: have the node key certify this workload's key for `started_on` …
    /// `finished_on` (+ grace); the certificate is kept for the job statement. Must be called
    /// before signing. A no-op for a software key.
    pub async fn certify(
        &mut self,
        started_on: &str,
        finished_on: &str,
    ) -> Result<(), ProvenanceError> {
        let (WorkloadKeyRef::Ephemeral(key), SignerMode::Tpm(attestor)) =
            (&self.key, &self.node.mode)
        else {
            return Ok(());
        };
        let node_key = self
            .node
            .lock_jobs()
            .get(&self.job_id)
            .map(|e| e.node_key.clone())
            .ok_or_else(|| ProvenanceError::NoJobEvidence(self.job_id.clone()))?;
        let der = attestor
            .issue(
                &node_key,
                &self.job_id,
                self.step.as_deref(),
                key.public_key().clone(),
                parse_time(started_on)?,
                parse_time(finished_on)?,
            )
            .await?;
        if let Some(evidence) = self.node.lock_jobs().get_mut(&self.job_id) {
            evidence.certificates.insert(self.info.keyid.clone(), der);
        }
        Ok(())
    }

    /// Sign a statement; returns the envelope's exact stored bytes and their digest.
    pub fn sign_statement<P: Serialize>(
        &self,
        st: &Statement<P>,
    ) -> Result<(Vec<u8>, Digest), ProvenanceError> {
        let payload = serde_json::to_vec(st).map_err(|e| ProvenanceError::Sign(e.to_string()))?;
        let env = match &self.key {
            WorkloadKeyRef::Software(key) => Envelope::sign(intoto::PAYLOAD_TYPE, &payload, key)
                .map_err(|e| ProvenanceError::Sign(e.to_string()))?,
            WorkloadKeyRef::Ephemeral(key) => {
                let pae = dsse::pae(intoto::PAYLOAD_TYPE, &payload);
                let sig = key.sign(&pae)?;
                Envelope {
                    payload_type: intoto::PAYLOAD_TYPE.into(),
                    payload: base64::engine::general_purpose::STANDARD.encode(&payload),
                    signatures: vec![dsse::Signature {
                        keyid: self.info.keyid.clone(),
                        sig: base64::engine::general_purpose::STANDARD.encode(sig),
                    }],
                }
            }
        };
        // The stored bytes are exactly what `envelope_digest` hashes.
        let bytes = env.to_json_bytes();
        let digest = dsse::envelope_digest(&env);
        Ok((bytes, digest))
    }
}

/// Everything a step statement records.
#[derive(Debug, Clone)]
pub struct StepRecord<'a> {
    /// Job id.
    pub job_id: &'a str,
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Pipeline digest.
    pub pipeline_digest: Digest,
    /// Bound parameters.
    pub params: &'a BTreeMap<String, String>,
    /// Step name.
    pub step: &'a str,
    /// Step kind.
    pub kind: &'a str,
    /// Profile.
    pub profile: &'a str,
    /// Input workspaces and their tree digests as mounted.
    pub inputs: &'a [(String, Digest)],
    /// Output workspace and its files (the subjects).
    pub output: Option<(&'a str, &'a [TreeEntry])>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// `succeeded`, `failed`, `timed-out`, `cancelled`.
    pub outcome: &'a str,
    /// RFC 3339.
    pub started_on: &'a str,
    /// RFC 3339.
    pub finished_on: &'a str,
    /// Log blob digest.
    pub log: Option<Digest>,
    /// Whether kilnd verified that nothing of the step's worker survived.
    pub teardown_verified: bool,
    /// Whether the eBPF observer recorded the step.
    pub observed: bool,
    /// Digest of the step's signed runtime-trace envelope (byproduct `runtime-trace`).
    pub trace: Option<Digest>,
    /// keyid of the accepted signer of the pipeline file; `None` if admitted unsigned.
    pub pipeline_signer: Option<&'a str>,
    /// What a source step ingested.
    pub source: Option<&'a kiln_common::intoto::SourceIngest>,
    /// `SOURCE_DATE_EPOCH` the step ran with.
    pub source_date_epoch: Option<u64>,
    /// A fetch step's proxy connections and pin checks (`crate::fetch`).
    pub fetch: Option<&'a kiln_common::intoto::FetchRecord>,
    /// The step's build environment image (`image = "sha256:…"`), if any.
    pub image: Option<Digest>,
}

/// `resolvedDependencies` URI of a step's build environment image (its digest is the image's
/// manifest digest).
pub const IMAGE_DEPENDENCY_URI: &str = "kiln:image";

/// Files as in-toto subjects: path as the name, sha256 digest.
pub fn subjects(entries: &[TreeEntry]) -> Vec<ResourceDescriptor> {
    entries
        .iter()
        .map(|e| ResourceDescriptor {
            name: Some(e.path.clone()),
            uri: None,
            digest: intoto::digest_set(&e.digest),
            media_type: None,
        })
        .collect()
}

/// Build a step's SLSA provenance statement.
pub fn step_statement(rec: &StepRecord<'_>, signer: &WorkloadSigner<'_>) -> StepStatement {
    let subject = rec
        .output
        .map(|(_, entries)| subjects(entries))
        .unwrap_or_default();
    let resolved_dependencies = rec
        .inputs
        .iter()
        .map(|(ws, d)| ResourceDescriptor {
            name: Some(ws.clone()),
            uri: Some(format!("urn:kiln:workspace:{ws}")),
            digest: intoto::digest_set(d),
            media_type: None,
        })
        .chain(rec.source.map(crate::pipeline::ingest::dependency))
        .chain(rec.image.iter().map(|d| ResourceDescriptor {
            name: None,
            uri: Some(IMAGE_DEPENDENCY_URI.into()),
            digest: intoto::digest_set(d),
            media_type: None,
        }))
        .collect();
    let byproducts = rec
        .log
        .iter()
        .map(|d| ResourceDescriptor {
            name: Some("log".into()),
            uri: None,
            digest: intoto::digest_set(d),
            media_type: Some("text/plain".into()),
        })
        .chain(rec.trace.iter().map(|d| {
            kiln_common::trace::envelope_descriptor(kiln_common::trace::TRACE_BYPRODUCT, d)
        }))
        .collect();
    Statement {
        statement_type: intoto::STATEMENT_TYPE.into(),
        subject,
        predicate_type: intoto::SLSA_PROVENANCE_V1.into(),
        predicate: Provenance {
            build_definition: BuildDefinition {
                build_type: intoto::KILN_STEP_BUILD_TYPE.into(),
                external_parameters: ExternalParameters {
                    pipeline: rec.pipeline.into(),
                    pipeline_digest: rec.pipeline_digest,
                    step: rec.step.into(),
                    parameters: rec.params.clone(),
                },
                internal_parameters: InternalParameters {
                    kind: rec.kind.into(),
                    profile: rec.profile.into(),
                    output_workspace: rec.output.map(|(ws, _)| ws.to_owned()),
                    exit_code: rec.exit_code,
                    outcome: rec.outcome.into(),
                    signing_key: signer.info.clone(),
                    teardown_verified: rec.teardown_verified,
                    observed: rec.observed,
                    pipeline_signer: rec.pipeline_signer.map(str::to_owned),
                    // Every step runs in an empty network namespace (sandbox helper); a fetch
                    // step's only reachable address is kilnd's proxy listener in it.
                    network: Some(if rec.fetch.is_some() { "proxy" } else { "none" }.into()),
                    source: rec.source.cloned(),
                    source_date_epoch: rec.source_date_epoch,
                    reproducible: None,
                    fetch: rec.fetch.cloned(),
                    image: rec.image,
                },
                resolved_dependencies,
            },
            run_details: RunDetails {
                builder: Builder {
                    id: signer.builder_id.clone(),
                },
                metadata: BuildMetadata {
                    invocation_id: format!("{}/{}", rec.job_id, rec.step),
                    started_on: rec.started_on.into(),
                    finished_on: rec.finished_on.into(),
                },
                byproducts,
            },
        },
    }
}

/// Build the job statement: subjects are the step envelopes.
pub fn job_statement(predicate: JobPredicate) -> JobStatement {
    let subject = predicate
        .steps
        .iter()
        .filter_map(|s: &JobStepRef| {
            s.envelope_digest.map(|d| ResourceDescriptor {
                name: Some(format!("step:{}", s.name)),
                uri: None,
                digest: intoto::digest_set(&d),
                media_type: Some("application/vnd.dsse.envelope.v1+json".into()),
            })
        })
        .collect();
    Statement {
        statement_type: intoto::STATEMENT_TYPE.into(),
        subject,
        predicate_type: intoto::KILN_JOB_PREDICATE.into(),
        predicate,
    }
}
