//! Pinned build environments: root filesystem images stored by digest (`kiln image import`), so a
//! step can say `image = "sha256:…"` and run on exactly that tree instead of the host toolchain.
//!
//! - [`import`]: reading an uploaded tar safely into the CAS (every regular file a blob);
//! - [`manifest`]: the canonical tree manifest (sorted entries; its sha256 is the image digest,
//!   and it is a CAS blob too); indexed in `kiln.db` (`images` table);
//! - [`materialize`]: the tree on the node (`<state>/images/<hex>/root`), written once, every file
//!   verified against its digest; the sandbox binds its top-level entries read-only.
//!
//! Format and rules: docs/formats.md ("Images").

pub mod import;
pub mod manifest;
pub mod materialize;

use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_common::Digest;
use serde::Serialize;

pub use materialize::MaterializedImage;

use crate::store::db::ImageRecord;
use crate::store::{CasError, DbError, Store};

/// Image failures.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The upload is not a readable tar.
    #[error("cannot read the image tar")]
    Tar {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A tar entry was refused.
    #[error("image tar entry {entry:?} refused: {reason}")]
    Entry {
        /// The entry's name as in the archive.
        entry: String,
        /// Why.
        reason: String,
    },
    /// The archive holds nothing.
    #[error("the image tar holds no entries")]
    Empty,
    /// Too many entries.
    #[error("the image tar holds more than {limit} entries")]
    TooManyEntries {
        /// The limit.
        limit: usize,
    },
    /// The tree is larger than `[images] max_total_bytes` (hard links counted in full).
    #[error(
        "image tar entry {entry:?} brings the image's files to {total} bytes, over the limit of \
         {limit} bytes ([images] max_total_bytes; each hard link counts in full)"
    )]
    TooLarge {
        /// The entry that crossed the limit.
        entry: String,
        /// Total bytes of the files up to and including it.
        total: u64,
        /// The limit.
        limit: u64,
    },
    /// The node has too little free space to materialize the tree.
    #[error(
        "image {image}: materializing needs {needed} bytes and {inodes} inodes on {path}, but \
         only {free} bytes and {free_inodes} inodes are free"
    )]
    NoSpace {
        /// The image.
        image: Digest,
        /// Where it would be written.
        path: PathBuf,
        /// Bytes the tree takes (each distinct file once).
        needed: u64,
        /// Inodes it takes.
        inodes: u64,
        /// Bytes free for kilnd.
        free: u64,
        /// Inodes free.
        free_inodes: u64,
    },
    /// Storing a file failed.
    #[error("cannot store an image file")]
    Store(#[source] Box<CasError>),
    /// Indexing failed.
    #[error("cannot index the image")]
    Db(#[from] DbError),
    /// A blob of an image is missing or does not match its digest.
    #[error("image {image}: {what}")]
    Blob {
        /// The image.
        image: Digest,
        /// Which blob (`manifest`, `file "usr/bin/sh"`).
        what: String,
        /// Why.
        #[source]
        source: Box<CasError>,
    },
    /// The manifest blob is not a valid manifest.
    #[error("image {image}")]
    Manifest {
        /// The image.
        image: Digest,
        /// Why.
        #[source]
        source: manifest::ManifestError,
    },
    /// Filesystem error while materializing.
    #[error("image i/o on {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The image is not on this node.
    #[error("image {0} is not on this node (import it with `kiln image import`)")]
    Unknown(Digest),
}

impl From<CasError> for ImageError {
    fn from(e: CasError) -> Self {
        Self::Store(Box::new(e))
    }
}

/// The answer to an import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportResult {
    /// The index record (digest, counts).
    #[serde(flatten)]
    pub record: ImageRecord,
    /// True if the node already had this image.
    pub existed: bool,
    /// Entries whose setuid/setgid/sticky bits were removed.
    pub stripped_special_bits: Vec<String>,
}

/// Where images are materialized: `<state>/images`.
pub fn images_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("images")
}

/// Imports a tar stream (blocking): files into the CAS, the manifest into the CAS, the image
/// into the index. `max_total_bytes` caps the total size of the tree's files, hard links
/// counted in full (`[images] max_total_bytes`).
pub fn import(
    store: &Store,
    reader: impl Read,
    max_total_bytes: u64,
    now: &str,
) -> Result<ImportResult, ImageError> {
    let imported = import::read_tar(&store.cas, reader, max_total_bytes)?;
    let bytes = imported.manifest.to_bytes();
    let digest = store.cas.put_bytes(&bytes)?;
    let existed = store.db.image(&digest)?.is_some();
    let (files, size) = imported.manifest.file_stats();
    let record = ImageRecord {
        digest,
        entries: imported.manifest.entries.len() as u64,
        files,
        bytes: size,
        imported_at: now.to_owned(),
    };
    if !existed {
        store.db.insert_image(&record)?;
    }
    tracing::info!(image = %digest, entries = record.entries, files, bytes = size, existed, "image imported");
    Ok(ImportResult {
        record: store.db.image(&digest)?.unwrap_or(record),
        existed,
        stripped_special_bits: imported.stripped_special_bits,
    })
}

/// True if the image is indexed and its manifest blob is present.
pub fn is_known(store: &Store, digest: &Digest) -> bool {
    store.db.image(digest).ok().flatten().is_some() && store.cas.contains(digest)
}

/// The image's tree on this node, materialized on first use (the copy runs off the async
/// runtime).
pub async fn materialize(store: &Store, digest: Digest) -> Result<MaterializedImage, ImageError> {
    if store.db.image(&digest)?.is_none() {
        return Err(ImageError::Unknown(digest));
    }
    let cas = store.cas.clone();
    let dir = images_dir(&store.root);
    tokio::task::spawn_blocking(move || materialize::ensure(&cas, &dir, &digest))
        .await
        .map_err(|e| ImageError::Io {
            path: images_dir(&store.root),
            source: std::io::Error::other(e.to_string()),
        })?
}
