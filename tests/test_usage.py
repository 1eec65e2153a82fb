"""Usage accounting in the filter, against a recording fake sidecar: exactly one record per request for
JSON and SSE, usage chunk stripping, retry while the sidecar refuses, tags, estimates, and metrics on
Envoy's Prometheus endpoint."""
import hashlib
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import Envoy, FakeUpstream, chat_response, prom_samples, prom_value, request, sse_chunks

KEY = "sk-gw-usage-key"
TOKEN = "usage-test-token"
USAGE_JSON = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
USAGE_SSE = {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10,
             "prompt_tokens_details": {"cached_tokens": 2}}


class FakeSidecar:
    def __init__(self, upstream_url):
        self.records = []
        self.batches = 0
        self.refuse = False
        self.lock = threading.Lock()
        self.identity = {
            "keyId": "key_1", "orgId": "org_1", "configId": "cfg_1", "clusterId": None,
            "keySettings": {}, "orgSettings": {},
            "providers": [{"name": "hosted", "kind": "OPENAI_COMPATIBLE",
                           "base": {"tls": False, "authority": upstream_url.split("//")[1], "path": "/v1"},
                           "models": [{"name": "m", "upstream": "m-up"}], "isHosted": True,
                           "apiKey": "sk-up-7777", "envoyCluster": "llm_gateway_dfp_http", "fallback": []}]}
        self.server = FakeUpstream(self.respond)

    def respond(self, rec):
        if rec.headers.get("x-gateway-token") != TOKEN:
            return 401, {}, b"{}"
        if rec.path == "/internal/v1/resolve":
            if rec.json()["keySha256"] == hashlib.sha256(KEY.encode()).hexdigest():
                return 200, {"content-type": "application/json"}, \
                    json.dumps({"identity": self.identity, "ttlSeconds": 60,
                                "prices": {"hosted/m-up": {"input": 1.0, "output": 2.0}}}).encode()
            return 404, {"content-type": "application/json"}, b'{"error":{}}'
        if rec.path == "/internal/v1/usage":
            if self.refuse:
                return 503, {}, b"{}"
            with self.lock:
                self.records.extend(rec.json()["records"])
                self.batches += 1
            return 200, {"content-type": "application/json"}, b'{"accepted":1}'
        return 404, {}, b""

    def wait_for(self, n, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if len(self.records) >= n:
                    break
            time.sleep(0.1)
        time.sleep(1.5)  # anything extra (duplicates) would arrive now
        with self.lock:
            return list(self.records)

    def clear(self):
        with self.lock:
            self.records.clear()


def responder(rec):
    body = json.loads(rec.body)
    if body.get("stream"):
        usage = USAGE_SSE if (body.get("stream_options") or {}).get("include_usage") else None
        chunks = sse_chunks("m-up", ["a", "b", "c"], usage)
        if "cut" in json.dumps(body.get("messages")):
            chunks = chunks[:2]
        return 200, {"content-type": "text/event-stream"}, [(0.01, c) for c in chunks]
    if "no-usage" in json.dumps(body.get("messages")):
        resp = chat_response("m-up", "twelve chars")
        del resp["usage"]
        return 200, {"content-type": "application/json"}, json.dumps(resp).encode()
    return 200, {"content-type": "application/json"}, json.dumps(chat_response("m-up", usage=USAGE_JSON)).encode()


@pytest.fixture(scope="module")
def gw():
    up = FakeUpstream(responder)
    sc = FakeSidecar(up.url)
    cfg = {"sidecar": {"token": TOKEN, "timeoutMs": 1000}, "providers": [], "keys": []}
    envoy = Envoy(cfg, sidecar_port=sc.server.port).start()
    yield envoy, up, sc
    envoy.stop()
    sc.server.stop()
    up.stop()


def chat(envoy, body, headers=None):
    hdrs = {"x-api-key": KEY, "content-type": "application/json"}
    hdrs.update(headers or {})
    return request("POST", envoy.url + "/openai/v1/chat/completions", body, hdrs)


def msgs(text="hi"):
    return [{"role": "user", "content": text}]


def test_one_record_per_request_json_and_sse(gw):
    envoy, up, sc = gw
    sc.clear()
    n = 40

    def one(i):
        stream = i % 2 == 1
        body = {"model": "m", "messages": msgs(), "stream": stream}
        s, _, b = chat(envoy, body, {"x-llm-gateway-tags": f"team=t{i % 3},env=test"})
        assert s == 200, b
        return stream

    with ThreadPoolExecutor(8) as pool:
        kinds = list(pool.map(one, range(n)))
    records = sc.wait_for(n)
    assert len(records) == n
    assert len({r["id"] for r in records}) == n
    streams = [r for r in records if r["stream"]]
    plain = [r for r in records if not r["stream"]]
    assert len(streams) == kinds.count(True) and len(plain) == kinds.count(False)
    assert sum(r["promptTokens"] for r in plain) == 5 * len(plain)
    assert sum(r["completionTokens"] for r in plain) == 3 * len(plain)
    assert sum(r["promptTokens"] for r in streams) == 4 * len(streams)
    assert sum(r["completionTokens"] for r in streams) == 6 * len(streams)
    assert sum(r["cachedTokens"] for r in streams) == 2 * len(streams)
    r = streams[0]
    assert (r["orgId"], r["apiKeyId"], r["configId"], r["provider"], r["providerType"]) == \
        ("org_1", "key_1", "cfg_1", "hosted", "OPENAI_COMPATIBLE")
    assert r["providerKeyLast4"] == "7777"
    assert (r["modelRequested"], r["modelUsed"]) == ("m", "m-up")
    assert r["status"] == 200 and not r["estimated"] and not r["truncated"] and not r["fallback"]
    assert r["ttftMs"] is not None and r["latencyMs"] >= r["ttftMs"]
    assert plain[0]["ttftMs"] is None
    assert r["tags"]["env"] == "test" and r["tags"]["team"] in ("t0", "t1", "t2")
    assert "sk-up-7777" not in json.dumps(records)
    # storePrompts is off by default: no prompt or completion text leaves the filter.
    assert all("prompt" not in r and "completion" not in r for r in records)


def test_usage_chunk_is_stripped_unless_the_client_asked(gw):
    envoy, up, sc = gw
    s, _, body = chat(envoy, {"model": "m", "messages": msgs(), "stream": True})
    assert s == 200
    sent_upstream = up.last().json()
    assert sent_upstream["stream_options"] == {"include_usage": True}
    assert body == b"".join(sse_chunks("m-up", ["a", "b", "c"]))  # byte-identical minus the usage chunk
    s, _, body = chat(envoy, {"model": "m", "messages": msgs(), "stream": True,
                              "stream_options": {"include_usage": True}})
    assert body == b"".join(sse_chunks("m-up", ["a", "b", "c"], USAGE_SSE))


def test_records_survive_a_refusing_sidecar(gw):
    envoy, up, sc = gw
    sc.wait_for(0, timeout=0)
    sc.clear()
    sc.refuse = True
    for i in range(30):
        assert chat(envoy, {"model": "m", "messages": msgs()})[0] == 200
    time.sleep(2.5)  # several flush attempts fail meanwhile
    with sc.lock:
        assert sc.records == []
    sc.refuse = False
    records = sc.wait_for(30)
    assert len(records) == 30 and len({r["id"] for r in records}) == 30


def test_estimates_and_truncation(gw):
    envoy, up, sc = gw
    sc.wait_for(0, timeout=0)
    sc.clear()
    assert chat(envoy, {"model": "m", "messages": msgs("no-usage")})[0] == 200
    assert chat(envoy, {"model": "m", "messages": msgs("cut"), "stream": True})[0] == 200
    records = sorted(sc.wait_for(2), key=lambda r: r["stream"])
    assert len(records) == 2
    est, cut = records
    assert est["estimated"] and est["promptTokens"] > 0 and est["completionTokens"] == 3  # 12 chars / 4
    assert cut["truncated"] and cut["stream"]


def test_invalid_tags_are_refused(gw):
    envoy, up, sc = gw
    up.clear()
    s, _, b = chat(envoy, {"model": "m", "messages": msgs()}, {"x-llm-gateway-tags": "team"})
    assert s == 400
    err = json.loads(b)["error"]
    assert err["code"] == "invalid_tags" and "team" in err["message"]
    assert up.last() is None


def test_metrics_on_prometheus(gw):
    envoy, up, sc = gw
    for _ in range(3):
        assert chat(envoy, {"model": "m", "messages": msgs()})[0] == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    samples = prom_samples(text)
    pm = {"gen_ai_provider_name": "hosted", "gen_ai_request_model": "m"}
    req = prom_value(samples, "llmgw_requests_total", response_code="200", **pm)
    inp = prom_value(samples, "llmgw_gen_ai_client_token_usage_tokens_total", gen_ai_token_type="input", **pm)
    assert req >= 3 and inp >= 15
    assert any(n == "llmgw_gen_ai_client_operation_duration_milliseconds_count" for n, _, _ in samples)
    assert any(n == "llmgw_usage_records_sent" for n, _, _ in samples)
    # Cost from the price the sidecar sent: JSON requests cost (5*1 + 3*2) USD/1M = 11,000 nano-USD each.
    cost = prom_value(samples, "llmgw_gen_ai_client_cost_nano_usd_total", **pm)
    assert cost >= 3 * 11_000 and cost % 1000 == 0
