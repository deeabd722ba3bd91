//! Per-step cgroups: one cgroup v2 directory (its inode is the cgroup id the observer filters on,
//! its `cgroup.kill` ends the step) and cgroup v1 `memory`, `pids` and `cpu` directories carrying
//! the profile's [`Limits`] (on these hosts the v2 hierarchy has only hugetlb; see DESIGN.md).
//!
//! Layout, relative to the cgroup kilnd itself runs in (so kiln's cgroups stay inside whatever
//! limits the operator put kilnd under, as cgroup delegation expects):
//! - v2: `/sys/fs/cgroup/unified/<kilnd's cgroup>/kiln/<job>/<step>`
//! - v1: `/sys/fs/cgroup/<controller>/<kilnd's cgroup>/kiln/<job>-<step>`
//!
//! kilnd creates the directories and writes the limits ([`create_step`], a reviewed [`plan`] of
//! [`CgroupOp`]s, unit-tested without root); the `kiln-sandbox` helper [`join`]s all of them before
//! it unshares or forks, so every process of the step is inside; after the step kilnd reads what
//! the kernel enforced ([`limit_hits`]) and tears the directories down (`teardown`).

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the cgroup hierarchies are mounted on kiln hosts.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// The cgroup v2 mount, below [`CGROUP_MOUNT`].
pub const UNIFIED: &str = "unified";
/// Name of kiln's directory in every hierarchy; step cgroups live right below it.
pub const KILN_DIR: &str = "kiln";
/// `cpu.cfs_period_us` kiln sets: 100 ms, the kernel default.
pub const CFS_PERIOD_US: u64 = 100_000;

/// Resource limits of a step (a profile's `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory of the whole step (RAM + swap: swap is not a way around it), in bytes.
    pub memory_bytes: u64,
    /// Processes and threads of the whole step, the helper and the namespace's pid 1 included.
    pub pids: u64,
    /// CPU time per wall time, in thousandths of a core (`2000` = 2 cores).
    pub cpu_millicores: u64,
}

impl Default for Limits {
    /// What a profile without `[limits]` gets: 2 GiB, 512 processes, 2 cores.
    fn default() -> Self {
        Self {
            memory_bytes: 2 << 30,
            pids: 512,
            cpu_millicores: 2000,
        }
    }
}

/// A cgroup controller kiln uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// The cgroup v2 hierarchy (no controller of ours: ids, `cgroup.kill`, `cpu.stat`).
    Unified,
    /// cgroup v1 memory.
    Memory,
    /// cgroup v1 pids.
    Pids,
    /// cgroup v1 cpu (CFS bandwidth).
    Cpu,
}

impl Controller {
    /// Directory name below [`CGROUP_MOUNT`] (and the v1 controller name).
    pub fn name(self) -> &'static str {
        match self {
            Self::Unified => UNIFIED,
            Self::Memory => "memory",
            Self::Pids => "pids",
            Self::Cpu => "cpu",
        }
    }

    /// Mount point of the hierarchy.
    pub fn mount(self) -> PathBuf {
        Path::new(CGROUP_MOUNT).join(self.name())
    }
}

/// The four cgroup directories of one step. Travels in the [`SandboxSpec`](super::SandboxSpec):
/// the helper joins them, kilnd tears them down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupPaths {
    /// `/sys/fs/cgroup/unified/…/kiln/<job>/<step>`.
    pub unified: PathBuf,
    /// `/sys/fs/cgroup/memory/…/kiln/<job>-<step>`.
    pub memory: PathBuf,
    /// `/sys/fs/cgroup/pids/…/kiln/<job>-<step>`.
    pub pids: PathBuf,
    /// `/sys/fs/cgroup/cpu/…/kiln/<job>-<step>`.
    pub cpu: PathBuf,
}

/// A cgroup path that the helper must not join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cgroup path {path:?} for {controller} must be {CGROUP_MOUNT}/{controller}/…/{KILN_DIR}/{shape} \
     (absolute, no '.' or '..')"
)]
pub struct CgroupPathError {
    /// Which hierarchy.
    pub controller: &'static str,
    /// The path.
    pub path: PathBuf,
    /// The expected tail.
    pub shape: &'static str,
}

impl CgroupPaths {
    /// Every directory with its controller, v2 first (the order the helper joins them in).
    pub fn all(&self) -> [(Controller, &Path); 4] {
        [
            (Controller::Unified, &self.unified),
            (Controller::Memory, &self.memory),
            (Controller::Pids, &self.pids),
            (Controller::Cpu, &self.cpu),
        ]
    }

