"""The shipped Envoy configuration as a platform team runs it (issues 9.8, 9.11, 11.5, 12):
every error Envoy generates itself reaches clients in the OpenAI error shape; production timeouts;
the JSON access log; traceparent propagation; every shipped Envoy YAML passes `envoy --mode validate`."""
import glob
import hashlib
import json
import os
import socket
import time

import pytest
import yaml

from harness import ROOT, Envoy, FakeUpstream, chat_response, envoy_config, free_port, request, validate

KEY = "sk-gw-deploy-key"
CHAT = "/openai/v1/chat/completions"
AUTH = {"authorization": "Bearer " + KEY}
TOKEN_ENV = {"LLM_GATEWAY_INTERNAL_TOKEN": "validate-token"}


def body(model="ok", content="x"):
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def routes(cfg):
    return envoy_config._hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]


def responder(rec):
    model = json.loads(rec.body)["model"]
    if model == "hang":
        time.sleep(3)
    return 200, {"content-type": "application/json"}, json.dumps(chat_response(model)).encode()


def patch(cfg):
    # Test-sized limits (the mappers, timeouts and access log are the shipped ones): idle 1 s, buffer
    # 32 KiB, headers 8 KiB; plus Envoy's fault filter, so Envoy-generated 500/502/429 can be provoked.
    for r in routes(cfg):
        if "route" in r:
            r["route"]["idle_timeout"] = "1s"
    cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = 32768
    hcm = envoy_config._hcm(cfg)
    hcm["max_request_headers_kb"] = 8
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"header_abort": {}, "percentage": {"numerator": 100}}}})
    return cfg


@pytest.fixture(scope="module")
def gw():
    up = FakeUpstream(responder)
    dead = free_port()
    cfg = {"maxBodyBytes": 1000000,
           "providers": [{"name": "p", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
                          "isHosted": True, "models": ["ok", "hang"]},
                         {"name": "dead", "supportedProvider": "OPENAI_COMPATIBLE",
                          "url": f"http://127.0.0.1:{dead}/v1", "isHosted": True, "models": ["gone"]}],
           "keys": [{"id": "deploy-key", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}]}
    envoy = Envoy(cfg, patch=patch, env=TOKEN_ENV).start()
    yield envoy, up
    envoy.stop()
    up.stop()


def assert_openai_error(status, headers, raw, want_status, want_code, want_type):
    assert status == want_status, raw
    assert headers["content-type"] == "application/json", headers
    doc = json.loads(raw)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
    assert doc["error"]["code"] == want_code and doc["error"]["type"] == want_type, doc
    assert doc["error"]["param"] is None and doc["error"]["message"]
    return doc["error"]


def raw_http(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    head, _, rest = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


def test_upstream_refused_is_openai_503(gw):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + CHAT, body("gone"), AUTH)
    err = assert_openai_error(s, hd, b, 503, "upstream_unavailable", "server_error")
    assert "connect" in err["message"]


def test_upstream_timeout_is_openai_504(gw):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + CHAT, body("hang"), AUTH)
    assert_openai_error(s, hd, b, 504, "upstream_timeout", "server_error")


def test_body_over_envoy_buffer_is_openai_413(gw):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + CHAT, body(content="x" * 100000), AUTH)
    assert_openai_error(s, hd, b, 413, "request_too_large", "invalid_request_error")


def test_headers_too_large_is_openai_431(gw):
    envoy, _ = gw
    s, hd, b = request("GET", envoy.url + "/openai/v1/models", headers=dict(AUTH, **{"x-big": "a" * 9000}))
    assert_openai_error(s, hd, b, 431, "request_header_fields_too_large", "invalid_request_error")


def test_malformed_request_is_openai_400(gw):
    envoy, _ = gw
    s, hd, b = raw_http(envoy.port, b"GET /x HTTP/1.1\r\nHost x\r\n\r\n")
    assert_openai_error(s, hd, b, 400, "bad_request", "invalid_request_error")


@pytest.mark.parametrize("code,want_code,want_type", [
    (500, "gateway_error", "server_error"), (502, "bad_gateway", "server_error"),
    (503, "upstream_unavailable", "server_error"), (429, "rate_limited", "rate_limit_error")])
def test_other_envoy_generated_errors_are_openai_shaped(gw, code, want_code, want_type):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + CHAT, body(), dict(AUTH, **{"x-envoy-fault-abort-request": str(code)}))
    assert_openai_error(s, hd, b, code, want_code, want_type)


def assert_anthropic_error(status, headers, raw, want_status, want_type):
    assert status == want_status, raw
    assert headers["content-type"] == "application/json", headers
    doc = json.loads(raw)
    assert set(doc) == {"type", "error"} and doc["type"] == "error", doc
    assert set(doc["error"]) == {"type", "message"} and doc["error"]["type"] == want_type, doc
    assert doc["error"]["message"], doc
    return doc["error"]


def messages(model="ok", content="x"):
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": content}]}


ANTHROPIC = "/anthropic/v1/messages"


