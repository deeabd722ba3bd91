//! Static scan of a pipeline definition for hard-coded secrets (job admission).
//!
//! A pipeline file is stored, signed and shown to everyone who may read jobs: a credential written
//! into it has leaked. [`scan`] looks at the whole text (comments and scripts included) for the
//! formats that identify a credential on sight, and at every step's `env` values for literals that
//! look random. Each finding is reported as `file:line:col: possible hard-coded secret (<kind>)`;
//! the matched text itself is never repeated.
//!
//! Formats (the providers' documented prefixes and lengths):
//! - private key blocks: `-----BEGIN … PRIVATE KEY-----` (PKCS#8, RSA, EC, DSA, OpenSSH, PGP);
//! - AWS: access key ids `AKIA`/`ASIA`/`ABIA`/`ACCA` + 16 characters, and 40-character secret
//!   access keys assigned to a name containing `aws` and `secret`;
//! - GCP: API keys `AIza` + 35, OAuth access tokens `ya29.`, service-account key files
//!   (`"type": "service_account"` next to a `private_key`);
//! - GitHub: `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_` + 36, fine-grained `github_pat_` + 82;
//! - GitLab: `glpat-`/`gldt-`/`glrt-`/`glptt-`/`gloas-` + at least 20;
//! - Slack: `xoxb-`/`xoxa-`/`xoxp-`/`xoxr-`/`xoxs-` tokens, `xapp-` app tokens, incoming-webhook
//!   URLs.
//!
//! High entropy: every token of an env value (maximal run of `[A-Za-z0-9+/=_-]`, after removing
//! `${params.NAME}` references, which are filled in at submit) that is at least
//! [`MIN_ENTROPY_TOKEN_LEN`] characters long, mixes letters and digits, and has a Shannon entropy of
//! at least [`ENTROPY_THRESHOLD`] bits per character. A random base64 token of 20 characters scores
//! about 4.0 (half of them are caught), one of 32 or more 4.2–4.8 (99% are caught); words, target
//! triples and identifiers score 3.3–3.9 or have no digits, and `.` splits file names and versions
//! into short tokens. Pure hex tokens are
//! exempt: in a pipeline they are commit ids and digests, i.e. pins, not credentials. Pass secrets
//! with `secrets = [...]` instead (docs/pipeline.md).

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

use crate::spec::LineIndex;

/// Shannon entropy (bits per character) at or above which an env token counts as a secret.
pub const ENTROPY_THRESHOLD: f64 = 4.0;
/// Shortest env token judged by its entropy.
pub const MIN_ENTROPY_TOKEN_LEN: usize = 20;

/// What a finding looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretKind {
    /// A PEM private key block.
    PrivateKey,
    /// An AWS access key id.
    AwsAccessKeyId,
    /// An AWS secret access key.
    AwsSecretAccessKey,
    /// A Google Cloud API key.
    GcpApiKey,
    /// A Google OAuth access token.
    GcpOauthToken,
    /// A Google Cloud service-account key file.
    GcpServiceAccountKey,
    /// A GitHub token.
    GithubToken,
    /// A GitLab token.
    GitlabToken,
    /// A Slack token.
    SlackToken,
    /// A Slack incoming-webhook URL.
    SlackWebhook,
    /// A random-looking literal in an env value.
    HighEntropy,
}

impl SecretKind {
    /// Name used in messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PrivateKey => "private key block",
            Self::AwsAccessKeyId => "AWS access key id",
            Self::AwsSecretAccessKey => "AWS secret access key",
            Self::GcpApiKey => "GCP API key",
            Self::GcpOauthToken => "GCP OAuth token",
            Self::GcpServiceAccountKey => "GCP service account key",
            Self::GithubToken => "GitHub token",
            Self::GitlabToken => "GitLab token",
            Self::SlackToken => "Slack token",
            Self::SlackWebhook => "Slack webhook URL",
            Self::HighEntropy => "high-entropy env value",
        }
    }
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One possible secret in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{file}:{line}:{col}: possible hard-coded secret ({kind})")]
pub struct SecretFinding {
    /// File name as passed to [`scan`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What it looks like.
    pub kind: SecretKind,
}

