"""Native provider APIs through the real Envoy: fake Anthropic and Gemini upstreams check the request
shape they receive and answer natively; the official openai SDK receives correct objects, streamed tool
calls included."""
import hashlib
import json

import pytest

from harness import Envoy, FakeUpstream, request

KEY = "sk-gw-native-key"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
OPENAI_ONLY = ("stream_options", "n", "logprobs", "frequency_penalty", "presence_penalty", "tool_choice",
               "response_format", "max_completion_tokens")


def sse(events):
    return [(0.02, f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()) for name, data in events]


def anthropic_responder(rec):
    problems = []
    if rec.path != "/v1/messages":
        problems.append(f"path {rec.path}")
    if rec.headers.get("x-api-key") != "sk-ant-REAL":
        problems.append("x-api-key")
    if not rec.headers.get("anthropic-version"):
        problems.append("anthropic-version")
    if "authorization" in rec.headers:
        problems.append("authorization must not be sent")
    body = rec.json()
    for f in ("model", "max_tokens", "messages"):
        if f not in body:
            problems.append(f"missing {f}")
    for f in OPENAI_ONLY:
        if f in body and f != "tool_choice":  # Anthropic has its own tool_choice
            problems.append(f"OpenAI-only field {f}")
    if body.get("model") != "claude-sonnet-4-5":
        problems.append("model " + str(body.get("model")))
    if any(m.get("role") == "system" for m in body.get("messages", [])):
        problems.append("system message left in messages")
    if problems:
        return 400, {"content-type": "application/json"}, json.dumps(
            {"type": "error", "error": {"type": "invalid_request_error", "message": "; ".join(problems)}}).encode()
    if "bad-request" in json.dumps(body["messages"]):
        return 400, {"content-type": "application/json"}, json.dumps(
            {"type": "error", "error": {"type": "invalid_request_error", "message": "messages: too long"}}).encode()
    if not body.get("stream"):
        return 200, {"content-type": "application/json"}, json.dumps({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5}}).encode()
    return 200, {"content-type": "text/event-stream"}, sse([
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
            "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Let me "}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "check."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"output_tokens": 12}}),
        ("message_stop", {"type": "message_stop"}),
    ])


VERTEX_PREFIX = "/v1/projects/p1/locations/us-central1/publishers/google"


def gemini_responder(rec):
    problems = []
    stream = ":streamGenerateContent" in rec.path
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    if rec.path.startswith(VERTEX_PREFIX):  # Vertex AI: regional project path, bearer access token
        if rec.path != f"{VERTEX_PREFIX}/models/gemini-2.0-flash:{method}":
            problems.append(f"path {rec.path}")
        if rec.headers.get("authorization") != "Bearer ya29.VERTEX":
            problems.append("authorization")
        if "x-goog-api-key" in rec.headers:
            problems.append("x-goog-api-key must not be sent to Vertex")
    else:
        if rec.path != f"/v1beta/models/gemini-2.0-flash:{method}":
            problems.append(f"path {rec.path}")
        if rec.headers.get("x-goog-api-key") != "gem-REAL":
            problems.append("x-goog-api-key")
        if "authorization" in rec.headers:
            problems.append("authorization must not be sent")
    body = rec.json()
    if "contents" not in body:
        problems.append("contents")
    for f in OPENAI_ONLY + ("model", "messages", "stream"):
        if f in body:
            problems.append(f"OpenAI field {f}")
    if problems:
        return 400, {"content-type": "application/json"}, json.dumps(
            {"error": {"code": 400, "message": "; ".join(problems), "status": "INVALID_ARGUMENT"}}).encode()
    usage = {"promptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 10}
    if not stream:
        return 200, {"content-type": "application/json"}, json.dumps({
            "candidates": [{"content": {"role": "model", "parts": [{"text": "Bonjour!"}]}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": usage, "modelVersion": "gemini-2.0-flash", "responseId": "r1"}).encode()
    events = [
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "Checking"}]}, "index": 0}],
         "responseId": "r2"},
        {"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            "finishReason": "STOP", "index": 0}], "usageMetadata": usage, "responseId": "r2"},
    ]
    return 200, {"content-type": "text/event-stream"}, [(0.02, b"data: " + json.dumps(e).encode() + b"\r\n\r\n")
                                                        for e in events]


