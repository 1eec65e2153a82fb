"""Filter configuration delivered by ECDS from a watched file (issue 12): a changed key or provider
applies in the running Envoy; an invalid configuration is refused with a clear log line and the last
good one keeps serving. Also: the generated ECDS/Kubernetes Envoy files are up to date."""
import hashlib
import os
import shutil
import tempfile
import time

import pytest

from harness import ROOT, Envoy, FakeUpstream, envoy_config, free_port, request

CHAT = "/openai/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "x"}]}
K1 = "sk-gw-ecds-one"
K2 = "sk-gw-ecds-two"


def h(k):
    return hashlib.sha256(k.encode()).hexdigest()


def gw_config(url, key):
    return {"providers": [{"name": "p", "supportedProvider": "OPENAI_COMPATIBLE", "url": url + "/v1",
                           "isHosted": True, "models": ["m1"]}],
            "keys": [{"id": "k", "sha256": h(key), "config": "default"}]}


class EcdsEnvoy(Envoy):
    """The harness Envoy with its main filter in ECDS form, the config in a watched directory."""

    def __init__(self, first_config, sidecar_port=None):
        self.ecds_dir = tempfile.mkdtemp(prefix="llmgw-ecds-")
        holder = {}

        def patch(cfg):
            holder["filter"] = envoy_config.to_ecds(cfg, self.ecds_dir)
            return cfg

        super().__init__(first_config, patch=patch, env={"LLM_GATEWAY_INTERNAL_TOKEN": "t"},
                         sidecar_port=sidecar_port)
        self.filter = holder["filter"]
        self.push(first_config)

    def push(self, gateway_config):
        filt = dict(self.filter, configuration={"@type": "type.googleapis.com/google.protobuf.Struct",
                                                "value": gateway_config})
        envoy_config.write_ecds(filt, os.path.join(self.ecds_dir, envoy_config.ECDS_FILE))

    def stop(self):
        super().stop()
        shutil.rmtree(self.ecds_dir, ignore_errors=True)


def wait_status(url, key, want, timeout=15):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = request("POST", url + CHAT, BODY, {"authorization": "Bearer " + key}, timeout=5)
        if last[0] == want:
            return last
        time.sleep(0.2)
    raise AssertionError(f"wanted {want}, last answer {last}")


def test_ecds_reload_applies_and_refuses_invalid():
    a, b = FakeUpstream(), FakeUpstream()
    envoy = EcdsEnvoy(gw_config(a.url, K1))
    try:
        envoy.start()
        wait_status(envoy.url, K1, 200)
        assert a.last() is not None and b.last() is None
        # A new key and a new provider URL apply in the running Envoy (no restart: same PID).
        pid = envoy.proc.pid
        envoy.push(gw_config(b.url, K2))
        wait_status(envoy.url, K2, 200)
        assert b.last() is not None
        assert request("POST", envoy.url + CHAT, BODY, {"authorization": "Bearer " + K1})[0] == 401
        assert envoy.proc.pid == pid and envoy.proc.poll() is None
        # An invalid configuration is refused with a clear log line; the last good one keeps serving.
        envoy.push({"providers": [{"name": "x", "supportedProvider": "NOPE", "models": ["m"]}]})
        deadline = time.time() + 15
        while time.time() < deadline and "unknown supportedProvider" not in envoy.logs():
            time.sleep(0.2)
        logs = envoy.logs()
        assert "unknown supportedProvider" in logs, logs[-3000:]
        assert "refusing to start" in logs
        deadline = time.time() + 5
        while time.time() < deadline and "config update rejected" not in envoy.logs():
            time.sleep(0.2)
        assert "Filesystem config update rejected" in envoy.logs()
        stats = envoy.stats()
        assert "extension_config_discovery.http_filter.llm_gateway.update_rejected: 1" in stats
        time.sleep(1)
        for _ in range(10):
            s, _, body = request("POST", envoy.url + CHAT, BODY, {"authorization": "Bearer " + K2})
            assert s == 200, body
        # And a good one after the bad one applies again.
        envoy.push(gw_config(a.url, K1))
        wait_status(envoy.url, K1, 200)
    finally:
        envoy.stop()
        a.stop()
        b.stop()


def test_generated_files_are_up_to_date():
    for rel, doc in envoy_config.generated_files().items():
        path = os.path.join(ROOT, rel)
        with open(path) as f:
            assert f.read() == envoy_config.dump(doc), f"{rel} is stale: run python3 scripts/envoy_config.py generate"
