//! Workspace directories of a job: seeding from uploaded source archives and collecting a step's
//! outputs into the CAS without ever following a symlink.

use std::fs;
use std::path::{Component, Path, PathBuf};

use kiln_common::Digest;
use kiln_common::digest::TreeEntry;

use crate::store::{Cas, CasError};

/// Workspace failures.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// Filesystem error.
    #[error("workspace i/o on {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The source archive holds something other than directories and regular files, or a path
    /// that would land outside the workspace.
    #[error("source archive for workspace {workspace:?}: entry {entry:?} refused: {reason}")]
    ArchiveEntry {
        /// Workspace.
        workspace: String,
        /// Entry path.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A workspace file name that is not UTF-8 cannot be named in a provenance subject.
    #[error("workspace file {path:?} has a name that is not UTF-8")]
    NonUtf8Name {
        /// Path (lossy).
        path: String,
    },
    /// Outputs may only be regular files, directories and symlinks (symlinks are not attested).
    #[error("output {path:?} is a {kind}: only regular files and directories are collected")]
    SpecialFile {
        /// Path relative to the workspace.
        path: String,
        /// File type.
        kind: &'static str,
    },
    /// A setuid or setgid output: whoever unpacks the artifact as root would install a
    /// privilege-granting binary nobody reviewed.
    #[error("output {path:?} has mode {mode:04o}: setuid/setgid files are refused")]
    SetId {
        /// Path relative to the workspace.
        path: String,
        /// Permission bits found.
        mode: u32,
    },
    /// An output with more than one hard link: it may be a link to a host file outside the
    /// workspace, which the step would then attest (and export) as its own output.
    #[error(
        "output {path:?} has {links} hard links: hard-linked outputs are refused (a link may point outside the workspace)"
    )]
    HardLink {
        /// Path relative to the workspace.
        path: String,
        /// Link count.
        links: u64,
    },
    /// Storing a file.
    #[error(transparent)]
    Cas(#[from] CasError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError + '_ {
    move |source| WorkspaceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Unpack a tar archive (as uploaded by `kiln submit`) into an empty directory. Only directories
/// and regular files are accepted; absolute paths, `..` and links are refused. Files end up
/// world-readable (mode bits beyond 0755 are dropped) so the unprivileged build user can read them.
pub fn unpack_source(archive: &[u8], dest: &Path, workspace: &str) -> Result<(), WorkspaceError> {
    let refuse = |entry: &str, reason: &str| WorkspaceError::ArchiveEntry {
        workspace: workspace.to_owned(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let mut ar = tar::Archive::new(archive);
    ar.set_preserve_permissions(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(false);
    let entries = ar
        .entries()
        .map_err(|e| refuse("<archive>", &e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| refuse("<archive>", &e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| refuse("<archive>", &e.to_string()))?
            .into_owned();
        let shown = path.to_string_lossy().into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(refuse(&shown, "path must be relative without '..'"));
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(refuse(
                &shown,
                "only regular files and directories are allowed",
            ));
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
        entry.set_mask(0o022);
        let ok = entry
            .unpack_in(dest)
            .map_err(|e| refuse(&shown, &e.to_string()))?;
        if !ok {
            return Err(refuse(&shown, "path escapes the workspace"));
        }
        if kind.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let target = dest.join(&path);
            fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o444))
                .map_err(io(&target))?;
        }
    }
    Ok(())
}

/// What [`collect`] found.
#[derive(Debug, Default)]
pub struct Collected {
    /// Regular files (sorted by path) with their digests.
    pub entries: Vec<TreeEntry>,
    /// Symlinks seen and not followed: `path -> target`.
    pub skipped_symlinks: Vec<String>,
}

/// Hash every regular file under `root` (and store it in `cas` if given). Symlinks are never
/// followed: walkdir does not descend through them and files are opened with `O_NOFOLLOW`.
/// Device nodes, fifos, sockets, setuid/setgid files and files with more than one hard link are
/// refused, naming the file. (Collection runs after the step's teardown, so no step process can
/// change a file between these checks and the hashing.)
pub fn collect(root: &Path, cas: Option<&Cas>) -> Result<Collected, WorkspaceError> {
    let mut out = Collected::default();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let path = e.path().map_or_else(|| root.to_owned(), Path::to_path_buf);
            WorkspaceError::Io {
                path,
                source: e.into(),
            }
        })?;
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let rel_str = rel
            .to_str()
            .ok_or_else(|| WorkspaceError::NonUtf8Name {
                path: rel.to_string_lossy().into_owned(),
            })?
            .to_owned();
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        if ft.is_symlink() {
            let target = fs::read_link(entry.path()).map_err(io(entry.path()))?;
            out.skipped_symlinks
                .push(format!("{rel_str} -> {}", target.display()));
            continue;
        }
        if !ft.is_file() {
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_block_device() || ft.is_char_device() {
                "device node"
            } else {
                "special file"
            };
            return Err(WorkspaceError::SpecialFile {
                path: rel_str,
                kind,
            });
        }
        // walkdir's metadata is lstat (links are not followed).
        let meta = entry.metadata().map_err(|e| WorkspaceError::Io {
            path: entry.path().to_owned(),
            source: e.into(),
        })?;
        {
            use std::os::unix::fs::MetadataExt;
            let mode = meta.mode() & 0o7777;
            if mode & 0o6000 != 0 {
                return Err(WorkspaceError::SetId {
                    path: rel_str,
                    mode,
                });
            }
            if meta.nlink() > 1 {
                return Err(WorkspaceError::HardLink {
                    path: rel_str,
                    links: meta.nlink(),
                });
            }
        }
        let digest = if let Some(cas) = cas {
            cas.put_file(entry.path())?.0
        } else {
            let f = fs::File::open(entry.path()).map_err(io(entry.path()))?;
            Digest::of_reader(f).map_err(io(entry.path()))?
        };
        out.entries.push(TreeEntry {
            path: rel_str,
            digest,
        });
    }
    out.entries.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn unpack_and_collect_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ar = tar_of(&[("a.c", b"int main;"), ("sub/b.h", b"#pragma once")]);
        unpack_source(&ar, dir.path(), "src").unwrap();
        let c = collect(dir.path(), None).unwrap();
        let paths: Vec<_> = c.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a.c", "sub/b.h"]);
        assert_eq!(c.entries[0].digest, Digest::of(b"int main;"));
    }

    #[test]
    fn unpack_refuses_escapes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        // tar::Builder refuses to write "..", so craft the header name by hand.
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..9].copy_from_slice(b"../evil.c");
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[b'x'; 512]);
        raw.extend_from_slice(&[0u8; 1024]);
        let err = unpack_source(&raw, dir.path(), "src").unwrap_err();
        assert!(err.to_string().contains("../evil.c"), "{err}");
        assert!(!dir.path().parent().unwrap().join("evil.c").exists());

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", "/etc/shadow").unwrap();
        let err = unpack_source(&b.into_inner().unwrap(), dir.path(), "src").unwrap_err();
        assert!(
            err.to_string()
                .contains("only regular files and directories"),
            "{err}"
        );
    }

    #[test]
    fn collect_never_follows_symlinks_and_refuses_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        fs::write(dir.path().join("ok"), b"ok").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("dirlink")).unwrap();
        let c = collect(dir.path(), None).unwrap();
        assert_eq!(c.entries.len(), 1);
        assert_eq!(c.skipped_symlinks.len(), 2);
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = collect(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("fifo"), "{err}");
    }

    #[test]
    fn collect_refuses_setuid_and_setgid_files() {
        use std::os::unix::fs::PermissionsExt;
        for mode in [0o4755, 0o2755] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("ok"), b"ok").unwrap();
            fs::create_dir(dir.path().join("bin")).unwrap();
            let file = dir.path().join("bin/su");
            fs::write(&file, b"#!/bin/sh\n").unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
            let err = collect(dir.path(), None).unwrap_err();
            assert!(
                matches!(&err, WorkspaceError::SetId { path, mode: m } if path == "bin/su" && *m == mode),
                "{err}"
            );
            assert!(err.to_string().contains("bin/su"), "{err}");
        }
    }

    #[test]
    fn collect_refuses_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // A link to a file outside the workspace (the attack) ...
        fs::write(outside.path().join("host-secret"), b"s").unwrap();
        fs::hard_link(outside.path().join("host-secret"), dir.path().join("copy")).unwrap();
        let err = collect(dir.path(), None).unwrap_err();
        assert!(
            matches!(&err, WorkspaceError::HardLink { path, links: 2 } if path == "copy"),
            "{err}"
        );
        assert!(err.to_string().contains("\"copy\""), "{err}");
        // ... and, indistinguishably, two names inside it.
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"a").unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let err = collect(dir.path(), None).unwrap_err();
        assert!(matches!(err, WorkspaceError::HardLink { .. }), "{err}");
    }

    #[test]
    fn collect_refuses_device_nodes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: mknod of a device node needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        nix::sys::stat::mknod(
            &dir.path().join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        let err = collect(dir.path(), None).unwrap_err();
        assert!(
            err.to_string().contains("\"null\" is a device node"),
            "{err}"
        );
    }
}
