//! `kiln node …` (the operator side of the node attestor) and the trust arguments of
//! `kiln verify`.
//!
//! - `kiln node enroll --ek-ca CA.pem --out node.json`: check the node's EK certificate against
//!   the CA bundle and its EK public against the certificate, challenge its AK with
//!   TPM2_MakeCredential (pure Rust, here), let kilnd answer with ActivateCredential
//!   (`POST /v1/node/activate`), check the node key certification, and write the enrolled node
//!   record ([`NodeRecord`]).
//! - `kiln node show`: the TPM identity (node id, EK issuer, AK name, node key, key kind).
//! - `kiln node rotate-key`: new TPM node key + certification; certificates and bundles made
//!   with the old key keep verifying until it is revoked.
//! - `kiln node revoke --operator-key KEY --node-key KEYID --out revocations.json`: a revocation
//!   list signed by the operator key, honoured by `kiln verify --revocations … --operator-key …`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kiln_common::attest::{self, CredentialChallenge, PcrValues};
use kiln_common::keys::{PublicKey, SigningKey};
use kiln_common::trust::{
    ActivateResponse, NodeEndorsement, NodeRecord, RevocationList, TpmTrust, Trust,
    load_revocations,
};

use crate::client::Client;
use crate::exit;

/// `kiln node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Enroll the node (operator side): EK certificate → CA bundle, credential activation of the
    /// AK, node key certification; writes the enrolled node record `kiln verify --node` trusts.
    Enroll {
        /// CA bundle (PEM) that issued the node's EK certificate (swtpm: KILN_TPM_EK_CA).
        #[arg(long, value_name = "PEM")]
        ek_ca: PathBuf,
        /// Where to write the node record (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Show the node's TPM identity.
    Show,
    /// Create and certify a new TPM node key (root only).
    RotateKey,
    /// Write a revocation list of node keys, signed by an operator key.
    Revoke {
        /// Operator private key (PEM PKCS#8).
        #[arg(long, value_name = "PEM")]
        operator_key: PathBuf,
        /// keyid (`sha256:…`) of a node key to revoke, repeatable.
        #[arg(long = "node-key", value_name = "KEYID", required = true)]
        node_keys: Vec<String>,
        /// An existing signed list to extend (verified with the operator key).
        #[arg(long, value_name = "FILE")]
        extend: Option<PathBuf>,
        /// Where to write the signed list (overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

fn ak_name(ak_public: &[u8]) -> String {
    attest::TpmPublic::parse(ak_public)
        .map_or_else(|_| "(unparsable)".to_owned(), |ak| hex::encode(ak.name()))
}

/// Run a `kiln node` subcommand.
pub async fn run(command: NodeCommand, client: &Client, json: bool) -> anyhow::Result<u8> {
    match command {
        NodeCommand::Enroll { ek_ca, out } => enroll(client, &ek_ca, &out, json).await,
        NodeCommand::Show => {
            let identity: NodeEndorsement = client.get_json("/v1/node/identity").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&identity)?);
            } else {
                print_identity(&identity);
            }
            Ok(exit::OK)
        }
        NodeCommand::RotateKey => {
            let identity: NodeEndorsement = client
                .post_json("/v1/node/rotate-key", &serde_json::json!({}))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&identity)?);
            } else {
                println!("node key rotated: new node key {}", identity.node_keyid);
                println!(
                    "  bundles signed with the previous key keep verifying until you revoke it (kiln node revoke)"
                );
            }
            Ok(exit::OK)
        }
        NodeCommand::Revoke {
            operator_key,
            node_keys,
            extend,
            out,
        } => {
            let pem = String::from_utf8(read(&operator_key, "operator key")?)
                .context("operator key is not text")?;
            let key = SigningKey::from_pkcs8_pem(&pem)
                .with_context(|| format!("operator key {}", operator_key.display()))?;
            let mut list = match extend {
                Some(path) => load_revocations(&read(&path, "revocation list")?, &key.public_key())
                    .with_context(|| format!("revocation list {}", path.display()))?,
                None => RevocationList::default(),
            };
            for keyid in node_keys {
                if !keyid.starts_with("sha256:") || keyid.len() != 71 {
                    bail!("node key id must be sha256:<64 hex>, got {keyid:?}");
                }
                list.revoked_node_keys.insert(keyid);
            }
            list.issued_on = now_rfc3339();
            let envelope = list.sign(&key)?;
            std::fs::write(&out, envelope.to_json_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "revocation list {} signed by {}: {} node key(s) revoked",
                out.display(),
                key.public_key().keyid(),
                list.revoked_node_keys.len()
            );
            Ok(exit::OK)
        }
    }
}

