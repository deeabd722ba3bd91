//! The one TPM wrapper: owns the `tss_esapi::Context` on a dedicated OS thread and serves
//! requests from async callers over a channel.
//!
//! Why a thread: every ESAPI call is blocking I/O (8–110 ms against swtpm) and must never run on
//! a tokio worker; and a TPM without a resource manager (swtpm; `/dev/tpm0`) has one state for
//! all clients with 3 transient-object and 3 session slots, so exactly one owner serialises all
//! commands and flushes every transient handle as soon as the command that needed it is done.
//!
//! Keys (all children of the RSA EK at persistent handle 0x81010001, so no storage primary has
//! to be created at each start; loading a child of the EK needs a policy session with
//! PolicySecret(TPM_RH_ENDORSEMENT), the EK's default policy):
//! - AK: restricted ECC P-256 ECDSA/SHA-256 signing key (signs quotes and certifications only).
//!   ECC rather than RSA: a 64-byte signature that ring verifies, same curve as every other kiln
//!   key.
//! - node signing key: non-restricted ECC P-256 ECDSA/SHA-256 signing key, fixedTPM +
//!   fixedParent + sensitiveDataOrigin (born in the TPM, never exported), certified by the AK.
//!
//! Both are stored in the state dir as their `TPMT_PUBLIC` (`*.pub`) and TPM-wrapped private
//! part (`*.priv`, encrypted by the EK's seed: useless outside this TPM), so a restart reuses
//! them. Files: `ak.pub`, `ak.priv`, `node-key.pub`, `node-key.priv`, `node-key.certify.json`.
//!
//! Set `TSS2_LOG=all+none` in kilnd's environment (before any thread starts; kilnd.service)
//! so the ESYS library does not print its own errors to stderr: every failure is returned here
//! with the TPM response code decoded.

use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::mpsc;
use std::thread;

use kiln_common::attest::{
    self as verify, EcdsaSignature, MeasurementEvent, NodeIdentity, PcrValues, QUOTE_PCRS,
    SignedAttest,
};
use kiln_common::digest::Digest;
use kiln_common::keys::PublicKey;
use tokio::sync::oneshot;
use tss_esapi::abstraction::{
    AsymmetricAlgorithmSelection, KeyCustomization, ak as tpm_ak, ek as tpm_ek,
};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::{
    AuthHandle, KeyHandle, ObjectHandle, PcrHandle, PersistentTpmHandle, SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest as TpmDigest, DigestValues, EncryptedSecret, IdObject, Nonce,
    PcrSelectionListBuilder, PcrSlot, Private, Public, Signature, SignatureScheme,
    SymmetricDefinition,
};
use tss_esapi::traits::{Marshall as _, UnMarshall as _};
use tss_esapi::tss2_esys::{TPM2B_DIGEST, TPMT_TK_HASHCHECK};
use tss_esapi::{Context, TctiNameConf};

/// Persistent handle of the RSA-2048 EK (TCG EK Credential Profile; where swtpm_setup puts it).
pub const EK_HANDLE: u32 = 0x8101_0001;
/// NV index of the RSA-2048 EK certificate.
pub const EK_CERT_NV_INDEX: u32 = 0x01c0_0002;
/// How often [`Tpm::quote`] retries when a PCR changed between the quote and the PCR read.
const QUOTE_ATTEMPTS: usize = 3;

