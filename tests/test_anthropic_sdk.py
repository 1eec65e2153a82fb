"""The Anthropic Messages ingress (/anthropic/v1/messages) through the real Envoy, driven by the official
Anthropic Python SDK against three fake upstreams that check what they receive: an ANTHROPIC provider
(native passthrough), an OpenAI-style provider (Messages -> chat translation) and a Gemini provider
(Messages -> chat -> generateContent). messages.create and messages.stream with tools on each, usage
from each (Prometheus token counters), Anthropic-shaped errors, count_tokens."""
import hashlib
import json
import urllib.request

import pytest

from harness import Envoy, FakeUpstream, prom_samples, prom_value, request
from test_native import anthropic_responder, gemini_responder

anthropic = pytest.importorskip("anthropic")

KEY = "sk-gw-anthropic-ingress"
SYSTEM = "You are terse."
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# Anthropic-only request fields that must never reach an OpenAI-style provider.
ANTHROPIC_ONLY = ("system", "stop_sequences", "top_k", "metadata", "thinking", "anthropic_version")


def native_responder(rec):
    """The Anthropic fake: count_tokens, else the native fake of test_native (path, x-api-key,
    anthropic-version, no authorization, model rewritten)."""
    if rec.path == "/v1/messages/count_tokens":
        ok = rec.headers.get("x-api-key") == "sk-ant-REAL" and rec.json().get("model") == "claude-sonnet-4-5"
        return (200 if ok else 400), {"content-type": "application/json"}, json.dumps(
            {"input_tokens": 42} if ok else {"type": "error", "error": {"type": "invalid_request_error",
                                                                        "message": "bad count_tokens"}}).encode()
    body = rec.json()
    if body.get("tools") and body["tools"][0].get("input_schema") is None:
        return 400, {"content-type": "application/json"}, b'{"type":"error","error":{"type":"invalid_request_error","message":"tools untouched?"}}'
    if "system" in body and body["system"] != SYSTEM:
        return 400, {"content-type": "application/json"}, b'{"type":"error","error":{"type":"invalid_request_error","message":"system untouched?"}}'
    return anthropic_responder(rec)


