//! "Materials actually used": the environment files a step executed or opened for reading
//! (its toolchain, libraries, headers, configuration), each with its sha256, for the trace
//! summary and the signed runtime-trace predicate.
//!
//! Which files: every program the step exec'd (the resolved executable, the interpreter of a
//! script) and every file it opened read-only with success, at an absolute path outside the
//! step's own trees ([`EXCLUDED`]: its workspaces, its private `/tmp`, the pseudo filesystems,
//! the secrets mount, whose digests could help guess a low-entropy secret).
//!
//! How: kilnd hashes them after the step, from the host. The sandbox binds host paths read-only
//! at the same path (sandbox/rootfs.rs), so the path the step saw names the same file on the
//! host. The digest is of the content when kilnd reads it, not at the moment of access: the
//! bind is read-only for the step, but the host could change a file in between (the in-toto
//! runtime-trace spec's own caveat for asynchronous monitors). Hashes are cached by (device,
//! inode, size, mtime, ctime), so a toolchain is read once per change, not once per step.
//!
//! Caps (documented in docs/trace.md): [`MAX_MATERIALS`] files listed, files up to
//! [`MAX_FILE_BYTES`], [`MAX_STEP_BYTES`] read per step (cache hits are free). What a cap,
//! a non-regular file or an unreadable path leaves out is counted in `materialsOmitted`;
//! directories opened for reading (listings) are not materials and not counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use kiln_common::Digest;
use kiln_common::trace::Material;

/// Most materials listed per step.
pub const MAX_MATERIALS: usize = 4096;
/// Largest file hashed.
pub const MAX_FILE_BYTES: u64 = 512 << 20;
/// Most bytes read (cache misses) per step.
pub const MAX_STEP_BYTES: u64 = 2 << 30;
/// Paths (and everything below them) that are not environment files.
pub const EXCLUDED: &[&str] = &[
    "/workspace",
    "/tmp",
    "/proc",
    "/sys",
    "/dev",
    crate::sandbox::spec::SECRETS_MOUNT,
];
/// Cached digests kept at most (the cache is cleared when full).
const CACHE_ENTRIES: usize = 65_536;

/// How a step used a material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Use {
    Exec,
    Read,
}

impl Use {
    fn as_str(self) -> &'static str {
        match self {
            Use::Exec => "exec",
            Use::Read => "read",
        }
    }
}

/// The candidates of one trace: path -> how it was used.
#[derive(Debug, Default)]
pub struct Candidates(BTreeMap<String, BTreeSet<Use>>);

impl Candidates {
    /// Adds `path` if it is an absolute path outside [`EXCLUDED`].
    pub fn add(&mut self, path: &str, how: Use) {
        if is_environment_file(path) {
            self.0.entry(path.to_owned()).or_default().insert(how);
        }
    }

    /// Number of distinct candidates.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Hashes the candidates (sorted by path) within the caps; returns the materials and how
    /// many candidates were left out.
    pub fn hash(&self) -> (Vec<Material>, u64) {
        let mut materials = Vec::new();
        let mut omitted = 0u64;
        let mut budget = MAX_STEP_BYTES;
        for (path, uses) in &self.0 {
            if materials.len() >= MAX_MATERIALS {
                omitted += 1;
                continue;
            }
            match hash_file(Path::new(path), &mut budget) {
                Hashed::File(digest, size) => materials.push(Material {
                    path: path.clone(),
                    sha256: digest.hex(),
                    size,
                    used_as: uses.iter().map(|u| u.as_str().to_owned()).collect(),
                }),
                Hashed::Directory => {}
                Hashed::Omitted => omitted += 1,
            }
        }
        (materials, omitted)
    }
}

/// Whether `path` is an environment file: absolute, and not in or under an [`EXCLUDED`] path.
pub fn is_environment_file(path: &str) -> bool {
    path.starts_with('/')
        && path != "/"
        && !EXCLUDED.iter().any(|excluded| {
            path.strip_prefix(excluded)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

/// (dev, ino, size, mtime ns, ctime ns): a file's identity and version.
type FileVersion = (u64, u64, u64, i128, i128);

static CACHE: Mutex<Option<HashMap<FileVersion, Digest>>> = Mutex::new(None);

/// What hashing one candidate gave.
enum Hashed {
    /// sha256 and size of a regular file.
    File(Digest, u64),
    /// A directory opened for reading (a listing): not a material, not counted as omitted.
    Directory,
    /// Unreadable, not a regular file, or over a cap.
    Omitted,
}

/// Hashes the regular file at `path`, from the cache or read within `budget`.
fn hash_file(path: &Path, budget: &mut u64) -> Hashed {
    let Ok(file) = File::open(path) else {
        return Hashed::Omitted;
    };
    let Ok(meta) = file.metadata() else {
        return Hashed::Omitted;
    };
    if meta.is_dir() {
        return Hashed::Directory;
    }
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return Hashed::Omitted;
    }
    let version: FileVersion = (
        meta.dev(),
        meta.ino(),
        meta.len(),
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
    );
    let cached = CACHE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|cache| cache.get(&version).copied());
    if let Some(digest) = cached {
        return Hashed::File(digest, meta.len());
    }
    if meta.len() > *budget {
        return Hashed::Omitted;
    }
    *budget -= meta.len();
    let Ok(digest) = Digest::of_reader(std::io::BufReader::with_capacity(1 << 16, file)) else {
        return Hashed::Omitted;
    };
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(version, digest);
    Hashed::File(digest, meta.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_trees_pseudo_filesystems_and_secrets_are_not_materials() {
        for path in [
            "/workspace/src/a.c",
            "/workspace",
            "/tmp/x",
            "/proc/self/maps",
            "/dev/null",
            "/sys/kernel/mm",
            "/run/secrets/token",
            "relative/path",
            "/",
        ] {
            assert!(!is_environment_file(path), "{path}");
        }
        for path in [
            "/usr/bin/gcc",
            "/etc/ld.so.cache",
            "/tmpfoo/x",
            "/workspaces/x",
        ] {
            assert!(is_environment_file(path), "{path}");
        }
    }

    #[test]
    fn materials_are_hashed_with_their_uses_and_unhashable_ones_counted() {
        let dir = tempfile::tempdir().unwrap();
        // tempdir is under /tmp, which is excluded: hash through the private helper instead of
        // Candidates::add, and check add's filter separately above.
        let file = dir.path().join("tool");
        std::fs::write(&file, b"abc").unwrap();
        let mut candidates = Candidates::default();
        let path = file.to_str().unwrap().to_owned();
        candidates
            .0
            .entry(path.clone())
            .or_default()
            .extend([Use::Read, Use::Exec]);
        candidates
            .0
            .entry(dir.path().to_str().unwrap().to_owned())
            .or_default()
            .insert(Use::Read);
        candidates
            .0
            .entry(dir.path().join("missing").to_str().unwrap().to_owned())
            .or_default()
            .insert(Use::Read);
        let (materials, omitted) = candidates.hash();
        assert_eq!(
            omitted, 1,
            "a missing file is counted, a directory is not a material"
        );
        assert_eq!(materials.len(), 1);
        assert_eq!(materials[0].path, path);
        assert_eq!(
            materials[0].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(materials[0].size, 3);
        assert_eq!(materials[0].used_as, ["exec", "read"]);
        // Changed content, same path: the cache must not answer with the old digest.
        std::fs::write(&file, b"abcd").unwrap();
        let (materials, _) = candidates.hash();
        assert_ne!(
            materials[0].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
