//! The build worker: a single-use sandbox per pipeline step.
//!
//! kilnd never does namespace work in its tokio process. [`Sandbox::run`] spawns the small,
//! single-threaded `kiln-sandbox` helper ([`helper`]), feeds it a [`SandboxSpec`] on stdin (env values
//! may be secrets: never on disk), forwards the step log (the helper's stderr) as it arrives, and
//! reads one [`SandboxOutcome`] line from the helper's stdout.
//!
//! Module map: [`spec`] wire types and their validation, [`rootfs`] the root filesystem as a
//! reviewed plan, [`sys`] the privileged-syscall seam (every `unsafe`), [`helper`] the helper's
//! process logic, [`profile`] the TOML profiles in `profiles/`, [`seccomp`] the profile's syscall
//! allowlist compiled to BPF (kilnd side), [`confine`] the seccomp/rlimit/Landlock wire types and
//! the Landlock enforcement (helper side).

pub mod cgroup;
pub mod confine;
pub mod helper;
pub mod outputfs;
pub mod profile;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod sys;
pub mod teardown;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use cgroup::{CgroupPaths, LimitHit, Limits};
pub use confine::{
    Confinement, LandlockAccess, LandlockEnforcement, LandlockPolicy, LandlockRule, Rlimits,
    SeccompProgram, UserNamespace,
};
pub use profile::{Profile, ProfileError, load_profiles};
pub use spec::{Access, SandboxOutcome, SandboxSpec, SpecError, StepEnd, WorkspaceMount};
pub use teardown::TeardownReport;

/// Grace period on top of a spec's own timeout before kilnd gives up on the helper itself.
pub const SAFETY_NET: Duration = Duration::from_secs(10);

/// Largest outcome line accepted from the helper.
const MAX_OUTCOME_BYTES: u64 = 1 << 20;

