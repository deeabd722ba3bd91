//! Materializing an image once per node: `<state>/images/<hex>/root`, a root-owned tree written to
//! a temporary directory, every file's bytes hashed while they are copied out of the CAS and
//! compared with the manifest, then renamed into place. A tree that exists was complete and
//! verified when it was renamed; a blob that no longer matches its digest stops the step with the
//! file and digest named, and nothing is left behind.
//!
//! Disk use: files with the same content and permission bits (hard links in the imported tar,
//! or identical files) are written once and hard-linked, so a tar of one file and many links to
//! it takes the disk of one file; the tree is read-only, so sharing an inode changes nothing a
//! step can see. Before writing, the free space and inodes of the images directory are checked
//! against what the tree needs, and a tree that does not fit is refused with both figures.

use std::collections::HashMap;
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
    check_free_space(digest, &manifest, images_dir)?;
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

/// Space kept free on the images filesystem beyond the tree itself (directories, metadata,
/// other writers): a tree is refused if writing it would leave less than this.
const FREE_SPACE_MARGIN: u64 = 64 << 20;

/// What writing the tree takes: bytes of its distinct files (see [`file_key`]), rounded up to
/// 4 KiB blocks, plus a block per directory and symlink; and one inode per directory, symlink
/// and distinct file.
fn space_needed(manifest: &Manifest) -> (u64, u64) {
    const BLOCK: u64 = 4096;
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    for entry in &manifest.entries {
        match (entry.kind, file_key(entry)) {
            (EntryType::File, Some(key)) => {
                if seen.insert(key) {
                    bytes = bytes.saturating_add(key.1.div_ceil(BLOCK) * BLOCK);
                    inodes += 1;
                }
            }
            (EntryType::File, None) => {}
            _ => {
                bytes = bytes.saturating_add(BLOCK);
                inodes += 1;
            }
        }
    }
    (bytes, inodes)
}

/// Refuses a tree that does not fit in the free space (and inodes) of `images_dir`'s filesystem.
fn check_free_space(
    image: &Digest,
    manifest: &Manifest,
    images_dir: &Path,
) -> Result<(), ImageError> {
    let (needed, inodes) = space_needed(manifest);
    let st = nix::sys::statvfs::statvfs(images_dir).map_err(|errno| ImageError::Io {
        path: images_dir.to_owned(),
        source: errno.into(),
    })?;
    // The space an unprivileged writer could use: kilnd should not eat the root reserve either.
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    let free_inodes = st.files_available();
    // Some filesystems (btrfs, tmpfs with nr_inodes=0) report 0 total inodes: no inode limit.
    let inode_limited = st.files() > 0;
    if needed.saturating_add(FREE_SPACE_MARGIN) > free || (inode_limited && inodes > free_inodes) {
        return Err(ImageError::NoSpace {
            image: *image,
            path: images_dir.to_owned(),
            needed: needed.saturating_add(FREE_SPACE_MARGIN),
            inodes,
            free,
            free_inodes,
        });
    }
    Ok(())
}

/// Files that may share one inode: same content and same (read-only) permission bits.
fn file_key(entry: &super::manifest::Entry) -> Option<(Digest, u64, u32)> {
    match (entry.kind, entry.digest, entry.size) {
        (EntryType::File, Some(digest), Some(size)) => {
            Some((digest, size, entry.mode_bits() & 0o555))
        }
        _ => None,
    }
}

