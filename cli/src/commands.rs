//! The subcommands.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Subcommand;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use kiln_common::Digest;
use kiln_common::api::{
    Artifact, AttestationRef, BlobRef, Event, EventKind, JobState, JobStatus, JobSummary, NodeInfo,
    SubmitJobRequest, SubmitJobResponse,
};
use kiln_common::verify::{ArtifactRef, Bundle, verify_artifact_with};

use crate::client::{ApiFailure, Client, Unreachable};
use crate::exit;

/// Name of the bundle file `kiln artifacts` writes next to the artifacts.
pub const BUNDLE_FILE: &str = "kiln-bundle.json";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a pipeline file; its source directories are uploaded first.
    Submit {
        /// Pipeline file (TOML, see docs/pipeline.md).
        file: PathBuf,
        /// Parameter value, repeatable: --param greeting=hi.
        #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Follow the job: live step progress and logs; exit code reflects the job's outcome.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// List recent jobs.
    Jobs {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show a job and its steps.
    Status {
        /// Job id.
        job: String,
    },
    /// Print the stored log of a step (all steps if none is named).
    Logs {
        /// Job id.
        job: String,
        /// Step name.
        step: Option<String>,
    },
    /// Follow a running job's events until it ends.
    Follow {
        /// Job id.
        job: String,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// Job id.
        job: String,
    },
    /// Download a job's final artifacts (or all outputs) and its attestation bundle.
    Artifacts {
        /// Job id.
        job: String,
        /// Destination directory (created; existing files are never overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Every step's outputs, not only the final ones (written under DIR/<step>/).
        #[arg(long)]
        all: bool,
    },
    /// Export a job for offline verification: final artifacts, the bundle, every attestation
    /// (DSSE JSON) and the node public key; with --oci also an OCI image layout.
    Export {
        /// Job id.
        job: String,
        /// Destination directory (created; must be empty).
        dir: PathBuf,
        /// Also write DIR/oci: an OCI image layout with the artifacts as layers and the
        /// attestations as referrers.
        #[arg(long)]
        oci: bool,
    },
    /// Run a finished job's build and publish steps again against their recorded inputs and
    /// compare the outputs with the attested ones (exit 1 on any difference).
    Rebuild {
        /// Job id.
        job: String,
        /// Only this step (any step with a recorded run).
        step: Option<String>,
    },
    /// Verify an artifact against its attestation bundle, fully offline.
    Verify {
        /// The artifact file.
        artifact: PathBuf,
        /// Bundle file; default: kiln-bundle.json next to the artifact.
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
        /// Trust root: --node + --ek-ca (TPM-rooted) or --trusted-key.
        #[command(flatten)]
        trust: crate::node::TrustArgs,
        /// Also require every step of the artifact's chain to have a signed, complete runtime
        /// trace (no lost events, observed from the first instruction to the last exit).
        #[arg(long)]
        require_complete_trace: bool,
        /// Rego policy over the verified chain (docs/policy.md): its `data.kiln.deny` set of
        /// messages must be empty.
        #[arg(long, value_name = "FILE.rego")]
        policy: Option<PathBuf>,
    },
    /// Sign pipeline definitions and create signing keys.
    Pipeline {
        #[command(subcommand)]
        command: crate::pipeline::PipelineCommand,
    },
    /// Show a step's runtime trace: process tree (argv, exit, duration) and summary; with
    /// --json the trace's NDJSON records. Exit 1 if a trace is incomplete.
    Trace {
        /// Job id.
        job: String,
        /// Step name; default: every attested step.
        step: Option<String>,
    },
    /// Attestations that have this digest (or this file's digest) as a subject.
    Attestations {
        /// `sha256:<hex>` or a file path.
        subject: String,
    },
    /// Build environment images: import a root filesystem (directory or tar), list images.
    Image {
        #[command(subcommand)]
        command: crate::image::ImageCommand,
    },
    /// Show the node identity; enroll the node, rotate its key, revoke node keys.
    Node {
        /// Print only the node public key (PEM).
        #[arg(long)]
        public_key: bool,
        /// What to do (default: a summary of the node).
        #[command(subcommand)]
        action: Option<crate::node::NodeCommand>,
    },
}

/// Exit code for an error.
pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Unreachable>().is_some() {
        return exit::UNREACHABLE;
    }
    if let Some(f) = e.downcast_ref::<ApiFailure>() {
        return match f.status {
            StatusCode::FORBIDDEN => exit::FORBIDDEN,
            StatusCode::NOT_FOUND => exit::NOT_FOUND,
            StatusCode::BAD_REQUEST
            | StatusCode::UNPROCESSABLE_ENTITY
            | StatusCode::PAYLOAD_TOO_LARGE => exit::INVALID,
            _ => exit::FAILED,
        };
    }
    if e.downcast_ref::<Invalid>().is_some() {
        return exit::INVALID;
    }
    exit::FAILED
}