    /// Each path must sit in its own hierarchy, right below a `kiln` directory (v2: `kiln/<job>/<step>`),
    /// so a spec can never make the helper join (or kilnd kill and remove) any other cgroup.
    pub fn validate(&self) -> Result<(), CgroupPathError> {
        for (controller, path) in self.all() {
            let (shape, kiln_level) = if controller == Controller::Unified {
                ("<job>/<step>", path.parent().and_then(Path::parent))
            } else {
                ("<job>-<step>", path.parent())
            };
            let error = || CgroupPathError {
                controller: controller.name(),
                path: path.to_owned(),
                shape,
            };
            let normal = path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            let names_ok = path
                .strip_prefix(controller.mount())
                .ok()
                .zip(kiln_level.and_then(|dir| dir.strip_prefix(controller.mount()).ok()))
                .is_some_and(|(rel, kiln_rel)| {
                    kiln_rel.file_name().is_some_and(|n| n == KILN_DIR)
                        && rel
                            .strip_prefix(kiln_rel)
                            .is_ok_and(|tail| tail.iter().all(|part| valid_name(part.to_str())))
                });
            if !(path.is_absolute() && normal && names_ok) {
                return Err(error());
            }
        }
        Ok(())
    }

    /// The step's cgroup id: the inode number of its v2 directory (what `bpf_get_current_cgroup_id`
    /// returns for its processes).
    pub fn cgroup_id(&self) -> io::Result<u64> {
        Ok(std::fs::metadata(&self.unified)?.ino())
    }
}

/// `[A-Za-z0-9._-]`, 1–128 characters, not starting with `.`: a job id or step name used as a
/// cgroup directory name.
fn valid_name(name: Option<&str>) -> bool {
    name.is_some_and(|name| {
        !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    })
}

/// kiln's base directories (`…/kiln`) in each hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    unified: PathBuf,
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
}

/// Creating, joining or reading a step's cgroups failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` could not be read.
    #[error("cannot read /proc/self/cgroup: {0}")]
    SelfCgroup(#[source] io::Error),
    /// This process is in no cgroup of a hierarchy kiln needs (hierarchy not mounted).
    #[error(
        "cgroup hierarchy {controller} not found in /proc/self/cgroup (kiln needs cgroup v1 memory, \
         pids, cpu and cgroup v2 at {CGROUP_MOUNT}/{UNIFIED})"
    )]
    NoHierarchy {
        /// Which one.
        controller: &'static str,
    },
    /// A job id or step name is not usable as a directory name.
    #[error("{what} {name:?} cannot name a cgroup: use [A-Za-z0-9._-], not starting with '.'")]
    Name {
        /// `job` or `step`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A cgroup file operation failed.
    #[error("cgroup {op}: {source}")]
    Op {
        /// The operation and its path, as displayed.
        op: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl CgroupRoot {
    /// kiln's directories below the cgroups this process is in (`/proc/self/cgroup`).
    pub fn detect() -> Result<Self, CgroupError> {
        let text = std::fs::read_to_string("/proc/self/cgroup").map_err(CgroupError::SelfCgroup)?;
        Self::from_proc_cgroup(&text)
    }

    /// [`CgroupRoot::detect`] from the text of a `/proc/<pid>/cgroup` file.
    pub fn from_proc_cgroup(text: &str) -> Result<Self, CgroupError> {
        let base = |controller: Controller| {
            own_cgroup(text, controller)
                .map(|own| join_relative(&controller.mount(), own).join(KILN_DIR))
                .ok_or(CgroupError::NoHierarchy {
                    controller: controller.name(),
                })
        };
        Ok(Self {
            unified: base(Controller::Unified)?,
            memory: base(Controller::Memory)?,
            pids: base(Controller::Pids)?,
            cpu: base(Controller::Cpu)?,
        })
    }

    /// The directories of step `step` of job `job` (nothing is created).
    pub fn step_paths(&self, job: &str, step: &str) -> Result<CgroupPaths, CgroupError> {
        for (what, name) in [("job", job), ("step", step)] {
            if !valid_name(Some(name)) {
                return Err(CgroupError::Name {
                    what,
                    name: name.to_owned(),
                });
            }
        }
        let v1 = format!("{job}-{step}");
        Ok(CgroupPaths {
            unified: self.unified.join(job).join(step),
            memory: self.memory.join(&v1),
            pids: self.pids.join(&v1),
            cpu: self.cpu.join(&v1),
        })
    }
}

/// The cgroup path of this process in `controller`'s hierarchy, from `/proc/<pid>/cgroup` text
/// (`<id>:<controllers>:<path>`; v2 is `0::<path>`).
pub fn own_cgroup(text: &str, controller: Controller) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let matches = match controller {
            Controller::Unified => controllers.is_empty(),
            _ => controllers.split(',').any(|c| c == controller.name()),
        };
        matches.then_some(path)
    })
}

