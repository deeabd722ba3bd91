//! Materializing an image once per node: `<state>/images/<hex>/root`, a root-owned tree written to
//! a temporary directory, every file's bytes hashed while they are copied out of the CAS and
//! compared with the manifest, then renamed into place. A tree that exists was complete and
//! verified when it was renamed; a blob that no longer matches its digest stops the step with the
//! file and digest named, and nothing is left behind.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_common::Digest;
use kiln_common::digest::Hasher;

use super::ImageError;
use super::manifest::{EntryType, Manifest};
use crate::sandbox::spec::RESERVED_PATHS;
use crate::store::{Cas, CasError};

/// An image ready to be a step's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterializedImage {
    /// The image (manifest digest).
    pub digest: Digest,
    /// The tree on the host (`<state>/images/<hex>/root`).
    pub root: PathBuf,
    /// Top-level directories and files the sandbox binds (sandbox paths, e.g. `/usr`); symlinks
    /// and the sandbox's own mount points (`/dev`, `/proc`, `/tmp`, `/workspace`, `/run`) are not
    /// listed. These are the Landlock read+execute rules of the step.
    pub bound: Vec<PathBuf>,
}

/// True if the top-level name `name` is one of the sandbox's own mount points (or holds one).
pub fn reserved_top_level(name: &str) -> bool {
    RESERVED_PATHS.iter().any(|reserved| {
        reserved
            .trim_start_matches('/')
            .split('/')
            .next()
            .is_some_and(|top| top == name)
    })
}

/// Loads the verified manifest of `digest` from the CAS.
pub fn load_manifest(cas: &Cas, digest: &Digest) -> Result<Manifest, ImageError> {
    let bytes = cas.get(digest).map_err(|source| ImageError::Blob {
        image: *digest,
        what: "manifest".into(),
        source: Box::new(source),
    })?;
    Manifest::parse(&bytes).map_err(|source| ImageError::Manifest {
        image: *digest,
        source,
    })
}

/// The image's tree, materializing it first if this node has not yet (blocking).
pub fn ensure(
    cas: &Cas,
    images_dir: &Path,
    digest: &Digest,
) -> Result<MaterializedImage, ImageError> {
    let manifest = load_manifest(cas, digest)?;
    let final_dir = images_dir.join(digest.hex());
    let root = final_dir.join("root");
    let bound = manifest
        .top_level()
        .filter(|e| e.kind != EntryType::Symlink && !reserved_top_level(&e.path))
        .map(|e| Path::new("/").join(&e.path))
        .collect();
    let image = MaterializedImage {
        digest: *digest,
        root: root.clone(),
        bound,
    };
    if fs::symlink_metadata(&root).is_ok_and(|m| m.is_dir()) {
        return Ok(image);
    }
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Io { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(images_dir)
        .map_err(io_err(images_dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(images_dir)
        .map_err(io_err(images_dir))?;
    let tmp_root = tmp.path().join("root");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_root)
        .map_err(io_err(&tmp_root))?;
    write_tree(cas, digest, &manifest, &tmp_root)?;
    // The tree is complete and verified: make it the node's copy. The image directory itself
    // stays 0700 root (the sandbox reaches the tree through bind mounts made as root).
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700))
        .map_err(io_err(tmp.path()))?;
    let tmp_path = tmp.keep();
    match fs::rename(&tmp_path, &final_dir) {
        Ok(()) => {}
        // Another step materialized it first: theirs is as good; drop ours.
        Err(err)
            if matches!(err.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY))
                && root.is_dir() =>
        {
            let _ = fs::remove_dir_all(&tmp_path);
        }
        Err(source) => {
            let _ = fs::remove_dir_all(&tmp_path);
            return Err(ImageError::Io {
                path: final_dir,
                source,
            });
        }
    }
    if let Ok(dir) = fs::File::open(images_dir) {
        let _ = dir.sync_all();
    }
    tracing::info!(image = %digest, root = %root.display(), "image materialized");
    Ok(image)
}

/// Creates every entry under `root` (a fresh, empty directory). Paths come from a validated
/// manifest: every parent is a directory created here before its children, so nothing is ever
/// created through a symlink (and `O_NOFOLLOW | O_EXCL` would refuse it anyway).
fn write_tree(
    cas: &Cas,
    image: &Digest,
    manifest: &Manifest,
    root: &Path,
) -> Result<(), ImageError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Io { path, source }
    };
    for entry in &manifest.entries {
        let path = root.join(&entry.path);
        match entry.kind {
            EntryType::Dir => {
                // Owner-writable until every child exists; final modes are set below.
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io_err(&path))?;
            }
            EntryType::Symlink => {
                let target = entry.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(target, &path).map_err(io_err(&path))?;
            }
            EntryType::File => {
                let (Some(digest), Some(size)) = (entry.digest, entry.size) else {
                    continue;
                };
                copy_verified(
                    cas,
                    image,
                    &entry.path,
                    &digest,
                    size,
                    &path,
                    entry.mode_bits(),
                )?;
            }
        }
    }
    // Directories last, deepest first: their modes no longer matter to the writes above.
    // Write bits are dropped everywhere: the tree is read-only, also on the host.
    for entry in manifest.entries.iter().rev() {
        if entry.kind == EntryType::Dir {
            let path = root.join(&entry.path);
            fs::set_permissions(&path, fs::Permissions::from_mode(entry.mode_bits() & 0o555))
                .map_err(io_err(&path))?;
        }
    }
    fs::set_permissions(root, fs::Permissions::from_mode(0o555)).map_err(io_err(root))?;
    Ok(())
}

