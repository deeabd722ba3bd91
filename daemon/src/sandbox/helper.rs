//! The `kiln-sandbox` helper process: reads a [`SandboxSpec`] (JSON) from stdin, runs the step in
//! fresh namespaces, writes one [`SandboxOutcome`] JSON line to stdout. Its stderr is the step log:
//! the helper itself never writes there; its own failures become [`StepEnd::SetupFailed`].
//!
//! Three processes, single-threaded throughout (so `fork` is sound):
//! 1. the *supervisor* (the helper itself, host namespaces) unshares, forks pid 1, builds the root
//!    filesystem in the new mount namespace and pivots into it (all of it but `/proc`) while pid 1
//!    creates the network namespace on the other core, and enforces the timeout: killing pid 1
//!    kills the whole pid namespace;
//! 2. *pid 1* creates the step's network namespace, mounts its `/proc` once the supervisor says
//!    the rest of the root is in place, forks the step and reaps until the step exits, then
//!    reports through a status pipe; when it exits the kernel kills whatever the step left behind;
//! 3. the *step* drops every privilege and execs the step's program.
//!
//! The step's confinement (`spec.confinement`) is applied in `prepare_step`: rlimits and locked
//! securebits during the privilege drop, then Landlock, and the profile's compiled seccomp filter
//! last, right before `execve`.
//!
//! With a `[userns]` profile (`spec.confinement.userns`) the step process, and only it, enters a
//! user namespace of its own, last: every other namespace (mount, pid, net, uts, ipc, cgroup) is
//! created before by real root and stays owned by the host's user namespace, so the step holds no
//! capability over any of them even as root of its own user namespace (no mount, no sethostname,
//! no network configuration), and the mounts stay as built. The step unshares it right after
//! clearing its supplementary groups and setting its rlimits (both need host privileges), then
//! waits; pid 1, in the parent (host) user namespace, writes `/proc/<step>/uid_map`, `setgroups`
//! (`deny`) and `gid_map`; then the step drops everything as before (entering a user namespace
//! resets the bounding set and securebits, so all of the drop comes after it).

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::resource::{Resource, UsageWho, getrusage, setrlimit};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

use super::cgroup;
use super::confine::{self, LandlockEnforcement};
use super::rootfs::{self, MountOp, RealHost, plan_root};
use super::spec::{SECRETS_MOUNT, SandboxOutcome, SandboxSpec, StepEnd};
use super::sys;
use crate::error_chain;

/// Largest spec accepted on stdin.
const MAX_SPEC_BYTES: u64 = 16 << 20;

/// A setup stage that failed, with the reason (becomes [`StepEnd::SetupFailed`]).
#[derive(Debug, Serialize, Deserialize)]
struct Failure {
    stage: String,
    error: String,
}

impl Failure {
    fn new(stage: &str, error: impl std::fmt::Display) -> Self {
        Self {
            stage: stage.to_owned(),
            error: error.to_string(),
        }
    }
}

/// What the step process reports on its CLOEXEC error pipe (a sequence of JSON values): how far
/// Landlock was enforced, and, only if it does not reach its program, why.
#[derive(Debug, Serialize, Deserialize)]
enum StepReport {
    Confined(LandlockEnforcement),
    Setup(Failure),
    Exec(String),
}

/// Set `KILN_SANDBOX_TIMING=1` in the helper's environment (a direct run: kilnd clears it) to get one
/// `kiln-sandbox timing: +<ms> <pid role> <phase>` line per setup phase on stderr (the step log),
/// measured from the helper's `main`, from all three processes on one clock.
const TIMING_ENV: &str = "KILN_SANDBOX_TIMING";

/// Start of `main`, if phase timing is on (inherited by both forks).
static TIMING: OnceLock<Option<Instant>> = OnceLock::new();

