//! The battery's harness: compiles `attacks.c` once, runs attacks as pipeline steps through a real
//! kilnd (one per test, on its own temp state dir, through the real `kiln` CLI), judges the
//! verdict lines of the step log, and checks that the host did not change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_e2e::{
    Kilnd, MountEntry, expect_code, follow, mount_table, mounts_under, pipeline_file, privileged,
    repo, status, stdout, submit,
};

/// The attack program inside the sandbox (the `tools` input workspace).
pub const TOOL: &str = "/workspace/tools/escape";

/// The attack binary, compiled on the host once per test process (into cargo's per-target temp
/// dir, so nothing lands in the host's /tmp).
fn attack_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("escape");
        std::fs::create_dir_all(&dir).unwrap();
        // A private name, then rename: concurrent test processes never see a half-written file.
        let partial = dir.join(format!("escape.{}", std::process::id()));
        let o = Command::new("cc")
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-o"])
            .arg(&partial)
            .arg(repo().join("tests/escape/attacks.c"))
            .output()
            .expect("run cc (the battery compiles tests/escape/attacks.c on the host)");
        assert!(
            o.status.success(),
            "cc tests/escape/attacks.c failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let binary = dir.join("escape");
        std::fs::rename(&partial, &binary).unwrap();
        binary
    })
}

/// A number unique among concurrently running attacks (pid of the test process, then a counter):
/// it is in every attack process's command line, so a survivor on the host is found by it.
/// Digits only (it also becomes a `sleep` argument).
fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:07}{n:05}", std::process::id())
}

/// One test's battery: its own kilnd, the attack binary as an uploadable workspace, a nonce, and
/// the host state before the attack.
#[derive(Debug)]
pub struct Battery {
    /// Test name (shown in every failure).
    pub test: &'static str,
    /// The daemon.
    pub kilnd: Kilnd,
    /// Marker in every attack process's command line.
    pub nonce: String,
    /// Directory of the pipeline files; `tools/` beside them is uploaded.
    dir: PathBuf,
    /// Host state right after kilnd started.
    before: HostState,
    /// kilnd's own mount table right after it started.
    kilnd_before: BTreeSet<MountEntry>,
}

impl Battery {
    /// Starts kilnd for `test`; `None` (after a printed reason) when the test must skip.
    pub fn start(test: &'static str) -> Option<Self> {
        if !privileged(test) {
            return None;
        }
        let binary = attack_binary();
        let kilnd = Kilnd::start("[jobs]\nmax_concurrent = 4\n");
        let dir = kilnd.dir.path().join("battery");
        std::fs::create_dir_all(dir.join("tools")).unwrap();
        let tool = dir.join("tools/escape");
        std::fs::copy(binary, &tool).unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let before = HostState::capture();
        let kilnd_before = kilnd_mounts(&kilnd);
        Some(Self {
            test,
            kilnd,
            nonce: nonce(),
            dir,
            before,
            kilnd_before,
        })
    }

    /// kilnd's pid on the host.
    pub fn kilnd_pid(&self) -> u32 {
        self.kilnd.pid()
    }

