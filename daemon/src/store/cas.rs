//! Content-addressed blob store: `cas/sha256/<2 hex>/<64 hex>`, immutable files (mode 0444).
//!
//! Writes go to `cas/tmp/` first, are fsynced, then renamed into place and the directory is
//! fsynced, so a crash leaves either no blob or a complete one. Reads re-hash the content and
//! refuse a blob whose bytes no longer match its name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_common::Digest;
use kiln_common::digest::Hasher;

/// CAS failures.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// Filesystem error on a path.
    #[error("cas i/o on {path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// No blob with that digest.
    #[error("blob {0} not found")]
    NotFound(Digest),
    /// The blob on disk does not hash to its name: disk corruption or tampering.
    #[error("blob {digest} is corrupted on disk ({path}): content hashes to {actual}")]
    Corrupt {
        /// Expected digest (the blob's name).
        digest: Digest,
        /// File.
        path: PathBuf,
        /// What the content hashes to now.
        actual: Digest,
    },
    /// An upload exceeded its size limit.
    #[error("blob larger than the limit of {limit} bytes")]
    TooLarge {
        /// Limit in bytes.
        limit: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CasError + '_ {
    move |source| CasError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The blob store rooted at a directory.
#[derive(Clone, Debug)]
pub struct Cas {
    root: PathBuf,
}

impl Cas {
    /// Open (creating) a CAS under `root`.
    pub fn open(root: &Path) -> Result<Self, CasError> {
        for dir in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        // Leftovers of interrupted writes are never referenced: remove them.
        let tmp = root.join("tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Where the blob `d` lives (whether or not it exists).
    pub fn path_of(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    /// True if the blob exists (content not checked).
    pub fn contains(&self, d: &Digest) -> bool {
        self.path_of(d).is_file()
    }

    /// Store bytes.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, CasError> {
        let mut w = self.writer(None)?;
        w.write_all(bytes)?;
        Ok(w.commit()?.0)
    }

    /// Store a copy of a regular file. The source is opened with `O_NOFOLLOW`: a symlink is refused.
    pub fn put_file(&self, src: &Path) -> Result<(Digest, u64), CasError> {
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
            .map_err(io_err(src))?;
        let mut w = self.writer(None)?;
        io::copy(&mut f, &mut w).map_err(io_err(src))?;
        w.commit()
    }

    /// A streaming writer, optionally capped at `limit` bytes.
    pub fn writer(&self, limit: Option<u64>) -> Result<BlobWriter, CasError> {
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(self.root.join("tmp"))
            .map_err(io_err(&self.root.join("tmp")))?;
        Ok(BlobWriter {
            cas: self.clone(),
            tmp,
            hasher: Hasher::new(),
            size: 0,
            limit,
        })
    }

    /// Read a whole blob, verifying its digest.
    pub fn get(&self, d: &Digest) -> Result<Vec<u8>, CasError> {
        let path = self.path_of(d);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CasError::NotFound(*d),
            _ => CasError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        let actual = Digest::of(&bytes);
        if actual != *d {
            return Err(CasError::Corrupt {
                digest: *d,
                path,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Verify a blob by hashing it, then return it opened for streaming and its size.
    pub fn open_verified(&self, d: &Digest) -> Result<(File, u64), CasError> {
        let path = self.path_of(d);
        let f = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CasError::NotFound(*d),
            _ => CasError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        let actual = Digest::of_reader(&f).map_err(io_err(&path))?;
        if actual != *d {
            return Err(CasError::Corrupt {
                digest: *d,
                path,
                actual,
            });
        }
        let f = File::open(&path).map_err(io_err(&path))?;
        let size = f.metadata().map_err(io_err(&path))?.len();
        Ok((f, size))
    }

    /// Copy a blob (verified) to `dest`, creating it with `mode`; fails if `dest` exists.
    pub fn copy_to(&self, d: &Digest, dest: &Path, mode: u32) -> Result<(), CasError> {
        let (mut src, _) = self.open_verified(d)?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dest)
            .map_err(io_err(dest))?;
        io::copy(&mut src, &mut out).map_err(io_err(dest))?;
        Ok(())
    }
}

/// An in-progress blob; nothing is visible in the store until [`BlobWriter::commit`].
#[derive(Debug)]
pub struct BlobWriter {
    cas: Cas,
    tmp: tempfile::NamedTempFile,
    hasher: Hasher,
    size: u64,
    limit: Option<u64>,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(limit) = self.limit
            && self.size + buf.len() as u64 > limit
        {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                CasError::TooLarge { limit },
            ));
        }
        let n = self.tmp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

impl From<io::Error> for CasError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::FileTooLarge
            && let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<CasError>())
            && let CasError::TooLarge { limit } = inner
        {
            return CasError::TooLarge { limit: *limit };
        }
        CasError::Io {
            path: PathBuf::from("<blob>"),
            source: e,
        }
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// fsync, rename into place (if not already present), fsync the directory.
    pub fn commit(self) -> Result<(Digest, u64), CasError> {
        let digest = self.hasher.finish();
        let dest = self.cas.path_of(&digest);
        if dest.is_file() {
            // Same content already stored; immutable, so nothing to do.
            return Ok((digest, self.size));
        }
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp_path = self.tmp.path().to_owned();
        self.tmp.as_file().sync_all().map_err(io_err(&tmp_path))?;
        fs::set_permissions(&tmp_path, fs::Permissions::from_mode(0o444))
            .map_err(io_err(&tmp_path))?;
        if let Err(e) = self.tmp.persist_noclobber(&dest) {
            // A concurrent writer of the same content won the race: equally good.
            if !dest.is_file() {
                return Err(CasError::Io {
                    path: dest,
                    source: e.error,
                });
            }
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        Ok((digest, self.size))
    }
}

/// Read at most `limit` bytes from a reader into the CAS.
pub fn put_reader_limited(
    cas: &Cas,
    mut r: impl Read,
    limit: u64,
) -> Result<(Digest, u64), CasError> {
    let mut w = cas.writer(Some(limit))?;
    io::copy(&mut r, &mut w)?;
    w.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_round_trip_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        let d = cas.put_bytes(b"hello").unwrap();
        assert_eq!(d, Digest::of(b"hello"));
        assert_eq!(cas.put_bytes(b"hello").unwrap(), d);
        assert_eq!(cas.get(&d).unwrap(), b"hello");
        let mode = fs::metadata(cas.path_of(&d)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        assert!(
            fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "temp left behind"
        );
    }

    #[test]
    fn corrupted_blob_is_detected_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        let d = cas.put_bytes(b"precious bytes").unwrap();
        let p = cas.path_of(&d);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&p, b"precious bytez").unwrap();
        let err = cas.get(&d).unwrap_err();
        assert!(matches!(err, CasError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("corrupted"), "{err}");
        assert!(matches!(
            cas.open_verified(&d),
            Err(CasError::Corrupt { .. })
        ));
    }

    #[test]
    fn missing_blob_and_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        assert!(matches!(
            cas.get(&Digest::of(b"x")),
            Err(CasError::NotFound(_))
        ));
        let err = put_reader_limited(&cas, &[0u8; 100][..], 10).unwrap_err();
        assert!(matches!(err, CasError::TooLarge { limit: 10 }), "{err}");
        assert!(
            fs::read_dir(dir.path().join("sha256"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn put_file_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(&dir.path().join("cas")).unwrap();
        let target = dir.path().join("secret");
        fs::write(&target, b"s").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(cas.put_file(&link).is_err());
        assert_eq!(cas.put_file(&target).unwrap().1, 1);
    }
}
