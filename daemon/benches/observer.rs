//! Observer benchmark (scripts/bench/observer), every baseline measured in this run:
//! 1. a real C build (`make -j2` of a generated project) bare (no BPF loaded), observed (its
//!    cgroup filtered in, events routed and assembled into a trace), and under
//!    `strace -f -o /dev/null`: ratios observed/bare (target <= 1.03) and strace/bare, and
//!    kiln's extra time as a fraction of strace's (target <= 1/10);
//! 2. syscall storms, each event/s delivered and lost with the default ring, and the storm's
//!    slowdown observed vs bare:
//!    - `open`: open+close of /dev/null in a tight C loop (one file record per iteration); this
//!      VM's kernel itself needs ~2.7 us per iteration, so it cannot pass ~370K iterations/s;
//!    - `chdir`: chdir("/") in a tight loop in two processes (one per core): cheap syscalls that
//!      each make a file record (the file path: one sys_exit program, a cwd walk);
//!    - `eperm`: setuid(0) as uid 65534 in two processes: each call one `denied` record, the
//!      cheapest event, to measure the transport (ring + wakeups + consumer) itself;
//! 3. what every other process on the host pays while a step is observed (target <= 1.05):
//!    - the open storm outside any observed cgroup, bare; with only the kernel floor attached
//!      (`kiln_ebpf::FLOOR_BPF`: one empty tp_btf/sys_exit program, since any program on the
//!      raw syscall tracepoint puts every task's syscalls on the kernel's slow path); and with
//!      the observer loaded AND a step's cgroup observed: ratios floor/bare, kiln/bare and
//!      kiln/floor (what kiln's own program adds). This is the worst case: a process that does
//!      nothing but syscalls. Again once no step has been observed for a while (the syscall
//!      programs are then detached);
//!    - the realistic case: the same C build (`make -j2`) on the host, outside any observed
//!      cgroup, while a step runs a modest workload (a loop of short processes opening a file)
//!      in its own cgroup: bare (the step runs too, nothing loaded) vs the observer loaded and
//!      the step observed (its events delivered, so the syscall programs are attached and busy);
//!      each round builds bare, observed, observed, bare (or the reverse), and the line shows
//!      each round's ratio of its means.
//!
//! Rounds are interleaved and the median is reported, to damp drift; the build's bare and
//! observed runs, and the host comparisons' variants, run back to back in an order swapped or
//! rotated each round (whichever runs first measured up to 13% slower). Environment:
//! `BENCH_BUILD_FILES` (default 320: a build of ~20 s on the 2-core VM), `BENCH_RUNS` (default
//! 5), `BENCH_STORM` (open+close iterations, default 1000000).
//!
//! Wall times on the shared VM move by up to ±15% between back-to-back runs of the same build,
//! so each workload is also run once more observed with the kernel's BPF run-time statistics
//! on: the CPU time of each BPF program and of the ring consumer, against the build's own CPU
//! time (a figure that neighbours on the host do not move).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark driver: a failed setup is a failed run"
)]

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kilnd::observe::assemble::{self, StepContext};
use kilnd::observe::{CgroupId, ObserverConfig, ObserverService};
use tokio::process::Command;

const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct BenchCgroup {
    path: PathBuf,
    id: CgroupId,
}

