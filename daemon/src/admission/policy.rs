//! The admission policy file (`/etc/kiln/policy.toml`, sample `docs/policy.toml`): which keys may
//! sign which pipelines, and where fetch steps may connect.
//!
//! ```toml
//! allow_unsigned = false            # pipelines no rule matches (default false: refused)
//!
//! [[pipelines]]
//! name = "hello-*"                  # glob over the pipeline's `name`: `*` any run, `?` one char
//! signers = ["release.pub", "-----BEGIN PUBLIC KEY-----\n…\n-----END PUBLIC KEY-----\n"]
//! allow_unsigned = false            # default false
//!
//! [fetch]
//! allow_hosts = ["static.crates.io"]  # the only destinations fetch steps may name (default none);
//!                                     # the only way to open a loopback/private IP literal
//! ```
//!
//! The first rule whose `name` matches decides. A signer is a PEM public key (P-256
//! `SubjectPublicKeyInfo`), inline or as a path (relative paths are relative to the policy file).
//! Every key is read when the policy is loaded, so a missing or malformed key stops kilnd at
//! start with its `file:line:col`, never a job later.

use std::path::{Path, PathBuf};

use kiln_common::keys::PublicKey;
use serde::Deserialize;
use toml::Spanned;

use crate::config::line_col;

/// Errors loading the policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read admission policy {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Syntax error, unknown key, wrong type, or an unusable value, at a position.
    #[error("invalid admission policy {path}:{line}:{col}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow_unsigned: bool,
    #[serde(default)]
    pipelines: Vec<RuleFile>,
    #[serde(default)]
    fetch: FetchFile,
}

/// `[fetch]`: the node's cap on fetch steps' destinations.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchFile {
    #[serde(default)]
    allow_hosts: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: Spanned<String>,
    #[serde(default)]
    signers: Vec<Spanned<String>>,
    #[serde(default)]
    allow_unsigned: bool,
}

/// A loaded policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The file it came from (named in refusals).
    pub path: PathBuf,
    /// Whether pipelines no rule matches may run unsigned.
    pub allow_unsigned: bool,
    /// Rules in file order.
    pub rules: Vec<Rule>,
    /// `[fetch] allow_hosts`: the only destinations a fetch step may name (the step's own
    /// `allow_hosts` are capped by it); empty (or no `[fetch]`) allows none. The only way to open
    /// a special-range IP literal (loopback, private, …): see `crate::fetch`.
    pub fetch_allow_hosts: Vec<kiln_common::spec::HostPort>,
}

/// One `[[pipelines]]` rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Glob over pipeline names.
    pub name: String,
    /// Keys whose signature admits a matching pipeline.
    pub signers: Vec<PublicKey>,
    /// Whether a matching pipeline may run without a signature.
    pub allow_unsigned: bool,
}

/// What the policy asks of one pipeline.
#[derive(Debug, Clone, Copy)]
pub struct Requirement<'p> {
    /// The deciding rule, `None` for the file's default.
    pub rule: Option<&'p Rule>,
    /// Allowed signers (empty for the default).
    pub signers: &'p [PublicKey],
    /// Whether it may run unsigned.
    pub allow_unsigned: bool,
}

impl Policy {
    /// Load and check `path`; every signer key is read now.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse policy text; `path` names the file in messages and anchors relative key paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let invalid = |offset: usize, message: String| {
            let (line, col) = line_col(text, offset);
            PolicyError::Invalid {
                path: path.to_owned(),
                line,
                col,
                message,
            }
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            invalid(
                e.span().map_or(0, |s| s.start),
                e.message().replace('\n', "; "),
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let mut rules = Vec::with_capacity(file.pipelines.len());
        for rule in file.pipelines {
            let name = rule.name.get_ref();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-*?".contains(&b))
            {
                return Err(invalid(
                    rule.name.span().start,
                    format!(
                        "pipeline pattern {name:?} must be a glob over pipeline names ([a-z0-9._-] with * and ?)"
                    ),
                ));
            }
            if rule.signers.is_empty() && !rule.allow_unsigned {
                return Err(invalid(
                    rule.name.span().start,
                    format!(
                        "rule {name:?} has no signers and does not allow unsigned pipelines: it would refuse every matching pipeline; list signers or remove the rule"
                    ),
                ));
            }
            let mut signers = Vec::with_capacity(rule.signers.len());
            for signer in &rule.signers {
                let key = load_signer(signer.get_ref(), base)
                    .map_err(|message| invalid(signer.span().start, message))?;
                signers.push(key);
            }
            rules.push(Rule {
                name: rule.name.into_inner(),
                signers,
                allow_unsigned: rule.allow_unsigned,
            });
        }
        let mut fetch_allow_hosts = Vec::with_capacity(file.fetch.allow_hosts.len());
        for host in &file.fetch.allow_hosts {
            let parsed = kiln_common::spec::HostPort::parse(host.get_ref())
                .map_err(|e| invalid(host.span().start, format!("[fetch] allow_hosts: {e}")))?;
            if !fetch_allow_hosts.contains(&parsed) {
                fetch_allow_hosts.push(parsed);
            }
        }
        Ok(Self {
            path: path.to_owned(),
            allow_unsigned: file.allow_unsigned,
            rules,
            fetch_allow_hosts,
        })
    }

