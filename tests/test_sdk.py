"""The official openai SDK and LangChain's ChatOpenAI work unmodified against the gateway."""
import hashlib
import json

import pytest

from harness import Envoy, FakeUpstream, chat_response, sse_chunks

KEY = "sk-gw-sdk-key"


def responder(rec):
    body = json.loads(rec.body)
    model = body.get("model")
    if body.get("stream"):
        usage = {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7} \
            if (body.get("stream_options") or {}).get("include_usage") else None
        return 200, {"content-type": "text/event-stream"}, \
            [(0.05, c) for c in sse_chunks(model, ["Hello", " from", " upstream"], usage)]
    return 200, {"content-type": "application/json"}, json.dumps(chat_response(model, "Hello from upstream")).encode()


@pytest.fixture(scope="module")
def gw():
    up = FakeUpstream(responder)
    cfg = {"providers": [{"name": "p", "supportedProvider": "OPENAI", "url": up.url + "/v1", "apiKey": "sk-up-1234",
                          "models": ["gpt-4o-mini", "gpt-4o"]}],
           "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}]}
    envoy = Envoy(cfg).start()
    yield envoy, up
    envoy.stop()
    up.stop()


@pytest.mark.parametrize("base", ["/openai/v1", "/openai"])
def test_openai_sdk(gw, base):
    import openai
    envoy, up = gw
    client = openai.OpenAI(base_url=envoy.url + base, api_key=KEY, max_retries=0, timeout=20)
    r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from upstream"
    assert r.usage.total_tokens == 8
    rec = up.last()
    assert rec.headers["authorization"] == "Bearer sk-up-1234"
    assert KEY not in json.dumps(rec.headers)

    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello from upstream"
    assert usage.total_tokens == 7

    models = [m.id for m in client.models.list()]
    assert models == ["gpt-4o-mini", "gpt-4o"]


def test_openai_sdk_errors(gw):
    import openai
    envoy, _ = gw
    bad = openai.OpenAI(base_url=envoy.url + "/openai/v1", api_key="wrong", max_retries=0, timeout=20)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
    client = openai.OpenAI(base_url=envoy.url + "/openai/v1", api_key=KEY, max_retries=0, timeout=20)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_langchain_chat_openai(gw):
    from langchain_openai import ChatOpenAI
    envoy, up = gw
    llm = ChatOpenAI(base_url=envoy.url + "/openai/v1", api_key=KEY, model="gpt-4o", max_retries=0, timeout=20)
    msg = llm.invoke("hello")
    assert msg.content == "Hello from upstream"
    assert up.last().json()["model"] == "gpt-4o"
    parts = [c.content for c in llm.stream("hello")]
    assert "".join(parts) == "Hello from upstream"