    /// A file in this battery's temp dir (removed with it).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.kilnd.dir.path().join(name)
    }

    /// Host directory of the on-disk workspace `ws` of job `job` (inputs; outputs of finished
    /// steps). A running step's output workspace is on a tmpfs in kilnd's mount namespace:
    /// [`Battery::wait_for_output`].
    pub fn workspace_dir(&self, job: &str, ws: &str) -> PathBuf {
        self.kilnd
            .state()
            .join("work")
            .join(job)
            .join("ws")
            .join(ws)
    }

    /// Waits until running step `step` of `job` has `file` in its output workspace `ws`; returns
    /// the workspace as the host reaches it (through kilnd's mount namespace, where it really is).
    pub fn wait_for_output(&self, job: &str, step: &str, ws: &str, file: &str) -> PathBuf {
        self.kilnd.wait_for_output(job, step, ws, file)
    }

    /// Submits `job`; returns its id.
    pub fn submit(&self, job: &Job) -> String {
        let file = pipeline_file(&self.dir, &format!("{}.toml", job.name), &job.pipeline());
        let mut params = vec![format!("nonce={}", self.nonce)];
        params.extend(
            job.args
                .iter()
                .enumerate()
                .map(|(i, a)| format!("a{i}={a}")),
        );
        let mut extra = Vec::new();
        for p in &params {
            extra.push("--param");
            extra.push(p.as_str());
        }
        submit(&self.kilnd, &file, &extra)
    }

    /// Follows job `id` to its end, collects status and logs, and checks the host: no process
    /// of the attack left, mounts, hostname unchanged, kilnd alive.
    pub fn finish(&self, id: &str) -> JobRun {
        let followed = follow(&self.kilnd, id);
        let status = status(&self.kilnd, id);
        let mut logs = BTreeMap::new();
        for step in status["steps"].as_array().unwrap() {
            let name = step["name"].as_str().unwrap().to_owned();
            let o = self.kilnd.kiln(&["logs", id, &name]);
            logs.insert(name, stdout(&o));
        }
        let run = JobRun {
            test: self.test,
            id: id.to_owned(),
            status,
            logs,
        };
        // Every verdict line, visible with `--nocapture` (libtest shows it anyway on failure).
        eprintln!("{}: {}", self.test, run.describe());
        assert!(
            matches!(followed.status.code(), Some(0 | 1)),
            "{}: `kiln follow` failed: {}\n{}",
            self.test,
            String::from_utf8_lossy(&followed.stderr),
            run.describe()
        );
        self.assert_host_unchanged(&run);
        run
    }

    /// Submit and finish.
    pub fn run(&self, job: &Job) -> JobRun {
        let id = self.submit(job);
        self.finish(&id)
    }

    /// The checks every attack gets once its job has ended.
    fn assert_host_unchanged(&self, run: &JobRun) {
        let survivors = host_processes_with(&self.nonce);
        assert!(
            survivors.is_empty(),
            "{}: processes of the attack survived the step on the host: {survivors:#?}\n{}",
            self.test,
            run.describe()
        );
        let after = HostState::capture();
        let appeared: Vec<_> = after.mounts.difference(&self.before.mounts).collect();
        let vanished: Vec<_> = self.before.mounts.difference(&after.mounts).collect();
        assert!(
            appeared.is_empty() && vanished.is_empty(),
            "{}: the host mount table changed: new {appeared:#?}, gone {vanished:#?}\n{}",
            self.test,
            run.describe()
        );
        // Named on its own because it is the first thing a leak would show: kilnd mounts (output
        // workspace tmpfs) only in its own namespace, the host never has one under its state.
        let host_leaks = mounts_under(&mount_table(None), self.kilnd.dir.path());
        assert!(
            host_leaks.is_empty(),
            "{}: mounts under kilnd's directory are visible in the host mount namespace: {host_leaks:#?}\n{}",
            self.test,
            run.describe()
        );
        // In kilnd's namespace, where a step's mounts would land if they propagated: nothing of
        // the finished job (its output tmpfs unmounted, no sandbox mount left), and nothing else
        // new but the output tmpfs of other jobs still running.
        let state = self.kilnd.state();
        let job_dir = state.join("work").join(&run.id);
        let kilnd_table = mount_table(Some(self.kilnd_pid()));
        let left: Vec<MountEntry> = mounts_under(&kilnd_table, &job_dir)
            .into_iter()
            .chain(mounts_under(&kilnd_table, &state.join("run")))
            .collect();
        assert!(
            left.is_empty(),
            "{}: mounts of job {} outlived it in kilnd's mount namespace: {left:#?}\n{}",
            self.test,
            run.id,
            run.describe()
        );
        let kilnd_after = kilnd_mounts(&self.kilnd);
        let work = state.join("work");
        let appeared: Vec<_> = kilnd_after
            .difference(&self.kilnd_before)
            .filter(|m| !m.point.starts_with(&work))
            .collect();
        let vanished: Vec<_> = self.kilnd_before.difference(&kilnd_after).collect();
        assert!(
            appeared.is_empty() && vanished.is_empty(),
            "{}: kilnd's mount table changed: new {appeared:#?}, gone {vanished:#?}\n{}",
            self.test,
            run.describe()
        );
        assert_eq!(
            after.hostname,
            self.before.hostname,
            "{}: the host name changed\n{}",
            self.test,
            run.describe()
        );
        assert!(
            process_alive(self.kilnd_pid()),
            "{}: kilnd died\n{}",
            self.test,
            self.kilnd.log()
        );
    }
}

