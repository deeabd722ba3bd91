//! `kiln export JOB DIR [--oci]`: everything needed to verify a job's artifacts offline, in one
//! directory; and `kiln rebuild JOB [STEP]`.
//!
//! Layout of DIR:
//! - the job's final artifacts (paths as attested) and `kiln-bundle.json` next to them, so
//!   `kiln verify DIR/<artifact> --trusted-key DIR/keys/node.pub` works as is;
//! - `attestations/`: every DSSE envelope of the bundle as its own file (`job.dsse.json`,
//!   `step.<step>.dsse.json`, `trace.<step>.dsse.json`, `<step>.<name>.dsse.json` for SBOM and
//!   test results);
//! - `keys/node.pub`: the node public key (PEM) for raw-key verification; TPM-rooted
//!   verification needs the verifier's own enrolled node record and EK CA, and the bundle
//!   carries the node identity document and the workload certificate chains;
//! - `export.json`: what was written;
//! - with `--oci`, `oci/`: an OCI image layout (see `kiln_common::oci`), validated after writing.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kiln_common::Digest;
use kiln_common::api::{Artifact, JobState, JobStatus, NodeInfo, RebuildReport, RebuildRequest};
use kiln_common::dsse::Envelope;
use kiln_common::oci::{self, Attachment};
use kiln_common::verify::Bundle;

use crate::client::Client;
use crate::commands::{BUNDLE_FILE, safe_join, write_new};
use crate::exit;

fn envelope_bytes(e: &Envelope) -> Vec<u8> {
    e.to_json_bytes()
}

fn predicate_type(e: &Envelope) -> Option<String> {
    e.decode_statement::<serde_json::Value>()
        .ok()
        .map(|s| s.predicate_type)
}

/// File name of an attestation: no `/` or `:` from step or byproduct names.
fn file_name(parts: &[&str]) -> String {
    let clean: Vec<String> = parts.iter().map(|p| p.replace(['/', ':'], "-")).collect();
    format!("{}.dsse.json", clean.join("."))
}

/// Every envelope of a bundle: (file name, envelope).
fn envelopes(bundle: &Bundle) -> Vec<(String, &Envelope)> {
    let mut out = vec![(file_name(&["job"]), &bundle.job)];
    for (step, e) in &bundle.steps {
        out.push((file_name(&["step", step]), e));
    }
    for (step, e) in &bundle.traces {
        out.push((file_name(&["trace", step]), e));
    }
    for a in &bundle.attestations {
        out.push((file_name(&[&a.step, &a.name]), &a.envelope));
    }
    out
}