/// Errors of TPM operations.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI string is not understood by the TSS.
    #[error(
        "invalid tcti {tcti:?} (expected e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321)"
    )]
    Tcti {
        /// The TCTI string.
        tcti: String,
        /// TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The ESAPI context could not be opened (no TPM there, swtpm not running, …).
    #[error(
        "cannot open the tpm at {tcti:?} (for swtpm: is it running? scripts/swtpm status): {source}"
    )]
    Open {
        /// The TCTI string.
        tcti: String,
        /// TSS error, decoded.
        #[source]
        source: tss_esapi::Error,
    },
    /// A TPM command failed; the message carries the decoded TPM response code.
    #[error("tpm {command} failed: {source}")]
    Command {
        /// What was being done, e.g. `TPM2_Quote with the ak`.
        command: &'static str,
        /// TSS error, decoded.
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM returned something kiln cannot use (wrong algorithm, malformed structure).
    #[error("tpm {command} returned an unusable result: {reason}")]
    Unexpected {
        /// The command.
        command: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A key or state file could not be read or written.
    #[error("tpm state file {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A stored or returned structure fails the verifier's own checks.
    #[error("tpm {what} fails verification")]
    Verify {
        /// What was checked.
        what: &'static str,
        /// Verifier error.
        #[source]
        source: verify::AttestError,
    },
    /// The TPM thread could not be started.
    #[error("cannot start the tpm thread")]
    Spawn {
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TPM thread is gone (it panicked or the handle was dropped).
    #[error("the tpm thread has stopped")]
    ThreadGone,
}

type Result<T, E = TpmError> = std::result::Result<T, E>;

/// Where the TPM is and where its key blobs live.
#[derive(Debug, Clone)]
pub struct TpmConfig {
    /// TCTI: `device:/dev/tpmrm0` on real hosts, `swtpm:host=127.0.0.1,port=2321` for swtpm.
    pub tcti: String,
    /// Directory for `ak.*`, `node-key.*` (created 0700 if missing).
    pub state_dir: PathBuf,
}

/// The endorsement identity read from the TPM.
#[derive(Debug, Clone)]
pub struct Endorsement {
    /// EK certificate DER (NV 0x01c00002).
    pub certificate: Vec<u8>,
    /// EK `TPMT_PUBLIC` (persistent 0x81010001).
    pub public: Vec<u8>,
}

/// A quote and the PCR values it covers.
#[derive(Debug, Clone)]
pub struct Quote {
    /// The signed `TPMS_ATTEST`.
    pub quote: SignedAttest,
    /// sha256 values of [`QUOTE_PCRS`], read after the quote and checked against its digest.
    pub pcrs: PcrValues,
}

/// A job on the TPM thread.
type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// Handle to the TPM thread; cheap to share behind an `Arc`. Dropping it stops the thread.
#[derive(Debug)]
pub struct Tpm {
    jobs: mpsc::Sender<Job>,
    tcti: String,
}

impl Tpm {
    /// Start the TPM thread and open the context. Warns loudly when the TCTI is a software TPM.
    pub async fn open(config: TpmConfig) -> Result<Self> {
        let software = config.tcti.starts_with("swtpm") || config.tcti.starts_with("mssim");
        if software {
            tracing::warn!(
                tcti = %config.tcti,
                "SOFTWARE TPM: quotes and keys prove nothing about hardware; for demo and tests only"
            );
        }
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let tcti = config.tcti.clone();
        thread::Builder::new()
            .name("kiln-tpm".to_owned())
            .spawn(move || {
                let mut worker = match Worker::open(config) {
                    Ok(worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                // Serve until every handle is dropped; the context closes with the worker.
                while let Ok(job) = queue.recv() {
                    job(&mut worker);
                }
            })
            .map_err(|source| TpmError::Spawn { source })?;
        ready_rx.await.map_err(|_| TpmError::ThreadGone)??;
        Ok(Self { jobs, tcti })
    }

    /// The TCTI this handle talks to.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Worker) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |worker| {
                let _ = tx.send(op(worker));
            }))
            .map_err(|_| TpmError::ThreadGone)?;
        rx.await.map_err(|_| TpmError::ThreadGone)?
    }

    /// EK certificate (NV 0x01c00002) and EK public (persistent 0x81010001).
    pub async fn endorsement(&self) -> Result<Endorsement> {
        self.call(Worker::endorsement).await
    }

    /// The AK's `TPMT_PUBLIC`; the AK is created on first use and reused from the state dir.
    pub async fn ak_public(&self) -> Result<Vec<u8>> {
        self.call(|w| Ok(w.ak()?.public.clone())).await
    }

    /// The node signing key's `TPMT_PUBLIC` and `SubjectPublicKeyInfo`; created on first use,
    /// reused from the state dir afterwards.
    pub async fn node_key(&self) -> Result<(Vec<u8>, PublicKey)> {
        self.call(|w| {
            let key = w.node_key()?;
            Ok((key.blobs.public.clone(), key.spki.clone()))
        })
        .await
    }

    /// TPM2_Certify of the node key by the AK with `qualifying_data` in `extraData`.
    pub async fn certify_node_key(&self, qualifying_data: Vec<u8>) -> Result<SignedAttest> {
        self.call(move |w| w.certify_node_key(&qualifying_data))
            .await
    }

    /// The node key's certification with empty qualifying data, made once and cached in the
    /// state dir (`node-key.certify.json`) until the AK or node key changes.
    pub async fn node_key_certification(&self) -> Result<SignedAttest> {
        self.call(Worker::cached_certification).await
    }

    /// TPM2_Quote by the AK over the sha256 PCRs [`QUOTE_PCRS`] (0–7: boot chain; 23: kilnd's
    /// measured start), with qualifying data = sha256(node key `SubjectPublicKeyInfo` DER ||
    /// `nonce`) ([`verify::quote_qualifying_data`]). The PCRs are read after the quote; if one
    /// changed in between (their digest differs from the signed one) the quote is retried.
    pub async fn quote(&self, nonce: Vec<u8>) -> Result<Quote> {
        self.call(move |w| w.quote(&nonce)).await
    }

    /// Sign a SHA-256 digest with the node key (ECDSA P-256); the signature is ASN.1 DER, as
    /// [`PublicKey::verify`] and DSSE verifiers expect.
    pub async fn sign_digest(&self, digest: Digest) -> Result<Vec<u8>> {
        self.call(move |w| w.sign_digest(&digest)).await
    }

    /// Sign `message` (hashed with SHA-256 here) with the node key; DER signature.
    pub async fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        self.sign_digest(Digest::of(message)).await
    }

    /// [`Tpm::sign_digest`] for synchronous callers (e.g. a certificate builder's signer),
    /// blocking the calling thread until the TPM thread answers. Must not be called on an async
    /// runtime thread: use `spawn_blocking`.
    pub fn sign_digest_blocking(&self, digest: Digest) -> Result<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |worker: &mut Worker| {
                let _ = tx.send(worker.sign_digest(&digest));
            }))
            .map_err(|_| TpmError::ThreadGone)?;
        rx.blocking_recv().map_err(|_| TpmError::ThreadGone)?
    }

    /// Rotate the node key: the current key's blobs are kept as `node-key.<n>.{pub,priv}`
    /// (signatures and certificates it made stay verifiable until it is revoked), a new key is
    /// created under the EK and certified by the AK. Returns the new key's `TPMT_PUBLIC`, SPKI
    /// and certification.
    pub async fn rotate_node_key(&self) -> Result<(Vec<u8>, PublicKey, SignedAttest)> {
        self.call(|w| {
            w.archive_node_key()?;
            let key = w.node_key()?.clone();
            let certify = w.cached_certification()?;
            Ok((key.blobs.public, key.spki, certify))
        })
        .await
    }

    /// TPM2_PCR_Extend of the sha256 bank of `pcr` with `digest`.
    pub async fn pcr_extend(&self, pcr: u8, digest: Digest) -> Result<()> {
        self.call(move |w| w.pcr_extend(pcr, &digest)).await
    }

    /// TPM2_PCR_Reset of `pcr` (only 16 and 23 are resettable at locality 0).
    pub async fn pcr_reset(&self, pcr: u8) -> Result<()> {
        self.call(move |w| w.pcr_reset(pcr)).await
    }

    /// Read sha256 PCR values (≤ 8 per TPM2_PCR_Read, batched here).
    pub async fn pcr_read(&self, pcrs: Vec<u8>) -> Result<PcrValues> {
        self.call(move |w| w.pcr_read(&pcrs)).await
    }

    /// TPM2_ActivateCredential: recover the secret a verifier wrapped for this TPM's EK and
    /// this AK's name ([`verify::make_credential`]). Fails (integrity check) when the challenge
    /// was made for another EK or another AK.
    pub async fn activate_credential(
        &self,
        challenge: verify::CredentialChallenge,
    ) -> Result<Vec<u8>> {
        self.call(move |w| w.activate_credential(challenge)).await
    }

    /// The node identity document for a job: EK certificate, AK, node key and its cached
    /// certification, a fresh quote for `nonce`, PCR values and `event_log`.
    pub async fn node_identity(
        &self,
        nonce: Vec<u8>,
        event_log: Vec<MeasurementEvent>,
    ) -> Result<NodeIdentity> {
        self.call(move |w| {
            let endorsement = w.endorsement()?;
            let ak_public = w.ak()?.public.clone();
            let node_key_public = w.node_key()?.blobs.public.clone();
            let node_key_certify = w.cached_certification()?;
            let Quote { quote, pcrs } = w.quote(&nonce)?;
            Ok(NodeIdentity {
                ek_certificate: endorsement.certificate,
                ak_public,
                node_key_public,
                node_key_certify,
                quote,
                pcrs,
                event_log,
            })
        })
        .await
    }
}

