"""Issue 15 through the real Envoy and the real sidecar: a key over its budget is refused (status, body,
headers) and served again when the window resets; per-minute request and token limits with the
x-ratelimit-* headers; the sidecar killed (allowances hold for their lease, then the configured policy);
and two Envoys with two sidecars on one PostgreSQL keep the spend within the documented overshoot bound
under concurrent load (docs/operations.md, "Budgets and rate limits")."""
import base64
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import Envoy, FakeUpstream, free_port, request
import test_sidecar
from test_sidecar import ADMIN, TOKEN, hosted_responder, new_key

CHAT = "/openai/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
# gpt-4o-mini in config/model-prices.json: 5 prompt x 0.15 + 3 completion x 0.6 USD per 1M tokens.
PER_REQ_NUSD = 2550
PER_REQ_TOKENS = 8
VAULT_KEY = base64.b64encode(b"k" * 32).decode()
VMS_PER_ENVOY = 2  # the harness runs Envoy with --concurrency 2: two holders per Envoy


class Sidecar(test_sidecar.Sidecar):
    """The real sidecar with a fixed vault key (replicas on one database decrypt each other's provider
    keys), optionally on PostgreSQL and with a short allowance lease; its data dir goes when it stops."""

    def __init__(self, database_url=None, lease=None):
        env = {"LLM_GATEWAY_VAULT_KEY": VAULT_KEY}
        if database_url:
            env["DATABASE_URL"] = database_url
        if lease:
            env["LLM_GATEWAY_LIMITS_LEASE_SECONDS"] = str(lease)
        super().__init__(env=env)

    def stop(self):
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def add_provider(sc, upstream):
    s, doc = sc.api("POST", "/v1/llm/providers", {"providers": [
        {"name": "openai", "supportedProvider": "OPENAI", "url": upstream.url + "/v1", "apiKey": "sk-up-1234",
         "models": ["gpt-4o-mini"]}]})
    assert s in (201, 409), doc


def gateway(sc, mode="open"):
    # A generous callout timeout: on a loaded CI machine a first-sight allowance callout that times out
    # would apply the failure policy (open) to the key until the next renewal, outside the bound.
    return Envoy({"sidecar": {"token": TOKEN, "timeoutMs": 5000, "limitsFailureMode": mode},
                  "providers": [], "keys": []}, sidecar_port=sc.port).start()


def chat(envoy, key):
    s, h, b = request("POST", envoy.url + CHAT, BODY,
                      {"authorization": f"Bearer {key}", "content-type": "application/json"})
    return s, {k.lower(): v for k, v in h.items()}, (json.loads(b) if b else None)


def budget(sc, bid):
    s, doc = sc.api("GET", "/v1/llm/budgets")
    assert s == 200, doc
    return next(b for b in doc["data"] if b["id"] == bid)


@pytest.fixture(scope="module")
def world():
    up = FakeUpstream(hosted_responder)
    sc = Sidecar().start()
    add_provider(sc, up)
    envoy = gateway(sc)
    yield sc, envoy, up
    envoy.stop()
    sc.stop()
    up.stop()