/// `kiln export`.
pub async fn export(
    client: &Client,
    job: &str,
    dir: &Path,
    with_oci: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let st: JobStatus = client.get_json(&format!("/v1/jobs/{job}")).await?;
    if st.state != JobState::Succeeded {
        eprintln!(
            "warning: job {job} is {}: its artifacts will not verify",
            st.state.as_str()
        );
    }
    let list: Vec<Artifact> = client
        .get_json(&format!("/v1/jobs/{job}/artifacts"))
        .await?;
    let bundle_bytes = client
        .get_bytes(&format!("/v1/jobs/{job}/attestations"))
        .await?;
    let bundle: Bundle =
        serde_json::from_slice(&bundle_bytes).context("decoding the job's attestation bundle")?;
    let node: NodeInfo = client.get_json("/v1/node").await?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "export directory {} is not empty (existing files are never overwritten)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir.join("attestations"))
        .and_then(|()| std::fs::create_dir_all(dir.join("keys")))
        .with_context(|| format!("creating {}", dir.display()))?;

    let mut artifacts: Vec<(String, PathBuf, Digest)> = Vec::new();
    for a in list.iter().filter(|a| a.final_output) {
        let dest = safe_join(dir, &a.path)?;
        crate::commands::download_verified(client, &a.digest, &a.path, &dest).await?;
        artifacts.push((a.path.clone(), dest, a.digest));
    }
    if artifacts.is_empty() {
        eprintln!("warning: job {job} has no final artifacts");
    }
    write_new(&dir.join(BUNDLE_FILE), &bundle_bytes)?;
    let mut attestations = Vec::new();
    let mut attachments = Vec::new();
    for (name, envelope) in envelopes(&bundle) {
        let bytes = envelope_bytes(envelope);
        write_new(&dir.join("attestations").join(&name), &bytes)?;
        attestations.push(format!("attestations/{name}"));
        attachments.push(Attachment {
            title: name,
            media_type: oci::DSSE_MEDIA_TYPE.into(),
            predicate_type: predicate_type(envelope),
            bytes,
        });
    }
    write_new(
        &dir.join("keys").join("node.pub"),
        node.public_key_pem.as_bytes(),
    )?;
    let oci_summary = if with_oci {
        attachments.push(Attachment {
            title: BUNDLE_FILE.into(),
            media_type: kiln_common::intoto::BUNDLE_MEDIA_TYPE.into(),
            predicate_type: None,
            bytes: bundle_bytes.to_vec(),
        });
        let layers: Vec<(String, PathBuf)> = artifacts
            .iter()
            .map(|(name, path, _)| (name.clone(), path.clone()))
            .collect();
        let oci_dir = dir.join("oci");
        let summary = oci::write_layout(&oci_dir, job, &layers, &attachments)?;
        // Check what was written, as a consumer will.
        let report = oci::validate_layout(&oci_dir)?;
        Some((summary, report))
    } else {
        None
    };
    let manifest = serde_json::json!({
        "job": job,
        "artifacts": artifacts.iter().map(|(name, _, digest)| serde_json::json!({ "path": name, "digest": digest })).collect::<Vec<_>>(),
        "bundle": BUNDLE_FILE,
        "attestations": attestations,
        "nodePublicKey": "keys/node.pub",
        "nodeKeyKind": node.key_kind,
        "builderId": node.builder_id,
        "oci": oci_summary.as_ref().map(|(s, _)| serde_json::json!({ "layout": "oci", "manifest": s.manifest, "referrers": s.referrers })),
    });
    write_new(
        &dir.join("export.json"),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    if json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &manifest)?;
        println!();
    } else {
        for (name, _, digest) in &artifacts {
            println!("artifact     {digest} {name}");
        }
        println!(
            "attestations {} DSSE envelopes in attestations/",
            attestations.len()
        );
        println!("bundle       {BUNDLE_FILE}");
        println!("node key     keys/node.pub ({} key)", node.key_kind);
        if let Some((summary, report)) = &oci_summary {
            println!(
                "oci layout   oci/ manifest {} with {} referrers ({} blobs, validated)",
                summary.manifest, report.referrers, report.blobs
            );
        }
        println!(
            "verify with  kiln verify {}/<artifact> --trusted-key {}/keys/node.pub{}",
            dir.display(),
            dir.display(),
            if node.key_kind == "software" {
                " --allow-software-key"
            } else {
                " (or --node NODE.json --ek-ca EK-CA.pem)"
            }
        );
    }
    Ok(exit::OK)
}

/// `kiln rebuild`: exit 0 when every rebuilt step matches its attested outputs.
pub async fn rebuild(
    client: &Client,
    job: &str,
    step: Option<&str>,
    json: bool,
) -> anyhow::Result<u8> {
    let report: RebuildReport = client
        .post_json(
            &format!("/v1/jobs/{job}/rebuild"),
            &RebuildRequest {
                step: step.map(str::to_owned),
            },
        )
        .await?;
    if json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        println!();
    } else {
        for s in &report.steps {
            let took = s
                .duration_ms
                .map(|d| format!(" ({:.2}s)", d as f64 / 1000.0))
                .unwrap_or_default();
            // A worker that ran without the observer says so on its line.
            let took = if s.observed {
                took
            } else {
                format!("{took} UNOBSERVED")
            };
            match (&s.error, s.result.matches) {
                (Some(e), _) => println!("{:<16} ERROR {e}", s.step),
                (None, true) => println!("{:<16} match{took}", s.step),
                (None, false) => {
                    println!(
                        "{:<16} DIFFERS{took}: {} file(s)",
                        s.step,
                        s.result.differences.len()
                    );
                    for d in &s.result.differences {
                        let show = |x: Option<Digest>| {
                            x.map_or_else(|| "absent".into(), |d| d.to_string())
                        };
                        println!(
                            "    {}\n      attested {}\n      rebuilt  {}",
                            d.path,
                            show(d.first),
                            show(d.second)
                        );
                    }
                }
            }
        }
        if report.steps.is_empty() {
            println!("no step of job {job} could be rebuilt");
        }
    }
    Ok(if report.matches {
        exit::OK
    } else {
        exit::FAILED
    })
}
