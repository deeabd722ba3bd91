//! The sandbox's root filesystem as reviewed data: [`plan_root`] turns a validated spec into a list of
//! [`MountOp`]s (pure; unit-tested without root), and `sys::apply` performs them inside the helper's
//! private mount namespace.
//!
//! Layout: a tmpfs root (read-only at the end), host paths bound read-only at the same place
//! (symlinks such as Debian's `/bin -> usr/bin` recreated), workspaces at `/workspace/<name>`, a
//! minimal `/dev`, a fresh `/proc`, a private `/tmp`. With an image (`image_root`), the image's
//! top-level entries take the place of the host paths: each directory or file bound read-only at
//! `/<name>`, each symlink recreated; the sandbox's own mount points stay kiln's. Later hardening (landlock, idmapped mounts,
//! `open_tree`/`move_mount`) changes `sys::apply`, not the plan.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::spec::{Access, RESERVED_PATHS, SECRETS_MOUNT, SandboxSpec};

/// What a host path is, as seen by `lstat` (symlinks are not followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    /// A directory: bound recursively.
    Directory,
    /// Anything else that can be bound onto a file (regular file, device node).
    File,
    /// A symlink with this target: recreated verbatim in the sandbox.
    Symlink(PathBuf),
}

/// Read-only view of the host filesystem the planner needs (a fake in unit tests).
pub trait HostView {
    /// `lstat` of `path`.
    fn entry(&self, path: &Path) -> io::Result<HostEntry>;
    /// Names in directory `dir`, sorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<std::ffi::OsString>>;
}

/// The real host, via `lstat`/`readlink`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealHost;

impl HostView for RealHost {
    fn entry(&self, path: &Path) -> io::Result<HostEntry> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            Ok(HostEntry::Symlink(std::fs::read_link(path)?))
        } else if meta.is_dir() {
            Ok(HostEntry::Directory)
        } else {
            Ok(HostEntry::File)
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        let mut names = std::fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }
}

/// One step of building the root. Paths before [`MountOp::PivotRoot`] are host-side paths under
/// `root_dir`; after it they are paths in the new root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOp {
    /// Mount a fresh tmpfs.
    Tmpfs {
        /// Mount point.
        target: PathBuf,
        /// tmpfs options (`mode=`, `size=`).
        options: String,
        /// Mount flags.
        flags: MsFlags,
    },
    /// Create a directory; an existing symlink or non-directory is an error (never followed).
    MakeDir {
        /// The directory.
        path: PathBuf,
    },
    /// Create an empty file as a bind mount point (`O_EXCL`: never follows a symlink).
    MakeFile {
        /// The file.
        path: PathBuf,
    },
    /// Create a symlink.
    Symlink {
        /// What it points to (verbatim).
        target: PathBuf,
        /// Where the link is created.
        link: PathBuf,
    },
    /// Bind `source` (recursively) onto `target`.
    Bind {
        /// Host path.
        source: PathBuf,
        /// Mount point.
        target: PathBuf,
    },
    /// Re-apply per-mount flags on a bind (the bind itself ignores them), keeping the flags the
    /// source mount already has; `recursive` also restricts every submount.
    Restrict {
        /// The mount.
        target: PathBuf,
        /// Flags to add (`MS_RDONLY`, `MS_NOSUID`, …).
        flags: MsFlags,
        /// Apply to submounts too.
        recursive: bool,
    },
    /// Mount a procfs of the current pid namespace.
    Proc {
        /// Mount point.
        target: PathBuf,
    },
    /// Make `new_root` the root and detach the old one.
    PivotRoot {
        /// The new root.
        new_root: PathBuf,
    },
    /// Create a file with these contents, mode and owner (`O_EXCL|O_NOFOLLOW`): a step secret on
    /// its own tmpfs.
    WriteFile {
        /// The file.
        path: PathBuf,
        /// What it holds (never shown by `Debug` or `Display`).
        contents: SecretBytes,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
}

/// Bytes that must not appear in logs or errors: `Debug` shows the length only.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.0.len())
    }
}

