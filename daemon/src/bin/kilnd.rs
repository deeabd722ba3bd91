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
}

fn main() -> ExitCode {
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
