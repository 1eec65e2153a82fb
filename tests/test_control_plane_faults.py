"""Issue 9 items 3 and 5 through the real Envoy: key spraying keeps memory bounded and the sidecar shielded
(per-VM negative cache, token bucket on unknown-key lookups), and a hung control plane (SIGSTOP) adds no
callout timeout to requests with cached keys (stale served at once, refreshed in the background) while a
circuit breaker makes unknown keys fail fast with 503."""
import hashlib
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from harness import Envoy, FakeUpstream, request
from test_sidecar import TOKEN, Sidecar, hosted_responder, new_key

SPRAY = 20_000


def memory_allocated(envoy):
    s, _, b = request("GET", f"http://127.0.0.1:{envoy.admin_port}/memory")
    assert s == 200
    return int(json.loads(b)["allocated"])


def stat(envoy, name):
    s, _, b = request("GET", f"http://127.0.0.1:{envoy.admin_port}/stats?filter={name}")
    total = 0
    for line in b.decode().splitlines():
        if ":" in line:
            try:
                total += int(line.rsplit(":", 1)[1])
            except ValueError:
                pass
    return total


def spray(envoy, n, threads=8):
    """n GET /openai/v1/models with random keys over keep-alive connections; returns status counts."""
    counts = {}
    lock = threading.Lock()

    def worker(k):
        conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
        local = {}
        for i in range(k):
            key = "sk-spray-" + os.urandom(12).hex()
            conn.request("GET", "/openai/v1/models", headers={"authorization": f"Bearer {key}"})
            r = conn.getresponse()
            body = r.read()
            local[r.status] = local.get(r.status, 0) + 1
            if r.status not in (401, 429):
                raise AssertionError((r.status, body))
            if r.status == 429:
                assert json.loads(body)["error"]["code"] == "key_lookup_rate_limited"
        conn.close()
        with lock:
            for s, c in local.items():
                counts[s] = counts.get(s, 0) + c

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, [n // threads] * threads))
    return counts


class CountingSidecar:
    """A fake sidecar that knows one key and counts resolve calls."""

    def __init__(self, upstream_url, key):
        self.resolves = 0
        self.key_hash = hashlib.sha256(key.encode()).hexdigest()
        self.lock = threading.Lock()
        self.identity = {
            "keyId": "key_1", "orgId": "org_1", "configId": "cfg_1", "clusterId": None,
            "keySettings": {}, "orgSettings": {},
            "providers": [{"name": "hosted", "kind": "OPENAI_COMPATIBLE",
                           "base": {"tls": False, "authority": upstream_url.split("//")[1], "path": "/v1"},
                           "models": [{"name": "m", "upstream": "m"}], "isHosted": True,
                           "apiKey": "sk-up", "envoyCluster": "llm_gateway_dfp_http", "fallback": []}]}
        self.server = FakeUpstream(self.respond)
        self.port = self.server.port

    def respond(self, rec):
        if rec.path == "/internal/v1/resolve":
            with self.lock:
                self.resolves += 1
            if rec.json()["keySha256"] == self.key_hash:
                return 200, {"content-type": "application/json"}, json.dumps(
                    {"identity": self.identity, "ttlSeconds": 60}).encode()
            return 404, {"content-type": "application/json"}, b'{"error":{}}'
        return 200, {"content-type": "application/json"}, b'{"accepted":0}'


def test_key_spray_is_bounded():
    key = "sk-gw-real-key"
    up = FakeUpstream(hosted_responder)
    sc = CountingSidecar(up.url, key)
    rate, burst = 20, 40
    cfg = {"sidecar": {"token": TOKEN, "timeoutMs": 1000, "unknownKeyLookupsPerSecond": rate,
                       "unknownKeyLookupBurst": burst}, "providers": [], "keys": []}
    envoy = Envoy(cfg, sidecar_port=sc.port).start()
    try:
        hdrs = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        s, _, b = request("POST", envoy.url + "/openai/v1/chat/completions", chat, hdrs)
        assert s == 200, b
        spray(envoy, 2000)  # warm up allocator pools and the negative cache
        before = memory_allocated(envoy)
        resolves_before = sc.resolves  # the warm-up's lookups are not part of the measured window
        t0 = time.time()
        counts = spray(envoy, SPRAY)
        took = time.time() - t0
        after = memory_allocated(envoy)
        print("spray", counts, "took", round(took, 1), "resolves", sc.resolves, "heap delta", after - before)
        assert sum(counts.values()) == SPRAY
        # Both paths are exercised: lookups answered "unknown" (negative cache) and lookups refused.
        assert counts.get(401, 0) >= 50 and counts.get(429, 0) >= SPRAY // 2, counts
        # Lookups reached the sidecar at most at the configured rate (2 worker VMs), plus the bursts.
        resolves = sc.resolves - resolves_before
        assert resolves <= 2 * (burst + rate * (took + 5)) + 5, (resolves, took)
        # Bounded: nothing is kept in Envoy's heap (shared data) per unknown key. Before the fix each
        # key answered "unknown" left ~126 B of shared data for ever (~2.5 MB for this spray); the
        # allowance covers allocator noise on a loaded machine (up to ~75 KB seen).
        assert after - before < 256 * 1024, (before, after, counts)
        # The valid key still works during and after the spray, on every worker.
        for _ in range(20):
            s, _, b = request("POST", envoy.url + "/openai/v1/chat/completions", chat, hdrs)
            assert s == 200, b
        assert "panicked" not in envoy.logs()
    finally:
        envoy.stop()
        sc.server.stop()
        up.stop()


def timed_chat(envoy, key):
    t = time.time()
    s, h, b = request("POST", envoy.url + "/openai/v1/chat/completions",
                      {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                      {"authorization": f"Bearer {key}", "content-type": "application/json"}, timeout=30)
    return s, b, time.time() - t


def test_hung_control_plane_serves_stale_and_breaks():
    up = FakeUpstream(hosted_responder)
    sc = Sidecar().start()  # LLM_GATEWAY_CACHE_TTL=2: the filter's entries go stale after 2 s
    envoy = None
    stopped = False
    try:
        s, _ = sc.api("POST", "/v1/llm/providers", {"providers": [
            {"name": "hosted", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
             "isHosted": True, "models": ["m"]}]})
        assert s == 201
        key, _ = new_key(sc, {"config_id": "default"})
        cfg = {"sidecar": {"token": TOKEN, "timeoutMs": 1500, "staleSeconds": 120, "breakerFailures": 2,
                           "breakerCooldownSeconds": 10}, "providers": [], "keys": []}
        envoy = Envoy(cfg, sidecar_port=sc.port).start()
        for _ in range(6):  # both workers learn the key
            s, b, _ = timed_chat(envoy, key)
            assert s == 200, b
        os.kill(sc.proc.pid, signal.SIGSTOP)
        stopped = True
        time.sleep(2.5)  # past the TTL: every entry is stale now
        slow = []
        for _ in range(20):
            s, b, took = timed_chat(envoy, key)
            assert s == 200, b
            slow.append(took)
            time.sleep(0.1)  # let background refreshes be attempted (and time out) meanwhile
        # Never the callout timeout (1.5 s): stale identities are served at once.
        assert max(slow) < 0.75, slow
        # Unknown keys: a VM's first ones wait for the timeout until its breaker opens, then fail fast. The
        # cool-down (10 s) outlasts this loop (at most four 1.5 s waits), so no half-open probe falls in it.
        results = []
        for i in range(12):
            s, b, took = timed_chat(envoy, f"sk-unknown-{i}")
            results.append((s, json.loads(b)["error"]["code"], round(took, 2)))
        assert all(r[0] == 503 and r[1] == "control_plane_unavailable" for r in results), results
        # Which worker takes a connection is the kernel's choice, so a worker's waits need not come first:
        # count them. Each VM's breaker waits at most `breakerFailures` (2) times before it opens, two
        # workers: at most four waits in twelve, everything else answered at once.
        waited = [r for r in results if r[2] >= 0.5]
        assert len(waited) <= 4, results
        assert all(r[2] < 2.5 for r in results), results  # never more than one callout timeout (1.5 s)
        os.kill(sc.proc.pid, signal.SIGCONT)
        stopped = False
        deadline = time.time() + 20  # the breaker cool-down (10 s), then a probe that succeeds
        while True:
            s, b, _ = timed_chat(envoy, "sk-unknown-after")
            if s == 401 or time.time() > deadline:
                break
            time.sleep(0.3)
        assert s == 401, b
        s, b, _ = timed_chat(envoy, key)
        assert s == 200, b
        assert "panicked" not in envoy.logs()
    finally:
        if stopped:
            os.kill(sc.proc.pid, signal.SIGCONT)
        if envoy:
            envoy.stop()
        sc.stop()
        up.stop()


def test_filter_refuses_forbidden_destinations():
    """SSRF (issue 9 item 4), filter side: a provider the sidecar hands over that points at loopback (here
    Envoy's own admin port) is refused unless the filter's allow-list names it."""
    key = "sk-gw-ssrf-key"
    up = FakeUpstream(hosted_responder)
    sc = CountingSidecar(up.url, key)
    cfg = {"sidecar": {"token": TOKEN, "timeoutMs": 1000, "allowedDestinations": "10.0.0.0/8"},
           "providers": [], "keys": []}
    envoy = Envoy(cfg, sidecar_port=sc.port)
    # The tenant's provider points at Envoy's admin listener.
    sc.identity["providers"][0]["base"]["authority"] = f"127.0.0.1:{envoy.admin_port}"
    sc.identity["providers"][0]["isHosted"] = False
    envoy.start()
    try:
        s, b, _ = timed_chat(envoy, key)
        err = json.loads(b)["error"]
        assert s == 403 and err["code"] == "destination_forbidden" and err["type"] == "permission_error", b
        assert "hosted" in err["message"] and "127.0.0.1" in err["message"]
        s, _, b = request("GET", envoy.url + "/openai/v1/models", headers={"authorization": f"Bearer {key}"})
        assert s == 403
    finally:
        envoy.stop()
        sc.server.stop()
        up.stop()