    /// What the policy requires of the pipeline named `pipeline`.
    pub fn requirement(&self, pipeline: &str) -> Requirement<'_> {
        match self.rules.iter().find(|r| glob_match(&r.name, pipeline)) {
            Some(rule) => Requirement {
                rule: Some(rule),
                signers: &rule.signers,
                allow_unsigned: rule.allow_unsigned,
            },
            None => Requirement {
                rule: None,
                signers: &[],
                allow_unsigned: self.allow_unsigned,
            },
        }
    }
}

/// An inline PEM or a path to one.
fn load_signer(value: &str, base: &Path) -> Result<PublicKey, String> {
    if value.trim_start().starts_with("-----BEGIN") {
        return PublicKey::from_pem(value).map_err(|e| format!("inline signer key: {e}"));
    }
    let path = base.join(value);
    let pem = std::fs::read_to_string(&path)
        .map_err(|e| format!("signer key {}: {e}", path.display()))?;
    PublicKey::from_pem(&pem).map_err(|e| format!("signer key {}: {e}", path.display()))
}

/// Glob match: `*` matches any run of characters (also empty), `?` exactly one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Classic iterative matcher with one backtrack point (the last `*`).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use kiln_common::keys::SigningKey;

    use super::*;

    #[test]
    fn globs() {
        for (pattern, name, matches) in [
            ("hello-*", "hello-c", true),
            ("hello-*", "hello-", true),
            ("hello-*", "hello", false),
            ("*", "anything", true),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("*-c", "hello-c", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(pattern, name), matches, "{pattern} {name}");
        }
    }

    #[test]
    fn rules_resolve_keys_and_first_match_wins() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap().0.public_key();
        std::fs::write(dir.path().join("release.pub"), key.to_pem()).unwrap();
        let inline = SigningKey::generate().unwrap().0.public_key();
        let text = format!(
            "[[pipelines]]\nname = \"hello-*\"\nsigners = [\"release.pub\", '''{}''']\n\n[[pipelines]]\nname = \"*\"\nallow_unsigned = true\n",
            inline.to_pem()
        );
        let policy = Policy::parse(&text, &dir.path().join("policy.toml")).unwrap();
        let req = policy.requirement("hello-c");
        assert_eq!(req.signers, &[key, inline]);
        assert!(!req.allow_unsigned);
        let req = policy.requirement("other");
        assert!(req.allow_unsigned && req.signers.is_empty());
        let empty = Policy::parse("", Path::new("/p.toml")).unwrap();
        assert!(!empty.requirement("x").allow_unsigned);
    }

    #[test]
    fn the_sample_policy_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let key = SigningKey::generate().unwrap().0.public_key();
        std::fs::write(dir.path().join("keys/release.pub"), key.to_pem()).unwrap();
        let sample = include_str!("../../../docs/policy.toml");
        let policy = Policy::parse(sample, &dir.path().join("policy.toml")).unwrap();
        assert_eq!(policy.requirement("hello-c").signers, &[key]);
        assert!(policy.requirement("scratch-1").allow_unsigned);
        assert!(!policy.requirement("prod").allow_unsigned);
    }

    #[test]
    fn errors_are_located() {
        let p = Path::new("/etc/kiln/policy.toml");
        let err = Policy::parse("[[pipelines]]\nname = \"x\"\nsigner = []\n", p).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid admission policy /etc/kiln/policy.toml:3:1:"),
            "{err}"
        );
        let err = Policy::parse(
            "[[pipelines]]\nname = \"x\"\nsigners = [\"/nonexistent.pub\"]\n",
            p,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(":3:12: signer key /nonexistent.pub"),
            "{err}"
        );
        let err = Policy::parse("[[pipelines]]\nname = \"x\"\n", p).unwrap_err();
        assert!(
            err.to_string().contains(":2:8: rule \"x\" has no signers"),
            "{err}"
        );
        let err =
            Policy::parse("[[pipelines]]\nname = \"X/\"\nallow_unsigned = true\n", p).unwrap_err();
        assert!(err.to_string().contains("must be a glob"), "{err}");
        let err =
            Policy::parse("[fetch]\nallow_hosts = [\"ok.org\", \"*.evil.org\"]\n", p).unwrap_err();
        assert!(
            err.to_string()
                .contains(":2:26: [fetch] allow_hosts: \"*.evil.org\": not a host name"),
            "{err}"
        );
    }

    #[test]
    fn fetch_destinations_default_to_none() {
        let p = Path::new("/etc/kiln/policy.toml");
        assert!(Policy::parse("", p).unwrap().fetch_allow_hosts.is_empty());
        let policy = Policy::parse(
            "[fetch]\nallow_hosts = [\"Static.Crates.io\", \"127.0.0.1:8080\"]\n",
            p,
        )
        .unwrap();
        assert_eq!(
            policy
                .fetch_allow_hosts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["static.crates.io:443", "127.0.0.1:8080"]
        );
    }
}