/// A pipeline job of the battery: the `tools` workspace (the attack binary) plus `workspaces`,
/// the steps in order, and the attack arguments (passed as parameters `a0`, `a1`, …).
#[derive(Debug, Clone)]
pub struct Job {
    /// Pipeline name.
    pub name: String,
    /// Attack arguments, as parameters.
    pub args: Vec<String>,
    /// Workspaces besides `tools`.
    pub workspaces: Vec<String>,
    /// Steps, in file order.
    pub steps: Vec<Step>,
}

impl Job {
    /// A job with one step, `attack`, running `escape ATTACK NONCE ARGS...` with the `tools`
    /// workspace as input and a fresh `out` workspace as output.
    pub fn attack(attack: &str, args: &[&str]) -> Self {
        Self {
            name: format!("escape-{attack}"),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            workspaces: vec!["out".into()],
            steps: vec![Step::attack(attack, args.len())],
        }
    }

    /// Adds a step before the others.
    pub fn before(mut self, step: Step) -> Self {
        self.add_workspace(&step);
        self.steps.insert(0, step);
        self
    }

    /// Adds a step after the others.
    pub fn then(mut self, step: Step) -> Self {
        self.add_workspace(&step);
        self.steps.push(step);
        self
    }

    /// Changes the attack step (the one named `attack`).
    pub fn attack_step(mut self, change: impl FnOnce(&mut Step)) -> Self {
        let step = self.steps.iter_mut().find(|s| s.name == "attack").unwrap();
        change(step);
        let step = step.clone();
        self.add_workspace(&step);
        self
    }

    fn add_workspace(&mut self, step: &Step) {
        for ws in step.inputs.iter().chain(step.output.iter()) {
            if ws != "tools" && !self.workspaces.contains(ws) {
                self.workspaces.push(ws.clone());
            }
        }
    }

    /// The pipeline TOML.
    fn pipeline(&self) -> String {
        let mut t = format!("version = 1\nname = {}\n", toml_string(&self.name));
        t.push_str("[params.nonce]\ntype = \"string\"\nmax_length = 64\n");
        for i in 0..self.args.len() {
            writeln!(t, "[params.a{i}]\ntype = \"string\"\nmax_length = 4096").unwrap();
        }
        t.push_str("[workspaces.tools]\nsource = \"tools\"\n");
        for ws in &self.workspaces {
            writeln!(t, "[workspaces.{ws}]").unwrap();
        }
        for step in &self.steps {
            step.write_toml(&mut t, self.args.len());
        }
        t
    }
}

/// One step of a battery job.
#[derive(Debug, Clone)]
pub struct Step {
    /// Step name.
    pub name: String,
    /// Step kind.
    pub kind: &'static str,
    /// Input workspaces.
    pub inputs: Vec<String>,
    /// Output workspace.
    pub output: Option<String>,
    /// What it runs.
    pub command: StepCommand,
    /// Step timeout.
    pub timeout: &'static str,
}

/// What a step runs.
#[derive(Debug, Clone)]
pub enum StepCommand {
    /// `escape ATTACK NONCE a0 a1 …` (the number of arguments).
    Attack(String, usize),
    /// A shell script; `NONCE` and `A0`, `A1`, … are in its environment.
    Script(String),
}

impl Step {
    /// The attack step: `escape ATTACK NONCE ARGS…`, inputs `tools`, output `out`.
    pub fn attack(attack: &str, nargs: usize) -> Self {
        Self {
            name: "attack".into(),
            kind: "build",
            inputs: vec!["tools".into()],
            output: Some("out".into()),
            command: StepCommand::Attack(attack.to_owned(), nargs),
            timeout: "60s",
        }
    }

