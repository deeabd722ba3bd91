//! Unit tests for the pipeline spec: every validation rule has a test asserting line, column
//! and message.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

/// Errors of a source that must not parse, as (line, col, message).
fn errors(source: &str) -> Vec<(usize, usize, String)> {
    match parse(source, "p.toml") {
        Ok(pipeline) => panic!("expected errors, got {pipeline:#?}"),
        Err(SpecErrors(errors)) => errors
            .into_iter()
            .inspect(|e| assert_eq!(e.file, "p.toml"))
            .map(|e| (e.line, e.col, e.message))
            .collect(),
    }
}

/// Asserts that exactly these errors are reported.
#[track_caller]
fn assert_errors(source: &str, expected: &[(usize, usize, &str)]) {
    let expected: Vec<(usize, usize, String)> = expected
        .iter()
        .map(|(l, c, m)| (*l, *c, (*m).to_owned()))
        .collect();
    assert_eq!(errors(source), expected);
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const FULL: &str = r#"version = 1
name = "hello-c"
description = "builds hello"

[params.greeting]
type = "string"
default = "hello"
pattern = "[a-z ]+"
enum = ["hello", "hi"]
max_length = 64
description = "what to say"

[params.count]
type = "int"

[params.fast]
type = "bool"
default = false

[workspaces.src]
source = "hello"
description = "the sources"
[workspaces.build]
[workspaces.dist]

[[steps]]
name = "compile"
kind = "build"
inputs = ["src"]
output = "build"
run = ["cc", "-O2", "-o", "/workspace/build/hello", "hello.c"]
workdir = "src"
env = { GREETING = "${params.greeting}" }
timeout = "5m"

[[steps]]
name = "package"
kind = "publish"
inputs = ["build"]
output = "dist"
script = "set -e\ncp /workspace/build/hello /workspace/dist/ # ${params.count}"
profile = "fetch"
"#;

#[test]
fn full_pipeline_parses_to_expected_structure() {
    let pipeline = parse(FULL, "hello.toml").unwrap();
    let expected = Pipeline {
        version: 1,
        name: "hello-c".into(),
        description: Some("builds hello".into()),
        params: [
            (
                "count".to_owned(),
                ParamDecl {
                    param_type: ParamType::Int,
                    default: None,
                    pattern: None,
                    allowed: None,
                    max_length: DEFAULT_MAX_LENGTH,
                    description: None,
                },
            ),
            (
                "fast".to_owned(),
                ParamDecl {
                    param_type: ParamType::Bool,
                    default: Some("false".into()),
                    pattern: None,
                    allowed: None,
                    max_length: DEFAULT_MAX_LENGTH,
                    description: None,
                },
            ),
            (
                "greeting".to_owned(),
                ParamDecl {
                    param_type: ParamType::String,
                    default: Some("hello".into()),
                    pattern: Some("[a-z ]+".into()),
                    allowed: Some(vec!["hello".into(), "hi".into()]),
                    max_length: 64,
                    description: Some("what to say".into()),
                },
            ),
        ]
        .into(),
        workspaces: [
            (
                "build".to_owned(),
                WorkspaceDecl {
                    source: None,
                    description: None,
                },
            ),
            (
                "dist".to_owned(),
                WorkspaceDecl {
                    source: None,
                    description: None,
                },
            ),
            (
                "src".to_owned(),
                WorkspaceDecl {
                    source: Some("hello".into()),
                    description: Some("the sources".into()),
                },
            ),
        ]
        .into(),
        steps: vec![
            Step {
                name: "compile".into(),
                kind: StepKind::Build,
                command: Command::Argv(
                    ["cc", "-O2", "-o", "/workspace/build/hello", "hello.c"]
                        .map(String::from)
                        .to_vec(),
                ),
                inputs: vec!["src".into()],
                output: Some("build".into()),
                workdir: Some("src".into()),
                env: map(&[("GREETING", "${params.greeting}")]),
                timeout: Duration::from_mins(5),
                profile: "hermetic".into(),

                secrets: Vec::new(),
                image: None,
                reproducible: false,
                source: None,
                fetch: None,
            },
            Step {
                name: "package".into(),
                kind: StepKind::Publish,
                command: Command::Script(
                    "set -e\ncp /workspace/build/hello /workspace/dist/ # ${params.count}".into(),
                ),
                inputs: vec!["build".into()],
                output: Some("dist".into()),
                workdir: None,
                env: BTreeMap::new(),
                timeout: DEFAULT_TIMEOUT,
                profile: "fetch".into(),

                secrets: Vec::new(),
                image: None,
                reproducible: false,
                source: None,
                fetch: None,
            },
        ],
    };
    assert_eq!(pipeline, expected);
    assert_eq!(pipeline.producer_of("build"), Some(0));
    assert_eq!(pipeline.producer_of("dist"), Some(1));
    assert_eq!(pipeline.producer_of("src"), None);
    assert_eq!(pipeline.steps[0].workdir_path(), "/workspace/src");
    assert_eq!(pipeline.steps[1].workdir_path(), "/workspace/dist");
}

#[test]
fn pipeline_round_trips_through_json() {
    let pipeline = parse(FULL, "hello.toml").unwrap();
    let json = serde_json::to_string(&pipeline).unwrap();
    assert!(json.contains(r#""kind":"build""#), "{json}");
    let back: Pipeline = serde_json::from_str(&json).unwrap();
    assert_eq!(back, pipeline);
}

#[test]
fn minimal_pipeline_gets_defaults() {
    let pipeline = parse(
        "version = 1\nname = \"m\"\n[[steps]]\nname = \"s\"\nkind = \"run\"\nrun = [\"true\"]\n",
        "m.toml",
    )
    .unwrap();
    let step = &pipeline.steps[0];
    assert_eq!(step.timeout, Duration::from_mins(30));
    assert_eq!(step.profile, "hermetic");
    assert_eq!(step.workdir_path(), "/tmp");
    assert!(pipeline.params.is_empty() && pipeline.workspaces.is_empty());
}

#[test]
fn malformed_toml_reports_toml_span() {
    assert_errors(
        "version = 1\nname = \"p\nkind = 1\n",
        &[(2, 10, "invalid toml: invalid basic string, expected `\"`")],
    );
}

#[test]
fn duplicate_toml_key_is_a_syntax_error() {
    assert_errors(
        "version = 1\nname = \"a\"\nname = \"b\"\n",
        &[(3, 1, "invalid toml: duplicate key")],
    );
}

#[test]
fn unknown_keys_everywhere_are_all_reported() {
    let source = r#"version = 1
name = "p"
colour = "red"
[params.x]
type = "string"
regex = "a"
[workspaces.w]
path = "x"
[[steps]]
name = "s"
kind = "run"
run = ["true"]
output = "w"
tiemout = "5m"
"#;
    assert_errors(
        source,
        &[
            (
                3,
                1,
                "pipeline: unknown key \"colour\", expected one of: version, name, description, params, workspaces, steps",
            ),
            (
                6,
                1,
                "parameter \"x\": unknown key \"regex\", expected one of: type, default, pattern, enum, max_length, description",
            ),
            (
                8,
                1,
                "workspace \"w\": unknown key \"path\", expected one of: source, description",
            ),
            (
                14,
                1,
                "step \"s\": unknown key \"tiemout\", expected one of: name, kind, inputs, output, run, script, workdir, env, timeout, profile, secrets, image, reproducible, git, tarball, allow_hosts, pins, pin_lockfile",
            ),
        ],
    );
}

#[test]
fn missing_required_keys() {
    assert_errors(
        "description = \"x\"\n",
        &[
            (1, 1, "pipeline: missing required key \"version\""),
            (1, 1, "pipeline: missing required key \"name\""),
            (
                1,
                1,
                "pipeline: missing required key \"steps\" (at least one [[steps]] table)",
            ),
        ],
    );
    assert_errors(
        "version = 1\nname = \"p\"\n[params.p]\ndefault = \"x\"\n[[steps]]\nrun = [\"true\"]\n",
        &[
            (3, 1, "parameter \"p\": missing required key \"type\""),
            (5, 1, "step #1: missing required key \"name\""),
            (5, 1, "step #1: missing required key \"kind\""),
        ],
    );
}

#[test]
fn empty_steps_array_is_rejected() {
    assert_errors(
        "version = 1\nname = \"p\"\nsteps = []\n",
        &[(3, 9, "pipeline: steps must not be empty")],
    );
}

#[test]
fn wrong_version_stops_validation() {
    assert_errors(
        "version = 2\nname = \"NOT VALID\"\nfuture = true\n",
        &[(
            1,
            11,
            "unsupported spec version 2, this kiln reads version 1",
        )],
    );
    assert_errors(
        "version = \"1\"\nname = \"p\"\n[[steps]]\nname = \"s\"\nkind = \"run\"\nrun = [\"true\"]\n",
        &[(1, 11, "pipeline: version must be an integer, got string")],
    );
}

#[test]
fn bad_names() {
    let source = r#"version = 1
name = "Hello"
[params.bad-name]
type = "string"
[workspaces.Src]
[[steps]]
name = "my step"
kind = "run"
run = ["true"]
"#;
    assert_errors(
        source,
        &[
            (
                2,
                8,
                "invalid pipeline name \"Hello\": must match [a-z0-9][a-z0-9._-]{0,62}",
            ),
            (
                3,
                9,
                "invalid parameter name \"bad-name\": must match [A-Za-z_][A-Za-z0-9_]{0,63}",
            ),
            (
                5,
                13,
                "invalid workspace name \"Src\": must match [a-z0-9][a-z0-9._-]{0,62}",
            ),
            (
                7,
                8,
                "invalid step name \"my step\": must match [a-z0-9][a-z0-9._-]{0,62}",
            ),
        ],
    );
    let long = "a".repeat(64);
    let source = format!(
        "version = 1\nname = \"{long}\"\n[[steps]]\nname = \"s\"\nkind = \"run\"\nrun = [\"true\"]\n"
    );
    assert_errors(
        &source,
        &[(
            2,
            8,
            &format!("invalid pipeline name \"{long}\": must match [a-z0-9][a-z0-9._-]{{0,62}}"),
        )],
    );
}

const HEAD: &str = "version = 1\nname = \"p\"\n[workspaces.src]\nsource = \"src\"\n[workspaces.out]\n[[steps]]\nname = \"s\"\n";
// Lines 1-7 are HEAD; a test's own step keys start at line 8.

fn with_head(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

#[test]
fn unknown_step_kind_lists_valid_kinds() {
    assert_errors(
        &with_head("kind = \"compile\"\nrun = [\"true\"]\n"),
        &[(
            8,
            8,
            "step \"s\": unknown kind \"compile\", expected one of: source, fetch, build, test, publish, run",
        )],
    );
}

#[test]
fn run_and_script_exactly_one() {
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"true\"]\nscript = \"true\"\n"),
        &[(
            10,
            10,
            "step \"s\": has both run and script, use exactly one",
        )],
    );
    assert_errors(
        &with_head("kind = \"run\"\n"),
        &[(6, 1, "step \"s\": needs run (an argv) or script")],
    );
    assert_errors(
        &with_head("kind = \"run\"\nscript = \"  \"\n"),
        &[(9, 10, "step \"s\": script must not be empty")],
    );
}

#[test]
fn empty_argv_is_rejected() {
    assert_errors(
        &with_head("kind = \"run\"\nrun = []\n"),
        &[(9, 7, "step \"s\": run must not be empty")],
    );
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"\", \"x\"]\n"),
        &[(9, 8, "step \"s\": run[0] (the program) must not be empty")],
    );
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"a\", 2]\n"),
        &[(9, 13, "step \"s\": run[1] must be a string, got integer")],
    );
}

