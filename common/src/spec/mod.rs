//! Pipeline spec v1: the TOML pipeline file, parsed and validated with `file:line:col` diagnostics.
//!
//! This module owns the pipeline format (its reference is `docs/pipeline.md`): [`parse`] turns a
//! pipeline file into a [`Pipeline`] or into *every* problem found ([`SpecErrors`]); the
//! [`Pipeline`] then answers the questions the daemon asks while running a job: in which order
//! the steps run ([`Pipeline::execution_order`]), which step writes a workspace
//! ([`Pipeline::producer_of`]), whether submitted parameters are acceptable
//! ([`Pipeline::bind_params`]) and what exactly a step executes ([`Pipeline::render_step`]).
//!
//! Submodules: `read` walks the spanned TOML tree (per-key checks), `graph` holds the
//! workspace-dependency graph (ordering, cycles), `params` holds parameter checking and
//! `${params.NAME}` substitution.

mod graph;
pub mod kinds;
mod params;
mod read;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use kinds::{FetchSpec, HostPort, Pin, SourceSpec};
pub use params::{ParamError, ParamErrors, RenderedStep};

/// The only pipeline spec version this crate reads (`version = 1`).
pub const SPEC_VERSION: u32 = 1;
/// Step timeout when `timeout` is absent.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(30);
/// Largest accepted step `timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_hours(24);
/// Sandbox profile when `profile` is absent.
pub const DEFAULT_PROFILE: &str = "hermetic";
/// Sandbox profile of a `kind = "fetch"` step when `profile` is absent.
pub const FETCH_PROFILE: &str = "fetch";
/// `max_length` of a string parameter when absent (in characters).
pub const DEFAULT_MAX_LENGTH: usize = 256;
/// Largest accepted `max_length`: values end up in argv/env, where Linux caps one string at 128 KiB.
pub const MAX_MAX_LENGTH: usize = 65_536;
/// Where workspaces are mounted inside a step's sandbox (`/workspace/<name>`).
pub const WORKSPACE_ROOT: &str = "/workspace";
/// Working directory of a step that has no workspace at all.
pub const FALLBACK_WORKDIR: &str = "/tmp";
/// Where a step's declared secrets are mounted (`/run/secrets/<NAME>`, read-only tmpfs).
pub const SECRETS_DIR: &str = "/run/secrets";

/// A validated pipeline (spec v1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Spec version; always [`SPEC_VERSION`] after [`parse`].
    pub version: u32,
    /// Pipeline name, `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Declared parameters by name.
    pub params: BTreeMap<String, ParamDecl>,
    /// Declared workspaces by name.
    pub workspaces: BTreeMap<String, WorkspaceDecl>,
    /// Steps in file order (see [`Pipeline::execution_order`] for run order).
    pub steps: Vec<Step>,
}

/// A declared parameter (`[params.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamDecl {
    /// Value type.
    pub param_type: ParamType,
    /// Default value in canonical text form (ints as decimal, bools as `true`/`false`);
    /// `None` means the parameter is required at submit.
    pub default: Option<String>,
    /// Regex the whole value must match (string parameters only), as written in the file;
    /// it is anchored (`^(?:…)$`) when applied.
    pub pattern: Option<String>,
    /// Allowed values (`enum` in the file), canonical text form.
    pub allowed: Option<Vec<String>>,
    /// Maximum value length in characters (string parameters only; [`DEFAULT_MAX_LENGTH`] if absent).
    pub max_length: usize,
    /// Free text.
    pub description: Option<String>,
}

/// Type of a parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// Any text (subject to `pattern`, `enum`, `max_length`).
    String,
    /// A signed 64-bit decimal integer.
    Int,
    /// `true` or `false`.
    Bool,
}

impl ParamType {
    /// Every type, in the order the docs list them.
    pub const ALL: [Self; 3] = [Self::String, Self::Int, Self::Bool];

    /// The name used in pipeline files (`"string"`, `"int"`, `"bool"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Int => "int",
            Self::Bool => "bool",
        }
    }

    /// The type named `name` in a pipeline file, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A declared workspace (`[workspaces.NAME]`), mounted at `/workspace/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceDecl {
    /// Directory relative to the pipeline file, uploaded by the CLI at submit. A workspace with a
    /// source is never written by a step.
    pub source: Option<String>,
    /// Free text.
    pub description: Option<String>,
}