fn print_identity(identity: &NodeEndorsement) {
    let issuer = x509_issuer(&identity.ek_certificate);
    println!("node id        {}", identity.node_id);
    println!("key kind       tpm (node key resident in the tpm, certified by the ak)");
    println!("tcti           {}", identity.tcti);
    println!(
        "ek certificate sha256:{} (issuer {issuer})",
        identity.node_id
    );
    println!("ak name        {}", ak_name(&identity.ak_public));
    println!("node key       {}", identity.node_keyid);
    println!(
        "measured start {} event(s) in pcr {}",
        identity.event_log.len(),
        attest::MEASURED_START_PCR
    );
    for event in &identity.event_log {
        println!("  {} {}", event.digest, event.description);
    }
}

fn x509_issuer(der: &[u8]) -> String {
    // Without a CA bundle, only the claimed issuer can be shown.
    attest::verify_ek_certificate(der, &[], 0)
        .err()
        .and_then(|e| match e {
            attest::AttestError::EkIssuerUnknown { issuer } => Some(issuer),
            _ => None,
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

async fn enroll(client: &Client, ek_ca: &Path, out: &Path, json: bool) -> anyhow::Result<u8> {
    if out.exists() {
        bail!(
            "{} exists: choose another --out (node records are never overwritten)",
            out.display()
        );
    }
    let ca = attest::parse_ca_bundle(&read(ek_ca, "ek ca bundle")?)
        .with_context(|| format!("ek ca bundle {}", ek_ca.display()))?;
    let identity: NodeEndorsement = client.get_json("/v1/node/identity").await?;
    let (enrollment, challenge): (_, CredentialChallenge) = attest::start_enrollment(
        &identity.ek_certificate,
        &ca,
        &identity.ek_public,
        &identity.ak_public,
        now_unix(),
    )
    .context("enrollment refused")?;
    let ek = attest::verify_ek_certificate(&identity.ek_certificate, &ca, now_unix())?;
    if !json {
        println!(
            "ek certificate   verified against {} (issuer {})",
            ek_ca.display(),
            ek.issuer
        );
        println!("ek public        matches the ek certificate");
        println!(
            "credential       made for ak {} (TPM2_MakeCredential)",
            ak_name(&identity.ak_public)
        );
    }
    let answer: ActivateResponse = client.post_json("/v1/node/activate", &challenge).await?;
    let enrolled = enrollment
        .finish(&answer.secret)
        .context("enrollment failed")?;
    if !json {
        println!("activation       the node answered: the ak lives in the tpm of the ek");
    }
    let node_key = attest::verify_certify(
        &identity.ak_public,
        &identity.node_key_certify,
        &identity.node_key_public,
        &[],
    )
    .context("node key certification does not verify")?;
    if !json {
        println!(
            "node key         {} certified by the ak (TPM2_Certify)",
            node_key.keyid()
        );
    }
    let record = NodeRecord {
        node_id: kiln_common::trust::node_id(&enrolled.ek_certificate_digest),
        enrolled,
        node_key_public: identity.node_key_public,
        node_keyid: node_key.keyid(),
        node_key_certify: identity.node_key_certify,
        ek_issuer: ek.issuer,
        enrolled_on: now_rfc3339(),
    };
    let text = serde_json::to_string_pretty(&record)?;
    std::fs::write(out, format!("{text}\n"))
        .with_context(|| format!("writing {}", out.display()))?;
    if json {
        println!("{text}");
    } else {
        println!("enrolled node    {} → {}", record.node_id, out.display());
    }
    Ok(exit::OK)
}

/// How `kiln verify` decides which signers to trust.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// Trusted node public key (PEM), repeatable: the raw-key path (software-key nodes, or a
    /// pinned key). Obtain it out of band (`kiln node --public-key`).
    #[arg(
        long = "trusted-key",
        value_name = "PEM",
        required_unless_present = "node",
        conflicts_with = "node"
    )]
    pub trusted_keys: Vec<PathBuf>,
    /// Accept attestations whose signingKey.kind is "software" (with --trusted-key).
    #[arg(long)]
    pub allow_software_key: bool,
    /// TPM-rooted verification: the enrolled node record (`kiln node enroll --out`).
    #[arg(long, value_name = "FILE", requires = "ek_ca")]
    pub node: Option<PathBuf>,
    /// The EK CA bundle (PEM) the node's EK certificate must chain to.
    #[arg(long, value_name = "PEM", requires = "node")]
    pub ek_ca: Option<PathBuf>,
    /// Expected PCR values (JSON object, pcr index → "sha256:…"): the quote must match them.
    #[arg(long, value_name = "FILE", requires = "node")]
    pub pcr_policy: Option<PathBuf>,
    /// Revocation list of node keys (signed with --operator-key).
    #[arg(long, value_name = "FILE", requires = "operator_key")]
    pub revocations: Option<PathBuf>,
    /// Operator public key (PEM) that signs the revocation list.
    #[arg(long, value_name = "PEM", requires = "revocations")]
    pub operator_key: Option<PathBuf>,
}

