//! Wire types between kilnd and the `kiln-sandbox` helper: what to run ([`SandboxSpec`], JSON on the
//! helper's stdin) and how it ended ([`SandboxOutcome`], one JSON line on its stdout).
//!
//! [`SandboxSpec::validate`] is the helper's first line of defence: every path and name that ends up in
//! a mount or `execve` is checked here, before any privileged call.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cgroup::{CgroupPathError, CgroupPaths, LimitHit};
use super::confine::{Confinement, LandlockEnforcement};
use super::teardown::TeardownReport;

/// Mount points the sandbox creates itself; host paths may neither cover nor sit inside them.
pub const RESERVED_PATHS: [&str; 5] = ["/dev", "/proc", "/tmp", "/workspace", SECRETS_MOUNT];
/// Where a step's secrets are mounted: a read-only tmpfs with one file per secret.
pub const SECRETS_MOUNT: &str = "/run/secrets";
/// Longest secret name (a file name under [`SECRETS_MOUNT`]).
pub const MAX_SECRET_NAME: usize = 64;
/// Largest total size of a step's secrets.
pub const MAX_SECRETS_BYTES: usize = 1 << 20;

/// One step to run in a fresh sandbox. Env values may be secrets: this type's `Debug` hides them and
/// the helper reads it from a pipe, never from disk.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Program and arguments; `argv[0]` without a `/` is looked up in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// The step's complete environment (nothing is inherited from kilnd or the helper).
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox (absolute).
    pub cwd: PathBuf,
    /// Hostname in the step's UTS namespace.
    pub hostname: String,
    /// An existing empty host directory; the helper mounts the sandbox's tmpfs root on it inside its
    /// own mount namespace, so one directory can serve concurrent sandboxes.
    pub root_dir: PathBuf,
    /// Host paths made visible read-only at the same place (symlinks are recreated, not followed).
    pub host_paths: Vec<PathBuf>,
    /// A materialized image (`<state>/images/<hex>/root`): its top-level entries are bound
    /// read-only at `/<name>` (symlinks recreated) instead of `host_paths`, which must then be
    /// empty. Entries that are the sandbox's own mount points (`/dev`, `/proc`, `/tmp`,
    /// `/workspace`, `/run`) are not bound.
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// Workspaces, mounted at `/workspace/<name>`.
    pub workspaces: Vec<WorkspaceMount>,
    /// Wall-clock limit for setup + step, in milliseconds.
    pub timeout_ms: u64,
    /// User the step runs as (never 0).
    pub uid: u32,
    /// Group the step runs as (never 0); supplementary groups are cleared.
    pub gid: u32,
    /// Size limit of the private `/tmp` (and `/dev/shm`) tmpfs, in bytes.
    pub tmp_size_bytes: u64,
    /// The step's cgroups (created by kilnd with the profile's limits): the helper joins them
    /// before it unshares or forks, kilnd kills and removes them after the step.
    #[serde(default)]
    pub cgroups: Option<CgroupPaths>,
    /// seccomp filter, rlimits and Landlock ruleset, from the profile (required: a spec never
    /// runs unconfined).
    pub confinement: Confinement,
    /// Secrets as (name, value): written into a small tmpfs mounted read-only at
    /// [`SECRETS_MOUNT`]`/<name>` (readable by the step's user only). Values exist only in memory
    /// and on that tmpfs, which is gone with the sandbox's mount namespace; never in `Debug`.
    #[serde(default)]
    pub secrets: Vec<(String, String)>,
}

