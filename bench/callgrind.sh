#!/usr/bin/env bash
# Instructions per request of the filter's exchange lifecycle (issue 10), counted by callgrind: repeatable
# on a busy machine, unlike wall-clock benchmarks.
#
#   bench/callgrind.sh [BASE]      BASE: the commit to compare with (default: fde42ff, main before the
#                                  issue-10 "do less per request" work); "none" measures only the work tree
#
# The exchange runs through the fake host (`src/bench_exchange.rs`, ignored tests): chat JSON with body
# rewrite and usage, an OpenAI SSE stream whose usage chunk is stripped, and a native Anthropic request
# and response (translation). Only the `measured_*` functions are counted (--toggle-collect); each runs
# 200 whole requests after a warm-up (release profile, symbols kept). BASE is exported with `git archive`
# to a temporary directory, the same workload is dropped into it (src/bench_exchange.rs, or
# bench/bench_exchange_v1.rs for a base from before the effect adapter, whose API it uses), and it is
# built in target/callgrind-base.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BASE=${1:-fde42ff}
N=200
command -v valgrind >/dev/null || { echo "valgrind is required (apt-get install valgrind)" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# Builds the test binary of the crate at $1 (a source tree) in target directory $2; prints its path.
# (Two trees of the same package must not share a target directory: their artifacts have the same
# names and cargo's freshness checks mix them up.)
build() {
  (cd "$1" && CARGO_PROFILE_RELEASE_STRIP=false CARGO_TARGET_DIR="$2" cargo test -q --release -p llm-gateway --lib --no-run \
      --message-format=json 2>/dev/null) |
    python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except ValueError: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="llm_gateway": print(m["executable"])' |
    tail -1
}

# Instructions per request of one case with the binary $1.
count() {
  local out="$TMP/cg.$2.$RANDOM"
  valgrind --tool=callgrind --callgrind-out-file="$out" --toggle-collect="*measured_$2*" \
    "$1" --ignored --exact "bench_exchange::bench_$2" --test-threads=1 >/dev/null 2>&1
  awk -v n=$N '/^(summary|totals):/ { printf "%.0f", $2 / n; exit }' "$out"
}

declare -A BIN
if [ "$BASE" != none ]; then
  mkdir -p "$TMP/base"
  git archive "$BASE" | tar -x -C "$TMP/base"
  # The workload over the base's API: the effect adapter (src/adapter.rs) or, before it, the machine
  # called directly over an installed host (bench/bench_exchange_v1.rs, the same requests).
  if [ -f "$TMP/base/src/adapter.rs" ]; then
    cp src/bench_exchange.rs "$TMP/base/src/"
  else
    cp bench/bench_exchange_v1.rs "$TMP/base/src/bench_exchange.rs"
  fi
  grep -q 'mod bench_exchange' "$TMP/base/src/lib.rs" ||
    printf '\n#[cfg(test)]\nmod bench_exchange;\n' >>"$TMP/base/src/lib.rs"
  echo "building $BASE ..." >&2
  BIN[before]=$(build "$TMP/base" "$ROOT/target/callgrind-base")
  # Keep the binary: the next build may reuse its file name.
  cp "${BIN[before]}" "$TMP/before.bin"; BIN[before]="$TMP/before.bin"
fi
echo "building the work tree ..." >&2
BIN[after]=$(build "$ROOT" "$ROOT/target")

printf '| case | %s | work tree (%s) | change |\n|---|---:|---:|---:|\n' \
  "$([ "$BASE" = none ] && echo - || git rev-parse --short "$BASE")" "$(git rev-parse --short HEAD)"
for c in chat sse native; do
  b=-; [ "$BASE" != none ] && b=$(count "${BIN[before]}" $c)
  a=$(count "${BIN[after]}" $c)
  ch=-; [ "$b" != - ] && ch=$(python3 -c "print(f'{($a-$b)/$b*100:+.0f} %')")
  printf '| %s | %s | %s | %s |\n' "$c" "$b" "$a" "$ch"
done