/// Bad local input (pipeline file, parameter syntax, unreadable file).
#[derive(Debug)]
struct Invalid(String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

pub(crate) fn invalid(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Invalid(msg.into()))
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Run a command; returns the exit code.
pub async fn run(cmd: Command, client: &Client, json: bool) -> anyhow::Result<u8> {
    match cmd {
        Command::Submit {
            file,
            params,
            follow,
        } => submit(client, &file, &params, follow, json).await,
        Command::Jobs { limit } => {
            let jobs: Vec<JobSummary> = client.get_json(&format!("/v1/jobs?limit={limit}")).await?;
            if json {
                print_json(&jobs)?;
            } else {
                println!("{:<38} {:<20} {:<10} CREATED", "JOB", "PIPELINE", "STATE");
                for j in jobs {
                    println!(
                        "{:<38} {:<20} {:<10} {}",
                        j.id,
                        j.pipeline,
                        j.state.as_str(),
                        j.created_at
                    );
                }
            }
            Ok(exit::OK)
        }
        Command::Status { job } => {
            let st: JobStatus = client.get_json(&format!("/v1/jobs/{job}")).await?;
            if json {
                print_json(&st)?;
            } else {
                print_status(&st);
            }
            Ok(match st.state {
                JobState::Failed | JobState::Cancelled => exit::FAILED,
                _ => exit::OK,
            })
        }
        Command::Logs { job, step } => logs(client, &job, step.as_deref(), json).await,
        Command::Follow { job } => follow(client, &job, json).await,
        Command::Cancel { job } => {
            let v: serde_json::Value = client
                .send_json(Method::DELETE, &format!("/v1/jobs/{job}"), None)
                .await?;
            if json {
                print_json(&v)?;
            } else {
                println!("cancelling job {job}");
            }
            Ok(exit::OK)
        }
        Command::Artifacts { job, out, all } => artifacts(client, &job, &out, all, json).await,
        Command::Export { job, dir, oci } => {
            crate::export::export(client, &job, &dir, oci, json).await
        }
        Command::Rebuild { job, step } => {
            crate::export::rebuild(client, &job, step.as_deref(), json).await
        }
        Command::Verify {
            artifact,
            bundle,
            trust,
            require_complete_trace,
            policy,
        } => verify(
            &artifact,
            bundle.as_deref(),
            &trust,
            require_complete_trace,
            policy.as_deref(),
            json,
        ),
        Command::Pipeline { command } => crate::pipeline::run(command, json),
        Command::Image { command } => crate::image::run(command, client, json).await,
        Command::Node {
            action: Some(action),
            ..
        } => crate::node::run(action, client, json).await,
        Command::Trace { job, step } => {
            crate::trace::trace(client, &job, step.as_deref(), json).await
        }
        Command::Attestations { subject } => {
            let digest = if subject.starts_with("sha256:") {
                subject
                    .parse::<Digest>()
                    .map_err(|e| invalid(e.to_string()))?
            } else {
                let f = std::fs::File::open(&subject)
                    .map_err(|e| invalid(format!("{subject}: {e}")))?;
                Digest::of_reader(f)?
            };
            let refs: Vec<AttestationRef> = client
                .get_json(&format!("/v1/attestations?subject={digest}"))
                .await?;
            if json {
                print_json(&refs)?;
            } else if refs.is_empty() {
                println!("no attestation has subject {digest}");
            } else {
                for r in refs {
                    println!(
                        "job {} step {} subject {} envelope {}",
                        r.job_id, r.step, r.subject, r.envelope
                    );
                }
            }
            Ok(exit::OK)
        }
        Command::Node {
            public_key,
            action: None,
        } => {
            let n: NodeInfo = client.get_json("/v1/node").await?;
            if public_key {
                print!("{}", n.public_key_pem);
            } else if json {
                print_json(&n)?;
            } else {
                println!(
                    "builder id  {}\nkey id      {}\nkey kind    {}\nhost        {}\nversion     {}",
                    n.builder_id, n.keyid, n.key_kind, n.hostname, n.version
                );
                if n.key_kind == "software" {
                    println!(
                        "warning     the node key is a software key (no TPM): attestations say so"
                    );
                }
            }
            Ok(exit::OK)
        }
    }
}

fn print_status(st: &JobStatus) {
    println!(
        "job       {}\npipeline  {} ({})\nstate     {}",
        st.id,
        st.pipeline,
        st.pipeline_digest,
        st.state.as_str()
    );
    if let Some(e) = &st.error {
        println!("error     {e}");
    }
    for (k, v) in &st.params {
        println!("param     {k}={v}");
    }
    if let Some(a) = &st.attestation {
        println!("attested  {a}");
    }
    for s in &st.steps {
        let dur = s
            .duration_ms
            .map(|d| format!(" {:.2}s", d as f64 / 1000.0))
            .unwrap_or_default();
        let err = s
            .error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        println!(
            "  {:<16} {:<8} {:<10}{dur}{err}",
            s.name,
            s.kind,
            s.state.as_str()
        );
        for o in &s.outputs {
            println!("      {} {}", o.digest, o.path);
        }
    }
}

fn parse_params(params: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| invalid(format!("--param {p:?}: expected NAME=VALUE")))?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(invalid(format!("--param {k} given twice")));
        }
    }
    Ok(out)
}