/// Logs a phase mark when phase timing is on: one `write` to stderr (whole lines: the three
/// processes share the pipe), nothing otherwise.
fn mark(role: &str, phase: impl std::fmt::Display) {
    if let Some(Some(start)) = TIMING.get() {
        let micros = start.elapsed().as_micros();
        let line = format!(
            "kiln-sandbox timing: +{}.{:03} ms {role} {phase}\n",
            micros / 1000,
            micros % 1000
        );
        // A failed write of a profiling line changes nothing.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// Entry point of the `kiln-sandbox` binary.
pub fn main() -> ExitCode {
    let start = Instant::now();
    TIMING.get_or_init(|| {
        std::env::var_os(TIMING_ENV)
            .is_some_and(|v| v == "1")
            .then_some(start)
    });
    // The wall clock at `main`, so a caller can place the marks on its own timeline (how long the
    // exec took before them, how long the exit after).
    if let Ok(since_epoch) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        mark(
            "supervisor",
            format_args!(
                "main entered at unix time {:.6} s",
                since_epoch.as_secs_f64()
            ),
        );
    }
    let outcome = supervise().unwrap_or_else(|failure| {
        SandboxOutcome::without_usage(
            StepEnd::SetupFailed {
                stage: failure.stage,
                error: failure.error,
            },
            millis(start.elapsed()),
        )
    });
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &outcome)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    // Nowhere to report a failure to write the outcome but the exit code.
    if written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The supervisor: everything in host namespaces until pid 1 exists, then most of the root
/// filesystem (while pid 1 creates the network namespace), then the timeout.
fn supervise() -> Result<SandboxOutcome, Failure> {
    ensure_single_threaded()?;
    let spec = read_spec()?;
    mark("supervisor", "spec read and validated");

    // Into the step's cgroups first, while this is the only process: everything forked below —
    // pid 1, the step, whatever it spawns or daemonizes — inherits them, so the limits hold for
    // all of it and kilnd's cgroup.kill reaches all of it.
    if let Some(cgroups) = &spec.cgroups {
        cgroup::join(cgroups).map_err(|err| Failure::new("cgroup", err))?;
        mark("supervisor", "cgroups joined");
    }

    // New namespaces for everything the step could see or change: its own mount table (the root is
    // built there), pids (it sees only its own tree; killing pid 1 kills all of it), UTS (own
    // hostname), IPC (no SysV IPC with the host), cgroup (entered after joining the step's cgroups,
    // so the step's view of /proc/self/cgroup is rooted at its own cgroup and names nothing of the
    // host's hierarchy). Pid 1 creates the network namespace right after the fork (below).
    // Only the next child enters the new pid namespace (as pid 1); this process stays outside.
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|err| Failure::new("unshare", err))?;
    mark("supervisor", "namespaces unshared");

    // Everything created from here on (directories, mount point files) is 0755/0644 whatever
    // kilnd's umask; the step's own files get 022 as well.
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    // The root filesystem, as planned data (see rootfs.rs for the why of each mount), planned
    // before the fork so that a host path that cannot be inspected starts nothing.
    let plan = plan_root(&spec, &RealHost).map_err(|err| Failure::new("rootfs", err))?;
    let pid1_part = rootfs::pid1_part(&plan);

    let (status_read, status_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|err| Failure::new("status pipe", err))?;
    // Supervisor -> pid 1: one byte once the root is built and pivoted into; EOF if it failed.
    let (root_ready_read, root_ready_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|err| Failure::new("root pipe", err))?;
    let forked = Instant::now();
    match sys::fork().map_err(|err| Failure::new("fork pid 1", err))? {
        ForkResult::Child => {
            mark("init", "forked");
            drop(status_read);
            drop(root_ready_write);
            namespace_init(&spec, &plan[pid1_part..], &status_write, &root_ready_read)
        }
        ForkResult::Parent { child } => {
            drop(status_write);
            drop(root_ready_read);
            // kilnd's proxy-listener channel (fetch steps) is pid 1's from here on: without this
            // copy, kilnd sees EOF if pid 1 fails before handing the listener over.
            if crate::fetch::listener::requested() {
                let _ = nix::unistd::close(crate::fetch::listener::CHANNEL_FD);
            }
            // Two cores, two jobs: this process (already running) builds the root in the step's
            // mount namespace, which it shares with pid 1, and pivots into it, while pid 1
            // creates the step's network namespace (the most expensive unshare). Pid 1 mounts
            // /proc only after the "root ready" byte, and never starts the step without it.
            match build_root(&plan[..pid1_part]) {
                Ok(()) => write_all(&root_ready_write, b"1"),
                Err(err) => {
                    // Closing the pipe unsent tells pid 1 there is no root; kill it anyway, so
                    // nothing of the step can start.
                    drop(root_ready_write);
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    reap(child);
                    return Err(Failure::new("rootfs", err));
                }
            }
            drop(root_ready_write);
            Ok(wait_for_init(&spec, child, &status_read, forked))
        }
    }
}