/// A key's stored form: `TPMT_PUBLIC` and the TPM-wrapped private part.
#[derive(Debug, Clone)]
struct KeyBlobs {
    public: Vec<u8>,
    private: Vec<u8>,
}

/// The node key as loaded from the state dir.
#[derive(Debug, Clone)]
struct NodeKey {
    blobs: KeyBlobs,
    spki: PublicKey,
}

/// State of the TPM thread.
struct Worker {
    ctx: Context,
    state_dir: PathBuf,
    ak: Option<KeyBlobs>,
    node_key: Option<NodeKey>,
}

/// Map a TSS error to [`TpmError::Command`].
fn cmd(command: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| TpmError::Command { command, source }
}

/// Which key `create_ak_2` makes. Its template is the AK's: a TPM-bound (fixedTPM,
/// fixedParent, sensitiveDataOrigin) ECC P-256 ECDSA/SHA-256 signing key, restricted; the node
/// signing key is the same but not restricted, so it signs any digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyRole {
    Attestation,
    NodeSigning,
}

impl KeyRole {
    /// File name stem of its blobs in the state dir.
    fn file_stem(self) -> &'static str {
        match self {
            Self::Attestation => "ak",
            Self::NodeSigning => "node-key",
        }
    }
}

impl KeyCustomization for KeyRole {
    fn attributes(&self, builder: ObjectAttributesBuilder) -> ObjectAttributesBuilder {
        // noDA: both keys have an empty auth value, so dictionary-attack protection guards
        // nothing — but with it, a few unclean TPM shutdowns (a killed demo, a crashed host)
        // put the TPM into lockout and kilnd could no longer certify or quote until it clears.
        builder
            .with_restricted(*self == Self::Attestation)
            .with_no_da(true)
    }
}

