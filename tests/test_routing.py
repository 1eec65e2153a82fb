"""Routing through the real Envoy: each provider type gets the right path, host, auth header and body
model; the gateway key never reaches upstream; selection follows header → key settings → org settings."""
import hashlib
import json

import pytest

from harness import Envoy, FakeUpstream, request

KEY = "sk-gw-test-routing-key"
KEY_SETTINGS = "sk-gw-test-settings-key"
KEY_NARROW = "sk-gw-test-narrow-key"


def h(k):
    return hashlib.sha256(k.encode()).hexdigest()


PROVIDERS = {
    # name: (supportedProvider, url suffix, extra fields)
    "openai-main": ("OPENAI", "/v1", {"apiKey": "sk-openai-AAAA", "models": ["gpt-4o", "gpt-4o-mini"]}),
    "azure-east": ("AZURE", "", {"apiKey": "az-key-BBBB", "apiVersion": "2024-02-01",
                                 "models": [{"name": "gpt-35", "upstreamName": "my-gpt35-deploy"}]}),
    "gemini-api": ("GEMINI", "/v1beta/openai", {"apiKey": "gem-key-CCCC", "models": ["gemini-1.5-flash"]}),
    "vertex": ("VERTEXAIGEMINI", "/v1/projects/p1/locations/us-central1",
               {"apiKey": "ya29.DDDD", "models": ["gemini-1.5-pro"]}),
    "mistral": ("MISTRAL", "/v1", {"apiKey": "mis-EEEE", "models": ["mistral-small"]}),
    "groq": ("GROQ", "/openai/v1", {"apiKey": "gsk_FFFF", "models": ["llama-3.1-8b-instant"]}),
    "anthropic-compat": ("ANTHROPIC", "/v1", {"apiKey": "sk-ant-GGGG", "api": "openai", "models": ["claude-sonnet"]}),
    "vllm-local": ("OPENAI_COMPATIBLE", "/v1", {"isHosted": True,
                                               "models": [{"name": "gpt-4o", "upstreamName": "llama3.1:8b"},
                                                          "qwen"]}),
}


@pytest.fixture(scope="module")
def env():
    ups = {name: FakeUpstream() for name in PROVIDERS}
    providers = []
    for name, (kind, suffix, extra) in PROVIDERS.items():
        providers.append(dict({"name": name, "supportedProvider": kind, "url": ups[name].url + suffix}, **extra))
    cfg = {
        "settings": {"provider": "mistral"},
        "providers": providers,
        "configs": [{"id": "narrow", "inherits": "default",
                     "providers": [{"name": "openai-main", "models": ["gpt-4o-mini"]}],
                     "only": ["openai-main", "groq"]}],
        "keys": [
            {"id": "main", "sha256": h(KEY), "config": "default"},
            {"id": "with-settings", "sha256": h(KEY_SETTINGS), "config": "default",
             "settings": {"provider": "groq"}},
            {"id": "narrow", "sha256": h(KEY_NARROW), "config": "narrow"},
        ],
    }
    envoy = Envoy(cfg).start()
    yield envoy, ups
    envoy.stop()
    for u in ups.values():
        u.stop()


def chat(envoy, body, key=KEY, headers=None, path="/openai/v1/chat/completions", use_bearer=True):
    hdrs = {"content-type": "application/json"}
    if key:
        hdrs.update({"authorization": f"Bearer {key}"} if use_bearer else {"x-api-key": key})
    hdrs.update(headers or {})
    return request("POST", envoy.url + path, body, hdrs)


def assert_no_gateway_key(rec, key=KEY):
    for name, value in rec.headers.items():
        assert key not in value, f"gateway key leaked in header {name}"
        assert name not in ("x-api-key", "x-provider-name", "x-llm-gateway-cluster"), name
    assert key.encode() not in rec.body


EXPECT = {
    # provider: (request model, X-Provider-Name, upstream path, auth header, auth value, body model)
    "openai-main": ("gpt-4o-mini", None, "/v1/chat/completions", "authorization", "Bearer sk-openai-AAAA",
                    "gpt-4o-mini"),
    "azure-east": ("gpt-35", None, "/openai/deployments/my-gpt35-deploy/chat/completions?api-version=2024-02-01",
                   "api-key", "az-key-BBBB", "gpt-35"),
    "gemini-api": ("gemini-1.5-flash", None, "/v1beta/openai/chat/completions", "authorization",
                   "Bearer gem-key-CCCC", "gemini-1.5-flash"),
    "vertex": ("gemini-1.5-pro", None, "/v1/projects/p1/locations/us-central1/endpoints/openapi/chat/completions",
               "authorization", "Bearer ya29.DDDD", "google/gemini-1.5-pro"),
    "mistral": ("mistral-small", None, "/v1/chat/completions", "authorization", "Bearer mis-EEEE",
                "mistral-small"),
    "groq": ("llama-3.1-8b-instant", None, "/openai/v1/chat/completions", "authorization", "Bearer gsk_FFFF",
             "llama-3.1-8b-instant"),
    "anthropic-compat": ("claude-sonnet", None, "/v1/chat/completions", "authorization", "Bearer sk-ant-GGGG",
                         "claude-sonnet"),
    "vllm-local": ("gpt-4o", None, "/v1/chat/completions", None, None, "llama3.1:8b"),
}


