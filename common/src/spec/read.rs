//! Reading the spanned TOML tree into a [`Pipeline`], collecting every diagnostic with its span.
//!
//! The tree is walked by hand (not `serde` + `deny_unknown_fields`) so that one pass reports all
//! problems: unknown keys, wrong types, bad values, cross-references. When a value is wrong a
//! placeholder stands in for it so the remaining checks still run; the pipeline is only returned
//! when no diagnostic was recorded.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

mod kinds;

use super::params::{ParamRef, check_value, compile_pattern, param_refs};
use super::{
    Command, DEFAULT_MAX_LENGTH, DEFAULT_PROFILE, DEFAULT_TIMEOUT, FETCH_PROFILE, LineIndex,
    MAX_MAX_LENGTH, MAX_TIMEOUT, NAME_RULE, ParamDecl, ParamType, Pipeline, SPEC_VERSION, Step,
    StepKind, WorkspaceDecl, graph, is_identifier, is_valid_name,
};

/// Byte range in the pipeline file.
pub(super) type Span = Range<usize>;

/// A diagnostic before it gets its `file:line:col`.
#[derive(Debug)]
pub(super) struct Diag {
    /// Where (only `start` is reported).
    pub(super) span: Span,
    /// What is wrong.
    pub(super) message: String,
}

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "description",
    "params",
    "workspaces",
    "steps",
];
const PARAM_KEYS: &[&str] = &[
    "type",
    "default",
    "pattern",
    "enum",
    "max_length",
    "description",
];
const WORKSPACE_KEYS: &[&str] = &["source", "description"];
const STEP_KEYS: &[&str] = &[
    "name",
    "kind",
    "inputs",
    "output",
    "run",
    "script",
    "workdir",
    "env",
    "timeout",
    "profile",
    "secrets",
    "image",
    "reproducible",
    "git",
    "tarball",
    "allow_hosts",
    "pins",
    "pin_lockfile",
];
/// Longest parameter name (parameter names are identifiers, as env names are).
const MAX_PARAM_NAME: usize = 64;
/// Longest secret name (a file name in the secret directory and under `/run/secrets`).
const MAX_SECRET_NAME: usize = 64;
/// Env names with this prefix are set by the daemon.
const RESERVED_ENV_PREFIX: &str = "KILN_";

/// Where the cross-step checks point for one step.
struct StepSpans {
    /// `step "name"`, or `step #N` when the name is missing.
    label: String,
    /// The `[[steps]]` header (or inline table).
    table: Span,
    name: Option<Span>,
    /// Parallel to `Step::inputs`.
    inputs: Vec<Span>,
    output: Option<Span>,
}