/// The supervisor's part of the root filesystem, in the step's mount namespace (shared with pid
/// 1): every operation of `ops`, `pivot_root` included.
fn build_root(ops: &[MountOp]) -> Result<(), String> {
    // The copied mount table keeps the host's propagation: with shared mounts our tmpfs and binds
    // would appear on the host (and host mounts here). Make everything private, recursively.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|err| format!("make / rprivate: {err}"))?;
    for op in ops {
        sys::apply(op).map_err(|err| err.to_string())?;
        mark("supervisor", op);
    }
    Ok(())
}

/// Reads the one byte of a handshake pipe: `false` on EOF (the writer failed or died) or error.
fn wait_byte(pipe: &OwnedFd) -> bool {
    let mut byte = [0_u8; 1];
    loop {
        match nix::unistd::read(pipe, &mut byte) {
            Ok(1) => return true,
            Err(Errno::EINTR) => {}
            Ok(_) | Err(_) => return false,
        }
    }
}

/// Refuses to go on with more than one thread: `fork` in a multi-threaded process is unsound.
fn ensure_single_threaded() -> Result<(), Failure> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|err| Failure::new("helper", format!("read /proc/self/task: {err}")))?
        .count();
    if threads == 1 {
        Ok(())
    } else {
        Err(Failure::new(
            "helper",
            format!("helper must be single-threaded, has {threads} threads"),
        ))
    }
}

fn read_spec() -> Result<SandboxSpec, Failure> {
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_SPEC_BYTES)
        .read_to_end(&mut input)
        .map_err(|err| Failure::new("spec", format!("read stdin: {err}")))?;
    let spec: SandboxSpec = serde_json::from_slice(&input)
        .map_err(|err| Failure::new("spec", format!("parse: {err}")))?;
    spec.validate().map_err(|err| Failure::new("spec", err))?;
    Ok(spec)
}

/// Waits for pid 1's report until the deadline; on timeout kills pid 1 and with it the namespace.
fn wait_for_init(
    spec: &SandboxSpec,
    init: Pid,
    status_read: &OwnedFd,
    forked: Instant,
) -> SandboxOutcome {
    let deadline = forked + Duration::from_millis(spec.timeout_ms);
    let mut report = Vec::new();
    let mut buf = [0_u8; 4096];
    let read_end = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break Err(StepEnd::TimedOut);
        }
        // Round up: a sub-millisecond rest must not turn into a busy loop of zero timeouts.
        let wait_ms = remaining.as_micros().div_ceil(1000).min(i32::MAX as u128) as u32;
        let timeout = PollTimeout::try_from(wait_ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(status_read.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(err) => {
                break Err(setup_failed(
                    "supervise",
                    format!("poll status pipe: {err}"),
                ));
            }
        }
        match nix::unistd::read(status_read, &mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => report.extend_from_slice(&buf[..n]),
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(err) => {
                break Err(setup_failed(
                    "supervise",
                    format!("read status pipe: {err}"),
                ));
            }
        }
    };
    mark("supervisor", "report received");
    if read_end.is_err() {
        // SIGKILL to pid 1 from outside its namespace: the kernel then kills every process in it,
        // double-forked daemons included, before pid 1 can be reaped.
        let _ = nix::sys::signal::kill(init, Signal::SIGKILL);
    }
    let init_status = reap(init);
    mark("supervisor", "pid 1 reaped");
    match read_end {
        Err(end) => {
            let usage = children_usage();
            SandboxOutcome {
                end,
                wall_ms: millis(forked.elapsed()),
                ..usage
            }
        }
        Ok(()) => serde_json::from_slice::<SandboxOutcome>(&report).unwrap_or_else(|_| {
            SandboxOutcome::without_usage(
                setup_failed(
                    "init",
                    format!("namespace init ended without a report ({init_status})"),
                ),
                millis(forked.elapsed()),
            )
        }),
    }
}

fn setup_failed(stage: &str, error: String) -> StepEnd {
    StepEnd::SetupFailed {
        stage: stage.to_owned(),
        error,
    }
}

/// Waits for `pid`, retrying on EINTR; describes how it ended.
fn reap(pid: Pid) -> String {
    loop {
        match waitpid(pid, None) {
            Err(Errno::EINTR) => {}
            Ok(status) => return format!("{status:?}"),
            Err(err) => return format!("waitpid: {err}"),
        }
    }
}

