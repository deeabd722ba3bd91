//! `kilnd`: the kiln node daemon. Parses flags and hands over to `kilnd::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kilnd::config::{Config, DEFAULT_CONFIG};
use kilnd::daemon::{self, LogFormat};

/// kiln node daemon: admits pipeline jobs, runs every step in a single-use sandbox, and signs
/// runtime provenance for each step.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Configuration: /etc/kiln/kilnd.toml (annotated sample: docs/kilnd.toml).\n\
Defaults: state dir /var/lib/kiln, socket /run/kiln/kilnd.sock, profiles /etc/kiln/profiles.\n\
Flags override the file. SIGTERM cancels running jobs, records their state and exits.\n\n\
Example:\n  kilnd --state-dir /tmp/kiln --socket /tmp/kiln/kilnd.sock --profiles-dir ./profiles"
)]
struct Args {
    /// Configuration file (must exist if given).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (kiln.db, cas/, keys/); overrides `state_dir`.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// API socket path; overrides `api.socket` (ignored under socket activation).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Sandbox profiles directory; overrides `profiles_dir`.
    #[arg(long, value_name = "DIR")]
    profiles_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Without a TPM ([tpm] tcti / KILN_TPM_TCTI), sign with a software key in the state dir
    /// instead of refusing to start. Attestations say signingKey.kind = "software"; kiln verify
    /// rejects them unless --allow-software-key.
    #[arg(long)]
    insecure_software_key: bool,
}

fn main() -> ExitCode {
    if std::env::var_os("TSS2_LOG").is_none() {
        // SAFETY: nothing else runs yet (no runtime, no TPM thread): setting the environment
        // cannot race a reader. ESYS reads TSS2_LOG when it first logs; `all+none` keeps its
        // own error prints off stderr (kilnd reports TPM errors decoded, once).
        unsafe { std::env::set_var("TSS2_LOG", "all+none") };
    }
    let args = Args::parse();
    daemon::init_logging(args.log_format);
    let explicit = args.config.is_some();
    let path = args.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let mut config = match Config::load(&path, explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kilnd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(d) = args.state_dir {
        config.state_dir = std::path::absolute(d).unwrap_or_default();
    }
    if let Some(s) = args.socket {
        config.api.socket = s;
    }
    if let Some(p) = args.profiles_dir {
        config.profiles_dir = p;
    }
    config.tpm.insecure_software_key = args.insecure_software_key;
    // Still single-threaded here: the only moment kilnd can unshare its mount namespace.
    if config.daemon.private_mounts {
        if let Err(e) = daemon::enter_private_mount_namespace() {
            tracing::error!("{e:#}");
            eprintln!("kilnd: {e:#}");
            return ExitCode::FAILURE;
        }
    } else {
        tracing::warn!(
            "[daemon] private_mounts = false: kilnd mounts (output workspace tmpfs, bpffs) in the namespace it was started in; without systemd's PrivateMounts=yes that is the host's"
        );
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kilnd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