impl BenchCgroup {
    fn new() -> Self {
        let path =
            Path::new(CGROUP2_ROOT).join(format!("kiln-bench-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir(&path).unwrap();
        let id = CgroupId::of_path(&path).unwrap();
        Self { path, id }
    }

    /// `program args` joining this cgroup between fork and exec (when `join`).
    fn command(&self, program: &str, args: &[&str], cwd: &Path, join: bool) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if join {
            let procs = OpenOptions::new()
                .write(true)
                .open(self.path.join("cgroup.procs"))
                .unwrap();
            // SAFETY: runs between fork and exec; only write(2) (async-signal-safe) on an fd
            // opened before the fork; allocates nothing.
            unsafe {
                cmd.pre_exec(move || join_cgroup(&procs));
            }
        }
        cmd
    }
}

impl BenchCgroup {
    /// Kills every process in the cgroup and waits until it is empty.
    async fn kill_all(&self) {
        std::fs::write(self.path.join("cgroup.kill"), "1").unwrap();
        for _ in 0..500 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap();
            if procs.trim().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{}: processes left after cgroup.kill", self.path.display());
    }
}

/// A step's modest workload, in its cgroup until killed: short processes, each opening a file
/// (~20 execs/s; little CPU, so the host build it runs beside competes with it only a little,
/// and equally in both variants).
const STEP_WORKLOAD: &str = "while :; do cat /etc/os-release >/dev/null; sleep 0.05; done";

/// The kernel floor of the syscall tracepoint kiln attaches while a step is observed:
/// `kiln_ebpf::FLOOR_BPF`'s empty program, loaded once, attached only between [`Floor::attach`]
/// and [`Floor::detach`].
struct Floor {
    ebpf: aya::Ebpf,
    link: Option<aya::programs::tp_btf::BtfTracePointLinkId>,
}

impl Floor {
    fn load() -> Self {
        assert!(
            !kiln_ebpf::FLOOR_BPF.is_empty(),
            "kiln-ebpf was built with KILN_SKIP_BPF=1: no floor object to load"
        );
        let btf = aya::Btf::from_sys_fs().unwrap();
        let mut ebpf = aya::EbpfLoader::new()
            .btf(Some(&btf))
            .load(kiln_ebpf::FLOOR_BPF)
            .unwrap();
        let (program, tracepoint) = kiln_ebpf::FLOOR_PROGRAM;
        let prog: &mut aya::programs::BtfTracePoint =
            ebpf.program_mut(program).unwrap().try_into().unwrap();
        prog.load(tracepoint, &btf).unwrap();
        Self { ebpf, link: None }
    }

    fn program(&mut self) -> &mut aya::programs::BtfTracePoint {
        self.ebpf
            .program_mut(kiln_ebpf::FLOOR_PROGRAM.0)
            .unwrap()
            .try_into()
            .unwrap()
    }

    fn attach(&mut self) {
        self.link = Some(self.program().attach().unwrap());
    }