/// Running a step through the helper failed (the step's own failures are [`StepEnd`]s).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The spec is invalid; nothing was started.
    #[error("invalid sandbox spec")]
    Spec(#[from] SpecError),
    /// The helper binary could not be started.
    #[error("cannot start sandbox helper {helper:?}")]
    Spawn {
        /// Path of the helper.
        helper: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the helper over its stdio failed.
    #[error("sandbox helper i/o failed: {what}")]
    Io {
        /// Which stream / operation.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The helper ended without a parsable outcome.
    #[error("sandbox helper exited ({status}) without a valid outcome: {output:?}")]
    NoOutcome {
        /// How the helper exited.
        status: ExitStatus,
        /// What it wrote to stdout (truncated).
        output: String,
    },
    /// The helper did not finish within the spec timeout plus [`SAFETY_NET`]; it was killed.
    #[error(
        "sandbox helper still running {after_ms} ms after start (spec timeout + safety net); killed"
    )]
    HelperHung {
        /// Milliseconds waited.
        after_ms: u64,
    },
    /// The output directory could not be prepared.
    #[error("cannot prepare output directory {path:?}: {what}")]
    OutputDir {
        /// The directory.
        path: PathBuf,
        /// Which operation.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs steps through the `kiln-sandbox` helper binary.
#[derive(Debug, Clone)]
pub struct Sandbox {
    helper: PathBuf,
}

enum Ended {
    Finished(Result<(ExitStatus, Vec<u8>), SandboxError>),
    Cancelled,
    Hung,
}

impl Sandbox {
    /// A sandbox runner using the helper binary at `helper`.
    pub fn new(helper: impl Into<PathBuf>) -> Self {
        Self {
            helper: helper.into(),
        }
    }

    /// Path of the helper binary.
    pub fn helper(&self) -> &Path {
        &self.helper
    }

    /// Spawn the helper, feed the spec, forward log chunks to `log` as they arrive, honour `cancel`
    /// (kill the helper -> PDEATHSIG kills pid 1 -> the namespace dies), and return the outcome.
    ///
    /// A dropped `log` receiver does not stop the step: the log is then drained and discarded.
    /// Cancellation returns `Ok` with [`StepEnd::Cancelled`] once the helper is reaped.
    ///
    /// Once the helper is reaped — however the step ended, errors included — the step's cgroups
    /// (`spec.cgroups`) are killed and removed and the teardown is verified
    /// ([`teardown::teardown`]); the outcome carries the [`TeardownReport`] and the limits the
    /// kernel enforced.
    pub async fn run(
        &self,
        spec: &SandboxSpec,
        log: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
    ) -> Result<SandboxOutcome, SandboxError> {
        self.run_with_proxy(spec, log, cancel, None).await
    }

    /// [`Sandbox::run`]; with `proxy`, the helper also creates the fetch proxy's listener in the
    /// step's network namespace before the step starts and hands it over to `proxy`
    /// ([`crate::fetch::listener`]). A helper that fails before that drops `proxy` unanswered.
    pub async fn run_with_proxy(
        &self,
        spec: &SandboxSpec,
        log: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
        proxy: Option<tokio::sync::oneshot::Sender<tokio::net::TcpListener>>,
    ) -> Result<SandboxOutcome, SandboxError> {
        // Validation is `run_helper`'s first step; the teardown checks the cgroup paths itself
        // before touching them, so cgroups of an invalid spec are still removed.
        let result = self.run_helper(spec, log, cancel, proxy).await;
        let scope = teardown::TeardownScope::of(spec);
        let (limits_hit, report) =
            match tokio::task::spawn_blocking(move || teardown::teardown(&scope)).await {
                Ok(done) => done,
                Err(err) => (
                    Vec::new(),
                    TeardownReport {
                        verified: false,
                        problems: vec![format!("teardown task failed: {err}")],
                    },
                ),
            };
        if !report.verified {
            tracing::warn!(problems = ?report.problems, "sandbox teardown not verified");
        }
        let mut outcome = result?;
        outcome.limits_hit = limits_hit;
        outcome.teardown = Some(report);
        Ok(outcome)
    }

    /// [`Sandbox::run`] up to the reaping of the helper.
    async fn run_helper(
        &self,
        spec: &SandboxSpec,
        log: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
        proxy: Option<tokio::sync::oneshot::Sender<tokio::net::TcpListener>>,
    ) -> Result<SandboxOutcome, SandboxError> {
        spec.validate()?;
        let input = serde_json::to_vec(spec).map_err(|err| SandboxError::Io {
            what: "encode spec",
            source: err.into(),
        })?;
        let proxy = match proxy {
            Some(sink) => Some((
                crate::fetch::listener::ListenerChannel::new().map_err(|source| {
                    SandboxError::Io {
                        what: "proxy listener channel",
                        source,
                    }
                })?,
                sink,
            )),
            None => None,
        };
        let started = Instant::now();
        let mut command = Command::new(&self.helper);
        command
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some((channel, _)) = &proxy {
            channel.attach(&mut command);
        }
        let mut child = command.spawn().map_err(|source| SandboxError::Spawn {
            helper: self.helper.clone(),
            source,
        })?;
        if let Some((channel, sink)) = proxy {
            tokio::spawn(async move {
                match channel.receive().await {
                    Ok(Some(listener)) => {
                        // The receiver is gone only if the step's proxy already stopped.
                        let _ = sink.send(listener);
                    }
                    Ok(None) => {}
                    Err(err) => tracing::warn!(%err, "no proxy listener from the sandbox helper"),
                }
            });
        }
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(SandboxError::Io {
                what: "helper stdio",
                source: std::io::ErrorKind::BrokenPipe.into(),
            });
        };
        let safety_net = Duration::from_millis(spec.timeout_ms).saturating_add(SAFETY_NET);

        let ended = {
            let drive = async {
                // The helper reads the whole spec before anything else; EOF tells it the spec is complete.
                stdin
                    .write_all(&input)
                    .await
                    .map_err(|source| SandboxError::Io {
                        what: "write spec",
                        source,
                    })?;
                drop(stdin);
                let (outcome, forwarded) =
                    tokio::join!(read_outcome(stdout), forward_log(stderr, &log));
                forwarded?;
                let outcome = outcome?;
                let status = child.wait().await.map_err(|source| SandboxError::Io {
                    what: "wait for helper",
                    source,
                })?;
                Ok((status, outcome))
            };
            tokio::select! {
                result = drive => Ended::Finished(result),
                () = cancel.cancelled() => Ended::Cancelled,
                () = tokio::time::sleep(safety_net) => Ended::Hung,
            }
        };

        match ended {
            Ended::Finished(result) => {
                let (status, output) = result?;
                serde_json::from_slice::<SandboxOutcome>(&output).map_err(|_| {
                    SandboxError::NoOutcome {
                        status,
                        output: String::from_utf8_lossy(&output[..output.len().min(512)])
                            .into_owned(),
                    }
                })
            }
            Ended::Cancelled => {
                kill_and_reap(&mut child).await?;
                Ok(SandboxOutcome::without_usage(
                    StepEnd::Cancelled,
                    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                ))
            }
            Ended::Hung => {
                kill_and_reap(&mut child).await?;
                Err(SandboxError::HelperHung {
                    after_ms: u64::try_from(safety_net.as_millis()).unwrap_or(u64::MAX),
                })
            }
        }
    }
}

/// SIGKILL to the helper; its pid 1 has PDEATHSIG=SIGKILL, so the whole namespace follows.
async fn kill_and_reap(child: &mut tokio::process::Child) -> Result<(), SandboxError> {
    // `kill` = start_kill + wait; an already-exited helper is fine.
    child.kill().await.map_err(|source| SandboxError::Io {
        what: "kill helper",
        source,
    })
}

async fn read_outcome(stdout: impl AsyncRead + Unpin) -> Result<Vec<u8>, SandboxError> {
    let mut output = Vec::new();
    stdout
        .take(MAX_OUTCOME_BYTES)
        .read_to_end(&mut output)
        .await
        .map_err(|source| SandboxError::Io {
            what: "read outcome",
            source,
        })?;
    Ok(output)
}

/// Forwards the step log chunk by chunk until EOF (all writers gone: the namespace is dead).
async fn forward_log(
    mut stderr: impl AsyncRead + Unpin,
    log: &mpsc::Sender<Bytes>,
) -> Result<(), SandboxError> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut receiver_alive = true;
    loop {
        buf.reserve(16 * 1024);
        let n = stderr
            .read_buf(&mut buf)
            .await
            .map_err(|source| SandboxError::Io {
                what: "read step log",
                source,
            })?;
        if n == 0 {
            return Ok(());
        }
        let chunk = buf.split().freeze();
        if receiver_alive && log.send(chunk).await.is_err() {
            receiver_alive = false;
        }
    }
}

/// Creates (if needed) the output workspace directory `path` and hands it to the step's user, so
/// the unprivileged step can write its outputs there (`uid`/`gid` are host ids: with a
/// `[userns]` profile, [`Profile::host_ids`]). Refuses a symlink at `path`.
pub fn prepare_output_dir(path: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let error = |what: &'static str| {
        move |source| SandboxError::OutputDir {
            path: path.to_owned(),
            what,
            source,
        }
    };
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(error("create")(err)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(error("stat"))?;
    if !meta.is_dir() {
        return Err(error("check")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a directory (symlinks are refused)",
        )));
    }
    // lchown: even if a symlink was swapped in after the check, the host file it points to is untouched.
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(error("chown"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(error("chmod"))?;
    Ok(())
}
