//! Reading an uploaded image tar, safely: every entry's name and type is checked before anything
//! of it is kept, regular files go into the CAS, and the result is the canonical
//! [`Manifest`](super::manifest::Manifest).
//!
//! Refused (the error names the entry): absolute paths, `..` components, names that are not UTF-8
//! or too long, device nodes, fifos, sparse files and other special types, hard links whose target
//! is not a regular file earlier in the same archive, duplicate paths, and a path whose parent is
//! not a directory, and a tree whose files add up to more than `[images] max_total_bytes` (each
//! hard link counted in full: a 1 MiB file with 200 links is a 201 MiB tree, so a small tar
//! cannot describe a huge one). Stripped (listed in the result): setuid, setgid and sticky
//! bits. Ignored: owners (the materialized tree is root's), times, xattrs, pax global headers.

use std::collections::BTreeMap;
use std::io::{self, Read};

use kiln_common::Digest;

use super::ImageError;
use super::manifest::{
    Entry, EntryType, MAX_ENTRIES, MAX_PATH_BYTES, Manifest, is_normal_path, mode_string,
};
use crate::store::Cas;

/// What an import produced.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The canonical manifest.
    pub manifest: Manifest,
    /// Entries whose setuid/setgid/sticky bits were removed.
    pub stripped_special_bits: Vec<String>,
}

/// Reads a tar stream into the CAS and builds the manifest (blocking); refuses a tree whose files
/// add up to more than `max_total_bytes`.
pub fn read_tar(
    cas: &Cas,
    reader: impl Read,
    max_total_bytes: u64,
) -> Result<Imported, ImageError> {
    let mut archive = tar::Archive::new(reader);
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut stripped = Vec::new();
    let mut total = 0u64;
    // Counted before anything of the entry is stored: the header's size for a file, the
    // target's size for a hard link.
    let mut count = |entry: &str, size: u64| {
        total = total.saturating_add(size);
        if total > max_total_bytes {
            return Err(ImageError::TooLarge {
                entry: entry.to_owned(),
                total,
                limit: max_total_bytes,
            });
        }
        Ok(())
    };
    let tar_err = |source| ImageError::Tar { source };
    for item in archive.entries().map_err(tar_err)? {
        let mut item = item.map_err(tar_err)?;
        let kind = item.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let raw = item.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: String| ImageError::Entry {
            entry: shown.clone(),
            reason,
        };
        let Some(path) = normalize(&raw).map_err(refuse)? else {
            // The archive's root (`.` or `./`): only a directory may be there.
            if kind.is_dir() {
                continue;
            }
            return Err(refuse("the image root must be a directory".into()));
        };
        if entries.contains_key(&path) {
            return Err(refuse("duplicate path in the archive".into()));
        }
        if entries.len() >= MAX_ENTRIES {
            return Err(ImageError::TooManyEntries { limit: MAX_ENTRIES });
        }
        let raw_mode = item.header().mode().map_err(tar_err)?;
        if raw_mode & 0o7000 != 0 && !kind.is_symlink() {
            stripped.push(path.clone());
        }
        let mode = mode_string(raw_mode);
        let entry = if kind.is_file() || kind == tar::EntryType::Continuous {
            count(&shown, item.header().size().map_err(tar_err)?)?;
            let mut writer = cas.writer(None)?;
            io::copy(&mut item, &mut writer).map_err(tar_err)?;
            let (digest, size) = writer.commit()?;
            file(&path, mode, size, digest)
        } else if kind.is_dir() {
            Entry {
                path: path.clone(),
                kind: EntryType::Dir,
                mode,
                size: None,
                digest: None,
                target: None,
            }
        } else if kind.is_symlink() {
            let target = item
                .link_name_bytes()
                .ok_or_else(|| refuse("symlink without a target".into()))?;
            let target = std::str::from_utf8(&target)
                .map_err(|_| refuse("symlink target is not UTF-8".into()))?;
            if target.is_empty() || target.contains('\0') || target.len() > MAX_PATH_BYTES {
                return Err(refuse(format!("unusable symlink target {target:?}")));
            }
            Entry {
                path: path.clone(),
                kind: EntryType::Symlink,
                mode: "0777".into(),
                size: None,
                digest: None,
                target: Some(target.to_owned()),
            }
        } else if kind.is_hard_link() {
            // A hard link is only another name for a file of this same image: its content is
            // already in the CAS. Anything else could name a host file.
            let target = item
                .link_name_bytes()
                .ok_or_else(|| refuse("hard link without a target".into()))?;
            let shown_target = String::from_utf8_lossy(&target).into_owned();
            let outside = || {
                refuse(format!(
                    "hard link to {shown_target:?}, which is not a regular file earlier in the \
                     archive (hard links outside the image are refused)"
                ))
            };
            let target = normalize(&target).ok().flatten().ok_or_else(outside)?;
            match entries.get(&target) {
                Some(Entry {
                    kind: EntryType::File,
                    size: Some(size),
                    digest: Some(digest),
                    ..
                }) => {
                    count(&shown, *size)?;
                    file(&path, mode, *size, *digest)
                }
                _ => return Err(outside()),
            }
        } else {
            let what = match kind {
                tar::EntryType::Char => "character device node",
                tar::EntryType::Block => "block device node",
                tar::EntryType::Fifo => "fifo",
                tar::EntryType::GNUSparse => "sparse file",
                _ => "special entry",
            };
            return Err(refuse(format!(
                "{what}s are refused (only regular files, directories and symlinks)"
            )));
        };
        entries.insert(path, entry);
    }
    add_parents(&mut entries)?;
    if entries.is_empty() {
        return Err(ImageError::Empty);
    }
    Ok(Imported {
        manifest: Manifest::new(entries),
        stripped_special_bits: stripped,
    })
}

