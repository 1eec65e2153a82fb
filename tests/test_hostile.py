"""Hostile input and bad upstreams through the real Envoy (issue 9, "make it stay fixed").

Every test sends what an attacker or a broken provider would, checks the answer the client gets (a
served request or an OpenAI-shaped error, never an empty 503), and then, via the autouse `healthy`
fixture, that the next valid requests still succeed on every worker (Envoy runs `--concurrency 2`; a
panicked VM answers every later request on its worker with an empty 503) and that Envoy's log shows no
wasm panic, trap or abort."""
import hashlib
import http.client
import json
import os
import socket
import threading
import time

import pytest

from harness import (Envoy, FakeUpstream, SidecarProcess, chat_response, free_port, process_rss_kb, raw_http,
                     request, sse_chunks, vm_failures)

KEY = "sk-gw-hostile-key"
CHAT = "/openai/v1/chat/completions"
MiB = 1024 * 1024
# A size a bounded filter never keeps whole, big enough that keeping it shows in the RSS, and small
# enough to stay fast (tens of MB over loopback).
HUGE_LINE = 40 * MiB


def h(k):
    return hashlib.sha256(k.encode()).hexdigest()


def body(text="hi", **extra):
    return dict({"model": "m", "messages": [{"role": "user", "content": text}]}, **extra)


# ---------------------------------------------------------------------------------------------
# The bad provider: what it does is chosen by the request's message text.
# ---------------------------------------------------------------------------------------------

def huge_line_chunks(size, prefix=b"data: ", piece=MiB):
    """One SSE line of `size` bytes (valid JSON never ends), then a normal end of stream."""
    out = [(0, prefix + b'{"id":"x","choices":[{"index":0,"delta":{"content":"')]
    sent = 0
    blob = b"A" * piece
    while sent < size:
        out.append((0, blob))
        sent += piece
    out.append((0, b'"}}]}\n\n'))
    return out


def hostile_responder(rec):
    try:
        doc = json.loads(rec.body)
    except ValueError:
        doc = {}
    text = json.dumps(doc.get("messages"))
    model = doc.get("model", "m")
    ok_json = json.dumps(chat_response(model)).encode()
    if "bad-content-type" in text:
        # A byte >= 0x80 in a response header value (latin-1 \xff on the wire).
        if doc.get("stream"):
            return 200, {"content-type": "text/event-stream\u00ff"}, [(0, c) for c in sse_chunks(model, ["a"])]
        return 200, {"content-type": "application/json\u00ff", "x-bad": "\u00fe\u00ff"}, ok_json
    if "huge-header" in text:
        return 200, {"content-type": "application/json", "x-huge": "h" * (200 * 1024)}, ok_json
    if "huge-line" in text:
        chunks = huge_line_chunks(HUGE_LINE)
        chunks += [(0, c) for c in sse_chunks(model, ["after"], {"prompt_tokens": 1, "completion_tokens": 1,
                                                                 "total_tokens": 2})]
        return 200, {"content-type": "text/event-stream"}, chunks
    if "huge-json" in text:
        return 200, {"content-type": "application/json"}, \
            b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"' + b"B" * (24 * MiB) + \
            b'"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
    if "hang" in text:
        time.sleep(8)
        return 200, {"content-type": "application/json"}, ok_json
    if doc.get("stream"):
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3} \
            if (doc.get("stream_options") or {}).get("include_usage") else None
        return 200, {"content-type": "text/event-stream"}, [(0, c) for c in sse_chunks(model, ["a", "b"], usage)]
    return 200, {"content-type": "application/json"}, ok_json