@pytest.mark.parametrize("provider", list(EXPECT))
@pytest.mark.parametrize("use_bearer", [True, False])
def test_each_provider_type_gets_its_shape(env, provider, use_bearer):
    envoy, ups = env
    model, pname, path, auth_name, auth_value, body_model = EXPECT[provider]
    up = ups[provider]
    up.clear()
    status, headers, body = chat(envoy, {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                                 headers={"x-provider-name": pname} if pname else None, use_bearer=use_bearer)
    assert status == 200, body
    rec = up.last()
    assert rec is not None, "upstream did not receive the request"
    assert rec.method == "POST"
    assert rec.path == path
    assert rec.headers["host"] == f"127.0.0.1:{up.port}"
    if auth_name:
        assert rec.headers.get(auth_name) == auth_value
    else:
        assert "authorization" not in rec.headers
    if auth_name != "authorization":
        assert "authorization" not in rec.headers
    assert rec.json()["model"] == body_model
    assert_no_gateway_key(rec)
    assert headers["x-llm-gateway-provider"] == provider
    assert headers["x-llm-gateway-model"] == model


def test_hosted_provider_wins_for_shared_model(env):
    envoy, ups = env
    ups["vllm-local"].clear()
    ups["openai-main"].clear()
    status, headers, _ = chat(envoy, {"model": "gpt-4o", "messages": []})
    assert status == 200
    assert headers["x-llm-gateway-provider"] == "vllm-local"
    assert ups["vllm-local"].last() is not None and ups["openai-main"].last() is None


def test_provider_header_beats_hosted_and_settings(env):
    envoy, ups = env
    ups["openai-main"].clear()
    status, headers, _ = chat(envoy, {"model": "gpt-4o", "messages": []}, key=KEY_SETTINGS,
                              headers={"X-Provider-Name": "openai-main"})
    assert status == 200
    assert headers["x-llm-gateway-provider"] == "openai-main"
    rec = ups["openai-main"].last()
    assert rec.json()["model"] == "gpt-4o"
    assert_no_gateway_key(rec, KEY_SETTINGS)


def test_key_settings_beat_org_settings(env):
    envoy, ups = env
    # No model named: key settings say groq, org settings say mistral.
    status, headers, _ = chat(envoy, {"messages": []}, key=KEY_SETTINGS)
    assert status == 200
    assert headers["x-llm-gateway-provider"] == "groq"
    assert ups["groq"].last().json()["model"] == "llama-3.1-8b-instant"
    # The org settings apply to keys without their own.
    status, headers, _ = chat(envoy, {"messages": []})
    assert headers["x-llm-gateway-provider"] == "mistral"


def test_no_model_takes_first_provider_first_model(env):
    envoy, ups = env
    ups["openai-main"].clear()
    status, headers, _ = chat(envoy, {"messages": [{"role": "user", "content": "x"}]}, key=KEY_NARROW)
    assert status == 200
    assert headers["x-llm-gateway-provider"] == "openai-main"
    rec = ups["openai-main"].last()
    assert rec.json() == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}


def test_config_restricts_models_and_providers(env):
    envoy, _ = env
    status, _, body = chat(envoy, {"model": "gpt-4o", "messages": []}, key=KEY_NARROW)
    assert status == 404
    err = json.loads(body)["error"]
    assert err["code"] == "model_not_found" and "gpt-4o" in err["message"]
    status, _, body = chat(envoy, {"model": "mistral-small", "messages": []}, key=KEY_NARROW,
                           headers={"x-provider-name": "mistral"})
    assert status == 400
    assert json.loads(body)["error"]["code"] == "unknown_provider"
    status, _, body = chat(envoy, {"model": "gpt-4o-mini", "messages": []},
                           headers={"x-provider-name": "groq"})
    assert status == 404
    assert "groq" in json.loads(body)["error"]["message"]


def test_body_is_forwarded_byte_for_byte_except_model(env):
    envoy, ups = env
    raw = ('{"temperature": 1.50e0,  "messages":[{"role":"user","content":"caf\\u00e9 \\"model\\": 1"}],'
           '"model":"gpt-4o", "metadata":{"model":"keep-me"}, "n": 1}').encode()
    ups["vllm-local"].clear()
    status, _, _ = chat(envoy, raw)
    assert status == 200
    got = ups["vllm-local"].last()
    assert got.body == raw.replace(b'"model":"gpt-4o"', b'"model":"llama3.1:8b"')
    assert int(got.headers["content-length"]) == len(got.body)
    # No rewrite needed: the exact bytes arrive.
    raw2 = b'{ "model" : "qwen", "messages" : [ ] ,"x":1.0}'
    status, _, _ = chat(envoy, raw2)
    assert status == 200
    assert ups["vllm-local"].last().body == raw2


def test_sdk_base_urls(env):
    envoy, _ = env
    for path in ("/openai/v1/chat/completions", "/openai/chat/completions"):
        status, headers, _ = chat(envoy, {"model": "qwen", "messages": []}, path=path)
        assert status == 200, path
        assert headers["x-llm-gateway-provider"] == "vllm-local"


def test_models_endpoint_lists_callers_models(env):
    envoy, _ = env
    for path in ("/openai/v1/models", "/openai/models"):
        status, headers, body = request("GET", envoy.url + path, headers={"x-api-key": KEY_NARROW})
        assert status == 200
        assert headers["content-type"] == "application/json"
        data = json.loads(body)
        assert data["object"] == "list"
        assert [m["id"] for m in data["data"]] == ["gpt-4o-mini", "llama-3.1-8b-instant"]
        assert data["data"][0]["owned_by"] == "openai-main"
    status, _, body = request("GET", envoy.url + "/openai/v1/models/qwen", headers={"x-api-key": KEY})
    assert status == 200 and json.loads(body)["id"] == "qwen"
    status, _, body = request("GET", envoy.url + "/openai/v1/models/qwen", headers={"x-api-key": KEY_NARROW})
    assert status == 404