#[test]
fn undeclared_workspaces() {
    assert_errors(
        &with_head(
            "kind = \"run\"\nrun = [\"true\"]\ninputs = [\"src\", \"nope\"]\noutput = \"gone\"\nworkdir = \"out/x\"\n",
        ),
        &[
            (
                10,
                18,
                "step \"s\": input workspace \"nope\" is not declared in [workspaces]",
            ),
            (
                11,
                10,
                "step \"s\": output workspace \"gone\" is not declared in [workspaces]",
            ),
            (
                12,
                11,
                "step \"s\": workdir \"out/x\" must start with one of the step's workspaces (src, nope, gone)",
            ),
        ],
    );
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"true\"]\nworkdir = \"src\"\n"),
        &[(
            10,
            11,
            "step \"s\": workdir \"src\" must start with one of the step's workspaces, and it has none",
        )],
    );
}

#[test]
fn output_listed_as_input() {
    assert_errors(
        &with_head(
            "kind = \"build\"\nrun = [\"true\"]\ninputs = [\"src\", \"out\"]\noutput = \"out\"\n",
        ),
        &[(
            10,
            18,
            "step \"s\": workspace \"out\" is both the output and an input",
        )],
    );
}

#[test]
fn duplicate_input_is_rejected() {
    assert_errors(
        &with_head("kind = \"build\"\nrun = [\"true\"]\ninputs = [\"src\", \"src\"]\n"),
        &[(
            10,
            18,
            "step \"s\": input workspace \"src\" is listed twice",
        )],
    );
}

