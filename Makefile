# portico — developer entry points. `make test` is what CI runs (`.ci/run`).
SHELL := /bin/bash
CARGO ?= cargo
# cargo-nextest runs each test in its own process (faster, isolated); fall back to cargo test.
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all build test fmt-check clippy unit demo bench bench-micro bench-quick clean

all: build

build:
	$(CARGO) build --locked --all-targets

## test: format check, clippy with -D warnings on all targets, the whole test suite
test: fmt-check clippy unit

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --locked --all-targets -- -D warnings

unit:
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --locked --no-fail-fast
	$(CARGO) test --locked --doc
else
	$(CARGO) test --locked --no-fail-fast
endif

## demo: two echo backends + portico on examples/quickstart (no cluster needed)
demo:
	$(CARGO) build --locked --bin portico --example echo
	./examples/demo.sh

## bench: micro-benchmarks + portico vs nginx vs HAProxy load, churn and RSS (bench/run.sh; about
## 20 min; installs nginx, haproxy, wrk, nghttp2-client with apt-get when missing). Not in `test`.
## Knobs: BENCH_DURATION, BENCH_REPS, BENCH_QUICK=1 (validates the scripts in ~3 min). See docs/benchmarks.md.
bench:
	./bench/run.sh

## bench-micro: the criterion micro-benchmarks only (route match, translate, endpoint update)
bench-micro:
	BENCH_STEPS=micro ./bench/run.sh

bench-quick:
	BENCH_QUICK=1 ./bench/run.sh

clean:
	$(CARGO) clean