@pytest.mark.parametrize("code,want_type", [
    (500, "api_error"), (502, "api_error"), (503, "overloaded_error"), (429, "rate_limit_error")])
def test_envoy_generated_errors_on_the_anthropic_ingress_are_anthropic_shaped(gw, code, want_type):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + ANTHROPIC, messages(),
                       {"x-api-key": KEY, "x-envoy-fault-abort-request": str(code)})
    assert_anthropic_error(s, hd, b, code, want_type)


def test_anthropic_ingress_upstream_failures_are_anthropic_shaped(gw):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + ANTHROPIC, messages("gone"), {"x-api-key": KEY})
    err = assert_anthropic_error(s, hd, b, 503, "overloaded_error")
    assert "connect" in err["message"]
    s, hd, b = request("POST", envoy.url + ANTHROPIC, messages("hang"), {"x-api-key": KEY})
    assert_anthropic_error(s, hd, b, 504, "timeout_error")
    s, hd, b = request("POST", envoy.url + ANTHROPIC, messages(content="x" * 100000), {"x-api-key": KEY})
    assert_anthropic_error(s, hd, b, 413, "request_too_large")
    # The OpenAI ingress keeps the OpenAI shape for the same failure.
    s, hd, b = request("POST", envoy.url + CHAT, body("gone"), AUTH)
    assert_openai_error(s, hd, b, 503, "upstream_unavailable", "server_error")


def test_filter_errors_and_unknown_paths_pass_unchanged(gw):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + CHAT, body())
    assert_openai_error(s, hd, b, 401, "missing_api_key", "authentication_error")
    s, hd, b = request("GET", envoy.url + "/nope")
    assert_openai_error(s, hd, b, 404, "unknown_url", "invalid_request_error")
    # The next valid request still succeeds.
    s, _, b = request("POST", envoy.url + CHAT, body(), AUTH)
    assert s == 200, b


def test_no_route_is_openai_404():
    # Without the catch-all direct response, Envoy's own "no route" 404 is mapped too.
    def no_catch_all(cfg):
        rs = routes(cfg)
        rs[:] = [r for r in rs if "direct_response" not in r]
        return cfg
    with Envoy({"providers": []}, patch=no_catch_all, env=TOKEN_ENV) as envoy:
        s, hd, b = request("GET", envoy.url + "/nope")
        assert_openai_error(s, hd, b, 404, "not_found", "invalid_request_error")


def access_lines(envoy, want, timeout=15):
    # Envoy flushes access-log files every 10 s by default (--file-flush-interval-msec).
    deadline = time.time() + timeout
    while True:
        lines = []
        for ln in envoy.logs().splitlines():
            if ln.startswith("{"):
                try:
                    lines.append(json.loads(ln))
                except ValueError:
                    pass
        found = [ln for ln in lines if want(ln)]
        if found or time.time() > deadline:
            return found
        time.sleep(0.2)


def test_json_access_log_and_traceparent(gw):
    envoy, up = gw
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    up.clear()
    s, _, b = request("POST", envoy.url + CHAT, body(), dict(AUTH, traceparent=tp))
    assert s == 200, b
    assert up.last().headers.get("traceparent") == tp  # propagated to the provider
    found = access_lines(envoy, lambda ln: ln.get("traceparent") == tp)
    assert found, envoy.logs()[-2000:]
    line = found[0]
    assert line["status"] == 200 and line["method"] == "POST"
    for k in ("provider", "model", "model_requested", "prompt_tokens", "completion_tokens", "total_tokens",
              "cost_usd", "fallback", "key_id", "config_id", "duration_ms", "ttfb_ms", "upstream_host"):
        assert k in line
    assert KEY not in json.dumps(found)
    # Filled in by the filter's filter state (llm_gateway.* keys) where the filter sets them.
    if line["provider"] is not None:
        assert line["provider"] == "p" and line["model"] == "ok" and line["key_id"] == "deploy-key"
        assert str(line["prompt_tokens"]) == "5" and str(line["total_tokens"]) == "8"


def test_shipped_timeouts_and_limits():
    cfg = envoy_config.load_template()
    hcm = envoy_config._hcm(cfg)
    assert hcm["request_headers_timeout"] == "10s"
    assert hcm["common_http_protocol_options"]["max_stream_duration"] == "3600s"
    for r in routes(cfg):
        if "route" in r:  # streams bounded by idle time, never by a total route timeout
            assert r["route"]["timeout"] == "0s" and r["route"]["idle_timeout"] == "120s"
    for c in cfg["static_resources"]["clusters"]:
        assert "connect_timeout" in c
        if c["name"].startswith("llm_gateway_dfp"):
            assert c["circuit_breakers"]["thresholds"][0]["max_requests"] >= 4096
    assert cfg["overload_manager"]["resource_monitors"][0]["typed_config"]["max_active_downstream_connections"]
    for lst in cfg["static_resources"]["listeners"]:
        assert "local_reply_config" in lst["filter_chains"][0]["filters"][0]["typed_config"], lst["name"]