#[test]
fn two_writers_of_one_workspace() {
    let source = with_head(
        "kind = \"build\"\nrun = [\"true\"]\noutput = \"out\"\n[[steps]]\nname = \"t\"\nkind = \"build\"\nrun = [\"true\"]\noutput = \"out\"\n",
    );
    assert_errors(
        &source,
        &[(
            15,
            10,
            "step \"t\": workspace \"out\" is already written by step \"s\"; a workspace has exactly one writer",
        )],
    );
    assert_errors(
        &with_head("kind = \"source\"\nrun = [\"true\"]\noutput = \"src\"\n"),
        &[(
            10,
            10,
            "step \"s\": cannot write workspace \"src\": it has a source and is uploaded at submit",
        )],
    );
}

#[test]
fn workspace_read_but_never_written() {
    assert_errors(
        &with_head("kind = \"test\"\nrun = [\"true\"]\ninputs = [\"src\", \"out\"]\n"),
        &[(
            10,
            18,
            "step \"s\": reads workspace \"out\", which no step writes and which has no source",
        )],
    );
}

#[test]
fn dependency_cycle_names_its_steps() {
    let source = r#"version = 1
name = "p"
[workspaces.a]
[workspaces.b]
[workspaces.c]
[[steps]]
name = "first"
kind = "run"
run = ["true"]
inputs = ["c"]
output = "a"
[[steps]]
name = "second"
kind = "run"
run = ["true"]
inputs = ["a"]
output = "b"
[[steps]]
name = "third"
kind = "run"
run = ["true"]
inputs = ["b"]
output = "c"
"#;
    assert_errors(
        source,
        &[(
            7,
            8,
            "dependency cycle between steps: \"first\" -> \"second\" -> \"third\" -> \"first\"",
        )],
    );
}