    /// A shell step (`/bin/sh -eu -c`).
    pub fn script(name: &str, inputs: &[&str], output: Option<&str>, script: &str) -> Self {
        Self {
            name: name.into(),
            kind: if output.is_some() { "build" } else { "test" },
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: output.map(str::to_owned),
            command: StepCommand::Script(script.to_owned()),
            timeout: "60s",
        }
    }

    fn write_toml(&self, t: &mut String, nargs: usize) {
        writeln!(t, "[[steps]]\nname = {}", toml_string(&self.name)).unwrap();
        writeln!(t, "kind = {}", toml_string(self.kind)).unwrap();
        let inputs: Vec<String> = self.inputs.iter().map(|s| toml_string(s)).collect();
        writeln!(t, "inputs = [{}]", inputs.join(", ")).unwrap();
        if let Some(out) = &self.output {
            writeln!(t, "output = {}", toml_string(out)).unwrap();
        }
        writeln!(t, "timeout = {}", toml_string(self.timeout)).unwrap();
        match &self.command {
            StepCommand::Attack(attack, n) => {
                let mut argv = vec![
                    toml_string(TOOL),
                    toml_string(attack),
                    toml_string("${params.nonce}"),
                ];
                argv.extend((0..*n).map(|i| toml_string(&format!("${{params.a{i}}}"))));
                writeln!(t, "run = [{}]", argv.join(", ")).unwrap();
            }
            StepCommand::Script(script) => {
                writeln!(t, "script = {}", toml_string(script)).unwrap();
                let mut env = vec![format!("NONCE = {}", toml_string("${params.nonce}"))];
                env.extend(
                    (0..nargs)
                        .map(|i| format!("A{i} = {}", toml_string(&format!("${{params.a{i}}}")))),
                );
                writeln!(t, "env = {{ {} }}", env.join(", ")).unwrap();
            }
        }
    }
}

/// A TOML basic string: JSON's string escapes are a subset of TOML's.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A finished battery job.
#[derive(Debug)]
pub struct JobRun {
    /// Test name.
    pub test: &'static str,
    /// Job id.
    pub id: String,
    /// `kiln status --json`.
    pub status: serde_json::Value,
    /// Step logs by step name.
    pub logs: BTreeMap<String, String>,
}

