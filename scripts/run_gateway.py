#!/usr/bin/env python3
"""Runs the gateway in the foreground: the control-plane sidecar, the demo model server and Envoy with the
llm-gateway filter.

One world (default): the demo provider and the demo key are registered in the control plane of the admin's
organization through the sidecar API (idempotent across restarts), the filter configuration holds only the
sidecar connection, and the admin key is shown in the final banner and kept 0600 in RUN_DIR/admin.key.
LLM_GATEWAY_RUN_MODE=static: the previous static mode (demo provider and key in the filter config, the
sidecar only for keys it does not hold), see docs/configuration.md.

Environment: GATEWAY_PORT (10000), ADMIN_PORT (9901), SIDECAR_PORT (8081), DEMO_MODEL_PORT (18080),
LLM_GATEWAY_RUN_DIR (.run), LLM_GATEWAY_DATA_DIR (RUN_DIR/sidecar), DATABASE_URL (SQLite by default),
LLM_GATEWAY_FALLBACK_KEY (apiKeyFallback: the gateway key used by requests that carry none; `demo` = the
demo key)."""
import atexit
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
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


def api(base, method, path, key, body=None):
    """One call of the sidecar API: (status, parsed JSON or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"X-API-Key": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, None


def write_secret(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)


def admin_key(run_dir, data_dir, env, base):
    """The admin key of the organization: RUN_DIR/admin.key when it still works, else a new one from
    `llm-gateway-sidecar admin-key rotate --keep-old` (recovery), stored 0600 for the next start."""
    path = os.path.join(run_dir, "admin.key")
    if os.path.exists(path):
        with open(path) as f:
            key = f.read().strip()
        if key and api(base, "GET", "/v1/llm/providers", key)[0] == 200:
            return key
    out = subprocess.run([SIDECAR_BIN, "admin-key", "rotate", "--keep-old", "--data-dir", data_dir],
                         env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        sys.exit(f"cannot obtain an admin key: {out.stderr.strip()}")
    key = out.stdout.strip().splitlines()[-1]
    write_secret(path, key)
    return key


def register_demo(base, key, demo_port):
    """The demo provider and the demo key in the admin's organization (created or updated: idempotent)."""
    provider = {"name": "demo-local", "supportedProvider": "OPENAI_COMPATIBLE",
                "url": f"http://127.0.0.1:{demo_port}/v1", "isHosted": True,
                "models": ["demo-small", {"name": "gpt-4o-mini", "upstreamName": "demo-small"}]}
    st, _ = api(base, "GET", "/v1/llm/providers/demo-local", key)
    if st == 200:
        st, body = api(base, "PUT", "/v1/llm/providers/demo-local", key, provider)
    else:
        st, body = api(base, "POST", "/v1/llm/providers", key, {"providers": [provider]})
    if st not in (200, 201):
        sys.exit(f"cannot register the demo provider: {st} {body}")
    st, body = api(base, "POST", "/v1/llm/api-keys", key,
                   {"name": "demo", "config_id": "default", "key": DEMO_KEY})
    if st not in (201, 409):
        sys.exit(f"cannot register the demo key: {st} {body}")