impl Worker {
    fn open(config: TpmConfig) -> Result<Self> {
        let tcti = TctiNameConf::from_str(&config.tcti).map_err(|source| TpmError::Tcti {
            tcti: config.tcti.clone(),
            source,
        })?;
        let ctx = Context::new(tcti).map_err(|source| TpmError::Open {
            tcti: config.tcti.clone(),
            source,
        })?;
        std::fs::create_dir_all(&config.state_dir).map_err(|source| TpmError::State {
            path: config.state_dir.clone(),
            source,
        })?;
        set_mode(&config.state_dir, 0o700)?;
        Ok(Self {
            ctx,
            state_dir: config.state_dir,
            ak: None,
            node_key: None,
        })
    }

    fn ek_handle(&mut self) -> Result<KeyHandle> {
        let handle = PersistentTpmHandle::new(EK_HANDLE).map_err(cmd("ek handle"))?;
        let object = self
            .ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Persistent(handle)))
            .map_err(cmd("ek lookup at persistent handle 0x81010001"))?;
        Ok(object.into())
    }

    fn endorsement(&mut self) -> Result<Endorsement> {
        let certificate = tpm_ek::retrieve_ek_pubcert(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .map_err(cmd("NV_Read of the ek certificate at 0x01c00002"))?;
        let ek = self.ek_handle()?;
        let (public, _, _) = self
            .ctx
            .execute_without_session(|ctx| ctx.read_public(ek))
            .map_err(cmd("ReadPublic of the ek"))?;
        let public = public.marshall().map_err(cmd("marshal the ek public"))?;
        Ok(Endorsement {
            certificate,
            public,
        })
    }

    /// Create (first time) or load from the state dir the key of `role`, a child of the EK.
    fn key_blobs(&mut self, role: KeyRole) -> Result<KeyBlobs> {
        let name = role.file_stem();
        let pub_path = self.state_dir.join(format!("{name}.pub"));
        let priv_path = self.state_dir.join(format!("{name}.priv"));
        if pub_path.exists() && priv_path.exists() {
            return Ok(KeyBlobs {
                public: read(&pub_path)?,
                private: read(&priv_path)?,
            });
        }
        let ek = self.ek_handle()?;
        let created = tpm_ak::create_ak_2(
            &mut self.ctx,
            ek,
            HashingAlgorithm::Sha256,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
            None,
            role,
        )
        .map_err(cmd(match role {
            KeyRole::NodeSigning => "Create of the node key under the ek",
            KeyRole::Attestation => "Create of the ak under the ek",
        }))?;
        let blobs = KeyBlobs {
            public: created
                .out_public
                .marshall()
                .map_err(cmd("marshal a new key's public"))?,
            private: created.out_private.value().to_vec(),
        };
        // Private first: a .pub without .priv is ignored and the key recreated.
        write_private(&priv_path, &blobs.private)?;
        write_private(&pub_path, &blobs.public)?;
        // A new AK or node key invalidates the cached certification.
        let certify = self.state_dir.join("node-key.certify.json");
        if certify.exists() {
            std::fs::remove_file(&certify).map_err(|source| TpmError::State {
                path: certify,
                source,
            })?;
        }
        tracing::info!(key = name, "created a tpm key under the ek");
        Ok(blobs)
    }

    fn ak(&mut self) -> Result<&KeyBlobs> {
        let blobs = if let Some(blobs) = self.ak.take() {
            blobs
        } else {
            let blobs = self.key_blobs(KeyRole::Attestation)?;
            verify::parse_attestation_key(&blobs.public).map_err(|source| TpmError::Verify {
                what: "attestation key",
                source,
            })?;
            blobs
        };
        Ok(self.ak.insert(blobs))
    }

    fn node_key(&mut self) -> Result<&NodeKey> {
        let key = if let Some(key) = self.node_key.take() {
            key
        } else {
            let blobs = self.key_blobs(KeyRole::NodeSigning)?;
            let (_, spki) =
                verify::parse_node_key(&blobs.public).map_err(|source| TpmError::Verify {
                    what: "node signing key",
                    source,
                })?;
            NodeKey { blobs, spki }
        };
        Ok(self.node_key.insert(key))
    }

    /// Load a child of the EK (policy session with PolicySecret(endorsement), flushed inside).
    /// The caller must flush the returned handle.
    fn load(&mut self, blobs: &KeyBlobs, what: &'static str) -> Result<KeyHandle> {
        let public = Public::unmarshall(&blobs.public).map_err(cmd(what))?;
        let private = Private::try_from(blobs.private.clone()).map_err(cmd(what))?;
        let ek = self.ek_handle()?;
        tpm_ak::load_ak(&mut self.ctx, ek, None, private, public).map_err(cmd(what))
    }

    /// Run `f` with the loaded key, then flush it whatever `f` returned.
    fn with_loaded<T>(
        &mut self,
        handle: KeyHandle,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let result = f(self);
        let flushed = self
            .ctx
            .flush_context(ObjectHandle::from(handle))
            .map_err(cmd("FlushContext of a transient key"));
        let value = result?;
        flushed?;
        Ok(value)
    }

    /// Move `node-key.{pub,priv}` to the first free `node-key.<n>.*` and forget the loaded key.
    fn archive_node_key(&mut self) -> Result<()> {
        let state = |path: &Path| {
            let path = path.to_owned();
            move |source| TpmError::State { path, source }
        };
        let mut n = 1u32;
        while self.state_dir.join(format!("node-key.{n}.pub")).exists() {
            n += 1;
        }
        for ext in ["priv", "pub"] {
            let from = self.state_dir.join(format!("node-key.{ext}"));
            if from.exists() {
                let to = self.state_dir.join(format!("node-key.{n}.{ext}"));
                std::fs::rename(&from, &to).map_err(state(&from))?;
            }
        }
        let certify = self.state_dir.join("node-key.certify.json");
        if certify.exists() {
            std::fs::remove_file(&certify).map_err(state(&certify))?;
        }
        self.node_key = None;
        tracing::info!(
            archived = n,
            "node key rotated: the previous key's blobs are kept"
        );
        Ok(())
    }

    fn load_ak(&mut self) -> Result<KeyHandle> {
        let blobs = self.ak()?.clone();
        self.load(&blobs, "Load of the ak")
    }

    fn load_node_key(&mut self) -> Result<KeyHandle> {
        let blobs = self.node_key()?.blobs.clone();
        self.load(&blobs, "Load of the node key")
    }

    fn certify_node_key(&mut self, qualifying_data: &[u8]) -> Result<SignedAttest> {
        let data =
            Data::try_from(qualifying_data.to_vec()).map_err(cmd("certify qualifying data"))?;
        let node = self.load_node_key()?;
        self.with_loaded(node, |w| {
            let ak = w.load_ak()?;
            w.with_loaded(ak, |w| {
                // Both objects authorise with their (empty) auth values.
                let (attest, signature) = w
                    .ctx
                    .execute_with_sessions(
                        (
                            Some(AuthSession::Password),
                            Some(AuthSession::Password),
                            None,
                        ),
                        |ctx| {
                            ctx.certify(ObjectHandle::from(node), ak, data, SignatureScheme::Null)
                        },
                    )
                    .map_err(cmd("TPM2_Certify of the node key by the ak"))?;
                signed("TPM2_Certify", &attest, &signature)
            })
        })
    }

    fn cached_certification(&mut self) -> Result<SignedAttest> {
        let path = self.state_dir.join("node-key.certify.json");
        let ak = self.ak()?.public.clone();
        let node = self.node_key()?.blobs.public.clone();
        // A cached certification is used only if it still verifies for the current keys.
        if path.exists() {
            let cached = serde_json::from_slice::<SignedAttest>(&read(&path)?);
            match cached {
                Ok(certify) if verify::verify_certify(&ak, &certify, &node, &[]).is_ok() => {
                    return Ok(certify);
                }
                _ => tracing::warn!(
                    path = %path.display(),
                    "cached node key certification is unreadable or stale: certifying again"
                ),
            }
        }
        let certify = self.certify_node_key(&[])?;
        verify::verify_certify(&ak, &certify, &node, &[]).map_err(|source| TpmError::Verify {
            what: "node key certification",
            source,
        })?;
        let json = serde_json::to_vec(&certify).map_err(|err| TpmError::Unexpected {
            command: "TPM2_Certify",
            reason: err.to_string(),
        })?;
        write_private(&path, &json)?;
        Ok(certify)
    }

    fn quote(&mut self, nonce: &[u8]) -> Result<Quote> {
        let qualifying = verify::quote_qualifying_data(&self.node_key()?.spki.clone(), nonce);
        let data = Data::try_from(qualifying.to_vec()).map_err(cmd("quote qualifying data"))?;
        let selection = pcr_selection(&QUOTE_PCRS).map_err(cmd("quote pcr selection"))?;
        let ak = self.load_ak()?;
        self.with_loaded(ak, |w| {
            let mut last = None;
            for _ in 0..QUOTE_ATTEMPTS {
                let (attest, signature) = w
                    .ctx
                    .execute_with_sessions((Some(AuthSession::Password), None, None), |ctx| {
                        ctx.quote(ak, data.clone(), SignatureScheme::Null, selection.clone())
                    })
                    .map_err(cmd("TPM2_Quote with the ak"))?;
                let quote = signed("TPM2_Quote", &attest, &signature)?;
                let pcrs = w.pcr_read(&QUOTE_PCRS)?;
                let parsed = verify::Attest::parse(&quote.attest).map_err(|source| {
                    TpmError::Verify {
                        what: "quote",
                        source,
                    }
                })?;
                let verify::Attested::Quote { pcr_digest, .. } = &parsed.attested else {
                    return Err(TpmError::Unexpected {
                        command: "TPM2_Quote",
                        reason: "the attestation is not a quote".to_owned(),
                    });
                };
                let computed = verify::pcr_digest(&QUOTE_PCRS, &pcrs).map_err(|source| {
                    TpmError::Verify {
                        what: "pcr values",
                        source,
                    }
                })?;
                if computed.as_bytes().as_slice() == pcr_digest.as_slice() {
                    return Ok(Quote { quote, pcrs });
                }
                tracing::debug!("a pcr changed between quote and pcr read: quoting again");
                last = Some(computed);
            }
            Err(TpmError::Unexpected {
                command: "TPM2_Quote",
                reason: format!(
                    "pcrs kept changing between quote and read ({QUOTE_ATTEMPTS} attempts, last read digest {})",
                    last.map_or_else(String::new, |d| d.hex())
                ),
            })
        })
    }

    fn sign_digest(&mut self, digest: &Digest) -> Result<Vec<u8>> {
        let tpm_digest =
            TpmDigest::try_from(digest.as_bytes().to_vec()).map_err(cmd("sign digest"))?;
        // A null hashcheck ticket: the node key is not restricted, so the TPM signs any digest.
        let ticket = TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: TPM2B_DIGEST::default(),
        }
        .try_into()
        .map_err(cmd("null hashcheck ticket"))?;
        let key = self.load_node_key()?;
        let signature = self.with_loaded(key, |w| {
            w.ctx
                .execute_with_sessions((Some(AuthSession::Password), None, None), |ctx| {
                    ctx.sign(key, tpm_digest, SignatureScheme::Null, ticket)
                })
                .map_err(cmd("TPM2_Sign with the node key"))
        })?;
        let Signature::EcDsa(ecdsa) = signature else {
            return Err(TpmError::Unexpected {
                command: "TPM2_Sign",
                reason: format!(
                    "expected an ecdsa signature, got {:?}",
                    signature.algorithm()
                ),
            });
        };
        let sig = EcdsaSignature::from_components(
            ecdsa.signature_r().value(),
            ecdsa.signature_s().value(),
        )
        .map_err(|source| TpmError::Verify {
            what: "node key signature",
            source,
        })?;
        Ok(sig.to_der())
    }

    fn pcr_extend(&mut self, pcr: u8, digest: &Digest) -> Result<()> {
        let handle = pcr_handle(pcr)?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            TpmDigest::try_from(digest.as_bytes().to_vec()).map_err(cmd("extend digest"))?,
        );
        self.ctx
            .execute_with_sessions((Some(AuthSession::Password), None, None), |ctx| {
                ctx.pcr_extend(handle, values)
            })
            .map_err(cmd("TPM2_PCR_Extend"))
    }

    fn pcr_reset(&mut self, pcr: u8) -> Result<()> {
        let handle = pcr_handle(pcr)?;
        self.ctx
            .execute_with_sessions((Some(AuthSession::Password), None, None), |ctx| {
                ctx.pcr_reset(handle)
            })
            .map_err(cmd("TPM2_PCR_Reset"))
    }

    fn pcr_read(&mut self, pcrs: &[u8]) -> Result<PcrValues> {
        let mut values = PcrValues::new();
        // TPM2_PCR_Read returns at most 8 digests per call.
        for chunk in pcrs.chunks(8) {
            let (_, read, digests) = self
                .ctx
                .execute_without_session(|ctx| ctx.pcr_read(pcr_selection(chunk)?))
                .map_err(cmd("TPM2_PCR_Read"))?;
            let returned: Vec<u8> = read
                .get_selections()
                .iter()
                .flat_map(|s| {
                    s.selected()
                        .into_iter()
                        .map(|slot| u32::from(slot).trailing_zeros() as u8)
                })
                .collect();
            if returned != chunk || digests.value().len() != chunk.len() {
                return Err(TpmError::Unexpected {
                    command: "TPM2_PCR_Read",
                    reason: format!(
                        "asked for sha256 pcrs {chunk:?}, got {returned:?} with {} digests (is the sha256 bank active?)",
                        digests.value().len()
                    ),
                });
            }
            for (&pcr, digest) in chunk.iter().zip(digests.value()) {
                let bytes: [u8; 32] =
                    digest
                        .value()
                        .try_into()
                        .map_err(|_| TpmError::Unexpected {
                            command: "TPM2_PCR_Read",
                            reason: format!("pcr {pcr} is {} bytes, not 32", digest.value().len()),
                        })?;
                values.insert(pcr, Digest::from_bytes(bytes));
            }
        }
        Ok(values)
    }

    fn activate_credential(&mut self, challenge: verify::CredentialChallenge) -> Result<Vec<u8>> {
        let id_object =
            IdObject::try_from(challenge.id_object).map_err(cmd("credential blob size"))?;
        let secret = EncryptedSecret::try_from(challenge.encrypted_secret)
            .map_err(cmd("encrypted secret size"))?;
        let ek = self.ek_handle()?;
        let ak = self.load_ak()?;
        self.with_loaded(ak, |w| {
            // The EK authorises through its policy: PolicySecret(TPM_RH_ENDORSEMENT).
            let session = w
                .ctx
                .start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
                .map_err(cmd("StartAuthSession (ek policy)"))?
                .ok_or_else(|| TpmError::Unexpected {
                    command: "StartAuthSession",
                    reason: "no session returned".to_owned(),
                })?;
            let result = (|| {
                let policy = PolicySession::try_from(session).map_err(cmd("ek policy session"))?;
                w.ctx
                    .execute_with_sessions((Some(AuthSession::Password), None, None), |ctx| {
                        ctx.policy_secret(
                            policy,
                            AuthHandle::Endorsement,
                            Nonce::default(),
                            TpmDigest::default(),
                            Nonce::default(),
                            None,
                        )
                    })
                    .map_err(cmd("PolicySecret(TPM_RH_ENDORSEMENT)"))?;
                w.ctx
                    .execute_with_sessions(
                        (Some(AuthSession::Password), Some(session), None),
                        |ctx| ctx.activate_credential(ak, ek, id_object, secret),
                    )
                    .map_err(cmd("TPM2_ActivateCredential"))
            })();
            let flushed = w
                .ctx
                .flush_context(SessionHandle::from(session).into())
                .map_err(cmd("FlushContext of the ek policy session"));
            let digest = result?;
            flushed?;
            Ok(digest.value().to_vec())
        })
    }
}

