//! Reading the kind-specific step keys (`image`, `reproducible`, `git`, `tarball`, `allow_hosts`,
//! `pins`, `pin_lockfile`); the types are in [`crate::spec::kinds`].

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{Reader, Span, relative_path_problem};
use crate::digest::Digest;
use crate::spec::kinds::{FetchSpec, HostPort, Pin, SourceSpec};
use crate::spec::{Command, StepKind};

/// Keys of `git = { … }`.
const GIT_KEYS: &[&str] = &["repo", "commit"];
/// Keys of `tarball = { … }`.
const TARBALL_KEYS: &[&str] = &["path", "sha256"];
/// Keys of one `pins` entry.
const PIN_KEYS: &[&str] = &["path", "sha256", "url"];
/// Most `pins` entries in one step (a lockfile scales further).
const MAX_PINS: usize = 10_000;

/// What the kind-specific keys of one step hold.
pub(in crate::spec) struct KindKeys {
    pub(in crate::spec) image: Option<Digest>,
    pub(in crate::spec) reproducible: bool,
    pub(in crate::spec) source: Option<SourceSpec>,
    pub(in crate::spec) fetch: Option<FetchSpec>,
}

/// A digest written as `sha256:HEX` (`image`) or bare `HEX` / `sha256:HEX` (pins).
fn digest_of(text: &str, bare_ok: bool) -> Option<Digest> {
    if let Ok(d) = text.parse::<Digest>() {
        return Some(d);
    }
    if bare_ok {
        return Digest::from_hex(text).ok();
    }
    None
}

impl Reader {
    /// A pinned sha256 (`HEX` or `sha256:HEX`), reported at its place when malformed.
    fn pin_digest(&mut self, text: &Spanned<String>, ctx: &str) -> Option<Digest> {
        let digest = digest_of(text.get_ref(), true);
        if digest.is_none() {
            self.error(
                text.span(),
                format!(
                    "{ctx}: sha256 {:?} must be 64 lowercase hex digits",
                    text.get_ref()
                ),
            );
        }
        digest
    }

    /// Reads the keys that depend on the step's kind and checks they fit it. `command` is what
    /// `run`/`script` gave; a source step with `git`/`tarball` gets [`Command::Builtin`].
    pub(super) fn read_kind_keys(
        &mut self,
        table: &DeTable<'_>,
        span: &Span,
        kind: Option<StepKind>,
        command: &mut Command,
        has_output: bool,
        ctx: &str,
    ) -> KindKeys {
        let image = self.string(table, "image", ctx).and_then(|text| {
            let digest = digest_of(text.get_ref(), false);
            if digest.is_none() {
                self.error(
                    text.span(),
                    format!(
                        "{ctx}: image {:?} must be \"sha256:\" followed by 64 lowercase hex digits (the digest `kiln image import` prints)",
                        text.get_ref()
                    ),
                );
            }
            digest
        });
        let reproducible = match table.get("reproducible") {
            None => false,
            Some(value) => match value.get_ref() {
                DeValue::Boolean(b) => *b,
                other => {
                    self.wrong_type(value.span(), ctx, "reproducible", "a boolean", other);
                    false
                }
            },
        };
        if reproducible && !has_output {
            self.error(
                table
                    .get("reproducible")
                    .map_or(span.clone(), Spanned::span),
                format!("{ctx}: reproducible = true needs an output workspace to compare"),
            );
        }

        let source = self.read_source(table, span, kind, command, has_output, ctx);
        let fetch = self.read_fetch(table, span, kind, has_output, ctx);
        KindKeys {
            image,
            reproducible,
            source,
            fetch,
        }
    }

    fn read_source(
        &mut self,
        table: &DeTable<'_>,
        span: &Span,
        kind: Option<StepKind>,
        command: &mut Command,
        has_output: bool,
        ctx: &str,
    ) -> Option<SourceSpec> {
        let git = self.table(table, "git", ctx);
        let tarball = self.table(table, "tarball", ctx);
        let key_span = |key: &str| table.get(key).map(Spanned::span);
        if kind.is_some_and(|k| k != StepKind::Source) {
            for key in ["git", "tarball"] {
                if let Some(at) = key_span(key) {
                    self.error(
                        at,
                        format!("{ctx}: {key} is only allowed in a step of kind \"source\""),
                    );
                }
            }
            return None;
        }
        let source = match (git, tarball) {
            (None, None) => return None,
            (Some(_), Some((at, _))) => {
                self.error(
                    at,
                    format!("{ctx}: has both git and tarball, use exactly one"),
                );
                return None;
            }
            (Some((at, git)), None) => self.read_git(&at, git, ctx),
            (None, Some((at, tarball))) => self.read_tarball(&at, tarball, ctx),
        };
        for key in ["run", "script"] {
            if let Some(at) = key_span(key) {
                self.error(
                    at,
                    format!("{ctx}: a source step with git or tarball has no {key}: kilnd runs the ingest itself"),
                );
            }
        }
        if !has_output {
            self.error(
                span.clone(),
                format!("{ctx}: a source step needs an output workspace for the sources"),
            );
        }
        *command = Command::Builtin;
        source
    }