async fn submit(
    client: &Client,
    file: &Path,
    params: &[String],
    follow_job: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let text =
        std::fs::read_to_string(file).map_err(|e| invalid(format!("{}: {e}", file.display())))?;
    let file_name = file.display().to_string();
    // Validate locally first: same parser as the daemon, errors with file:line:col.
    let pipeline = kiln_common::spec::parse(&text, &file_name)
        .map_err(|e| invalid(format!("invalid pipeline:\n{e}")))?;
    let params = parse_params(params)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut sources = BTreeMap::new();
    for (ws, decl) in &pipeline.workspaces {
        if let Some(src) = &decl.source {
            let dir = base.join(src);
            let archive = crate::source::pack(&dir, ws).map_err(|e| invalid(format!("{e:#}")))?;
            let blob: BlobRef = client
                .send_json(
                    Method::POST,
                    "/v1/blobs",
                    Some((Bytes::from(archive), "application/x-tar")),
                )
                .await
                .with_context(|| format!("uploading source of workspace {ws:?}"))?;
            if !json {
                eprintln!(
                    "uploaded {ws:<12} {} ({} bytes) from {}",
                    blob.digest,
                    blob.size,
                    dir.display()
                );
            }
            sources.insert(ws.clone(), blob.digest);
        }
    }
    // Source steps: relative git repositories resolved here, pinned tarballs uploaded as blobs
    // (kilnd takes the blob whose digest is the pin).
    let step_sources =
        crate::source::step_sources(&pipeline, base).map_err(|e| invalid(format!("{e:#}")))?;
    for (step, path, bytes) in step_sources.tarballs {
        let size = bytes.len();
        let blob: BlobRef = client
            .send_json(
                Method::POST,
                "/v1/blobs",
                Some((Bytes::from(bytes), "application/octet-stream")),
            )
            .await
            .with_context(|| format!("uploading tarball of step {step:?}"))?;
        if !json {
            eprintln!(
                "uploaded {step:<12} {} ({size} bytes) from {}",
                blob.digest,
                path.display()
            );
        }
    }
    // A signed definition (`kiln pipeline sign`) travels with it; the node's policy decides.
    let signature = crate::pipeline::load_signature(file).map_err(|e| invalid(format!("{e:#}")))?;
    let req = SubmitJobRequest {
        pipeline: text,
        file_name,
        params,
        sources,
        repos: step_sources.repos,
        signature,
    };
    let resp: SubmitJobResponse = client.post_json("/v1/jobs", &req).await?;
    if json && !follow_job {
        print_json(&resp)?;
    } else if !json {
        println!(
            "job {} submitted (pipeline {} {})",
            resp.id, pipeline.name, resp.pipeline_digest
        );
    }
    if follow_job {
        follow(client, &resp.id, json).await
    } else {
        Ok(exit::OK)
    }
}

