#!/usr/bin/env python3
"""Runs the gateway in the foreground: the control-plane sidecar, the demo model server and Envoy with the
llm-gateway filter. Environment: GATEWAY_PORT (10000), ADMIN_PORT (9901), SIDECAR_PORT (8081),
DEMO_MODEL_PORT (18080), LLM_GATEWAY_DATA_DIR (.run/sidecar), DATABASE_URL (SQLite by default)."""
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import envoy_config  # noqa: E402

DEMO_KEY = "sk-gw-demo-0123456789"
SIDECAR_BIN = os.environ.get("LLM_GATEWAY_SIDECAR_BIN") or os.path.join(
    envoy_config.ROOT, "target", "release", "llm-gateway-sidecar")


def wait_ready(url, deadline, procs):
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                sys.exit(f"a gateway process exited early with code {p.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {url}")


def internal_token(run_dir):
    """The token shared by the filter and the sidecar: from the environment, else kept in .run/."""
    tok = os.environ.get("LLM_GATEWAY_INTERNAL_TOKEN")
    if tok:
        return tok
    path = os.path.join(run_dir, "internal.token")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    with open(path) as f:
        return f.read().strip()


def main():
    port = int(os.environ.get("GATEWAY_PORT", "10000"))
    admin = int(os.environ.get("ADMIN_PORT", "9901"))
    sidecar_port = int(os.environ.get("SIDECAR_PORT", "8081"))
    demo_port = int(os.environ.get("DEMO_MODEL_PORT", "18080"))
    run_dir = os.path.join(envoy_config.ROOT, ".run")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    data_dir = os.environ.get("LLM_GATEWAY_DATA_DIR", os.path.join(run_dir, "sidecar"))
    env = dict(os.environ, LLM_GATEWAY_INTERNAL_TOKEN=internal_token(run_dir))
    # Local development: models registered on this machine (the demo model, Ollama, vLLM) are allowed.
    env.setdefault("LLM_GATEWAY_ALLOWED_DESTINATIONS", "127.0.0.1 localhost")

    gw = envoy_config.default_gateway_config()
    for p in gw["providers"]:
        if p["name"] == "demo-local":
            p["url"] = f"http://127.0.0.1:{demo_port}/v1"
    # The filter configuration is delivered by ECDS from a watched file: replace
    # .run/ecds/llm_gateway.yaml by rename and the running Envoy applies it (docs/operations.md).
    ecds_dir = os.path.join(run_dir, "ecds")
    os.makedirs(ecds_dir, exist_ok=True)
    cfg, filt = envoy_config.render_ecds(port, admin, ecds_dir, gw, sidecar_port=sidecar_port)
    ecds_path = envoy_config.write_ecds(filt, os.path.join(ecds_dir, envoy_config.ECDS_FILE))
    cfg_path = envoy_config.write(cfg, os.path.join(run_dir, "envoy.yaml"))

    procs = []

    def stop(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    procs.append(subprocess.Popen([SIDECAR_BIN, "--data-dir", data_dir, "--listen", f"127.0.0.1:{sidecar_port}"],
                                  env=env, cwd=envoy_config.ROOT))
    procs.append(subprocess.Popen([sys.executable, os.path.join(envoy_config.ROOT, "scripts", "demo_model.py"),
                                   "--port", str(demo_port)]))
    wait_ready(f"http://127.0.0.1:{sidecar_port}/readyz", time.time() + 60, procs)
    procs.append(subprocess.Popen(["envoy", "-c", cfg_path, "--base-id", str(port), "--log-level", "warn",
                                   "--component-log-level", "wasm:info"], cwd=envoy_config.ROOT, env=env))
    wait_ready(f"http://127.0.0.1:{admin}/ready", time.time() + 60, procs)
    print(f"""
LLM gateway ready on http://127.0.0.1:{port}  (Envoy admin: http://127.0.0.1:{admin},
control plane: http://127.0.0.1:{sidecar_port}, data in {data_dir};
filter configuration: {ecds_path}, applied live when replaced by rename)
Try it:

  curl -s http://127.0.0.1:{port}/openai/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
    -H 'Content-Type: application/json' -d '{{"model":"demo-small","messages":[{{"role":"user","content":"Hello!"}}]}}'

Streaming: add "stream": true. Models: curl -s http://127.0.0.1:{port}/openai/v1/models -H 'X-API-Key: {DEMO_KEY}'
Keys, providers and configs of the control plane: see docs/api.md (the admin key was printed above on first start).
Ctrl-C stops everything.
""", flush=True)
    while True:
        for p in procs:
            if p.poll() is not None:
                print(f"process {p.args[0]} exited with {p.returncode}; stopping", file=sys.stderr)
                stop()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