/// Reads and validates the whole document.
pub(super) fn read(
    root: &Spanned<DeTable<'_>>,
    lines: &LineIndex<'_>,
) -> Result<Pipeline, Vec<Diag>> {
    let mut reader = Reader::default();
    let table = root.get_ref();
    let root_span = root.span();
    let ctx = "pipeline";

    // A file written for another version is not validated further: its keys may mean other things.
    let version = reader.required_integer(table, &root_span, "version", ctx);
    if let Some(version) = &version
        && *version.get_ref() != i64::from(SPEC_VERSION)
    {
        return Err(vec![Diag {
            span: version.span(),
            message: format!(
                "unsupported spec version {}, this kiln reads version {SPEC_VERSION}",
                version.get_ref()
            ),
        }]);
    }
    reader.check_keys(table, TOP_KEYS, ctx);

    let name = reader.required_string(table, &root_span, "name", ctx);
    if let Some(name) = &name
        && !is_valid_name(name.get_ref())
    {
        reader.error(
            name.span(),
            format!(
                "invalid pipeline name {:?}: must match {NAME_RULE}",
                name.get_ref()
            ),
        );
    }
    let description = reader
        .string(table, "description", ctx)
        .map(Spanned::into_inner);
    let params = reader.read_params(table, ctx);
    let workspaces = reader.read_workspaces(table, ctx);

    let mut steps = Vec::new();
    let mut spans = Vec::new();
    match table.get("steps") {
        None => reader.error(
            root_span.clone(),
            format!("{ctx}: missing required key \"steps\" (at least one [[steps]] table)"),
        ),
        Some(value) => match value.get_ref() {
            DeValue::Array(array) if array.is_empty() => {
                reader.error(value.span(), format!("{ctx}: steps must not be empty"));
            }
            DeValue::Array(array) => {
                for (index, element) in array.iter().enumerate() {
                    if let DeValue::Table(step_table) = element.get_ref() {
                        let (step, step_spans) = reader.read_step(
                            index,
                            element.span(),
                            step_table,
                            &params,
                            &workspaces,
                        );
                        steps.push(step);
                        spans.push(step_spans);
                    } else {
                        reader.wrong_type(
                            element.span(),
                            ctx,
                            &format!("steps[{index}]"),
                            "a table",
                            element.get_ref(),
                        );
                    }
                }
            }
            other => reader.wrong_type(
                value.span(),
                ctx,
                "steps",
                "an array of tables ([[steps]])",
                other,
            ),
        },
    }
    reader.check_steps(&steps, &spans, &workspaces, lines);

    if !reader.diags.is_empty() {
        return Err(reader.diags);
    }
    Ok(Pipeline {
        version: SPEC_VERSION,
        name: name.map(Spanned::into_inner).unwrap_or_default(),
        description,
        params,
        workspaces,
        steps,
    })
}

/// Why a relative path is unacceptable, if it is.
fn relative_path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        Some("must not be empty")
    } else if path.starts_with('/') {
        Some("must be relative, not absolute")
    } else if path.split('/').any(|component| component == "..") {
        Some("must not contain a \"..\" component")
    } else if path.contains('\0') {
        Some("must not contain a NUL character")
    } else {
        None
    }
}

#[derive(Default)]
struct Reader {
    diags: Vec<Diag>,
}

impl Reader {
    fn error(&mut self, span: Span, message: String) {
        self.diags.push(Diag { span, message });
    }

    fn wrong_type(
        &mut self,
        span: Span,
        ctx: &str,
        what: &str,
        expected: &str,
        value: &DeValue<'_>,
    ) {
        self.error(
            span,
            format!("{ctx}: {what} must be {expected}, got {}", value.type_str()),
        );
    }

    fn missing(&mut self, table_span: &Span, ctx: &str, key: &str) {
        self.error(
            table_span.clone(),
            format!("{ctx}: missing required key {key:?}"),
        );
    }