impl fmt::Display for MountOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tmpfs {
                target,
                options,
                flags,
            } => {
                write!(
                    f,
                    "mount tmpfs ({options}, {flags:?}) on {}",
                    target.display()
                )
            }
            Self::MakeDir { path } => write!(f, "mkdir {}", path.display()),
            Self::MakeFile { path } => write!(f, "create mount point {}", path.display()),
            Self::Symlink { target, link } => {
                write!(f, "symlink {} -> {}", link.display(), target.display())
            }
            Self::Bind { source, target } => {
                write!(f, "bind {} on {}", source.display(), target.display())
            }
            Self::Restrict {
                target,
                flags,
                recursive,
            } => {
                let scope = if *recursive { " (recursive)" } else { "" };
                write!(f, "remount {} with {flags:?}{scope}", target.display())
            }
            Self::Proc { target } => write!(f, "mount proc on {}", target.display()),
            Self::PivotRoot { new_root } => write!(f, "pivot_root to {}", new_root.display()),
            Self::WriteFile {
                path,
                contents,
                mode,
                ..
            } => write!(
                f,
                "write {} ({} bytes, mode {mode:o})",
                path.display(),
                contents.0.len()
            ),
        }
    }
}

/// A host path the plan needs could not be inspected.
#[derive(Debug, thiserror::Error)]
#[error("cannot inspect host path {path:?}")]
pub struct PlanError {
    /// The host path.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Device nodes bound from the host: the harmless ones every build expects.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Plans the root of a validated spec (call [`SandboxSpec::validate`] first).
pub fn plan_root(spec: &SandboxSpec, host: &impl HostView) -> Result<Vec<MountOp>, PlanError> {
    let mut plan = Planner {
        root: spec.root_dir.clone(),
        ops: Vec::new(),
        dirs: BTreeSet::new(),
    };
    let no_setuid_no_dev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let read_only = MsFlags::MS_RDONLY | no_setuid_no_dev;

    // A tmpfs root: nothing of the host is visible unless listed, and it is gone with the namespace.
    plan.ops.push(MountOp::Tmpfs {
        target: spec.root_dir.clone(),
        options: "mode=0755".into(),
        flags: no_setuid_no_dev,
    });

    // Binds first, symlinks after: validation forbids nesting, so no mount point is ever created
    // through a bind (which would write to the host) or through a recreated symlink.
    // (sandbox path, host source): the host paths at the same place, or an image's top-level
    // entries except the sandbox's own mount points.
    let sources: Vec<(PathBuf, PathBuf)> = match &spec.image_root {
        None => spec
            .host_paths
            .iter()
            .map(|path| (path.clone(), path.clone()))
            .collect(),
        Some(image_root) => host
            .list(image_root)
            .map_err(|source| PlanError {
                path: image_root.clone(),
                source,
            })?
            .into_iter()
            .map(|name| Path::new("/").join(name))
            .filter(|path| {
                !RESERVED_PATHS
                    .iter()
                    .any(|reserved| Path::new(reserved).starts_with(path))
            })
            .map(|path| {
                let source = image_root.join(path.strip_prefix("/").unwrap_or(&path));
                (path, source)
            })
            .collect(),
    };
    let mut symlinks = Vec::new();
    for (path, source) in &sources {
        let entry = host.entry(source).map_err(|err| PlanError {
            path: source.clone(),
            source: err,
        })?;
        match entry {
            HostEntry::Symlink(target) => symlinks.push((path, target)),
            HostEntry::Directory => {
                plan.dir(path);
                plan.bind(source, path, read_only, true);
            }
            HostEntry::File => {
                plan.file(path);
                plan.bind(source, path, read_only, true);
            }
        }
    }
    for (path, target) in symlinks {
        plan.parent_dirs(path);
        let link = plan.inside(path);
        plan.ops.push(MountOp::Symlink { target, link });
    }

    // Workspaces: inputs read-only, outputs writable; never setuid or device files.
    for workspace in &spec.workspaces {
        let path = Path::new("/workspace").join(&workspace.name);
        plan.dir(&path);
        let flags = match workspace.access {
            Access::ReadOnly => read_only,
            Access::ReadWrite => no_setuid_no_dev,
        };
        plan.bind(&workspace.host_path, &path, flags, true);
    }

    // Minimal /dev: its own tmpfs (nodev, so nothing created there is a device) with single host
    // device nodes bound on empty files: each bind is its own mount and keeps working.
    let dev = Path::new("/dev");
    plan.dir(dev);
    plan.ops.push(MountOp::Tmpfs {
        target: plan.inside(dev),
        options: "mode=0755,size=64k".into(),
        flags: no_setuid_no_dev | MsFlags::MS_NOEXEC,
    });
    for device in DEVICES {
        let path = dev.join(device);
        plan.file(&path);
        plan.bind(&path, &path, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, false);
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        plan.ops.push(MountOp::Symlink {
            target: target.into(),
            link: plan.inside(&dev.join(link)),
        });
    }
    // POSIX shared memory (glibc sem_open, Python multiprocessing): private and size-limited.
    let shm = dev.join("shm");
    plan.dir(&shm);
    plan.ops.push(MountOp::Tmpfs {
        target: plan.inside(&shm),
        options: format!("mode=1777,size={}", spec.tmp_size_bytes),
        flags: no_setuid_no_dev | MsFlags::MS_NOEXEC,
    });
    plan.ops.push(MountOp::Restrict {
        target: plan.inside(dev),
        flags: read_only,
        recursive: false,
    });

    // Its mount point; the procfs itself is mounted last, in the new root (see below).
    let proc = Path::new("/proc");
    plan.dir(proc);

    // Private, size-limited /tmp.
    let tmp = Path::new("/tmp");
    plan.dir(tmp);
    plan.ops.push(MountOp::Tmpfs {
        target: plan.inside(tmp),
        options: format!("mode=1777,size={}", spec.tmp_size_bytes),
        flags: no_setuid_no_dev,
    });

    // Secrets, only for a step that declares some: their own small tmpfs (not the root's, so the
    // values never share a filesystem with anything else), readable by the step's user only, one
    // 0400 file each, then read-only. It vanishes with this mount namespace.
    if !spec.secrets.is_empty() {
        let secrets = Path::new(SECRETS_MOUNT);
        plan.dir(secrets);
        // Host ids (with a user namespace: the step's mapped ids).
        let (owner, group) = spec.host_ids();
        let page = 4096;
        let size = page
            + spec
                .secrets
                .iter()
                .map(|(_, value)| value.len().div_ceil(page).max(1) * page)
                .sum::<usize>();
        plan.ops.push(MountOp::Tmpfs {
            target: plan.inside(secrets),
            options: format!("mode=0500,uid={owner},gid={group},size={size}"),
            flags: no_setuid_no_dev | MsFlags::MS_NOEXEC,
        });
        for (name, value) in &spec.secrets {
            plan.ops.push(MountOp::WriteFile {
                path: plan.inside(&secrets.join(name)),
                contents: SecretBytes(value.as_bytes().to_vec()),
                mode: 0o400,
                uid: owner,
                gid: group,
            });
        }
        plan.ops.push(MountOp::Restrict {
            target: plan.inside(secrets),
            flags: read_only | MsFlags::MS_NOEXEC,
            recursive: false,
        });
    }

    // Switch to the new root and drop every reference to the host's mount tree; then freeze the
    // root tmpfs so the step cannot create files outside /tmp and its output workspaces.
    plan.ops.push(MountOp::PivotRoot {
        new_root: spec.root_dir.clone(),
    });
    plan.ops.push(MountOp::Restrict {
        target: "/".into(),
        flags: read_only,
        recursive: false,
    });

    // A procfs of the new pid namespace: the step sees its own processes only. Only a process in
    // that namespace (pid 1) can mount it, so it is the part of the plan pid 1 applies
    // ([`pid1_part`]), on its mount point in the (read-only) new root; everything before it needs
    // no more than the new mount namespace.
    plan.ops.push(MountOp::Proc {
        target: proc.to_owned(),
    });
    Ok(plan.ops)
}

/// Where the part of `plan` that only pid 1 of the new pid namespace can apply starts: the
/// procfs mount (a procfs shows the pid namespace of whoever mounts it), the last operation. The
/// ops before it (tmpfs root, binds, `/dev`, `/tmp`, secrets, `pivot_root`, the read-only root)
/// only need the step's mount namespace, so the supervisor applies them while pid 1 creates the
/// network namespace.
pub fn pid1_part(plan: &[MountOp]) -> usize {
    plan.iter()
        .position(|op| matches!(op, MountOp::Proc { .. }))
        .unwrap_or(plan.len())
}

struct Planner {
    root: PathBuf,
    ops: Vec<MountOp>,
    dirs: BTreeSet<PathBuf>,
}

impl Planner {
    /// `path` (absolute, sandbox view) as a host path under the root.
    fn inside(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    fn dir(&mut self, path: &Path) {
        self.parent_dirs(path);
        if self.dirs.insert(path.to_owned()) {
            self.ops.push(MountOp::MakeDir {
                path: self.inside(path),
            });
        }
    }

    fn parent_dirs(&mut self, path: &Path) {
        if let Some(parent) = path.parent()
            && parent != Path::new("/")
        {
            self.dir(parent);
        }
    }

    fn file(&mut self, path: &Path) {
        self.parent_dirs(path);
        self.ops.push(MountOp::MakeFile {
            path: self.inside(path),
        });
    }

    fn bind(&mut self, source: &Path, path: &Path, flags: MsFlags, recursive: bool) {
        let target = self.inside(path);
        self.ops.push(MountOp::Bind {
            source: source.to_owned(),
            target: target.clone(),
        });
        self.ops.push(MountOp::Restrict {
            target,
            flags,
            recursive,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::spec::tests::sample;

    struct FakeHost;
    impl HostView for FakeHost {
        fn entry(&self, path: &Path) -> io::Result<HostEntry> {
            match path.to_str() {
                Some("/bin") => Ok(HostEntry::Symlink("usr/bin".into())),
                Some("/etc/ld.so.cache") => Ok(HostEntry::File),
                Some("/missing") => Err(io::Error::from(io::ErrorKind::NotFound)),
                Some(p) if p.starts_with("/images/x/root/") => match &p[15..] {
                    "bin" => Ok(HostEntry::Symlink("usr/bin".into())),
                    "marker" => Ok(HostEntry::File),
                    _ => Ok(HostEntry::Directory),
                },
                _ => Ok(HostEntry::Directory),
            }
        }

        fn list(&self, dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
            assert_eq!(dir, Path::new("/images/x/root"));
            Ok([
                "bin",
                "dev",
                "etc",
                "marker",
                "proc",
                "run",
                "tmp",
                "usr",
                "workspace",
            ]
            .into_iter()
            .map(Into::into)
            .collect())
        }
    }

    fn position(plan: &[MountOp], wanted: &MountOp) -> usize {
        plan.iter()
            .position(|op| op == wanted)
            .unwrap_or_else(|| panic!("{wanted} not in plan: {plan:#?}"))
    }

    #[test]
    fn root_is_tmpfs_first_and_read_only_last() {
        let plan = plan_root(&sample(), &FakeHost).unwrap();
        assert!(
            matches!(&plan[0], MountOp::Tmpfs { target, .. } if target == Path::new("/run/kiln/root"))
        );
        // Then only pid 1's /proc, mounted in the new root.
        assert_eq!(
            plan[plan.len() - 3],
            MountOp::PivotRoot {
                new_root: "/run/kiln/root".into()
            }
        );
        assert_eq!(
            plan[plan.len() - 2],
            MountOp::Restrict {
                target: "/".into(),
                flags: MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                recursive: false
            }
        );
    }

    #[test]
    fn host_paths_are_bound_read_only_and_symlinks_recreated() {
        let plan = plan_root(&sample(), &FakeHost).unwrap();
        let bind = position(
            &plan,
            &MountOp::Bind {
                source: "/usr".into(),
                target: "/run/kiln/root/usr".into(),
            },
        );
        let restrict = position(
            &plan,
            &MountOp::Restrict {
                target: "/run/kiln/root/usr".into(),
                flags: MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                recursive: true,
            },
        );
        assert!(bind < restrict);
        position(
            &plan,
            &MountOp::Symlink {
                target: "usr/bin".into(),
                link: "/run/kiln/root/bin".into(),
            },
        );
        let etc = position(
            &plan,
            &MountOp::MakeDir {
                path: "/run/kiln/root/etc".into(),
            },
        );
        let file = position(
            &plan,
            &MountOp::MakeFile {
                path: "/run/kiln/root/etc/ld.so.cache".into(),
            },
        );
        assert!(etc < file);
        assert!(
            !plan.iter().any(
                |op| matches!(op, MountOp::Bind { source, .. } if source == Path::new("/bin"))
            )
        );
    }

    #[test]
    fn workspaces_follow_their_access() {
        let plan = plan_root(&sample(), &FakeHost).unwrap();
        position(
            &plan,
            &MountOp::Restrict {
                target: "/run/kiln/root/workspace/src".into(),
                flags: MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                recursive: true,
            },
        );
        position(
            &plan,
            &MountOp::Restrict {
                target: "/run/kiln/root/workspace/out".into(),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                recursive: true,
            },
        );
    }

    #[test]
    fn pid1_only_mounts_proc_in_the_new_root() {
        for secrets in [true, false] {
            let mut spec = sample();
            if !secrets {
                spec.secrets.clear();
            }
            let plan = plan_root(&spec, &FakeHost).unwrap();
            let split = pid1_part(&plan);
            assert_eq!(
                &plan[split..],
                &[MountOp::Proc {
                    target: "/proc".into()
                }]
            );
            // The supervisor's part: everything else, its mount point included.
            position(
                &plan[..split],
                &MountOp::MakeDir {
                    path: "/run/kiln/root/proc".into(),
                },
            );
        }
    }

    #[test]
    fn every_directory_is_created_once_before_use() {
        let plan = plan_root(&sample(), &FakeHost).unwrap();
        let mut seen = BTreeSet::new();
        for op in &plan {
            if let MountOp::MakeDir { path } = op {
                assert!(
                    seen.insert(path.clone()),
                    "{} created twice",
                    path.display()
                );
            }
        }
        assert!(seen.contains(Path::new("/run/kiln/root/workspace")));
        let mount_point = position(
            &plan,
            &MountOp::MakeDir {
                path: "/run/kiln/root/proc".into(),
            },
        );
        let proc = position(
            &plan,
            &MountOp::Proc {
                target: "/proc".into(),
            },
        );
        assert!(mount_point < proc);
    }

    #[test]
    fn secrets_get_their_own_read_only_tmpfs() {
        let plan = plan_root(&sample(), &FakeHost).unwrap();
        let mount = position(
            &plan,
            &MountOp::Tmpfs {
                target: "/run/kiln/root/run/secrets".into(),
                options: "mode=0500,uid=65534,gid=65534,size=8192".into(),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            },
        );
        let write = plan
            .iter()
            .position(|op| matches!(op, MountOp::WriteFile { path, mode: 0o400, uid: 65534, .. } if path == Path::new("/run/kiln/root/run/secrets/API_TOKEN")))
            .unwrap();
        let freeze = position(
            &plan,
            &MountOp::Restrict {
                target: "/run/kiln/root/run/secrets".into(),
                flags: MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                recursive: false,
            },
        );
        let pivot = position(
            &plan,
            &MountOp::PivotRoot {
                new_root: "/run/kiln/root".into(),
            },
        );
        assert!(mount < write && write < freeze && freeze < pivot);
        // The value never shows in the plan's Debug or Display.
        assert!(!format!("{plan:?}").contains("t0ps3cret"));
        assert!(!plan[write].to_string().contains("t0ps3cret"));
        let mut spec = sample();
        spec.secrets.clear();
        let plan = plan_root(&spec, &FakeHost).unwrap();
        assert!(!plan.iter().any(|op| op.to_string().contains("secrets")));
    }

    #[test]
    fn image_top_level_replaces_host_paths_and_kiln_keeps_its_mount_points() {
        let mut spec = sample();
        spec.host_paths.clear();
        spec.image_root = Some("/images/x/root".into());
        let plan = plan_root(&spec, &FakeHost).unwrap();
        let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        for (source, target) in [
            ("/images/x/root/usr", "/run/kiln/root/usr"),
            ("/images/x/root/etc", "/run/kiln/root/etc"),
            ("/images/x/root/marker", "/run/kiln/root/marker"),
        ] {
            let bind = position(
                &plan,
                &MountOp::Bind {
                    source: source.into(),
                    target: target.into(),
                },
            );
            let restrict = position(
                &plan,
                &MountOp::Restrict {
                    target: target.into(),
                    flags: ro,
                    recursive: true,
                },
            );
            assert!(bind < restrict);
        }
        position(
            &plan,
            &MountOp::Symlink {
                target: "usr/bin".into(),
                link: "/run/kiln/root/bin".into(),
            },
        );
        // The image's dev, proc, run, tmp and workspace are never bound; nothing of the host is.
        for op in &plan {
            if let MountOp::Bind { source, .. } = op {
                let source = source.to_str().unwrap();
                assert!(
                    source.starts_with("/images/x/root/")
                        && ["dev", "proc", "run", "tmp", "workspace"]
                            .iter()
                            .all(|r| !source.ends_with(&format!("root/{r}")))
                        || source.starts_with("/var/lib/kiln/ws/")
                        || source.starts_with("/dev/"),
                    "{op}"
                );
            }
        }
    }

    #[test]
    fn missing_host_path_names_it() {
        let mut spec = sample();
        spec.host_paths.push("/missing".into());
        let err = plan_root(&spec, &FakeHost).unwrap_err();
        assert_eq!(err.path, Path::new("/missing"));
    }
}