/// The signed bytes and signature of an attestation command, marshalled.
fn signed(
    command: &'static str,
    attest: &tss_esapi::structures::Attest,
    signature: &Signature,
) -> Result<SignedAttest> {
    Ok(SignedAttest {
        attest: attest.marshall().map_err(cmd(command))?,
        signature: signature.marshall().map_err(cmd(command))?,
    })
}

fn pcr_handle(pcr: u8) -> Result<PcrHandle> {
    PcrHandle::try_from(u32::from(pcr)).map_err(cmd("pcr index"))
}

fn pcr_selection(
    pcrs: &[u8],
) -> std::result::Result<tss_esapi::structures::PcrSelectionList, tss_esapi::Error> {
    let slots = pcrs
        .iter()
        .map(|&pcr| PcrSlot::try_from(1u32.checked_shl(u32::from(pcr)).unwrap_or(0)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| TpmError::State {
        path: path.to_owned(),
        source,
    })
}

/// Write a file 0600 atomically (temp + rename).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let state = |source| TpmError::State {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(state)?;
    file.write_all(bytes).map_err(state)?;
    file.sync_all().map_err(state)?;
    std::fs::rename(&tmp, path).map_err(state)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        TpmError::State {
            path: path.to_owned(),
            source,
        }
    })
}