/// Creates every entry under `root` (a fresh, empty directory). Paths come from a validated
/// manifest: every parent is a directory created here before its children, so nothing is ever
/// created through a symlink (and `O_NOFOLLOW | O_EXCL` would refuse it anyway). A file whose
/// content and mode were already written is a hard link to that first copy.
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
    let mut written: HashMap<(Digest, u64, u32), PathBuf> = HashMap::new();
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
                let Some(key @ (digest, size, _)) = file_key(entry) else {
                    continue;
                };
                if let Some(first) = written.get(&key) {
                    // The first copy was verified against the same digest when it was written.
                    fs::hard_link(first, &path).map_err(io_err(&path))?;
                    continue;
                }
                copy_verified(
                    cas,
                    image,
                    &entry.path,
                    &digest,
                    size,
                    &path,
                    entry.mode_bits(),
                )?;
                written.insert(key, path);
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
        let manifest = read_tar(cas, &tar[..], u64::MAX).unwrap().manifest;
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

    /// An image of `files` (path, content) plus hard links (path, target), as imported.
    fn image_of(cas: &Cas, files: &[(String, Vec<u8>)], links: &[(String, &str)]) -> Digest {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_path(path).unwrap();
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
        }
        for (path, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Link);
            h.set_mode(0o644);
            h.set_size(0);
            h.set_path(path).unwrap();
            h.set_link_name(target).unwrap();
            h.set_cksum();
            b.append(&h, &b""[..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let manifest = read_tar(cas, &tar[..], u64::MAX).unwrap().manifest;
        cas.put_bytes(&manifest.to_bytes()).unwrap()
    }

    fn links_to_big() -> Vec<(String, &'static str)> {
        (0..200).map(|i| (format!("l/{i}"), "big")).collect()
    }

    #[test]
    fn hard_links_and_identical_files_take_the_disk_of_one_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(&dir.path().join("cas")).unwrap();
        // The review's case: 1 MiB and 200 hard links to it (201 MiB if each were a copy), plus
        // an identical file that is not a link in the tar.
        let big = vec![42u8; 1 << 20];
        let d = image_of(
            &cas,
            &[("big".into(), big.clone()), ("same".into(), big.clone())],
            &links_to_big(),
        );
        let m = ensure(&cas, &dir.path().join("images"), &d).unwrap();
        let first = fs::metadata(m.root.join("big")).unwrap();
        assert_eq!(
            first.nlink(),
            202,
            "every copy of the content must be one inode"
        );
        for i in [0, 99, 199] {
            let link = fs::metadata(m.root.join(format!("l/{i}"))).unwrap();
            assert_eq!((link.dev(), link.ino()), (first.dev(), first.ino()));
        }
        assert_eq!(
            fs::metadata(m.root.join("same")).unwrap().ino(),
            first.ino()
        );
        assert_eq!(fs::read(m.root.join("l/7")).unwrap(), big);
        assert_eq!(first.mode() & 0o7777, 0o444);
    }

    /// A tmpfs of `bytes` on a fresh directory, unmounted when dropped (needs root).
    struct SmallFs(tempfile::TempDir);

    impl SmallFs {
        fn mount(bytes: u64) -> Option<Self> {
            if !nix::unistd::geteuid().is_root() {
                assert!(std::env::var("CI").as_deref() != Ok("true"), "needs root");
                eprintln!("SKIP: mounting a small tmpfs needs root");
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            nix::mount::mount(
                Some("kiln-test"),
                dir.path(),
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(format!("size={bytes}").as_str()),
            )
            .unwrap();
            Some(Self(dir))
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn a_tree_that_does_not_fit_is_refused_before_anything_is_written() {
        let Some(small) = SmallFs::mount(100 << 20) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(&dir.path().join("cas")).unwrap();
        let images = small.0.path().join("images");
        // 201 MiB as separate copies: it only fits (with the 64 MiB margin) because the links
        // are materialized as links.
        let linked = image_of(&cas, &[("big".into(), vec![1u8; 1 << 20])], &links_to_big());
        let m = ensure(&cas, &images, &linked).unwrap();
        assert_eq!(fs::metadata(m.root.join("l/5")).unwrap().len(), 1 << 20);
        // 48 distinct 1 MiB files do not fit next to the margin: refused with the figures, and
        // nothing of it is left on the filesystem.
        let files: Vec<(String, Vec<u8>)> = (0..48u8)
            .map(|i| (format!("f{i}"), vec![i; 1 << 20]))
            .collect();
        let distinct = image_of(&cas, &files, &[]);
        let used = || {
            let st = nix::sys::statvfs::statvfs(small.0.path()).unwrap();
            (st.blocks() - st.blocks_free()) * st.fragment_size()
        };
        let before = used();
        let err = ensure(&cas, &images, &distinct).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ImageError::NoSpace { .. }), "{text}");
        assert!(
            text.contains(&distinct.to_string())
                && text.contains("materializing needs")
                && text.contains(&images.display().to_string()),
            "{text}"
        );
        assert_eq!(used(), before, "a refused tree must not be written");
        let names: Vec<_> = fs::read_dir(&images)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(linked.hex())]);
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