def anthropic_huge_line(rec):
    chunks = [(0, b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":'
                  b'{"input_tokens":1,"output_tokens":1}}}\n\n')]
    chunks += huge_line_chunks(HUGE_LINE // 2, prefix=b"event: content_block_delta\ndata: ")
    chunks.append((0, b'event: message_stop\ndata: {"type":"message_stop"}\n\n'))
    return 200, {"content-type": "text/event-stream"}, chunks


# ---------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------

class Gateway:
    """A module's Envoy and its helpers; unpacks as (envoy, helper). When a test leaves the gateway broken
    (a dead VM answers every later request on its worker with an empty 503), `restart` gives the next
    test a fresh Envoy so that one failure does not fail the whole module."""

    def __init__(self, make, helper):
        self.make, self.helper = make, helper
        self.envoy = make()

    def __iter__(self):
        return iter((self.envoy, self.helper))

    def __getitem__(self, i):
        return (self.envoy, self.helper)[i]

    def restart(self):
        self.envoy.stop()
        self.envoy = self.make()

    def stop(self):
        self.envoy.stop()


def gateway_config(up, ant, closed_port):
    return {
        "providers": [
            {"name": "bad", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1", "isHosted": True,
             "models": [{"name": "m", "upstreamName": "m-up"}]},
            {"name": "claude", "supportedProvider": "ANTHROPIC", "url": ant.url + "/v1", "apiKey": "sk-ant-x",
             "models": [{"name": "claude-m", "upstreamName": "claude-up"}]},
            {"name": "gone", "supportedProvider": "OPENAI_COMPATIBLE", "url": f"http://127.0.0.1:{closed_port}/v1",
             "isHosted": True, "models": ["refused-m"]},
        ],
        "keys": [{"id": "k", "sha256": h(KEY), "config": "default"}],
    }


@pytest.fixture(scope="module")
def upstreams():
    up = FakeUpstream(hostile_responder)
    ant = FakeUpstream(anthropic_huge_line)
    closed_port = free_port()  # nothing listens here: Envoy answers 503 itself
    yield up, ant, closed_port
    up.stop()
    ant.stop()


@pytest.fixture(scope="module")
def gw(upstreams):
    cfg = gateway_config(*upstreams)
    g = Gateway(lambda: Envoy(cfg).start(), upstreams[0])
    yield g
    g.stop()


@pytest.fixture
def fresh_gw(upstreams):
    """A new Envoy for one test: memory measurements must not see what earlier tests left in the VMs
    (a wasm VM's linear memory never shrinks)."""
    cfg = gateway_config(*upstreams)
    g = Gateway(lambda: Envoy(cfg).start(), upstreams[0])
    yield g
    g.stop()


def chat(envoy, b, headers=None, timeout=30):
    hdrs = {"x-api-key": KEY, "content-type": "application/json"}
    hdrs.update(headers or {})
    return request("POST", envoy.url + CHAT, b, hdrs, timeout=timeout)


def assert_serves_on_every_worker(envoy, n=8):
    """n fresh connections (spread over both workers by the kernel): each gets a real completion, JSON and
    streamed alike."""
    for i in range(n):
        s, hd, b = chat(envoy, body("ok", stream=i % 2 == 1))
        assert s == 200, (s, b[:300])
        if i % 2:
            assert b.rstrip().endswith(b"data: [DONE]"), b[-200:]
        else:
            assert json.loads(b)["choices"][0]["message"]["content"]


def assert_no_vm_failure(envoy):
    bad = vm_failures(envoy.logs())
    assert not bad, "Envoy log shows a wasm failure:\n" + "\n".join(bad[:10])


@pytest.fixture(autouse=True)
def healthy(request):
    """After every test: the gateway still serves on every worker, and nothing panicked."""
    # Requested here, at setup, so that they are torn down after this check.
    gateways = [request.getfixturevalue(n) for n in ("gw", "fresh_gw", "timeout_gw", "sprayed", "policy_gw")
                if n in request.fixturenames]
    yield
    for g in gateways:
        try:
            assert_no_vm_failure(g.envoy)
            assert_serves_on_every_worker(g.envoy)
            assert_no_vm_failure(g.envoy)
        except BaseException:
            g.restart()
            raise


def assert_openai_error(status, headers, b, want_status=None):
    if want_status is not None:
        assert status == want_status, (status, b[:300])
    assert status >= 400, (status, b[:300])
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, b[:300])
    doc = json.loads(b)
    err = doc["error"]
    assert isinstance(err.get("message"), str) and err["message"], doc
    assert isinstance(err.get("type"), str) and err["type"], doc
    assert "code" in err, doc
    return err