/// Stream a job's events; text mode prints step progress and logs; returns the job's exit code.
async fn follow(client: &Client, job: &str, json: bool) -> anyhow::Result<u8> {
    let resp = client
        .send(Method::GET, &format!("/v1/jobs/{job}/events"), None)
        .await?;
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut final_state = None;
    let mut out = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading event stream")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if json {
                out.write_all(&line)?;
                out.flush()?;
            }
            let ev: Event = serde_json::from_slice(&line).context("decoding event")?;
            if let EventKind::Job { state, .. } = &ev.kind
                && state.is_terminal()
            {
                final_state = Some(*state);
            }
            if !json {
                print_event(&ev);
            }
        }
    }
    match final_state {
        Some(JobState::Succeeded) => Ok(exit::OK),
        Some(_) => Ok(exit::FAILED),
        None => bail!("event stream ended before job {job} finished (kilnd stopping?)"),
    }
}

fn print_event(ev: &Event) {
    match &ev.kind {
        EventKind::Job { state, error } => match error {
            Some(e) => println!("==> job {}: {e}", state.as_str()),
            None => println!("==> job {}", state.as_str()),
        },
        EventKind::Step {
            step, state, error, ..
        } => match error {
            Some(e) => println!("--> step {step}: {} ({e})", state.as_str()),
            None => println!("--> step {step}: {}", state.as_str()),
        },
        EventKind::Log { step, data } => {
            for line in data.lines() {
                println!("    [{step}] {line}");
            }
        }
    }
}

async fn logs(client: &Client, job: &str, step: Option<&str>, json: bool) -> anyhow::Result<u8> {
    let st: JobStatus = client.get_json(&format!("/v1/jobs/{job}")).await?;
    let steps: Vec<&str> = match step {
        Some(s) => vec![s],
        None => st
            .steps
            .iter()
            .filter(|s| s.log.is_some())
            .map(|s| s.name.as_str())
            .collect(),
    };
    let mut all = BTreeMap::new();
    for s in steps {
        let bytes = client
            .get_bytes(&format!("/v1/jobs/{job}/steps/{s}/log"))
            .await?;
        if json {
            all.insert(s.to_owned(), String::from_utf8_lossy(&bytes).into_owned());
        } else {
            if step.is_none() {
                println!("==> {s}");
            }
            std::io::stdout().write_all(&bytes)?;
        }
    }
    if json {
        print_json(&all)?;
    }
    Ok(exit::OK)
}

/// A relative path from the daemon that must stay inside `out`.
pub(crate) fn safe_join(out: &Path, rel: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("refusing artifact path {rel:?}: it would escape the output directory");
    }
    Ok(out.join(p))
}

async fn artifacts(
    client: &Client,
    job: &str,
    out: &Path,
    all: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let st: JobStatus = client.get_json(&format!("/v1/jobs/{job}")).await?;
    if st.state != JobState::Succeeded {
        eprintln!("warning: job {job} is {}", st.state.as_str());
    }
    let list: Vec<Artifact> = client
        .get_json(&format!("/v1/jobs/{job}/artifacts"))
        .await?;
    let bundle = client
        .get_bytes(&format!("/v1/jobs/{job}/attestations"))
        .await?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for a in list.iter().filter(|a| all || a.final_output) {
        let rel = if all {
            format!("{}/{}", a.step, a.path)
        } else {
            a.path.clone()
        };
        let dest = safe_join(out, &rel)?;
        download_verified(client, &a.digest, &a.path, &dest).await?;
        if !json {
            println!("{} {}", a.digest, dest.display());
        }
        written.push(serde_json::json!({ "path": dest, "digest": a.digest, "step": a.step }));
    }
    if written.is_empty() {
        eprintln!(
            "warning: job {job} has no final artifacts{}",
            if all { "" } else { " (try --all)" }
        );
    }
    let bundle_path = out.join(BUNDLE_FILE);
    write_new(&bundle_path, &bundle)?;
    if json {
        print_json(&serde_json::json!({ "artifacts": written, "bundle": bundle_path }))?;
    } else {
        println!("bundle {}", bundle_path.display());
    }
    Ok(exit::OK)
}

/// Downloads blob `digest` (the artifact `path` of a job) into the new file `dest`, creating its
/// parent directories; the bytes must hash to `digest`, and `dest` must not exist.
pub(crate) async fn download_verified(
    client: &Client,
    digest: &Digest,
    path: &str,
    dest: &Path,
) -> anyhow::Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let bytes = client.get_bytes(&format!("/v1/blobs/{digest}")).await?;
    let got = Digest::of(&bytes);
    if got != *digest {
        bail!("downloaded {path} has digest {got}, expected {digest}");
    }
    write_new(dest, &bytes)
}

