//! The canonical tree manifest of an image: every entry of the root filesystem, sorted by path,
//! serialized as compact JSON. The image digest is the sha256 of exactly these bytes (the
//! manifest is itself a CAS blob), so one tree always has one digest whether it was imported
//! from a directory or a tar.

use std::collections::BTreeMap;

use kiln_common::Digest;
use serde::{Deserialize, Serialize};

/// `mediaType` of an image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.kiln.image.manifest.v1+json";

/// Longest path accepted in an image (bytes).
pub const MAX_PATH_BYTES: usize = 4096;

/// Most entries an image may hold.
pub const MAX_ENTRIES: usize = 1_000_000;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    /// A directory.
    Dir,
    /// A regular file (its content is a CAS blob).
    File,
    /// A symbolic link (recreated verbatim, never followed by kilnd).
    Symlink,
}

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Path relative to the image root: `/`-separated, no empty, `.` or `..` components.
    pub path: String,
    /// Directory, file or symlink.
    #[serde(rename = "type")]
    pub kind: EntryType,
    /// Permission bits, octal (`"0755"`); setuid/setgid/sticky bits are never kept.
    pub mode: String,
    /// File size in bytes (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// sha256 of the content (files only): the CAS blob holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Link target, verbatim (symlinks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Entry {
    /// The permission bits as a number.
    pub fn mode_bits(&self) -> u32 {
        u32::from_str_radix(&self.mode, 8).unwrap_or(0) & 0o777
    }
}

/// The whole tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_MEDIA_TYPE`].
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Entries sorted by path (bytewise); a directory precedes everything below it.
    pub entries: Vec<Entry>,
}

/// A manifest that breaks the format's rules (a hand-made or damaged blob).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image manifest: {0}")]
pub struct ManifestError(pub String);

impl Manifest {
    /// Builds the canonical manifest from entries in any order (sorted here).
    pub fn new(entries: BTreeMap<String, Entry>) -> Self {
        Self {
            media_type: MANIFEST_MEDIA_TYPE.into(),
            // BTreeMap<String, _> iterates in bytewise order of the UTF-8 keys.
            entries: entries.into_values().collect(),
        }
    }

    /// The canonical bytes (compact JSON; field order fixed by the types).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a manifest: sorted unique normal paths, every parent a directory
    /// listed before it, the fields each type needs and no others.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Self =
            serde_json::from_slice(bytes).map_err(|e| ManifestError(e.to_string()))?;
        if manifest.media_type != MANIFEST_MEDIA_TYPE {
            return Err(ManifestError(format!(
                "mediaType {:?}, expected {MANIFEST_MEDIA_TYPE}",
                manifest.media_type
            )));
        }
        if manifest.entries.len() > MAX_ENTRIES {
            return Err(ManifestError(format!(
                "{} entries, more than {MAX_ENTRIES}",
                manifest.entries.len()
            )));
        }
        let mut kinds: BTreeMap<&str, EntryType> = BTreeMap::new();
        let mut previous: Option<&str> = None;
        for entry in &manifest.entries {
            let bad = |why: &str| ManifestError(format!("entry {:?}: {why}", entry.path));
            if !is_normal_path(&entry.path) {
                return Err(bad("not a normal relative path"));
            }
            if previous.is_some_and(|p| p.as_bytes() >= entry.path.as_bytes()) {
                return Err(bad("entries are not sorted and unique"));
            }
            previous = Some(&entry.path);
            if let Some((parent, _)) = entry.path.rsplit_once('/')
                && kinds.get(parent) != Some(&EntryType::Dir)
            {
                return Err(bad("its parent is not a directory listed before it"));
            }
            let mode_ok = entry.mode.len() == 4
                && entry.mode.starts_with('0')
                && u32::from_str_radix(&entry.mode, 8).is_ok_and(|m| m <= 0o777);
            if !mode_ok {
                return Err(bad("mode must be 4 octal digits without special bits"));
            }
            let fields_ok = match entry.kind {
                EntryType::Dir => {
                    entry.size.is_none() && entry.digest.is_none() && entry.target.is_none()
                }
                EntryType::File => {
                    entry.size.is_some() && entry.digest.is_some() && entry.target.is_none()
                }
                EntryType::Symlink => {
                    entry.size.is_none()
                        && entry.digest.is_none()
                        && entry
                            .target
                            .as_deref()
                            .is_some_and(|t| !t.is_empty() && !t.contains('\0'))
                }
            };
            if !fields_ok {
                return Err(bad("fields do not match its type"));
            }
            kinds.insert(&entry.path, entry.kind);
        }
        Ok(manifest)
    }

    /// Top-level entries (no `/` in the path).
    pub fn top_level(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| !e.path.contains('/'))
    }

    /// Regular files and their total size.
    pub fn file_stats(&self) -> (u64, u64) {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryType::File)
            .fold((0, 0), |(n, bytes), e| (n + 1, bytes + e.size.unwrap_or(0)))
    }
}

/// `a/b/c`: relative, non-empty, no empty/`.`/`..` components, no NUL, at most
/// [`MAX_PATH_BYTES`].
pub fn is_normal_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH_BYTES
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Mode as stored: 4 octal digits.
pub fn mode_string(mode: u32) -> String {
    format!("{:04o}", mode & 0o777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryType::Dir,
            mode: "0755".into(),
            size: None,
            digest: None,
            target: None,
        }
    }

    #[test]
    fn canonical_round_trip_and_order() {
        let mut map = BTreeMap::new();
        for e in [dir("a/b"), dir("a"), dir("a-b")] {
            map.insert(e.path.clone(), e);
        }
        let m = Manifest::new(map);
        let order: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(order, ["a", "a-b", "a/b"]);
        let bytes = m.to_bytes();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        assert!(
            String::from_utf8(bytes)
                .unwrap()
                .starts_with(r#"{"mediaType":"application/vnd.kiln.image.manifest.v1+json","entries":[{"path":"a","type":"dir","mode":"0755"}"#)
        );
    }

    #[test]
    fn parse_refuses_what_import_never_writes() {
        let ok = Manifest::new(BTreeMap::from([("a".to_owned(), dir("a"))]));
        for (change, expected) in [
            (
                Box::new(|m: &mut Manifest| m.entries[0].path = "../a".into())
                    as Box<dyn Fn(&mut Manifest)>,
                "normal relative path",
            ),
            (
                Box::new(|m: &mut Manifest| m.entries.push(dir("b/c"))),
                "parent is not a directory",
            ),
            (
                Box::new(|m: &mut Manifest| m.entries[0].mode = "4755".into()),
                "mode",
            ),
            (
                Box::new(|m: &mut Manifest| m.entries[0].target = Some("x".into())),
                "fields",
            ),
            (
                Box::new(|m: &mut Manifest| m.entries.insert(0, dir("b"))),
                "sorted",
            ),
        ] {
            let mut m = ok.clone();
            change(&mut m);
            let err = Manifest::parse(&m.to_bytes()).unwrap_err();
            assert!(err.0.contains(expected), "{err}");
        }
    }
}