def raw_request(envoy, lines, body_bytes=b""):
    head = b"\r\n".join(lines) + b"\r\n"
    if body_bytes:
        head += b"content-length: %d\r\n" % len(body_bytes)
    return raw_http(envoy.port, head + b"connection: close\r\n\r\n" + body_bytes)


# ---------------------------------------------------------------------------------------------
# 9.1 Non-UTF-8 headers, request and response side.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [b"/x", CHAT.encode(), b"/openai/v1/models"])
def test_non_utf8_request_header_any_path_no_key(gw, path):
    envoy, _ = gw
    s, hd, b = raw_request(envoy, [b"GET " + path + b" HTTP/1.1", b"host: x", b"x-a: \xff\xfe"])
    assert s is not None, "Envoy closed the connection without an answer"
    assert s != 503 or b, "an empty 503: the VM died"
    if path.startswith(b"/openai"):
        assert_openai_error(s, hd, b)  # 401 (no key), 405 or 400: the gateway answered


@pytest.mark.parametrize("header", [b"x-api-key: sk-\xff\xfe", b"authorization: Bearer \xc3\x28",
                                    b"x-llm-gateway-tags: team=\xff", b"x-anything: \x80"])
def test_non_utf8_request_header_on_chat(gw, header):
    envoy, _ = gw
    payload = json.dumps(body("x")).encode()
    lines = [b"POST " + CHAT.encode() + b" HTTP/1.1", b"host: x", b"content-type: application/json", header]
    if not header.startswith((b"x-api-key", b"authorization")):
        lines.append(b"x-api-key: " + KEY.encode())
    s, hd, b = raw_request(envoy, lines, payload)
    assert s is not None
    if s == 200:
        assert json.loads(b)["choices"]
    else:
        assert_openai_error(s, hd, b)  # 400 (rejected header) or 401 (a key that is not ours)


@pytest.mark.parametrize("stream", [False, True])
def test_non_utf8_response_header(gw, stream):
    envoy, _ = gw
    s, hd, b = chat(envoy, body("bad-content-type", stream=stream))
    if s == 200:
        assert b"data: [DONE]" in b if stream else json.loads(b)["choices"]
    else:
        assert_openai_error(s, hd, b)


# ---------------------------------------------------------------------------------------------
# Oversized headers: Envoy refuses them itself (431 / 502), in the OpenAI shape.
# ---------------------------------------------------------------------------------------------

def test_oversized_request_headers_are_431_openai_shaped(gw):
    envoy, _ = gw
    s, hd, b = chat(envoy, body("x"), {"x-big": "b" * (100 * 1024)})
    assert_openai_error(s, hd, b, 431)


def test_large_tags_header_is_a_clear_400(gw):
    envoy, _ = gw
    tags = ",".join(f"t{i}=" + "v" * 200 for i in range(200))  # ~40 KB: under Envoy's limit, over ours
    s, hd, b = chat(envoy, body("x"), {"x-llm-gateway-tags": tags})
    err = assert_openai_error(s, hd, b, 400)
    assert err["code"] == "invalid_tags"


def test_oversized_response_headers_are_openai_shaped(gw):
    envoy, _ = gw
    s, hd, b = chat(envoy, body("huge-header"))
    assert_openai_error(s, hd, b)
    assert s in (502, 503)


# ---------------------------------------------------------------------------------------------
# 9.2 Unbounded buffering: one huge SSE line, one huge JSON body.
# ---------------------------------------------------------------------------------------------

