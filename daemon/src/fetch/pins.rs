//! After a fetch step: its output must hold only regular files and directories, every file
//! must match a hash pin, every pin must be present, and its input workspaces must be exactly as
//! they were mounted.
//!
//! Why no symlinks: outputs are collected without following them, so a symlink is in no pin
//! check and no tree digest, yet it stays in the workspace that later steps mount
//! (`vendor/foo -> /run/secrets/…`, `-> /tmp`). A fetch step that leaves one fails, naming it.
//!
//! Pins come from the step's `pins` (output-relative path → sha256) and from `pin_lockfile`.
//! The lockfile rule (Cargo.lock, format v2 and later): every `[[package]]` with a `checksum`
//! pins the file named `<name>-<version>.crate`, wherever it is in the output (cargo's download
//! cache and `cargo vendor`-style layouts differ in directories, never in that name); packages
//! without a checksum (path and git dependencies, the workspace's own crates) pin nothing. A
//! file matching both a `pins` path and a lockfile name is checked against the `pins` entry.
//! The lockfile must be in one of the step's input workspaces (read-only to the step and
//! re-verified after it), never in its output, which the step itself writes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Component, Path};

use kiln_common::Digest;
use kiln_common::digest::{TreeEntry, tree_digest};
use kiln_common::intoto::PinCheck;
use kiln_common::spec::Pin;
use serde::Deserialize;

use super::shown;
use crate::pipeline::workspace;

/// Largest lockfile read.
const MAX_LOCKFILE_BYTES: u64 = 16 << 20;
/// Problems named in a step's failure reason (all are in the record).
const MAX_NAMED_PROBLEMS: usize = 10;

/// The file names a lockfile pins, and their digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockPins {
    /// The lockfile as the pipeline names it (`src/Cargo.lock`).
    pub lockfile: String,
    /// `<name>-<version>.crate` → checksum.
    pub by_file_name: BTreeMap<String, Digest>,
}

#[derive(Deserialize)]
struct CargoLock {
    #[serde(default)]
    package: Vec<CargoPackage>,
}

#[derive(Deserialize)]
struct CargoPackage {
    name: String,
    version: String,
    checksum: Option<String>,
}

/// The pins of a Cargo.lock text (see the module documentation).
pub fn parse_cargo_lock(text: &str, lockfile: &str) -> Result<LockPins, String> {
    let lock: CargoLock =
        toml::from_str(text).map_err(|e| format!("pin_lockfile {lockfile}: {}", e.message()))?;
    let mut by_file_name = BTreeMap::new();
    for package in lock.package {
        let Some(checksum) = package.checksum else {
            continue;
        };
        let file = format!("{}-{}.crate", package.name, package.version);
        if file.contains(['/', '\0']) || file.starts_with('.') {
            return Err(format!(
                "pin_lockfile {lockfile}: package {:?} version {:?} does not name a file",
                package.name, package.version
            ));
        }
        let digest = Digest::from_hex(&checksum).map_err(|e| {
            format!("pin_lockfile {lockfile}: checksum of {file} is not a sha256 ({e})")
        })?;
        if by_file_name
            .insert(file.clone(), digest)
            .is_some_and(|d| d != digest)
        {
            return Err(format!(
                "pin_lockfile {lockfile}: {file} is listed twice with different checksums"
            ));
        }
    }
    Ok(LockPins {
        lockfile: lockfile.to_owned(),
        by_file_name,
    })
}

/// Reads `lockfile` (`<input workspace>/<path>`) from under `ws_root`, refusing symlinks on the
/// way and a workspace that is not one of `inputs`.
pub fn read_lockfile(
    ws_root: &Path,
    inputs: &[String],
    lockfile: &str,
) -> Result<LockPins, String> {
    let relative = Path::new(lockfile);
    let Some(Component::Normal(first)) = relative.components().next() else {
        return Err(format!("pin_lockfile {lockfile}: not a workspace path"));
    };
    if !inputs.iter().any(|ws| first == ws.as_str()) {
        return Err(format!(
            "pin_lockfile {lockfile}: must be in one of the step's input workspaces ({}), which the step cannot write",
            inputs.join(", ")
        ));
    }
    let mut path = ws_root.to_owned();
    for component in relative.components() {
        let Component::Normal(part) = component else {
            return Err(format!(
                "pin_lockfile {lockfile}: not a plain relative path"
            ));
        };
        path.push(part);
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| format!("pin_lockfile {lockfile}: {e}"))?;
        if meta.file_type().is_symlink() {
            return Err(format!(
                "pin_lockfile {lockfile}: {} is a symlink (never followed)",
                path.display()
            ));
        }
    }
    let file = std::fs::File::open(&path).map_err(|e| format!("pin_lockfile {lockfile}: {e}"))?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_LOCKFILE_BYTES),
        &mut text,
    )
    .map_err(|e| format!("pin_lockfile {lockfile}: {e}"))?;
    parse_cargo_lock(&text, lockfile)
}

