//! The admission controller (seed: "policy management + admission controller"): what may enter
//! the factory.
//!
//! - Job admission ([`Admission::admit_job`]): the definition's signature against the policy
//!   ([`policy`]), a static scan for hard-coded secrets (`kiln_common::secretscan`), parameters
//!   only as declared, and declared secrets that the node can hand out ([`secrets`]). Every
//!   violation is listed in one refusal; nothing is stored before the job passes.
//! - Secrets at runtime ([`secrets`]): values read when the step starts, redacted from logs.
//! - Step admission ([`step`]): input workspaces re-verified against their signed attestations
//!   before each step.

pub mod policy;
pub mod secrets;
pub mod step;

use std::collections::BTreeMap;

use kiln_common::api::SubmitJobRequest;
use kiln_common::definition;
use kiln_common::spec::{self, Pipeline};
use tracing::warn;

use crate::config::AdmissionConfig;
use crate::pipeline::SubmitError;
pub use policy::{Policy, PolicyError};
pub use secrets::{Redactor, SecretDir, SecretValue};

/// The node's admission settings, loaded once at start.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The signature policy; `None` when no policy file is configured (every pipeline is admitted
    /// unsigned, with a warning).
    pub policy: Option<Policy>,
    /// Where step secrets come from.
    pub secrets: SecretDir,
}

/// A job that passed the definition checks, with the problems found so far (the scheduler adds
/// its own: profiles, sources).
#[derive(Debug)]
pub struct AdmittedJob {
    /// The parsed pipeline.
    pub pipeline: Pipeline,
    /// Bound parameters (empty if they were refused: `problems` says why).
    pub params: BTreeMap<String, String>,
    /// keyid of the accepted signer; `None` if admitted unsigned.
    pub signer: Option<String>,
    /// Every violation found, in check order: signature, secret scan, parameters, secrets.
    pub problems: Vec<String>,
}

impl Admission {
    /// Load the configured policy (if any).
    pub fn load(config: &AdmissionConfig) -> Result<Self, PolicyError> {
        let policy = config.policy.as_deref().map(Policy::load).transpose()?;
        if policy.is_none() {
            warn!(
                "no admission policy configured ([admission] policy): every pipeline is admitted unsigned"
            );
        }
        Ok(Self {
            policy,
            secrets: SecretDir {
                path: config.secrets_dir.clone(),
            },
        })
    }