def stream_all(envoy, b, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=timeout)
    try:
        conn.request("POST", CHAT, json.dumps(b), {"content-type": "application/json", "x-api-key": KEY})
        r = conn.getresponse()
        n, tail = 0, b""
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
            tail = (tail + chunk)[-4096:]
        return r.status, n, tail
    finally:
        conn.close()


@pytest.mark.parametrize("include_usage", [False, True], ids=["strip-usage", "client-asked-usage"])
def test_huge_sse_line_passes_through_with_memory_bounded(fresh_gw, include_usage):
    envoy, _ = fresh_gw
    before = process_rss_kb(envoy.proc.pid)
    b = body("huge-line", stream=True)
    if include_usage:
        b["stream_options"] = {"include_usage": True}
    t0 = time.time()
    s, n, tail = stream_all(envoy, b)
    assert s == 200
    # The line is passed on (not dropped, not held back until the end) and the stream still ends.
    assert n >= HUGE_LINE, n
    assert tail.rstrip().endswith(b"data: [DONE]"), tail[-200:]
    assert time.time() - t0 < 45
    grown_mb = (process_rss_kb(envoy.proc.pid) - before) / 1024
    print(f"RSS growth {grown_mb:.1f} MB")
    # A filter that keeps the line grows by a multiple of it (the line, the pending event, the copy).
    assert grown_mb < HUGE_LINE / MiB, f"Envoy grew by {grown_mb:.0f} MB for one {HUGE_LINE // MiB} MB line"


def test_huge_sse_line_in_a_translated_stream(fresh_gw):
    envoy, _ = fresh_gw
    before = process_rss_kb(envoy.proc.pid)
    s, n, tail = stream_all(envoy, {"model": "claude-m", "stream": True,
                                    "messages": [{"role": "user", "content": "x"}]})
    assert s == 200
    assert tail.rstrip().endswith(b"data: [DONE]"), tail[-300:]
    grown_mb = (process_rss_kb(envoy.proc.pid) - before) / 1024
    print(f"RSS growth {grown_mb:.1f} MB")
    assert grown_mb < HUGE_LINE / 2 / MiB, f"Envoy grew by {grown_mb:.0f} MB"


def test_huge_json_response(fresh_gw):
    envoy, _ = fresh_gw
    before = process_rss_kb(envoy.proc.pid)
    s, hd, b = chat(envoy, body("huge-json"), timeout=60)
    # Passed through whole, or refused in the OpenAI shape: never an empty 503 or a dead VM.
    if s == 200:
        assert len(b) > 24 * MiB
    else:
        assert_openai_error(s, hd, b)
    grown_mb = (process_rss_kb(envoy.proc.pid) - before) / 1024
    print(f"RSS growth {grown_mb:.1f} MB")
    assert grown_mb < 3 * 24, f"Envoy grew by {grown_mb:.0f} MB for one 24 MB body"


# ---------------------------------------------------------------------------------------------
# 9.8 Errors Envoy generates itself reach clients in the OpenAI shape.
# ---------------------------------------------------------------------------------------------

def test_upstream_refused_is_openai_shaped(gw):
    envoy, _ = gw
    s, hd, b = chat(envoy, {"model": "refused-m", "messages": [{"role": "user", "content": "x"}]})
    assert_openai_error(s, hd, b)
    assert s in (502, 503)


def short_route_timeouts(cfg):
    """Every route action gets a 1 s idle timeout (the shipped 120 s is too long for a test)."""
    def walk(node):
        if isinstance(node, dict):
            if "cluster" in node or "cluster_header" in node or "weighted_clusters" in node:
                if "idle_timeout" in node or "timeout" in node:
                    node["idle_timeout"] = "1s"
                    node["timeout"] = "2s"
                if isinstance(node.get("retry_policy"), dict):
                    node["retry_policy"]["per_try_idle_timeout"] = "1s"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(cfg)
    return cfg