fn file(path: &str, mode: String, size: u64, digest: Digest) -> Entry {
    Entry {
        path: path.to_owned(),
        kind: EntryType::File,
        mode,
        size: Some(size),
        digest: Some(digest),
        target: None,
    }
}

/// `./a//b/` → `a/b`; `.` → `None` (the root). Refuses absolute paths, `..`, non-UTF-8 names.
fn normalize(raw: &[u8]) -> Result<Option<String>, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "name is not UTF-8".to_owned())?;
    if text.starts_with('/') {
        return Err("absolute paths are refused".into());
    }
    if text.contains('\0') {
        return Err("name contains a NUL byte".into());
    }
    let mut parts = Vec::new();
    for component in text.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err("'..' components are refused".into()),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let path = parts.join("/");
    if !is_normal_path(&path) {
        return Err(format!("path longer than {MAX_PATH_BYTES} bytes"));
    }
    Ok(Some(path))
}

/// Directories a tar left implicit are added (mode 0755); a parent that is not a directory is
/// refused.
fn add_parents(entries: &mut BTreeMap<String, Entry>) -> Result<(), ImageError> {
    let mut missing = Vec::new();
    for path in entries.keys() {
        let mut rest = path.as_str();
        while let Some((parent, _)) = rest.rsplit_once('/') {
            match entries.get(parent) {
                Some(e) if e.kind == EntryType::Dir => {}
                Some(_) => {
                    return Err(ImageError::Entry {
                        entry: path.clone(),
                        reason: format!("its parent {parent:?} is not a directory"),
                    });
                }
                None => missing.push(parent.to_owned()),
            }
            rest = parent;
        }
    }
    for path in missing {
        entries.entry(path.clone()).or_insert(Entry {
            path,
            kind: EntryType::Dir,
            mode: "0755".into(),
            size: None,
            digest: None,
            target: None,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        // set_path refuses `..` and absolute names: write the raw name field like a hostile tool.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        h
    }

    /// (path, type, mode, content, link target)
    type Item<'a> = (&'a str, tar::EntryType, u32, &'a [u8], Option<&'a str>);

    fn tar_of(items: &[Item<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, mode, data, link) in items {
            let mut h = header(path, *kind, *mode, data.len() as u64);
            if let Some(link) = link {
                h.set_link_name(link).unwrap();
                h.set_cksum();
            }
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn cas() -> (tempfile::TempDir, Cas) {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        (dir, cas)
    }

    #[test]
    fn reads_files_dirs_symlinks_and_internal_hard_links() {
        let (_d, cas) = cas();
        let tar = tar_of(&[
            ("./", tar::EntryType::Directory, 0o755, b"", None),
            (
                "usr/bin/dash",
                tar::EntryType::Regular,
                0o4755,
                b"ELF",
                None,
            ),
            (
                "usr/bin/sh",
                tar::EntryType::Link,
                0o755,
                b"",
                Some("usr/bin/dash"),
            ),
            ("bin", tar::EntryType::Symlink, 0o777, b"", Some("usr/bin")),
        ]);
        let imported = read_tar(&cas, &tar[..], u64::MAX).unwrap();
        let paths: Vec<(&str, EntryType, &str)> = imported
            .manifest
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind, e.mode.as_str()))
            .collect();
        assert_eq!(
            paths,
            [
                ("bin", EntryType::Symlink, "0777"),
                ("usr", EntryType::Dir, "0755"),
                ("usr/bin", EntryType::Dir, "0755"),
                ("usr/bin/dash", EntryType::File, "0755"),
                ("usr/bin/sh", EntryType::File, "0755"),
            ]
        );
        assert_eq!(imported.stripped_special_bits, ["usr/bin/dash"]);
        let d = imported.manifest.entries[3].digest.unwrap();
        assert_eq!(cas.get(&d).unwrap(), b"ELF");
        assert_eq!(imported.manifest.entries[4].digest, Some(d));
        // Same tree, same manifest: the digest does not depend on archive order or implicit dirs.
        let again = tar_of(&[
            ("bin", tar::EntryType::Symlink, 0o777, b"", Some("usr/bin")),
            ("usr/bin/sh", tar::EntryType::Regular, 0o755, b"ELF", None),
            ("usr/", tar::EntryType::Directory, 0o755, b"", None),
            ("usr/bin/dash", tar::EntryType::Regular, 0o755, b"ELF", None),
        ]);
        assert_eq!(
            read_tar(&cas, &again[..], u64::MAX)
                .unwrap()
                .manifest
                .to_bytes(),
            imported.manifest.to_bytes()
        );
    }

    #[test]
    fn hard_links_count_in_full_against_the_size_cap() {
        // The review's case: one 1 MiB file and 200 hard links to it, a 1.15 MB tar that
        // describes a 201 MiB tree.
        let big = vec![7u8; 1 << 20];
        let names: Vec<String> = (0..200).map(|i| format!("link{i}")).collect();
        let mut items: Vec<Item<'_>> = vec![("big", tar::EntryType::Regular, 0o644, &big, None)];
        items.extend(names.iter().map(|n| {
            (
                n.as_str(),
                tar::EntryType::Link,
                0o644,
                &b""[..],
                Some("big"),
            )
        }));
        let tar = tar_of(&items);
        assert!(tar.len() < (5 << 20) / 4, "{} bytes", tar.len());
        let (_d, cas) = cas();
        let err = read_tar(&cas, &tar[..], 100 << 20).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ImageError::TooLarge { total, limit, .. } if total > limit && limit == 100 << 20),
            "{text}"
        );
        assert!(
            text.contains("entry \"link99\"") && text.contains("[images] max_total_bytes"),
            "{text}"
        );
        // Under a cap that holds the whole tree it is accepted, the links sharing one blob.
        let imported = read_tar(&cas, &tar[..], 201 << 20).unwrap();
        assert_eq!(imported.manifest.file_stats(), (201, 201 << 20));
        // A single regular file over the cap is refused before it is stored.
        let (_d2, fresh) = super::tests::cas();
        let err = read_tar(&fresh, &tar[..], (1 << 20) - 1).unwrap_err();
        assert!(err.to_string().contains("entry \"big\""), "{err}");
        assert!(!fresh.contains(&Digest::of(&big)));
    }

    #[test]
    fn hostile_entries_are_refused_by_name() {
        for (items, entry, reason) in [
            (
                vec![("../x", tar::EntryType::Regular, 0o644, &b"x"[..], None)],
                "../x",
                "'..'",
            ),
            (
                vec![("a/../../x", tar::EntryType::Regular, 0o644, &b"x"[..], None)],
                "a/../../x",
                "'..'",
            ),
            (
                vec![(
                    "/etc/passwd",
                    tar::EntryType::Regular,
                    0o644,
                    &b"x"[..],
                    None,
                )],
                "/etc/passwd",
                "absolute",
            ),
            (
                vec![("dev/sda", tar::EntryType::Block, 0o600, &b""[..], None)],
                "dev/sda",
                "block device node",
            ),
            (
                vec![("dev/null", tar::EntryType::Char, 0o666, &b""[..], None)],
                "dev/null",
                "character device node",
            ),
            (
                vec![("p", tar::EntryType::Fifo, 0o644, &b""[..], None)],
                "p",
                "fifo",
            ),
            (
                vec![(
                    "shadow",
                    tar::EntryType::Link,
                    0o644,
                    &b""[..],
                    Some("/etc/shadow"),
                )],
                "shadow",
                "hard links outside the image",
            ),
            (
                vec![
                    ("link", tar::EntryType::Link, 0o644, &b""[..], Some("later")),
                    ("later", tar::EntryType::Regular, 0o644, &b"x"[..], None),
                ],
                "link",
                "not a regular file earlier",
            ),
            (
                vec![
                    ("a", tar::EntryType::Regular, 0o644, &b"x"[..], None),
                    ("a", tar::EntryType::Regular, 0o644, &b"y"[..], None),
                ],
                "a",
                "duplicate",
            ),
            (
                vec![
                    (
                        "lib",
                        tar::EntryType::Symlink,
                        0o777,
                        &b""[..],
                        Some("/etc"),
                    ),
                    ("lib/x", tar::EntryType::Regular, 0o644, &b"y"[..], None),
                ],
                "lib/x",
                "not a directory",
            ),
        ] {
            let (_d, cas) = cas();
            let err = read_tar(&cas, &tar_of(&items)[..], u64::MAX).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("entry {entry:?}")) && text.contains(reason),
                "{text}"
            );
        }
    }
}