#[test]
fn two_step_cycle_with_a_downstream_step() {
    let source = r#"version = 1
name = "p"
[workspaces.a]
[workspaces.b]
[workspaces.c]
[[steps]]
name = "after"
kind = "run"
run = ["true"]
inputs = ["a"]
output = "c"
[[steps]]
name = "x"
kind = "run"
run = ["true"]
inputs = ["b"]
output = "a"
[[steps]]
name = "y"
kind = "run"
run = ["true"]
inputs = ["a"]
output = "b"
"#;
    assert_errors(
        source,
        &[(
            13,
            8,
            "dependency cycle between steps: \"x\" -> \"y\" -> \"x\"",
        )],
    );
}

#[test]
fn duplicate_step_name_points_at_second() {
    let source = with_head(
        "kind = \"run\"\nrun = [\"true\"]\n[[steps]]\nname = \"s\"\nkind = \"run\"\nrun = [\"true\"]\n",
    );
    assert_errors(
        &source,
        &[(11, 8, "duplicate step name \"s\", first defined at line 7")],
    );
}

#[test]
fn undeclared_param_references() {
    let source = r#"version = 1
name = "p"
[params.known]
type = "string"
[[steps]]
name = "s"
kind = "run"
run = ["echo", "${params.known}", "${params.nope}"]
env = { A = "${params.other}", B = "$HOME ${X} ${params.known}" }
[[steps]]
name = "t"
kind = "run"
script = "echo ${params.open"
"#;
    assert_errors(
        source,
        &[
            (
                8,
                35,
                "step \"s\": ${params.nope} refers to undeclared parameter \"nope\"",
            ),
            (
                9,
                13,
                "step \"s\": ${params.other} refers to undeclared parameter \"other\"",
            ),
            (
                13,
                10,
                "step \"t\": unterminated \"${params.\" (missing \"}\")",
            ),
        ],
    );
}

#[test]
fn bad_param_declarations() {
    let source = r#"version = 1
name = "p"
[params.a]
type = "string"
pattern = "(a"
[params.b]
type = "int"
pattern = "[0-9]+"
[params.c]
type = "int"
default = "3"
[params.d]
type = "string"
pattern = "[a-z]+"
default = "Hi"
[params.e]
type = "string"
enum = ["x", "y"]
default = "z"
[params.f]
type = "bool"
enum = [true]
[params.g]
type = "int"
max_length = 3
[params.h]
type = "float"
[params.i]
type = "string"
max_length = 0
[params.j]
type = "string"
enum = []
[params.k]
type = "string"
pattern = "[a-z]+"
enum = ["ok", "NO"]
[params.l]
type = "string"
max_length = 2
default = "abc"
[[steps]]
name = "s"
kind = "run"
run = ["true"]
"#;
    assert_errors(
        source,
        &[
            (
                5,
                11,
                "parameter \"a\": pattern \"(a\" does not compile: unclosed group",
            ),
            (
                8,
                11,
                "parameter \"b\": pattern is only allowed on string parameters, this one is int",
            ),
            (
                11,
                11,
                "parameter \"c\": default must be an integer, got string",
            ),
            (
                15,
                11,
                "parameter \"d\": invalid default: value \"Hi\" does not match pattern \"[a-z]+\"",
            ),
            (
                19,
                11,
                "parameter \"e\": invalid default: value \"z\" is not one of \"x\", \"y\"",
            ),
            (
                22,
                8,
                "parameter \"f\": enum is only allowed on string and int parameters, this one is bool",
            ),
            (
                25,
                14,
                "parameter \"g\": max_length is only allowed on string parameters, this one is int",
            ),
            (
                27,
                8,
                "parameter \"h\": unknown type \"float\", expected one of: string, int, bool",
            ),
            (
                30,
                14,
                "parameter \"i\": max_length must be between 1 and 65536, got 0",
            ),
            (33, 8, "parameter \"j\": enum must not be empty"),
            (
                37,
                15,
                "parameter \"k\": invalid enum value: value \"NO\" does not match pattern \"[a-z]+\"",
            ),
            (
                41,
                11,
                "parameter \"l\": invalid default: value is 3 characters long, more than max_length 2",
            ),
        ],
    );
}

