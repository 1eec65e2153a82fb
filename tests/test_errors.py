"""Error shapes and statuses through the real Envoy, config refusal, and config delivery variants."""
import glob
import hashlib
import json
import os

import pytest

from harness import ROOT, Envoy, FakeUpstream, envoy_config, request, validate

KEY = "sk-gw-err-key"
FALLBACK = "sk-gw-fallback-key"


def h(k):
    return hashlib.sha256(k.encode()).hexdigest()


def config(up_url, **extra):
    cfg = {
        "maxBodyBytes": 4096,
        "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE", "url": up_url + "/v1",
                       "isHosted": True, "models": ["m1"]}],
        "keys": [{"id": "k", "sha256": h(KEY), "config": "default"}],
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def gw():
    up = FakeUpstream()
    envoy = Envoy(config(up.url)).start()
    yield envoy, up
    envoy.stop()
    up.stop()


def assert_error(status, headers, body, want_status, want_code, want_type="invalid_request_error"):
    assert status == want_status, body
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == want_code
    assert err["type"] == want_type
    assert isinstance(err["message"], str) and err["message"]
    return err


CHAT = "/openai/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "x"}]}


def test_missing_key_is_401(gw):
    envoy, up = gw
    up.clear()
    s, hd, b = request("POST", envoy.url + CHAT, BODY)
    assert_error(s, hd, b, 401, "missing_api_key", "authentication_error")
    assert up.last() is None


def test_unknown_key_is_401(gw):
    envoy, _ = gw
    for hdrs in ({"x-api-key": "nope"}, {"authorization": "Bearer nope"}, {"authorization": "Basic " + KEY}):
        s, hd, b = request("POST", envoy.url + CHAT, BODY, hdrs)
        assert s == 401
        assert json.loads(b)["error"]["type"] == "authentication_error"


def test_unknown_path_under_prefix_is_404(gw):
    envoy, _ = gw
    # Other /openai/v1/* paths are 404 unless the passthrough is enabled (openaiPassthrough).
    s, hd, b = request("POST", envoy.url + "/openai/v1/images/generations", BODY, {"x-api-key": KEY})
    assert_error(s, hd, b, 404, "unknown_url")
    s, hd, b = request("GET", envoy.url + "/somewhere/else")
    assert_error(s, hd, b, 404, "unknown_url")


def test_wrong_method_is_405(gw):
    envoy, _ = gw
    s, hd, b = request("GET", envoy.url + CHAT, None, {"x-api-key": KEY})
    assert_error(s, hd, b, 405, "method_not_allowed")
    assert hd["allow"] == "POST"
    s, hd, b = request("POST", envoy.url + "/openai/v1/models", b"{}", {"x-api-key": KEY})
    assert_error(s, hd, b, 405, "method_not_allowed")
    assert hd["allow"] == "GET"


def test_too_large_is_413(gw):
    envoy, up = gw
    up.clear()
    big = {"model": "m1", "messages": [{"role": "user", "content": "x" * 5000}]}
    s, hd, b = request("POST", envoy.url + CHAT, big, {"x-api-key": KEY})
    assert_error(s, hd, b, 413, "request_too_large")
    assert up.last() is None


def test_too_large_without_content_length_is_413(gw):
    envoy, up = gw
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    conn.putrequest("POST", CHAT)
    conn.putheader("x-api-key", KEY)
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    try:
        for _ in range(5):
            chunk = b"x" * 1500
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # Envoy may answer and close before we finish sending.
    r = conn.getresponse()
    assert r.status == 413
    assert json.loads(r.read())["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("body", [b"", b"not json", b"[1,2]", b'{"model": 5}', b'{"model":"m1"'])
def test_bad_body_is_400(gw, body):
    envoy, up = gw
    up.clear()
    s, hd, b = request("POST", envoy.url + CHAT, body, {"x-api-key": KEY})
    assert_error(s, hd, b, 400, "invalid_body")
    assert up.last() is None


def test_unknown_provider_header_is_400(gw):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + CHAT, BODY, {"x-api-key": KEY, "x-provider-name": "nope"})
    err = assert_error(s, hd, b, 400, "unknown_provider")
    assert "nope" in err["message"]


def test_unknown_model_is_404(gw):
    envoy, _ = gw
    s, hd, b = request("POST", envoy.url + CHAT, {"model": "gpt-9", "messages": []}, {"x-api-key": KEY})
    err = assert_error(s, hd, b, 404, "model_not_found")
    assert err["param"] == "model"