    fn detach(&mut self) {
        let link = self.link.take().unwrap();
        self.program().detach(link).unwrap();
    }
}

fn join_cgroup(procs: &File) -> std::io::Result<()> {
    // SAFETY: the fd is open for the lifetime of `procs`; the buffer is a valid 1-byte slice.
    let written = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if written == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn c_project(dir: &Path, files: usize) {
    let mut objs = Vec::new();
    for i in 0..files {
        let mut src = format!(
            "#include <string.h>\n#include <stdio.h>\nint f{i}(const char *s) {{\n  int h = {i};\n"
        );
        for j in 0..40 {
            writeln!(
                src,
                "  for (size_t k = 0; k < strlen(s); k++) h = h * 31 + s[k] + {j};"
            )
            .unwrap();
        }
        src.push_str(
            "  char buf[64]; snprintf(buf, sizeof buf, \"%d\", h); return (int)strlen(buf) + h;\n}\n",
        );
        std::fs::write(dir.join(format!("f{i}.c")), src).unwrap();
        objs.push(format!("f{i}.o"));
    }
    let makefile = format!(
        "CFLAGS = -O2 -Wall\nall: libbench.a\n%.o: %.c\n\tcc $(CFLAGS) -c $< -o $@\nlibbench.a: {}\n\tar rcs $@ $^\nclean:\n\trm -f *.o *.a\n",
        objs.join(" ")
    );
    std::fs::write(dir.join("Makefile"), makefile).unwrap();
}

/// `storm open N`: N open+close of /dev/null. `storm chdir N`: N chdir("/") in each of two
/// processes. `storm eperm N`: two processes drop to uid 65534, then N setuid(0) each (EPERM:
/// one `denied` record per call, the smallest record: the transport's own ceiling).
const STORM_C: &str = "#include <fcntl.h>\n#include <stdlib.h>\n#include <string.h>\n\
#include <sys/wait.h>\n#include <unistd.h>\n\
int main(int argc, char **argv) { long n = atol(argv[2]);\n\
if (strcmp(argv[1], \"open\") == 0) {\n\
  for (long i = 0; i < n; i++) { int fd = open(\"/dev/null\", O_RDONLY); close(fd); }\n\
  return 0; }\n\
pid_t child = fork();\n\
if (strcmp(argv[1], \"eperm\") == 0) {\n\
  if (setuid(65534) != 0) return 1;\n\
  for (long i = 0; i < n; i++) setuid(0);\n\
} else { for (long i = 0; i < n; i++) chdir(\"/\"); }\n\
if (child > 0) { int status; waitpid(child, &status, 0); }\n\
return 0; }\n";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn run(mut cmd: Command) -> Duration {
    let start = Instant::now();
    let status = cmd.status().await.unwrap();
    assert!(status.success(), "{cmd:?} failed");
    start.elapsed()
}

/// CPU time used while `cmd` ran: its own (and its descendants', the BPF programs' included)
/// plus this process's (the ring consumer, when observed).
async fn run_cpu(cmd: Command) -> (Duration, Duration) {
    use nix::sys::resource::UsageWho::{RUSAGE_CHILDREN, RUSAGE_SELF};
    let before = cpu(RUSAGE_CHILDREN) + cpu(RUSAGE_SELF);
    let wall = run(cmd).await;
    (
        wall,
        (cpu(RUSAGE_CHILDREN) + cpu(RUSAGE_SELF)).saturating_sub(before),
    )
}

/// Runs `cmd` in `cgroup` observed by `service`; returns (wall, events, lost) and assembles the
/// trace (part of what a step pays).
async fn run_observed(
    service: &std::sync::Arc<ObserverService>,
    cgroup: &BenchCgroup,
    cmd: Command,
) -> (Duration, usize, u64) {
    let (wall, events, lost, _) = run_observed_cpu(service, cgroup, cmd).await;
    (wall, events, lost)
}

/// [`run_observed`], also returning the CPU time used while `cmd` ran ([`run_cpu`]).
async fn run_observed_cpu(
    service: &std::sync::Arc<ObserverService>,
    cgroup: &BenchCgroup,
    cmd: Command,
) -> (Duration, usize, u64, Duration) {
    let observation = service.attach(cgroup.id).unwrap();
    let (wall, cpu_used) = run_cpu(cmd).await;
    let collected = observation.finish().await.unwrap();
    let ctx = StepContext {
        job_id: "bench",
        step: "bench",
        builder_id: "urn:kiln:node:bench",
        started_on: "",
        finished_on: "",
        secrets: &[],
        attached_before_start: true,
        until_last_exit: true,
        cgroup_id: cgroup.id.0,
        hash_materials: true,
    };
    let assembled = assemble::assemble(&collected.events, collected.lost, &ctx).unwrap();
    assert!(!assembled.blob.is_empty());
    (wall, collected.events.len(), collected.lost, cpu_used)
}

/// CPU time (user + system) of this process's threads (`RUSAGE_SELF`: the observer's ring
/// consumer and router; the bench's own task only awaits the child while a workload runs), or
/// of its waited-for children and their descendants (`RUSAGE_CHILDREN`: a workload, including
/// the BPF programs that ran in its syscalls).
fn cpu(who: nix::sys::resource::UsageWho) -> Duration {
    let usage = nix::sys::resource::getrusage(who).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

/// Run counts and run time of the loaded `kiln_*` BPF programs (from `bpftool prog show`; the
/// kernel counts them only while run-time stats are enabled, see `profile`), summed by name.
fn bpf_prog_stats() -> std::collections::BTreeMap<String, (u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["--json", "prog", "show"])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool prog show failed");
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut stats = std::collections::BTreeMap::new();
    for prog in progs {
        let Some(name) = prog["name"].as_str().filter(|n| n.starts_with("kiln_")) else {
            continue;
        };
        let entry = stats.entry(name.to_owned()).or_insert((0, 0));
        entry.0 += prog["run_cnt"].as_u64().unwrap_or(0);
        entry.1 += prog["run_time_ns"].as_u64().unwrap_or(0);
    }
    stats
}

/// One more observed run of a workload, untimed against the others, with the kernel's BPF
/// run-time stats on (they cost two clock reads per program run): where its extra time goes, per
/// BPF program and in the ring consumer.
async fn profile(what: &str, cmd: Command, cgroup: &BenchCgroup) {
    use nix::sys::resource::UsageWho::{RUSAGE_CHILDREN, RUSAGE_SELF};
    // BPF_ENABLE_STATS: on while the fd is open, so a bench killed here leaves them off (the
    // sysctl would stay on and slow every later run).
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
    let service = ObserverService::start(&ObserverConfig::default()).unwrap();
    let observation = service.attach(cgroup.id).unwrap();
    let before = (bpf_prog_stats(), cpu(RUSAGE_SELF), cpu(RUSAGE_CHILDREN));
    let wall = run(cmd).await;
    let after = (bpf_prog_stats(), cpu(RUSAGE_SELF), cpu(RUSAGE_CHILDREN));
    let collected = observation.finish().await.unwrap();
    drop(stats);
    let consumer = after.1.saturating_sub(before.1);
    let workload = after.2.saturating_sub(before.2);
    let events = collected.events.len();
    // What one event costs the consumer, and so how many per second one core could take.
    let per_event = consumer.as_secs_f64() / events.max(1) as f64;
    let mut line = format!(
        "{what} profile (BPF stats on; wall {wall:.2?}, {events} events): ring consumer CPU {consumer:.2?} ({:.0} ns/event: one core takes {:.1} M events/s)",
        per_event * 1e9,
        1e-6 / per_event
    );
    let mut bpf = Duration::ZERO;
    for (name, (runs, ns)) in &after.0 {
        let (runs0, ns0) = before.0.get(name).copied().unwrap_or((0, 0));
        let (runs, ns) = (runs - runs0, ns - ns0);
        if let Some(per_run) = ns.checked_div(runs) {
            bpf += Duration::from_nanos(ns);
            write!(line, "; {name} {runs} runs x {per_run} ns").unwrap();
        }
    }
    // The BPF programs ran in the workload's syscalls: its CPU time includes them.
    let own = workload.saturating_sub(bpf);
    write!(
        line,
        "; BPF total {bpf:.2?}; kiln's CPU (BPF + consumer) = {:.2}% of the workload's own CPU {own:.2?}",
        100.0 * (bpf + consumer).as_secs_f64() / own.as_secs_f64()
    )
    .unwrap();
    println!("{line}");
}

/// Each round's ratio `observed / bare` (its two runs ran back to back: their spread shows the
/// noise), and their median: the paired figure,
/// which drift of the VM between rounds does not move the way it moves the medians' ratio.
fn per_round(observed: &[Duration], bare: &[Duration]) -> String {
    let mut ratios: Vec<f64> = observed
        .iter()
        .zip(bare)
        .map(|(observed, bare)| ratio(*observed, *bare))
        .collect();
    let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
    format!("{}, paired median {median:.3}x", listed.join(" "))
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("observer bench: needs root");
        std::process::exit(2);
    }
    if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() != "0")
    {
        eprintln!(
            "observer bench: kernel.bpf_stats_enabled is on: every BPF program run pays two clock reads and the observed figures would include them; `sysctl kernel.bpf_stats_enabled=0` first"
        );
        std::process::exit(2);
    }
    let files = env_usize("BENCH_BUILD_FILES", 320);
    let runs = env_usize("BENCH_RUNS", 5);
    let storm = env_usize("BENCH_STORM", 1_000_000);
    let dir = tempfile::tempdir().unwrap();
    c_project(dir.path(), files);
    std::fs::write(dir.path().join("storm.c"), STORM_C).unwrap();
    let cc = std::process::Command::new("cc")
        .args(["-O2", "-o", "storm", "storm.c"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(cc.success());
    let cgroup = BenchCgroup::new();
    // A second step's cgroup, observed (idle) while the host storm runs.
    let idle_step = BenchCgroup::new();
    // A third step's cgroup, running STEP_WORKLOAD beside a build on the host.
    let busy_step = BenchCgroup::new();
    let make = |join: bool| cgroup.command("make", &["-s", "-j2", "-B", "all"], dir.path(), join);
    let storm_arg = storm.to_string();
    let chdir_arg = (storm / 2).to_string();
    let open_storm =
        |join: bool| cgroup.command("./storm", &["open", &storm_arg], dir.path(), join);
    let chdir_storm =
        |join: bool| cgroup.command("./storm", &["chdir", &chdir_arg], dir.path(), join);
    let eperm_storm =
        |join: bool| cgroup.command("./storm", &["eperm", &chdir_arg], dir.path(), join);
    let build = files > 0;

    println!(
        "observer bench: {files}-file C build (make -j2), storms of {storm} events, {runs} rounds (median)"
    );
    if build {
        // Warm the page cache.
        run(make(false)).await;
    }

    let (mut bare, mut observed, mut straced) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bare_cpu, mut observed_cpu) = (Vec::new(), Vec::new());
    let mut open_runs = StormRuns::default();
    let mut chdir_runs = StormRuns::default();
    let mut eperm_runs = StormRuns::default();
    let mut storm_on_host = Vec::new();
    let mut storm_on_idle_node = Vec::new();
    let mut storm_on_floor = Vec::new();
    let mut storm_on_host_bare = Vec::new();
    let (mut host_build_bare, mut host_build_observed) = (Vec::new(), Vec::new());
    let mut busy_step_events = 0;
    let mut floor = Floor::load();
    let mut build_events = 0;
    for round in 0..runs {
        // The build bare (nothing loaded) and observed back to back, the order swapped every
        // round (whichever build runs first in a round measured up to 13% slower); then strace.
        if build {
            for observe in [round % 2 == 1, round % 2 == 0] {
                if observe {
                    let service = ObserverService::start(&ObserverConfig::default()).unwrap();
                    let (wall, events, lost, cpu_used) =
                        run_observed_cpu(&service, &cgroup, make(true)).await;
                    assert_eq!(lost, 0, "the build lost events");
                    observed.push(wall);
                    observed_cpu.push(cpu_used);
                    build_events = events;
                } else {
                    let (wall, cpu_used) = run_cpu(make(false)).await;
                    bare.push(wall);
                    bare_cpu.push(cpu_used);
                }
            }
            let mut strace = Command::new("strace");
            strace
                .args(["-f", "-o", "/dev/null", "make", "-s", "-j2", "-B", "all"])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            straced.push(run(strace).await);
        }
        open_runs.bare.push(run(open_storm(false)).await);
        chdir_runs.bare.push(run(chdir_storm(false)).await);
        eperm_runs.bare.push(run(eperm_storm(false)).await);

        // Loaded: observed storms, then the storm on the host once no step has been
        // observed for a while.
        let service = ObserverService::start(&ObserverConfig::default()).unwrap();
        open_runs.observe(run_observed(&service, &cgroup, open_storm(true)).await);
        chdir_runs.observe(run_observed(&service, &cgroup, chdir_storm(true)).await);
        eperm_runs.observe(run_observed(&service, &cgroup, eperm_storm(true)).await);
        // No step observed for a while: the syscall programs are detached.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        storm_on_idle_node.push(run(open_storm(false)).await);
        drop(service);

        // The host (nothing it runs is observed): each comparison's variants back to back, in
        // an order rotated every round, so neither side always follows the same neighbour.
        let mut storm_variants = [Host::Bare, Host::Floor, Host::Kiln];
        storm_variants.rotate_left(round % 3);
        for variant in storm_variants {
            match variant {
                Host::Bare => storm_on_host_bare.push(run(open_storm(false)).await),
                Host::Floor => {
                    floor.attach();
                    storm_on_floor.push(run(open_storm(false)).await);
                    floor.detach();
                }
                Host::Kiln => {
                    // Another step's cgroup observed (idle): the syscall programs attached.
                    let service = ObserverService::start(&ObserverConfig::default()).unwrap();
                    let idle = service.attach(idle_step.id).unwrap();
                    storm_on_host.push(run(open_storm(false)).await);
                    idle.finish().await.unwrap();
                }
            }
        }
        if build {
            // A + B + B + A (and B + A + A + B the next round): the first build of a series
            // measured up to ~10% slower than the next here, whichever variant it was.
            let mut build_variants = [Host::Bare, Host::Kiln, Host::Kiln, Host::Bare];
            build_variants.rotate_left(round % 2);
            let (mut bare_sum, mut observed_sum) = (Duration::ZERO, Duration::ZERO);
            for variant in build_variants {
                let service = (variant == Host::Kiln)
                    .then(|| ObserverService::start(&ObserverConfig::default()).unwrap());
                let (wall, events) =
                    build_beside_step(make(false), &busy_step, dir.path(), service.as_ref()).await;
                if service.is_some() {
                    observed_sum += wall;
                    busy_step_events = events;
                } else {
                    bare_sum += wall;
                }
            }
            host_build_bare.push(bare_sum / 2);
            host_build_observed.push(observed_sum / 2);
        }
    }
    if build {
        // Each round's bare and observed builds ran back to back: their ratios show the noise.
        let rounds = per_round(observed.as_slice(), bare.as_slice());
        let rounds_cpu = per_round(observed_cpu.as_slice(), bare_cpu.as_slice());
        let (bare_cpu, observed_cpu) = (median(bare_cpu), median(observed_cpu));
        println!(
            "build    CPU time (the build's, BPF included, + the ring consumer's) bare {bare_cpu:.2?}  observed {observed_cpu:.2?} ({:.3}x, per round {}; target <= 1.03)",
            ratio(observed_cpu, bare_cpu),
            rounds_cpu
        );
        let (bare, observed, straced) = (median(bare), median(observed), median(straced));
        let kiln_extra = observed.as_secs_f64() - bare.as_secs_f64();
        let strace_extra = straced.as_secs_f64() - bare.as_secs_f64();
        println!(
            "build    bare {bare:.2?}  observed {observed:.2?} ({:.3}x, per round {}; {build_events} events, 0 lost)  strace -f {straced:.2?} ({:.2}x)",
            ratio(observed, bare),
            rounds,
            ratio(straced, bare)
        );
        println!(
            "build    kiln's extra time / strace's extra time = {:.3} (target <= 0.1)",
            kiln_extra / strace_extra
        );
    }
    // Where the time goes: each observed workload once more with BPF run-time stats on.
    if build {
        profile("build   ", make(true), &cgroup).await;
    }
    profile("storm    open ", open_storm(true), &cgroup).await;
    profile("storm    chdir", chdir_storm(true), &cgroup).await;
    profile("storm    eperm", eperm_storm(true), &cgroup).await;
    open_runs.report("storm    open+close /dev/null, 1 process ");
    chdir_runs.report("storm    chdir(\"/\"), 2 processes        ");
    eperm_runs.report("storm    setuid(0) EPERM, 2 processes    ");
    let host_bare = median(storm_on_host_bare);
    let storm_floor = median(storm_on_floor);
    println!(
        "host     the open storm unobserved, bare {host_bare:.2?}  with only an empty sys_exit program attached (kernel floor) {storm_floor:.2?} ({:.3}x bare)",
        ratio(storm_floor, host_bare)
    );
    let storm_host = median(storm_on_host);
    println!(
        "host     the open storm unobserved while the observer is loaded and a step observed: {storm_host:.2?} ({:.3}x bare, {:.3}x the floor; target <= 1.05)",
        ratio(storm_host, host_bare),
        ratio(storm_host, storm_floor)
    );
    let storm_idle = median(storm_on_idle_node);
    println!(
        "host     the same with the observer loaded and no step observed (idle node): {storm_idle:.2?} ({:.3}x bare)",
        ratio(storm_idle, host_bare)
    );
    if build {
        // The variants of a round ran back to back: their ratio shows the noise.
        let rounds = per_round(host_build_observed.as_slice(), host_build_bare.as_slice());
        let (bare, observed) = (median(host_build_bare), median(host_build_observed));
        println!(
            "host     build (make -j2) unobserved beside a busy step, bare {bare:.2?}  the step observed {observed:.2?} ({:.3}x, per round {}; target <= 1.05; step: {busy_step_events} events)",
            ratio(observed, bare),
            rounds
        );
    }
}

/// Runs `make` on the host (no observed cgroup) while `step` runs [`STEP_WORKLOAD`], observed
/// by `service` if given; returns the build's wall time and the step's event count.
async fn build_beside_step(
    make: Command,
    step: &BenchCgroup,
    dir: &Path,
    service: Option<&std::sync::Arc<ObserverService>>,
) -> (Duration, usize) {
    let observation = service.map(|service| service.attach(step.id).unwrap());
    let mut workload = step
        .command("sh", &["-c", STEP_WORKLOAD], dir, true)
        .spawn()
        .unwrap();
    let wall = run(make).await;
    step.kill_all().await;
    workload.wait().await.unwrap();
    let Some(observation) = observation else {
        return (wall, 0);
    };
    let collected = observation.finish().await.unwrap();
    assert_eq!(collected.lost, 0, "the busy step lost events");
    assert!(
        !collected.events.is_empty(),
        "the busy step was observed but delivered no events"
    );
    (wall, collected.events.len())
}

/// What runs beside a host workload in the host comparisons.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Host {
    /// Nothing loaded.
    Bare,
    /// Only [`Floor`]'s empty sys_exit program attached.
    Floor,
    /// kilnd's observer loaded and a step's cgroup observed.
    Kiln,
}

/// One storm's rounds.
#[derive(Default)]
struct StormRuns {
    bare: Vec<Duration>,
    observed: Vec<Duration>,
    events: usize,
    lost: u64,
}

impl StormRuns {
    fn observe(&mut self, (wall, events, lost): (Duration, usize, u64)) {
        self.observed.push(wall);
        self.events = events;
        self.lost += lost;
    }

    fn report(&self, what: &str) {
        let bare = median(self.bare.clone());
        let observed = median(self.observed.clone());
        println!(
            "{what} bare {bare:.2?}  observed {observed:.2?} ({:.2}x): {} events delivered = {:.0} events/s, {} lost (all rounds)",
            ratio(observed, bare),
            self.events,
            self.events as f64 / observed.as_secs_f64(),
            self.lost
        );
    }
}
