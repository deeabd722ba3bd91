//! Parameters: checking values against their declarations, and `${params.NAME}` substitution.
//!
//! One checker ([`check_value`]) serves both submit-time binding and the validation of a
//! declaration's own `default` and `enum` values, so the two can never disagree.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::{Command, ParamDecl, ParamType, Step, display_lines};

/// Opening of a parameter reference; the reference ends at the next `}`.
const REF_OPEN: &str = "${params.";
/// Compiled-pattern size cap: patterns come from untrusted pipeline files.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A step ready to execute: parameters substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedStep {
    /// Program and arguments (`argv[0]` is the program).
    pub argv: Vec<String>,
    /// The step's own environment (the daemon adds `PATH`, `HOME`, `TMPDIR`, `KILN_*`).
    pub env: BTreeMap<String, String>,
}

/// Every parameter violation found by [`super::Pipeline::bind_params`]; Display is one per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}", display_lines(.0))]
pub struct ParamErrors(pub Vec<ParamError>);

/// One parameter violation, e.g. `parameter "count": expected int, got "x"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("parameter {param:?}: {message}")]
pub struct ParamError {
    /// Parameter name as given or declared.
    pub param: String,
    /// What is wrong, showing the offending value.
    pub message: String,
}

/// Compiles a parameter pattern as a full match.
pub(super) fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|err| {
            // regex syntax errors are multi-line with a caret diagram; the last line says why.
            let text = err.to_string();
            let reason = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid regex")
                .trim()
                .trim_start_matches("error: ")
                .to_owned();
            format!("pattern {pattern:?} does not compile: {reason}")
        })
}

/// Checks one value against a declaration; `Ok` holds the canonical form (ints in decimal).
/// `check_enum` is off while validating the `enum` values themselves.
pub(super) fn check_value(
    decl: &ParamDecl,
    value: &str,
    check_enum: bool,
) -> Result<String, Vec<String>> {
    let mut problems = Vec::new();
    let canonical = match decl.param_type {
        ParamType::Int => match value.parse::<i64>() {
            Ok(n) => n.to_string(),
            Err(_) => return Err(vec![format!("expected int, got {value:?}")]),
        },
        ParamType::Bool => match value {
            "true" | "false" => value.to_owned(),
            _ => {
                return Err(vec![format!(
                    "expected bool (true or false), got {value:?}"
                )]);
            }
        },
        ParamType::String => {
            let length = value.chars().count();
            if length > decl.max_length {
                problems.push(format!(
                    "value is {length} characters long, more than max_length {}",
                    decl.max_length
                ));
            }
            if let Some(pattern) = decl.pattern.as_deref() {
                match compile_pattern(pattern) {
                    Ok(regex) if !regex.is_match(value) => problems.push(format!(
                        "value {value:?} does not match pattern {pattern:?}"
                    )),
                    Ok(_) => {}
                    Err(message) => problems.push(message),
                }
            }
            value.to_owned()
        }
    };
    if check_enum
        && let Some(allowed) = decl.allowed.as_ref()
        && !allowed.contains(&canonical)
    {
        let list: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        problems.push(format!("value {value:?} is not one of {}", list.join(", ")));
    }
    if problems.is_empty() {
        Ok(canonical)
    } else {
        Err(problems)
    }
}

/// [`super::Pipeline::bind_params`].
pub(super) fn bind(
    declared: &BTreeMap<String, ParamDecl>,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ParamErrors> {
    let mut errors = Vec::new();
    let mut bound = BTreeMap::new();
    for (name, decl) in declared {
        let value = match (given.get(name), decl.default.as_ref()) {
            (Some(value), _) => value,
            (None, Some(default)) => default,
            (None, None) => {
                errors.push(ParamError {
                    param: name.clone(),
                    message: "required (it has no default) but not given".to_owned(),
                });
                continue;
            }
        };
        match check_value(decl, value, true) {
            Ok(canonical) => {
                bound.insert(name.clone(), canonical);
            }
            Err(problems) => errors.extend(problems.into_iter().map(|message| ParamError {
                param: name.clone(),
                message,
            })),
        }
    }
    for name in given.keys().filter(|n| !declared.contains_key(*n)) {
        errors.push(ParamError {
            param: name.clone(),
            message: "not declared by the pipeline".to_owned(),
        });
    }
    if errors.is_empty() {
        Ok(bound)
    } else {
        Err(ParamErrors(errors))
    }
}

/// A `${params.…` occurrence in a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ParamRef<'s> {
    /// `${params.NAME}` spanning bytes `start..end` of the string.
    Complete {
        /// Byte offset of `$`.
        start: usize,
        /// Byte offset just past `}`.
        end: usize,
        /// Text between `${params.` and `}`.
        name: &'s str,
    },
    /// `${params.` with no closing `}`.
    Unterminated,
}

/// Every parameter reference in `text`, left to right.
pub(super) fn param_refs(text: &str) -> Vec<ParamRef<'_>> {
    let mut refs = Vec::new();
    let mut from = 0;
    while let Some(found) = text.get(from..).and_then(|rest| rest.find(REF_OPEN)) {
        let start = from + found;
        let name_start = start + REF_OPEN.len();
        let Some(close) = text.get(name_start..).and_then(|rest| rest.find('}')) else {
            refs.push(ParamRef::Unterminated);
            break;
        };
        let name_end = name_start + close;
        refs.push(ParamRef::Complete {
            start,
            end: name_end + 1,
            name: text.get(name_start..name_end).unwrap_or_default(),
        });
        from = name_end + 1;
    }
    refs
}

/// Replaces each `${params.NAME}` with NAME in `params` by its value, in one pass.
pub(super) fn substitute(text: &str, params: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for reference in param_refs(text) {
        if let ParamRef::Complete { start, end, name } = reference
            && let Some(value) = params.get(name)
        {
            out.push_str(text.get(copied..start).unwrap_or_default());
            out.push_str(value);
            copied = end;
        }
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    out
}

/// [`Step::render`].
pub(super) fn render(step: &Step, params: &BTreeMap<String, String>) -> RenderedStep {
    let argv = match &step.command {
        Command::Argv(argv) => argv.iter().map(|arg| substitute(arg, params)).collect(),
        Command::Script(script) => vec![
            "/bin/sh".to_owned(),
            "-eu".to_owned(),
            "-c".to_owned(),
            substitute(script, params),
        ],
        Command::Builtin => Vec::new(),
    };
    let env = step
        .env
        .iter()
        .map(|(name, value)| (name.clone(), substitute(value, params)))
        .collect();
    RenderedStep { argv, env }
}
