//! `kiln pipeline …`: signing pipeline definitions (the signer side of kilnd's job admission).
//!
//! `kiln pipeline sign FILE --key KEY.pem` writes `FILE.dsse`, a DSSE envelope over FILE's exact
//! bytes ([`kiln_common::definition`]); `kiln submit FILE` sends it along when it exists.
//! `kiln pipeline keygen --out NAME` creates a P-256 key pair: `NAME.pem` (PKCS#8, mode 0600) and
//! `NAME.pub` (the public key to list under `signers` in the node's policy).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use kiln_common::definition::{self, SIGNATURE_SUFFIX};
use kiln_common::dsse::Envelope;
use kiln_common::keys::SigningKey;

use crate::exit;

/// `kiln pipeline` subcommands.
#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Sign a pipeline file: writes FILE.dsse (DSSE over the file's exact bytes).
    Sign {
        /// Pipeline file.
        file: PathBuf,
        /// Private key: PKCS#8 PEM, ECDSA P-256 (`kiln pipeline keygen`, or
        /// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`).
        #[arg(long, value_name = "KEY.pem")]
        key: PathBuf,
        /// Where to write the envelope (default: FILE.dsse).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Create a signing key pair: NAME.pem (private, 0600) and NAME.pub (public).
    Keygen {
        /// Path prefix of the two files (existing files are never overwritten).
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
    },
}

/// `FILE.dsse` next to `file`.
pub fn signature_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".");
    name.push(SIGNATURE_SUFFIX);
    PathBuf::from(name)
}

/// The envelope next to a pipeline file, if there is one.
pub fn load_signature(file: &Path) -> anyhow::Result<Option<Envelope>> {
    let path = signature_path(file);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a DSSE envelope", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Run a `kiln pipeline` subcommand.
pub fn run(cmd: PipelineCommand, json: bool) -> anyhow::Result<u8> {
    match cmd {
        PipelineCommand::Sign { file, key, out } => {
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            // Sign only what the daemon would accept: a definition that does not parse is refused
            // there anyway, and a signature should vouch for a reviewed, valid file.
            let source = String::from_utf8_lossy(&text);
            kiln_common::spec::parse(&source, &file.display().to_string())
                .map_err(|e| anyhow::anyhow!("invalid pipeline, not signing:\n{e}"))?;
            let pem = std::fs::read_to_string(&key)
                .with_context(|| format!("reading key {}", key.display()))?;
            let signing_key = SigningKey::from_pkcs8_pem(&pem)
                .with_context(|| format!("key {}", key.display()))?;
            let envelope = definition::sign(&text, &signing_key)?;
            let out = out.unwrap_or_else(|| signature_path(&file));
            std::fs::write(&out, envelope.to_json_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            let keyid = signing_key.public_key().keyid();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "signature": out, "keyid": keyid, "pipeline": file })
                );
            } else {
                println!("signed {} with {keyid}: {}", file.display(), out.display());
            }
            Ok(exit::OK)
        }
        PipelineCommand::Keygen { out } => {
            let (key, pkcs8) = SigningKey::generate()?;
            let private = out.with_extension("pem");
            let public = out.with_extension("pub");
            write_new(&private, pkcs8.to_pem().as_bytes(), 0o600)?;
            write_new(&public, key.public_key().to_pem().as_bytes(), 0o644)?;
            let keyid = key.public_key().keyid();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "private": private, "public": public, "keyid": keyid })
                );
            } else {
                println!(
                    "private key {} (0600)\npublic key  {}\nkey id      {keyid}",
                    private.display(),
                    public.display()
                );
            }
            Ok(exit::OK)
        }
    }
}

/// Create `path` with `mode`; an existing file is an error (keys are never overwritten).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (existing files are never overwritten)",
                path.display()
            )
        })?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn keygen_then_sign_writes_a_verifiable_envelope() {
        let dir = tempfile::tempdir().unwrap();
        run(
            PipelineCommand::Keygen {
                out: dir.path().join("release"),
            },
            true,
        )
        .unwrap();
        let private = dir.path().join("release.pem");
        assert_eq!(
            std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let file = dir.path().join("p.toml");
        let text = "version = 1\nname = \"x\"\n[[steps]]\nname = \"a\"\nkind = \"run\"\nrun = [\"true\"]\n";
        std::fs::write(&file, text).unwrap();
        run(
            PipelineCommand::Sign {
                file: file.clone(),
                key: private,
                out: None,
            },
            true,
        )
        .unwrap();
        let envelope = load_signature(&file).unwrap().unwrap();
        let public = kiln_common::keys::PublicKey::from_pem(
            &std::fs::read_to_string(dir.path().join("release.pub")).unwrap(),
        )
        .unwrap();
        definition::verify(&envelope, text.as_bytes(), &[public]).unwrap();
        // Keys are never overwritten.
        assert!(
            run(
                PipelineCommand::Keygen {
                    out: dir.path().join("release"),
                },
                true,
            )
            .is_err()
        );
    }
}
