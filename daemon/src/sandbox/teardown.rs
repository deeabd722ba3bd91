//! Single use, proven: after the helper has exited kilnd ends whatever is left of the step
//! (`cgroup.kill`), removes its cgroups, and then checks — independently of how the step ended —
//! that nothing survived: no process in (or below) the step's cgroups in a `/proc` scan, no mount
//! under the sandbox root or a workspace in kilnd's mount namespace, an empty scratch root. The
//! [`TeardownReport`] goes into the outcome and the step's provenance (`teardownVerified`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cgroup::{self, CgroupPaths, Controller, LimitHit};
use super::spec::SandboxSpec;
use super::sys;

/// How long teardown waits for killed processes to leave the step's cgroups.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// Poll interval while waiting for the cgroups to empty.
const POLL: Duration = Duration::from_millis(1);

/// The result of checking that a step left nothing behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeardownReport {
    /// True if every check passed (`problems` is empty).
    pub verified: bool,
    /// What was found, one sentence each.
    pub problems: Vec<String>,
}

impl TeardownReport {
    fn from_problems(problems: Vec<String>) -> Self {
        Self {
            verified: problems.is_empty(),
            problems,
        }
    }
}

/// What a step could have left behind, from its spec.
#[derive(Debug, Clone)]
pub struct TeardownScope {
    /// The step's cgroups.
    pub cgroups: Option<CgroupPaths>,
    /// The sandbox root directory (must be empty, with nothing mounted under it).
    pub root_dir: PathBuf,
    /// Host directories of the workspaces (nothing may stay mounted under them).
    pub workspaces: Vec<PathBuf>,
}

impl TeardownScope {
    /// The scope of `spec`.
    pub fn of(spec: &SandboxSpec) -> Self {
        Self {
            cgroups: spec.cgroups.clone(),
            root_dir: spec.root_dir.clone(),
            workspaces: spec
                .workspaces
                .iter()
                .map(|workspace| workspace.host_path.clone())
                .collect(),
        }
    }
}

/// Kills what is left in the step's cgroups, reads the limits the kernel enforced, removes the
/// cgroups and verifies that nothing survived. Blocking (file I/O and a bounded wait): call it off
/// the async runtime. Call it only after the helper has been reaped.
pub fn teardown(scope: &TeardownScope) -> (Vec<LimitHit>, TeardownReport) {
    let mut problems = Vec::new();
    let mut hits = Vec::new();
    match &scope.cgroups {
        None => problems.push(
            "the step ran without cgroups: nothing proves that none of its processes survived"
                .to_owned(),
        ),
        Some(cgroups) => match cgroups.validate() {
            Err(err) => problems.push(format!("not tearing down: {err}")),
            Ok(()) => hits = end_cgroups(cgroups, &mut problems),
        },
    }
    check_mounts(scope, &mut problems);
    match std::fs::read_dir(&scope.root_dir) {
        Ok(mut entries) => {
            if let Some(entry) = entries.next() {
                problems.push(format!(
                    "scratch root {} is not empty: {:?} left behind",
                    scope.root_dir.display(),
                    entry.map(|entry| entry.file_name())
                ));
            }
        }
        Err(err) => problems.push(format!(
            "cannot check scratch root {}: {err}",
            scope.root_dir.display()
        )),
    }
    (hits, TeardownReport::from_problems(problems))
}

/// `cgroup.kill`, wait until every cgroup is empty, read the limit counters, remove the
/// directories, scan `/proc`.
fn end_cgroups(cgroups: &CgroupPaths, problems: &mut Vec<String>) -> Vec<LimitHit> {
    // SIGKILL to every process in the v2 cgroup and its descendants, atomically with respect to
    // forks: a fork bomb cannot outrun it.
    if let Err(err) = cgroup::write_control(&cgroups.unified.join("cgroup.kill"), "1") {
        problems.push(format!(
            "cannot kill cgroup {}: {err}",
            cgroups.unified.display()
        ));
    }
    let deadline = Instant::now() + KILL_WAIT;
    let left = loop {
        let left: Vec<(PathBuf, Vec<u32>)> = cgroups
            .all()
            .into_iter()
            .filter_map(|(_, dir)| {
                let pids = procs(dir);
                (!pids.is_empty()).then(|| (dir.to_owned(), pids))
            })
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(POLL);
    };
    for (dir, pids) in &left {
        problems.push(format!(
            "cgroup {} still has processes {pids:?} {} ms after cgroup.kill",
            dir.display(),
            KILL_WAIT.as_millis()
        ));
    }
    // Counters die with the directories: read them first.
    let hits = cgroup::limit_hits(cgroups).unwrap_or_else(|err| {
        problems.push(format!("cannot read the step's limit counters: {err}"));
        Vec::new()
    });
    // rmdir of a cgroup whose last process just exited can race with the kernel's own cleanup
    // (EBUSY): retry until the deadline.
    let mut removed = cgroup::remove_step_dirs(cgroups);
    while !removed.is_empty() && Instant::now() < deadline {
        std::thread::sleep(POLL);
        removed = cgroup::remove_step_dirs(cgroups);
    }
    for (dir, err) in removed {
        problems.push(format!("cannot remove cgroup {}: {err}", dir.display()));
    }
    for (pid, cgroup) in processes_in(cgroups) {
        problems.push(format!(
            "process {pid} is still in the step's cgroup {cgroup}"
        ));
    }
    hits
}