def test_budget_refuses_after_crossing_and_resets(world):
    sc, envoy, up = world
    key, kid = new_key(sc, {"name": "budgeted", "config_id": "default"})
    s, b = sc.api("POST", "/v1/llm/budgets", {"name": "team-a burst", "scope": "key", "scope_id": kid,
                                              "period": "fixed", "window_seconds": 8, "max_usd": 0.00001})
    assert s == 201, b
    assert b["max_usd"] == 0.00001 and b["spent_usd"] == 0 and not b["exceeded"]
    ok, refused, deadline = [], None, time.time() + 20
    while time.time() < deadline:
        s, h, body = chat(envoy, key)
        if s == 200:
            ok.append(h)
            continue
        assert s == 429, (s, body)
        if body["error"]["code"] == "budget_allowance_renewing":
            assert h["retry-after"] == "1"
            time.sleep(0.5)
            continue
        refused = (h, body)
        break
    assert refused, "never refused"
    h, body = refused
    err = body["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota", err
    assert "team-a burst" in err["message"] and "resets at" in err["message"], err
    assert 1 <= int(h["retry-after"]) <= 8
    assert h["content-type"] == "application/json"
    assert any("x-llm-gateway-budget-remaining" in x for x in ok), ok
    # The documented bound C + 3·H·(floor + largest request) + other requests in flight (none here).
    floor = max(1, 10_000 // 100)
    bound = 10_000 + 3 * VMS_PER_ENVOY * (floor + PER_REQ_NUSD)
    time.sleep(1.5)  # usage records reach the sidecar on the filter's tick
    spent = round(budget(sc, b["id"])["spent_usd"] * 1e9)
    assert 10_000 <= spent <= bound, (spent, bound, len(ok))
    assert len(ok) == spent // PER_REQ_NUSD
    # Also in the usage API.
    s, u = sc.api("GET", "/v1/llm/usage")
    assert any(x["id"] == b["id"] and x["exceeded"] for x in u["budgets"]), u["budgets"]
    # And in the savings report.
    s, _, html = request("GET", sc.url + "/v1/llm/report", headers={"x-api-key": ADMIN})
    assert s == 200 and b'data-section="budgets"' in html and b"team-a burst" in html, html[-2000:]
    assert b"used up: requests refused" in html
    # The window resets: served again (after the next renewal).
    time.sleep(int(h["retry-after"]) + 1.5)
    s, h, body = chat(envoy, key)
    assert s == 200, body


def test_a_stream_is_never_cut_the_next_request_is_refused(world):
    sc, envoy, up = world
    key, kid = new_key(sc, {"name": "streams", "config_id": "default"})
    s, b = sc.api("POST", "/v1/llm/budgets", {"name": "stream tokens", "scope": "key", "scope_id": kid,
                                              "period": "day", "max_tokens": 15})
    assert s == 201, b
    hdrs = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    streamed, deadline = 0, time.time() + 20
    while time.time() < deadline:
        s, h, body = request("POST", envoy.url + CHAT, dict(BODY, stream=True), hdrs)
        if s == 200:
            # Each stream (10 tokens) is delivered whole, also the one that crosses the cap.
            assert body.rstrip().endswith(b"data: [DONE]"), body
            assert body.count(b"chat.completion.chunk") >= 2
            streamed += 1
            continue
        err = json.loads(body)["error"]
        assert s == 429, body
        if err["code"] == "budget_allowance_renewing":
            time.sleep(0.5)
            continue
        assert err["code"] == "budget_exceeded" and "stream tokens" in err["message"], err
        break
    time.sleep(1.5)
    spent = budget(sc, b["id"])["spent_tokens"]
    # At least 10 then 20 tokens (past 15); at most the documented bound with 1-token floors.
    assert streamed >= 2 and spent == 10 * streamed, (streamed, spent)
    assert 15 <= spent <= 15 + 3 * VMS_PER_ENVOY * (1 + 10), spent


def test_rate_limits_with_headers(world):
    sc, envoy, up = world
    key, kid = new_key(sc, {"name": "rpm", "config_id": "default"})
    s, doc = sc.api("PUT", "/v1/llm/rate-limits", {"scope": "key", "scope_id": kid, "requests_per_minute": 4})
    assert s == 200, doc
    statuses, last = [], None
    for _ in range(12):
        s, h, body = chat(envoy, key)
        statuses.append(s)
        if s == 200:
            assert h["x-ratelimit-limit-requests"] == "4", h
            assert int(h["x-ratelimit-remaining-requests"]) < 4
            assert h["x-ratelimit-reset-requests"].endswith("s")
        else:
            last = (h, body)
    admitted = statuses.count(200)
    # Each holder (worker VM) enforces ceil(4 / holders): at most 4 + holders - 1 per minute.
    assert 1 <= admitted <= 4 + VMS_PER_ENVOY - 1, statuses
    h, body = last
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
    assert int(h["retry-after"]) >= 1 and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-limit-requests"] == "4"

    key, kid = new_key(sc, {"name": "tpm", "config_id": "default"})
    s, doc = sc.api("PUT", "/v1/llm/rate-limits", {"scope": "key", "scope_id": kid, "tokens_per_minute": 20})
    assert s == 200, doc
    statuses = []
    for _ in range(10):
        s, h, body = chat(envoy, key)
        statuses.append(s)
        if s == 429:
            assert body["error"]["code"] == "rate_limit_exceeded" and "tokens per minute" in body["error"]["message"]
            assert h["x-ratelimit-limit-tokens"] == "20" and int(h["retry-after"]) >= 1
    # Tokens count when a request ends: a holder admits while its share is not used up.
    assert 1 <= statuses.count(200) <= 2 * VMS_PER_ENVOY, statuses
    assert 429 in statuses


def test_sidecar_killed_keeps_allowances_then_policy():
    up = FakeUpstream(hosted_responder)
    sc = Sidecar(lease=2).start()
    envoys = []
    try:
        add_provider(sc, up)
        key, kid = new_key(sc, {"name": "lease", "config_id": "default"})
        s, b = sc.api("POST", "/v1/llm/budgets", {"name": "monthly", "scope": "org", "period": "month",
                                                  "max_usd": 100})
        assert s == 201, b
        envoys = [gateway(sc, "open"), gateway(sc, "closed")]
        for e in envoys:
            for _ in range(4):  # both worker VMs learn the key's limits
                assert chat(e, key)[0] == 200
        sc.kill()
        for e in envoys:  # within the lease: the last allowance holds
            s, h, body = chat(e, key)
            assert s == 200, body
        time.sleep(3.5)
        s, h, body = chat(envoys[0], key)
        assert s == 200, body  # open: served
        for _ in range(4):
            s, h, body = chat(envoys[1], key)
            assert s == 503, body  # closed: refused once the lease is over
            assert body["error"]["code"] == "limits_unavailable" and h["retry-after"] == "1"
        for e in envoys:
            assert "panicked" not in e.logs()
    finally:
        for e in envoys:
            e.stop()
        sc.stop()
        up.stop()


def pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(os.path.realpath(initdb)) if initdb and shutil.which("pg_ctl") else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL like sidecar/test.sh starts (as `postgres` when running as root)."""
    pgbin = pg_bin()
    if not pgbin:
        pytest.skip("PostgreSQL is not installed (sidecar/test.sh installs it when running as root)")
    tmp = tempfile.mkdtemp(prefix="llmgw-budgets-pg-")
    data, port = os.path.join(tmp, "data"), free_port()
    as_pg = []
    if os.getuid() == 0:
        shutil.chown(tmp, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_pg + [f"{pgbin}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                            "--no-sync"], check=True, capture_output=True, timeout=120)
    subprocess.run(as_pg + [f"{pgbin}/pg_ctl", "-D", data, "-l", os.path.join(tmp, "server.log"), "-w", "-t", "60",
                            "start", "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"],
                   check=True, capture_output=True, timeout=90)
    with open(os.path.join(data, "postmaster.pid")) as f:
        pid = int(f.readline())
    try:
        yield f"postgres://postgres@127.0.0.1:{port}/postgres"
    finally:
        os.kill(pid, signal.SIGINT)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        shutil.rmtree(tmp, ignore_errors=True)


def test_two_envoys_two_sidecars_one_postgres_stay_within_the_bound(postgres):
    up = FakeUpstream(hosted_responder)
    a = Sidecar(database_url=postgres).start()
    b = Sidecar(database_url=postgres).start()
    envoys = []
    try:
        add_provider(a, up)
        key, kid = new_key(a, {"name": "shared", "config_id": "default"})
        cap = 200_000  # nano-USD: about 78 requests
        s, doc = b.api("POST", "/v1/llm/budgets", {"name": "shared cap", "scope": "key", "scope_id": kid,
                                                   "period": "fixed", "window_seconds": 3600,
                                                   "max_usd": cap / 1e9})
        assert s == 201, doc
        envoys = [gateway(a), gateway(b)]
        threads, stop = 8, threading.Event()
        counts = {"ok": 0, "renewing": 0}
        lock = threading.Lock()

        def client(i):
            n, deadline = i, time.time() + 30
            while not stop.is_set() and time.time() < deadline:
                s, h, body = chat(envoys[n % 2], key)
                n += 1
                if s == 200:
                    with lock:
                        counts["ok"] += 1
                    continue
                assert s == 429, (s, body)
                if body["error"]["code"] == "budget_exceeded":
                    return
                assert body["error"]["code"] == "budget_allowance_renewing", body
                with lock:
                    counts["renewing"] += 1
                time.sleep(0.1)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(client, range(threads)))
        time.sleep(2)  # the last usage records reach the sidecars
        spent = round(budget(a, doc["id"])["spent_usd"] * 1e9)
        holders = 2 * VMS_PER_ENVOY
        floor = cap // 100
        bound = cap + 3 * holders * (floor + PER_REQ_NUSD) + threads * PER_REQ_NUSD
        print("served", counts, "spent", spent, "cap", cap, "bound", bound)
        assert spent == counts["ok"] * PER_REQ_NUSD
        assert cap <= spent <= bound, (spent, bound)
        # Both Envoys are refused now, whichever sidecar and worker answers (once every holder renewed
        # after the last records reached the database).
        time.sleep(1.5)
        for e in envoys:
            for _ in range(3):
                s, h, body = chat(e, key)
                assert s == 429 and body["error"]["code"] in ("budget_exceeded", "budget_allowance_renewing"), body
    finally:
        for sc in (a, b):
            with open(os.path.join(sc.dir, "sidecar.log"), errors="replace") as f:
                bad = [line for line in f if '"status":5' in line or "ERROR" in line]
            print("sidecar errors:", len(bad), bad[:3])
        for e in envoys:
            print("envoy warnings:", [l for l in e.logs().splitlines() if "allowance" in l][:5])
            e.stop()
        a.stop()
        b.stop()
        up.stop()