/// Resource usage of every reaped descendant, as a zero-`end` outcome template.
fn children_usage() -> SandboxOutcome {
    let (user_ms, sys_ms, max_rss_kib) =
        getrusage(UsageWho::RUSAGE_CHILDREN).map_or((0, 0, 0), |usage| {
            (
                timeval_ms(usage.user_time()),
                timeval_ms(usage.system_time()),
                usage.max_rss().max(0) as u64,
            )
        });
    SandboxOutcome {
        end: StepEnd::TimedOut,
        wall_ms: 0,
        user_ms,
        sys_ms,
        max_rss_kib,
        limits_hit: Vec::new(),
        teardown: None,
        landlock: None,
    }
}

fn timeval_ms(tv: nix::sys::time::TimeVal) -> u64 {
    (tv.tv_sec().max(0) as u64) * 1000 + (tv.tv_usec().max(0) as u64) / 1000
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Pid 1 of the new pid namespace: creates the network namespace, finishes the root (its part of
/// the plan: `/proc`), runs the step, reports, exits.
fn namespace_init(
    spec: &SandboxSpec,
    plan: &[MountOp],
    status_write: &OwnedFd,
    root_ready: &OwnedFd,
) -> ! {
    let outcome = init(spec, plan, status_write, root_ready).unwrap_or_else(|failure| {
        SandboxOutcome::without_usage(
            StepEnd::SetupFailed {
                stage: failure.stage,
                error: failure.error,
            },
            0,
        )
    });
    if let Ok(json) = serde_json::to_vec(&outcome) {
        write_all(status_write, &json);
    }
    // Exiting ends the namespace: the kernel kills every process the step left behind.
    sys::exit_now(0)
}

fn init(
    spec: &SandboxSpec,
    plan: &[MountOp],
    status_write: &OwnedFd,
    root_ready: &OwnedFd,
) -> Result<SandboxOutcome, Failure> {
    // If the supervisor dies (kilnd cancelled the step and killed it), the sandbox must die too.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|err| Failure::new("init", err))?;
    // It may have died before the line above. getppid() is 0 either way (the parent is outside
    // this pid namespace), so ask the status pipe: no reader left means no supervisor.
    let mut fds = [PollFd::new(status_write.as_fd(), PollFlags::POLLOUT)];
    if nix::poll::poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|events| events.contains(PollFlags::POLLERR))
    {
        sys::exit_now(1);
    }
    // A network namespace of the step's own: empty, only a down loopback, no route anywhere.
    // Created here, while the supervisor builds the root, and before anything of the step exists.
    // Nothing here may use a path until the root is ready: the supervisor's pivot_root moves
    // this process's root (it is the old root) at a moment it does not know.
    nix::sched::unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|err| Failure::new("unshare", format!("network namespace: {err}")))?;
    mark("init", "network namespace unshared");
    // Our own UTS namespace: the host's name is neither visible nor changed.
    nix::unistd::sethostname(&spec.hostname).map_err(|err| Failure::new("hostname", err))?;

    // The rest of the root filesystem once the supervisor's part is in place: this pid
    // namespace's /proc. The supervisor's pivot_root moved this process's root to the new one;
    // its working directory may still be in the detached host tree: leave it for good.
    if !wait_byte(root_ready) {
        return Err(Failure::new(
            "rootfs",
            "the supervisor did not finish the root filesystem",
        ));
    }
    nix::unistd::chdir("/").map_err(|err| Failure::new("rootfs", format!("chdir /: {err}")))?;
    mark("init", "supervisor's part of the root is ready");
    for op in plan {
        sys::apply(op).map_err(|err| Failure::new("rootfs", err))?;
        mark("init", op);
    }
    // A fetch step: kilnd's proxy listener, created in the step's network namespace before
    // anything of the step exists (it checks its channel through the new /proc).
    if crate::fetch::listener::requested() {
        crate::fetch::listener::hand_over()
            .map_err(|err| Failure::new("proxy listener", error_chain(&err)))?;
    }
    // stdin (the spec pipe) and stdout (the outcome channel) are not the step's: only the log (fd 2)
    // is inherited. (The sandbox's /dev/null: the host's device node, bound.)
    let dev_null = nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|err| Failure::new("init", format!("open /dev/null: {err}")))?;
    nix::unistd::dup2_stdin(&dev_null).map_err(|err| Failure::new("init", err))?;
    nix::unistd::dup2_stdout(&dev_null).map_err(|err| Failure::new("init", err))?;
    drop(dev_null);

    let program = Program::new(spec).map_err(|err| Failure::new("exec", err))?;
    mark("init", "program prepared");
    // CLOEXEC: a successful execve closes it (EOF, no bytes); a failure is written to it.
    let (error_read, error_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|err| Failure::new("init", err))?;
    // `[userns]`: step -> pid 1 "user namespace created", pid 1 -> step "ids mapped".
    let userns_pipes = match spec.confinement.userns {
        Some(_) => Some((
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|err| Failure::new("userns", err))?,
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|err| Failure::new("userns", err))?,
        )),
        None => None,
    };
    let started = Instant::now();
    let step = match sys::fork().map_err(|err| Failure::new("fork step", err))? {
        ForkResult::Child => {
            mark("step", "forked");
            drop(error_read);
            let userns_sync =
                userns_pipes.map(|((_, created), (mapped, _))| UsernsSync { created, mapped });
            run_step(spec, &program, &error_write, userns_sync.as_ref())
        }
        ForkResult::Parent { child } => child,
    };
    drop(error_write);
    let mut userns_failure = None;
    if let (Some(userns), Some(((created, created_step), (mapped_step, mapped)))) =
        (spec.confinement.userns, userns_pipes)
    {
        // Only the step holds these ends: a step that fails before the handshake must be seen
        // as EOF here, not as a wait until the timeout.
        drop(created_step);
        drop(mapped_step);
        // No byte: the step failed before (its report says why). On a failed mapping `mapped`
        // is closed unsent: the step gives up without running anything.
        if wait_byte(&created) {
            match write_id_maps(step, &userns) {
                Ok(()) => write_all(&mapped, b"1"),
                Err(err) => userns_failure = Some(setup_failed("userns", err)),
            }
            mark("init", "user namespace ids mapped");
        }
    }
    let step_report = read_to_end(&error_read);

    // As pid 1 we inherit every orphan in the namespace: reap them all while waiting for the step.
    let status = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(status) if status.pid() == Some(step) => break status,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(err) => return Err(Failure::new("reap", err)),
        }
    };
    let wall_ms = millis(started.elapsed());
    mark("init", "step reaped");
    let mut landlock = None;
    let mut failure = None;
    for report in serde_json::Deserializer::from_slice(&step_report).into_iter::<StepReport>() {
        match report {
            Ok(StepReport::Confined(enforcement)) => landlock = Some(enforcement),
            Ok(StepReport::Exec(error)) => failure = Some(StepEnd::ExecFailed { error }),
            Ok(StepReport::Setup(setup)) => {
                failure = Some(StepEnd::SetupFailed {
                    stage: setup.stage,
                    error: setup.error,
                });
            }
            Err(_) => break,
        }
    }
    let end = match userns_failure.or(failure) {
        Some(end) => end,
        None => match status {
            WaitStatus::Exited(_, code) => StepEnd::Exited { code },
            WaitStatus::Signaled(_, signal, _) => StepEnd::Signaled {
                signal: signal as i32,
            },
            other => setup_failed("reap", format!("unexpected wait status {other:?}")),
        },
    };
    Ok(SandboxOutcome {
        end,
        wall_ms,
        landlock,
        ..children_usage()
    })
}