/// The credential formats, compiled once.
static PATTERNS: LazyLock<Vec<(SecretKind, Regex)>> = LazyLock::new(|| {
    [
        (
            SecretKind::PrivateKey,
            r"-----BEGIN (?:(?:RSA|EC|DSA|OPENSSH|ENCRYPTED|PGP) )?PRIVATE KEY(?: BLOCK)?-----",
        ),
        (
            SecretKind::AwsAccessKeyId,
            r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b",
        ),
        (
            SecretKind::AwsSecretAccessKey,
            r#"(?i)aws[a-z0-9_.-]*secret[a-z0-9_.-]*["']?\s*[=:]\s*["']?([A-Za-z0-9/+]{40})\b"#,
        ),
        (SecretKind::GcpApiKey, r"\bAIza[0-9A-Za-z_-]{35}"),
        (SecretKind::GcpOauthToken, r"\bya29\.[0-9A-Za-z_-]{20,}"),
        (
            SecretKind::GcpServiceAccountKey,
            r#""type"\s*:\s*"service_account""#,
        ),
        (
            SecretKind::GithubToken,
            r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})\b",
        ),
        (
            SecretKind::GitlabToken,
            r"\b(?:glpat|gldt|glrt|glptt|gloas)-[A-Za-z0-9_-]{20,}",
        ),
        (
            SecretKind::SlackToken,
            r"\b(?:xox[baprs]-[A-Za-z0-9-]{10,}|xapp-\d-[A-Za-z0-9-]{10,})",
        ),
        (
            SecretKind::SlackWebhook,
            r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9_/-]{20,}",
        ),
    ]
    .into_iter()
    // The patterns are constants covered by a unit test; none is ever dropped in practice.
    .filter_map(|(kind, pattern)| Regex::new(pattern).ok().map(|re| (kind, re)))
    .collect()
});

/// `${params.NAME}`: filled in at submit, not part of the literal.
static PARAM_REF: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"\$\{params\.[A-Za-z_][A-Za-z0-9_]*\}").ok());