@pytest.fixture
def timeout_gw(upstreams):
    cfg = gateway_config(*upstreams)
    g = Gateway(lambda: Envoy(cfg, patch=short_route_timeouts).start(), upstreams[0])
    yield g
    g.stop()


def test_upstream_timeout_is_openai_shaped(timeout_gw):
    envoy, _ = timeout_gw
    t0 = time.time()
    s, hd, b = chat(envoy, body("hang"), timeout=20)
    assert time.time() - t0 < 7, "the route timeout did not apply"
    err = assert_openai_error(s, hd, b)
    assert s == 504, (s, err)


def test_malformed_http_is_openai_shaped(gw):
    envoy, _ = gw
    s, hd, b = raw_http(envoy.port, b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: x\r\nno colon here\r\n"
                                    b"connection: close\r\n\r\n")
    assert s == 400
    assert_openai_error(s, hd, b, 400)


def send_while_reading(port, head, body_bytes, timeout=30):
    """Sends head, then body_bytes from a thread while the answer is read: a server may answer (413) and
    close before the whole body is sent, which a plain HTTP client sees as a reset."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send():
        try:
            sock.sendall(head)
            view = memoryview(body_bytes)
            for i in range(0, len(view), 1 << 16):
                sock.sendall(view[i:i + (1 << 16)])
        except OSError:
            pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    buf = b""
    try:
        while b"\r\n\r\n" not in buf or len(buf) < buf.index(b"\r\n\r\n") + 4 + content_length(buf):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError:
        pass
    finally:
        sock.close()
    head_b, _, rest = buf.partition(b"\r\n\r\n")
    lines = head_b.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith(b"HTTP/") else None
    headers = {k.strip().lower().decode(): v.strip().decode("latin-1")
               for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    return status, headers, rest


def content_length(buf):
    for line in buf.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_request_body_over_the_limit_is_openai_shaped(gw):
    envoy, _ = gw
    big = json.dumps(body("x" * (40 * MiB))).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-api-key: {KEY}\r\n"
            f"content-length: {len(big)}\r\nconnection: close\r\n\r\n").encode()
    s, hd, b = send_while_reading(envoy.port, head, big)
    assert s is not None, "the connection was closed without an answer"
    assert_openai_error(s, hd, b, 413)


# ---------------------------------------------------------------------------------------------
# 9.3 Key spraying: unknown keys must not grow memory without bound, nor each cost a sidecar lookup.
# ---------------------------------------------------------------------------------------------

def fake_provider(name, authority, models, hosted=True):
    """A provider as the sidecar's resolve answer carries it."""
    return {"name": name, "kind": "OPENAI_COMPATIBLE", "base": {"tls": False, "authority": authority, "path": "/v1"},
            "models": [{"name": m, "upstream": m + "-up"} for m in models], "isHosted": hosted,
            "apiKey": "sk-up-1", "envoyCluster": "llm_gateway_dfp_http", "fallback": []}


def fake_identity(key_id, providers):
    return {"keyId": key_id, "orgId": "org_1", "configId": "cfg_1", "clusterId": None, "keySettings": {},
            "orgSettings": {}, "providers": providers}


class CountingSidecar:
    """A fake control plane: knows the keys it is given (sha256 -> identity), counts every lookup."""

    TOKEN = "hostile-token"

    def __init__(self, upstream_url, identities=None):
        self.lookups = 0
        self.lock = threading.Lock()
        self.identities = identities or {
            h(KEY): fake_identity("key_1", [fake_provider("hosted", upstream_url.split("//")[1], ["m"])])}
        self.server = FakeUpstream(self.respond)

    def respond(self, rec):
        if rec.path == "/internal/v1/resolve":
            with self.lock:
                self.lookups += 1
            identity = self.identities.get(rec.json().get("keySha256"))
            if identity:
                return 200, {"content-type": "application/json"}, json.dumps(
                    {"identity": identity, "ttlSeconds": 60}).encode()
            return 404, {"content-type": "application/json"}, b'{"error":{}}'
        if rec.path == "/internal/v1/usage":
            return 200, {"content-type": "application/json"}, b'{"accepted":1}'
        return 404, {}, b""