/// `mount` + a cgroup path as `/proc/<pid>/cgroup` shows it (absolute within the hierarchy).
fn join_relative(mount: &Path, cgroup: &str) -> PathBuf {
    let mut path = mount.to_owned();
    path.extend(
        cgroup
            .split('/')
            .filter(|part| !part.is_empty() && *part != "." && *part != ".."),
    );
    path
}

/// One step of setting up a step's cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupOp {
    /// `mkdir`; an existing directory is fine for kiln's shared parents only.
    MakeDir {
        /// The directory.
        path: PathBuf,
        /// Whether it may already exist (the `kiln` and job directories).
        shared: bool,
    },
    /// Write a control file.
    Write {
        /// The file.
        file: PathBuf,
        /// What to write.
        value: String,
        /// Skip it when the file does not exist (e.g. `memory.memsw.*` without swap accounting).
        optional: bool,
    },
}

impl fmt::Display for CgroupOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MakeDir { path, .. } => write!(f, "mkdir {}", path.display()),
            Self::Write { file, value, .. } => write!(f, "write {value:?} to {}", file.display()),
        }
    }
}

/// The directories and limit writes for a step, in order (pure: reviewed in unit tests).
pub fn plan(paths: &CgroupPaths, limits: &Limits) -> Vec<CgroupOp> {
    let dir = |path: &Path, shared| CgroupOp::MakeDir {
        path: path.to_owned(),
        shared,
    };
    let write = |dir: &Path, file: &str, value: String, optional| CgroupOp::Write {
        file: dir.join(file),
        value,
        optional,
    };
    let mut ops = Vec::new();
    for (_, path) in paths.all() {
        // Parents: `kiln` in every hierarchy, plus the job directory in v2.
        let mut parents: Vec<&Path> = path.ancestors().skip(1).take(2).collect();
        if path != paths.unified {
            parents.truncate(1);
        }
        for parent in parents.into_iter().rev() {
            ops.push(dir(parent, true));
        }
        ops.push(dir(path, false));
    }
    let memory = limits.memory_bytes.to_string();
    // memsw (RAM + swap) must never be below the RAM limit: set the RAM limit first.
    ops.push(write(
        &paths.memory,
        "memory.limit_in_bytes",
        memory.clone(),
        false,
    ));
    ops.push(write(
        &paths.memory,
        "memory.memsw.limit_in_bytes",
        memory,
        true,
    ));
    // No swapping the step out: a memory bomb must hit the limit, not slow the host down.
    ops.push(write(&paths.memory, "memory.swappiness", "0".into(), true));
    // The OOM killer on (the v1 default, written so a changed default cannot freeze a step
    // forever in `under_oom`): an allocation past the limit kills a process of the step.
    ops.push(write(
        &paths.memory,
        "memory.oom_control",
        "0".into(),
        false,
    ));
    ops.push(write(
        &paths.pids,
        "pids.max",
        limits.pids.to_string(),
        false,
    ));
    ops.push(write(
        &paths.cpu,
        "cpu.cfs_period_us",
        CFS_PERIOD_US.to_string(),
        false,
    ));
    ops.push(write(
        &paths.cpu,
        "cpu.cfs_quota_us",
        (limits.cpu_millicores * CFS_PERIOD_US / 1000)
            .max(1000)
            .to_string(),
        false,
    ));
    ops
}

/// Creates the cgroups of step `step` of job `job` below kilnd's own cgroups, with `limits`.
/// On failure whatever was created is removed again.
pub fn create_step(job: &str, step: &str, limits: &Limits) -> Result<CgroupPaths, CgroupError> {
    let paths = CgroupRoot::detect()?.step_paths(job, step)?;
    create(&paths, limits)?;
    Ok(paths)
}

