"""Streaming responses pass through chunk by chunk: measure arrival times, not just final bytes."""
import hashlib
import http.client
import json
import time

import pytest

from harness import Envoy, FakeUpstream, sse_chunks

KEY = "sk-gw-stream-key"
DELAY = 0.4


def streaming_responder(rec):
    body = json.loads(rec.body)
    chunks = sse_chunks(body.get("model"), ["one", " two", " three", " four", " five"])
    return 200, {"content-type": "text/event-stream"}, [(0 if i == 0 else DELAY, c) for i, c in enumerate(chunks)]


@pytest.fixture(scope="module")
def gw():
    up = FakeUpstream(streaming_responder)
    cfg = {"providers": [{"name": "s", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
                          "models": [{"name": "m", "upstreamName": "m-up"}]}],
           "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}]}
    envoy = Envoy(cfg).start()
    yield envoy, up
    envoy.stop()
    up.stop()


def test_chunks_arrive_before_upstream_finishes(gw):
    envoy, up = gw
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
    t0 = time.monotonic()
    conn.request("POST", "/openai/v1/chat/completions",
                 json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}),
                 {"content-type": "application/json", "x-api-key": KEY})
    r = conn.getresponse()
    assert r.status == 200
    assert r.getheader("content-type") == "text/event-stream"
    arrivals = []
    data = b""
    while True:
        piece = r.read1(65536)
        if not piece:
            break
        arrivals.append((time.monotonic() - t0, piece))
        data += piece
    total = arrivals[-1][0]
    first_content = next(t for t, p in arrivals if b'"one"' in p)
    # Upstream needs about 6 * DELAY to finish; the first word must arrive long before that.
    assert total > 5 * DELAY * 0.9, arrivals
    assert first_content < 1.5 * DELAY, arrivals
    # Pieces arrive spread over time, not in one burst at the end.
    times = sorted({round(t, 1) for t, _ in arrivals})
    assert len(times) >= 5, arrivals
    # The bytes are exactly what the upstream sent (model name as the upstream says).
    expected = b"".join(sse_chunks("m-up", ["one", " two", " three", " four", " five"]))
    assert data == expected
    assert up.last().json()["stream"] is True