@pytest.fixture(scope="module")
def gw():
    ant, gem = FakeUpstream(anthropic_responder), FakeUpstream(gemini_responder)
    cfg = {"providers": [
        {"name": "claude", "supportedProvider": "ANTHROPIC", "url": ant.url + "/v1", "apiKey": "sk-ant-REAL",
         "models": [{"name": "claude", "upstreamName": "claude-sonnet-4-5"}]},
        {"name": "gemini", "supportedProvider": "GEMINI", "api": "native", "url": gem.url + "/v1beta",
         "apiKey": "gem-REAL", "models": ["gemini-2.0-flash"]},
        {"name": "vertex", "supportedProvider": "VERTEXAIGEMINI", "api": "native",
         "url": gem.url + "/v1/projects/p1/locations/us-central1", "apiKey": "ya29.VERTEX",
         "models": [{"name": "vertex-flash", "upstreamName": "gemini-2.0-flash"}]}],
        "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}]}
    envoy = Envoy(cfg).start()
    yield envoy, ant, gem
    envoy.stop()
    ant.stop()
    gem.stop()


def client(envoy):
    import openai
    return openai.OpenAI(base_url=envoy.url + "/openai/v1", api_key=KEY, max_retries=0, timeout=20)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]


def test_anthropic_tool_call(gw):
    envoy, ant, _ = gw
    r = client(envoy).chat.completions.create(model="claude", messages=MESSAGES, tools=TOOLS,
                                              tool_choice="auto", max_tokens=200, n=1,
                                              stream_options=None)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == \
        ("toolu_1", "get_weather", {"city": "Paris"})
    assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == 5
    sent = ant.last().json()
    assert sent["system"] and sent["max_tokens"] == 200
    assert sent["tools"][0]["name"] == "get_weather" and "input_schema" in sent["tools"][0]


def test_anthropic_streamed_tool_call(gw):
    envoy, ant, _ = gw
    stream = client(envoy).chat.completions.create(model="claude", messages=MESSAGES, tools=TOOLS, stream=True,
                                                   stream_options={"include_usage": True})
    text, args, name, finish, usage = "", "", None, None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert text == "Let me check."
    assert name == "get_weather" and json.loads(args) == {"city": "Paris"}
    assert finish == "tool_calls"
    assert usage.prompt_tokens == 10 and usage.completion_tokens == 12
    assert ant.last().json()["stream"] is True


def test_anthropic_error_keeps_status_and_openai_shape(gw):
    import openai
    envoy, _, _ = gw
    with pytest.raises(openai.BadRequestError) as e:
        client(envoy).chat.completions.create(model="claude", messages=[{"role": "user", "content": "bad-request"}])
    assert e.value.status_code == 400
    assert "too long" in e.value.message
    s, h, b = request("POST", envoy.url + "/openai/v1/chat/completions",
                      {"model": "claude", "messages": [{"role": "user", "content": "bad-request"}]},
                      {"x-api-key": KEY})
    assert s == 400 and set(json.loads(b)["error"]) == {"message", "type", "param", "code"}


def test_gemini_native(gw):
    envoy, _, gem = gw
    r = client(envoy).chat.completions.create(model="gemini-2.0-flash", messages=MESSAGES, temperature=0.2)
    assert r.choices[0].message.content == "Bonjour!"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == 10
    sent = gem.last().json()
    assert sent["systemInstruction"] and sent["generationConfig"]["temperature"] == 0.2


def test_gemini_native_stream_with_function_call(gw):
    envoy, _, _ = gw
    stream = client(envoy).chat.completions.create(model="gemini-2.0-flash", messages=MESSAGES, tools=TOOLS,
                                                   stream=True)
    text, calls, finish = "", [], None
    for chunk in stream:
        assert chunk.usage is None  # the client did not ask for the usage chunk
        for c in chunk.choices:
            text += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert text == "Checking"
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_vertex_native(gw):
    envoy, _, gem = gw
    r = client(envoy).chat.completions.create(model="vertex-flash", messages=MESSAGES)
    assert r.choices[0].message.content == "Bonjour!"
    assert r.model == "vertex-flash"
    assert gem.last().path.startswith(VERTEX_PREFIX)
    stream = client(envoy).chat.completions.create(model="vertex-flash", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Checking"