impl JobRun {
    /// Status of step `name`.
    pub fn step(&self, name: &str) -> &serde_json::Value {
        self.status["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{}: no step {name}: {}", self.test, self.status))
    }

    /// Log of step `name`.
    pub fn log(&self, name: &str) -> &str {
        self.logs.get(name).map_or("", String::as_str)
    }

    /// Lines of step `name`'s log starting with `verdict` (`"ESCAPED:"`, `"BLOCKED:"`, …).
    pub fn lines(&self, name: &str, verdict: &str) -> Vec<&str> {
        self.log(name)
            .lines()
            .filter(|l| l.starts_with(verdict))
            .collect()
    }

    /// Output files of step `name`: path → digest.
    pub fn outputs(&self, name: &str) -> BTreeMap<String, String> {
        self.step(name)["outputs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|o| {
                        (
                            o["path"].as_str().unwrap().to_owned(),
                            o["digest"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything about the job, for failure messages.
    pub fn describe(&self) -> String {
        let mut s = format!("job {}:\n", self.id);
        for step in self.status["steps"].as_array().into_iter().flatten() {
            let name = step["name"].as_str().unwrap_or("?");
            writeln!(s, "--- step {name}: {step}").unwrap();
            for line in self.log(name).lines() {
                writeln!(s, "    {line}").unwrap();
            }
        }
        s
    }

    /// The battery's verdict for step `name` (see the top of main.rs): the step succeeded with
    /// exit 0, its log has at least one `BLOCKED:` line and no `ESCAPED:` or `ERROR:` line.
    pub fn assert_blocked(&self, name: &str) {
        let escaped = self.lines(name, "ESCAPED:");
        let errors = self.lines(name, "ERROR:");
        assert!(
            escaped.is_empty(),
            "{}: NOT BLOCKED ({} attempt(s) escaped):\n  {}\n{}",
            self.test,
            escaped.len(),
            escaped.join("\n  "),
            self.describe()
        );
        assert!(
            errors.is_empty(),
            "{}: the attack could not run:\n  {}\n{}",
            self.test,
            errors.join("\n  "),
            self.describe()
        );
        let step = self.step(name);
        assert!(
            step["state"] == "succeeded"
                && step["exit_code"] == 0
                && !self.lines(name, "BLOCKED:").is_empty(),
            "{}: the attack step did not report its blocks (state {}, exit {}):\n{}",
            self.test,
            step["state"],
            step["exit_code"],
            self.describe()
        );
    }

    /// Step `name` succeeded (a setup or witness step).
    pub fn assert_succeeded(&self, name: &str) {
        assert_eq!(
            self.step(name)["state"],
            "succeeded",
            "{}: step {name} failed:\n{}",
            self.test,
            self.describe()
        );
    }
}

/// Kernel interfaces under /sys (tracefs, bpffs, cgroup hierarchies): kilnd mounts what it needs
/// of them in its own namespace, but other tools on the host (the observer's own test suite, a
/// bpftool run) may mount one in the host's at any time. A step cannot mount anything, and
/// everything else must stay exactly as it was.
const KERNEL_FS: [&str; 6] = [
    "tracefs",
    "debugfs",
    "securityfs",
    "bpf",
    "cgroup",
    "cgroup2",
];

/// Every mount of `table` but kernel interfaces under /sys.
fn comparable(table: Vec<MountEntry>) -> BTreeSet<MountEntry> {
    table
        .into_iter()
        .filter(|m| !(m.point.starts_with("/sys") && KERNEL_FS.contains(&m.fstype.as_str())))
        .collect()
}

/// kilnd's own mount table (its namespace; the host's if it ran with `private_mounts = false`).
fn kilnd_mounts(kilnd: &Kilnd) -> BTreeSet<MountEntry> {
    comparable(mount_table(Some(kilnd.pid())))
}

/// What the battery compares on the host before and after an attack.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostState {
    /// Every mount of the host's mount namespace (this process's).
    mounts: BTreeSet<MountEntry>,
    /// The host's name.
    hostname: String,
}

impl HostState {
    fn capture() -> Self {
        Self {
            mounts: comparable(mount_table(None)),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
                .to_owned(),
        }
    }
}

/// `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

pub use kiln_e2e::host_processes_with;

/// A `sleep` on the host running as uid/gid 65534 — the step's own ids, so only the sandbox's
/// namespaces stand between the step and it — in its own process group. Killed on drop.
#[derive(Debug)]
pub struct HostVictim {
    child: Child,
}

impl HostVictim {
    /// Starts the victim.
    pub fn start() -> Self {
        let child = Command::new("sleep")
            .arg("600")
            .uid(65534)
            .gid(65534)
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Self { child }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `/proc/PID/status` field of the victim.
    pub fn status_field(&self, field: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        })
    }

    /// Still running (not exited, not a zombie, not stopped by a tracer).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
            && self
                .status_field("State")
                .is_some_and(|s| s.starts_with('S') || s.starts_with('R'))
    }
}

impl Drop for HostVictim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's first global IPv4 address (where a service bound to 0.0.0.0 is reachable).
pub fn host_external_ipv4() -> String {
    let o = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    expect_code(&o, 0, "ip addr");
    let text = stdout(&o);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map_or_else(
            || panic!("the host has no global IPv4 address: {text}"),
            str::to_owned,
        )
}

/// The host's DNS resolver (first IPv4 `nameserver`), or a public one.
pub fn host_resolver() -> String {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(str::trim)
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .unwrap_or("8.8.8.8")
        .to_owned()
}

/// The value of the first `key = value` line of the hermetic profile whose key contains
/// `key_part` (any table), unquoted; `None` while the profile has no such limit.
pub fn profile_value(key_part: &str) -> Option<String> {
    let text = std::fs::read_to_string(repo().join("profiles/hermetic.toml")).unwrap();
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let (key, value) = line.split_once('=')?;
        key.trim()
            .contains(key_part)
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// Parses a size such as `256MiB`, `2 GiB`, `2G` or a byte count, in MiB.
pub fn size_mib(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => return Some(number >> 20),
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    Some((number << shift) >> 20)
}
