//! Kind-specific step keys: the build environment (`image`), reproducibility checks
//! (`reproducible`), source ingest (`git`, `tarball`) and dependency fetch (`allow_hosts`, `pins`,
//! `pin_lockfile`). Types here; reading and validation in [`super::read`].

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Where a `kind = "source"` step takes its sources from. kilnd runs the ingest itself (in a
/// sandbox with the `source` profile); the step has no `run`/`script`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceSpec {
    /// `git = { repo = "PATH", commit = "HEX" }`: the tree of `commit` (full 40 or 64 hex
    /// digits, no abbreviations or refs) of a git repository on the node. A relative `repo` is
    /// relative to the pipeline file; the CLI resolves it (see `SubmitJobRequest::repos`).
    Git {
        /// Repository path as written in the pipeline file.
        repo: String,
        /// Full commit id, lowercase hex.
        commit: String,
    },
    /// `tarball = { path = "FILE", sha256 = "HEX" }`: a tar archive (optionally gzip/xz/bzip2
    /// compressed) pinned by its sha256. The CLI uploads `path` (relative to the pipeline file)
    /// as a blob; kilnd uses the blob whose digest is the pin, so a different file never matches.
    Tarball {
        /// File relative to the pipeline file.
        path: String,
        /// Pinned digest of the archive file.
        sha256: Digest,
    },
}

/// Network allowlist and hash pins of a `kind = "fetch"` step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchSpec {
    /// `allow_hosts = ["crates.io", "static.crates.io:443", "127.0.0.1:8080"]`: destinations
    /// the proxy admits (port 443 when omitted); the node policy can narrow them further.
    pub allow_hosts: Vec<HostPort>,
    /// `pins = [{ path = "…", sha256 = "…", url = "…" }]`: files the step must leave in its
    /// output workspace, with their digests.
    pub pins: Vec<Pin>,
    /// `pin_lockfile = "src/Cargo.lock"`: a lockfile (path under `/workspace`, in an input
    /// workspace) whose checksums pin the fetched packages.
    pub pin_lockfile: Option<String>,
}

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostPort {
    /// DNS name or IP literal (IPv6 without brackets), lowercase.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl HostPort {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port` (port 443 when omitted). Hosts are
    /// DNS names (letters, digits, `-`, `.`), IPv4 or IPv6 literals; no wildcards, no userinfo.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: missing ']' after an IPv6 address"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{text:?}: {host:?} is not an IPv6 address"));
            }
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(format!("{text:?}: unexpected text after ']'")),
            }
        } else {
            match text.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(format!("{text:?}: invalid port {p:?} (1-65535)")),
            },
        };
        let host = host.to_ascii_lowercase();
        let is_ip = host.parse::<std::net::IpAddr>().is_ok();
        let is_dns = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !is_ip && !is_dns {
            return Err(format!(
                "{text:?}: not a host name or IP address (wildcards and URLs are not accepted)"
            ));
        }
        Ok(Self { host, port })
    }
}

/// A file the fetch step must produce, and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// Path relative to the step's output workspace (no `..`, not absolute).
    pub path: String,
    /// Expected sha256 of the file.
    pub sha256: Digest,
    /// Where it comes from (informational; recorded in provenance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        let hp = |s| HostPort::parse(s).unwrap();
        assert_eq!(hp("Crates.IO").to_string(), "crates.io:443");
        assert_eq!(hp("127.0.0.1:8080").to_string(), "127.0.0.1:8080");
        assert_eq!(hp("[::1]:81").to_string(), "[::1]:81");
        assert_eq!(hp("[::1]").port, 443);
        for bad in [
            "*.example.com",
            "https://x.org",
            "x.org:0",
            "x.org:99999",
            "",
            "a..b",
            "[::1",
            "[nope]:1",
            "user@x.org",
            "-x.org",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
