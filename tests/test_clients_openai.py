"""The OpenAI-side endpoints besides chat (issue 13): `/responses` (plain and streamed), `/embeddings`,
legacy `/completions`, and the opt-in passthrough of other `/openai/v1/*` paths, through a real Envoy
with the built filter. Fake providers check the shape of every request they receive (path, auth, model
rewrite, no gateway key); the real clients are the openai Python and Node SDKs, the Vercel AI SDK and
LangChain."""
import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import urllib.request

import pytest

from harness import Envoy, FakeUpstream, prom_samples, prom_value, request

KEY = "sk-gw-clients-openai-key"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_DIR = os.path.join(ROOT, "tests", "node")
VECTOR = [0.5, 0.25, 0.125]
RESP_USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 7,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 18}


def response_obj(model, text, status="completed"):
    done = status == "completed"
    item = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
    return {"id": "resp_1", "object": "response", "created_at": 1700000000, "status": status, "model": model,
            "output": [item] if done else [], "usage": RESP_USAGE if done else None, "error": None,
            "incomplete_details": None, "instructions": None, "max_output_tokens": None,
            "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
            "tools": [], "top_p": 1.0, "truncation": "disabled", "user": None, "metadata": {}}


def response_events(model, words):
    text = "".join(words)
    item = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    evs = [{"type": "response.created", "response": response_obj(model, "", "in_progress")},
           {"type": "response.in_progress", "response": response_obj(model, "", "in_progress")},
           {"type": "response.output_item.added", "output_index": 0, "item": item},
           {"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0,
            "part": part}]
    evs += [{"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "delta": w, "logprobs": []} for w in words]
    done_part = dict(part, text=text)
    evs += [{"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "text": text, "logprobs": []},
            {"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "part": done_part},
            {"type": "response.output_item.done", "output_index": 0,
             "item": dict(item, status="completed", content=[done_part])},
            {"type": "response.completed", "response": response_obj(model, text)}]
    out = []
    for i, ev in enumerate(evs):
        ev["sequence_number"] = i
        out.append((0.01, f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()))
    return out


def embedding_data(body):
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    b64 = body.get("encoding_format") == "base64"
    vec = base64.b64encode(struct.pack("<3f", *VECTOR)).decode() if b64 else VECTOR
    return [{"object": "embedding", "index": i, "embedding": vec} for i in range(len(inputs))]


class Provider:
    """A fake OpenAI-style provider that records shape violations (the tests assert there are none)."""

    def __init__(self, name, auth, models=None, fail=False):
        self.name, self.auth, self.models, self.fail = name, auth, models or {}, fail
        self.problems = []
        self.up = FakeUpstream(self.respond)

    def check(self, ok, what):
        if not ok:
            self.problems.append(what)

    def respond(self, rec):
        flat = json.dumps(rec.headers)
        self.check(KEY not in flat and KEY.encode() not in rec.body, f"gateway key upstream on {rec.path}")
        self.check("x-provider-name" not in rec.headers, "x-provider-name upstream")
        for name, value in self.auth.items():
            self.check(rec.headers.get(name) == value, f"{name} on {rec.path}: {rec.headers.get(name)}")
        if self.fail:
            return 500, {"content-type": "application/json"}, b'{"error":{"message":"down"}}'
        path = rec.path.split("?")[0]
        ctype = rec.headers.get("content-type", "")
        if rec.method == "GET":
            return 200, {"content-type": "application/json"}, json.dumps(
                {"object": "list", "data": [], "seen_path": rec.path}).encode()
        if "multipart/form-data" in ctype:
            # Audio transcription: the multipart body arrives byte for byte.
            self.check(b"RIFF-fake-audio" in rec.body, "multipart body changed")
            return 200, {"content-type": "application/json"}, json.dumps(
                {"text": f"heard {len(rec.body)} bytes",
                 "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 3, "total_tokens": 17}}).encode()
        body = json.loads(rec.body)
        model = body.get("model")
        want = self.models.get(model)
        self.check(want is not None, f"model {model!r} not an upstream name on {path}")
        if path.endswith("/responses"):
            if body.get("stream"):
                return 200, {"content-type": "text/event-stream"}, response_events(model, ["Hello", " from", " R"])
            return 200, {"content-type": "application/json"}, json.dumps(
                response_obj(model, "Hello from R")).encode()
        if path.endswith("/embeddings"):
            n = len(body["input"]) if isinstance(body["input"], list) else 1
            return 200, {"content-type": "application/json"}, json.dumps(
                {"object": "list", "data": embedding_data(body), "model": model,
                 "usage": {"prompt_tokens": 3 * n, "total_tokens": 3 * n}}).encode()
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            self.check("prompt" in body, "completions without prompt")
            base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model}
            if body.get("stream"):
                self.check((body.get("stream_options") or {}).get("include_usage") is True, "no usage asked")
                chunks = [dict(base, choices=[{"text": w, "index": 0, "logprobs": None, "finish_reason": None}])
                          for w in ["legacy", " text"]]
                chunks.append(dict(base, choices=[], usage={"prompt_tokens": 5, "completion_tokens": 2,
                                                            "total_tokens": 7}))
                return 200, {"content-type": "text/event-stream"}, \
                    [(0.01, b"data: " + json.dumps(c).encode() + b"\n\n") for c in chunks] + [(0, b"data: [DONE]\n\n")]
            return 200, {"content-type": "application/json"}, json.dumps(dict(
                base, choices=[{"text": "legacy text", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})).encode()
        if path.endswith("/images/generations"):
            return 200, {"content-type": "application/json"}, json.dumps(
                {"created": 1, "data": [{"b64_json": "AAAA"}],
                 "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
                           "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}}).encode()
        if path.endswith("/moderations"):
            return 200, {"content-type": "application/json"}, json.dumps(
                {"id": "modr-1", "model": model, "results": [{"flagged": False}]}).encode()
        self.check(False, f"unexpected path {rec.path}")
        return 404, {"content-type": "application/json"}, b'{"error":{"message":"no"}}'


@pytest.fixture(scope="module")
def gw():
    oa = Provider("oa", {"authorization": "Bearer sk-up-oa"},
                  {"gpt-4o-2024-08-06": 1, "text-embedding-3-small": 1, "acct-up": 1, "omni-moderation-latest": 1,
                   "gpt-image-1": 1})
    az = Provider("az", {"api-key": "az-key"}, {"dep-resp": 1, "az-emb": 1})
    flaky = Provider("flaky", {}, fail=True)
    cfg = {
        "openaiPassthrough": True,
        "maxBodyBytes": 64 * 1024,
        "providers": [
            {"name": "flaky", "supportedProvider": "OPENAI_COMPATIBLE", "url": flaky.up.url + "/v1",
             "isHosted": True, "models": ["fb-model"], "fallback": ["oa"]},
            {"name": "oa", "supportedProvider": "OPENAI", "url": oa.up.url + "/v1", "apiKey": "sk-up-oa",
             "models": [{"name": "gpt-4o", "upstreamName": "gpt-4o-2024-08-06"}, "text-embedding-3-small",
                        {"name": "fb-model", "upstreamName": "gpt-4o-2024-08-06"},
                        {"name": "acct", "upstreamName": "acct-up"}, "omni-moderation-latest"]},
            {"name": "az", "supportedProvider": "AZURE", "url": az.up.url, "apiKey": "az-key",
             "apiVersion": "2024-10-21", "models": [{"name": "az-4o", "upstreamName": "dep-resp"},
                                                    {"name": "az-emb", "upstreamName": "dep-emb"}]},
            {"name": "claude", "supportedProvider": "ANTHROPIC", "url": oa.up.url + "/v1", "apiKey": "sk-ant",
             "models": ["claude-x"]},
        ],
        "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}],
    }
    envoy = Envoy(cfg).start()
    yield envoy, {"oa": oa, "az": az, "flaky": flaky}
    envoy.stop()
    for p in (oa, az, flaky):
        p.up.stop()
    assert not oa.problems and not az.problems, (oa.problems, az.problems)


def client(envoy, base="/openai/v1"):
    import openai
    return openai.OpenAI(base_url=envoy.url + base, api_key=KEY, max_retries=0, timeout=20)


def no_problems(ups):
    for p in ups.values():
        assert not p.problems, (p.name, p.problems)


@pytest.mark.parametrize("base", ["/openai/v1", "/openai"])
def test_python_sdk_responses_embeddings_completions(gw, base):
    envoy, ups = gw
    c = client(envoy, base)
    r = c.responses.create(model="gpt-4o", input="hi")
    assert r.output_text == "Hello from R" and r.usage.input_tokens == 11
    rec = ups["oa"].up.last()
    assert rec.path == "/v1/responses" and rec.json()["model"] == "gpt-4o-2024-08-06"

    text, usage = "", None
    with c.responses.stream(model="gpt-4o", input="hi") as s:
        for ev in s:
            if ev.type == "response.output_text.delta":
                text += ev.delta
        usage = s.get_final_response().usage
    assert text == "Hello from R" and usage.output_tokens == 7
    assert "stream_options" not in ups["oa"].up.last().json()

    e = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [d.embedding for d in e.data] == [VECTOR, VECTOR] and e.usage.prompt_tokens == 6
    assert ups["oa"].up.last().path == "/v1/embeddings"

    cm = c.completions.create(model="gpt-4o", prompt="say", max_tokens=5)
    assert cm.choices[0].text == "legacy text" and cm.usage.total_tokens == 7
    assert ups["oa"].up.last().path == "/v1/completions"
    parts = [ch.choices[0].text for ch in c.completions.create(model="gpt-4o", prompt="say", stream=True)
             if ch.choices]
    assert "".join(parts) == "legacy text"
    no_problems(ups)


def test_azure_responses_and_unsupported_provider(gw):
    envoy, ups = gw
    c = client(envoy)
    r = c.responses.create(model="az-4o", input="hi")
    assert r.output_text == "Hello from R"
    rec = ups["az"].up.last()
    assert rec.path == "/openai/v1/responses" and rec.json()["model"] == "dep-resp"
    # Embeddings on the deployment path; the body's model is left as sent (the deployment decides).
    e = c.embeddings.create(model="az-emb", input="a")
    assert e.data[0].embedding == VECTOR
    rec = ups["az"].up.last()
    assert rec.path == "/openai/deployments/dep-emb/embeddings?api-version=2024-10-21"
    assert "authorization" not in rec.headers
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="claude-x", input="hi")
    assert e.value.code == "endpoint_not_supported"
    assert "'claude'" in e.value.message and "/v1/responses" in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="claude-x", input="a", extra_headers={"X-Provider-Name": "claude"})
    no_problems(ups)


def test_hosted_first_and_fallback_for_responses(gw):
    envoy, ups = gw
    before = len(ups["flaky"].up.requests)
    s, h, b = request("POST", envoy.url + "/openai/v1/responses", {"model": "fb-model", "input": "hi"},
                      {"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert s == 200, b
    assert h.get("x-llm-gateway-provider") == "oa" and h.get("x-llm-gateway-fallback") == "true"
    assert len(ups["flaky"].up.requests) == before + 1
    assert ups["flaky"].up.last().path == "/v1/responses"
    assert ups["oa"].up.last().path == "/v1/responses"
    no_problems(ups)


def test_usage_accounting_per_endpoint_shape(gw):
    envoy, ups = gw
    hdr = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for path, body in [("/responses", {"model": "acct", "input": "x"}),
                       ("/responses", {"model": "acct", "input": "x", "stream": True}),
                       ("/embeddings", {"model": "acct", "input": ["a", "b", "c"]}),
                       ("/completions", {"model": "acct", "prompt": "x"})]:
        s, _, b = request("POST", envoy.url + "/openai/v1" + path, body, hdr)
        assert s == 200, b
    with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus", timeout=5) as r:
        samples = prom_samples(r.read().decode())
    pm = {"gen_ai_provider_name": "oa", "gen_ai_request_model": "acct"}
    tok = "llmgw_gen_ai_client_token_usage_tokens_total"
    # Responses 11+11 input / 7+7 output (the stream's from response.completed); embeddings 9 input;
    # completions 5 / 2.
    assert prom_value(samples, tok, gen_ai_token_type="input", **pm) == 11 + 11 + 9 + 5
    assert prom_value(samples, tok, gen_ai_token_type="output", **pm) == 7 + 7 + 0 + 2
    assert prom_value(samples, "llmgw_requests_total", response_code="200", **pm) == 4


def test_passthrough_multipart_images_files(gw):
    envoy, ups = gw
    c = client(envoy)
    # A multipart upload larger than maxBodyBytes: streamed untouched, never held by the filter.
    audio = b"RIFF-fake-audio" + b"\0" * (200 * 1024)
    t = c.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio, "audio/wav"),
                                      extra_headers={"X-Provider-Name": "oa"})
    rec = ups["oa"].up.last()
    assert rec.path == "/v1/audio/transcriptions"
    assert rec.headers["content-type"].startswith("multipart/form-data")
    assert t.text == f"heard {len(rec.body)} bytes" and len(rec.body) > len(audio)
    img = c.images.generate(model="gpt-image-1", prompt="a cat", extra_headers={"X-Provider-Name": "oa"})
    assert img.data[0].b64_json == "AAAA"
    assert ups["oa"].up.last().path == "/v1/images/generations"
    # JSON body, no provider named: the model selects (and is a model the key may use).
    m = c.moderations.create(model="omni-moderation-latest", input="hi")
    assert m.results[0].flagged is False
    s, _, b = request("GET", envoy.url + "/openai/v1/files?purpose=batch", None,
                      {"authorization": f"Bearer {KEY}", "x-provider-name": "oa"})
    assert s == 200 and json.loads(b)["seen_path"] == "/v1/files?purpose=batch"
    s, _, _ = request("GET", envoy.url + "/openai/v1/files", None, {"authorization": "Bearer wrong"})
    assert s == 401
    with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus", timeout=5) as r:
        samples = prom_samples(r.read().decode())
    tok = "llmgw_gen_ai_client_token_usage_tokens_total"
    # Passthrough usage from the response's own shape; the model label is the API without a JSON model.
    assert prom_value(samples, tok, gen_ai_token_type="output", gen_ai_provider_name="oa",
                      gen_ai_request_model="audio") == 3
    assert prom_value(samples, tok, gen_ai_token_type="output", gen_ai_provider_name="oa",
                      gen_ai_request_model="images") == 4160
    no_problems(ups)


def test_langchain_responses_api_and_embeddings(gw):
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings
    envoy, ups = gw
    llm = ChatOpenAI(base_url=envoy.url + "/openai/v1", api_key=KEY, model="gpt-4o", use_responses_api=True,
                     max_retries=0, timeout=20)
    msg = llm.invoke("hello")
    text = msg.text if isinstance(msg.text, str) else msg.text()
    assert text == "Hello from R"
    assert ups["oa"].up.last().path == "/v1/responses"
    streamed = "".join(ch.text if isinstance(ch.text, str) else ch.text() for ch in llm.stream("hello"))
    assert streamed == "Hello from R"
    emb = OpenAIEmbeddings(base_url=envoy.url + "/openai/v1", api_key=KEY, model="text-embedding-3-small",
                           check_embedding_ctx_length=False, max_retries=0)
    assert emb.embed_documents(["a", "b"]) == [VECTOR, VECTOR]
    assert ups["oa"].up.last().path == "/v1/embeddings"
    no_problems(ups)


def test_node_openai_sdk_and_vercel_ai_sdk(gw):
    envoy, ups = gw
    node = shutil.which("node")
    assert node, "node is required (build.sh installs the Node clients with npm)"
    assert os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ai")), "run ./build.sh test (npm ci in tests/node)"
    p = subprocess.run([node, "clients.mjs", envoy.url + "/openai/v1", KEY], cwd=NODE_DIR, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["responses"] == {"text": "Hello from R", "input_tokens": 11}
    assert out["responses_stream"] == {"text": "Hello from R", "output_tokens": 7}
    assert out["embeddings"] == {"n": 2, "dim": 3, "first": 0.5}
    assert out["completions"] == {"text": "legacy text", "total": 7}
    assert out["vercel_generate"] == {"text": "Hello from R", "input": 11, "output": 7}
    assert out["vercel_stream"] == {"text": "Hello from R", "input": 11, "output": 7}
    no_problems(ups)