def report_link(base, key):
    st, body = api(base, "POST", "/v1/llm/report/link", key, {"ttlSeconds": 86400})
    if st in (200, 201) and isinstance(body, dict):
        url = body.get("url") or body.get("link") or ""
        return url if url.startswith("http") else base + url
    return None


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
    run_dir = os.environ.get("LLM_GATEWAY_RUN_DIR") or os.path.join(envoy_config.ROOT, ".run")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    static = os.environ.get("LLM_GATEWAY_RUN_MODE", "") == "static"
    fallback = os.environ.get("LLM_GATEWAY_FALLBACK_KEY", "").strip()
    if fallback == "demo":
        fallback = DEMO_KEY
    data_dir = os.environ.get("LLM_GATEWAY_DATA_DIR", os.path.join(run_dir, "sidecar"))
    env = dict(os.environ, LLM_GATEWAY_INTERNAL_TOKEN=internal_token(run_dir))
    # Local development: models registered on this machine (the demo model, Ollama, vLLM) are allowed.
    env.setdefault("LLM_GATEWAY_ALLOWED_DESTINATIONS", "127.0.0.1 localhost")

    gw = envoy_config.default_gateway_config()
    for p in gw["providers"]:
        if p["name"] == "demo-local":
            p["url"] = f"http://127.0.0.1:{demo_port}/v1"
    if not static:
        # One world: everything (demo provider, demo key, the admin's keys) lives in the control plane.
        gw = {k: v for k, v in gw.items() if k not in ("providers", "configs", "keys")}
    if fallback:
        # apiKeyFallback: read by the filter from the environment (a control-plane or static key).
        gw["fallbackKeyEnv"] = "LLM_GATEWAY_FALLBACK_KEY"
        env["LLM_GATEWAY_FALLBACK_KEY"] = fallback
    # The filter configuration is delivered by ECDS from a watched file: replace
    # .run/ecds/llm_gateway.yaml by rename and the running Envoy applies it (docs/operations.md).
    ecds_dir = os.path.join(run_dir, "ecds")
    os.makedirs(ecds_dir, exist_ok=True)
    cfg, filt = envoy_config.render_ecds(port, admin, ecds_dir, gw, sidecar_port=sidecar_port)
    ecds_path = envoy_config.write_ecds(filt, os.path.join(ecds_dir, envoy_config.ECDS_FILE))
    cfg_path = envoy_config.write(cfg, os.path.join(run_dir, "envoy.yaml"))

    procs = []

    def terminate():
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()

    # Every exit (a failed start included) stops what was started.
    atexit.register(terminate)

    def stop(*_):
        terminate()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    base = f"http://127.0.0.1:{sidecar_port}"
    admin_path = os.path.join(run_dir, "admin.key")
    if not os.path.exists(admin_path) and not os.path.exists(os.path.join(data_dir, "sidecar.db")) \
            and not env.get("DATABASE_URL"):
        # First start: the organization is created with this admin key (kept for the next start).
        write_secret(admin_path, "lgw_" + secrets.token_hex(24))
    if os.path.exists(admin_path):
        env["LLM_GATEWAY_ADMIN_KEY_FILE"] = admin_path
    procs.append(subprocess.Popen([SIDECAR_BIN, "--data-dir", data_dir, "--listen", f"127.0.0.1:{sidecar_port}"],
                                  env=env, cwd=envoy_config.ROOT, stdout=subprocess.DEVNULL))
    procs.append(subprocess.Popen([sys.executable, os.path.join(envoy_config.ROOT, "scripts", "demo_model.py"),
                                   "--port", str(demo_port)]))
    wait_ready(f"{base}/readyz", time.time() + 60, procs)
    key = admin_key(run_dir, data_dir, env, base)
    if not static:
        register_demo(base, key, demo_port)
    procs.append(subprocess.Popen(["envoy", "-c", cfg_path, "--base-id", str(port), "--log-level", "warn",
                                   "--component-log-level", "wasm:info"], cwd=envoy_config.ROOT, env=env))
    wait_ready(f"http://127.0.0.1:{admin}/ready", time.time() + 60, procs)
    link = report_link(base, key)
    gw_url = f"http://127.0.0.1:{port}"
    mode = ("static mode: demo provider and key in the filter configuration" if static else
            "demo provider 'demo-local' and demo key registered in the control plane")
    print(f"""
LLM gateway ready on {gw_url}  (Envoy admin: http://127.0.0.1:{admin})
Control plane: {base}  (data in {data_dir}; {mode})
Filter configuration: {ecds_path} (applied live when replaced by rename)

Admin key (stored 0600 in {admin_path}; rotate or recover it with
  {os.path.relpath(SIDECAR_BIN, envoy_config.ROOT)} admin-key rotate --data-dir {data_dir}):
  {key}
Demo key: {DEMO_KEY}{"  (also the fallback key of requests without a key)" if fallback == DEMO_KEY else ""}

Try it:
  curl -s {gw_url}/openai/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
    -H 'Content-Type: application/json' -d '{{"model":"demo-small","messages":[{{"role":"user","content":"Hello!"}}]}}'
  curl -s {gw_url}/openai/v1/models -H 'X-API-Key: {DEMO_KEY}'

Register a real provider (then call it with the demo key or the admin key):
  curl -s {base}/v1/llm/providers -H 'X-API-Key: {key}' -H 'Content-Type: application/json' \\
    -d '{{"providers":[{{"name":"openai","supportedProvider":"OPENAI","apiKey":"'"$OPENAI_API_KEY"'","models":["gpt-4o-mini"]}}]}}'

Savings report (open in a browser, valid 24 h): {link or "(POST /v1/llm/report/link failed)"}
  a new link:
  curl -s -X POST {base}/v1/llm/report/link -H 'X-API-Key: {key}'
More: docs/api.md. Ctrl-C stops everything.
""", flush=True)
    while True:
        for p in procs:
            if p.poll() is not None:
                print(f"process {p.args[0]} exited with {p.returncode}; stopping", file=sys.stderr)
                stop()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
