//! Dependency fetch (seed: "jailed fetch" stage): the only step kind with a network path, and
//! what kilnd checks around it.
//!
//! A `kind = "fetch"` step runs in the same empty network namespace as every step, plus one
//! listening socket in it: kilnd's allowlisting proxy at `http://127.0.0.1:3128` ([`listener`]
//! puts it there, [`proxy`] serves it). The step gets `HTTP_PROXY`/`HTTPS_PROXY` (and the
//! lowercase and `CARGO_HTTP_PROXY` forms), Landlock lets it connect to TCP port 3128 only, and
//! the proxy admits the step's `allow_hosts`, capped by the node's admission policy
//! (`[fetch] allow_hosts`), recording every attempt. After the step ([`FetchSession::verify`]):
//! its input workspaces must hash as they were mounted ("source unchanged by a compromised
//! dependency install"), and its output must hold only regular files and directories, every
//! file matching a hash pin ([`pins`]). The record goes into the step's signed provenance
//! (`internalParameters.fetch`).
//!
//! Special-range IP literals (loopback, private, link-local, …) are destinations only when the
//! node policy names them: kilnd connects as root from the host's network namespace, so opening
//! the node's own services or the cloud metadata endpoint is the node operator's decision, never
//! the pipeline author's.
//!
//! Other kinds get no listener and keep `lo` down: no network at all.

pub mod listener;
pub mod pins;
pub mod proxy;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kiln_common::Digest;
use kiln_common::digest::TreeEntry;
use kiln_common::intoto::FetchRecord;
use kiln_common::spec::{FetchSpec, HostPort, Pipeline, Step, StepKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::sandbox::{Confinement, Sandbox, SandboxError, SandboxOutcome, SandboxSpec};

/// The proxy URL a fetch step is given.
pub const PROXY_URL: &str = "http://127.0.0.1:3128";

/// Environment variables that point clients at the proxy (curl, wget, pip, npm, git and cargo
/// read one of them; kilnd's values replace any the step sets).
pub const PROXY_ENV: [&str; 5] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "CARGO_HTTP_PROXY",
];

/// Longest excerpt of step-controlled text (request lines, headers, paths, symlink targets)
/// quoted in a reason, counted in escaped bytes.
pub const MAX_QUOTED_BYTES: usize = 128;

/// The node's cap on fetch destinations: `None` when no admission policy is configured (the
/// pipeline's `allow_hosts` decide, special-range IP literals excepted), else the policy's
/// `[fetch] allow_hosts` (empty: none).
pub type NodeCap<'a> = Option<(&'a [HostPort], &'a Path)>;

/// `text` quoted for a reason or a log line: escaped as `{:?}` would, cut after at most
/// [`MAX_QUOTED_BYTES`] escaped bytes (never inside a character or an escape) and then marked
/// `"…" (N bytes)` with the full length. A step cannot grow a reason by sending more text.
pub fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(MAX_QUOTED_BYTES + 24);
    out.push('"');
    let mut escaped = String::new();
    for c in text.chars() {
        escaped.clear();
        match c {
            // `char::escape_debug` escapes both quotes; a string's Debug only the double one.
            '\'' => escaped.push(c),
            c => escaped.extend(c.escape_debug()),
        }
        if out.len() - 1 + escaped.len() > MAX_QUOTED_BYTES {
            let _ = write!(out, "\"… ({} bytes)", text.len());
            return out;
        }
        out.push_str(&escaped);
    }
    out.push('"');
    out
}

/// `text` as is when it is short and has no control characters (a plain file name), else
/// [`quoted`]: a name cannot forge a log line or grow a message.
pub fn shown(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_QUOTED_BYTES && !text.chars().any(char::is_control) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(quoted(text))
    }
}

