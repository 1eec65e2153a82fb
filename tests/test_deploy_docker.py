"""Container images and the compose stack (issue 11.2), when a Docker daemon can be started here:
builds the sidecar and gateway images from scratch (deploy/docker/build-scratch.sh: no base image is
pulled), runs deploy/compose.host.yaml (host network), and checks the stack serves: sidecar ready and
its admin API answering, Envoy ready with the filter, a request through the gateway resolved by the
sidecar, the preStop drain turning readiness off. Skipped (with the reason printed by -rs) when there
is no dockerd, we are not root, or LLM_GATEWAY_DOCKER_SMOKE=0. Bounded: the daemon is ours (own
socket and data root), stopped by PID."""
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

from harness import ROOT, envoy_config, free_port, request

SMOKE_TIMEOUT = 120


def skip_reason():
    if os.environ.get("LLM_GATEWAY_DOCKER_SMOKE") == "0":
        return "Docker smoke test skipped: LLM_GATEWAY_DOCKER_SMOKE=0"
    if not shutil.which("dockerd") or not shutil.which("docker"):
        return "Docker smoke test skipped: no dockerd/docker here (apt-get install docker.io docker-compose)"
    if not shutil.which("docker-compose"):
        return "Docker smoke test skipped: no docker-compose"
    if os.geteuid() != 0:
        return "Docker smoke test skipped: starting dockerd needs root"
    return None


if skip_reason():
    pytest.skip(skip_reason(), allow_module_level=True)


class Dockerd:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="llmgw-dockerd-", dir="/tmp")
        self.sock = os.path.join(self.dir, "docker.sock")
        self.env = dict(os.environ, DOCKER_HOST="unix://" + self.sock)
        self.log = open(os.path.join(self.dir, "dockerd.log"), "w")
        self.proc = subprocess.Popen(
            ["dockerd", "--storage-driver=vfs", "--iptables=false", "--ip-masq=false", "--bridge=none",
             "--host", "unix://" + self.sock, "--data-root", os.path.join(self.dir, "data"),
             "--exec-root", os.path.join(self.dir, "exec"), "--pidfile", os.path.join(self.dir, "docker.pid")],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            if self.run(["docker", "info"], check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.5)
        reason = open(self.log.name).read()[-500:]
        self.stop()
        pytest.skip(f"Docker smoke test skipped: dockerd could not be started here: {reason}")

    def run(self, args, check=True, timeout=120, env=None):
        return subprocess.run(args, cwd=ROOT, env=dict(self.env, **(env or {})), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        # dockerd leaves its network namespace mount (exec/netns/default) behind: unmount what is ours.
        with open("/proc/self/mounts") as f:
            ours = [ln.split()[1] for ln in f if ln.split()[1].startswith(self.dir + "/")]
        for m in sorted(ours, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_http(url, deadline, want=200):
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == want:
                    return
                last = r.status
        except urllib.error.HTTPError as e:
            last = e.code
            if e.code == want:
                return
        except OSError as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{url}: {last}")


def sidecar_has_internal_port():
    """The sidecar serves /internal on its own port once it knows SIDECAR_INTERNAL_ADDR."""
    for b in ("target/release/llm-gateway-sidecar", "target/debug/llm-gateway-sidecar"):
        path = os.path.join(ROOT, b)
        if os.path.exists(path):
            out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
            return "SIDECAR_INTERNAL_ADDR" in out
    return False


def test_images_and_compose_stack(tmp_path):
    if not os.path.exists(os.path.join(ROOT, "target", "debug", "llm-gateway-sidecar")) and \
            not os.path.exists(os.path.join(ROOT, "target", "release", "llm-gateway-sidecar")):
        subprocess.run(["cargo", "build", "-q", "-p", "llm-gateway-sidecar"], cwd=ROOT, check=True, timeout=600)
    started = time.time()
    d = Dockerd()
    project = f"llmgw-smoke-{os.getpid()}"
    compose = ["docker-compose", "-p", project, "-f", os.path.join(ROOT, "deploy", "compose.host.yaml")]
    try:
        for what in ("sidecar", "gateway"):
            d.run([os.path.join(ROOT, "deploy", "docker", "build-scratch.sh"), what, "smoke"])
        public, internal = free_port(), free_port()
        port, admin, health = free_port(), free_port(), free_port()
        # The shipped container bootstrap with this test's free ports (host network).
        base = os.path.join(ROOT, "deploy", "kustomize", "base", "gateway")
        text = open(os.path.join(base, "envoy.yaml")).read()
        sidecar_port = internal if sidecar_has_internal_port() else public
        for a, b in (("port_value: 10000", f"port_value: {port}"), ("port_value: 9901", f"port_value: {admin}"),
                     ("port_value: 9902", f"port_value: {health}"),
                     (f"port_value: {envoy_config.K8S_SIDECAR_PORT}", f"port_value: {sidecar_port}")):
            assert a in text
            text = text.replace(a, b)
        envoy_dir = tmp_path / "envoy"
        envoy_dir.mkdir()
        (envoy_dir / "envoy.yaml").write_text(text)
        os.chmod(tmp_path, 0o755)
        admin_key = "sk-admin-smoke-0123456789abcdef"
        env = {"LLM_GATEWAY_TAG": "smoke", "SIDECAR_LISTEN": f"127.0.0.1:{public}",
               "SIDECAR_INTERNAL_LISTEN": f"127.0.0.1:{internal}", "LLM_GATEWAY_ENVOY_DIR": str(envoy_dir),
               "LLM_GATEWAY_INTERNAL_TOKEN": "smoke-internal-token-0123456789",
               "LLM_GATEWAY_VAULT_KEY": base64.b64encode(os.urandom(32)).decode(),
               "LLM_GATEWAY_ADMIN_KEY": admin_key}
        up = d.run(compose + ["up", "-d"], env=env, check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        deadline = started + SMOKE_TIMEOUT
        try:
            wait_http(f"http://127.0.0.1:{public}/readyz", deadline)
            wait_http(f"http://127.0.0.1:{health}/ready", deadline)
            # The filter answers in the OpenAI shape; an unknown key is looked up in the sidecar.
            s, hd, b = request("POST", f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                               {"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert s == 401 and json.loads(b)["error"]["code"] == "missing_api_key", b
            s, hd, b = request("POST", f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                               {"model": "m", "messages": [{"role": "user", "content": "x"}]},
                               {"authorization": "Bearer sk-gw-unknown-smoke"})
            assert s == 401 and json.loads(b)["error"]["type"] == "authentication_error", b
            s, _, b = request("GET", f"http://127.0.0.1:{public}/v1/llm/api-keys",
                              headers={"authorization": "Bearer " + admin_key})
            assert s == 200, b
            # preStop drain: readiness turns off.
            ids = d.run(compose + ["ps", "-q", "gateway"], env=env).stdout.split()
            assert ids
            d.run(["docker", "exec", "-e", "DRAIN_SECONDS=0", "-e", f"ENVOY_ADMIN=http://127.0.0.1:{admin}",
                   ids[0], "/usr/local/bin/llm-gateway-drain"])
            wait_http(f"http://127.0.0.1:{health}/ready", time.time() + 10, want=503)
        except AssertionError:
            logs = d.run(compose + ["logs", "--no-color"], env=env, check=False)
            print(logs.stdout[-4000:], logs.stderr[-2000:])
            raise
        finally:
            d.run(compose + ["down", "-v", "-t", "5"], env=env, check=False)
    finally:
        d.stop()
    assert time.time() - started < SMOKE_TIMEOUT + 60
