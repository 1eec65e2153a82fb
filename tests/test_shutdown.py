"""No usage record lost when Envoy stops (issue 12): N requests (JSON and SSE) through the real Envoy and
the real sidecar, then the shipped preStop sequence (fail health checks, drain listeners) and SIGTERM right
after the last response; exactly N records must be in the sidecar. The filter's queue is otherwise only
flushed on its 1 s tick, so without the flush on `on_done` records would be lost."""
import json
import os
import signal
import subprocess
import time

from harness import ROOT, Envoy, FakeUpstream, request
from test_sidecar import ADMIN, TOKEN, Sidecar, hosted_responder, new_key


PRESTOP = os.path.join(ROOT, "deploy", "envoy-prestop.sh")


def prestop(envoy):
    """Runs the shipped preStop hook: fail health checks, drain listeners, wait for the filter's
    records-buffered gauge to reach zero (bounded)."""
    t = time.time()
    p = subprocess.run([PRESTOP, f"127.0.0.1:{envoy.admin_port}"], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PRESTOP_MAX_WAIT="15"))
    assert p.returncode == 0 and "still pending" not in p.stderr, p.stderr
    return time.time() - t


def records(sc, key_id):
    s, doc = sc.api("GET", f"/v1/llm/usage/records?apiKeyId={key_id}&limit=1000")
    assert s == 200, doc
    return doc["records"]


def serve(envoy, key, n):
    for i in range(n):
        stream = i % 2 == 1
        s, h, b = request("POST", envoy.url + "/openai/v1/chat/completions",
                          {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
                          {"authorization": f"Bearer {key}", "content-type": "application/json"})
        assert s == 200, b


def test_n_of_n_records_after_prestop_and_sigterm():
    up = FakeUpstream(hosted_responder)
    sc = Sidecar().start()
    envoy = None
    try:
        s, _ = sc.api("POST", "/v1/llm/providers", {"providers": [
            {"name": "hosted", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
             "isHosted": True, "models": ["m"]}]})
        assert s == 201
        key, key_id = new_key(sc, {"config_id": "default"})
        gw = {"sidecar": {"token": TOKEN, "timeoutMs": 1000}, "providers": [], "keys": []}
        envoy = Envoy(gw, sidecar_port=sc.port).start()
        n = 30
        serve(envoy, key, n)
        took = prestop(envoy)
        assert took < 10
        envoy.proc.send_signal(signal.SIGTERM)
        envoy.proc.wait(timeout=30)
        logs = envoy.logs()
        assert "panicked" not in logs
        deadline = time.time() + 10
        got = []
        while time.time() < deadline:
            got = records(sc, key_id)
            if len(got) >= n:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        got = records(sc, key_id)
        assert len(got) == n, (len(got), logs[-3000:])
        assert sum(1 for r in got if r["stream"]) == n // 2
    finally:
        if envoy:
            envoy.stop()
        sc.stop()
        up.stop()


def test_n_of_n_records_after_filter_config_reload():
    """The filter configuration replaced by ECDS while records are queued: the old VM flushes them
    before it goes away (on_done), so the sidecar gets exactly N records, then N more from the new VM."""
    from test_deploy_ecds import EcdsEnvoy
    up = FakeUpstream(hosted_responder)
    sc = Sidecar().start()
    envoy = None
    try:
        s, _ = sc.api("POST", "/v1/llm/providers", {"providers": [
            {"name": "hosted", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
             "isHosted": True, "models": ["m"]}]})
        assert s == 201
        key, key_id = new_key(sc, {"config_id": "default"})

        def gw(timeout_ms):
            return {"sidecar": {"token": TOKEN, "timeoutMs": timeout_ms,
                                "allowedDestinations": "127.0.0.1 localhost"},
                    "providers": [], "keys": []}

        envoy = EcdsEnvoy(gw(1000), sidecar_port=sc.port)
        envoy.start()
        n = 20
        serve(envoy, key, n)
        # Replace the configuration right after the last response (before the 1 s tick).
        envoy.push(gw(1500))
        deadline = time.time() + 15
        while time.time() < deadline and len(records(sc, key_id)) < n:
            time.sleep(0.2)
        time.sleep(1.5)
        got = records(sc, key_id)
        assert len(got) == n, (len(got), envoy.logs()[-3000:])
        # The new configuration serves and reports too.
        serve(envoy, key, n)
        deadline = time.time() + 15
        while time.time() < deadline and len(records(sc, key_id)) < 2 * n:
            time.sleep(0.2)
        assert len(records(sc, key_id)) == 2 * n
        assert "panicked" not in envoy.logs()
    finally:
        if envoy:
            envoy.stop()
        sc.stop()
        up.stop()
