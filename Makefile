# kiln — the two commands a newcomer needs are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all setup build demo test lint bench bench-steps bench-sandbox bench-tpm bench-observer install clean

all: build

## Install system dependencies (apt; idempotent).
setup:
	scripts/setup

## Build every binary (kilnd, kiln-sandbox, kiln).
build:
	$(CARGO) build --workspace --bins

## Build, start kilnd on a state dir under target/, run the example pipeline, fetch and verify its artifact.
demo: setup build
	scripts/demo

## Whole test suite: formatting, lints, unit tests, privileged end-to-end tests, systemd units.
test: lint build
	$(CARGO) test --workspace --no-fail-fast
	tests/systemd-units.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Benchmarks (ratios against baselines measured in the same run).
bench: bench-steps bench-sandbox bench-tpm bench-observer

## Per-step daemon overhead.
bench-steps:
	$(CARGO) build --release --workspace --bins
	BIN=target/release scripts/bench/steps

## Sandbox start latency vs bwrap, and a real build inside the worker vs bare.
bench-sandbox:
	scripts/bench/sandbox

## TPM cost per step (quote, certify, certificate signing) and `kiln verify` of a 5-step chain.
bench-tpm:
	scripts/bench/tpm

## Observer: a real build observed vs bare vs strace -f; syscall storm events/s and losses.
bench-observer:
	scripts/bench/observer

## Install binaries, profiles and systemd units on this host.
install: build
	install -D -m 0755 target/debug/kilnd /usr/local/bin/kilnd
	install -D -m 0755 target/debug/kiln-sandbox /usr/local/bin/kiln-sandbox
	install -D -m 0755 target/debug/kiln /usr/local/bin/kiln
	install -d -m 0755 /etc/kiln/profiles
	install -m 0644 profiles/*.toml /etc/kiln/profiles/
	install -D -m 0644 systemd/kilnd.service /etc/systemd/system/kilnd.service
	install -D -m 0644 systemd/kilnd.socket /etc/systemd/system/kilnd.socket
	install -D -m 0644 systemd/kiln.sysusers.conf /usr/lib/sysusers.d/kiln.conf
	install -D -m 0644 systemd/kiln.tmpfiles.conf /usr/lib/tmpfiles.d/kiln.conf

clean:
	$(CARGO) clean
