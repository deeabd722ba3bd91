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
//! dependency install"), and every file of its output must match a hash pin ([`pins`]). The
//! record goes into the step's signed provenance (`internalParameters.fetch`).
//!
//! Other kinds get no listener and keep `lo` down: no network at all.

pub mod listener;
pub mod pins;
pub mod proxy;

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

/// The node's cap on fetch destinations: `None` when no admission policy is configured (the
/// pipeline's `allow_hosts` decide), else the policy's `[fetch] allow_hosts` (empty: none).
pub type NodeCap<'a> = Option<(&'a [HostPort], &'a Path)>;

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
pub fn admission_problems(pipeline: &Pipeline, cap: NodeCap<'_>) -> Vec<String> {
    let Some((allowed, policy)) = cap else {
        return Vec::new();
    };
    pipeline
        .steps
        .iter()
        .filter_map(|step| {
            let fetch = step.fetch.as_ref()?;
            let refused: Vec<String> = fetch
                .allow_hosts
                .iter()
                .filter(|host| !allowed.contains(host))
                .map(ToString::to_string)
                .collect();
            (!refused.is_empty()).then(|| {
                format!(
                    "step {:?}: allow_hosts {} not permitted by [fetch] allow_hosts of {} (node allows: {})",
                    step.name,
                    refused.join(", "),
                    policy.display(),
                    if allowed.is_empty() {
                        "none".to_owned()
                    } else {
                        allowed
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )
            })
        })
        .collect()
}

/// The network side of one fetch step, from before its sandbox starts to its verification.
#[derive(Debug)]
pub struct FetchSession {
    spec: FetchSpec,
    allow: Vec<HostPort>,
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
        let allow = effective_allow_hosts(&spec.allow_hosts, cap);
        Some(Self {
            spec,
            allow,
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

    /// After the step: inputs unchanged (always), and, if it succeeded, its output files
    /// (`outputs`) against the pins. Returns the record for the provenance, lines for the step
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
            let Some(outputs) = outputs else {
                return Ok((Vec::new(), Vec::new()));
            };
            let names: Vec<String> = inputs.iter().map(|(ws, _)| ws.clone()).collect();
            let lock = spec
                .pin_lockfile
                .as_deref()
                .map(|lockfile| pins::read_lockfile(&ws_root, &names, lockfile))
                .transpose()?;
            Ok(pins::check(&outputs, &spec.pins, lock.as_ref()))
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
            allow_hosts: allow.iter().map(ToString::to_string).collect(),
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
}