#[test]
fn int_param_default_and_enum_are_canonical() {
    let pipeline = parse(
        "version = 1\nname = \"p\"\n[params.n]\ntype = \"int\"\nenum = [0x10, 2]\ndefault = 1_6\n[[steps]]\nname = \"s\"\nkind = \"run\"\nrun = [\"true\"]\n",
        "p.toml",
    )
    .unwrap();
    let decl = &pipeline.params["n"];
    assert_eq!(decl.allowed, Some(vec!["16".to_owned(), "2".to_owned()]));
    assert_eq!(decl.default.as_deref(), Some("16"));
}

#[test]
fn escaping_paths_are_rejected() {
    let source = r#"version = 1
name = "p"
[workspaces.a]
source = "/etc"
[workspaces.b]
source = "x/../../y"
[workspaces.c]
source = ""
[workspaces.out]
[[steps]]
name = "s"
kind = "run"
run = ["true"]
inputs = ["a"]
output = "out"
workdir = "out/../../etc"
[[steps]]
name = "t"
kind = "run"
run = ["true"]
inputs = ["a"]
workdir = "/workspace/a"
"#;
    assert_errors(
        source,
        &[
            (
                4,
                10,
                "workspace \"a\": source \"/etc\" must be relative, not absolute",
            ),
            (
                6,
                10,
                "workspace \"b\": source \"x/../../y\" must not contain a \"..\" component",
            ),
            (8, 10, "workspace \"c\": source \"\" must not be empty"),
            (
                16,
                11,
                "step \"s\": workdir \"out/../../etc\" must not contain a \"..\" component",
            ),
            (
                22,
                11,
                "step \"t\": workdir \"/workspace/a\" must be relative, not absolute",
            ),
        ],
    );
}

#[test]
fn env_names_are_checked() {
    assert_errors(
        &with_head(
            "kind = \"run\"\nrun = [\"true\"]\nenv = { \"1X\" = \"a\", KILN_STEP = \"b\", OK_1 = \"c\", N = 3 }\n",
        ),
        &[
            (
                10,
                9,
                "step \"s\": invalid env name \"1X\": must match [A-Za-z_][A-Za-z0-9_]*",
            ),
            (
                10,
                21,
                "step \"s\": env name \"KILN_STEP\" is reserved (the KILN_ prefix belongs to the daemon)",
            ),
            (10, 54, "step \"s\": env.N must be a string, got integer"),
        ],
    );
}

#[test]
fn timeouts_are_checked() {
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"true\"]\ntimeout = \"5 parsecs\"\n"),
        &[(
            10,
            11,
            "step \"s\": invalid timeout \"5 parsecs\": unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)",
        )],
    );
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"true\"]\ntimeout = \"24h 1s\"\n"),
        &[(
            10,
            11,
            "step \"s\": timeout \"24h 1s\" is more than the maximum of 24h",
        )],
    );
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"true\"]\ntimeout = \"0s\"\n"),
        &[(10, 11, "step \"s\": timeout \"0s\" must be more than zero")],
    );
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"true\"]\ntimeout = 300\n"),
        &[(10, 11, "step \"s\": timeout must be a string, got integer")],
    );
    let ok = parse(
        &with_head("kind = \"run\"\nrun = [\"true\"]\ntimeout = \"24h\"\n"),
        "p.toml",
    )
    .unwrap();
    assert_eq!(ok.steps[0].timeout, MAX_TIMEOUT);
}

#[test]
fn profile_name_cannot_be_a_path() {
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"true\"]\nprofile = \"../../etc/x\"\n"),
        &[(
            10,
            11,
            "step \"s\": invalid profile name \"../../etc/x\": must match [a-z0-9][a-z0-9._-]{0,62}",
        )],
    );
}

#[test]
fn wrong_value_types() {
    assert_errors(
        &with_head("kind = \"run\"\nrun = \"true\"\ninputs = \"src\"\n[workspaces.x]\n"),
        &[
            (
                9,
                7,
                "step \"s\": run must be an array of strings, got string",
            ),
            (
                10,
                10,
                "step \"s\": inputs must be an array of strings, got string",
            ),
        ],
    );
    assert_errors(
        "version = 1\nname = \"p\"\nworkspaces = [\"a\"]\nsteps = { name = \"s\" }\n",
        &[
            (3, 14, "pipeline: workspaces must be a table, got array"),
            (
                4,
                9,
                "pipeline: steps must be an array of tables ([[steps]]), got table",
            ),
        ],
    );
}