/// Writes the step's id maps as pid 1 (in the parent user namespace, with CAP_SETUID/CAP_SETGID
/// there): uid_map, then `deny` to setgroups (the step can never change its supplementary groups,
/// which it cleared before), then gid_map. Each in one `write`, as the kernel requires.
fn write_id_maps(step: Pid, userns: &super::confine::UserNamespace) -> Result<(), String> {
    for (file, contents) in [
        ("uid_map", userns.uid_map()),
        ("setgroups", "deny".to_owned()),
        ("gid_map", userns.gid_map()),
    ] {
        let path = format!("/proc/{step}/{file}");
        let fd = nix::fcntl::open(
            path.as_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| format!("open {path}: {err}"))?;
        match nix::unistd::write(&fd, contents.as_bytes()) {
            Ok(n) if n == contents.len() => {}
            Ok(n) => {
                return Err(format!(
                    "write {path}: short write ({n} of {})",
                    contents.len()
                ));
            }
            Err(err) => return Err(format!("write {contents:?} to {path}: {err}")),
        }
    }
    Ok(())
}

/// The step's ends of the `[userns]` handshake with pid 1.
struct UsernsSync {
    /// Step -> pid 1: one byte once the user namespace exists.
    created: OwnedFd,
    /// Pid 1 -> step: one byte once the ids are mapped; EOF if that failed.
    mapped: OwnedFd,
}

