//! Harness for the end-to-end tests: a real kilnd on a temporary state dir, the real CLI.
//!
//! Privileged tests need root. Outside CI they skip with a printed reason; with `CI=true` a
//! missing privilege is a failure (the suite must never silently skip there).

#![expect(
    clippy::missing_panics_doc,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A copy of the repository's profiles (`*.toml`) in `dir/profiles`, each file's text passed
/// through `edit(path, text)` on the way; returns the directory.
pub fn edited_profiles(dir: &Path, edit: impl Fn(&Path, String) -> String) -> PathBuf {
    let out = dir.join("profiles");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(repo().join("profiles")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = edit(&path, std::fs::read_to_string(&path).unwrap());
            std::fs::write(out.join(path.file_name().unwrap()), text).unwrap();
        }
    }
    out
}

/// A workspace binary (built by `cargo build --workspace --bins`, which `make test` runs first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --workspace --bins` (make test does)",
        p.display()
    );
    p
}

/// True if the test may run privileged; false (after printing why) if it must skip.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs root, and CI=true forbids skipping"
    );
    eprintln!("SKIP {test}: needs root (kilnd creates namespaces)");
    false
}

/// A running kilnd with its own state dir and socket.
#[derive(Debug)]
pub struct Kilnd {
    /// Temp dir holding state/, the socket and the config.
    pub dir: tempfile::TempDir,
    /// Daemon process.
    pub child: Option<Child>,
    /// Socket path.
    pub socket: PathBuf,
    /// Config file.
    pub config: PathBuf,
}

impl Kilnd {
    /// Start kilnd with extra config TOML appended (sections after the top-level keys).
    pub fn start(extra_config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-")
            .tempdir()
            .unwrap();
        // World-traversable so unprivileged peers can reach the socket in authorization tests.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let socket = dir.path().join("kilnd.sock");
        let config = dir.path().join("kilnd.toml");
        let q = |p: &Path| format!("\"{}\"", p.display());
        let text = format!(
            "state_dir = {}\nprofiles_dir = {}\nsandbox_helper = {}\n{extra_config}\n",
            q(&dir.path().join("state")),
            q(&repo().join("profiles")),
            q(&bin("kiln-sandbox")),
        );
        let text = if text.contains("[api]") {
            text.replacen("[api]", &format!("[api]\nsocket = {}", q(&socket)), 1)
        } else {
            format!("{text}\n[api]\nsocket = {}\n", q(&socket))
        };
        std::fs::write(&config, text).unwrap();
        let mut k = Self {
            dir,
            child: None,
            socket,
            config,
        };
        k.spawn();
        k
    }

    /// (Re)start the daemon process on the same state.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kilnd.log"))
            .unwrap();
        let child = Command::new(bin("kilnd"))
            .arg("--config")
            .arg(&self.config)
            .args(self.software_key_flag())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kilnd exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kilnd did not listen within 20 s:\n{}", self.log());
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kilnd.log")).unwrap_or_default()
    }

    /// State directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("kilnd not running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kilnd did not stop within 30 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run the CLI against this daemon.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_cmd(args).output().unwrap()
    }

    /// A CLI command against this daemon (to adjust before running).
    pub fn kiln_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("kiln"));
        c.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .current_dir(repo());
        c
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert an exit code, showing both streams on failure.
pub fn expect_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// Write a pipeline file (and optional source dir) in a temp dir; returns its path.
pub fn pipeline_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Submit with `--json`, returning the job id.
pub fn submit(k: &Kilnd, file: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--json", "submit", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = k.kiln(&args);
    expect_code(&o, 0, "submit");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// Follow a job until it ends; returns the CLI output (exit 0 = succeeded).
pub fn follow(k: &Kilnd, job: &str) -> Output {
    k.kiln(&["follow", job])
}

/// Job status JSON.
pub fn status(k: &Kilnd, job: &str) -> serde_json::Value {
    let o = k.kiln(&["--json", "status", job]);
    serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("status json: {e}\n{}\n{}", stdout(&o), stderr(&o)))
}

// ---------------------------------------------------------------------------------------------
// TPM-backed daemons (swtpm)