@pytest.fixture(scope="module")
def sprayed():
    up = FakeUpstream(hostile_responder)
    sc = CountingSidecar(up.url)
    cfg = {"sidecar": {"token": CountingSidecar.TOKEN, "timeoutMs": 1000}, "providers": [], "keys": []}
    g = Gateway(lambda: Envoy(cfg, sidecar_port=sc.server.port).start(), sc)
    yield g
    g.stop()
    sc.server.stop()
    up.stop()


SPRAY = 3000


def spray(envoy, n, prefix, workers=8):
    """n requests, each with a different unknown key, over keep-alive connections."""
    statuses = {}
    lock = threading.Lock()
    payload = json.dumps(body("x"))

    def worker(w):
        conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
        local = {}
        for i in range(w, n, workers):
            conn.request("POST", CHAT, payload, {"content-type": "application/json",
                                                 "authorization": f"Bearer {prefix}-{i:08d}-{os.urandom(8).hex()}"})
            r = conn.getresponse()
            rb = r.read()
            local[r.status] = local.get(r.status, 0) + 1
            if r.status != 401:
                assert r.getheader("content-type", "").startswith("application/json"), rb[:200]
            if r.getheader("connection") == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
        conn.close()
        with lock:
            for k, v in local.items():
                statuses[k] = statuses.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return statuses


def test_key_spraying_keeps_memory_and_lookups_bounded(sprayed):
    envoy, sc = sprayed
    assert chat(envoy, body("warm"))[0] == 200
    spray(envoy, 500, "warmup")  # let the caches reach their steady state
    rss0 = process_rss_kb(envoy.proc.pid)
    lookups0 = sc.lookups
    t0 = time.time()
    statuses = spray(envoy, SPRAY, "spray")
    elapsed = time.time() - t0
    assert sum(statuses.values()) == SPRAY
    # Unknown keys are refused (401), or shed (429/503) once the lookup budget is spent: never served.
    assert set(statuses) <= {401, 429, 503}, statuses
    lookups = sc.lookups - lookups0
    grown_kb = process_rss_kb(envoy.proc.pid) - rss0
    # Unbounded: every key costs a lookup and ~100 B of shared data per key for ever.
    assert lookups < SPRAY * 0.9, f"{lookups} sidecar lookups for {SPRAY} unknown keys in {elapsed:.1f}s"
    assert grown_kb < 16 * 1024, f"Envoy grew by {grown_kb} KiB for {SPRAY} unknown keys"
    # The known key is not locked out by the spraying.
    assert chat(envoy, body("after"))[0] == 200


# ---------------------------------------------------------------------------------------------
# 9.4 SSRF: the registration API refuses internal destinations; the filter refuses them again.
# ---------------------------------------------------------------------------------------------

SSRF_URLS = [
    "http://127.0.0.1:9901/v1", "http://localhost:15000/", "http://0.0.0.0/v1", "http://[::1]/v1",
    "http://2130706433/v1", "http://0x7f000001/v1", "http://169.254.169.254/latest/meta-data",
    "http://metadata.google.internal/computeMetadata/v1", "http://10.0.0.1/v1", "http://[fe80::1]/v1",
    "http://[::ffff:127.0.0.1]/v1", "http://127.1/v1",
    "http://api.example.com/v1\r\nx-injected: 1", "http://api.example.com/v1 x", "http://api.example.com/\nv1",
]


@pytest.fixture(scope="module")
def sidecar():
    sc = SidecarProcess("lgw_hostile_admin_key_0123456789", "hostile-internal-token").start()
    yield sc
    sc.stop()


