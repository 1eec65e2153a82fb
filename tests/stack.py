"""A `./build.sh run`-equivalent stack for tests: scripts/run_gateway.py itself (sidecar, demo model, Envoy)
with a fresh run dir and free ports, stopped by PID (run_gateway stops its children on SIGTERM)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from harness import ROOT, free_port, request

SIDECAR_CANDIDATES = [os.path.join(ROOT, "target", d, "llm-gateway-sidecar") for d in ("debug", "release")]


def sidecar_bin():
    found = [p for p in SIDECAR_CANDIDATES if os.path.exists(p)]
    if not found:
        subprocess.run(["cargo", "build", "-q", "-p", "llm-gateway-sidecar"], cwd=ROOT, check=True, timeout=900)
        return SIDECAR_CANDIDATES[0]
    return max(found, key=os.path.getmtime)


class RunStack:
    def __init__(self, run_dir, env=None, ports=None):
        self.run_dir = str(run_dir)
        self.ports = ports or {k: free_port() for k in ("gateway", "admin", "sidecar", "demo")}
        self.extra_env = env or {}
        self.proc = None
        self.out_path = os.path.join(self.run_dir, "run.log")
        self.banner = ""

    @property
    def gw(self):
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def sc(self):
        return f"http://127.0.0.1:{self.ports['sidecar']}"

    @property
    def admin_key(self):
        with open(os.path.join(self.run_dir, "admin.key")) as f:
            return f.read().strip()

    def start(self, timeout=90):
        os.makedirs(self.run_dir, exist_ok=True)
        env = dict(os.environ, GATEWAY_PORT=str(self.ports["gateway"]), ADMIN_PORT=str(self.ports["admin"]),
                   SIDECAR_PORT=str(self.ports["sidecar"]), DEMO_MODEL_PORT=str(self.ports["demo"]),
                   LLM_GATEWAY_RUN_DIR=self.run_dir, LLM_GATEWAY_SIDECAR_BIN=sidecar_bin(),
                   LLM_GATEWAY_LOG="warn")
        env.pop("LLM_GATEWAY_INTERNAL_TOKEN", None)
        env.pop("DATABASE_URL", None)
        env.update(self.extra_env)
        self.out = open(self.out_path, "ab")
        offset = self.out.tell()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "run_gateway.py")],
                                     env=env, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(self.out_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            if "Ctrl-C stops everything" in text:
                self.banner = text[text.rindex("LLM gateway ready"):]
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"run_gateway.py exited {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("run_gateway.py did not print its banner in time")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc:
            self.out.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- API helpers -------------------------------------------------------------------------------
    def api(self, method, path, body=None, key=None):
        headers = {"X-API-Key": key or self.admin_key, "Content-Type": "application/json"}
        st, _, raw = request(method, self.sc + path, body, headers)
        try:
            return st, json.loads(raw) if raw else None
        except ValueError:
            return st, raw

    def chat(self, key=None, model=None, headers=None, content="Hello!"):
        body = {"messages": [{"role": "user", "content": content}]}
        if model:
            body["model"] = model
        h = {"Content-Type": "application/json"}
        if key:
            h["Authorization"] = f"Bearer {key}"
        h.update(headers or {})
        st, _, raw = request("POST", self.gw + "/openai/v1/chat/completions", body, h)
        return st, json.loads(raw)

    def banner_commands(self):
        """The shell commands of the banner (lines starting with curl or a path, with continuations)."""
        cmds, cur = [], None
        for line in self.banner.splitlines():
            s = line.strip()
            if cur is not None:
                cur += "\n" + s
                if not s.endswith("\\"):
                    cmds.append(cur)
                    cur = None
            elif re.match(r"^(curl|target/)", s):
                if s.endswith("\\"):
                    cur = s
                else:
                    cmds.append(s)
        return cmds
