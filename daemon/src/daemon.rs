//! Daemon start-up and shutdown: the sequence `kilnd` runs, kept out of `main.rs`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::attest::{NodeAttestor, NodeAttestorConfig, StartMeasurements, TpmConfig};
use crate::config::Config;
use crate::pipeline::Node;
use crate::provenance::NodeSigner;
use crate::store::Store;
use crate::{api, sandbox};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines without timestamps when under journald (it adds its own).
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the tracing subscriber (`RUST_LOG` or `KILN_LOG` filter, default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text if under_journald => builder.without_time().with_ansi(false).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Where the `kiln-sandbox` helper is: configured, or next to this executable.
fn sandbox_helper(config: &Config) -> anyhow::Result<PathBuf> {
    if let Some(p) = &config.sandbox_helper {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("cannot locate the kilnd executable")?;
    let helper = exe.with_file_name("kiln-sandbox");
    anyhow::ensure!(
        helper.is_file(),
        "sandbox helper not found at {} (install kiln-sandbox next to kilnd or set sandbox_helper in the config)",
        helper.display()
    );
    Ok(helper)
}

/// The node's signer: the TPM node attestor (TCTI from `KILN_TPM_TCTI` or `[tpm] tcti`), after
/// the measured start of kilnd's binary, config and profiles; or, only with
/// `--insecure-software-key`, a software key. Without either kilnd refuses to start.
async fn node_signer(config: &Config) -> anyhow::Result<NodeSigner> {
    let tcti = std::env::var("KILN_TPM_TCTI")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| config.tpm.tcti.clone());
    let Some(tcti) = tcti else {
        anyhow::ensure!(
            config.tpm.insecure_software_key,
            "no tpm configured: set [tpm] tcti in the config (e.g. device:/dev/tpmrm0, or swtpm:host=127.0.0.1,port=2321 from scripts/swtpm) or KILN_TPM_TCTI; \
             to sign with a software key instead, start kilnd with --insecure-software-key (attestations then say signingKey.kind = \"software\" and kiln verify refuses them unless --allow-software-key)"
        );
        warn!(
            "INSECURE: signing with a software key (--insecure-software-key); attestations say signingKey.kind = software"
        );
        return NodeSigner::load_or_create(&config.state_dir)
            .context("loading the software node key");
    };
    let tpm_dir = config.state_dir.join("tpm");
    let attestor = NodeAttestor::start(NodeAttestorConfig {
        tpm: TpmConfig {
            tcti,
            state_dir: tpm_dir.clone(),
        },
        ek_ca_bundle: config.tpm.ek_ca_bundle.clone(),
        measurements: StartMeasurements {
            binary: PathBuf::from("/proc/self/exe"),
            config: config.config_file.clone(),
            profiles_dir: Some(config.profiles_dir.clone()),
        },
        event_log: tpm_dir.join("measured-start.jsonl"),
    })
    .await
    .context("starting the tpm node attestor")?;
    Ok(NodeSigner::tpm(Arc::new(attestor)))
}

/// Run the daemon until SIGTERM/SIGINT; on signal, cancel jobs, record their state, and return.
pub async fn run(config: Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "kilnd must run as root: it creates namespaces and mounts for every build worker"
    );
    // Handlers first: once the socket is bound a client (or systemd) may send SIGTERM at any
    // moment, and it must mean "shut down cleanly", never the default "die now".
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let helper = sandbox_helper(&config)?;
    let profiles = sandbox::load_profiles(&config.profiles_dir).with_context(|| {
        format!(
            "loading sandbox profiles from {}",
            config.profiles_dir.display()
        )
    })?;
    anyhow::ensure!(
        !profiles.is_empty(),
        "no sandbox profiles in {}",
        config.profiles_dir.display()
    );
    let admission = crate::admission::Admission::load(&config.admission)
        .context("loading the admission policy")?;
    let store = Store::open(&config.state_dir).context("opening the store")?;
    let signer = node_signer(&config).await?;
    let socket = config.api.socket.clone();
    let socket_shown = match api::systemd_listen_fd() {
        Some(fd) => format!("fd {fd} from systemd"),
        None => socket.display().to_string(),
    };
    let listener = api::listen(&socket)?;
    info!(
        socket = %socket_shown,
        state_dir = %config.state_dir.display(),
        builder_id = %signer.builder_id,
        key = %signer.info.kind,
        profiles = ?profiles.keys().collect::<Vec<_>>(),
        "kilnd ready"
    );
    let node = Node::new(config, store, signer, profiles, helper, admission)?;
    let serve_stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(api::serve(listener, node.clone(), serve_stop.clone()));

    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    shutdown(&node, serve_stop, server, &socket).await;
    Ok(())
}

async fn shutdown(
    node: &Arc<Node>,
    serve_stop: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    socket: &std::path::Path,
) {
    // Jobs first (their final state is recorded), then the API (open event streams end when
    // their jobs end).
    node.shutdown().await;
    serve_stop.cancel();
    if tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .is_err()
    {
        warn!("API connections did not close in 5 s");
    }
    if std::env::var_os("LISTEN_FDS").is_none() {
        let _ = std::fs::remove_file(socket);
    }
    info!("kilnd stopped");
}
