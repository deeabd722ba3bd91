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

/// `[daemon] private_mounts`: moves kilnd into a mount namespace of its own, with every mount a
/// recursive slave of the host's (`MS_SLAVE | MS_REC`): mounts made on the host still appear here,
/// but nothing kilnd mounts — the output workspace tmpfs of each step, bpffs, tracefs — is seen
/// by the host, and all of it goes with the namespace when kilnd exits, even on a crash.
/// systemd's `PrivateMounts=yes` does the same; this makes it hold when kilnd is started by
/// hand or by the test suites, and nests harmlessly under systemd.
///
/// Must run before any thread exists (call it from `main`, before the tokio runtime):
/// `unshare(CLONE_NEWNS)` implies `CLONE_FS`, which the kernel refuses (EINVAL) in a process
/// with more than one thread. Every later thread and every helper kilnd spawns inherits the
/// namespace.
pub fn enter_private_mount_namespace() -> anyhow::Result<()> {
    let threads = thread_count();
    anyhow::ensure!(
        threads == Some(1),
        "cannot enter a private mount namespace: kilnd already has {} threads (it must unshare before the runtime starts)",
        threads.map_or_else(|| "an unknown number of".to_owned(), |n| n.to_string())
    );
    let host = mount_namespace_id();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).with_context(|| {
        "cannot unshare the mount namespace ([daemon] private_mounts = true; kilnd must run as root)"
    })?;
    // The copied mounts keep the host's propagation: a shared `/` (systemd hosts) would send
    // every mount made here back to the host. Slave, not private: host mounts made later (a
    // toolchain on /opt, a new cgroup hierarchy) must still be visible to kilnd.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_SLAVE | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .context(
        "cannot make / a recursive slave in kilnd's mount namespace (mount --make-rslave /)",
    )?;
    info!(
        host_mnt_ns = host.as_deref().unwrap_or("?"),
        own_mnt_ns = mount_namespace_id().as_deref().unwrap_or("?"),
        "private_mounts: kilnd runs in its own mount namespace (/ is a recursive slave of the host's); its mounts are invisible to the host"
    );
    Ok(())
}

/// `Threads:` of /proc/self/status.
fn thread_count() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// `mnt:[4026531841]`: the mount namespace this process is in.
fn mount_namespace_id() -> Option<String> {
    std::fs::read_link("/proc/self/ns/mnt")
        .ok()
        .map(|link| link.to_string_lossy().into_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_threaded_process_is_refused_before_it_unshares() {
        // A second thread for the whole call (libtest may run this on the main thread): the call
        // must refuse with the reason instead of reaching unshare (EINVAL) or changing anything.
        let (release, parked) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || parked.recv());
        let before = mount_namespace_id();
        let err = enter_private_mount_namespace().unwrap_err().to_string();
        drop(release);
        let _ = other.join();
        assert!(
            err.contains("threads") && err.contains("before the runtime starts"),
            "{err}"
        );
        assert_eq!(mount_namespace_id(), before);
    }
}
