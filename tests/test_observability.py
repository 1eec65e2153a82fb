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


# --- Metrics: labels under three bootstraps, and the Grafana dashboard names what exists ---------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "llm-gateway-dashboard.json")
RELABEL = os.path.join(ROOT, "deploy", "prometheus", "llm-gateway-relabel.yaml")
OUR_LABELS = ["gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"]
# Istio's bootstrap (tools/packaging/common/envoy_bootstrap.json): no default tags, its own rules, and
# one `(<tag>=\.=(.*?);\.;)` rule per `extraStatTags` entry (here: the gateway's three GenAI labels).
ISTIO_TAGS = [
    {"tag_name": "cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"},
    {"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"},
    {"tag_name": "response_code", "regex": r"(response_code=\.=(.+?);\.;)|_rq(_(\.d{3}))$"},
    {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
    {"tag_name": "reporter", "regex": r"(reporter=\.=(.*?);\.;)"},
    {"tag_name": "source_workload", "regex": r"(source_workload=\.=(.*?);\.;)"},
    {"tag_name": "destination_service", "regex": r"(destination_service=\.=(.*?);\.;)"},
] + [{"tag_name": t, "regex": f"({t}=\\.=(.*?);\\.;)"} for t in OUR_LABELS]


def bootstrap(mode):
    def patch(cfg):
        if mode == "default":
            cfg.pop("stats_config", None)
        elif mode == "istio":
            cfg["stats_config"] = {"use_all_default_tags": False, "stats_tags": ISTIO_TAGS}
        return cfg
    return patch


def relabel(samples, rules):
    """Prometheus metric_relabel_configs (replace action) applied to parsed samples."""
    import re
    out = []
    for name, labels, value in samples:
        labels = dict(labels, __name__=name)
        for r in rules:
            src = ";".join(labels.get(s, "") for s in r["source_labels"])
            m = re.fullmatch(r["regex"], src)
            if m:
                labels[r["target_label"]] = re.sub(r"\$(\d)", lambda g: m.group(int(g.group(1))) or "",
                                                  r.get("replacement", "$1"))
        out.append((labels.pop("__name__"), labels, value))
    return out


def dashboard_queries():
    import re
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    uses = {}
    for e in exprs:
        for m in re.finditer(r"(llmgw_[a-z_]+)(\{[^}]*\})?", e):
            labels = set(re.findall(r"([a-z_]+)\s*=~?", m.group(2) or ""))
            uses.setdefault(m.group(1), set()).update(labels)
        # Labels aggregated by apply to every metric of the expression.
        by = set(l.strip() for g in re.findall(r"by \(([^)]*)\)", e) for l in g.split(",")) - {"le"}
        for m in re.finditer(r"llmgw_[a-z_]+", e):
            uses[m.group(0)].update(by)
    return uses


@pytest.mark.parametrize("mode", ["ours", "default", "istio"])
def test_prometheus_labels_and_dashboard(mode):
    import yaml
    up = FakeUpstream(responder)
    sc = FakeSidecar(up.url)
    cfg = {"sidecar": {"token": TOKEN, "timeoutMs": 1000}, "providers": [], "keys": []}
    envoy = Envoy(cfg, sidecar_port=sc.server.port, patch=bootstrap(mode)).start()
    try:
        for stream in (False, True, False):
            body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
            s, _, b = chat(envoy, body)
            assert s == 200, b
        assert len(sc.wait_for(3)) == 3  # records sent: the usage counters exist
        s, _, b = request("GET", f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus")
        from harness import prom_samples, prom_value
        samples = prom_samples(b.decode())
        if mode == "default":
            # Without stats tags the labels stay in the (sanitized) name; the shipped relabelling
            # recovers them.
            assert not any(n == "llmgw_requests_total" for n, _, _ in samples)
            with open(RELABEL) as f:
                samples = relabel(samples, yaml.safe_load(f))
        pm = {"gen_ai_provider_name": "hosted", "gen_ai_request_model": "m"}
        assert prom_value(samples, "llmgw_requests_total", response_code="200", **pm) == 3
        # JSON answers report 5 prompt tokens, the stream's usage chunk (asked for by the filter) 4.
        assert prom_value(samples, "llmgw_gen_ai_client_token_usage_tokens_total", gen_ai_token_type="input",
                          **pm) == 5 + 4 + 5
        assert prom_value(samples, "llmgw_gen_ai_client_operation_duration_milliseconds_bucket", **pm) >= 0
        # Every metric the dashboard queries exists in this scrape with every label the query uses
        # (fallbacks only exist once a fallback happened: test_fallback checks that one).
        for name, labels in dashboard_queries().items():
            if name == "llmgw_fallbacks_total":
                continue
            found = [l for n, l, _ in samples if n == name]
            assert found, (mode, name)
            for label in labels:
                assert any(label in l for l in found), (mode, name, label, found[:3])
    finally:
        envoy.stop()
        sc.server.stop()
        up.stop()


def test_fallback_flag_survives_ejection(tmp_path):
    """Issue 9 item 9: once the failing hosted provider is ejected, its fallback is tried first, and the
    requests it serves are still fallbacks: header, usage record, metric and access log."""
    hosted = FakeUpstream(lambda rec: (503, {"content-type": "application/json"}, b'{"error":{"message":"down"}}'))
    saas = FakeUpstream(responder)
    sc = FakeSidecar(hosted.url)
    sc.identity["providers"][0]["fallback"] = ["saas"]
    sc.identity["providers"].append({
        "name": "saas", "kind": "OPENAI", "base": {"tls": False, "authority": saas.url.split("//")[1], "path": "/v1"},
        "models": [{"name": "m", "upstream": "m-up"}], "isHosted": False, "apiKey": "sk-saas-1234",
        "envoyCluster": "llm_gateway_dfp_http", "fallback": []})
    log = str(tmp_path / "access.log")
    cfg = {"sidecar": {"token": TOKEN, "timeoutMs": 1000}, "providers": [], "keys": []}
    envoy = Envoy(cfg, sidecar_port=sc.server.port, patch=with_access_log(log)).start()
    try:
        n = 6
        for i in range(n):
            s, h, b = chat(envoy, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert s == 200, b
            assert h.get("x-llm-gateway-provider") == "saas" and h.get("x-llm-gateway-fallback") == "true", (i, h)
        # The hosted provider was ejected after 3 failures: later requests did not try it.
        assert len(hosted.requests) < n
        records = sc.wait_for(n)
        assert len(records) == n and all(r["fallback"] and r["provider"] == "saas" for r in records), records
        from harness import prom_samples, prom_value
        _, _, text = request("GET", f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus")
        assert prom_value(prom_samples(text.decode()), "llmgw_fallbacks_total", gen_ai_provider_name="saas") == n
        lines = [l for l in read_log(log, n) if l.get("model_requested") == "m"]
        assert len(lines) == n and all(l["fallback"] == "true" and l["provider"] == "saas" for l in lines)
    finally:
        envoy.stop()
        sc.server.stop()
        hosted.stop()
        saas.stop()
