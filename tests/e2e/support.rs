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