    /// The node's cap on fetch destinations: the policy's `[fetch] allow_hosts`, or `None`
    /// without a policy file (then the pipeline's `allow_hosts` decide).
    pub fn fetch_cap(&self) -> crate::fetch::NodeCap<'_> {
        self.policy
            .as_ref()
            .map(|p| (p.fetch_allow_hosts.as_slice(), p.path.as_path()))
    }

    /// Job admission of a submitted definition. `Err` only for a pipeline that does not parse (its
    /// diagnostics, plus any secret-scan findings); otherwise every problem is in
    /// [`AdmittedJob::problems`].
    pub fn admit_job(&self, req: &SubmitJobRequest) -> Result<AdmittedJob, SubmitError> {
        // The scan reads the raw text: a secret in a file that does not even parse has leaked too.
        let findings: Vec<String> = kiln_common::secretscan::scan(&req.pipeline, &req.file_name)
            .iter()
            .map(ToString::to_string)
            .collect();
        let pipeline = match spec::parse(&req.pipeline, &req.file_name) {
            Ok(pipeline) => pipeline,
            Err(errors) if findings.is_empty() => return Err(SubmitError::Spec(errors)),
            Err(errors) => {
                let mut problems = findings;
                problems.extend(errors.0.iter().map(ToString::to_string));
                return Err(SubmitError::Refused(problems));
            }
        };
        let mut problems = Vec::new();
        let signer = match self.check_signature(&pipeline.name, req) {
            Ok(signer) => signer,
            Err(problem) => {
                problems.push(problem);
                None
            }
        };
        problems.extend(findings);
        let params = match pipeline.bind_params(&req.params) {
            Ok(params) => params,
            Err(errors) => {
                problems.extend(errors.0.iter().map(ToString::to_string));
                BTreeMap::new()
            }
        };
        for step in &pipeline.steps {
            problems.extend(self.secrets.check(&step.name, &step.secrets));
        }
        problems.extend(crate::fetch::admission_problems(
            &pipeline,
            self.fetch_cap(),
        ));
        Ok(AdmittedJob {
            pipeline,
            params,
            signer,
            problems,
        })
    }

    /// The definition's signature under the policy: `Ok(Some(keyid))` for an accepted signer,
    /// `Ok(None)` when unsigned is allowed, `Err(reason)` otherwise.
    fn check_signature(
        &self,
        pipeline: &str,
        req: &SubmitJobRequest,
    ) -> Result<Option<String>, String> {
        let Some(policy) = &self.policy else {
            warn!(%pipeline, "admitting the pipeline without checking its signature: no admission policy is configured");
            return Ok(None);
        };
        let requirement = policy.requirement(pipeline);
        let source = match requirement.rule {
            Some(rule) => format!("rule {:?} of {}", rule.name, policy.path.display()),
            None => format!("the default of {}", policy.path.display()),
        };
        let allowed = || {
            requirement
                .signers
                .iter()
                .map(kiln_common::keys::PublicKey::keyid)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &req.signature {
            Some(envelope) if !requirement.signers.is_empty() => {
                definition::verify(envelope, req.pipeline.as_bytes(), requirement.signers)
                    .map(Some)
                    .map_err(|e| {
                        format!(
                            "pipeline {pipeline:?} refused: {e} (allowed signers: {}; {source})",
                            allowed()
                        )
                    })
            }
            None if requirement.allow_unsigned => {
                warn!(%pipeline, %source, "admitting an unsigned pipeline: the policy allows it");
                Ok(None)
            }
            // No signers to check it against: a signature can only be ignored, which is only
            // acceptable where unsigned pipelines are.
            Some(_) if requirement.allow_unsigned => {
                warn!(%pipeline, %source, "pipeline signature not checked: the policy names no signers for it; admitted as unsigned");
                Ok(None)
            }
            None if requirement.signers.is_empty() => Err(format!(
                "pipeline {pipeline:?} refused: no policy rule admits it ({source} refuses unmatched pipelines)"
            )),
            Some(_) => Err(format!(
                "pipeline {pipeline:?} refused: no policy rule names signers for it ({source} refuses unmatched pipelines)"
            )),
            None => Err(format!(
                "pipeline {pipeline:?} refused: it is not signed, and {source} requires a signature by one of: {} (sign it with `kiln pipeline sign`)",
                allowed()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kiln_common::keys::SigningKey;

    use super::*;

    const PIPELINE: &str = "version = 1\nname = \"hello-c\"\n[params.n]\ntype = \"int\"\ndefault = 1\n[[steps]]\nname = \"a\"\nkind = \"run\"\nrun = [\"true\"]\n";

    fn request(text: &str, signature: Option<kiln_common::dsse::Envelope>) -> SubmitJobRequest {
        SubmitJobRequest {
            pipeline: text.into(),
            file_name: "p.toml".into(),
            params: BTreeMap::new(),
            sources: BTreeMap::new(),
            repos: BTreeMap::new(),
            signature,
        }
    }

    fn admission(policy: &str) -> Admission {
        Admission {
            policy: Some(Policy::parse(policy, Path::new("/etc/kiln/policy.toml")).unwrap()),
            secrets: SecretDir {
                path: "/nonexistent".into(),
            },
        }
    }

    #[test]
    fn signatures_are_checked_against_the_matching_rule() {
        let key = SigningKey::generate().unwrap().0;
        let other = SigningKey::generate().unwrap().0;
        let a = admission(&format!(
            "[[pipelines]]\nname = \"hello-*\"\nsigners = ['''{}''']\n",
            key.public_key().to_pem()
        ));
        let signed = definition::sign(PIPELINE.as_bytes(), &key).unwrap();
        let job = a
            .admit_job(&request(PIPELINE, Some(signed.clone())))
            .unwrap();
        assert_eq!(job.signer, Some(key.public_key().keyid()));
        assert!(job.problems.is_empty(), "{:?}", job.problems);

        let unsigned = a.admit_job(&request(PIPELINE, None)).unwrap();
        assert!(
            unsigned.problems[0].contains("it is not signed"),
            "{:?}",
            unsigned.problems
        );

        let wrong = definition::sign(PIPELINE.as_bytes(), &other).unwrap();
        let job = a.admit_job(&request(PIPELINE, Some(wrong))).unwrap();
        assert!(
            job.problems[0].contains("no signature from a trusted key"),
            "{:?}",
            job.problems
        );

        let modified = PIPELINE.replace("default = 1", "default = 2");
        let job = a.admit_job(&request(&modified, Some(signed))).unwrap();
        assert!(
            job.problems[0].contains("modified after it was signed"),
            "{:?}",
            job.problems
        );

        let renamed = PIPELINE.replace("hello-c", "other");
        let job = a.admit_job(&request(&renamed, None)).unwrap();
        assert!(
            job.problems[0].contains("no policy rule admits it"),
            "{:?}",
            job.problems
        );
    }

    #[test]
    fn every_violation_is_listed_together() {
        let a = admission("allow_unsigned = true\n");
        let text = PIPELINE.replace(
            "run = [\"true\"]\n",
            "run = [\"true\"]\nenv = { T = \"ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5\" }\nsecrets = [\"NOPE\"]\n",
        );
        let mut req = request(&text, None);
        req.params.insert("n".into(), "many".into());
        req.params.insert("colour".into(), "red".into());
        let job = a.admit_job(&req).unwrap();
        let all = job.problems.join("\n");
        assert!(
            all.contains("p.toml:10:14: possible hard-coded secret (GitHub token)"),
            "{all}"
        );
        assert!(all.contains("colour") && all.contains("many"), "{all}");
        assert!(all.contains("secret directory"), "{all}");
        assert_eq!(job.problems.len(), 4, "{all}");
        // A file that does not parse still gets its secrets reported.
        let broken = format!("{text}[[steps]\n");
        match a.admit_job(&request(&broken, None)) {
            Err(SubmitError::Refused(problems)) => {
                assert!(problems[0].contains("GitHub token"), "{problems:?}");
                assert!(problems.len() >= 2, "{problems:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
