# A verification policy for `kiln verify ARTIFACT --policy require-test.rego` (see docs/policy.md).
# Every message in data.kiln.deny is a reason to refuse the artifact; an empty set accepts it.
package kiln

# Steps by kind, in execution order.
indexes(kind) := [i | some i, step in input.steps; step.kind == kind]

# 1. Required steps and their order: a test step must run, and before anything is published.
deny contains "no test step: the artifact was never tested" if {
	count(indexes("test")) == 0
}

deny contains msg if {
	some p in indexes("publish")
	some t in indexes("test")
	t > p
	msg := sprintf("test step %q runs after publish step %q", [input.steps[t].name, input.steps[p].name])
}

# 2. Every step that ran succeeded, was attested, and its worker's teardown was verified.
deny contains msg if {
	some step in input.steps
	step.outcome != "succeeded"
	msg := sprintf("step %q ended %s", [step.name, step.outcome])
}

deny contains msg if {
	some step in input.steps
	step.attested
	not step.teardownVerified
	msg := sprintf("step %q: teardown of its worker was not verified", [step.name])
}

# 3. No network in build steps.
deny contains msg if {
	some step in input.steps
	step.kind == "build"
	step.network != "none"
	msg := sprintf("build step %q had network %v", [step.name, step.network])
}

# 4. Allowed signers of the pipeline definition (empty: accept unsigned definitions). Replace with
#    the keyids of your release keys (`kiln pipeline keygen` prints them), e.g.
#    allowed_pipeline_signers := {"sha256:…"}
allowed_pipeline_signers := set()

deny contains msg if {
	count(allowed_pipeline_signers) > 0
	not input.pipeline.signer in allowed_pipeline_signers
	msg := sprintf("pipeline %q was signed by %v, not an allowed signer", [input.pipeline.name, input.pipeline.signer])
}