def chunk(delta=None, finish=None, usage=None):
    c = {"id": "chatcmpl-a1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-up",
         "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if usage:
        c["usage"] = usage
    return (0.01, b"data: " + json.dumps(c).encode() + b"\n\n")


def openai_responder(rec):
    problems = []
    if rec.path != "/v1/chat/completions":
        problems.append(f"path {rec.path}")
    if rec.headers.get("authorization") != "Bearer sk-oa-REAL":
        problems.append("authorization")
    for h in ("x-api-key", "anthropic-version", "anthropic-beta"):
        if h in rec.headers:
            problems.append(f"header {h} must not be sent")
    body = rec.json()
    for f in ANTHROPIC_ONLY:
        if f in body:
            problems.append(f"Anthropic field {f}")
    msgs = body.get("messages", [])
    if body.get("model") != "gpt-up":
        problems.append(f"model {body.get('model')}")
    if not msgs or msgs[0] != {"role": "system", "content": SYSTEM}:
        problems.append("system message first")
    if body.get("tools") and body["tools"][0].get("type") != "function":
        problems.append("tools not in OpenAI form")
    # A tool result must follow the assistant's tool call as a tool message.
    for i, m in enumerate(msgs):
        if m.get("role") == "tool":
            prev = msgs[i - 1]
            if prev.get("role") != "assistant" or prev["tool_calls"][0]["id"] != m["tool_call_id"]:
                problems.append("tool message placement")
            if m["content"] != "15C":
                problems.append("tool content")
    if body.get("stream") and body.get("stream_options") != {"include_usage": True}:
        problems.append("stream without include_usage")
    if problems:
        return 400, {"content-type": "application/json"}, json.dumps(
            {"error": {"message": "; ".join(problems), "type": "invalid_request_error", "code": None}}).encode()
    usage = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}
    if any(m.get("role") == "tool" for m in msgs):
        return 200, {"content-type": "application/json"}, json.dumps({
            "id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "gpt-up",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "15C."}}],
            "usage": usage}).encode()
    if not body.get("stream"):
        return 200, {"content-type": "application/json"}, json.dumps({
            "id": "chatcmpl-a", "object": "chat.completion", "created": 1, "model": "gpt-up",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Let me check.",
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}}],
            "usage": usage}).encode()
    return 200, {"content-type": "text/event-stream"}, [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}),
        chunk({"content": "check."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_2", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
        chunk(finish="tool_calls"),
        chunk(usage=usage),
        (0.01, b"data: [DONE]\n\n"),
    ]


def down_responder(rec):
    return 503, {"content-type": "application/json"}, b'{"error":{"message":"hosted is down","type":"x"}}'


@pytest.fixture(scope="module")
def gw():
    ant, oa, gem = FakeUpstream(native_responder), FakeUpstream(openai_responder), FakeUpstream(gemini_responder)
    down = FakeUpstream(down_responder)
    cfg = {"providers": [
        {"name": "hosted", "supportedProvider": "OPENAI_COMPATIBLE", "url": down.url + "/v1", "isHosted": True,
         "fallback": ["claude"], "models": [{"name": "chain", "upstreamName": "h-up"}]},
        {"name": "claude", "supportedProvider": "ANTHROPIC", "url": ant.url + "/v1", "apiKey": "sk-ant-REAL",
         "models": [{"name": "claude", "upstreamName": "claude-sonnet-4-5"}]},
        {"name": "oa", "supportedProvider": "OPENAI_COMPATIBLE", "url": oa.url + "/v1", "apiKey": "sk-oa-REAL",
         "models": [{"name": "gpt", "upstreamName": "gpt-up"}]},
        {"name": "gemini", "supportedProvider": "GEMINI", "api": "native", "url": gem.url + "/v1beta",
         "apiKey": "gem-REAL", "models": ["gemini-2.0-flash"]}],
        "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}]}
    envoy = Envoy(cfg).start()
    envoy.down = down
    yield envoy, ant, oa, gem
    envoy.stop()
    for up in (ant, oa, gem, down):
        up.stop()


def client(envoy, bearer=False):
    auth = {"auth_token": KEY} if bearer else {"api_key": KEY}
    return anthropic.Anthropic(base_url=envoy.url + "/anthropic", max_retries=0, timeout=20, **auth)


def tool_use(message):
    return [(b.name, b.input) for b in message.content if b.type == "tool_use"]


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


# Model, text the provider answers, its usage (input, output) as the Anthropic client sees it.
CASES = {
    "anthropic": ("claude", "Let me check.", (10, 5), (10, 12)),
    "openai": ("gpt", "Let me check.", (21, 9), (21, 9)),
    "gemini": ("gemini-2.0-flash", None, (7, 3), (7, 3)),
}


@pytest.mark.parametrize("kind", CASES)
def test_create_with_tools(gw, kind):
    envoy, *_ = gw
    model, text, (inp, out), _ = CASES[kind]
    m = client(envoy, bearer=(kind == "openai")).messages.create(
        model=model, max_tokens=200, system=SYSTEM, messages=ASK, tools=TOOLS)
    assert m.type == "message" and m.role == "assistant" and m.model
    if kind == "gemini":  # the Gemini fake answers plain text when not streaming
        assert text_of(m) == "Bonjour!" and m.stop_reason == "end_turn"
    else:
        assert text_of(m) == text
        assert tool_use(m) == [("get_weather", {"city": "Paris"})]
        assert m.stop_reason == "tool_use"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (inp, out)


@pytest.mark.parametrize("kind", CASES)
def test_stream_with_tools(gw, kind):
    envoy, *_ = gw
    model, text, _, (inp, out) = CASES[kind]
    with client(envoy).messages.stream(model=model, max_tokens=200, system=SYSTEM, messages=ASK,
                                       tools=TOOLS) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == (text or "Checking")
    assert text_of(final) == streamed
    assert tool_use(final) == [("get_weather", {"city": "Paris"})]
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == out
    if kind != "anthropic":  # translated streams report input tokens at the end (message_delta)
        assert final.usage.input_tokens == inp


def test_tool_result_turn_reaches_openai_as_tool_message(gw):
    envoy, _, oa, _ = gw
    m = client(envoy).messages.create(model="gpt", max_tokens=100, system=SYSTEM, tools=TOOLS, messages=ASK + [
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "call_9", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_9", "content": "15C"}]}])
    assert text_of(m) == "15C." and m.stop_reason == "end_turn"
    sent = oa.last().json()["messages"]
    assert [x["role"] for x in sent] == ["system", "user", "assistant", "tool"]
    assert json.loads(sent[2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_native_body_passes_untouched_but_model(gw):
    envoy, ant, _, _ = gw
    body = {"model": "claude", "max_tokens": 50, "system": SYSTEM, "messages": ASK, "tools": TOOLS,
            "top_k": 3, "metadata": {"user_id": "u1"}}
    s, h, b = request("POST", envoy.url + "/anthropic/v1/messages", body,
                      {"x-api-key": KEY, "content-type": "application/json", "anthropic-version": "2023-06-01"})
    assert s == 200, b
    assert h.get("x-llm-gateway-provider") == "claude"
    assert ant.last().json() == dict(body, model="claude-sonnet-4-5")


def test_usage_is_counted_for_every_upstream(gw):
    envoy, *_ = gw
    with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus", timeout=5) as r:
        samples = prom_samples(r.read().decode())
    for provider, model in (("claude", "claude"), ("oa", "gpt"), ("gemini", "gemini-2.0-flash")):
        pm = {"gen_ai_provider_name": provider, "gen_ai_request_model": model}
        assert prom_value(samples, "llmgw_gen_ai_client_token_usage_tokens_total",
                          gen_ai_token_type="input", **pm) > 0, provider
        assert prom_value(samples, "llmgw_gen_ai_client_token_usage_tokens_total",
                          gen_ai_token_type="output", **pm) > 0, provider


def test_errors_are_anthropic_shaped(gw):
    envoy, *_ = gw
    bad = anthropic.Anthropic(base_url=envoy.url + "/anthropic", api_key="nope", max_retries=0, timeout=20)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="gpt", max_tokens=10, messages=ASK)
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        client(envoy).messages.create(model="no-such-model", max_tokens=10, messages=ASK)
    assert e.value.body["type"] == "error"
    # An upstream error from the native provider passes as Anthropic sent it.
    with pytest.raises(anthropic.BadRequestError) as e:
        client(envoy).messages.create(model="claude", max_tokens=10, system=SYSTEM,
                                      messages=[{"role": "user", "content": "bad-request"}])
    assert "too long" in e.value.message
    # A server tool cannot go to an OpenAI-style provider.
    with pytest.raises(anthropic.BadRequestError) as e:
        client(envoy).messages.create(model="gpt", max_tokens=10, messages=ASK,
                                      tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "server tool" in e.value.message
    s, _, b = request("POST", envoy.url + "/anthropic/v1/nothing", {}, {"x-api-key": KEY})
    assert s == 404 and json.loads(b)["type"] == "error"


def test_count_tokens(gw):
    envoy, *_ = gw
    c = client(envoy)
    assert c.messages.count_tokens(model="claude", messages=ASK).input_tokens == 42
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.count_tokens(model="gpt", messages=ASK)
    assert "count_tokens" in e.value.message and e.value.body["error"]["type"] == "invalid_request_error"


def test_fallback_chain_serves_messages(gw):
    """A hosted OpenAI-style provider that fails, falling back to ANTHROPIC: the chain replays the chat
    form, the attempt translates it to Anthropic's API, and the client still gets Messages."""
    envoy, ant, _, _ = gw
    c = client(envoy)
    raw = c.messages.with_raw_response.create(model="chain", max_tokens=100, messages=ASK, tools=TOOLS)
    m = raw.parse()
    assert raw.headers.get("x-llm-gateway-fallback") == "true"
    assert text_of(m) == "Let me check." and tool_use(m) == [("get_weather", {"city": "Paris"})]
    assert envoy.down.last().json()["model"] == "h-up"
    sent = ant.last()
    assert sent.path == "/v1/messages" and sent.json()["model"] == "claude-sonnet-4-5"
    with c.messages.stream(model="chain", max_tokens=100, messages=ASK, tools=TOOLS) as stream:
        assert "".join(stream.text_stream) == "Let me check."
        final = stream.get_final_message()
    assert tool_use(final) == [("get_weather", {"city": "Paris"})] and final.usage.output_tokens == 12
