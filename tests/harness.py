"""Test harness: free ports, fake provider upstreams that record what they receive, and a real Envoy
running the built llm-gateway wasm. Every server binds 127.0.0.1, is bounded in time and is stopped by
PID."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import envoy_config  # noqa: E402

ENVOY_START_TIMEOUT = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc, timeout=10):
    """Stops a server the tests started, by its PID: SIGTERM, then SIGKILL if it has not exited in time."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


class Recorded:
    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers  # lower-cased names
        self.body = body

    def json(self):
        return json.loads(self.body)


def chat_response(model, content="hi there", usage=None):
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": usage or {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def sse_chunks(model, words, usage=None):
    """OpenAI chat.completion.chunk events for words, then [DONE]."""
    out = []
    base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": model}
    out.append(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]))
    for w in words:
        out.append(dict(base, choices=[{"index": 0, "delta": {"content": w}, "finish_reason": None}]))
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if usage:
        out.append(dict(base, choices=[], usage=usage))
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in out] + [b"data: [DONE]\n\n"]


class FakeUpstream:
    """An HTTP/1.1 server on 127.0.0.1 that records requests and answers via `responder`.

    responder(rec) returns (status, headers, body) where body is bytes, or a list of
    (delay_seconds, bytes) chunks sent with chunked encoding."""

    def __init__(self, responder=None, tls=None):
        """tls: (certfile, keyfile) to serve HTTPS; the SNI names seen are kept in self.sni."""
        self.requests = []
        self.sni = []
        self.responder = responder or self.default_responder
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def handle_any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                rec = Recorded(self.command, self.path,
                               {k.lower(): v for k, v in self.headers.items()}, body)
                with outer.lock:
                    outer.requests.append(rec)
                status, headers, payload = outer.responder(rec)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if isinstance(payload, (bytes, bytearray)):
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for delay, data in payload:
                    time.sleep(delay)
                    if data is None:  # cut the stream: close without the final chunk
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if tls:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            ctx.sni_callback = lambda sock, name, _ctx: self.sni.append(name) and None
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def default_responder(rec):
        try:
            model = json.loads(rec.body).get("model", "none")
        except ValueError:
            model = "none"
        return 200, {"content-type": "application/json"}, json.dumps(chat_response(model)).encode()

    def last(self):
        with self.lock:
            return self.requests[-1] if self.requests else None

    def clear(self):
        with self.lock:
            self.requests.clear()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Envoy:
    """A real Envoy with the built wasm and the given gateway config."""

    def __init__(self, gateway_config, as_string=False, extra_clusters=(), env=None, env_keys=None,
                 sidecar_port=None, patch=None):
        self.port = free_port()
        self.admin_port = free_port()
        if isinstance(gateway_config, dict) and isinstance(gateway_config.get("sidecar"), dict):
            # Fake providers listen on loopback, which the filter's SSRF policy refuses by default.
            gateway_config = dict(gateway_config, sidecar=dict(
                {"allowedDestinations": "127.0.0.1 localhost"}, **gateway_config["sidecar"]))
        self.dir = tempfile.mkdtemp(prefix="llmgw-envoy-")
        cfg = envoy_config.render(self.port, self.admin_port, gateway_config, as_string=as_string,
                                  extra_clusters=extra_clusters, env_keys=env_keys,
                                  sidecar_port=sidecar_port or free_port())
        if patch:
            cfg = patch(cfg)
        self.config_path = envoy_config.write(cfg, os.path.join(self.dir, "envoy.yaml"))
        self.log_path = os.path.join(self.dir, "envoy.log")
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["envoy", "-c", self.config_path, "--base-id", str(self.port), "--concurrency", "2",
             "--log-level", "warn", "--component-log-level", "wasm:info"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=self.env)
        deadline = time.time() + ENVOY_START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("envoy did not become ready")

    def logs(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stats(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats", timeout=5) as r:
            return r.read().decode()

    def stop(self):
        stop_process(self.proc)
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def validate(config_path, env=None):
    """Runs `envoy --mode validate`; returns (exit code, output)."""
    p = subprocess.run(["envoy", "--mode", "validate", "-c", config_path, "--base-id", str(free_port())],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=dict(os.environ, **(env or {})))
    return p.returncode, p.stdout + p.stderr


def request(method, url, body=None, headers=None, timeout=30):
    """Plain HTTP request; returns (status, headers dict, body bytes) without raising on 4xx/5xx."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


# ---------------------------------------------------------------------------------------------
# Hostile-input helpers (tests/test_hostile.py, scripts/fault_test.py).
# ---------------------------------------------------------------------------------------------

# What a wasm VM failure looks like in Envoy's log: the filter's panic handler logs "llm-gateway panicked:
# panicked at ...", V8 reports the trap ("Uncaught RuntimeError",
# "unreachable", "Function: proxy_on_... failed"), and a dead VM answers every request on its worker with
# an empty 503.
VM_FAILURE_MARKERS = ("panicked at", "llm-gateway panicked", "Uncaught RuntimeError",
                      "RuntimeError: unreachable", "Function: proxy_on_", "wasm trap", "Wasm VM failed",
                      "out of memory", "Plugin configured to fail closed")


def vm_failures(log_text):
    """The lines of an Envoy log that show a wasm panic, trap or abort."""
    return [line for line in log_text.splitlines() if any(m in line for m in VM_FAILURE_MARKERS)]


def raw_http(port, data, timeout=10):
    """Sends raw bytes to 127.0.0.1:port (e.g. a header byte >= 0x80 no HTTP client would send) and
    returns (status, headers with lower-cased names, body bytes); status None if the peer closed
    without an answer. The request should say `connection: close`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    if not buf.startswith(b"HTTP/"):
        return None, {}, buf
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, headers, body


def process_rss_kb(pid):
    """Resident memory of a process, in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


SIDECAR_BIN = os.path.join(ROOT, "target", "debug", "llm-gateway-sidecar")


class SidecarProcess:
    """The real control-plane sidecar (SQLite in a temp dir) on a free port; stopped by PID."""

    def __init__(self, admin_key, token, env=None, ttl=2):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="llmgw-sidecar-")
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key, self.token = admin_key, token
        self.env = dict(os.environ, LLM_GATEWAY_ADMIN_KEY=admin_key, LLM_GATEWAY_INTERNAL_TOKEN=token,
                        LLM_GATEWAY_CACHE_TTL=str(ttl), **(env or {}))
        self.env.pop("DATABASE_URL", None)
        self.proc = None

    def start(self):
        self.log = open(os.path.join(self.dir, "sidecar.log"), "a")
        self.proc = subprocess.Popen([SIDECAR_BIN, "--data-dir", self.dir, "--listen", f"127.0.0.1:{self.port}"],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("sidecar exited")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("sidecar not ready")

    def stop(self):
        stop_process(self.proc)
        if getattr(self, "log", None):
            self.log.close()

    def api(self, method, path, body=None, key=None):
        hdrs = {"content-type": "application/json", "x-api-key": key or self.admin_key}
        s, _, b = request(method, self.url + path, body, hdrs)
        try:
            doc = json.loads(b) if b else None
        except ValueError:
            doc = b
        return s, doc


def prom_samples(text):
    """Parses Prometheus text exposition into [(name, {label: value}, float)]."""
    import re
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        if not m:
            continue
        labels = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(4))))
        except ValueError:
            pass
    return out


def prom_value(samples, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in labels.items()))
