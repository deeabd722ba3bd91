//! Size-capped output workspaces (`[limits] workspace_size` of a profile): the step writes its
//! output workspace on a tmpfs of that size, mounted in kilnd's mount namespace for the step's
//! lifetime, never on the host disk. After the step kilnd checks whether it filled up (the step
//! then fails: "output workspace full: limit 1 GiB"), copies the tree to the on-disk workspace
//! (regular files, directories and symlinks only, never following a link; the outputs were
//! already collected and checked) and unmounts the tmpfs.
//!
//! Layout: the tmpfs is mounted on `<job>/outfs/<step>` and the step's workspace is its
//! subdirectory `ws`, so no mount ever sits at or under a workspace path (the teardown check
//! stays exact). tmpfs pages are charged to the memory cgroup of the process that writes them:
//! the output counts against the step's memory limit as well.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::cgroup::format_bytes;

/// Most inodes of an output tmpfs (each costs kernel memory).
const MAX_INODES: u64 = 1 << 20;

/// A step's output workspace on a size-limited tmpfs; unmounted when dropped.
#[derive(Debug)]
pub struct OutputFs {
    mount_point: PathBuf,
    limit_bytes: u64,
    mounted: bool,
}

/// Failures of the capped workspace.
#[derive(Debug, thiserror::Error)]
pub enum OutputFsError {
    /// A filesystem operation failed.
    #[error("output workspace tmpfs: {what} {path}")]
    Io {
        /// What was done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The step's output holds something that cannot be copied.
    #[error("output workspace: {path} is not a regular file, directory or symlink")]
    Special {
        /// The entry.
        path: PathBuf,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OutputFsError + 'a {
    move |source| OutputFsError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl OutputFs {
    /// Mounts a tmpfs of `limit_bytes` on `mount_point` (created) and prepares its `ws`
    /// subdirectory for the step's user.
    pub fn mount(
        mount_point: &Path,
        limit_bytes: u64,
        uid: u32,
        gid: u32,
    ) -> Result<Self, OutputFsError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(mount_point)
            .map_err(io_err("create", mount_point))?;
        // nosuid/nodev like every workspace; size and inode caps are the point.
        let options = format!("size={limit_bytes},nr_inodes={MAX_INODES},mode=0755");
        nix::mount::mount(
            Some("kiln-output"),
            mount_point,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|errno| OutputFsError::Io {
            what: "mount tmpfs on",
            path: mount_point.to_owned(),
            source: errno.into(),
        })?;
        let fs = Self {
            mount_point: mount_point.to_owned(),
            limit_bytes,
            mounted: true,
        };
        super::prepare_output_dir(&fs.dir(), uid, gid).map_err(|e| OutputFsError::Io {
            what: "prepare",
            path: fs.dir(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(fs)
    }

    /// The directory the step sees as its output workspace.
    pub fn dir(&self) -> PathBuf {
        self.mount_point.join("ws")
    }

    /// The limit in bytes.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// `Some(reason)` if the step filled the tmpfs (no block or no inode left): writes failed
    /// with ENOSPC, so what it produced is incomplete.
    pub fn full(&self) -> Result<Option<String>, OutputFsError> {
        let st =
            nix::sys::statvfs::statvfs(&self.mount_point).map_err(|errno| OutputFsError::Io {
                what: "statvfs",
                path: self.mount_point.clone(),
                source: errno.into(),
            })?;
        let free = st.blocks_available() * st.fragment_size();
        if free < 4096 {
            return Ok(Some(format!(
                "output workspace full: limit {}",
                format_bytes(self.limit_bytes)
            )));
        }
        if st.files_available() == 0 {
            return Ok(Some(format!(
                "output workspace full: limit {MAX_INODES} files"
            )));
        }
        Ok(None)
    }

    /// Copies the output tree to `dest` (an existing empty directory on disk), then unmounts.
    pub fn finish(mut self, dest: &Path) -> Result<(), OutputFsError> {
        copy_tree(&self.dir(), dest)?;
        self.unmount()
    }

    /// After the step's outputs were collected (`keep`) or refused: copy them to `dest` on disk
    /// if kept, unmount either way (off the async runtime). The error is the step's reason.
    pub async fn settle(self, dest: PathBuf, keep: bool) -> Result<(), String> {
        let done = tokio::task::spawn_blocking(move || {
            if keep {
                self.finish(&dest)
            } else {
                let mut this = self;
                this.unmount()
            }
        })
        .await;
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::error_chain(&e)),
            Err(e) => Err(format!("output workspace tmpfs: {e}")),
        }
    }

    fn unmount(&mut self) -> Result<(), OutputFsError> {
        if !self.mounted {
            return Ok(());
        }
        // Every process of the step is gone (teardown verified): nothing keeps it busy. A lazy
        // detach is the fallback so a stray open file never leaves the mount behind.
        let result = nix::mount::umount2(&self.mount_point, MntFlags::empty())
            .or_else(|_| nix::mount::umount2(&self.mount_point, MntFlags::MNT_DETACH));
        result.map_err(|errno| OutputFsError::Io {
            what: "unmount",
            path: self.mount_point.clone(),
            source: errno.into(),
        })?;
        self.mounted = false;
        let _ = fs::remove_dir(&self.mount_point);
        Ok(())
    }
}

/// A step's output workspace as the sandbox writes it: the on-disk directory, or, when the
/// profile sets `[limits] workspace_size`, an [`OutputFs`] of that size in front of it. The one
/// mechanism for a step's first run (`pipeline::run_step`) and for every re-run of it
/// (`pipeline/rebuild.rs`: the second run of a `reproducible = true` step, `kiln rebuild`), so
/// no run of a step can write past the cap onto the host disk.
#[derive(Debug)]
pub struct OutputWorkspace {
    disk: PathBuf,
    capped: Option<OutputFs>,
}

impl OutputWorkspace {
    /// Creates `disk` for the step's user and, with `limit`, mounts the tmpfs on `mount_point`
    /// (which must not be at or under any workspace path). The error is the step's reason.
    pub fn prepare(
        disk: &Path,
        mount_point: &Path,
        limit: Option<u64>,
        uid: u32,
        gid: u32,
    ) -> Result<Self, String> {
        fs::create_dir_all(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
        super::prepare_output_dir(disk, uid, gid).map_err(|e| e.to_string())?;
        let capped = limit
            .map(|limit| OutputFs::mount(mount_point, limit, uid, gid))
            .transpose()
            .map_err(|e| crate::error_chain(&e))?;
        Ok(Self {
            disk: disk.to_owned(),
            capped,
        })
    }

    /// The directory the sandbox binds read-write, and where the outputs are collected from.
    pub fn dir(&self) -> PathBuf {
        self.capped
            .as_ref()
            .map_or_else(|| self.disk.clone(), OutputFs::dir)
    }

    /// After the step: `Some(reason)` ("output workspace full: limit 1 GiB") if it filled its
    /// capped workspace; the step must then fail, its outputs are incomplete.
    pub fn full(&self) -> Option<String> {
        self.capped.as_ref().and_then(|o| o.full().ok().flatten())
    }

    /// After the outputs were collected (`keep`) or refused: a capped tree is copied to the disk
    /// directory if kept, and the tmpfs is unmounted either way.
    pub async fn settle(self, keep: bool) -> Result<(), String> {
        match self.capped {
            Some(capped) => capped.settle(self.disk, keep).await,
            None => Ok(()),
        }
    }
}

impl Drop for OutputFs {
    fn drop(&mut self) {
        if let Err(err) = self.unmount() {
            tracing::warn!(%err, "cannot unmount an output workspace tmpfs");
        }
    }
}

/// Copies `src` into `dest` without following symlinks: directories, regular files (permission
/// bits kept, no setuid/setgid) and symlinks (recreated verbatim), each owned by the same uid/gid
/// as on the tmpfs (so the tree on disk is what an uncapped step would have left); anything else
/// is refused.
fn copy_tree(src: &Path, dest: &Path) -> Result<(), OutputFsError> {
    let mut entries: Vec<_> = fs::read_dir(src)
        .map_err(io_err("list", src))?
        .collect::<Result<_, _>>()
        .map_err(io_err("list", src))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let meta = fs::symlink_metadata(&from).map_err(io_err("stat", &from))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(io_err("readlink", &from))?;
            std::os::unix::fs::symlink(target, &to).map_err(io_err("symlink", &to))?;
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))
                .map_err(io_err("chown", &to))?;
        } else if ft.is_dir() {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&to)
                .map_err(io_err("create", &to))?;
            copy_tree(&from, &to)?;
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))
                .map_err(io_err("chown", &to))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o777))
                .map_err(io_err("chmod", &to))?;
        } else if ft.is_file() {
            copy_file(&from, &to, &meta)?;
        } else {
            return Err(OutputFsError::Special { path: from });
        }
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path, meta: &fs::Metadata) -> Result<(), OutputFsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)
        .map_err(io_err("open", from))?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(io_err("create", to))?;
    io::copy(&mut src, &mut out).map_err(io_err("copy to", to))?;
    // Owner first: chown clears setuid/setgid, and the mode never carries them anyway.
    std::os::unix::fs::fchown(&out, Some(meta.uid()), Some(meta.gid()))
        .map_err(io_err("chown", to))?;
    out.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o777))
        .map_err(io_err("chmod", to))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keeps_modes_and_symlinks_without_following_them() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("bin")).unwrap();
        fs::write(src.path().join("bin/tool"), b"#!").unwrap();
        fs::set_permissions(
            src.path().join("bin/tool"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.path().join("link")).unwrap();
        // The step's files belong to the step's uid on disk too (as root: chown them first).
        let owner = if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::lchown(src.path().join("bin/tool"), Some(65534), Some(65534))
                .unwrap();
            65534
        } else {
            nix::unistd::geteuid().as_raw()
        };
        copy_tree(src.path(), dest.path()).unwrap();
        let meta = fs::metadata(dest.path().join("bin/tool")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o755);
        assert_eq!(meta.uid(), owner, "owner not kept");
        assert_eq!(
            fs::read_link(dest.path().join("link")).unwrap(),
            Path::new("/etc/shadow")
        );
    }

    #[test]
    fn a_full_tmpfs_is_reported_with_its_limit() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "needs root");
            eprintln!("SKIP a_full_tmpfs_is_reported_with_its_limit: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let point = dir.path().join("outfs");
        let ofs = OutputFs::mount(&point, 1 << 20, 65534, 65534).unwrap();
        assert_eq!(ofs.full().unwrap(), None);
        let err = fs::write(ofs.dir().join("fill"), vec![0u8; 2 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            ofs.full().unwrap().as_deref(),
            Some("output workspace full: limit 1 MiB")
        );
        let dest = dir.path().join("disk");
        fs::create_dir(&dest).unwrap();
        ofs.finish(&dest).unwrap();
        assert_eq!(fs::metadata(dest.join("fill")).unwrap().len(), 1 << 20);
        assert!(!point.exists(), "mount point left behind");
    }
}