/// Applies [`plan`]. A concurrent teardown may remove an empty shared parent between our `mkdir`s
/// (it prunes `kiln` when its last step ends): the plan is then retried.
pub fn create(paths: &CgroupPaths, limits: &Limits) -> Result<(), CgroupError> {
    const ATTEMPTS: usize = 5;
    let ops = plan(paths, limits);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match ops.iter().try_for_each(apply) {
            Ok(()) => return Ok(()),
            Err(err) => {
                remove_step_dirs(paths);
                let raced = matches!(&err, CgroupError::Op { source, .. } if source.kind() == io::ErrorKind::NotFound);
                if !raced || attempt == ATTEMPTS {
                    return Err(err);
                }
            }
        }
    }
}

fn apply(op: &CgroupOp) -> Result<(), CgroupError> {
    let result = match op {
        CgroupOp::MakeDir { path, shared } => match std::fs::create_dir(path) {
            Err(err) if *shared && err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        },
        CgroupOp::Write {
            file,
            value,
            optional,
        } => match write_control(file, value) {
            Err(err) if *optional && err.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    result.map_err(|source| CgroupError::Op {
        op: op.to_string(),
        source,
    })
}

/// One `write(2)` of `value` to a cgroup control file (cgroupfs takes each write as one command).
pub fn write_control(file: &Path, value: &str) -> io::Result<()> {
    use std::io::Write;
    let mut control = std::fs::OpenOptions::new().write(true).open(file)?;
    control.write_all(value.as_bytes())
}

/// Moves the calling process into every cgroup of `paths` (the helper, before it unshares or
/// forks: all its descendants inherit them). Validates the paths first.
pub fn join(paths: &CgroupPaths) -> Result<(), CgroupError> {
    paths.validate().map_err(|err| CgroupError::Op {
        op: "join".into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, err),
    })?;
    let pid = std::process::id().to_string();
    for (_, path) in paths.all() {
        let file = path.join("cgroup.procs");
        write_control(&file, &pid).map_err(|source| CgroupError::Op {
            op: format!("join {}", file.display()),
            source,
        })?;
    }
    Ok(())
}

/// Best-effort `rmdir` of the step's directories (they must be empty of processes), then of kiln's
/// shared parents if no other step uses them. Returns the step directories that still exist.
pub fn remove_step_dirs(paths: &CgroupPaths) -> Vec<(PathBuf, io::Error)> {
    let mut left = Vec::new();
    for (controller, path) in paths.all() {
        match std::fs::remove_dir(path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                left.push((path.to_owned(), err));
                continue;
            }
        }
        // Shared parents: the v2 job directory, then `kiln`. EBUSY/ENOTEMPTY = still in use.
        let parents = if controller == Controller::Unified {
            2
        } else {
            1
        };
        for parent in path.ancestors().skip(1).take(parents) {
            if std::fs::remove_dir(parent).is_err() {
                break;
            }
        }
    }
    left
}

/// Kills and removes every cgroup kiln made for job `job` below this process's cgroups — the
/// leftovers of a kilnd that stopped without tearing its steps down (a crash, `kill -9`). Other
/// jobs' cgroups are not touched, so several kilnd instances in one cgroup stay independent.
/// Returns what could not be cleaned (path and reason); an empty list means nothing is left.
pub fn sweep_job(job: &str) -> Vec<(PathBuf, String)> {
    let root = match CgroupRoot::detect() {
        Ok(root) => root,
        Err(err) => return vec![(PathBuf::from("/proc/self/cgroup"), err.to_string())],
    };
    if !valid_name(Some(job)) {
        return vec![(PathBuf::from(job), "not a job id".into())];
    }
    let mut dirs = Vec::new();
    // v2: `kiln/<job>/<step>`: cgroup.kill ends every process of the step at once.
    let job_dir = root.unified.join(job);
    if let Ok(entries) = std::fs::read_dir(&job_dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = write_control(&entry.path().join("cgroup.kill"), "1");
                dirs.push(entry.path());
            }
        }
    }
    // v1: `kiln/<job>-<step>` in each limit hierarchy (emptied by the v2 kill; SIGKILL whatever
    // is still listed, in case the v2 directory was already gone).
    let prefix = format!("{job}-");
    for base in [&root.memory, &root.pids, &root.cpu] {
        let Ok(entries) = std::fs::read_dir(base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(&prefix))
                && entry.file_type().is_ok_and(|t| t.is_dir())
            {
                kill_listed(&entry.path());
                dirs.push(entry.path());
            }
        }
    }
    // A killed process leaves its cgroup a moment after the signal: retry the rmdirs briefly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut left: Vec<(PathBuf, String)> = Vec::new();
    loop {
        left.clear();
        for dir in &dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    kill_listed(dir);
                    left.push((dir.clone(), err.to_string()));
                }
            }
        }
        if left.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if left.is_empty() {
        let _ = std::fs::remove_dir(&job_dir);
        for base in [&root.unified, &root.memory, &root.pids, &root.cpu] {
            // The shared `kiln` parent, if no other job uses it.
            let _ = std::fs::remove_dir(base);
        }
    }
    left
}