impl Kilnd {
    /// `--insecure-software-key` unless the config has a `[tpm]` section: daemons started by
    /// [`Kilnd::start`] sign with a software key, those of [`Kilnd::start_with_tpm`] with the TPM.
    fn software_key_flag(&self) -> Vec<&'static str> {
        let text = std::fs::read_to_string(&self.config).unwrap_or_default();
        if text.lines().any(|l| l.trim() == "[tpm]") {
            Vec::new()
        } else {
            vec!["--insecure-software-key"]
        }
    }

    /// Start kilnd with its TPM on `swtpm` (plus extra config TOML).
    pub fn start_with_tpm(swtpm: &Swtpm, extra_config: &str) -> Self {
        Self::start(&format!(
            "[tpm]\ntcti = \"{}\"\nek_ca_bundle = \"{}\"\n{extra_config}",
            swtpm.tcti,
            swtpm.ca_bundle.display()
        ))
    }
}

/// True if swtpm can be used; prints why not (or fails under CI) otherwise.
pub fn have_swtpm(test: &str) -> bool {
    let ok = ["swtpm", "swtpm_setup"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    if ok {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs swtpm and swtpm_setup (apt-get install swtpm swtpm-tools); CI=true forbids skipping"
    );
    eprintln!("SKIP {test}: needs swtpm and swtpm_setup");
    false
}

/// A private swtpm (fresh state dir, free ports) started by `scripts/swtpm`, stopped on drop.
#[derive(Debug)]
pub struct Swtpm {
    /// State dir.
    pub dir: tempfile::TempDir,
    /// TCTI for kilnd.
    pub tcti: String,
    /// EK CA bundle (PEM).
    pub ca_bundle: PathBuf,
}

impl Swtpm {
    /// Start one (retrying when another test grabs the probed ports first).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-swtpm-")
            .tempdir()
            .unwrap();
        for _ in 0..5 {
            let port = free_port_pair();
            let out = Command::new(repo().join("scripts/swtpm"))
                .args(["start", "--dir"])
                .arg(dir.path())
                .args(["--port", &port.to_string()])
                .output()
                .unwrap();
            if out.status.success() {
                let text = String::from_utf8(out.stdout).unwrap();
                let value = |key: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(key))
                        .unwrap()
                        .to_owned()
                };
                return Self {
                    tcti: value("KILN_TPM_TCTI="),
                    ca_bundle: PathBuf::from(value("KILN_TPM_EK_CA=")),
                    dir,
                };
            }
            eprintln!(
                "swtpm start on port {port} failed, retrying: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("cannot start swtpm");
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/swtpm"))
            .args(["stop", "--dir"])
            .arg(self.dir.path())
            .status();
    }
}

/// A port P with P and P+1 free on 127.0.0.1 (swtpm's command and control ports).
pub fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < 65534 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of tcp ports on 127.0.0.1");
}

// ---------------------------------------------------------------------------------------------
// Admission (signed definitions, policies, secrets)

/// `kiln pipeline keygen --out DIR/NAME`; returns (private key, public key, keyid).
pub fn pipeline_keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let o = Command::new(bin("kiln"))
        .args(["--json", "pipeline", "keygen", "--out"])
        .arg(dir.join(name))
        .output()
        .unwrap();
    expect_code(&o, 0, "pipeline keygen");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.pub")),
        v["keyid"].as_str().unwrap().to_owned(),
    )
}

/// `kiln pipeline sign FILE --key KEY` (writes FILE.dsse).
pub fn pipeline_sign(file: &Path, key: &Path) {
    let o = Command::new(bin("kiln"))
        .args(["pipeline", "sign"])
        .arg(file)
        .arg("--key")
        .arg(key)
        .output()
        .unwrap();
    expect_code(&o, 0, "pipeline sign");
}