/// The step's program, prepared before the fork: C strings and the `PATH` candidates.
struct Program {
    argv: Vec<CString>,
    env: Vec<CString>,
    candidates: Vec<CString>,
    /// The profile's seccomp filter, decoded before the fork.
    seccomp: Vec<libc::sock_filter>,
}

impl Program {
    fn new(spec: &SandboxSpec) -> Result<Self, Errno> {
        let argv = spec
            .argv
            .iter()
            .map(sys::c_string)
            .collect::<Result<Vec<_>, _>>()?;
        let env = spec
            .env
            .iter()
            .map(|(name, value)| sys::c_string(format!("{name}={value}")))
            .collect::<Result<Vec<_>, _>>()?;
        let program = spec.argv.first().map_or("", String::as_str);
        let candidates = if program.contains('/') {
            vec![sys::c_string(program)?]
        } else {
            spec.path_env()
                .split(':')
                .map(|dir| {
                    sys::c_string(format!(
                        "{}/{program}",
                        if dir.is_empty() { "." } else { dir }
                    ))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Self {
            argv,
            env,
            candidates,
            seccomp: spec.confinement.seccomp.to_filter(),
        })
    }
}

/// The step process: drop everything, exec; on failure report through `error_write` and exit 127.
fn run_step(
    spec: &SandboxSpec,
    program: &Program,
    error_write: &OwnedFd,
    userns: Option<&UsernsSync>,
) -> ! {
    let failure = match prepare_step(spec, program, error_write, userns) {
        // The seccomp filter is in place: only what the profile allows from here on (execve,
        // write and exit_group at least).
        Ok(()) => StepReport::Exec(exec(spec, program)),
        Err(failure) => StepReport::Setup(failure),
    };
    if let Ok(json) = serde_json::to_vec(&failure) {
        write_all(error_write, &json);
    }
    sys::exit_now(127)
}

fn prepare_step(
    spec: &SandboxSpec,
    program: &Program,
    error_write: &OwnedFd,
    userns: Option<&UsernsSync>,
) -> Result<(), Failure> {
    // A session of its own: no controlling terminal, and job-control signals aimed at the helper's
    // process group do not reach it.
    nix::unistd::setsid().map_err(|err| Failure::new("session", err))?;
    // stdout and stderr both go to the step log (the helper's stderr); stdin is already /dev/null.
    nix::unistd::dup2_stdout(std::io::stderr()).map_err(|err| Failure::new("stdio", err))?;
    sys::reset_signals().map_err(|err| Failure::new("signals", err))?;
    // Nothing but fds 0-2 crosses the execve.
    sys::cloexec_from_3().map_err(|err| Failure::new("fds", err))?;
    // The Landlock ruleset is built while still root, so every rule path opens whatever its mode;
    // its fds are close-on-exec.
    // The secrets tmpfs brings its own read-only rule (it exists only when the step has secrets).
    let landlock_policy = spec.confinement.landlock.as_ref().map(|policy| {
        let mut policy = policy.clone();
        if !spec.secrets.is_empty() {
            policy.rules.push(confine::LandlockRule {
                path: SECRETS_MOUNT.into(),
                access: confine::LandlockAccess::Read,
            });
        }
        policy
    });
    let landlock = landlock_policy
        .as_ref()
        .map(confine::prepare_landlock)
        .transpose()
        .map_err(|err| Failure::new("landlock", error_chain(&err)))?;
    mark("step", "landlock ruleset prepared");
    drop_privileges(spec, userns)?;
    mark("step", "privileges dropped and verified");
    // After the drop: the step's user must be allowed to enter its working directory.
    nix::unistd::chdir(&spec.cwd)
        .map_err(|err| Failure::new("cwd", format!("{}: {err}", spec.cwd.display())))?;
    // Defence in depth under the mount setup: the step reaches only the listed paths, no TCP
    // bind/connect, no signal or abstract socket outside its own processes. Best effort on older
    // kernels; how far it got is reported and recorded in the outcome.
    let enforcement = match landlock {
        Some(prepared) => confine::enforce_landlock(prepared)
            .map_err(|err| Failure::new("landlock", error_chain(&err)))?,
        None => LandlockEnforcement::Disabled,
    };
    if let Ok(json) = serde_json::to_vec(&StepReport::Confined(enforcement)) {
        write_all(error_write, &json);
    }
    mark("step", "landlock enforced");
    // Last before execve: the profile's syscall allowlist (no_new_privs is set). Nothing after
    // this may need a syscall the profile does not allow.
    mark("step", "installing seccomp");
    sys::install_seccomp(&program.seccomp).map_err(|err| Failure::new("seccomp", err))?;
    // The last mark (a profile may deny the write: then it is lost, nothing else changes).
    mark("step", "seccomp installed, execve");
    Ok(())
}

/// Root with all capabilities → `spec.uid`/`spec.gid` with none, for good: rlimits, groups, the
/// user namespace (`[userns]`), bounding set, locked securebits, ids, capability sets,
/// no_new_privs.
fn drop_privileges(spec: &SandboxSpec, userns: Option<&UsernsSync>) -> Result<(), Failure> {
    let fail = |what: &str, err: &dyn std::fmt::Display| {
        Failure::new("privileges", format!("{what}: {err}"))
    };
    // Limits as both soft and hard value while still privileged (CAP_SYS_RESOURCE may raise a hard
    // limit kilnd inherited); unprivileged, the step can only lower them.
    let rlimits = &spec.confinement.rlimits;
    for (resource, limit) in [
        (Resource::RLIMIT_CORE, rlimits.core_bytes),
        (Resource::RLIMIT_NOFILE, rlimits.nofile),
        (Resource::RLIMIT_FSIZE, rlimits.fsize_bytes),
    ] {
        let limit = if limit == u64::MAX {
            libc::RLIM_INFINITY
        } else {
            limit
        };
        match setrlimit(resource, limit, limit) {
            Ok(()) => {}
            // Raising a hard limit needs CAP_SYS_RESOURCE, which some hosts (containers) do not
            // grant even to root: keep the inherited hard limit, which is lower — stricter than
            // the profile asked, never looser.
            Err(Errno::EPERM) => {
                let (_, hard) = nix::sys::resource::getrlimit(resource)
                    .map_err(|err| fail(&format!("{resource:?}"), &err))?;
                if hard >= limit {
                    return Err(fail(&format!("{resource:?}"), &Errno::EPERM));
                }
                eprintln!(
                    "kiln-sandbox: {resource:?}: the profile asks {limit}, kilnd's hard limit is {hard} and cannot be raised here (no CAP_SYS_RESOURCE): using {hard}"
                );
                setrlimit(resource, hard, hard)
                    .map_err(|err| fail(&format!("{resource:?}"), &err))?;
            }
            Err(err) => return Err(fail(&format!("{resource:?}"), &err)),
        }
    }
    // Root's supplementary groups (disk, adm, …) must not survive.
    nix::unistd::setgroups(&[]).map_err(|err| fail("setgroups", &err))?;
    // `[userns]`: into the step's own user namespace, now that nothing left needs a host
    // privilege; pid 1 maps its ids. Entering it gives a full bounding set, all capabilities (in
    // the new namespace only) and default securebits: the drop below starts from there.
    if let Some(sync) = userns {
        nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
            .map_err(|err| fail("unshare user namespace", &err))?;
        write_all(&sync.created, b"1");
        if !wait_byte(&sync.mapped) {
            return Err(fail("user namespace", &"pid 1 did not map the step's ids"));
        }
    }
    // Bounding set before the ids change, while we still hold CAP_SETPCAP: afterwards no execve (setuid-root or
    // file-capability binaries) can bring a capability back. Numbers past the kernel's last
    // capability give EINVAL; capabilities unknown to the caps crate are dropped too.
    for cap in 0..64 {
        match sys::drop_bounding_cap(cap) {
            Ok(()) => {}
            Err(Errno::EINVAL) if cap > 0 => break,
            Err(err) => {
                return Err(fail(
                    &format!("drop capability {cap} from the bounding set"),
                    &err,
                ));
            }
        }
    }
    // Lock the securebits while CAP_SETPCAP is still effective: no later uid change or execve can
    // make root capabilities come back, and the lock cannot be undone.
    sys::lock_securebits().map_err(|err| fail("PR_SET_SECUREBITS", &err))?;
    // gid before uid: once the uid is not 0 the gid can no longer change. All three ids (real,
    // effective, saved), so nothing can switch back.
    let gid = Gid::from_raw(spec.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|err| fail("setresgid", &err))?;
    let uid = Uid::from_raw(spec.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|err| fail("setresuid", &err))?;
    // Leaving uid 0 already empties permitted/effective/ambient unless SECBIT_KEEP_CAPS is set;
    // clear every set explicitly so the result does not depend on securebits. Order matters:
    // ambient ⊆ permitted ∩ inheritable and effective ⊆ permitted.
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Effective,
        caps::CapSet::Inheritable,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|err| fail(&format!("clear {set:?} capabilities"), &err))?;
    }
    // Neither setuid binaries nor file capabilities can grant anything to the step or its children.
    nix::sys::prctl::set_no_new_privs().map_err(|err| fail("PR_SET_NO_NEW_PRIVS", &err))?;
    verify_unprivileged(spec)
}

