# Verification policy of the release example (`kiln verify greeter.tar.gz --policy policy.rego`;
# the input document is described in docs/policy.md). Every message in data.kiln.deny refuses the
# artifact; an empty set accepts it.
package kiln

steps_of(kind) := [step | some step in input.steps; step.kind == kind]

index_of(name) := i if {
	some i, step in input.steps
	step.name == name
}

# 1. The seed's stages, each exactly once, in order: source -> fetch -> build -> test -> publish.
stages := ["source", "fetch", "build", "test", "publish"]

deny contains msg if {
	some kind in stages
	count(steps_of(kind)) != 1
	msg := sprintf("expected exactly one %s step, found %d", [kind, count(steps_of(kind))])
}

deny contains msg if {
	some i in numbers.range(0, count(stages) - 2)
	some a in steps_of(stages[i])
	some b in steps_of(stages[i + 1])
	index_of(a.name) > index_of(b.name)
	msg := sprintf("%s step %q runs after %s step %q", [stages[i], a.name, stages[i + 1], b.name])
}

# 2. Every step succeeded, was observed, and nothing of its worker survived it.
deny contains msg if {
	some step in input.steps
	step.outcome != "succeeded"
	msg := sprintf("step %q ended %s", [step.name, step.outcome])
}

deny contains msg if {
	some step in input.steps
	not step.teardownVerified
	msg := sprintf("step %q: teardown not verified", [step.name])
}

deny contains msg if {
	some step in input.steps
	not step.observed
	msg := sprintf("step %q ran unobserved", [step.name])
}

# 3. The source is the pinned commit of the release.
release_commit := "b9bc5d3c10f38714cdcb0764407b88f8839a59c4"

deny contains msg if {
	some step in steps_of("source")
	step.internalParameters.source.commit != release_commit
	msg := sprintf("source step %q ingested commit %v, not the release commit", [step.name, step.internalParameters.source.commit])
}

# 4. Network: only the fetch step, only through the proxy, only to allowed destinations, and
#    every fetched file matched its pin.
allowed_destinations := {"127.0.0.1:8471"}

deny contains msg if {
	some step in input.steps
	step.kind != "fetch"
	step.network != "none"
	msg := sprintf("%s step %q had network %v", [step.kind, step.name, step.network])
}

deny contains msg if {
	some step in steps_of("fetch")
	some c in step.internalParameters.fetch.connections
	c.allowed
	not sprintf("%s:%d", [c.host, c.port]) in allowed_destinations
	msg := sprintf("fetch step %q connected to %s:%d", [step.name, c.host, c.port])
}

deny contains msg if {
	some step in steps_of("fetch")
	some pin in step.internalParameters.fetch.pins
	pin.result != "ok"
	msg := sprintf("fetch step %q: %s is %s", [step.name, pin.path, pin.result])
}

# 5. The build is hermetic and was reproduced: built twice in fresh workers, same bytes.
deny contains msg if {
	some step in steps_of("build")
	not step.internalParameters.reproducible.match
	msg := sprintf("build step %q was not shown to be reproducible", [step.name])
}

# 6. The published artifact has an SBOM and the tests' results, both signed by the publish step.
deny contains "no SBOM attests the release" if {
	count([a | some a in input.attestations; a.predicateType == "https://cyclonedx.org/bom"]) == 0
}

deny contains msg if {
	some test in steps_of("test")
	count([a | some a in input.attestations; a.name == sprintf("test-result:%s", [test.name])]) == 0
	msg := sprintf("no signed result of test step %q", [test.name])
}