/// Copies blob `digest` to `dest`, hashing the bytes as they are written: what lands in the tree
/// is exactly what was hashed (no window between a check and the copy).
fn copy_verified(
    cas: &Cas,
    image: &Digest,
    entry: &str,
    digest: &Digest,
    size: u64,
    dest: &Path,
    mode: u32,
) -> Result<(), ImageError> {
    let blob_error = |source| ImageError::Blob {
        image: *image,
        what: format!("file {entry:?}"),
        source: Box::new(source),
    };
    let src_path = cas.path_of(digest);
    let mut src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&src_path)
        .map_err(|e| {
            blob_error(if e.kind() == io::ErrorKind::NotFound {
                CasError::NotFound(*digest)
            } else {
                CasError::Io {
                    path: src_path.clone(),
                    source: e,
                }
            })
        })?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dest)
        .map_err(|source| ImageError::Io {
            path: dest.to_owned(),
            source,
        })?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(|source| ImageError::Io {
            path: src_path.clone(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        written += n as u64;
        out.write_all(&buf[..n]).map_err(|source| ImageError::Io {
            path: dest.to_owned(),
            source,
        })?;
    }
    let actual = hasher.finish();
    if actual != *digest || written != size {
        return Err(blob_error(CasError::Corrupt {
            digest: *digest,
            path: src_path,
            actual,
        }));
    }
    // Read-only for everyone; the owner is root (kilnd).
    out.set_permissions(fs::Permissions::from_mode(mode & 0o555))
        .map_err(|source| ImageError::Io {
            path: dest.to_owned(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::import::read_tar;

    fn image(cas: &Cas) -> Digest {
        let mut b = tar::Builder::new(Vec::new());
        let mut add =
            |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(mode);
                h.set_size(data.len() as u64);
                h.set_path(path).unwrap();
                if let Some(link) = link {
                    h.set_link_name(link).unwrap();
                }
                h.set_cksum();
                b.append(&h, data).unwrap();
            };
        add(
            "etc/marker",
            tar::EntryType::Regular,
            0o644,
            b"in the image",
            None,
        );
        add("usr/bin/tool", tar::EntryType::Regular, 0o755, b"#!x", None);
        add("bin", tar::EntryType::Symlink, 0o777, b"", Some("usr/bin"));
        add("tmp", tar::EntryType::Directory, 0o1777, b"", None);
        let tar = b.into_inner().unwrap();
        let manifest = read_tar(cas, &tar[..]).unwrap().manifest;
        cas.put_bytes(&manifest.to_bytes()).unwrap()
    }

    #[test]
    fn materializes_once_read_only_and_lists_what_the_sandbox_binds() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(&dir.path().join("cas")).unwrap();
        let d = image(&cas);
        let images = dir.path().join("images");
        let m = ensure(&cas, &images, &d).unwrap();
        assert_eq!(m.root, images.join(d.hex()).join("root"));
        assert_eq!(m.bound, [PathBuf::from("/etc"), PathBuf::from("/usr")]);
        assert_eq!(
            fs::read(m.root.join("etc/marker")).unwrap(),
            b"in the image"
        );
        assert_eq!(
            fs::read_link(m.root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        let mode = |p: &str| {
            fs::symlink_metadata(m.root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("usr/bin/tool"), 0o555);
        assert_eq!(mode("etc/marker"), 0o444);
        assert_eq!(mode("usr"), 0o555);
        // Idempotent, and no temporary directory is left.
        assert_eq!(ensure(&cas, &images, &d).unwrap(), m);
        let names: Vec<_> = fs::read_dir(&images)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(d.hex())]);
    }

    #[test]
    fn a_corrupt_blob_stops_materialization_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(&dir.path().join("cas")).unwrap();
        let d = image(&cas);
        let blob = cas.path_of(&Digest::of(b"in the image"));
        fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&blob, b"in the imagE").unwrap();
        let images = dir.path().join("images");
        let err = crate::error_chain(&ensure(&cas, &images, &d).unwrap_err());
        assert!(
            err.contains(&d.to_string())
                && err.contains("\"etc/marker\"")
                && err.contains("corrupted"),
            "{err}"
        );
        assert_eq!(fs::read_dir(&images).unwrap().count(), 0);
    }
}
