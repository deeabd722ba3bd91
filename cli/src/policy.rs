//! `kiln verify ARTIFACT --policy FILE.rego`: a Rego policy over the verified chain (regorus, pure
//! Rust). The policy sees [`kiln_common::policy::PolicyInput`] as `input` (docs/policy.md) and must
//! define the set `data.kiln.deny` of messages; the artifact passes when the set is empty.

use anyhow::{Context, bail};
use kiln_common::policy::PolicyInput;

/// The rule every verification policy defines.
pub const DENY_RULE: &str = "data.kiln.deny";
/// How a policy defines it, for error messages.
const SHAPE: &str = "`package kiln` with rules `deny contains msg if { … }`";

/// Evaluate policy text (`name` is used in messages).
pub fn evaluate_text(name: &str, rego: &str, input: &PolicyInput) -> anyhow::Result<Vec<String>> {
    evaluate_json(name, rego, &serde_json::to_string(input)?)
}

/// Evaluate policy text over an input document given as JSON text.
fn evaluate_json(name: &str, rego: &str, json: &str) -> anyhow::Result<Vec<String>> {
    let mut engine = regorus::Engine::new();
    engine
        .add_policy(name.to_owned(), rego.to_owned())
        .with_context(|| format!("policy {name}"))?;
    engine.set_input(regorus::Value::from_json_str(json)?);
    let deny = engine
        .eval_rule(DENY_RULE.to_owned())
        .with_context(|| format!("policy {name} must define {DENY_RULE} ({SHAPE})"))?;
    if deny == regorus::Value::Undefined {
        bail!("policy {name} does not define {DENY_RULE} ({SHAPE})");
    }
    let set = deny
        .as_set()
        .with_context(|| format!("{DENY_RULE} of policy {name} must be a set of strings"))?;
    let mut messages = Vec::with_capacity(set.len());
    for value in set {
        messages.push(match value {
            regorus::Value::String(s) => s.to_string(),
            other => other.to_json_str().unwrap_or_else(|_| format!("{other:?}")),
        });
    }
    messages.sort();
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../docs/examples/require-test.rego");

    fn input(kinds: &[(&str, &str)]) -> PolicyInput {
        use kiln_common::Digest;
        use kiln_common::policy::{ArtifactInput, JobInput, PipelineInput, SignerInput, StepInput};
        let step = |name: &str, kind: &str| StepInput {
            name: name.into(),
            outcome: "succeeded".into(),
            attested: true,
            kind: Some(kind.into()),
            profile: Some("hermetic".into()),
            network: Some("none".into()),
            teardown_verified: true,
            observed: false,
            exit_code: Some(0),
            signer: Some(SignerInput {
                keyid: "k".into(),
                kind: "software".into(),
            }),
            builder_id: Some("b".into()),
            pipeline_digest: None,
            pipeline_signer: None,
            inputs: Vec::new(),
            output_workspace: None,
            outputs: Vec::new(),
            started_on: None,
            finished_on: None,
            dependencies: Vec::new(),
            internal_parameters: serde_json::json!({ "kind": kind }),
        };
        PolicyInput {
            artifact: ArtifactInput {
                name: "a".into(),
                digest: Digest::of(b"a"),
                subject: "a".into(),
                step: "package".into(),
            },
            job: JobInput {
                id: "j".into(),
                outcome: "succeeded".into(),
                builder_id: "b".into(),
                signer: SignerInput {
                    keyid: "k".into(),
                    kind: "software".into(),
                },
                started_on: String::new(),
                finished_on: String::new(),
            },
            pipeline: PipelineInput {
                name: "p".into(),
                digest: Digest::of(b"p"),
                signer: None,
            },
            parameters: std::collections::BTreeMap::new(),
            sources: std::collections::BTreeMap::new(),
            steps: kinds.iter().map(|(n, k)| step(n, k)).collect(),
            chain: Vec::new(),
            attestations: Vec::new(),
        }
    }

    #[test]
    fn example_policy_requires_a_test_step_before_publish() {
        let ok = input(&[
            ("compile", "build"),
            ("test", "test"),
            ("package", "publish"),
        ]);
        assert_eq!(
            evaluate_text("ex.rego", EXAMPLE, &ok).unwrap(),
            Vec::<String>::new()
        );
        let missing = input(&[("compile", "build"), ("package", "publish")]);
        let deny = evaluate_text("ex.rego", EXAMPLE, &missing).unwrap();
        assert!(deny.iter().any(|m| m.contains("no test step")), "{deny:?}");
        let late = input(&[
            ("compile", "build"),
            ("package", "publish"),
            ("test", "test"),
        ]);
        let deny = evaluate_text("ex.rego", EXAMPLE, &late).unwrap();
        assert!(deny.iter().any(|m| m.contains("after")), "{deny:?}");
    }

    const RELEASE: &str = include_str!("../../examples/release/policy.rego");

    /// The policy input of a release job as `make demo` produces it (the fields the release
    /// policy reads).
    fn release_input() -> serde_json::Value {
        let step = |name: &str, kind: &str, network: &str, internal: serde_json::Value| {
            let mut internal = internal;
            internal["kind"] = kind.into();
            serde_json::json!({
                "name": name, "kind": kind, "outcome": "succeeded", "attested": true,
                "network": network, "teardownVerified": true, "observed": true,
                "internalParameters": internal,
            })
        };
        serde_json::json!({
            "steps": [
                step("source", "source", "none", serde_json::json!({
                    "source": { "type": "git", "commit": "b9bc5d3c10f38714cdcb0764407b88f8839a59c4" }
                })),
                step("fetch", "fetch", "proxy", serde_json::json!({
                    "fetch": {
                        "connections": [ { "method": "GET", "host": "127.0.0.1", "port": 8471, "allowed": true } ],
                        "pins": [ { "path": "libgreet-1.0.tar.gz", "result": "ok" } ]
                    }
                })),
                step("build", "build", "none", serde_json::json!({ "reproducible": { "match": true } })),
                step("test", "test", "none", serde_json::json!({})),
                step("publish", "publish", "none", serde_json::json!({})),
            ],
            "attestations": [
                { "step": "publish", "name": "sbom", "predicateType": "https://cyclonedx.org/bom" },
                { "step": "publish", "name": "test-result:test", "predicateType": "https://in-toto.io/attestation/test-result/v0.1" }
            ]
        })
    }

    /// A change to the release input that the policy must refuse.
    type Break = fn(&mut serde_json::Value);

    #[test]
    fn release_policy_accepts_the_release_chain_and_names_each_violation() {
        let eval = |input: &serde_json::Value| {
            evaluate_json("release.rego", RELEASE, &input.to_string()).unwrap()
        };
        assert_eq!(eval(&release_input()), Vec::<String>::new());
        let violations: [(&str, Break); 9] = [
            ("build step \"build\" had network", |i| {
                i["steps"][2]["network"] = "proxy".into();
            }),
            ("connected to evil.example:443", |i| {
                i["steps"][1]["internalParameters"]["fetch"]["connections"][0]["host"] =
                    "evil.example".into();
                i["steps"][1]["internalParameters"]["fetch"]["connections"][0]["port"] = 443.into();
            }),
            ("libgreet-1.0.tar.gz is mismatch", |i| {
                i["steps"][1]["internalParameters"]["fetch"]["pins"][0]["result"] =
                    "mismatch".into();
            }),
            ("not shown to be reproducible", |i| {
                i["steps"][2]["internalParameters"]["reproducible"]["match"] = false.into();
            }),
            ("not the release commit", |i| {
                i["steps"][0]["internalParameters"]["source"]["commit"] = "0".repeat(40).into();
            }),
            ("ran unobserved", |i| {
                i["steps"][3]["observed"] = false.into();
            }),
            ("no SBOM", |i| {
                i["attestations"].as_array_mut().unwrap().remove(0);
            }),
            ("no signed result of test step", |i| {
                i["attestations"].as_array_mut().unwrap().remove(1);
            }),
            ("test step \"test\" runs after publish step", |i| {
                i["steps"].as_array_mut().unwrap().swap(3, 4);
            }),
        ];
        for (want, break_it) in violations {
            let mut input = release_input();
            break_it(&mut input);
            let deny = eval(&input);
            assert!(
                deny.iter().any(|m| m.contains(want)),
                "{want:?} not in {deny:?}"
            );
        }
    }

    #[test]
    fn a_policy_without_deny_is_an_error() {
        let err =
            evaluate_text("x.rego", "package other\nallow := true\n", &input(&[])).unwrap_err();
        assert!(
            err.to_string().contains("must define data.kiln.deny"),
            "{err:#}"
        );
    }
}