    fn read_git(&mut self, at: &Span, git: &DeTable<'_>, ctx: &str) -> Option<SourceSpec> {
        let ctx = &format!("{ctx}: git");
        self.check_keys(git, GIT_KEYS, ctx);
        let repo = self.required_string(git, at, "repo", ctx);
        let commit = self.required_string(git, at, "commit", ctx);
        if let Some(repo) = &repo
            && (repo.get_ref().is_empty() || repo.get_ref().contains('\0'))
        {
            self.error(repo.span(), format!("{ctx}: repo must be a non-empty path"));
        }
        if let Some(commit) = &commit {
            let c = commit.get_ref();
            if !(c.len() == 40 || c.len() == 64)
                || !c
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                self.error(
                    commit.span(),
                    format!("{ctx}: commit {c:?} must be a full commit id (40 or 64 lowercase hex digits); branches, tags and abbreviations are not pins"),
                );
            }
        }
        Some(SourceSpec::Git {
            repo: repo?.into_inner(),
            commit: commit?.into_inner(),
        })
    }

    fn read_tarball(&mut self, at: &Span, tarball: &DeTable<'_>, ctx: &str) -> Option<SourceSpec> {
        let ctx = &format!("{ctx}: tarball");
        self.check_keys(tarball, TARBALL_KEYS, ctx);
        let path = self.required_string(tarball, at, "path", ctx);
        let sha = self.required_string(tarball, at, "sha256", ctx);
        if let Some(path) = &path
            && let Some(problem) = relative_path_problem(path.get_ref())
        {
            self.error(
                path.span(),
                format!("{ctx}: path {:?} {problem}", path.get_ref()),
            );
        }
        let sha256 = sha.and_then(|s| self.pin_digest(&s, ctx));
        Some(SourceSpec::Tarball {
            path: path?.into_inner(),
            sha256: sha256?,
        })
    }

    fn read_fetch(
        &mut self,
        table: &DeTable<'_>,
        span: &Span,
        kind: Option<StepKind>,
        has_output: bool,
        ctx: &str,
    ) -> Option<FetchSpec> {
        let keys = ["allow_hosts", "pins", "pin_lockfile"];
        let present: Vec<&str> = keys
            .into_iter()
            .filter(|k| table.contains_key(*k))
            .collect();
        if kind.is_some_and(|k| k != StepKind::Fetch) {
            for key in &present {
                if let Some(value) = table.get(*key) {
                    self.error(
                        value.span(),
                        format!("{ctx}: {key} is only allowed in a step of kind \"fetch\""),
                    );
                }
            }
            return None;
        }
        if kind != Some(StepKind::Fetch) {
            return None;
        }
        let mut fetch = FetchSpec::default();
        if let Some(hosts) = self.strings(table, "allow_hosts", ctx) {
            for host in hosts.into_inner() {
                match HostPort::parse(host.get_ref()) {
                    Ok(hp) if fetch.allow_hosts.contains(&hp) => {
                        self.error(host.span(), format!("{ctx}: allow_hosts lists {hp} twice"));
                    }
                    Ok(hp) => fetch.allow_hosts.push(hp),
                    Err(e) => self.error(host.span(), format!("{ctx}: allow_hosts: {e}")),
                }
            }
        }
        if let Some(value) = table.get("pins") {
            self.read_pins(value, &mut fetch, ctx);
        }
        if let Some(lock) = self.string(table, "pin_lockfile", ctx) {
            if let Some(problem) = relative_path_problem(lock.get_ref()) {
                self.error(
                    lock.span(),
                    format!("{ctx}: pin_lockfile {:?} {problem}", lock.get_ref()),
                );
            }
            fetch.pin_lockfile = Some(lock.into_inner());
        }
        if fetch.pins.is_empty() && fetch.pin_lockfile.is_none() {
            self.error(
                span.clone(),
                format!("{ctx}: a fetch step needs pins or pin_lockfile: every fetched file must match a hash pin"),
            );
        }
        if !has_output {
            self.error(
                span.clone(),
                format!("{ctx}: a fetch step needs an output workspace for the dependencies"),
            );
        }
        Some(fetch)
    }

    fn read_pins(&mut self, value: &Spanned<DeValue<'_>>, fetch: &mut FetchSpec, ctx: &str) {
        let DeValue::Array(array) = value.get_ref() else {
            self.wrong_type(
                value.span(),
                ctx,
                "pins",
                "an array of tables",
                value.get_ref(),
            );
            return;
        };
        if array.len() > MAX_PINS {
            self.error(
                value.span(),
                format!("{ctx}: more than {MAX_PINS} pins; use pin_lockfile"),
            );
            return;
        }
        for (index, element) in array.iter().enumerate() {
            let what = format!("{ctx}: pins[{index}]");
            let DeValue::Table(pin) = element.get_ref() else {
                self.wrong_type(
                    element.span(),
                    ctx,
                    &format!("pins[{index}]"),
                    "a table",
                    element.get_ref(),
                );
                continue;
            };
            self.check_keys(pin, PIN_KEYS, &what);
            let at = element.span();
            let path = self.required_string(pin, &at, "path", &what);
            let sha = self.required_string(pin, &at, "sha256", &what);
            let url = self.string(pin, "url", &what).map(Spanned::into_inner);
            if let Some(p) = &path {
                if let Some(problem) = relative_path_problem(p.get_ref()) {
                    self.error(
                        p.span(),
                        format!("{what}: path {:?} {problem}", p.get_ref()),
                    );
                } else if fetch.pins.iter().any(|known| &known.path == p.get_ref()) {
                    self.error(
                        p.span(),
                        format!("{what}: path {:?} is pinned twice", p.get_ref()),
                    );
                }
            }
            let sha256 = sha.and_then(|s| self.pin_digest(&s, &what));
            if let (Some(path), Some(sha256)) = (path, sha256) {
                fetch.pins.push(Pin {
                    path: path.into_inner(),
                    sha256,
                    url,
                });
            }
        }
    }
}
