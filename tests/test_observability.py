"""Operability through the real Envoy (issue 12): the filter state Envoy's own access log prints
(model, provider, tokens, cost, fallback, key id — never keys or prompts), `traceparent` reaching the
provider unchanged, and the metric names Prometheus scrapes with their labels under Envoy's default
bootstrap, ours and an Istio-like one, checked against the shipped Grafana dashboard."""
import json
import os
import time

import pytest

from harness import Envoy, FakeUpstream, envoy_config, request
from test_usage import KEY, TOKEN, FakeSidecar, responder

FIELDS = ["provider", "model", "model_requested", "prompt_tokens", "completion_tokens", "total_tokens",
          "cost_usd", "fallback", "key_id", "config_id"]


def with_access_log(path):
    def patch(cfg):
        fmt = {f: f"%FILTER_STATE(wasm.llm_gateway.{f}:PLAIN)%" for f in FIELDS}
        fmt.update(status="%RESPONSE_CODE%", path="%REQ(:PATH)%", traceparent="%REQ(TRACEPARENT)%")
        envoy_config._hcm(cfg)["access_log"] = [{
            "name": "envoy.access_loggers.file",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                             "path": path, "log_format": {"json_format": fmt}}}]
        return cfg
    return patch


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    up = FakeUpstream(responder)
    sc = FakeSidecar(up.url)
    log = str(tmp_path_factory.mktemp("accesslog") / "access.log")
    cfg = {"sidecar": {"token": TOKEN, "timeoutMs": 1000}, "providers": [], "keys": []}
    envoy = Envoy(cfg, sidecar_port=sc.server.port, patch=with_access_log(log)).start()
    yield envoy, up, sc, log
    envoy.stop()
    sc.server.stop()
    up.stop()


def chat(envoy, body, headers=None):
    hdrs = {"x-api-key": KEY, "content-type": "application/json"}
    hdrs.update(headers or {})
    return request("POST", envoy.url + "/openai/v1/chat/completions", body, hdrs)


def read_log(path, n, timeout=10):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                lines = [json.loads(l) for l in f if l.strip()]
            if len(lines) >= n:
                break
        time.sleep(0.1)
    return lines


def test_access_log_carries_model_provider_tokens(gw):
    envoy, up, sc, log = gw
    secret = "do-not-log-this-prompt"
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    s, _, b = chat(envoy, {"model": "m", "messages": [{"role": "user", "content": secret}]},
                   {"traceparent": tp})
    assert s == 200, b
    # traceparent reaches the provider unchanged.
    assert up.last().headers.get("traceparent") == tp
    s, _, b = chat(envoy, {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": "hi"}]})
    assert s == 200
    # The logged :path is the rewritten (upstream) one.
    lines = [l for l in read_log(log, 2) if l["path"] == "/v1/chat/completions"]
    assert len(lines) >= 2, lines
    js, sse = lines[-2], lines[-1]
    assert js["traceparent"] == tp
    assert (js["provider"], js["model"], js["model_requested"]) == ("hosted", "m-up", "m")
    assert (js["prompt_tokens"], js["completion_tokens"], js["total_tokens"]) == ("5", "3", "8")
    assert js["fallback"] == "false" and js["key_id"] == "key_1" and js["config_id"] == "cfg_1"
    # 5 × $1/M + 3 × $2/M
    assert js["cost_usd"] == "0.000011"
    assert (sse["prompt_tokens"], sse["completion_tokens"], sse["total_tokens"]) == ("4", "6", "10")
    text = open(log).read()
    assert KEY not in text and secret not in text and "sk-up-7777" not in text