def k8s_bootstrap_for_validation(tmp_path):
    """The Kubernetes gateway bootstrap with its in-image paths pointed at this checkout."""
    base = os.path.join(ROOT, "deploy", "kustomize", "base", "gateway")
    with open(os.path.join(base, "envoy.yaml")) as f:
        text = f.read()
    with open(os.path.join(base, "llm_gateway.yaml")) as f:
        ecds = f.read()
    fdir = tmp_path / "filter"
    fdir.mkdir()
    wasm = os.path.join(ROOT, "target", "llm_gateway.wasm")
    (fdir / "llm_gateway.yaml").write_text(ecds.replace(envoy_config.K8S_WASM, wasm))
    text = text.replace(envoy_config.K8S_FILTER_DIR, str(fdir)).replace(envoy_config.K8S_WASM, wasm)
    p = tmp_path / "k8s-envoy.yaml"
    p.write_text(text)
    return str(p)


def test_every_shipped_envoy_yaml_validates(tmp_path):
    files = sorted(glob.glob(os.path.join(ROOT, "envoy", "*.yaml")))
    assert any(f.endswith("gateway-ecds.yaml") for f in files)
    files.append(k8s_bootstrap_for_validation(tmp_path))
    for f in files:
        code, out = validate(f, env=TOKEN_ENV)
        assert code == 0, f"{f}:\n{out[-2000:]}"
    # A misspelled field fails validation (the check can fail).
    with open(files[0]) as f:
        doc = yaml.safe_load(f)
    envoy_config._hcm(doc)["stream_idle_timout"] = "1s"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    code, out = validate(str(bad), env=TOKEN_ENV)
    assert code != 0 and "stream_idle_timout" in out


def test_prestop_drain_script():
    """deploy/docker/llm-gateway-drain (the gateway's preStop hook) against a real Envoy: health
    checks fail, listeners drain gracefully (readiness 503), and it returns after DRAIN_SECONDS."""
    import subprocess
    import urllib.error
    import urllib.request
    with Envoy({"providers": []}, env=TOKEN_ENV) as envoy:
        admin = f"http://127.0.0.1:{envoy.admin_port}"
        t0 = time.time()
        p = subprocess.run([os.path.join(ROOT, "deploy", "docker", "llm-gateway-drain")], timeout=30,
                           env=dict(os.environ, ENVOY_ADMIN=admin, DRAIN_SECONDS="1"), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert time.time() - t0 >= 1
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(admin + "/ready", timeout=5)
        assert e.value.code == 503


def test_documented_tracer_config_validates(tmp_path):
    """The tracer snippet of docs/operations.md "## Tracing", added to the shipped config, is valid."""
    text = open(os.path.join(ROOT, "docs", "operations.md")).read()
    block = text.split("## Tracing", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    hcm_part, cluster_part = block.split("# in static_resources.clusters:")
    cfg = envoy_config.load_template()
    envoy_config._hcm(cfg).update(yaml.safe_load(hcm_part))
    cfg["static_resources"]["clusters"].extend(yaml.safe_load(cluster_part))
    path = envoy_config.write(cfg, str(tmp_path / "traced.yaml"))
    code, out = validate(path, env=TOKEN_ENV)
    assert code == 0, out[-2000:]


def test_kubernetes_bootstrap_runs(tmp_path):
    """The container/Kubernetes bootstrap (deploy/kustomize/base/gateway) in a real Envoy, with this
    test's ports: the health listener proxies /ready, the filter loaded by ECDS answers in the OpenAI
    shape, Envoy-generated errors are mapped."""
    import urllib.request
    path = k8s_bootstrap_for_validation(tmp_path)
    text = open(path).read()
    port, admin, health = free_port(), free_port(), free_port()
    for a, b in (("address: 0.0.0.0", "address: 127.0.0.1"), ("port_value: 10000", f"port_value: {port}"),
                 ("port_value: 9901", f"port_value: {admin}"), ("port_value: 9902", f"port_value: {health}"),
                 (f"address: {envoy_config.K8S_SIDECAR_HOST}", "address: 127.0.0.1"),
                 (f"port_value: {envoy_config.K8S_SIDECAR_PORT}", f"port_value: {free_port()}")):
        assert a in text, a
        text = text.replace(a, b)
    open(path, "w").write(text)
    import subprocess
    log = open(tmp_path / "envoy.log", "w")
    proc = subprocess.Popen(["envoy", "-c", path, "--base-id", str(port), "--concurrency", "1", "--log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, **TOKEN_ENV))
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, open(tmp_path / "envoy.log").read()[-2000:]
                time.sleep(0.2)
        s, hd, b = request("POST", f"http://127.0.0.1:{port}{CHAT}", body())
        assert_openai_error(s, hd, b, 401, "missing_api_key", "authentication_error")
        s, hd, b = request("GET", f"http://127.0.0.1:{port}/nope")
        assert_openai_error(s, hd, b, 404, "unknown_url", "invalid_request_error")
        assert request("GET", f"http://127.0.0.1:{health}/stats")[0] == 404  # admin stays private
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