/// An output entry that is neither a regular file nor a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAFile {
    /// Path relative to the output workspace.
    pub path: String,
    /// `symlink`, `fifo`, `socket`, `device node`.
    pub kind: &'static str,
    /// A symlink's target, as written.
    pub target: Option<String>,
}

/// Every entry under `dir` that is not a regular file or a directory, sorted by path (symlinks
/// are listed, never followed).
pub fn not_regular(dir: &Path) -> Result<Vec<NotAFile>, String> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry =
            entry.map_err(|e| format!("fetched output: cannot list {}: {e}", dir.display()))?;
        let ft = entry.file_type();
        if ft.is_file() || ft.is_dir() {
            continue;
        }
        let path = entry
            .path()
            .strip_prefix(dir)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .into_owned();
        let (kind, target) = if ft.is_symlink() {
            let target = std::fs::read_link(entry.path())
                .map_err(|e| format!("fetched output {}: {e}", shown(&path)))?;
            ("symlink", Some(target.to_string_lossy().into_owned()))
        } else if ft.is_fifo() {
            ("fifo", None)
        } else if ft.is_socket() {
            ("socket", None)
        } else if ft.is_block_device() || ft.is_char_device() {
            ("device node", None)
        } else {
            ("special file", None)
        };
        found.push(NotAFile { path, kind, target });
    }
    Ok(found)
}

/// Checks the output files `entries` against `pins` and `lock`, and refuses `not_files` (see the
/// module documentation); returns one [`PinCheck`] per file, per entry of `not_files` and per
/// missing pin, and the problems (empty: every file pinned and matching, every pin present,
/// nothing but files and directories).
pub fn check(
    entries: &[TreeEntry],
    not_files: &[NotAFile],
    pins: &[Pin],
    lock: Option<&LockPins>,
) -> (Vec<PinCheck>, Vec<String>) {
    let by_path: BTreeMap<&str, &Pin> = pins.iter().map(|p| (p.path.as_str(), p)).collect();
    let lock_source = lock.map(|l| format!("lockfile:{}", l.lockfile));
    let mut checks = Vec::new();
    let mut problems = Vec::new();
    let mut lock_names_seen = std::collections::BTreeSet::new();
    for other in not_files {
        let to = other
            .target
            .as_deref()
            .map(|t| format!(" (to {})", shown(t)))
            .unwrap_or_default();
        problems.push(format!(
            "fetched output {} is a {}{to}: fetch outputs must be regular files",
            shown(&other.path),
            other.kind
        ));
        checks.push(PinCheck {
            path: other.path.clone(),
            pinned_by: None,
            expected: None,
            actual: None,
            url: None,
            result: "not-a-file".into(),
        });
    }
    for entry in entries {
        let file_name = entry.path.rsplit('/').next().unwrap_or(&entry.path);
        let (source, expected, url) = if let Some(pin) = by_path.get(entry.path.as_str()) {
            (Some("pins".to_owned()), Some(pin.sha256), pin.url.clone())
        } else if let Some(digest) = lock.and_then(|l| l.by_file_name.get(file_name)) {
            lock_names_seen.insert(file_name.to_owned());
            (lock_source.clone(), Some(*digest), None)
        } else {
            (None, None, None)
        };
        let result = match expected {
            None => {
                problems.push(format!("fetched file {} is not pinned", shown(&entry.path)));
                "unpinned"
            }
            Some(expected) if expected != entry.digest => {
                problems.push(format!(
                    "fetched file {}: sha256 {} does not match its pin {}",
                    shown(&entry.path),
                    entry.digest.hex(),
                    expected.hex()
                ));
                "mismatch"
            }
            Some(_) => "ok",
        };
        checks.push(PinCheck {
            path: entry.path.clone(),
            pinned_by: source,
            expected,
            actual: Some(entry.digest),
            url,
            result: result.into(),
        });
    }
    let present: std::collections::BTreeSet<&str> =
        entries.iter().map(|e| e.path.as_str()).collect();
    for pin in pins {
        if !present.contains(pin.path.as_str()) {
            problems.push(format!("pinned file {} was not fetched", pin.path));
            checks.push(PinCheck {
                path: pin.path.clone(),
                pinned_by: Some("pins".into()),
                expected: Some(pin.sha256),
                actual: None,
                url: pin.url.clone(),
                result: "missing".into(),
            });
        }
    }
    if let Some(lock) = lock {
        for (name, digest) in &lock.by_file_name {
            if !lock_names_seen.contains(name) {
                problems.push(format!(
                    "{} pins {name}, which is not in the output",
                    lock.lockfile
                ));
                checks.push(PinCheck {
                    path: name.clone(),
                    pinned_by: lock_source.clone(),
                    expected: Some(*digest),
                    actual: None,
                    url: None,
                    result: "missing".into(),
                });
            }
        }
    }
    (checks, problems)
}