/// SIGKILL every process listed in `dir/cgroup.procs`.
fn kill_listed(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A limit the kernel enforced on the step: the step's end is explained by it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LimitHit {
    /// The OOM killer killed processes of the step.
    Memory {
        /// The memory limit, in bytes.
        limit_bytes: u64,
        /// Processes killed (`oom_kill` of `memory.oom_control`).
        oom_kills: u64,
    },
    /// `fork`/`clone` failed because the step had `pids.max` processes.
    Pids {
        /// The limit.
        limit: u64,
        /// Refused forks (`max` of `pids.events`).
        refused_forks: u64,
    },
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory { limit_bytes, .. } => {
                write!(f, "out of memory: limit {}", format_bytes(*limit_bytes))
            }
            Self::Pids { limit, .. } => write!(f, "process limit reached: {limit}"),
        }
    }
}

/// `2147483648` → `2 GiB`; sizes that are not a whole number of a binary unit stay in bytes.
pub fn format_bytes(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// What the kernel enforced on the step, read from its (still existing) cgroups: OOM kills and
/// refused forks. Unreadable counters are reported as errors.
pub fn limit_hits(paths: &CgroupPaths) -> Result<Vec<LimitHit>, CgroupError> {
    let read = |dir: &Path, file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| CgroupError::Op {
            op: format!("read {}", path.display()),
            source,
        })
    };
    // A limit file holds a number or `max` (no limit).
    let limit = |dir: &Path, file: &str| {
        read(dir, file).map(|text| text.trim().parse().unwrap_or(u64::MAX))
    };
    let mut hits = Vec::new();
    let oom_kills = keyed_counter(&read(&paths.memory, "memory.oom_control")?, "oom_kill");
    if oom_kills > 0 {
        let limit_bytes = limit(&paths.memory, "memory.limit_in_bytes")?;
        hits.push(LimitHit::Memory {
            limit_bytes,
            oom_kills,
        });
    }
    let refused_forks = keyed_counter(&read(&paths.pids, "pids.events")?, "max");
    if refused_forks > 0 {
        let limit = limit(&paths.pids, "pids.max")?;
        hits.push(LimitHit::Pids {
            limit,
            refused_forks,
        });
    }
    Ok(hits)
}