/// What a step is for; admission and provenance treat kinds differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// Materialises sources into a workspace.
    Source,
    /// Downloads dependencies (the only kind expected to need network, through the proxy).
    Fetch,
    /// Compiles.
    Build,
    /// Runs tests.
    Test,
    /// Packages or exports artifacts.
    Publish,
    /// Anything else.
    Run,
}

impl StepKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [Self; 6] = [
        Self::Source,
        Self::Fetch,
        Self::Build,
        Self::Test,
        Self::Publish,
        Self::Run,
    ];

    /// The name used in pipeline files (`"build"` etc.).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Fetch => "fetch",
            Self::Build => "build",
            Self::Test => "test",
            Self::Publish => "publish",
            Self::Run => "run",
        }
    }

    /// The kind named `name` in a pipeline file, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a step executes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// `run = [...]`: executed directly (no shell); never empty after [`parse`].
    Argv(Vec<String>),
    /// `script = "..."`: executed as `/bin/sh -eu -c SCRIPT`.
    Script(String),
    /// No `run`/`script`: kilnd supplies the command (a source step with `git` or `tarball`);
    /// [`Step::render`] gives an empty argv.
    Builtin,
}

/// One step (`[[steps]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Unique step name, `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
    /// Step kind.
    pub kind: StepKind,
    /// Program or script.
    pub command: Command,
    /// Workspaces mounted read-only, in file order.
    pub inputs: Vec<String>,
    /// The one workspace mounted read-write (starts empty).
    pub output: Option<String>,
    /// Working directory relative to `/workspace` as written; see [`Step::workdir_path`].
    pub workdir: Option<String>,
    /// Extra environment (values may contain `${params.NAME}`).
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Sandbox profile name (existence is checked by the daemon).
    pub profile: String,
    /// Secrets the step may read, as files `/run/secrets/<NAME>` (resolved by the daemon from its
    /// secret directory; never in the environment, the logs or the CAS).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// `image = "sha256:…"`: the step's root filesystem is this imported image (`kiln image
    /// import`) instead of the profile's read-only host toolchain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::digest::Digest>,
    /// `reproducible = true`: kilnd runs the step twice in fresh workers and records whether the
    /// outputs match.
    #[serde(default)]
    pub reproducible: bool,
    /// `git`/`tarball` of a `kind = "source"` step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceSpec>,
    /// Allowlist and pins of a `kind = "fetch"` step (always present for that kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchSpec>,
}

impl Step {
    /// The absolute working directory inside the sandbox: `/workspace/<workdir>` if set, else
    /// the output workspace, else the first input, else [`FALLBACK_WORKDIR`].
    pub fn workdir_path(&self) -> String {
        match self
            .workdir
            .as_deref()
            .or(self.output.as_deref())
            .or(self.inputs.first().map(String::as_str))
        {
            Some(relative) => format!("{WORKSPACE_ROOT}/{relative}"),
            None => FALLBACK_WORKDIR.to_owned(),
        }
    }

    /// The step's argv (a script becomes `["/bin/sh", "-eu", "-c", script]`) and env with
    /// `${params.NAME}` replaced by `params[NAME]`; see [`Pipeline::render_step`].
    pub fn render(&self, params: &BTreeMap<String, String>) -> RenderedStep {
        params::render(self, params)
    }
}

/// Every diagnostic found in a pipeline file, sorted by position.
///
/// Validation does not stop at the first problem (except for a TOML syntax error or an
/// unsupported `version`). Display is one `file:line:col: message` per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}", display_lines(.0))]
pub struct SpecErrors(pub Vec<SpecError>);

/// One diagnostic at a position of a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct SpecError {
    /// File name as passed to [`parse`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub col: usize,
    /// What is wrong, showing the offending value.
    pub message: String,
}