    /// The `deny_unknown_fields` check, naming each unknown key at its own position.
    fn check_keys(&mut self, table: &DeTable<'_>, allowed: &[&str], ctx: &str) {
        for key in table.keys() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                self.error(
                    key.span(),
                    format!(
                        "{ctx}: unknown key {:?}, expected one of: {}",
                        key.get_ref(),
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    fn string(&mut self, table: &DeTable<'_>, key: &str, ctx: &str) -> Option<Spanned<String>> {
        let value = table.get(key)?;
        if let DeValue::String(text) = value.get_ref() {
            Some(Spanned::new(value.span(), text.to_string()))
        } else {
            self.wrong_type(value.span(), ctx, key, "a string", value.get_ref());
            None
        }
    }

    fn required_string(
        &mut self,
        table: &DeTable<'_>,
        table_span: &Span,
        key: &str,
        ctx: &str,
    ) -> Option<Spanned<String>> {
        if !table.contains_key(key) {
            self.missing(table_span, ctx, key);
        }
        self.string(table, key, ctx)
    }

    fn integer(&mut self, table: &DeTable<'_>, key: &str, ctx: &str) -> Option<Spanned<i64>> {
        let value = table.get(key)?;
        if let DeValue::Integer(integer) = value.get_ref() {
            if let Ok(n) = i64::from_str_radix(integer.as_str(), integer.radix()) {
                return Some(Spanned::new(value.span(), n));
            }
            self.error(
                value.span(),
                format!("{ctx}: {key} {integer} does not fit in 64 bits"),
            );
        } else {
            self.wrong_type(value.span(), ctx, key, "an integer", value.get_ref());
        }
        None
    }

    fn required_integer(
        &mut self,
        table: &DeTable<'_>,
        table_span: &Span,
        key: &str,
        ctx: &str,
    ) -> Option<Spanned<i64>> {
        if !table.contains_key(key) {
            self.missing(table_span, ctx, key);
        }
        self.integer(table, key, ctx)
    }

    /// An array of strings; wrong elements are reported and left out.
    fn strings(
        &mut self,
        table: &DeTable<'_>,
        key: &str,
        ctx: &str,
    ) -> Option<Spanned<Vec<Spanned<String>>>> {
        let value = table.get(key)?;
        let DeValue::Array(array) = value.get_ref() else {
            self.wrong_type(
                value.span(),
                ctx,
                key,
                "an array of strings",
                value.get_ref(),
            );
            return None;
        };
        let mut items = Vec::with_capacity(array.len());
        for (index, element) in array.iter().enumerate() {
            if let DeValue::String(text) = element.get_ref() {
                items.push(Spanned::new(element.span(), text.to_string()));
            } else {
                self.wrong_type(
                    element.span(),
                    ctx,
                    &format!("{key}[{index}]"),
                    "a string",
                    element.get_ref(),
                );
            }
        }
        Some(Spanned::new(value.span(), items))
    }

    fn table<'t, 'i>(
        &mut self,
        table: &'t DeTable<'i>,
        key: &str,
        ctx: &str,
    ) -> Option<(Span, &'t DeTable<'i>)> {
        let value = table.get(key)?;
        if let DeValue::Table(inner) = value.get_ref() {
            Some((value.span(), inner))
        } else {
            self.wrong_type(value.span(), ctx, key, "a table", value.get_ref());
            None
        }
    }

    /// Reports each `${params.X}` in `text` whose X is not declared, at the string's position.
    fn check_param_refs(
        &mut self,
        text: &Spanned<String>,
        ctx: &str,
        params: &BTreeMap<String, ParamDecl>,
    ) {
        for reference in param_refs(text.get_ref()) {
            match reference {
                ParamRef::Complete { name, .. } if !params.contains_key(name) => self.error(
                    text.span(),
                    format!("{ctx}: ${{params.{name}}} refers to undeclared parameter {name:?}"),
                ),
                ParamRef::Complete { .. } => {}
                ParamRef::Unterminated => self.error(
                    text.span(),
                    format!("{ctx}: unterminated \"${{params.\" (missing \"}}\")"),
                ),
            }
        }
    }

    fn read_params(&mut self, top: &DeTable<'_>, ctx: &str) -> BTreeMap<String, ParamDecl> {
        let mut params = BTreeMap::new();
        let Some((_, table)) = self.table(top, "params", ctx) else {
            return params;
        };
        for (key, value) in table {
            let name = key.get_ref().to_string();
            if !is_identifier(&name) || name.len() > MAX_PARAM_NAME {
                self.error(
                    key.span(),
                    format!(
                        "invalid parameter name {name:?}: must match [A-Za-z_][A-Za-z0-9_]{{0,63}}"
                    ),
                );
            }
            let ctx = format!("parameter {name:?}");
            let DeValue::Table(decl_table) = value.get_ref() else {
                self.wrong_type(
                    value.span(),
                    &ctx,
                    "its declaration",
                    "a table",
                    value.get_ref(),
                );
                continue;
            };
            // Declared even when broken, so references to it are not reported a second time.
            let decl = self.read_param(value.span(), decl_table, &ctx);
            params.insert(name, decl);
        }
        params
    }

    fn read_param(&mut self, span: Span, table: &DeTable<'_>, ctx: &str) -> ParamDecl {
        let errors_before = self.diags.len();
        self.check_keys(table, PARAM_KEYS, ctx);
        let param_type = self
            .required_string(table, &span, "type", ctx)
            .and_then(|name| {
                let found = ParamType::from_name(name.get_ref());
                if found.is_none() {
                    let all: Vec<&str> = ParamType::ALL.iter().map(|t| t.as_str()).collect();
                    self.error(
                        name.span(),
                        format!(
                            "{ctx}: unknown type {:?}, expected one of: {}",
                            name.get_ref(),
                            all.join(", ")
                        ),
                    );
                }
                found
            });
        let description = self
            .string(table, "description", ctx)
            .map(Spanned::into_inner);

        let pattern = self.string(table, "pattern", ctx);
        if let Some(pattern) = &pattern {
            match param_type {
                Some(ParamType::String) => {
                    if let Err(message) = compile_pattern(pattern.get_ref()) {
                        self.error(pattern.span(), format!("{ctx}: {message}"));
                    }
                }
                Some(other) => self.error(
                    pattern.span(),
                    format!(
                        "{ctx}: pattern is only allowed on string parameters, this one is {other}"
                    ),
                ),
                None => {}
            }
        }

        let mut max_length = DEFAULT_MAX_LENGTH;
        if let Some(given) = self.integer(table, "max_length", ctx) {
            match param_type {
                Some(ParamType::String) => match usize::try_from(*given.get_ref()) {
                    Ok(n) if (1..=MAX_MAX_LENGTH).contains(&n) => max_length = n,
                    _ => self.error(
                        given.span(),
                        format!(
                            "{ctx}: max_length must be between 1 and {MAX_MAX_LENGTH}, got {}",
                            given.get_ref()
                        ),
                    ),
                },
                Some(other) => self.error(
                    given.span(),
                    format!("{ctx}: max_length is only allowed on string parameters, this one is {other}"),
                ),
                None => {}
            }
        }

        let allowed = param_type.and_then(|t| self.read_enum(table, t, ctx));
        let default = param_type.and_then(|t| {
            let value = table.get("default")?;
            let text = typed_text(value.get_ref(), t);
            if text.is_none() {
                self.wrong_type(
                    value.span(),
                    ctx,
                    "default",
                    expected_toml_type(t),
                    value.get_ref(),
                );
            }
            text.map(|text| Spanned::new(value.span(), text))
        });

        let mut decl = ParamDecl {
            param_type: param_type.unwrap_or(ParamType::String),
            default: None,
            pattern: pattern.map(Spanned::into_inner),
            allowed: allowed
                .as_ref()
                .map(|a| a.iter().map(|v| v.get_ref().clone()).collect()),
            max_length,
            description,
        };
        // The declaration's own values must pass its own checks; only meaningful if it is sound.
        if self.diags.len() == errors_before {
            for value in allowed.iter().flatten() {
                if let Err(problems) = check_value(&decl, value.get_ref(), false) {
                    for problem in problems {
                        self.error(
                            value.span(),
                            format!("{ctx}: invalid enum value: {problem}"),
                        );
                    }
                }
            }
            if let Some(value) = &default
                && let Err(problems) = check_value(&decl, value.get_ref(), true)
            {
                for problem in problems {
                    self.error(value.span(), format!("{ctx}: invalid default: {problem}"));
                }
            }
        }
        decl.default = default.map(Spanned::into_inner);
        decl
    }

    fn read_enum(
        &mut self,
        table: &DeTable<'_>,
        param_type: ParamType,
        ctx: &str,
    ) -> Option<Vec<Spanned<String>>> {
        let value = table.get("enum")?;
        if param_type == ParamType::Bool {
            self.error(
                value.span(),
                format!(
                    "{ctx}: enum is only allowed on string and int parameters, this one is bool"
                ),
            );
            return None;
        }
        let DeValue::Array(array) = value.get_ref() else {
            self.wrong_type(value.span(), ctx, "enum", "an array", value.get_ref());
            return None;
        };
        if array.is_empty() {
            self.error(value.span(), format!("{ctx}: enum must not be empty"));
            return None;
        }
        let mut items = Vec::with_capacity(array.len());
        for (index, element) in array.iter().enumerate() {
            match typed_text(element.get_ref(), param_type) {
                Some(text) => items.push(Spanned::new(element.span(), text)),
                None => self.wrong_type(
                    element.span(),
                    ctx,
                    &format!("enum[{index}]"),
                    expected_toml_type(param_type),
                    element.get_ref(),
                ),
            }
        }
        Some(items)
    }

    fn read_workspaces(&mut self, top: &DeTable<'_>, ctx: &str) -> BTreeMap<String, WorkspaceDecl> {
        let mut workspaces = BTreeMap::new();
        let Some((_, table)) = self.table(top, "workspaces", ctx) else {
            return workspaces;
        };
        for (key, value) in table {
            let name = key.get_ref().to_string();
            if !is_valid_name(&name) {
                self.error(
                    key.span(),
                    format!("invalid workspace name {name:?}: must match {NAME_RULE}"),
                );
            }
            let ctx = format!("workspace {name:?}");
            let DeValue::Table(decl) = value.get_ref() else {
                self.wrong_type(
                    value.span(),
                    &ctx,
                    "its declaration",
                    "a table",
                    value.get_ref(),
                );
                continue;
            };
            self.check_keys(decl, WORKSPACE_KEYS, &ctx);
            let source = self.string(decl, "source", &ctx);
            if let Some(source) = &source
                && let Some(problem) = relative_path_problem(source.get_ref())
            {
                self.error(
                    source.span(),
                    format!("{ctx}: source {:?} {problem}", source.get_ref()),
                );
            }
            let description = self
                .string(decl, "description", &ctx)
                .map(Spanned::into_inner);
            workspaces.insert(
                name,
                WorkspaceDecl {
                    source: source.map(Spanned::into_inner),
                    description,
                },
            );
        }
        workspaces
    }

    fn read_step(
        &mut self,
        index: usize,
        span: Span,
        table: &DeTable<'_>,
        params: &BTreeMap<String, ParamDecl>,
        workspaces: &BTreeMap<String, WorkspaceDecl>,
    ) -> (Step, StepSpans) {
        let name = self.required_string(table, &span, "name", &format!("step #{}", index + 1));
        let label = match &name {
            Some(name) => {
                if !is_valid_name(name.get_ref()) {
                    self.error(
                        name.span(),
                        format!(
                            "invalid step name {:?}: must match {NAME_RULE}",
                            name.get_ref()
                        ),
                    );
                }
                format!("step {:?}", name.get_ref())
            }
            None => format!("step #{}", index + 1),
        };
        let ctx = label.as_str();
        self.check_keys(table, STEP_KEYS, ctx);

        let kind = self
            .required_string(table, &span, "kind", ctx)
            .and_then(|kind| {
                let found = StepKind::from_name(kind.get_ref());
                if found.is_none() {
                    let all: Vec<&str> = StepKind::ALL.iter().map(|k| k.as_str()).collect();
                    self.error(
                        kind.span(),
                        format!(
                            "{ctx}: unknown kind {:?}, expected one of: {}",
                            kind.get_ref(),
                            all.join(", ")
                        ),
                    );
                }
                found
            });

        // Workspaces: only declared ones are kept, so the cross-step checks see no ghosts.
        let listed_inputs = self
            .strings(table, "inputs", ctx)
            .map(Spanned::into_inner)
            .unwrap_or_default();
        let output = self.string(table, "output", ctx);
        let mut step_workspaces: Vec<&str> =
            listed_inputs.iter().map(|i| i.get_ref().as_str()).collect();
        let mut kept_output = None;
        if let Some(output) = &output {
            step_workspaces.push(output.get_ref());
            if workspaces.contains_key(output.get_ref()) {
                kept_output = Some(output.clone());
            } else {
                self.error(
                    output.span(),
                    format!(
                        "{ctx}: output workspace {:?} is not declared in [workspaces]",
                        output.get_ref()
                    ),
                );
            }
        }
        let mut inputs = Vec::new();
        let mut input_spans = Vec::new();
        for input in &listed_inputs {
            let input_name = input.get_ref();
            if !workspaces.contains_key(input_name) {
                self.error(
                    input.span(),
                    format!(
                        "{ctx}: input workspace {input_name:?} is not declared in [workspaces]"
                    ),
                );
            } else if inputs.contains(input_name) {
                self.error(
                    input.span(),
                    format!("{ctx}: input workspace {input_name:?} is listed twice"),
                );
            } else if output.as_ref().is_some_and(|o| o.get_ref() == input_name) {
                self.error(
                    input.span(),
                    format!("{ctx}: workspace {input_name:?} is both the output and an input"),
                );
            } else {
                inputs.push(input_name.clone());
                input_spans.push(input.span());
            }
        }

        let run = self.strings(table, "run", ctx);
        let script = self.string(table, "script", ctx);
        let builtin_source = kind == Some(StepKind::Source)
            && (table.contains_key("git") || table.contains_key("tarball"));
        let mut command = match (run, script) {
            // kilnd runs the ingest; `read_kind_keys` reports a run/script given anyway.
            _ if builtin_source => Command::Builtin,
            (Some(_), Some(script)) => {
                self.error(
                    script.span(),
                    format!("{ctx}: has both run and script, use exactly one"),
                );
                Command::Argv(Vec::new())
            }
            (None, None) => {
                // A run/script of the wrong type was reported already.
                if !table.contains_key("run") && !table.contains_key("script") {
                    self.error(
                        span.clone(),
                        format!("{ctx}: needs run (an argv) or script"),
                    );
                }
                Command::Argv(Vec::new())
            }
            (Some(run), None) => {
                match run.get_ref().first() {
                    None => self.error(run.span(), format!("{ctx}: run must not be empty")),
                    Some(program) if program.get_ref().is_empty() => self.error(
                        program.span(),
                        format!("{ctx}: run[0] (the program) must not be empty"),
                    ),
                    Some(_) => {}
                }
                for arg in run.get_ref() {
                    self.check_param_refs(arg, ctx, params);
                }
                Command::Argv(
                    run.into_inner()
                        .into_iter()
                        .map(Spanned::into_inner)
                        .collect(),
                )
            }
            (None, Some(script)) => {
                if script.get_ref().trim().is_empty() {
                    self.error(script.span(), format!("{ctx}: script must not be empty"));
                }
                self.check_param_refs(&script, ctx, params);
                Command::Script(script.into_inner())
            }
        };

        let workdir = self.string(table, "workdir", ctx);
        if let Some(workdir) = &workdir {
            let path = workdir.get_ref();
            let first = path.split('/').next().unwrap_or_default();
            if let Some(problem) = relative_path_problem(path) {
                self.error(workdir.span(), format!("{ctx}: workdir {path:?} {problem}"));
            } else if step_workspaces.is_empty() {
                self.error(
                    workdir.span(),
                    format!("{ctx}: workdir {path:?} must start with one of the step's workspaces, and it has none"),
                );
            } else if !step_workspaces.contains(&first) {
                self.error(
                    workdir.span(),
                    format!(
                        "{ctx}: workdir {path:?} must start with one of the step's workspaces ({})",
                        step_workspaces.join(", ")
                    ),
                );
            }
        }

        let env = self.read_env(table, ctx, params);
        let secrets = self.read_secrets(table, ctx);
        let kind_keys =
            self.read_kind_keys(table, &span, kind, &mut command, output.is_some(), ctx);

        let mut timeout = DEFAULT_TIMEOUT;
        if let Some(given) = self.string(table, "timeout", ctx) {
            match humantime::parse_duration(given.get_ref()) {
                Err(err) => self.error(
                    given.span(),
                    format!("{ctx}: invalid timeout {:?}: {err}", given.get_ref()),
                ),
                Ok(duration) if duration.is_zero() => self.error(
                    given.span(),
                    format!(
                        "{ctx}: timeout {:?} must be more than zero",
                        given.get_ref()
                    ),
                ),
                Ok(duration) if duration > MAX_TIMEOUT => self.error(
                    given.span(),
                    format!(
                        "{ctx}: timeout {:?} is more than the maximum of 24h",
                        given.get_ref()
                    ),
                ),
                Ok(duration) => timeout = duration,
            }
        }

        let profile = self.string(table, "profile", ctx);
        if let Some(profile) = &profile
            && !is_valid_name(profile.get_ref())
        {
            self.error(
                profile.span(),
                format!(
                    "{ctx}: invalid profile name {:?}: must match {NAME_RULE}",
                    profile.get_ref()
                ),
            );
        }

        let spans = StepSpans {
            label: label.clone(),
            table: span,
            name: name.as_ref().map(Spanned::span),
            inputs: input_spans,
            output: kept_output.as_ref().map(Spanned::span),
        };
        let step = Step {
            name: name.map(Spanned::into_inner).unwrap_or_default(),
            kind: kind.unwrap_or(StepKind::Run),
            command,
            inputs,
            output: kept_output.map(Spanned::into_inner),
            workdir: workdir.map(Spanned::into_inner),
            env,
            timeout,
            // A fetch step defaults to the `fetch` profile (CA certificates for TLS through the
            // proxy); every other kind to the hermetic one.
            profile: profile.map_or_else(
                || {
                    if kind == Some(StepKind::Fetch) {
                        FETCH_PROFILE.to_owned()
                    } else {
                        DEFAULT_PROFILE.to_owned()
                    }
                },
                Spanned::into_inner,
            ),
            secrets,
            image: kind_keys.image,
            reproducible: kind_keys.reproducible,
            source: kind_keys.source,
            fetch: kind_keys.fetch,
        };
        (step, spans)
    }

    /// `secrets = ["NAME", …]`: names (identifiers up to [`MAX_SECRET_NAME`] characters, each once)
    /// of files in the node's secret directory, mounted at `/run/secrets/NAME`.
    fn read_secrets(&mut self, step: &DeTable<'_>, ctx: &str) -> Vec<String> {
        let mut secrets: Vec<String> = Vec::new();
        let Some(listed) = self.strings(step, "secrets", ctx) else {
            return secrets;
        };
        for name in listed.into_inner() {
            let text = name.get_ref();
            if !is_identifier(text) || text.len() > MAX_SECRET_NAME {
                self.error(
                    name.span(),
                    format!(
                        "{ctx}: invalid secret name {text:?}: must match [A-Za-z_][A-Za-z0-9_]* (at most {MAX_SECRET_NAME} characters)"
                    ),
                );
            } else if secrets.contains(text) {
                self.error(
                    name.span(),
                    format!("{ctx}: secret {text:?} is listed twice"),
                );
            } else {
                secrets.push(name.into_inner());
            }
        }
        secrets
    }

    fn read_env(
        &mut self,
        step: &DeTable<'_>,
        ctx: &str,
        params: &BTreeMap<String, ParamDecl>,
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Some((_, table)) = self.table(step, "env", ctx) else {
            return env;
        };
        for (key, value) in table {
            let name = key.get_ref().to_string();
            if !is_identifier(&name) {
                self.error(
                    key.span(),
                    format!("{ctx}: invalid env name {name:?}: must match [A-Za-z_][A-Za-z0-9_]*"),
                );
            } else if name.starts_with(RESERVED_ENV_PREFIX) {
                self.error(
                    key.span(),
                    format!("{ctx}: env name {name:?} is reserved (the {RESERVED_ENV_PREFIX} prefix belongs to the daemon)"),
                );
            }
            if let DeValue::String(text) = value.get_ref() {
                let text = Spanned::new(value.span(), text.to_string());
                self.check_param_refs(&text, ctx, params);
                env.insert(name, text.into_inner());
            } else {
                self.wrong_type(
                    value.span(),
                    ctx,
                    &format!("env.{name}"),
                    "a string",
                    value.get_ref(),
                );
            }
        }
        env
    }

    /// Checks that need all steps: unique names, one writer per workspace, every read workspace
    /// has a writer or a source, no dependency cycle.
    fn check_steps(
        &mut self,
        steps: &[Step],
        spans: &[StepSpans],
        workspaces: &BTreeMap<String, WorkspaceDecl>,
        lines: &LineIndex<'_>,
    ) {
        let mut first_named: BTreeMap<&str, &StepSpans> = BTreeMap::new();
        let mut writers: BTreeMap<&str, &StepSpans> = BTreeMap::new();
        for (step, at) in steps.iter().zip(spans) {
            if let Some(name_span) = &at.name {
                if let Some(first) = first_named.get(step.name.as_str()) {
                    let (line, _) = lines.line_col(first.name.as_ref().map_or(0, |s| s.start));
                    self.error(
                        name_span.clone(),
                        format!(
                            "duplicate step name {:?}, first defined at line {line}",
                            step.name
                        ),
                    );
                } else {
                    first_named.insert(&step.name, at);
                }
            }
            if let (Some(output), Some(output_span)) = (step.output.as_deref(), &at.output) {
                let has_source = workspaces.get(output).is_some_and(|w| w.source.is_some());
                if has_source {
                    self.error(
                        output_span.clone(),
                        format!(
                            "{}: cannot write workspace {output:?}: it has a source and is uploaded at submit",
                            at.label
                        ),
                    );
                } else if let Some(writer) = writers.get(output) {
                    self.error(
                        output_span.clone(),
                        format!(
                            "{}: workspace {output:?} is already written by {}; a workspace has exactly one writer",
                            at.label, writer.label
                        ),
                    );
                } else {
                    writers.insert(output, at);
                }
            }
        }
        for (step, at) in steps.iter().zip(spans) {
            for (input, input_span) in step.inputs.iter().zip(&at.inputs) {
                let has_source = workspaces.get(input).is_some_and(|w| w.source.is_some());
                if !has_source && !writers.contains_key(input.as_str()) {
                    self.error(
                        input_span.clone(),
                        format!(
                            "{}: reads workspace {input:?}, which no step writes and which has no source",
                            at.label
                        ),
                    );
                }
            }
        }
        let preds = graph::predecessors(steps);
        let (_, stuck) = graph::topological_order(&preds);
        for cycle in graph::cycles(&preds, &stuck) {
            let names: Vec<String> = cycle
                .iter()
                .chain(cycle.first())
                .filter_map(|&i| steps.get(i))
                .map(|s| format!("{:?}", s.name))
                .collect();
            let Some(at) = cycle.first().and_then(|&i| spans.get(i)) else {
                continue;
            };
            self.error(
                at.name.clone().unwrap_or_else(|| at.table.clone()),
                format!("dependency cycle between steps: {}", names.join(" -> ")),
            );
        }
    }
}

/// A TOML value as the canonical text of a `param_type` value, if it has the matching TOML type.
fn typed_text(value: &DeValue<'_>, param_type: ParamType) -> Option<String> {
    match (param_type, value) {
        (ParamType::String, DeValue::String(text)) => Some(text.to_string()),
        (ParamType::Int, DeValue::Integer(integer)) => {
            i64::from_str_radix(integer.as_str(), integer.radix())
                .ok()
                .map(|n| n.to_string())
        }
        (ParamType::Bool, DeValue::Boolean(flag)) => Some(flag.to_string()),
        _ => None,
    }
}

/// The TOML type a `param_type` value is written as, for messages.
fn expected_toml_type(param_type: ParamType) -> &'static str {
    match param_type {
        ParamType::String => "a string",
        ParamType::Int => "an integer",
        ParamType::Bool => "a boolean",
    }
}