/// Reads back what the kernel says about this process: no capability in any set, no new privs,
/// only the step's ids.
fn verify_unprivileged(spec: &SandboxSpec) -> Result<(), Failure> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|err| Failure::new("privileges", format!("read /proc/self/status: {err}")))?;
    let ids = |id: u32| format!("{id}\t{id}\t{id}\t{id}");
    let expected = [
        ("CapInh", "0000000000000000".to_owned()),
        ("CapPrm", "0000000000000000".to_owned()),
        ("CapEff", "0000000000000000".to_owned()),
        ("CapBnd", "0000000000000000".to_owned()),
        ("CapAmb", "0000000000000000".to_owned()),
        ("NoNewPrivs", "1".to_owned()),
        ("Uid", ids(spec.uid)),
        ("Gid", ids(spec.gid)),
        ("Groups", String::new()),
    ];
    // `[userns]`: the kernel's view of the mapping is the profile's.
    if let Some(userns) = &spec.confinement.userns {
        let fields = |map: &str| {
            map.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        for (file, want) in [("uid_map", userns.uid_map()), ("gid_map", userns.gid_map())] {
            let got = std::fs::read_to_string(format!("/proc/self/{file}")).map_err(|err| {
                Failure::new("privileges", format!("read /proc/self/{file}: {err}"))
            })?;
            if fields(&got) != fields(&want) {
                return Err(Failure::new(
                    "privileges",
                    format!("user namespace {file} is {got:?}, expected {want:?}"),
                ));
            }
        }
    }
    match sys::securebits() {
        Ok(bits) if bits == sys::LOCKED_SECUREBITS => {}
        other => {
            return Err(Failure::new(
                "privileges",
                format!(
                    "securebits not locked: {other:?}, expected {:#x}",
                    sys::LOCKED_SECUREBITS
                ),
            ));
        }
    }
    for (field, want) in expected {
        let got = status
            .lines()
            .find_map(|line| {
                line.strip_prefix(field)
                    .and_then(|rest| rest.strip_prefix(':'))
            })
            .map(str::trim);
        if got != Some(want.as_str()) {
            return Err(Failure::new(
                "privileges",
                format!("privilege drop not effective: {field} is {got:?}, expected {want:?}"),
            ));
        }
    }
    Ok(())
}

/// `execve` of the first `PATH` candidate that exists, like `execvp` but with the spec's `PATH`
/// and environment only. Returns only on failure, with the message for the log.
fn exec(spec: &SandboxSpec, program: &Program) -> String {
    let name = spec.argv.first().map_or("", String::as_str);
    let mut denied = None;
    for candidate in &program.candidates {
        match nix::unistd::execve(candidate, &program.argv, &program.env) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => {}
            Err(Errno::EACCES) => denied = Some(candidate.to_string_lossy().into_owned()),
            Err(err) => return format!("cannot execute {}: {err}", candidate.to_string_lossy()),
        }
    }
    match denied {
        Some(path) => format!("permission denied: {path}"),
        None if name.contains('/') => format!("no such file: {name}"),
        None => format!("command not found: {name} (PATH={})", spec.path_env()),
    }
}

fn read_to_end(fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(Errno::EINTR) => {}
            Err(_) => return out,
        }
    }
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}