/// The value of `key` in a flat-keyed cgroup file (`key value` per line); 0 if absent.
pub fn keyed_counter(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(' ')?;
            (name == key).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_CGROUP: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/outer/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    fn paths() -> CgroupPaths {
        CgroupRoot::from_proc_cgroup(PROC_CGROUP)
            .unwrap()
            .step_paths("0190-job", "build")
            .unwrap()
    }

    #[test]
    fn paths_nest_under_own_cgroup() {
        let paths = paths();
        assert_eq!(
            paths.unified,
            Path::new("/sys/fs/cgroup/unified/kiln/0190-job/build")
        );
        assert_eq!(
            paths.memory,
            Path::new("/sys/fs/cgroup/memory/outer/abc/kiln/0190-job-build")
        );
        assert_eq!(
            paths.pids,
            Path::new("/sys/fs/cgroup/pids/kiln/0190-job-build")
        );
        assert_eq!(
            paths.cpu,
            Path::new("/sys/fs/cgroup/cpu/kiln/0190-job-build")
        );
        paths.validate().unwrap();
        // co-mounted controllers ("cpu,cpuacct") are found too
        let text = "3:cpu,cpuacct:/x\n4:memory:/\n5:pids:/\n0::/\n";
        let root = CgroupRoot::from_proc_cgroup(text).unwrap();
        assert_eq!(
            root.step_paths("j", "s").unwrap().cpu,
            Path::new("/sys/fs/cgroup/cpu/x/kiln/j-s")
        );
        assert!(matches!(
            CgroupRoot::from_proc_cgroup("0::/\n"),
            Err(CgroupError::NoHierarchy {
                controller: "memory"
            })
        ));
    }

    #[test]
    fn names_must_be_plain() {
        let root = CgroupRoot::from_proc_cgroup(PROC_CGROUP).unwrap();
        for bad in ["", "..", ".hidden", "a/b", "a b"] {
            assert!(root.step_paths("job", bad).is_err(), "{bad:?}");
            assert!(root.step_paths(bad, "step").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validate_refuses_foreign_cgroups() {
        type Mutation = fn(&mut CgroupPaths);
        let cases: [(Mutation, &str); 7] = [
            (|p| p.memory = "/sys/fs/cgroup/memory".into(), "memory"),
            (|p| p.memory = "/sys/fs/cgroup/memory/kiln".into(), "memory"),
            (
                |p| p.memory = "/sys/fs/cgroup/memory/other/job-step".into(),
                "memory",
            ),
            (
                |p| p.pids = "/sys/fs/cgroup/memory/kiln/job-step".into(),
                "pids",
            ),
            (|p| p.cpu = "/sys/fs/cgroup/cpu/kiln/../../x".into(), "cpu"),
            (
                |p| p.unified = "/sys/fs/cgroup/unified/kiln/job".into(),
                "unified",
            ),
            (|p| p.unified = "/tmp/kiln/job/step".into(), "unified"),
        ];
        for (mutate, controller) in cases {
            let mut paths = paths();
            mutate(&mut paths);
            let err = paths.validate().unwrap_err();
            assert_eq!(err.controller, controller, "{err}");
        }
    }

    #[test]
    fn plan_creates_parents_then_limits() {
        let paths = paths();
        let limits = Limits {
            memory_bytes: 64 << 20,
            pids: 100,
            cpu_millicores: 500,
        };
        let shown: Vec<String> = plan(&paths, &limits)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                "mkdir /sys/fs/cgroup/unified/kiln",
                "mkdir /sys/fs/cgroup/unified/kiln/0190-job",
                "mkdir /sys/fs/cgroup/unified/kiln/0190-job/build",
                "mkdir /sys/fs/cgroup/memory/outer/abc/kiln",
                "mkdir /sys/fs/cgroup/memory/outer/abc/kiln/0190-job-build",
                "mkdir /sys/fs/cgroup/pids/kiln",
                "mkdir /sys/fs/cgroup/pids/kiln/0190-job-build",
                "mkdir /sys/fs/cgroup/cpu/kiln",
                "mkdir /sys/fs/cgroup/cpu/kiln/0190-job-build",
                "write \"67108864\" to /sys/fs/cgroup/memory/outer/abc/kiln/0190-job-build/memory.limit_in_bytes",
                "write \"67108864\" to /sys/fs/cgroup/memory/outer/abc/kiln/0190-job-build/memory.memsw.limit_in_bytes",
                "write \"0\" to /sys/fs/cgroup/memory/outer/abc/kiln/0190-job-build/memory.swappiness",
                "write \"0\" to /sys/fs/cgroup/memory/outer/abc/kiln/0190-job-build/memory.oom_control",
                "write \"100\" to /sys/fs/cgroup/pids/kiln/0190-job-build/pids.max",
                "write \"100000\" to /sys/fs/cgroup/cpu/kiln/0190-job-build/cpu.cfs_period_us",
                "write \"50000\" to /sys/fs/cgroup/cpu/kiln/0190-job-build/cpu.cfs_quota_us",
            ]
        );
        // Only kiln's shared parents may pre-exist; a step directory never.
        let ops = plan(&paths, &limits);
        assert!(ops.iter().any(
            |op| matches!(op, CgroupOp::MakeDir { path, shared: false } if *path == paths.unified)
        ));
    }

    #[test]
    fn counters_and_reasons() {
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_counter(oom, "oom_kill"), 3);
        assert_eq!(keyed_counter(oom, "oom_kill_disable"), 0);
        assert_eq!(keyed_counter("max 17\n", "max"), 17);
        assert_eq!(keyed_counter("", "max"), 0);
        let hit = LimitHit::Memory {
            limit_bytes: 2 << 30,
            oom_kills: 1,
        };
        assert_eq!(hit.to_string(), "out of memory: limit 2 GiB");
        let hit = LimitHit::Pids {
            limit: 512,
            refused_forks: 9,
        };
        assert_eq!(hit.to_string(), "process limit reached: 512");
        assert_eq!(format_bytes(64 << 20), "64 MiB");
        assert_eq!(format_bytes(1000), "1000 B");
        assert_eq!(format_bytes(3 << 29), "1536 MiB");
    }
}
