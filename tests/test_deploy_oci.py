"""OCI wasm image (issue 11.1): built without Docker, pushed to a loopback registry (Debian's
docker-registry, own config and storage, stopped by PID), pulled back the way Istio's image fetcher
does (manifest, then the layer), bytes equal to the built .wasm; and a real Envoy loads the filter from
that registry by `remote` http_uri + sha256 and serves a request."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from harness import ROOT, Envoy, FakeUpstream, free_port, request, stop_process

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import oci_image  # noqa: E402

WASM = os.path.join(ROOT, "target", "llm_gateway.wasm")
KEY = "sk-gw-oci-key"


class Registry:
    def __init__(self):
        binary = shutil.which("docker-registry")
        if not binary:
            pytest.skip("docker-registry not installed (./build.sh test installs it with apt)")
        self.dir = tempfile.mkdtemp(prefix="llmgw-registry-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"""version: 0.1
log: {{level: warn}}
storage:
  filesystem: {{rootdirectory: {self.dir}/storage}}
http: {{addr: 127.0.0.1:{self.port}}}
""")
        self.log = open(os.path.join(self.dir, "registry.log"), "w")
        self.proc = subprocess.Popen([binary, "serve", cfg], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry exited: " + open(self.log.name).read()[-2000:])
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("docker-registry did not start")

    def stop(self):
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    layout = str(tmp_path_factory.mktemp("oci"))
    built = oci_image.build(WASM, layout)
    reg = Registry()
    try:
        for variant in ("wasm", "compat"):
            oci_image.push(reg.url, "llm-gateway/filter", variant, layout, variant)
        yield reg, built, layout
    finally:
        reg.stop()


def wasm_bytes():
    with open(WASM, "rb") as f:
        return f.read()


def test_layout_is_reproducible_and_valid(tmp_path):
    a = oci_image.build(WASM, str(tmp_path / "a"))
    b = oci_image.build(WASM, str(tmp_path / "b"))
    assert a["manifests"] == b["manifests"]
    assert a["wasm_sha256"] == hashlib.sha256(wasm_bytes()).hexdigest()
    index = json.load(open(tmp_path / "a" / "index.json"))
    for m in index["manifests"]:
        blob = (tmp_path / "a" / "blobs" / "sha256" / m["digest"].split(":")[1]).read_bytes()
        assert oci_image.sha256(blob) == m["digest"]
        manifest = json.loads(blob)
        for d in [manifest["config"]] + manifest["layers"]:
            data = (tmp_path / "a" / "blobs" / "sha256" / d["digest"].split(":")[1]).read_bytes()
            assert oci_image.sha256(data) == d["digest"] and len(data) == d["size"]
    wasm_manifest = json.loads((tmp_path / "a" / "blobs" / "sha256" /
                                a["manifests"]["wasm"].split(":")[1]).read_bytes())
    assert wasm_manifest["config"]["mediaType"] == "application/vnd.module.wasm.config.v1+json"
    assert wasm_manifest["layers"][0]["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm"


def test_cli_prints_sha256(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "oci_image.py"), "build", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"wasm sha256: {hashlib.sha256(wasm_bytes()).hexdigest()}" in out


@pytest.mark.parametrize("variant", ["wasm", "compat"])
def test_pull_back_like_istio(pushed, variant):
    reg, built, _ = pushed
    assert oci_image.pull_wasm(reg.url, "llm-gateway/filter", variant) == wasm_bytes()
    # By digest too (what a pinned oci://...@sha256: reference resolves).
    assert oci_image.pull_wasm(reg.url, "llm-gateway/filter", built["manifests"][variant]) == wasm_bytes()


def test_envoy_loads_filter_from_registry(pushed):
    reg, built, layout = pushed
    manifest = json.loads(open(os.path.join(layout, "blobs", "sha256",
                                            built["manifests"]["wasm"].split(":")[1]), "rb").read())
    layer = manifest["layers"][0]["digest"]
    up = FakeUpstream()
    cfg = {"providers": [{"name": "p", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
                          "isHosted": True, "models": ["m1"]}],
           "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}]}
    registry_cluster = {"name": "oci_registry", "connect_timeout": "2s", "type": "STATIC",
                        "load_assignment": {"cluster_name": "oci_registry", "endpoints": [{"lb_endpoints": [
                            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                          "port_value": reg.port}}}}]}]}}

    def remote(cfg_doc, sha=built["wasm_sha256"]):
        from harness import envoy_config
        vm = envoy_config.gateway_filter(cfg_doc)["vm_config"]  # shared by every listener (YAML alias)
        vm["code"] = {"remote": {"http_uri": {"uri": f"{reg.url}/v2/llm-gateway/filter/blobs/{layer}",
                                              "cluster": "oci_registry", "timeout": "10s"},
                                 "sha256": sha, "retry_policy": {"num_retries": 3}}}
        return cfg_doc

    env = {"LLM_GATEWAY_INTERNAL_TOKEN": "t"}
    try:
        with Envoy(cfg, extra_clusters=[registry_cluster], patch=remote, env=env) as envoy:
            s, _, body = request("POST", envoy.url + "/openai/v1/chat/completions",
                                 {"model": "m1", "messages": [{"role": "user", "content": "x"}]},
                                 {"authorization": "Bearer " + KEY})
            assert s == 200, body
            assert up.last() is not None and up.last().json()["model"] == "m1"
        # A wrong sha256 is refused: the module is not loaded and nothing reaches the provider.
        up.clear()
        bad = Envoy(cfg, extra_clusters=[registry_cluster], patch=lambda c: remote(c, "0" * 64), env=env)
        try:
            try:
                bad.start()
            except RuntimeError:
                pass
            else:
                s, _, body = request("POST", bad.url + "/openai/v1/chat/completions",
                                     {"model": "m1", "messages": [{"role": "user", "content": "x"}]},
                                     {"authorization": "Bearer " + KEY}, timeout=10)
                assert s != 200
            assert up.last() is None
            assert "failed to load" in bad.logs()
        finally:
            bad.stop()
    finally:
        up.stop()
