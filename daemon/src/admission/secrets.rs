//! Runtime secrets: the node's secret directory, and the redaction of secret values from step logs.
//!
//! A step that declares `secrets = ["NAME"]` gets the file `<secrets_dir>/NAME` as
//! `/run/secrets/NAME` (a read-only tmpfs inside its sandbox: see `sandbox::rootfs`). The value is
//! read when the step starts, handed to the sandbox helper on its stdin, and kept only in memory;
//! the step's log passes through a [`Redactor`] before it is stored or broadcast, so the value never
//! reaches the CAS, kiln.db or an event stream.
//!
//! The directory and every secret file must be owned by root and have no group/other permission
//! bits, and a secret file must be a regular file (never a symlink) of UTF-8 text, 1 byte to
//! [`MAX_SECRET_BYTES`]: kilnd refuses to hand out a secret that others on the host could read.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Largest secret file kilnd reads.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// The secret directory of the node.
#[derive(Debug, Clone)]
pub struct SecretDir {
    /// `[admission] secrets_dir`.
    pub path: PathBuf,
}

/// A secret value, with a `Debug` that never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(pub String);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue({} bytes)", self.0.len())
    }
}

impl SecretDir {
    /// Why the secrets `names` cannot be handed out, one message each (empty: all are usable).
    /// Used at job admission; the values are only read when the step starts.
    pub fn check(&self, step: &str, names: &[String]) -> Vec<String> {
        if names.is_empty() {
            return Vec::new();
        }
        if let Err(problem) = safe_owner_and_mode(&self.path, true) {
            return vec![format!(
                "step {step:?} declares secrets but the secret directory {problem}"
            )];
        }
        names
            .iter()
            .filter_map(|name| {
                self.open(name)
                    .err()
                    .map(|problem| format!("step {step:?}: secret {name:?}: {problem}"))
            })
            .collect()
    }

    /// Read the values of `names`, in order.
    pub fn read(&self, names: &[String]) -> Result<Vec<(String, SecretValue)>, String> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        safe_owner_and_mode(&self.path, true)
            .map_err(|problem| format!("secret directory {problem}"))?;
        names
            .iter()
            .map(|name| {
                let mut file = self
                    .open(name)
                    .map_err(|problem| format!("secret {name:?}: {problem}"))?;
                let mut bytes = Vec::new();
                file.by_ref()
                    .take(MAX_SECRET_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| format!("secret {name:?}: cannot read: {e}"))?;
                if bytes.is_empty() || bytes.len() as u64 > MAX_SECRET_BYTES {
                    return Err(format!(
                        "secret {name:?} must hold 1 to {MAX_SECRET_BYTES} bytes"
                    ));
                }
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("secret {name:?} is not UTF-8 text"))?;
                Ok((name.clone(), SecretValue(text)))
            })
            .collect()
    }

    /// Open `<dir>/NAME` without following a symlink and check its owner, mode and type.
    fn open(&self, name: &str) -> Result<File, String> {
        // The spec allows identifiers only; never let a name walk out of the directory.
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err("invalid secret name".into());
        }
        let path = self.path.join(name);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("not found in the secret directory {}", self.path.display())
                }
                _ => format!("cannot open {}: {e}", path.display()),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        check_owner_and_mode(&path, meta.uid(), meta.mode())?;
        Ok(file)
    }
}

/// `path` must exist, be a directory (if `dir`), owned by root, without group/other bits.
fn safe_owner_and_mode(path: &Path, dir: bool) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if dir && !meta.is_dir() {
        return Err(format!("{} is not a directory", path.display()));
    }
    check_owner_and_mode(path, meta.uid(), meta.mode())
}

fn check_owner_and_mode(path: &Path, uid: u32, mode: u32) -> Result<(), String> {
    if uid != 0 {
        return Err(format!(
            "{} is owned by uid {uid}; it must be owned by root",
            path.display()
        ));
    }
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:o}; group and other must have no access (chmod go= it)",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Replaces secret values in a byte stream with `[REDACTED:NAME]`, also when a value is split
/// across chunks: a tail that could be the start of a value is held back until the next chunk
/// (or [`Redactor::finish`]) decides. A value ending in a newline is also redacted without it
/// (`echo "$(cat /run/secrets/X)"` prints it either way).
#[derive(Default)]
pub struct Redactor {
    /// (value, replacement), longest value first so the longest match wins.
    patterns: Vec<(Vec<u8>, Vec<u8>)>,
    pending: Vec<u8>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("patterns", &self.patterns.len())
            .field("pending_bytes", &self.pending.len())
            .finish()
    }
}

impl Redactor {
    /// A redactor for `secrets` (name, value); with none it passes everything through.
    pub fn new(secrets: &[(String, SecretValue)]) -> Self {
        let mut patterns = Vec::new();
        for (name, value) in secrets {
            let replacement = format!("[REDACTED:{name}]").into_bytes();
            let full = value.0.as_bytes();
            let trimmed = value.0.trim_end_matches(['\n', '\r']).as_bytes();
            for candidate in [full, trimmed] {
                if !candidate.is_empty() && !patterns.iter().any(|(p, _)| p == candidate) {
                    patterns.push((candidate.to_vec(), replacement.clone()));
                }
            }
        }
        patterns.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        Self {
            patterns,
            pending: Vec::new(),
        }
    }