/// `text` cut to at most `max` bytes on a character boundary, `…` appended when cut.
pub fn truncated(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

/// Destinations the proxy admits for `step_hosts` under `cap`.
pub fn effective_allow_hosts(step_hosts: &[HostPort], cap: NodeCap<'_>) -> Vec<HostPort> {
    step_hosts
        .iter()
        .filter(|host| cap.is_none_or(|(allowed, _)| allowed.contains(host)))
        .cloned()
        .collect()
}

/// Job admission: one problem per fetch step whose `allow_hosts` name destinations the node
/// policy does not allow.
///
/// Without a node policy a step may name any destination but a special-range IP literal: only
/// the node policy's `[fetch] allow_hosts` can open those (see the module documentation).
pub fn admission_problems(pipeline: &Pipeline, cap: NodeCap<'_>) -> Vec<String> {
    pipeline
        .steps
        .iter()
        .filter_map(|step| {
            let hosts = &step.fetch.as_ref()?.allow_hosts;
            match cap {
                Some((allowed, policy)) => beyond_the_cap(&step.name, hosts, allowed, policy),
                None => special_literals(&step.name, hosts),
            }
        })
        .collect()
}

/// The problem of step `step` naming destinations the node policy (`policy`) does not allow.
fn beyond_the_cap(
    step: &str,
    hosts: &[HostPort],
    allowed: &[HostPort],
    policy: &Path,
) -> Option<String> {
    let refused: Vec<String> = hosts
        .iter()
        .filter(|host| !allowed.contains(host))
        .map(ToString::to_string)
        .collect();
    let node_allows = if allowed.is_empty() {
        "none".to_owned()
    } else {
        allowed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    (!refused.is_empty()).then(|| {
        format!(
            "step {step:?}: allow_hosts {} not permitted by [fetch] allow_hosts of {} (node allows: {node_allows})",
            refused.join(", "),
            policy.display(),
        )
    })
}

/// Without a node policy: the problem of step `step` naming special-range IP literals.
fn special_literals(step: &str, hosts: &[HostPort]) -> Option<String> {
    let local: Vec<String> = hosts
        .iter()
        .filter_map(|host| {
            let class = proxy::special_range(host.host.parse().ok()?)?;
            Some(format!("{host} ({class})"))
        })
        .collect();
    (!local.is_empty()).then(|| {
        format!(
            "step {step:?}: allow_hosts {} in a special address range: only the node policy's [fetch] allow_hosts can allow such a destination, and no admission policy is configured ([admission] policy in kilnd.toml)",
            local.join(", ")
        )
    })
}

/// The network side of one fetch step, from before its sandbox starts to its verification.
#[derive(Debug)]
pub struct FetchSession {
    spec: FetchSpec,
    allow: proxy::Allowlist,
    output: Option<String>,
    connections: Vec<kiln_common::intoto::FetchConnection>,
    not_itemised: u64,
}

impl FetchSession {
    /// The session of `step` if it is a fetch step (`None` for every other kind).
    pub fn for_step(step: &Step, cap: NodeCap<'_>) -> Option<Self> {
        if step.kind != StepKind::Fetch {
            return None;
        }
        let spec = step.fetch.clone().unwrap_or_default();
        let allow = proxy::Allowlist {
            hosts: effective_allow_hosts(&spec.allow_hosts, cap),
            node_named: cap.map(|(named, _)| named.to_vec()).unwrap_or_default(),
        };
        Some(Self {
            spec,
            allow,
            output: step.output.clone(),
            connections: Vec::new(),
            not_itemised: 0,
        })
    }

    /// The proxy variables for the step's environment.
    pub fn environment(&self) -> impl Iterator<Item = (String, String)> {
        PROXY_ENV
            .into_iter()
            .map(|name| (name.to_owned(), PROXY_URL.to_owned()))
    }

    /// Landlock: TCP connect to the proxy's port only (whatever the profile lists).
    pub fn confine(&self, confinement: &mut Confinement) {
        if let Some(landlock) = &mut confinement.landlock {
            landlock.tcp_connect_ports = vec![listener::PROXY_ADDR.port()];
        }
    }

    /// Runs the step's sandbox with the proxy serving it; the proxy stops (and lets go of the
    /// step log) before this returns.
    pub async fn run(
        &mut self,
        sandbox: &Sandbox,
        spec: &SandboxSpec,
        log: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
    ) -> Result<SandboxOutcome, SandboxError> {
        let (listener_tx, listener_rx) = tokio::sync::oneshot::channel();
        let proxy = proxy::Proxy::start(self.allow.clone(), listener_rx, log.clone());
        let outcome = sandbox
            .run_with_proxy(spec, log, cancel, Some(listener_tx))
            .await;
        (self.connections, self.not_itemised) = proxy.stop().await;
        outcome
    }

    /// After the step: inputs unchanged (always), and, if it succeeded, its output: regular
    /// files (`outputs`, matched against the pins) and directories only. Returns the record for the provenance, lines for the step
    /// log, and the reason to fail the step, if any.
    pub async fn verify(
        self,
        ws_root: PathBuf,
        inputs: Vec<(String, Digest)>,
        outputs: Option<Vec<TreeEntry>>,
    ) -> (FetchRecord, Vec<String>, Option<String>) {
        let Self {
            spec,
            allow,
            output,
            connections,
            not_itemised,
        } = self;
        let allowed = connections.iter().filter(|c| c.allowed).count();
        let mut notes = vec![format!(
            "kiln: fetch: {} connection attempt(s) through the proxy: {allowed} allowed, {} denied",
            connections.len() as u64 + not_itemised,
            connections.len() - allowed + usize::try_from(not_itemised).unwrap_or(usize::MAX),
        )];
        let checked = tokio::task::spawn_blocking(move || {
            pins::inputs_unchanged(&ws_root, &inputs)?;
            let (Some(outputs), Some(output)) = (outputs, output) else {
                return Ok((Vec::new(), Vec::new()));
            };
            // Symlinks are never collected, so no pin covers them: refused outright.
            let not_files = pins::not_regular(&ws_root.join(&output))?;
            let names: Vec<String> = inputs.iter().map(|(ws, _)| ws.clone()).collect();
            let lock = spec
                .pin_lockfile
                .as_deref()
                .map(|lockfile| pins::read_lockfile(&ws_root, &names, lockfile))
                .transpose()?;
            Ok(pins::check(&outputs, &not_files, &spec.pins, lock.as_ref()))
        })
        .await
        .unwrap_or_else(|e| Err(format!("fetch verification task failed: {e}")));
        let (pin_checks, failure) = match checked {
            Ok((pin_checks, problems)) => {
                let ok = pin_checks.iter().filter(|c| c.result == "ok").count();
                notes.push(format!(
                    "kiln: fetch: {ok} fetched file(s) match their pins, {} problem(s)",
                    problems.len()
                ));
                notes.extend(problems.iter().map(|p| format!("kiln: fetch: {p}")));
                let failure = (!problems.is_empty()).then(|| pins::describe(&problems));
                (pin_checks, failure)
            }
            Err(reason) => {
                notes.push(format!("kiln: fetch: {reason}"));
                (Vec::new(), Some(reason))
            }
        };
        let record = FetchRecord {
            proxy: PROXY_URL.into(),
            allow_hosts: allow.hosts.iter().map(ToString::to_string).collect(),
            connections,
            connections_not_itemised: not_itemised,
            pins: pin_checks,
        };
        (record, notes, failure)
    }
}

/// Runs a step's sandbox: through `fetch`'s proxy for a fetch step, plainly otherwise.
pub async fn run_sandbox(
    sandbox: &Sandbox,
    spec: &SandboxSpec,
    log: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
    fetch: Option<&mut FetchSession>,
) -> Result<SandboxOutcome, SandboxError> {
    match fetch {
        Some(fetch) => fetch.run(sandbox, spec, log, cancel).await,
        None => sandbox.run(spec, log, cancel).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(text: &str) -> HostPort {
        HostPort::parse(text).unwrap()
    }

    #[test]
    fn the_node_policy_caps_the_pipeline() {
        let step = [hp("crates.io"), hp("static.crates.io"), hp("10.0.0.5:8080")];
        assert_eq!(effective_allow_hosts(&step, None), step.to_vec());
        let node = [hp("static.crates.io")];
        let policy = Path::new("/etc/kiln/policy.toml");
        assert_eq!(
            effective_allow_hosts(&step, Some((&node, policy))),
            vec![hp("static.crates.io")]
        );
        assert!(effective_allow_hosts(&step, Some((&[], policy))).is_empty());

        let text = "version = 1\nname = \"p\"\n[workspaces.deps]\n[[steps]]\nname = \"get\"\nkind = \"fetch\"\noutput = \"deps\"\nrun = [\"true\"]\nallow_hosts = [\"crates.io\", \"static.crates.io\"]\npins = [{ path = \"a\", sha256 = \"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\" }]\n";
        let pipeline = kiln_common::spec::parse(text, "p.toml").unwrap();
        assert!(admission_problems(&pipeline, None).is_empty());
        assert_eq!(
            admission_problems(&pipeline, Some((&node, policy))),
            [
                "step \"get\": allow_hosts crates.io:443 not permitted by [fetch] allow_hosts of /etc/kiln/policy.toml (node allows: static.crates.io:443)"
            ]
        );
        assert!(
            admission_problems(&pipeline, Some((&[], policy)))[0].ends_with("(node allows: none)")
        );
    }

    /// Review finding: without a node policy, a pipeline's allow_hosts alone opened loopback,
    /// private and metadata addresses. Now only the node policy can.
    #[test]
    fn without_a_node_policy_special_range_literals_are_refused_at_admission() {
        let text = "version = 1\nname = \"p\"\n[workspaces.deps]\n[[steps]]\nname = \"get\"\nkind = \"fetch\"\noutput = \"deps\"\nrun = [\"true\"]\nallow_hosts = [\"static.crates.io\", \"127.0.0.1:8471\", \"169.254.169.254:80\", \"93.184.216.34:80\"]\npins = [{ path = \"a\", sha256 = \"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\" }]\n";
        let pipeline = kiln_common::spec::parse(text, "p.toml").unwrap();
        assert_eq!(
            admission_problems(&pipeline, None),
            [
                "step \"get\": allow_hosts 127.0.0.1:8471 (loopback), 169.254.169.254:80 (link-local) in a special address range: only the node policy's [fetch] allow_hosts can allow such a destination, and no admission policy is configured ([admission] policy in kilnd.toml)"
            ]
        );
        // A node policy that names them admits them (and caps the rest as before).
        let node = [hp("127.0.0.1:8471"), hp("169.254.169.254:80")];
        let problems = admission_problems(&pipeline, Some((&node, Path::new("/p.toml"))));
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .contains("allow_hosts static.crates.io:443, 93.184.216.34:80 not permitted"),
            "{problems:?}"
        );
        // The session's allowlist carries what the node named, for the proxy's run-time check.
        let session = FetchSession::for_step(&pipeline.steps[0], None).unwrap();
        assert!(session.allow.node_named.is_empty());
        let session =
            FetchSession::for_step(&pipeline.steps[0], Some((&node, Path::new("/p.toml"))))
                .unwrap();
        assert_eq!(session.allow.node_named, node);
        assert_eq!(session.allow.hosts, node);
    }

    #[test]
    fn quoted_text_is_cut_on_a_character_boundary_and_marked() {
        assert_eq!(quoted("GET / HTTP/1.1"), "\"GET / HTTP/1.1\"");
        assert_eq!(quoted("it's \"x\"\u{1}"), "\"it's \\\"x\\\"\\u{1}\"");
        let cut = quoted(&"\u{1}".repeat(16 * 1024));
        // Each \u{1} is 5 escaped bytes: 25 of them fit in 128.
        assert_eq!(cut, format!("\"{}\"… (16384 bytes)", "\\u{1}".repeat(25)));
        let cut = quoted(&"é".repeat(100));
        assert_eq!(cut, format!("\"{}\"… (200 bytes)", "é".repeat(64)));
        let exact = "a".repeat(MAX_QUOTED_BYTES);
        assert_eq!(quoted(&exact), format!("\"{exact}\""));

        assert_eq!(truncated("short".into(), 10), "short");
        let cut = truncated("é".repeat(10), 8);
        assert_eq!(cut, "éé…");
        assert!(cut.len() <= 8);

        assert_eq!(shown("vendor/foo-1.0.crate"), "vendor/foo-1.0.crate");
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        assert!(shown(&"a".repeat(4096)).ends_with("\"… (4096 bytes)"));
    }
}
