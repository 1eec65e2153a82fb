#!/usr/bin/env bash
# Browser test of the savings report: starts the sidecar (SQLite, temp data dir, free loopback port),
# registers providers, posts a few hundred varied usage records through the internal endpoint, opens the
# report through a signed link in headless Chromium (Debian's package, installed if missing), checks the
# numbers in the rendered DOM against /v1/llm/usage and saves a screenshot to
# sidecar/tests/artifacts/report.png. The sidecar is always stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "chromium is not installed and we are not root: install Debian's 'chromium' package" >&2
    exit 1
  fi
  log "installing chromium (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null
  apt-get install -y -qq chromium </dev/null >/dev/null
fi

log "building the sidecar"
cargo build -q -p llm-gateway-sidecar </dev/null
TARGET_DIR=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}
BIN=$TARGET_DIR/debug/llm-gateway-sidecar
[ -x "$BIN" ] || { echo "no sidecar binary at $BIN" >&2; exit 1; }

TMP=$(mktemp -d /tmp/llm-report-test.XXXXXX)
PID=""
cleanup() {
  local rc=$?
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    log "stopping the sidecar (pid $PID)"
    kill "$PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT INT TERM

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
log "starting the sidecar on 127.0.0.1:$PORT"
env -u DATABASE_URL -u LLM_GATEWAY_ADMIN_KEY -u LLM_GATEWAY_INTERNAL_TOKEN -u LLM_GATEWAY_VAULT_KEY \
  "$BIN" --data-dir "$TMP/data" --listen "127.0.0.1:$PORT" </dev/null >"$TMP/sidecar.log" 2>&1 &
PID=$!
for _ in $(seq 1 300); do
  grep -q "listening on" "$TMP/sidecar.log" && break
  kill -0 "$PID" 2>/dev/null || { cat "$TMP/sidecar.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "listening on" "$TMP/sidecar.log" || { echo "sidecar did not start" >&2; cat "$TMP/sidecar.log" >&2; exit 1; }

export S="http://127.0.0.1:$PORT"
export ADMIN=$(sed -n 's/^admin API key (shown once, store it now): //p' "$TMP/sidecar.log")
export ORG=$(sed -n 's/^llm-gateway-sidecar: created organization //p' "$TMP/sidecar.log")
export TOKEN=$(cat "$TMP/data/internal.token")
export TMP

log "posting usage records"
python3 - <<'PY'
import json, os, random, time, urllib.request

S, ADMIN, ORG, TOKEN, TMP = (os.environ[k] for k in ("S", "ADMIN", "ORG", "TOKEN", "TMP"))

def call(method, path, body=None, headers=None):
    req = urllib.request.Request(S + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")

admin = {"X-API-Key": ADMIN}
call("POST", "/v1/llm/providers", {"providers": [
    {"name": "openai-main", "supportedProvider": "OPENAI", "apiKey": "sk-test-AAAA",
     "models": ["gpt-4o", "gpt-4o-mini"]},
    {"name": "anthropic", "supportedProvider": "ANTHROPIC", "apiKey": "sk-ant-BBBB",
     "models": ["claude-3-5-haiku", "claude-sonnet-4-5"]},
    {"name": "groq", "supportedProvider": "GROQ", "apiKey": "gsk-CCCC",
     "models": ["llama-3.3-70b-versatile", "llama-3.1-8b-instant"]},
    {"name": "llama-c1", "supportedProvider": "OPENAI_COMPATIBLE", "url": "http://vllm.ai.svc:8000/v1",
     "isHosted": True, "clusterId": "c1", "models": ["llama3.1:8b"], "fallback": ["openai-main"]},
]}, admin)

rnd = random.Random(42)
now = int(time.time() * 1000)
day = 86_400_000
routes = [  # (weight, provider, type, requested, used)
    (30, "openai-main", "OPENAI", "gpt-4o", "gpt-4o-2024-08-06"),
    (25, "openai-main", "OPENAI", "gpt-4o", "gpt-4o-mini-2024-07-18"),
    (15, "llama-c1", "OPENAI_COMPATIBLE", "gpt-4o", "llama3.1:8b"),
    (12, "groq", "GROQ", "gpt-4o-mini", "llama-3.1-8b-instant"),
    (10, "anthropic", "ANTHROPIC", "claude-sonnet-4-5", "claude-3-5-haiku-20241022"),
    (8, "anthropic", "ANTHROPIC", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
]
teams = ["search", "support", "growth"]
records = []
for i in range(360):
    w, prov, ptype, req, used = rnd.choices(routes, weights=[r[0] for r in routes])[0]
    age_days = rnd.randint(0, 27)
    status = 200 if rnd.random() > 0.04 else rnd.choice([429, 500, 502])
    prompt = rnd.randint(200, 6000) if status == 200 else 0
    completion = rnd.randint(50, 1500) if status == 200 else 0
    records.append({
        "id": f"rep-{i}", "time": now - age_days * day - rnd.randint(0, day // 2),
        "orgId": ORG, "clusterId": "c1" if prov == "llama-c1" else None,
        "apiKeyId": "key_demo", "configId": "default",
        "provider": prov, "providerType": ptype, "providerKeyLast4": "AAAA",
        "modelRequested": req, "modelUsed": used,
        "promptTokens": prompt, "completionTokens": completion,
        "cachedTokens": rnd.choice([0, 0, 0, prompt // 2]),
        "estimated": rnd.random() < 0.05, "status": status,
        "latencyMs": rnd.randint(200, 4000), "ttftMs": rnd.randint(80, 600),
        "stream": rnd.random() < 0.6, "fallback": prov == "openai-main" and rnd.random() < 0.05,
        "truncated": False, "tags": {"team": rnd.choice(teams)}, "prompt": None, "completion": None,
    })
for start in range(0, len(records), 120):
    r = call("POST", "/internal/v1/usage", {"records": records[start:start + 120]},
             {"x-gateway-token": TOKEN})
    assert r == {"accepted": len(records[start:start + 120]), "duplicates": 0}, r

t = call("GET", "/v1/llm/usage", None, admin)["totals"]
assert t["requests"] == len(records), t
assert t["promptTokens"] == sum(r["promptTokens"] for r in records), t

def usd(n):
    v = abs(n) / 1e9
    s = f"${v:,.2f}" if v >= 1 else f"${v:.4f}"
    return ("-" if n < 0 else "") + s

expect = {
    "requests": f"{t['requests']:,}",
    "tokens": f"{t['promptTokens'] + t['completionTokens']:,}",
    "cost": usd(t["costNanoUsd"]),
    "list-cost": usd(t["listCostNanoUsd"]),
    "savings": usd(t["listCostNanoUsd"] - t["costNanoUsd"]),
}
assert t["listCostNanoUsd"] > t["costNanoUsd"] > 0, t
with open(os.path.join(TMP, "expect.tsv"), "w") as f:
    for k, v in expect.items():
        f.write(f"{k}\t{v}\n")
link = call("POST", "/v1/llm/report/link", {}, admin)
with open(os.path.join(TMP, "url"), "w") as f:
    f.write(S + link["url"])
print("totals:", json.dumps(expect))
PY

URL=$(cat "$TMP/url")
chrome() {
  timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
    --user-data-dir="$(mktemp -d "$TMP/chrome.XXXXXX")" "$@" 2>>"$TMP/chromium.log"
}

log "rendering the report in headless chromium"
chrome --dump-dom "$URL" >"$TMP/dom.html"
fail=0
while IFS=$'\t' read -r metric value; do
  if grep -qF "data-metric=\"$metric\">$value<" "$TMP/dom.html"; then
    echo "  ok  $metric = $value"
  else
    echo "  MISSING $metric = $value in the rendered report" >&2
    fail=1
  fi
done <"$TMP/expect.tsv"
for s in "Cost over time" "By provider" "By model" "Where the savings come from" "<svg" "gpt-4o-mini-2024-07-18" "llama3.1:8b"; do
  grep -qF "$s" "$TMP/dom.html" || { echo "  MISSING '$s' in the rendered report" >&2; fail=1; }
done
[ "$fail" = 0 ] || { cp "$TMP/dom.html" sidecar/tests/artifacts/report-dom.html 2>/dev/null || true; exit 1; }

mkdir -p sidecar/tests/artifacts
rm -f sidecar/tests/artifacts/report.png
(cd sidecar && chrome --screenshot=tests/artifacts/report.png --window-size=1280,1600 "$URL" >/dev/null)
PNG=sidecar/tests/artifacts/report.png
[ -s "$PNG" ] || { echo "no screenshot at $PNG" >&2; cat "$TMP/chromium.log" >&2; exit 1; }
python3 - "$PNG" <<'PY'
import struct, sys, zlib
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert (w, h) == (1280, 1600), (w, h)
assert len(data) > 30_000, f"suspiciously small screenshot ({len(data)} bytes)"
print(f"  ok  screenshot {w}x{h}, {len(data)} bytes")
PY

# The empty state renders too (a second organization has no usage).
EMPTY_KEY=$(curl -s "$S/internal/v1/organizations" -H "x-gateway-token: $TOKEN" -d '{"name":"empty"}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["apiKey"])')
EMPTY_URL=$S$(curl -s -X POST "$S/v1/llm/report/link" -H "X-API-Key: $EMPTY_KEY" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["url"])')
chrome --dump-dom "$EMPTY_URL" >"$TMP/empty.html"
grep -qF "No usage in this period" "$TMP/empty.html" || { echo "empty state missing" >&2; exit 1; }
grep -qF 'data-metric="requests">0<' "$TMP/empty.html" || { echo "empty report shows requests" >&2; exit 1; }
echo "  ok  empty state"
log "report test passed; screenshot: $ROOT/$PNG"