def test_client_cannot_pick_envoy_cluster(gw):
    envoy, up = gw
    up.clear()
    s, _, _ = request("GET", envoy.url + "/anything", None, {"x-llm-gateway-cluster": "llm_gateway_dfp_http",
                                                             "host": f"127.0.0.1:{up.port}"})
    assert s == 404
    assert up.last() is None


def test_fallback_key_serves_keyless_requests():
    up = FakeUpstream()
    cfg = config(up.url, fallbackKey=FALLBACK)
    cfg["keys"].append({"id": "fb", "sha256": h(FALLBACK), "config": "default"})
    try:
        with Envoy(cfg) as envoy:
            s, _, b = request("POST", envoy.url + CHAT, BODY)
            assert s == 200, b
            rec = up.last()
            assert FALLBACK not in json.dumps(rec.headers)
            s, _, _ = request("POST", envoy.url + CHAT, BODY, {"x-api-key": "wrong"})
            assert s == 401
    finally:
        up.stop()


def test_json_string_config_and_env_key_reference():
    up = FakeUpstream()
    cfg = config(up.url)
    cfg["providers"].append({"name": "saas", "supportedProvider": "OPENAI", "url": up.url + "/saas",
                             "apiKeyEnv": "LLMGW_TEST_PROVIDER_KEY", "models": ["m2"]})
    try:
        with Envoy(cfg, as_string=True, env={"LLMGW_TEST_PROVIDER_KEY": "sk-env-ZZZZ"},
                   env_keys=["LLMGW_TEST_PROVIDER_KEY"]) as envoy:
            s, _, b = request("POST", envoy.url + CHAT, {"model": "m2", "messages": []}, {"x-api-key": KEY})
            assert s == 200, b
            assert up.last().path == "/saas/chat/completions"
            assert up.last().headers["authorization"] == "Bearer sk-env-ZZZZ"
    finally:
        up.stop()


def test_pinned_envoy_cluster():
    up = FakeUpstream()
    cluster = {"name": "my_vllm", "type": "STATIC", "connect_timeout": "2s",
               "load_assignment": {"cluster_name": "my_vllm", "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": up.port}}}}]}]}}
    cfg = config("http://vllm.internal.svc:8000")
    cfg["providers"][0]["cluster"] = "my_vllm"
    try:
        with Envoy(cfg, extra_clusters=[cluster]) as envoy:
            s, _, b = request("POST", envoy.url + CHAT, BODY, {"x-api-key": KEY})
            assert s == 200, b
            assert up.last().headers["host"] == "vllm.internal.svc:8000"
            assert up.last().path == "/v1/chat/completions"
    finally:
        up.stop()


@pytest.mark.parametrize("bad,needle", [
    ({"providers": [{"name": "x", "supportedProvider": "NOPE", "models": ["m"]}]}, "unknown supportedProvider"),
    ({"providers": [], "unknownField": 1}, "unknownField"),
    ({"keys": [{"id": "k", "sha256": "abc", "config": "default"}]}, "sha256"),
    ({"configs": [{"id": "a", "inherits": "b"}, {"id": "b", "inherits": "a"}]}, "loop"),
])
def test_invalid_config_refuses_to_start(tmp_path, bad, needle):
    cfg = envoy_config.render(10000, 9901, bad)
    path = envoy_config.write(cfg, str(tmp_path / "bad.yaml"))
    code, out = validate(path)
    assert code != 0
    assert "refusing to start" in out and needle in out


def test_shipped_envoy_configs_validate():
    files = sorted(glob.glob(os.path.join(ROOT, "envoy", "*.yaml")) + glob.glob(os.path.join(ROOT, "bench", "*.yaml")))
    assert files
    for f in files:
        code, out = validate(f, env={"LLM_GATEWAY_INTERNAL_TOKEN": "validate-token"})
        assert code == 0, f"{f}:\n{out[-2000:]}"


def test_example_gateway_config_is_valid(tmp_path):
    import yaml
    with open(os.path.join(ROOT, "config", "gateway.example.yaml")) as f:
        example = yaml.safe_load(f)
    keys = ["OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GROQ_API_KEY"]
    cfg = envoy_config.render(10000, 9901, example, env_keys=keys)
    path = envoy_config.write(cfg, str(tmp_path / "example.yaml"))
    code, out = validate(path, env={k: "sk-test-" + k for k in keys})
    assert code == 0, out[-2000:]
    # Without the referenced keys the filter refuses to start and says which one is missing.
    code, out = validate(path, env={k: "" for k in keys})
    assert code != 0 and "OPENAI_API_KEY" in out