/// Loaded trust material.
#[derive(Debug)]
pub enum TrustRoot {
    /// Raw keys.
    Keys {
        /// The keys.
        keys: Vec<PublicKey>,
        /// `--allow-software-key`.
        allow_software_key: bool,
    },
    /// TPM-rooted.
    Tpm(Box<TpmTrust>),
}

impl TrustRoot {
    /// The library's view.
    pub fn trust(&self) -> Trust<'_> {
        match self {
            Self::Keys {
                keys,
                allow_software_key,
            } => Trust::Keys {
                keys,
                allow_software_key: *allow_software_key,
            },
            Self::Tpm(tpm) => Trust::Tpm(tpm),
        }
    }
}

impl TrustArgs {
    /// Read and check every trust file. Errors are bad local input.
    pub fn load(&self) -> Result<TrustRoot, String> {
        let text = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
        };
        let revocations = match (&self.revocations, &self.operator_key) {
            (Some(list), Some(operator)) => {
                let pem = String::from_utf8_lossy(&text(operator, "operator key")?).into_owned();
                let operator = PublicKey::from_pem(&pem)
                    .map_err(|e| format!("operator key {}: {e}", operator.display()))?;
                Some(
                    load_revocations(&text(list, "revocation list")?, &operator)
                        .map_err(|e| format!("revocation list {}: {e}", list.display()))?,
                )
            }
            _ => None,
        };
        if let (Some(node), Some(ek_ca)) = (&self.node, &self.ek_ca) {
            let record: NodeRecord = serde_json::from_slice(&text(node, "node record")?)
                .map_err(|e| format!("node record {}: {e}", node.display()))?;
            let ek_ca = attest::parse_ca_bundle(&text(ek_ca, "ek ca bundle")?)
                .map_err(|e| format!("ek ca bundle {}: {e}", ek_ca.display()))?;
            let pcr_policy: PcrValues = match &self.pcr_policy {
                Some(path) => serde_json::from_slice(&text(path, "pcr policy")?)
                    .map_err(|e| format!("pcr policy {}: {e}", path.display()))?,
                None => PcrValues::new(),
            };
            return Ok(TrustRoot::Tpm(Box::new(TpmTrust {
                ek_ca,
                node: record,
                pcr_policy,
                revocations,
                at: now_unix(),
            })));
        }
        let mut keys = Vec::new();
        for k in &self.trusted_keys {
            let pem = String::from_utf8_lossy(&text(k, "trusted key")?).into_owned();
            keys.push(
                PublicKey::from_pem(&pem)
                    .map_err(|e| format!("trusted key {}: {e}", k.display()))?,
            );
        }
        Ok(TrustRoot::Keys {
            keys,
            allow_software_key: self.allow_software_key,
        })
    }
}

/// Print the TPM links `kiln verify` checked, from the EK certificate down to the artifact.
pub fn print_node_chain(
    node: &kiln_common::trust::VerifiedNodeChain,
    artifact: &kiln_common::verify::VerifiedArtifact,
) {
    println!("  trust chain (tpm-rooted):");
    println!(
        "    1 ek certificate  {} issued by {:?}: chains to the ek ca bundle, is the enrolled node's",
        node.ek_certificate, node.ek_issuer
    );
    println!(
        "    2 attestation key {} (enrolled: credential activation proved it is in that tpm)",
        node.ak_name
    );
    println!(
        "    3 quote           signed by the ak over pcrs {:?}, qualifying data = sha256(node key || job nonce {})",
        node.pcrs.keys().collect::<Vec<_>>(),
        node.nonce
    );
    println!(
        "    4 measured start  {} event(s) replay to pcr {}{}",
        node.events,
        attest::MEASURED_START_PCR,
        if node.pcr_policy {
            "; expected-pcr policy holds"
        } else {
            ""
        }
    );
    println!(
        "    5 node key        {} certified by the ak (TPM2_Certify){}",
        node.node_keyid,
        if node.revocations {
            ", not revoked"
        } else {
            ""
        }
    );
    println!(
        "    6 workload certs  job and step certificates signed by the node key, SAN urn:kiln:node:{}/job/{}/…, valid over each statement",
        &node.node_id[..16.min(node.node_id.len())],
        artifact.job_id
    );
    println!(
        "    7 dsse            step {:?} signed by its workload key {}",
        artifact.step, artifact.signer_keyid
    );
}