@pytest.mark.parametrize("url", SSRF_URLS)
def test_registration_refuses_internal_destinations(sidecar, url):
    s, doc = sidecar.api("POST", "/v1/llm/providers", {"providers": [
        {"name": "evil", "supportedProvider": "OPENAI_COMPATIBLE", "url": url, "models": ["m"]}]})
    assert s == 400, (url, s, doc)
    assert "error" in doc


def test_registration_accepts_a_public_destination(sidecar):
    s, doc = sidecar.api("POST", "/v1/llm/providers", {"providers": [
        {"name": "public", "supportedProvider": "OPENAI", "url": "https://api.openai.com/v1", "apiKey": "sk-x",
         "models": ["gpt-4o"]}]})
    assert s == 201, doc


def test_registration_refuses_unusable_providers(sidecar):
    """9.10: a provider the gateway could not use is refused at registration."""
    s, doc = sidecar.api("POST", "/v1/llm/providers", {"providers": [
        {"name": "az", "supportedProvider": "AZURE", "url": "https://r.openai.azure.com", "apiVersion": "2024-10-21",
         "models": ["gpt-4o"]}]})
    assert s == 400, doc


EVIL_KEY = "sk-gw-hostile-evil-key"


@pytest.fixture(scope="module")
def policy_gw():
    """Sidecar mode. The control plane answers, for one key, providers that point at Envoy's own admin
    port and at the cloud metadata address (a database written before the policy, or by hand): the
    filter must refuse to route there. The harness allow-lists 127.0.0.1 for the fake providers;
    Envoy's admin listens on 127.0.0.2 here, outside that list."""
    up = FakeUpstream(hostile_responder)
    admin_port = free_port()
    sc = CountingSidecar(up.url, identities={
        h(KEY): fake_identity("key_1", [fake_provider("ok", up.url.split("//")[1], ["m"])]),
        h(EVIL_KEY): fake_identity("key_evil", [
            fake_provider("admin", f"127.0.0.2:{admin_port}", ["admin-m"], hosted=False),
            fake_provider("meta", "169.254.169.254", ["meta-m"], hosted=True)]),
    })
    cfg = {"sidecar": {"token": CountingSidecar.TOKEN, "timeoutMs": 1000}, "providers": [], "keys": []}

    def patch(c):
        c["admin"]["address"]["socket_address"].update({"address": "127.0.0.2", "port_value": admin_port})
        return c

    def make():
        envoy = Envoy(cfg, sidecar_port=sc.server.port, patch=patch)
        envoy.admin_port = admin_port
        start_with_admin_on(envoy, "127.0.0.2")
        return envoy

    g = Gateway(make, up)
    yield g
    g.stop()
    sc.server.stop()
    up.stop()


def test_filter_refuses_destinations_outside_policy(policy_gw):
    envoy, up = policy_gw
    for model in ("admin-m", "meta-m"):
        s, hd, b = chat(envoy, {"model": model, "messages": [{"role": "user", "content": "x"}]},
                        {"x-api-key": EVIL_KEY}, timeout=15)
        assert b"quitquitquit" not in b and b"admin commands" not in b, b[:300]
        err = assert_openai_error(s, hd, b)
        assert s == 403 and err["code"] == "destination_forbidden", (model, s, err)


def start_with_admin_on(envoy, host):
    """Envoy.start, but polling /ready where the admin listens."""
    import subprocess
    import urllib.request
    envoy.log = open(envoy.log_path, "w")
    envoy.proc = subprocess.Popen(
        ["envoy", "-c", envoy.config_path, "--base-id", str(envoy.port), "--concurrency", "2",
         "--log-level", "warn", "--component-log-level", "wasm:info"],
        stdout=envoy.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=envoy.env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if envoy.proc.poll() is not None:
            raise RuntimeError(envoy.logs()[-2000:])
        try:
            with urllib.request.urlopen(f"http://{host}:{envoy.admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    envoy.stop()
    raise RuntimeError("envoy not ready")