impl fmt::Debug for SandboxSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Env values may be secrets: show the names only.
        let env_names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("SandboxSpec")
            .field("argv", &self.argv)
            .field("env_names", &env_names)
            .field("cwd", &self.cwd)
            .field("hostname", &self.hostname)
            .field("root_dir", &self.root_dir)
            .field("host_paths", &self.host_paths)
            .field("image_root", &self.image_root)
            .field("workspaces", &self.workspaces)
            .field("timeout_ms", &self.timeout_ms)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("tmp_size_bytes", &self.tmp_size_bytes)
            .field("cgroups", &self.cgroups)
            .field("confinement", &self.confinement)
            .field(
                "secret_names",
                &self
                    .secrets
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A host directory bound into the sandbox at `/workspace/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceMount {
    /// Directory name under `/workspace` (`[A-Za-z0-9._-]`, not `.` or `..`).
    pub name: String,
    /// Host directory to bind.
    pub host_path: PathBuf,
    /// Whether the step may write to it.
    pub access: Access,
}

/// Access of a step to a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Inputs: mounted read-only.
    ReadOnly,
    /// The step's own outputs.
    ReadWrite,
}

/// How a sandboxed step ended, with resource usage of the step's process tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxOutcome {
    /// How it ended.
    pub end: StepEnd,
    /// Wall-clock time of the step (setup included when the step never started).
    pub wall_ms: u64,
    /// User CPU time of the reaped process tree.
    pub user_ms: u64,
    /// System CPU time of the reaped process tree.
    pub sys_ms: u64,
    /// Largest resident set of any process in the tree, in KiB.
    pub max_rss_kib: u64,
    /// Limits the kernel enforced on the step (OOM kills, refused forks); filled in by kilnd from
    /// the step's cgroups after the helper exited. A step that hit one failed because of it.
    #[serde(default)]
    pub limits_hit: Vec<LimitHit>,
    /// kilnd's check that nothing of the step survived (`None` from the helper; kilnd fills it in).
    #[serde(default)]
    pub teardown: Option<TeardownReport>,
    /// Whether the step's Landlock ruleset was fully enforced, as reported by the step process
    /// (`None` if the step never got that far, or its report was lost to a timeout).
    #[serde(default)]
    pub landlock: Option<LandlockEnforcement>,
}

impl SandboxOutcome {
    /// An outcome with no resource usage: the step never ran, or was killed before it could be
    /// reaped (setup failures, cancellation); kilnd fills in limits and teardown later.
    pub fn without_usage(end: StepEnd, wall_ms: u64) -> Self {
        Self {
            end,
            wall_ms,
            user_ms: 0,
            sys_ms: 0,
            max_rss_kib: 0,
            limits_hit: Vec::new(),
            teardown: None,
            landlock: None,
        }
    }
}

/// The end of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepEnd {
    /// The step's process exited with this code.
    Exited {
        /// Exit code (0–255).
        code: i32,
    },
    /// The step's process was killed by this signal.
    Signaled {
        /// Signal number.
        signal: i32,
    },
    /// The spec's timeout elapsed; the whole sandbox was killed.
    TimedOut,
    /// kilnd cancelled the step; the whole sandbox was killed.
    Cancelled,
    /// The step's program could not be executed (e.g. "command not found: cc").
    ExecFailed {
        /// What went wrong, for the step log.
        error: String,
    },
    /// The sandbox could not be built; the step never ran.
    SetupFailed {
        /// Which stage failed (`spec`, `unshare`, `rootfs`, `privileges`, …).
        stage: String,
        /// What went wrong.
        error: String,
    },
}

/// A [`SandboxSpec`] that must not be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// `argv` is empty.
    #[error("argv must not be empty")]
    EmptyArgv,
    /// A string passed to the kernel contains a NUL byte.
    #[error("{field} contains a NUL byte: {value:?}")]
    NulByte {
        /// Which field.
        field: &'static str,
        /// The offending value (env values are not shown).
        value: String,
    },
    /// An env variable name is empty or contains `=`.
    #[error("invalid env variable name {name:?}: must be non-empty without '='")]
    EnvName {
        /// The name.
        name: String,
    },
    /// A path must be absolute and normal (no `.`/`..`).
    #[error("{field} must be an absolute path without '.' or '..' components, got {path:?}")]
    NotAbsoluteNormal {
        /// Which field.
        field: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The hostname is not a valid host name.
    #[error("invalid hostname {hostname:?}: 1-64 characters of [A-Za-z0-9.-]")]
    Hostname {
        /// The hostname.
        hostname: String,
    },
    /// A host path covers or sits inside a mount point the sandbox owns.
    #[error("host path {path:?} overlaps the sandbox's own mount point {reserved}")]
    ReservedPath {
        /// The host path.
        path: PathBuf,
        /// The reserved mount point.
        reserved: &'static str,
    },
    /// Two host paths nest; mounting one inside the other's bind could write to the host.
    #[error("host paths must not nest: {outer:?} contains {inner:?}")]
    NestedHostPaths {
        /// The containing path.
        outer: PathBuf,
        /// The contained path.
        inner: PathBuf,
    },
    /// A workspace name is not a plain directory name.
    #[error("invalid workspace name {name:?}: use [A-Za-z0-9._-], not '.' or '..'")]
    WorkspaceName {
        /// The name.
        name: String,
    },
    /// Both an image and host paths: the root would mix two environments.
    #[error("host_paths must be empty when image_root is set (the image is the whole environment)")]
    ImageWithHostPaths,
    /// Two workspaces share a name.
    #[error("duplicate workspace name {name:?}")]
    DuplicateWorkspace {
        /// The name.
        name: String,
    },
    /// A limit is zero.
    #[error("{field} must be greater than 0")]
    Zero {
        /// Which field.
        field: &'static str,
    },
    /// The step would run as root (uid or gid 0); without a user namespace that is real root.
    #[error("the step must not run as {field} 0")]
    RootId {
        /// `uid` or `gid`.
        field: &'static str,
    },
    /// The open-files limit is unusable.
    #[error("confinement.rlimits.nofile must be between 16 and 1048576, got {nofile}")]
    Nofile {
        /// The limit.
        nofile: u64,
    },
    /// A cgroup path is not one of kiln's step cgroups.
    #[error(transparent)]
    Cgroup(#[from] CgroupPathError),
    /// A secret name is not a plain identifier (it becomes a file name).
    #[error("invalid secret name {name:?}: use [A-Za-z0-9_], 1-{MAX_SECRET_NAME} characters")]
    SecretName {
        /// The name.
        name: String,
    },
    /// Two secrets share a name.
    #[error("duplicate secret name {name:?}")]
    DuplicateSecret {
        /// The name.
        name: String,
    },
    /// The user namespace mapping is unusable or does not hold the step's ids.
    #[error("confinement.userns: {message}")]
    UserNamespace {
        /// What is wrong.
        message: String,
    },
    /// The secrets do not fit their tmpfs.
    #[error("secrets hold {bytes} bytes, more than the limit of {MAX_SECRETS_BYTES}")]
    SecretsTooLarge {
        /// Total size.
        bytes: usize,
    },
}

impl SandboxSpec {
    /// The step's uid and gid as the host sees them: `uid`/`gid` themselves, or mapped through
    /// the user namespace (`confinement.userns`). Files the step creates belong to these.
    pub fn host_ids(&self) -> (u32, u32) {
        match &self.confinement.userns {
            Some(userns) => (userns.host_uid_of(self.uid), userns.host_gid_of(self.gid)),
            None => (self.uid, self.gid),
        }
    }

    /// Checks everything the helper hands to the kernel.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.argv.is_empty() {
            return Err(SpecError::EmptyArgv);
        }
        for arg in &self.argv {
            no_nul("argv", arg, arg)?;
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') {
                return Err(SpecError::EnvName { name: name.clone() });
            }
            no_nul("env name", name, name)?;
            no_nul("env value", value, &format!("value of {name}"))?;
        }
        absolute_normal("cwd", &self.cwd)?;
        absolute_normal("root_dir", &self.root_dir)?;
        if self.hostname.is_empty()
            || self.hostname.len() > 64
            || !self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(SpecError::Hostname {
                hostname: self.hostname.clone(),
            });
        }
        for path in &self.host_paths {
            absolute_normal("host_paths", path)?;
            for reserved in RESERVED_PATHS {
                let reserved_path = Path::new(reserved);
                if path.starts_with(reserved_path) || reserved_path.starts_with(path) {
                    return Err(SpecError::ReservedPath {
                        path: path.clone(),
                        reserved,
                    });
                }
            }
        }
        if let Some(image_root) = &self.image_root {
            absolute_normal("image_root", image_root)?;
            if !self.host_paths.is_empty() {
                return Err(SpecError::ImageWithHostPaths);
            }
        }
        for outer in &self.host_paths {
            for inner in &self.host_paths {
                if !std::ptr::eq(outer, inner) && inner.starts_with(outer) {
                    return Err(SpecError::NestedHostPaths {
                        outer: outer.clone(),
                        inner: inner.clone(),
                    });
                }
            }
        }
        let mut names = BTreeSet::new();
        for workspace in &self.workspaces {
            let name = &workspace.name;
            if name.is_empty()
                || name == "."
                || name == ".."
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(SpecError::WorkspaceName { name: name.clone() });
            }
            if !names.insert(name.as_str()) {
                return Err(SpecError::DuplicateWorkspace { name: name.clone() });
            }
            absolute_normal("workspaces.host_path", &workspace.host_path)?;
        }
        if self.timeout_ms == 0 {
            return Err(SpecError::Zero {
                field: "timeout_ms",
            });
        }
        if self.tmp_size_bytes == 0 {
            return Err(SpecError::Zero {
                field: "tmp_size_bytes",
            });
        }
        if self.uid == 0 {
            return Err(SpecError::RootId { field: "uid" });
        }
        if self.gid == 0 {
            return Err(SpecError::RootId { field: "gid" });
        }
        if let Some(userns) = &self.confinement.userns {
            userns
                .validate(self.uid, self.gid)
                .map_err(|message| SpecError::UserNamespace { message })?;
        }
        if let Some(cgroups) = &self.cgroups {
            cgroups.validate()?;
        }
        if let Some(landlock) = &self.confinement.landlock {
            for rule in &landlock.rules {
                absolute_normal("confinement.landlock.rules.path", &rule.path)?;
            }
        }
        let mut secret_names = BTreeSet::new();
        for (name, _) in &self.secrets {
            if name.is_empty()
                || name.len() > MAX_SECRET_NAME
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(SpecError::SecretName { name: name.clone() });
            }
            if !secret_names.insert(name.as_str()) {
                return Err(SpecError::DuplicateSecret { name: name.clone() });
            }
        }
        let secret_bytes: usize = self.secrets.iter().map(|(_, value)| value.len()).sum();
        if secret_bytes > MAX_SECRETS_BYTES {
            return Err(SpecError::SecretsTooLarge {
                bytes: secret_bytes,
            });
        }
        // The step needs fds to run at all; the kernel refuses more than fs.nr_open (2^20 default).
        if !(16..=1 << 20).contains(&self.confinement.rlimits.nofile) {
            return Err(SpecError::Nofile {
                nofile: self.confinement.rlimits.nofile,
            });
        }
        Ok(())
    }

    /// The `PATH` the step's `argv[0]` is resolved with (the last `PATH` in `env`, else
    /// `/usr/bin:/bin`).
    pub fn path_env(&self) -> &str {
        self.env
            .iter()
            .rev()
            .find(|(name, _)| name == "PATH")
            .map_or("/usr/bin:/bin", |(_, value)| value.as_str())
    }
}

fn no_nul(field: &'static str, value: &str, shown: &str) -> Result<(), SpecError> {
    if value.contains('\0') {
        return Err(SpecError::NulByte {
            field,
            value: shown.to_owned(),
        });
    }
    Ok(())
}

fn absolute_normal(field: &'static str, path: &Path) -> Result<(), SpecError> {
    let normal = path.is_absolute()
        && path.as_os_str().as_encoded_bytes().iter().all(|&b| b != 0)
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if normal {
        Ok(())
    } else {
        Err(SpecError::NotAbsoluteNormal {
            field,
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> SandboxSpec {
        SandboxSpec {
            argv: vec!["/bin/true".into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("TOKEN".into(), "s3cret".into()),
            ],
            cwd: "/workspace/out".into(),
            hostname: "kiln-step".into(),
            root_dir: "/run/kiln/root".into(),
            host_paths: vec!["/usr".into(), "/bin".into(), "/etc/ld.so.cache".into()],
            image_root: None,
            workspaces: vec![
                WorkspaceMount {
                    name: "src".into(),
                    host_path: "/var/lib/kiln/ws/src".into(),
                    access: Access::ReadOnly,
                },
                WorkspaceMount {
                    name: "out".into(),
                    host_path: "/var/lib/kiln/ws/out".into(),
                    access: Access::ReadWrite,
                },
            ],
            timeout_ms: 1000,
            uid: 65534,
            gid: 65534,
            tmp_size_bytes: 1 << 20,
            cgroups: Some(super::super::cgroup::CgroupPaths {
                unified: "/sys/fs/cgroup/unified/kiln/job/step".into(),
                memory: "/sys/fs/cgroup/memory/kiln/job-step".into(),
                pids: "/sys/fs/cgroup/pids/kiln/job-step".into(),
                cpu: "/sys/fs/cgroup/cpu/kiln/job-step".into(),
            }),
            confinement: crate::sandbox::confine::Confinement {
                // A one-instruction program: SECCOMP_RET_ALLOW.
                seccomp: crate::sandbox::confine::SeccompProgram::new(vec![
                    6, 0, 0, 0, 0, 0, 0xff, 0x7f,
                ])
                .unwrap(),
                userns: None,
                rlimits: crate::sandbox::confine::Rlimits {
                    core_bytes: 0,
                    nofile: 1024,
                    fsize_bytes: 1 << 30,
                },
                landlock: Some(crate::sandbox::confine::LandlockPolicy {
                    rules: vec![crate::sandbox::confine::LandlockRule {
                        path: "/usr".into(),
                        access: crate::sandbox::confine::LandlockAccess::ReadExecute,
                    }],
                    tcp_connect_ports: Vec::new(),
                }),
            },
            secrets: vec![("API_TOKEN".into(), "t0ps3cret".into())],
        }
    }

    #[test]
    fn sample_is_valid_and_round_trips() {
        let spec = sample();
        spec.validate().unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<SandboxSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn debug_hides_env_values() {
        let shown = format!("{:?}", sample());
        assert!(shown.contains("TOKEN"));
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("API_TOKEN"));
        assert!(!shown.contains("t0ps3cret"));
    }

    #[test]
    fn rejects_dangerous_specs() {
        type Mutation = fn(&mut SandboxSpec);
        let cases: Vec<(Mutation, SpecError)> = vec![
            (|s| s.argv.clear(), SpecError::EmptyArgv),
            (
                |s| s.confinement.rlimits.nofile = 3,
                SpecError::Nofile { nofile: 3 },
            ),
            (
                |s| {
                    if let Some(landlock) = &mut s.confinement.landlock {
                        landlock.rules[0].path = "tmp".into();
                    }
                },
                SpecError::NotAbsoluteNormal {
                    field: "confinement.landlock.rules.path",
                    path: "tmp".into(),
                },
            ),
            (
                |s| s.host_paths.push("/usr/../etc".into()),
                SpecError::NotAbsoluteNormal {
                    field: "host_paths",
                    path: "/usr/../etc".into(),
                },
            ),
            (
                |s| s.host_paths.push("/".into()),
                SpecError::ReservedPath {
                    path: "/".into(),
                    reserved: "/dev",
                },
            ),
            (
                |s| s.host_paths.push("/proc/self".into()),
                SpecError::ReservedPath {
                    path: "/proc/self".into(),
                    reserved: "/proc",
                },
            ),
            (
                |s| s.host_paths.push("/usr/local".into()),
                SpecError::NestedHostPaths {
                    outer: "/usr".into(),
                    inner: "/usr/local".into(),
                },
            ),
            (
                |s| s.image_root = Some("/var/lib/kiln/images/ab/root".into()),
                SpecError::ImageWithHostPaths,
            ),
            (
                |s| {
                    s.host_paths.clear();
                    s.image_root = Some("images/root".into());
                },
                SpecError::NotAbsoluteNormal {
                    field: "image_root",
                    path: "images/root".into(),
                },
            ),
            (
                |s| s.workspaces[0].name = "..".into(),
                SpecError::WorkspaceName { name: "..".into() },
            ),
            (
                |s| s.workspaces[0].name = "a/b".into(),
                SpecError::WorkspaceName { name: "a/b".into() },
            ),
            (
                |s| s.workspaces[0].name = "out".into(),
                SpecError::DuplicateWorkspace { name: "out".into() },
            ),
            (|s| s.uid = 0, SpecError::RootId { field: "uid" }),
            (
                |s| {
                    if let Some(c) = s.cgroups.as_mut() {
                        c.memory = "/sys/fs/cgroup/memory".into();
                    }
                },
                SpecError::Cgroup(CgroupPathError {
                    controller: "memory",
                    path: "/sys/fs/cgroup/memory".into(),
                    shape: "<job>-<step>",
                }),
            ),
            (
                |s| s.hostname = "a b".into(),
                SpecError::Hostname {
                    hostname: "a b".into(),
                },
            ),
            (
                |s| s.env.push(("A=B".into(), String::new())),
                SpecError::EnvName { name: "A=B".into() },
            ),
            (
                |s| s.timeout_ms = 0,
                SpecError::Zero {
                    field: "timeout_ms",
                },
            ),
            (
                |s| s.secrets.push(("../x".into(), String::new())),
                SpecError::SecretName {
                    name: "../x".into(),
                },
            ),
            (
                |s| s.secrets.push(("API_TOKEN".into(), String::new())),
                SpecError::DuplicateSecret {
                    name: "API_TOKEN".into(),
                },
            ),
            (
                |s| s.host_paths.push("/run".into()),
                SpecError::ReservedPath {
                    path: "/run".into(),
                    reserved: SECRETS_MOUNT,
                },
            ),
        ];
        for (mutate, expected) in cases {
            let mut spec = sample();
            mutate(&mut spec);
            assert_eq!(spec.validate(), Err(expected));
        }
    }

    #[test]
    fn outcome_json_shape() {
        let outcome = SandboxOutcome {
            end: StepEnd::Exited { code: 3 },
            wall_ms: 1,
            user_ms: 0,
            sys_ms: 0,
            max_rss_kib: 10,
            limits_hit: Vec::new(),
            teardown: None,
            landlock: Some(crate::sandbox::confine::LandlockEnforcement::FullyEnforced),
        };
        let json = serde_json::to_string(&outcome).unwrap();
        assert!(
            json.contains(r#""end":{"kind":"exited","code":3}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<SandboxOutcome>(&json).unwrap(),
            outcome
        );
    }
}
