//! `kiln`: the command-line client of kilnd and the offline verifier. Argument parsing only;
//! the work is in the modules.

mod client;
mod commands;
mod export;
mod image;
mod node;
mod pipeline;
mod policy;
mod source;
mod trace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Exit codes (also in `kiln --help`).
pub mod exit {
    /// Success; for `submit --follow`, the job succeeded.
    pub const OK: u8 = 0;
    /// The job failed or was cancelled, or verification failed.
    pub const FAILED: u8 = 1;
    /// Invalid input: usage, pipeline, parameters, files.
    pub const INVALID: u8 = 2;
    /// kilnd could not be reached.
    pub const UNREACHABLE: u8 = 3;
    /// Not authorized (HTTP 403).
    pub const FORBIDDEN: u8 = 4;
    /// Not found (unknown job, step, blob).
    pub const NOT_FOUND: u8 = 5;
}

const AFTER_HELP: &str = "\
Examples:
  kiln submit examples/hello-c/pipeline.toml --param greeting='hi there' --follow
  kiln jobs
  kiln status JOB --json
  kiln logs JOB compile
  kiln artifacts JOB --out ./out
  kiln node enroll --ek-ca ek-ca.pem --out node.json
  kiln verify ./out/hello-c.tar.gz --node node.json --ek-ca ek-ca.pem
  kiln node --public-key > node.pub
  kiln verify ./out/hello-c.tar.gz --trusted-key node.pub --allow-software-key
  kiln verify ./out/hello-c.tar.gz --trusted-key node.pub --allow-software-key \
      --policy docs/examples/require-test.rego
  kiln pipeline keygen --out release && kiln pipeline sign pipeline.toml --key release.pem
  kiln trace JOB compile
  kiln export JOB ./release --oci
  kiln rebuild JOB
  kiln image import ./rootfs   # then pin it in a step: image = \"sha256:...\"

Exit codes:
  0 success (for submit --follow: the job succeeded)
  1 the job failed or was cancelled, or verification failed
  2 invalid input (usage, pipeline, parameters, files)
  3 kilnd could not be reached
  4 not authorized
  5 not found";

/// kiln: submit pipeline jobs to kilnd, follow them, fetch artifacts and verify their provenance.
#[derive(Debug, Parser)]
#[command(version, after_help = AFTER_HELP)]
struct Cli {
    /// kilnd API socket.
    #[arg(
        long,
        global = true,
        env = "KILN_SOCKET",
        default_value = "/run/kiln/kilnd.sock"
    )]
    socket: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = client::Client::new(&cli.socket);
    match rt.block_on(commands::run(cli.command, &client, cli.json)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kiln: {e:#}");
            ExitCode::from(commands::exit_code_for(&e))
        }
    }
}