#[test]
fn column_counts_characters_not_bytes() {
    // "é" and "ü" are two bytes each in UTF-8; the bad value starts at character 24 (byte 26).
    assert_errors(
        &with_head("kind = \"run\"\nrun = [\"true\"]\nenv = { \"é\" = \"ü\", X = 1 }\n"),
        &[
            (
                10,
                9,
                "step \"s\": invalid env name \"é\": must match [A-Za-z_][A-Za-z0-9_]*",
            ),
            (10, 24, "step \"s\": env.X must be a string, got integer"),
        ],
    );
}

#[test]
fn display_is_one_located_line_per_error() {
    let err = parse("version = 1\nname = \"X\"\n", "dir/p.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "dir/p.toml:1:1: pipeline: missing required key \"steps\" (at least one [[steps]] table)\n\
         dir/p.toml:2:8: invalid pipeline name \"X\": must match [a-z0-9][a-z0-9._-]{0,62}"
    );
}

/// a → (b, c) → d, written in an order where file order alone would be wrong.
const DIAMOND: &str = r#"version = 1
name = "diamond"
[workspaces.src]
source = "."
[workspaces.a]
[workspaces.b]
[workspaces.c]
[workspaces.d]
[[steps]]
name = "d"
kind = "publish"
inputs = ["b", "c"]
output = "d"
run = ["true"]
[[steps]]
name = "c"
kind = "test"
inputs = ["a"]
output = "c"
run = ["true"]
[[steps]]
name = "b"
kind = "build"
inputs = ["a"]
output = "b"
run = ["true"]
[[steps]]
name = "a"
kind = "source"
inputs = ["src"]
output = "a"
run = ["true"]
[[steps]]
name = "lone"
kind = "run"
run = ["true"]
"#;

#[test]
fn execution_order_on_a_diamond() {
    let pipeline = parse(DIAMOND, "d.toml").unwrap();
    let names: Vec<&str> = pipeline
        .execution_order()
        .into_iter()
        .map(|i| pipeline.steps[i].name.as_str())
        .collect();
    // Ready at the start: a (3) and lone (4), file order → a; then c (1), b (2) and lone are
    // ready: c, then b; then d (0) and lone (4) are ready: d comes first in the file.
    assert_eq!(names, ["a", "c", "b", "d", "lone"]);
    assert_eq!(pipeline.producer_of("d"), Some(0));
}

#[test]
fn execution_order_keeps_cyclic_steps_of_hand_built_pipelines() {
    let mut pipeline = parse(DIAMOND, "d.toml").unwrap();
    // Make a read d: a cycle a → c → d → a (and b), which parse would have refused.
    pipeline.steps[3].inputs.push("d".into());
    assert_eq!(pipeline.execution_order(), vec![4, 0, 1, 2, 3]);
}

fn params_pipeline() -> Pipeline {
    parse(
        r#"version = 1
name = "p"
[params.greeting]
type = "string"
pattern = "[a-z]+"
enum = ["hello", "hi", "hey"]
max_length = 5
[params.count]
type = "int"
default = 1
[params.loud]
type = "bool"
[params.name]
type = "string"
[[steps]]
name = "s"
kind = "run"
run = ["true"]
"#,
        "p.toml",
    )
    .unwrap()
}