/// Shannon entropy of `text`'s characters, in bits per character (0 for empty text).
pub fn shannon_entropy(text: &str) -> f64 {
    let mut counts = std::collections::HashMap::new();
    let mut total = 0_usize;
    for c in text.chars() {
        *counts.entry(c).or_insert(0_usize) += 1;
        total += 1;
    }
    if total == 0 {
        return 0.0;
    }
    let n = total as f64;
    counts
        .values()
        .map(|&count| {
            let p = count as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Whether an env token looks like a random secret (see the module documentation).
pub fn is_high_entropy_token(token: &str) -> bool {
    token.chars().count() >= MIN_ENTROPY_TOKEN_LEN
        && token.chars().any(|c| c.is_ascii_alphabetic())
        && token.chars().any(|c| c.is_ascii_digit())
        && !token.chars().all(|c| c.is_ascii_hexdigit())
        && shannon_entropy(token) >= ENTROPY_THRESHOLD
}

/// Scan a pipeline file's text; findings are sorted by position. `file` is only used in messages.
pub fn scan(source: &str, file: &str) -> Vec<SecretFinding> {
    // Byte ranges of the matches, with their kind.
    let mut hits: Vec<(std::ops::Range<usize>, SecretKind)> = Vec::new();
    for (kind, re) in PATTERNS.iter() {
        for captures in re.captures_iter(source) {
            // A pattern with a group locates the secret itself, not the name before it.
            if let Some(m) = captures.get(1).or_else(|| captures.get(0)) {
                hits.push((m.range(), *kind));
            }
        }
    }
    for range in env_entropy_hits(source) {
        if !hits
            .iter()
            .any(|(hit, _)| hit.start < range.end && range.start < hit.end)
        {
            hits.push((range, SecretKind::HighEntropy));
        }
    }
    let lines = LineIndex::new(source);
    let mut findings: Vec<SecretFinding> = hits
        .into_iter()
        .map(|(range, kind)| {
            let (line, col) = lines.line_col(range.start);
            SecretFinding {
                file: file.to_owned(),
                line,
                col,
                kind,
            }
        })
        .collect();
    findings.sort_by_key(|f| (f.line, f.col));
    findings.dedup_by_key(|f| (f.line, f.col));
    findings
}

/// Byte ranges (in `source`) of high-entropy tokens in `[[steps]] env` values. A file that does not
/// parse has no env values to judge (the pattern scan still ran over its text).
fn env_entropy_hits(source: &str) -> Vec<std::ops::Range<usize>> {
    let Ok(root) = DeTable::parse(source) else {
        return Vec::new();
    };
    let Some(steps) = root.get_ref().get("steps") else {
        return Vec::new();
    };
    let DeValue::Array(steps) = steps.get_ref() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for step in steps {
        let DeValue::Table(step) = step.get_ref() else {
            continue;
        };
        let Some(env) = step.get("env") else {
            continue;
        };
        let DeValue::Table(env) = env.get_ref() else {
            continue;
        };
        for value in env.values() {
            let DeValue::String(text) = value.get_ref() else {
                continue;
            };
            let span = value.span();
            // Where the decoded text starts in the file: right after the opening quote(s) when
            // the literal has no escapes; otherwise the value's own position.
            let raw = source.get(span.clone()).unwrap_or_default();
            let base = ["\"\"\"", "'''", "\"", "'"].iter().find_map(|quote| {
                raw.strip_prefix(quote)
                    .filter(|rest| rest.starts_with(text.as_ref()))
                    .map(|_| span.start + quote.len())
            });
            let literal = match PARAM_REF.as_ref() {
                Some(re) => re
                    .replace_all(text, |c: &regex::Captures<'_>| " ".repeat(c[0].len()))
                    .into_owned(),
                None => text.to_string(),
            };
            for (offset, token) in tokens(&literal) {
                if is_high_entropy_token(token) {
                    let start = base.map_or(span.start, |b| b + offset);
                    out.push(start..start + base.map_or(1, |_| token.len()));
                }
            }
        }
    }
    out
}

/// Maximal runs of `[A-Za-z0-9+/=_-]` with their byte offsets.
fn tokens(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let is_token = |c: char| c.is_ascii_alphanumeric() || "+/=_-".contains(c);
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (is_token(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s, &text[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &text[s..]));
    }
    out.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "version = 1\nname = \"x\"\n[workspaces.out]\n";

    fn kinds(text: &str) -> Vec<(usize, usize, SecretKind)> {
        scan(text, "p.toml")
            .into_iter()
            .map(|f| (f.line, f.col, f.kind))
            .collect()
    }

    #[test]
    fn every_pattern_compiles() {
        assert_eq!(PATTERNS.len(), 10);
        assert!(PARAM_REF.is_some());
    }

    #[test]
    fn token_formats_are_found_with_their_position() {
        let gh = format!("ghp_{}", "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5");
        let text = format!(
            "{HEADER}[[steps]]\nname = \"a\"\nkind = \"build\"\noutput = \"out\"\nscript = \"curl -H 'Authorization: token {gh}' x\"\n"
        );
        let found = scan(&text, "p.toml");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].to_string(),
            "p.toml:8:41: possible hard-coded secret (GitHub token)"
        );
        // The secret itself is never echoed.
        assert!(!found[0].to_string().contains(&gh));

        let cases = [
            (
                "# -----BEGIN OPENSSH PRIVATE KEY-----\n",
                SecretKind::PrivateKey,
            ),
            ("k = \"AKIAIOSFODNN7EXAMPLE\"\n", SecretKind::AwsAccessKeyId),
            (
                "aws_secret_access_key = \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\"\n",
                SecretKind::AwsSecretAccessKey,
            ),
            (
                "k = \"AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q\"\n",
                SecretKind::GcpApiKey,
            ),
            (
                "k = \"glpat-AbCdEfGhIjKlMnOpQrSt\"\n",
                SecretKind::GitlabToken,
            ),
            (
                "k = \"xoxb-123456789012-abcdefABCDEF\"\n",
                SecretKind::SlackToken,
            ),
            (
                "u = \"https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXX\"\n",
                SecretKind::SlackWebhook,
            ),
            (
                "j = '{\"type\": \"service_account\", \"private_key\": \"\"}'\n",
                SecretKind::GcpServiceAccountKey,
            ),
        ];
        for (line, kind) in cases {
            let found = kinds(line);
            assert_eq!(found.len(), 1, "{line}: {found:?}");
            assert_eq!(found[0].2, kind, "{line}");
        }
    }

    #[test]
    fn high_entropy_env_values_are_found_but_params_and_words_are_not() {
        let text = format!(
            "{HEADER}[[steps]]\nname = \"a\"\nkind = \"build\"\noutput = \"out\"\nrun = [\"true\"]\nenv = {{ API = \"key=Zq8vR2mX9kP4wL7tY1nB6cJ3\", GREETING = \"${{params.greeting}}\", PATHS = \"/usr/local/bin:/usr/bin:/bin\", VERSION = \"1.2.3-alpha.20240101\", FILE = \"libfoo-1.2.3-x86_64.tar.gz python3.11-dev-bookworm1\", HEX = \"0123456789abcdef0123\" }}\n"
        );
        let found = kinds(&text);
        // `API = "key=Zq8…"`: the token starts with `key=` (`=` is in the base64 alphabet).
        assert_eq!(found, vec![(9, 16, SecretKind::HighEntropy)], "{text}");
    }

    #[test]
    fn entropy_is_measured_in_bits_per_character() {
        assert!(shannon_entropy("").abs() < f64::EPSILON);
        assert!(shannon_entropy("aaaa").abs() < f64::EPSILON);
        assert!((shannon_entropy("abcd") - 2.0).abs() < 1e-9);
        assert!(is_high_entropy_token("Zq8vR2mX9kP4wL7tY1nB6cJ3"));
        assert!(!is_high_entropy_token("hello_world_from_kiln_pipeline"));
        assert!(!is_high_entropy_token("x86_64-linux-gnu-gcc-12"));
        assert!(!is_high_entropy_token("aarch64-unknown-linux-gnu2"));
        assert!(!is_high_entropy_token(
            "0123456789abcdef0123456789abcdef01234567"
        ));
    }

    #[test]
    fn clean_example_has_no_findings() {
        let example = include_str!("../../examples/hello-c/pipeline.toml");
        assert_eq!(scan(example, "pipeline.toml"), Vec::new());
    }
}