    /// Feed a chunk; returns what may be emitted now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.patterns.is_empty() {
            return chunk.to_vec();
        }
        self.pending.extend_from_slice(chunk);
        let (out, consumed) = self.redact(false);
        self.pending.drain(..consumed);
        out
    }

    /// Redact one complete text (an argv element, a path, a message) independently of the stream:
    /// for records such as the runtime trace that hold the step's strings outside its log.
    pub fn redact_str(&self, text: &str) -> String {
        if self.patterns.is_empty() {
            return text.to_owned();
        }
        let (out, _) = redact_bytes(&self.patterns, text.as_bytes(), true);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// End of stream: everything held back, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        let (out, _) = self.redact(true);
        self.pending.clear();
        out
    }

    /// Redact `pending`; unless `last`, stop at a tail that may still grow into a value.
    /// Returns the output and how many pending bytes it consumed.
    fn redact(&self, last: bool) -> (Vec<u8>, usize) {
        redact_bytes(&self.patterns, &self.pending, last)
    }
}

/// Replace every pattern in `data`; unless `last`, stop at a tail that may still grow into one.
/// Returns the output and how many bytes of `data` it consumed.
fn redact_bytes(patterns: &[(Vec<u8>, Vec<u8>)], data: &[u8], last: bool) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    'scan: while i < data.len() {
        let rest = &data[i..];
        for (value, replacement) in patterns {
            if rest.starts_with(value) {
                out.extend_from_slice(replacement);
                i += value.len();
                continue 'scan;
            }
        }
        if !last
            && patterns
                .iter()
                .any(|(value, _)| value.len() > rest.len() && value.starts_with(rest))
        {
            break;
        }
        out.push(data[i]);
        i += 1;
    }
    (out, i)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn secrets(pairs: &[(&str, &str)]) -> Vec<(String, SecretValue)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), SecretValue((*v).to_owned())))
            .collect()
    }

    #[test]
    fn values_are_redacted_across_chunk_boundaries() {
        let mut r = Redactor::new(&secrets(&[("TOKEN", "s3cr3t-value\n"), ("PW", "hunter2")]));
        let mut out = Vec::new();
        for chunk in [
            &b"token=s3c"[..],
            b"r3t-va",
            b"lue and pw=hunter",
            b"2 and s3cr3",
        ] {
            out.extend(r.push(chunk));
        }
        out.extend(r.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "token=[REDACTED:TOKEN] and pw=[REDACTED:PW] and s3cr3"
        );
    }

    #[test]
    fn longest_value_wins_and_nothing_is_held_without_secrets() {
        let mut r = Redactor::new(&secrets(&[("A", "abc"), ("B", "abcdef")]));
        let mut out = r.push(b"xabcdefy abcz");
        out.extend(r.finish());
        assert_eq!(out, b"x[REDACTED:B]y [REDACTED:A]z");
        assert_eq!(r.redact_str("curl -H abcdef"), "curl -H [REDACTED:B]");
        let mut none = Redactor::new(&[]);
        assert_eq!(none.push(b"abc"), b"abc");
        assert!(none.finish().is_empty());
        assert!(!format!("{r:?}").contains("abc"));
    }

    #[test]
    fn debug_hides_the_value() {
        assert_eq!(
            format!("{:?}", SecretValue("hunter2".into())),
            "SecretValue(7 bytes)"
        );
    }

    #[test]
    fn unsafe_directories_and_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let secrets_dir = SecretDir {
            path: dir.path().to_owned(),
        };
        let write = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, "value").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("GOOD", 0o600);
        write("LOOSE", 0o644);
        std::os::unix::fs::symlink(dir.path().join("GOOD"), dir.path().join("LINK")).unwrap();
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let problems = secrets_dir.check("s", &names(&["GOOD", "LOOSE", "LINK", "MISSING"]));
        let text = problems.join("\n");
        if !nix::unistd::geteuid().is_root() {
            // Files created by another user are never acceptable.
            assert!(text.contains("must be owned by root"), "{text}");
            return;
        }
        assert_eq!(problems.len(), 3, "{text}");
        let values = secrets_dir.read(&names(&["GOOD"])).unwrap();
        assert_eq!(values[0].1.0, "value");
        assert!(
            text.contains("secret \"LOOSE\":") && text.contains("mode 644"),
            "{text}"
        );
        assert!(text.contains("secret \"LINK\": cannot open"), "{text}");
        assert!(text.contains("secret \"MISSING\": not found"), "{text}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let problems = secrets_dir.check("s", &names(&["GOOD"]));
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("group and other must have no access"),
            "{problems:?}"
        );
        assert!(secrets_dir.check("s", &[]).is_empty());
    }
}