#[test]
fn bind_params_collects_all_violations() {
    let pipeline = params_pipeline();
    let err = pipeline
        .bind_params(&map(&[
            ("greeting", "Hellooo"),
            ("count", "x"),
            ("loud", "yes"),
            ("extra", "1"),
        ]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        [
            r#"parameter "count": expected int, got "x""#,
            r#"parameter "greeting": value is 7 characters long, more than max_length 5"#,
            r#"parameter "greeting": value "Hellooo" does not match pattern "[a-z]+""#,
            r#"parameter "greeting": value "Hellooo" is not one of "hello", "hi", "hey""#,
            r#"parameter "loud": expected bool (true or false), got "yes""#,
            r#"parameter "name": required (it has no default) but not given"#,
            r#"parameter "extra": not declared by the pipeline"#,
        ]
        .join("\n")
    );
    assert_eq!(err.0[0].param, "count");
    assert_eq!(err.0[0].message, r#"expected int, got "x""#);
}

#[test]
fn bind_params_fills_defaults_and_canonicalises() {
    let pipeline = params_pipeline();
    let bound = pipeline
        .bind_params(&map(&[("greeting", "hi"), ("loud", "true"), ("name", "")]))
        .unwrap();
    assert_eq!(
        bound,
        map(&[
            ("count", "1"),
            ("greeting", "hi"),
            ("loud", "true"),
            ("name", "")
        ])
    );
    let bound = pipeline
        .bind_params(&map(&[
            ("greeting", "hey"),
            ("loud", "false"),
            ("name", "x"),
            ("count", "+007"),
        ]))
        .unwrap();
    assert_eq!(bound["count"], "7");
    // The pattern is a full match: "hi" matches [a-z]+ but "hi!" must not.
    let err = pipeline
        .bind_params(&map(&[
            ("greeting", "hi!"),
            ("loud", "true"),
            ("name", "x"),
        ]))
        .unwrap_err();
    assert_eq!(err.0.len(), 2, "{err}");
}

#[test]
fn render_step_substitutes_params_only() {
    let source = r#"version = 1
name = "p"
[params.who]
type = "string"
[params.n]
type = "int"
[[steps]]
name = "argv"
kind = "run"
run = ["echo", "hi ${params.who}!", "$HOME", "${X}", "${params.n}${params.n}", "${params.who"]
env = { WHO = "${params.who}", PATH_COPY = "$PATH:${PATH}" }
[[steps]]
name = "script"
kind = "run"
script = "echo \"$WHO\" ${params.who} ${HOME}"
"#;
    // The unterminated reference in argv is a validation error; build the pipeline by hand.
    let fixed = source.replace(", \"${params.who\"]", "]");
    let pipeline = parse(&fixed, "p.toml").unwrap();
    let params = map(&[("who", "${params.n} $USER"), ("n", "3")]);
    let argv_step = pipeline.render_step(0, &params);
    assert_eq!(
        argv_step.argv,
        ["echo", "hi ${params.n} $USER!", "$HOME", "${X}", "33"]
    );
    assert_eq!(
        argv_step.env,
        map(&[("PATH_COPY", "$PATH:${PATH}"), ("WHO", "${params.n} $USER")])
    );
    let script_step = pipeline.render_step(1, &params);
    assert_eq!(
        script_step.argv,
        [
            "/bin/sh",
            "-eu",
            "-c",
            "echo \"$WHO\" ${params.n} $USER ${HOME}"
        ]
    );
    assert!(script_step.env.is_empty());
    assert_eq!(pipeline.render_step(2, &params), RenderedStep::default());
}

#[test]
fn param_refs_scanner() {
    use super::params::{ParamRef, param_refs, substitute};
    assert_eq!(
        param_refs("a ${params.x} ${params.}"),
        vec![
            ParamRef::Complete {
                start: 2,
                end: 13,
                name: "x"
            },
            ParamRef::Complete {
                start: 14,
                end: 24,
                name: ""
            },
        ]
    );
    assert_eq!(param_refs("${params.x"), vec![ParamRef::Unterminated]);
    assert_eq!(
        substitute("é${params.x}ü${params.y}", &map(&[("x", "1")])),
        "é1ü${params.y}"
    );
}

#[test]
fn step_kind_and_param_type_names() {
    for kind in StepKind::ALL {
        assert_eq!(StepKind::from_name(kind.as_str()), Some(kind));
        assert_eq!(kind.to_string(), kind.as_str());
    }
    assert_eq!(StepKind::Build.as_str(), "build");
    assert_eq!(StepKind::from_name("Build"), None);
    for param_type in ParamType::ALL {
        assert_eq!(ParamType::from_name(param_type.as_str()), Some(param_type));
    }
}

#[test]
fn secrets_are_declared_per_step_and_validated() {
    let text = "version = 1\nname = \"x\"\n[[steps]]\nname = \"a\"\nkind = \"run\"\nrun = [\"true\"]\nsecrets = [\"API_TOKEN\", \"db_pass\"]\n";
    let pipeline = parse(text, "s.toml").unwrap();
    assert_eq!(pipeline.steps[0].secrets, ["API_TOKEN", "db_pass"]);
    let text = "version = 1\nname = \"x\"\n[[steps]]\nname = \"a\"\nkind = \"run\"\nrun = [\"true\"]\nsecrets = [\"../etc/shadow\", \"A\", \"A\", 3]\n";
    let errors = parse(text, "s.toml").unwrap_err().to_string();
    assert!(
        errors.contains("s.toml:7:12: step \"a\": invalid secret name \"../etc/shadow\""),
        "{errors}"
    );
    assert!(
        errors.contains("s.toml:7:34: step \"a\": secret \"A\" is listed twice"),
        "{errors}"
    );
    assert!(
        errors.contains("s.toml:7:39: step \"a\": secrets[3] must be a string"),
        "{errors}"
    );
}

/// A pipeline with one `[[steps]]` table holding `body`, and workspaces `src` and `out`.
fn one_step(body: &str) -> String {
    format!(
        "version = 1\nname = \"x\"\n[workspaces.src]\nsource = \"s\"\n[workspaces.out]\n[[steps]]\nname = \"a\"\n{body}"
    )
}

#[test]
fn source_steps_pin_a_commit_or_a_tarball_digest() {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let p = parse(
        &one_step(&format!(
            "kind = \"source\"\noutput = \"out\"\ngit = {{ repo = \"app.git\", commit = \"{commit}\" }}\n"
        )),
        "p.toml",
    )
    .unwrap();
    assert_eq!(p.steps[0].command, Command::Builtin);
    assert!(p.render_step(0, &BTreeMap::new()).argv.is_empty());
    assert_eq!(
        p.steps[0].source,
        Some(SourceSpec::Git {
            repo: "app.git".into(),
            commit: commit.into()
        })
    );
    let hex = "ab".repeat(32);
    let p = parse(
        &one_step(&format!(
            "kind = \"source\"\noutput = \"out\"\ntarball = {{ path = \"app.tar.gz\", sha256 = \"{hex}\" }}\n"
        )),
        "p.toml",
    )
    .unwrap();
    assert!(
        matches!(&p.steps[0].source, Some(SourceSpec::Tarball { sha256, .. }) if sha256.hex() == hex)
    );

    let errors = parse(
        &one_step(
            "kind = \"source\"\nrun = [\"x\"]\ngit = { repo = \"r\", commit = \"main\", depth = 1 }\n",
        ),
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "p.toml:10:38: step \"a\": git: unknown key \"depth\"",
        "p.toml:10:30: step \"a\": git: commit \"main\" must be a full commit id",
        "p.toml:9:7: step \"a\": a source step with git or tarball has no run",
        "p.toml:6:1: step \"a\": a source step needs an output workspace",
    ] {
        assert!(errors.contains(want), "missing {want:?} in:\n{errors}");
    }
    let errors = parse(
        &one_step(
            "kind = \"build\"\nrun = [\"x\"]\ntarball = { path = \"/abs\", sha256 = \"zz\" }\n",
        ),
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains(
            "p.toml:10:11: step \"a\": tarball is only allowed in a step of kind \"source\""
        ),
        "{errors}"
    );
}

#[test]
fn fetch_steps_need_pins_and_valid_hosts() {
    let hex = "cd".repeat(32);
    let p = parse(
        &one_step(&format!(
            "kind = \"fetch\"\ninputs = [\"src\"]\noutput = \"out\"\nrun = [\"true\"]\nallow_hosts = [\"Static.Crates.io\", \"127.0.0.1:8080\"]\npins = [{{ path = \"a/b.crate\", sha256 = \"sha256:{hex}\", url = \"https://x/b\" }}]\npin_lockfile = \"src/Cargo.lock\"\n"
        )),
        "p.toml",
    )
    .unwrap();
    let fetch = p.steps[0].fetch.clone().unwrap();
    assert_eq!(
        fetch
            .allow_hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["static.crates.io:443", "127.0.0.1:8080"]
    );
    assert_eq!(fetch.pins[0].path, "a/b.crate");
    assert_eq!(fetch.pins[0].sha256.hex(), hex);
    assert_eq!(fetch.pin_lockfile.as_deref(), Some("src/Cargo.lock"));

    let errors = parse(
        &one_step("kind = \"fetch\"\nrun = [\"true\"]\nallow_hosts = [\"*.evil.com\"]\npins = [{ path = \"../x\", sha256 = \"nothex\" }]\n"),
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "p.toml:10:16: step \"a\": allow_hosts: \"*.evil.com\": not a host name",
        "p.toml:11:18: step \"a\": pins[0]: path \"../x\" must not contain",
        "p.toml:11:35: step \"a\": pins[0]: sha256 \"nothex\" must be 64 lowercase hex digits",
        "p.toml:6:1: step \"a\": a fetch step needs an output workspace",
    ] {
        assert!(errors.contains(want), "missing {want:?} in:\n{errors}");
    }
    let errors = parse(
        &one_step("kind = \"fetch\"\noutput = \"out\"\nrun = [\"true\"]\n"),
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("a fetch step needs pins or pin_lockfile"),
        "{errors}"
    );
    let errors = parse(
        &one_step("kind = \"build\"\nrun = [\"true\"]\nallow_hosts = [\"x.org\"]\n"),
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains(
            "p.toml:10:15: step \"a\": allow_hosts is only allowed in a step of kind \"fetch\""
        ),
        "{errors}"
    );
}

#[test]
fn image_and_reproducible() {
    let hex = "ef".repeat(32);
    let p = parse(
        &one_step(&format!(
            "kind = \"build\"\noutput = \"out\"\nrun = [\"true\"]\nimage = \"sha256:{hex}\"\nreproducible = true\n"
        )),
        "p.toml",
    )
    .unwrap();
    assert_eq!(p.steps[0].image.map(|d| d.hex()), Some(hex.clone()));
    assert!(p.steps[0].reproducible);
    let errors = parse(
        &one_step(&format!(
            "kind = \"test\"\nrun = [\"true\"]\nimage = \"{hex}\"\nreproducible = true\n"
        )),
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("p.toml:10:9: step \"a\": image"),
        "{errors}"
    );
    assert!(
        errors.contains("p.toml:11:16: step \"a\": reproducible = true needs an output workspace"),
        "{errors}"
    );
}
