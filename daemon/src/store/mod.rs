//! Metadata storage (seed: "metadata storage" and "artifact repository"): the SQLite index
//! (`kiln.db`) and the content-addressed blob store (`cas/`), both under the state directory.

pub mod cas;
pub mod db;

use std::path::{Path, PathBuf};

pub use cas::{Cas, CasError};
pub use db::{Db, DbError};

/// Both halves of the store.
#[derive(Debug)]
pub struct Store {
    /// Blobs.
    pub cas: Cas,
    /// Index.
    pub db: Db,
    /// State directory.
    pub root: PathBuf,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// CAS.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// Index.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Creating the state directory.
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl Store {
    /// Open (creating) the store in `state_dir` (mode 0700).
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| StoreError::StateDir {
                path: state_dir.to_owned(),
                source,
            })?;
        Ok(Self {
            cas: Cas::open(&state_dir.join("cas"))?,
            db: Db::open(&state_dir.join("kiln.db"))?,
            root: state_dir.to_owned(),
        })
    }
}
