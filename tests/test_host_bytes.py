"""Hostile bytes through the real Envoy (issue 9 items 1 and 2): header bytes >= 0x80 on the request
and on a provider's response, and a provider sending one huge SSE line. After each, every worker must
still answer valid requests and Envoy's log must show no panic."""
import hashlib
import json
import socket
import time

import pytest

from harness import Envoy, FakeUpstream, request, sse_chunks

KEY = "sk-gw-bytes-key"
CHAT = "/openai/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "x"}]}
HUGE_LINE = 24 * 1024 * 1024


def h(k):
    return hashlib.sha256(k.encode()).hexdigest()


def responder(rec):
    """Answers with non-UTF-8 bytes in response headers; streams a huge SSE line for model `huge`."""
    try:
        req = json.loads(rec.body)
    except ValueError:
        req = {}
    odd = {"x-odd": "caf\xe9\xff", "x-provider-note": "\xff\xfe"}
    if req.get("model") == "huge":
        line = b"data: {\"choices\":[{\"delta\":{\"content\":\"" + b"a" * HUGE_LINE + b"\"}}]}\n\n"
        step = 1024 * 1024
        chunks = [(0, line[i:i + step]) for i in range(0, len(line), step)]
        tail = sse_chunks("huge", ["ok"], usage={"prompt_tokens": 1, "completion_tokens": 1,
                                                  "total_tokens": 2})
        return 200, dict(odd, **{"content-type": "text/event-stream; x=\xff"}), \
            chunks + [(0, c) for c in tail]
    if req.get("stream"):
        return 200, dict(odd, **{"content-type": "text/event-stream; charset=\xff"}), \
            [(0, c) for c in sse_chunks(req.get("model", "m1"), ["a", "b"])]
    body = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m1",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}})
    return 200, dict(odd, **{"content-type": "application/json\xff"}), body.encode()


@pytest.fixture(scope="module")
def gw():
    up = FakeUpstream(responder)
    cfg = {
        "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
                       "isHosted": True, "models": ["m1", "huge"]}],
        "keys": [{"id": "k", "sha256": h(KEY), "config": "default"}],
    }
    envoy = Envoy(cfg).start()
    yield envoy, up
    envoy.stop()
    up.stop()


def raw(envoy, data, timeout=5):
    """Sends raw bytes on a fresh connection; returns what came back (possibly nothing)."""
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                out += b
                if b"\r\n\r\n" in out and (b"content-length: 0" in out.lower() or out.endswith(b"}")):
                    break
        except socket.timeout:
            pass
    return out


def all_workers_answer(envoy, n=12):
    """Fresh connections spread over Envoy's 2 workers; every one must get a real answer."""
    for _ in range(n):
        s, _, b = request("POST", envoy.url + CHAT, BODY, headers={"Authorization": f"Bearer {KEY}"})
        assert s == 200, b
        assert json.loads(b)["choices"][0]["message"]["content"] == "hi"


def no_panic(envoy):
    logs = envoy.logs()
    for marker in ("panicked", "RuntimeError", "unreachable", "wasm vm failed"):
        assert marker not in logs, logs[-3000:]


def req(path, *header_lines, body=b""):
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode()
    for line in header_lines:
        head += line + b"\r\n"
    head += b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return head + body


BODY_BYTES = json.dumps(BODY).encode()


@pytest.mark.parametrize("data", [
    b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: \xff\r\nconnection: close\r\n\r\n",
    req(CHAT, b"X-A: \xff\x80", body=BODY_BYTES),
    req(CHAT, b"Authorization: Bearer sk-\xff", body=BODY_BYTES),
    req(CHAT, b"X-API-Key: \xe9\xff", body=BODY_BYTES),
    req("/openai/v1/models", b"Authorization: Bearer " + KEY.encode(), b"X-B: \xff"),
], ids=["other-path", "chat-odd-header", "bearer-bytes", "api-key-bytes", "models"])
def test_request_header_bytes_do_not_kill_the_vm(gw, data):
    envoy, _ = gw
    raw(envoy, data)
    all_workers_answer(envoy)
    no_panic(envoy)


def test_text_headers_with_bad_bytes_are_a_clear_400(gw):
    envoy, _ = gw
    for name in (b"X-Provider-Name", b"X-LLM-Gateway-Tags"):
        out = raw(envoy, req(CHAT, b"Authorization: Bearer " + KEY.encode(), name + b": a\xffb",
                             body=BODY_BYTES))
        assert out.startswith(b"HTTP/1.1 400"), out[:300]
        doc = json.loads(out.split(b"\r\n\r\n", 1)[1])
        assert doc["error"]["code"] == "invalid_header"
        assert doc["error"]["type"] == "invalid_request_error"
    all_workers_answer(envoy)
    no_panic(envoy)


def test_provider_response_header_bytes(gw):
    envoy, _ = gw
    # Non-streamed (all_workers_answer) and streamed answers carry \xff in content-type and others.
    for _ in range(4):
        s, hd, b = request("POST", envoy.url + CHAT, dict(BODY, stream=True),
                           headers={"Authorization": f"Bearer {KEY}"})
        assert s == 200 and b"[DONE]" in b, b
    all_workers_answer(envoy)
    no_panic(envoy)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0


def test_huge_sse_line_passes_through_and_the_vm_survives(gw):
    envoy, _ = gw
    before = rss_mb(envoy.proc.pid)
    t0 = time.time()
    s, _, b = request("POST", envoy.url + CHAT, dict(BODY, model="huge", stream=True),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert s == 200
    # The huge event is relayed untouched (the filter stops buffering past its bound).
    assert len(b) > HUGE_LINE
    assert b.count(b"a" * 1000) >= HUGE_LINE // 1000 - 1
    assert b"[DONE]" in b
    assert time.time() - t0 < 60
    # The filter keeps at most one bounded event: Envoy's memory does not grow with the line.
    grown = rss_mb(envoy.proc.pid) - before
    print(f"envoy RSS grew {grown:.1f} MB for a {HUGE_LINE >> 20} MB SSE line")
    assert grown < HUGE_LINE / (1 << 20), grown
    all_workers_answer(envoy)
    no_panic(envoy)