/// The problems as one step failure reason.
pub fn describe(problems: &[String]) -> String {
    let shown = problems.len().min(MAX_NAMED_PROBLEMS);
    let mut text = problems[..shown].join("; ");
    if problems.len() > shown {
        let _ = write!(text, "; and {} more", problems.len() - shown);
    }
    text
}

/// Recomputes each input workspace's tree digest; `Err` names the first that differs from the
/// digest it was mounted with.
pub fn inputs_unchanged(ws_root: &Path, inputs: &[(String, Digest)]) -> Result<(), String> {
    for (ws, mounted) in inputs {
        let now = workspace::collect(&ws_root.join(ws), None)
            .map(|c| tree_digest(&c.entries))
            .map_err(|e| format!("source workspace {ws}: cannot re-hash after the fetch: {e}"))?;
        if now != *mounted {
            return Err(format!(
                "source workspace {ws} changed during fetch (tree {now}, mounted as {mounted})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, content: &[u8]) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            digest: Digest::of(content),
        }
    }

    fn pin(path: &str, content: &[u8]) -> Pin {
        Pin {
            path: path.into(),
            sha256: Digest::of(content),
            url: Some(format!("https://example.org/{path}")),
        }
    }

    const LOCK: &str = r#"
version = 4

[[package]]
name = "app"
version = "0.1.0"
dependencies = ["foo"]

[[package]]
name = "foo"
version = "1.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
"#;

    #[test]
    fn cargo_lock_pins_crate_files_by_name() {
        let lock = parse_cargo_lock(LOCK, "src/Cargo.lock").unwrap();
        assert_eq!(
            lock.by_file_name,
            BTreeMap::from([("foo-1.0.0.crate".to_owned(), Digest::of(b"hello"))])
        );
        let bad = LOCK.replace("2cf24dba", "zzzzzzzz");
        assert!(
            parse_cargo_lock(&bad, "src/Cargo.lock")
                .unwrap_err()
                .contains("checksum of foo-1.0.0.crate is not a sha256")
        );
        let sneaky = LOCK.replace("\"foo\"\nversion", "\"../foo\"\nversion");
        assert!(
            parse_cargo_lock(&sneaky, "src/Cargo.lock")
                .unwrap_err()
                .contains("does not name a file")
        );
    }

    #[test]
    fn every_file_must_be_pinned_and_match_and_every_pin_present() {
        let lock = parse_cargo_lock(LOCK, "src/Cargo.lock").unwrap();
        let pins = [pin("deps/a.tar.gz", b"a")];
        let good = [
            entry("deps/a.tar.gz", b"a"),
            entry("cache/x/foo-1.0.0.crate", b"hello"),
        ];
        let (checks, problems) = check(&good, &[], &pins, Some(&lock));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            checks.iter().map(|c| c.result.as_str()).collect::<Vec<_>>(),
            ["ok", "ok"]
        );
        assert_eq!(
            checks[1].pinned_by.as_deref(),
            Some("lockfile:src/Cargo.lock")
        );

        let bad = [
            entry("deps/a.tar.gz", b"tampered"),
            entry("deps/extra.bin", b"x"),
        ];
        let (checks, problems) = check(&bad, &[], &pins, Some(&lock));
        assert_eq!(
            problems,
            [
                format!(
                    "fetched file deps/a.tar.gz: sha256 {} does not match its pin {}",
                    Digest::of(b"tampered").hex(),
                    Digest::of(b"a").hex()
                ),
                "fetched file deps/extra.bin is not pinned".to_owned(),
                "src/Cargo.lock pins foo-1.0.0.crate, which is not in the output".to_owned(),
            ]
        );
        assert_eq!(
            checks.iter().map(|c| c.result.as_str()).collect::<Vec<_>>(),
            ["mismatch", "unpinned", "missing"]
        );
        let (_, problems) = check(&[], &[], &pins, None);
        assert_eq!(problems, ["pinned file deps/a.tar.gz was not fetched"]);
    }

    /// Review finding: symlinks are never collected, so "every fetched file pinned" held while
    /// `vendor/foo -> /run/secrets/X` stayed in the output, outside every digest.
    #[test]
    fn symlinks_and_other_non_files_in_the_output_fail_the_check() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vendor/sub")).unwrap();
        std::fs::write(dir.path().join("vendor/a.tar.gz"), b"a").unwrap();
        std::os::unix::fs::symlink("/run/secrets/X", dir.path().join("vendor/foo")).unwrap();
        std::os::unix::fs::symlink("/tmp", dir.path().join("vendor/sub/bar")).unwrap();
        std::os::unix::fs::symlink("a.tar.gz", dir.path().join("vendor/same")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let found = not_regular(dir.path()).unwrap();
        assert_eq!(
            found
                .iter()
                .map(|f| (f.path.as_str(), f.kind, f.target.as_deref()))
                .collect::<Vec<_>>(),
            [
                ("pipe", "fifo", None),
                ("vendor/foo", "symlink", Some("/run/secrets/X")),
                ("vendor/same", "symlink", Some("a.tar.gz")),
                ("vendor/sub/bar", "symlink", Some("/tmp")),
            ]
        );
        // Every file is pinned and matches: the non-files alone fail the check.
        let files = [entry("vendor/a.tar.gz", b"a")];
        let pins = [pin("vendor/a.tar.gz", b"a")];
        let (checks, problems) = check(&files, &found, &pins, None);
        assert_eq!(
            problems,
            [
                "fetched output pipe is a fifo: fetch outputs must be regular files",
                "fetched output vendor/foo is a symlink (to /run/secrets/X): fetch outputs must be regular files",
                "fetched output vendor/same is a symlink (to a.tar.gz): fetch outputs must be regular files",
                "fetched output vendor/sub/bar is a symlink (to /tmp): fetch outputs must be regular files",
            ]
        );
        assert_eq!(
            checks.iter().map(|c| c.result.as_str()).collect::<Vec<_>>(),
            ["not-a-file", "not-a-file", "not-a-file", "not-a-file", "ok"]
        );
        // A clean tree has none.
        let clean = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(clean.path().join("a/b")).unwrap();
        std::fs::write(clean.path().join("a/b/c"), b"c").unwrap();
        assert_eq!(not_regular(clean.path()).unwrap(), []);
    }

    #[test]
    fn names_in_problems_cannot_forge_log_lines_or_grow_without_bound() {
        let forged = "x\nkiln: fetch: 0 problem(s)";
        let long = "d/".repeat(1000) + "f";
        let (_, problems) = check(
            &[entry(forged, b"x"), entry(&long, b"y")],
            &[NotAFile {
                path: "l".into(),
                kind: "symlink",
                target: Some("/".repeat(4000)),
            }],
            &[],
            None,
        );
        assert!(
            problems.iter().all(|p| !p.contains('\n') && p.len() < 300),
            "{problems:?}"
        );
        assert!(problems[1].contains("x\\nkiln"), "{problems:?}");
    }

    #[test]
    fn lockfile_must_come_from_an_input_and_not_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/Cargo.lock"), LOCK).unwrap();
        std::os::unix::fs::symlink("Cargo.lock", dir.path().join("src/link.lock")).unwrap();
        let inputs = ["src".to_owned()];
        assert_eq!(
            read_lockfile(dir.path(), &inputs, "src/Cargo.lock")
                .unwrap()
                .by_file_name
                .len(),
            1
        );
        assert!(
            read_lockfile(dir.path(), &inputs, "deps/Cargo.lock")
                .unwrap_err()
                .contains("must be in one of the step's input workspaces")
        );
        assert!(
            read_lockfile(dir.path(), &inputs, "src/link.lock")
                .unwrap_err()
                .contains("is a symlink")
        );
    }

    #[test]
    fn a_changed_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/main.c"), "int main;").unwrap();
        let digest = tree_digest(
            &workspace::collect(&dir.path().join("src"), None)
                .unwrap()
                .entries,
        );
        let inputs = [("src".to_owned(), digest)];
        inputs_unchanged(dir.path(), &inputs).unwrap();
        std::fs::write(dir.path().join("src/main.c"), "evil").unwrap();
        let err = inputs_unchanged(dir.path(), &inputs).unwrap_err();
        assert!(
            err.starts_with("source workspace src changed during fetch"),
            "{err}"
        );
    }
}