/// Create a file that must not exist yet (no data is ever overwritten).
pub(crate) fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| {
            format!(
                "writing {} (existing files are never overwritten)",
                path.display()
            )
        })?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn verify(
    artifact: &Path,
    bundle: Option<&Path>,
    trust: &crate::node::TrustArgs,
    require_complete_trace: bool,
    policy: Option<&Path>,
    json: bool,
) -> anyhow::Result<u8> {
    let policy = policy
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|text| (p.display().to_string(), text))
                .map_err(|e| invalid(format!("policy {}: {e}", p.display())))
        })
        .transpose()?;
    let file = std::fs::File::open(artifact)
        .map_err(|e| invalid(format!("{}: {e}", artifact.display())))?;
    let digest = Digest::of_reader(file)?;
    let name = artifact
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bundle_path = match bundle {
        Some(b) => b.to_owned(),
        None => artifact
            .parent()
            .unwrap_or(Path::new("."))
            .join(BUNDLE_FILE),
    };
    let bundle_text = std::fs::read(&bundle_path).map_err(|e| {
        invalid(format!(
            "bundle {}: {e} (pass --bundle FILE)",
            bundle_path.display()
        ))
    })?;
    let bundle: Bundle = serde_json::from_slice(&bundle_text).map_err(|e| {
        invalid(format!(
            "bundle {} is not a kiln bundle: {e}",
            bundle_path.display()
        ))
    })?;
    let root = trust.load().map_err(invalid)?;
    let verified = verify_artifact_with(
        &ArtifactRef {
            name: name.clone(),
            digest,
        },
        &bundle,
        root.trust(),
    )
    .map_err(|e| e.to_string())
    .and_then(|v| {
        // Signature-checked: each trace envelope must be the one the step's provenance names.
        let traces = if require_complete_trace {
            kiln_common::trace::verify_complete_traces(&bundle, &v.signer_keys, &v.chain)
                .map_err(|e| format!("--require-complete-trace: {e}"))?
        } else {
            Vec::new()
        };
        // The verified chain as the policy's input (docs/policy.md); every deny message fails it.
        if let Some((policy_name, rego)) = &policy {
            let artifact = ArtifactRef {
                name: name.clone(),
                digest,
            };
            let input = kiln_common::policy::PolicyInput::build(&artifact, &bundle, &v)
                .map_err(|e| e.to_string())?;
            let deny = crate::policy::evaluate_text(policy_name, rego, &input)
                .map_err(|e| format!("policy {policy_name}: {e:#}"))?;
            if !deny.is_empty() {
                return Err(format!(
                    "policy {policy_name} denies it:\n  - {}",
                    deny.join("\n  - ")
                ));
            }
        }
        Ok((v, traces))
    });
    match verified {
        Ok((v, traces)) => {
            if json {
                print_json(
                    &serde_json::json!({ "verified": true, "artifact": name, "digest": digest, "result": v, "traces": traces }),
                )?;
            } else {
                println!("verified {name} {digest}");
                println!(
                    "  subject   {} of step {:?} in job {}",
                    v.subject_name, v.step, v.job_id
                );
                println!("  pipeline  {} {}", v.pipeline, v.pipeline_digest);
                println!(
                    "  builder   {} (signed by {}, {} key)",
                    v.builder_id, v.signer_keyid, v.signing_key_kind
                );
                println!("  chain     {}", v.chain.join(" <- "));
                if let Some(node) = &v.node {
                    crate::node::print_node_chain(node, &v);
                }
                for a in &v.attestations {
                    println!(
                        "  attested  {} by step {:?}: {} ({} subject(s){})",
                        a.name,
                        a.step,
                        a.predicate_type,
                        a.subjects,
                        if a.covers_artifact {
                            ", this artifact among them"
                        } else {
                            ""
                        }
                    );
                }
                for t in &traces {
                    println!(
                        "  trace     {} complete: {} events, 0 lost ({})",
                        t.step, t.events, t.trace_digest
                    );
                }
            }
            Ok(exit::OK)
        }
        Err(e) => {
            if json {
                print_json(
                    &serde_json::json!({ "verified": false, "artifact": name, "digest": digest, "error": e }),
                )?;
            } else {
                eprintln!("verification FAILED for {name} ({digest}): {e}");
            }
            Ok(exit::FAILED)
        }
    }
}