/// Pids listed in `dir/cgroup.procs` (empty if the directory is gone).
fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Every process on the host whose `/proc/<pid>/cgroup` puts it in (or below) one of the step's
/// cgroups: `(pid, hierarchy:path)`.
pub fn processes_in(cgroups: &CgroupPaths) -> Vec<(u32, String)> {
    // The step's cgroups as `/proc/<pid>/cgroup` shows them: the path within the hierarchy.
    let wanted: Vec<(Controller, PathBuf)> = cgroups
        .all()
        .into_iter()
        .filter_map(|(controller, dir)| {
            let relative = dir.strip_prefix(controller.mount()).ok()?;
            Some((controller, Path::new("/").join(relative)))
        })
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exits during the scan is simply gone.
        let Ok(text) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        for (controller, path) in &wanted {
            if let Some(own) = cgroup::own_cgroup(&text, *controller)
                && Path::new(own).starts_with(path)
            {
                found.push((pid, format!("{}:{own}", controller.name())));
                break;
            }
        }
    }
    found
}

/// No mount of kilnd's namespace may sit at or under the sandbox root or a workspace: the step's
/// mounts live (and died) in its own namespace.
fn check_mounts(scope: &TeardownScope, problems: &mut Vec<String>) {
    let mount_points = match sys::mount_points() {
        Ok(points) => points,
        Err(err) => {
            problems.push(format!("cannot read /proc/self/mountinfo: {err}"));
            return;
        }
    };
    let guarded: BTreeSet<&Path> = std::iter::once(scope.root_dir.as_path())
        .chain(scope.workspaces.iter().map(PathBuf::as_path))
        .collect();
    for point in mount_points {
        if let Some(dir) = guarded.iter().find(|dir| point.starts_with(dir)) {
            problems.push(format!(
                "{} is still mounted on the host (under {})",
                point.display(),
                dir.display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_cgroups_teardown_is_not_verified() {
        let root = tempfile::tempdir().unwrap();
        let scope = TeardownScope {
            cgroups: None,
            root_dir: root.path().to_owned(),
            workspaces: Vec::new(),
        };
        let (hits, report) = teardown(&scope);
        assert!(hits.is_empty());
        assert!(!report.verified);
        assert_eq!(report.problems.len(), 1, "{report:?}");
        assert!(report.problems[0].contains("without cgroups"), "{report:?}");
    }

    #[test]
    fn leftovers_in_the_scratch_root_are_reported() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("dropped"), b"x").unwrap();
        let scope = TeardownScope {
            cgroups: None,
            root_dir: root.path().to_owned(),
            workspaces: Vec::new(),
        };
        let (_, report) = teardown(&scope);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("not empty") && p.contains("dropped")),
            "{report:?}"
        );
    }

    #[test]
    fn foreign_cgroup_paths_are_never_touched() {
        let root = tempfile::tempdir().unwrap();
        let scope = TeardownScope {
            cgroups: Some(CgroupPaths {
                unified: "/sys/fs/cgroup/unified".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                cpu: "/sys/fs/cgroup/cpu".into(),
            }),
            root_dir: root.path().to_owned(),
            workspaces: Vec::new(),
        };
        let (_, report) = teardown(&scope);
        assert!(!report.verified);
        assert!(
            report.problems[0].starts_with("not tearing down"),
            "{report:?}"
        );
    }
}