/// Joins displayable items with newlines (the Display of the error collections).
pub(crate) fn display_lines<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses and validates a pipeline file. `file` is only used in diagnostics.
pub fn parse(source: &str, file: &str) -> Result<Pipeline, SpecErrors> {
    let lines = LineIndex::new(source);
    let to_errors = |diags: Vec<read::Diag>| {
        let mut errors: Vec<SpecError> = diags
            .into_iter()
            .map(|diag| {
                let (line, col) = lines.line_col(diag.span.start);
                SpecError {
                    file: file.to_owned(),
                    line,
                    col,
                    message: diag.message,
                }
            })
            .collect();
        errors.sort_by_key(|e| (e.line, e.col));
        SpecErrors(errors)
    };
    let (root, syntax) = toml::de::DeTable::parse_recoverable(source);
    // Error recovery after the first syntax error mostly produces follow-on noise: report the
    // earliest one only.
    if let Some(first) = syntax
        .iter()
        .min_by_key(|e| e.span().map_or(0, |s| s.start))
    {
        let span = first.span().unwrap_or(0..0);
        let message = format!("invalid toml: {}", first.message().replace('\n', "; "));
        return Err(to_errors(vec![read::Diag { span, message }]));
    }
    read::read(&root, &lines).map_err(to_errors)
}

impl Pipeline {
    /// Step indices in dependency order: the producer of a workspace runs before its readers;
    /// among steps that are ready at the same time, file order wins. Steps caught in a cycle
    /// (impossible after [`parse`]) are appended in file order.
    pub fn execution_order(&self) -> Vec<usize> {
        let preds = graph::predecessors(&self.steps);
        let (mut order, rest) = graph::topological_order(&preds);
        order.extend(rest);
        order
    }

    /// Index of the step whose `output` is `workspace` (the first one, should a hand-built
    /// pipeline have several).
    pub fn producer_of(&self, workspace: &str) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| s.output.as_deref() == Some(workspace))
    }

    /// Checks submitted values against the declarations and returns the complete, canonical
    /// parameter set (defaults filled in, ints in decimal form).
    ///
    /// Reports every violation: undeclared name, wrong type (`int` must parse as i64, `bool` is
    /// `true`/`false`), `pattern`, `enum`, `max_length`, and required parameters not given.
    pub fn bind_params(
        &self,
        given: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, ParamErrors> {
        params::bind(&self.params, given)
    }

    /// The argv (`Script` ⇒ `["/bin/sh", "-eu", "-c", script]`) and env of step `index`, with
    /// every `${params.NAME}` whose NAME is in `params` replaced by its value (one pass: a
    /// substituted value is not scanned again); any other `$`/`${…}` is left for the shell.
    ///
    /// Pass the output of [`Pipeline::bind_params`]. An `index` out of range yields an empty
    /// [`RenderedStep`] (no argv), which no sandbox executes.
    pub fn render_step(&self, index: usize, params: &BTreeMap<String, String>) -> RenderedStep {
        self.steps
            .get(index)
            .map(|step| step.render(params))
            .unwrap_or_default()
    }
}

/// Byte offset → 1-based (line, column in characters).
pub(crate) struct LineIndex<'s> {
    source: &'s str,
    /// Byte offset of the start of each line.
    starts: Vec<usize>,
}

impl<'s> LineIndex<'s> {
    pub(crate) fn new(source: &'s str) -> Self {
        let starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { source, starts }
    }

    /// 1-based line and character column of byte `offset` (clamped to the source).
    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.source.len());
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self
            .starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        let col = self
            .source
            .get(start..offset)
            .map_or(offset - start, |text| text.chars().count());
        (line.max(1), col + 1)
    }
}

/// `[a-z0-9][a-z0-9._-]{0,62}`: pipeline, step, workspace and profile names.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let Some((first, rest)) = name.as_bytes().split_first() else {
        return false;
    };
    name.len() <= 63
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && rest
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

/// The name rule in messages.
pub(crate) const NAME_RULE: &str = "[a-z0-9][a-z0-9._-]{0,62}";

/// `[A-Za-z_][A-Za-z0-9_]*`: environment variable names (and, up to 64 characters, parameter names).
pub(crate) fn is_identifier(name: &str) -> bool {
    let Some((first, rest)) = name.as_bytes().split_first() else {
        return false;
    };
    (first.is_ascii_alphabetic() || *first == b'_')
        && rest.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}