/// A root-only secret directory `DIR/secrets` (0700) holding one 0600 file per secret.
pub fn secret_dir(dir: &Path, secrets: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("secrets");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (name, value) in secrets {
        let file = path.join(name);
        std::fs::write(&file, value).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

/// The `[admission]` section naming a policy file and/or a secret directory.
pub fn admission_config(policy: Option<&Path>, secrets_dir: Option<&Path>) -> String {
    use std::fmt::Write as _;
    let mut text = String::from("[admission]\n");
    if let Some(p) = policy {
        let _ = writeln!(text, "policy = \"{}\"", p.display());
    }
    if let Some(s) = secrets_dir {
        let _ = writeln!(text, "secrets_dir = \"{}\"", s.display());
    }
    text
}

/// Every regular file under `root` whose bytes contain `needle` (a recursive grep).
pub fn files_containing(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file()
                && let Ok(bytes) = std::fs::read(entry.path())
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Poll a job's status until step `step` is in `state` (at most `within`).
pub fn wait_for_step_state(k: &Kilnd, job: &str, step: &str, state: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let st = status(k, job);
        if st["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == step && s["state"] == state)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("step {step} never reached {state}: {}", status(k, job));
}

/// Host processes whose command line contains `marker` (a scan of `/proc`).
pub fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Mount namespaces: kilnd runs in its own ([daemon] private_mounts), so what it mounts — a
// step's size-capped output workspace above all — is only visible through its /proc entries.

/// One line of a `mountinfo` file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MountEntry {
    /// Mount point (octal escapes decoded).
    pub point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
}

/// The mount table of `/proc/<pid>/mountinfo` (`pid` `None`: this process, i.e. the host's
/// mount namespace for the test suites).
pub fn mount_table(pid: Option<u32>) -> Vec<MountEntry> {
    use std::os::unix::ffi::OsStringExt;
    let path = pid.map_or_else(
        || PathBuf::from("/proc/self/mountinfo"),
        |pid| PathBuf::from(format!("/proc/{pid}/mountinfo")),
    );
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let unescape = |field: &str| {
        let bytes = field.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let octal = bytes
                .get(i + 1..i + 4)
                .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
            match (bytes[i], octal) {
                (b'\\', Some(byte)) => {
                    out.push(byte);
                    i += 4;
                }
                (byte, _) => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        std::ffi::OsString::from_vec(out)
    };
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: (*fields.get(sep + 1)?).to_owned(),
                source: unescape(fields.get(sep + 2)?)
                    .to_string_lossy()
                    .into_owned(),
            })
        })
        .collect()
}

/// The mounts of `table` at or below `dir`.
pub fn mounts_under(table: &[MountEntry], dir: &Path) -> Vec<MountEntry> {
    table
        .iter()
        .filter(|m| m.point.starts_with(dir))
        .cloned()
        .collect()
}

impl Kilnd {
    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("kilnd not running").id()
    }

    /// `path` as kilnd sees it: resolved from its root in its own mount namespace
    /// (`/proc/<pid>/root/<path>`). What kilnd mounted itself is only reachable this way.
    pub fn in_kilnd_ns(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid()))
            .join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Where the output workspace `ws` of step `step` of job `job` really is while the step runs,
    /// seen from the host through kilnd's mount namespace: the step's size-capped tmpfs
    /// (`work/<job>/outfs/<step>/ws`, see daemon/src/sandbox/outputfs.rs) if kilnd mounted one,
    /// else the on-disk workspace `work/<job>/ws/<ws>`. Before the step starts this may still
    /// name the on-disk directory: poll with [`Kilnd::wait_for_output`].
    pub fn live_output_dir(&self, job: &str, step: &str, ws: &str) -> PathBuf {
        let job_dir = self.state().join("work").join(job);
        let capped = job_dir.join("outfs").join(step);
        if mount_table(Some(self.pid()))
            .iter()
            .any(|m| m.point == capped)
        {
            self.in_kilnd_ns(&capped.join("ws"))
        } else {
            self.in_kilnd_ns(&job_dir.join("ws").join(ws))
        }
    }

    /// Waits (up to 30 s) until the running step `step` of `job` has `file` in its output
    /// workspace `ws`; returns that workspace's directory as [`Kilnd::live_output_dir`] names it.
    pub fn wait_for_output(&self, job: &str, step: &str, ws: &str, file: &str) -> PathBuf {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let dir = self.live_output_dir(job, step, ws);
            if dir.join(file).exists() {
                return dir;
            }
            assert!(
                Instant::now() < deadline,
                "{file} did not appear in the output workspace {ws} of step {step} (job {job}) within 30 s; last looked in {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
