"""Issue 14: a new user's first hour, end to end through `./build.sh run`'s own script (real sidecar, real
Envoy with the built filter, the demo model): one world, the banner's commands, admin key recovery,
inheritance intents, configs without parent, the fallback key through the sidecar, hosted-first,
errors that name the reason, masked short keys, usage clusters and hosted model specs."""
import os
import stat
import subprocess
import time

import pytest

from harness import ROOT, request
from stack import RunStack, sidecar_bin

DEMO_KEY = "sk-gw-demo-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = RunStack(tmp_path_factory.mktemp("firsthour"), env={"LLM_GATEWAY_FALLBACK_KEY": "demo"})
    s.start()
    yield s
    s.stop()


def names(items, field="name"):
    return [i[field] for i in items]


def new_key(stack, body):
    st, out = stack.api("POST", "/v1/llm/api-keys", body)
    assert st == 201, out
    return out["key"]


def wait_usage(stack, pred, key=None, query="", timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st, out = stack.api("GET", "/v1/llm/usage" + query, key=key)
        assert st == 200, out
        if pred(out):
            return out
        time.sleep(0.3)
    raise AssertionError(f"usage never matched: {out}")


def test_one_world_banner_and_restart(stack):
    key = stack.admin_key
    path = os.path.join(stack.run_dir, "admin.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key in stack.banner and DEMO_KEY in stack.banner
    # The admin's organization holds the demo provider and the demo key.
    st, out = stack.api("GET", "/v1/llm/providers")
    assert st == 200 and "demo-local" in names(out["providers"]), out
    st, _, raw = request("GET", stack.gw + "/openai/v1/models", headers={"X-API-Key": key})
    assert st == 200 and b"demo-small" in raw
    st, out = stack.chat(key=key, model="demo-small")
    assert st == 200 and "demo model" in out["choices"][0]["message"]["content"], out
    # Demo traffic is readable with the admin key (one organization).
    st, out = stack.chat(key=DEMO_KEY, model="demo-small")
    assert st == 200, out
    wait_usage(stack, lambda u: u["totals"]["requests"] >= 2)
    # The banner's next steps work as printed: register a real provider, open the report, a new link.
    cmds = stack.banner_commands()
    register = next(c for c in cmds if "/v1/llm/providers" in c)
    r = subprocess.run(["bash", "-c", register], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, OPENAI_API_KEY="sk-test-first-hour-0001"))
    assert '"name":"openai"' in r.stdout.replace(" ", ""), r.stdout + r.stderr
    link = next(line.split("): ", 1)[1].strip() for line in stack.banner.splitlines()
                if line.startswith("Savings report"))
    st, h, raw = request("GET", link)
    assert st == 200 and h["content-type"].startswith("text/html"), raw[:300]
    newlink = next(c for c in cmds if "/report/link" in c)
    r = subprocess.run(["bash", "-c", newlink], capture_output=True, text=True, timeout=30)
    assert "/v1/llm/report?token=" in r.stdout, r.stdout
    for c in cmds:
        if c.startswith("curl") and "/openai/v1/" in c:
            r = subprocess.run(["bash", "-c", c], capture_output=True, text=True, timeout=30)
            assert "demo-small" in r.stdout, (c, r.stdout)
    st, _ = stack.api("DELETE", "/v1/llm/providers/openai")
    assert st == 204


def test_restart_is_idempotent_and_admin_key_rotates(tmp_path):
    with RunStack(tmp_path) as s:
        first = s.admin_key
    with RunStack(tmp_path, ports=s.ports) as s2:
        assert s2.admin_key == first and first in s2.banner
        st, out = s2.api("GET", "/v1/llm/providers")
        assert names(out["providers"]) == ["demo-local"], out
        st, out = s2.api("GET", "/v1/llm/api-keys")
        assert st == 200
        st, out = s2.chat(key=DEMO_KEY, model="demo-small")
        assert st == 200, out
        # Rotation (documented in docs/operations.md): a new key works, the previous one is revoked.
        r = subprocess.run([sidecar_bin(), "admin-key", "rotate", "--data-dir",
                            os.path.join(s2.run_dir, "sidecar")], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        rotated = r.stdout.strip()
        assert rotated.startswith("lgw_") and rotated != first
        assert s2.api("GET", "/v1/llm/providers", key=rotated)[0] == 200
        assert s2.api("GET", "/v1/llm/providers", key=first)[0] == 401
    # A lost/stale .run/admin.key is recovered on the next start (admin-key rotate --keep-old).
    with open(os.path.join(str(tmp_path), "admin.key"), "w") as f:
        f.write("lgw_lost\n")
    with RunStack(tmp_path, ports=s.ports) as s3:
        recovered = s3.admin_key
        assert recovered not in ("lgw_lost", first) and recovered in s3.banner
        assert s3.api("GET", "/v1/llm/providers", key=recovered)[0] == 200


def test_static_mode_stays_available(tmp_path):
    with RunStack(tmp_path, env={"LLM_GATEWAY_RUN_MODE": "static"}) as s:
        assert "static mode" in s.banner
        st, out = s.chat(key=DEMO_KEY, model="demo-small")
        assert st == 200, out
        # The demo provider lives in the filter configuration, not in the admin's organization.
        st, out = s.api("GET", "/v1/llm/providers")
        assert st == 200 and out["providers"] == [], out


def test_fallback_key_is_a_control_plane_key(stack):
    # LLM_GATEWAY_FALLBACK_KEY=demo: key-less requests use the demo key, resolved by the sidecar.
    st, out = stack.chat(model="demo-small")
    assert st == 200, out
    ecds = open(os.path.join(stack.run_dir, "ecds", "llm_gateway.yaml")).read()
    assert "fallbackKeyEnv" in ecds and "\n          keys:" not in ecds and "sha256" not in ecds


def register(stack, providers):
    st, out = stack.api("POST", "/v1/llm/providers", {"providers": providers})
    assert st == 201, out


def test_inheritance_intents_default_parent_and_errors(stack):
    demo_url = f"http://127.0.0.1:{stack.ports['demo']}/v1"
    register(stack, [{"name": "saas-x", "supportedProvider": "OPENAI_COMPATIBLE", "url": "http://127.0.0.1:9/v1",
                      "apiKey": "abc", "models": ["demo-small", "saas-only"]}])
    # A key of 3 characters is masked, never shown whole.
    st, out = stack.api("GET", "/v1/llm/providers/saas-x")
    assert out["apiKeyLast4"] == "****", out
    # No parent: builds on the default config (all providers).
    st, cfg = stack.api("POST", "/config", {"name": "Production"})
    assert st == 201 and cfg["inherits"] == "default", cfg
    assert names(cfg["resolved_providers"]) == ["demo-local", "saas-x"]
    # Overrides keep the rest: only saas-x's key changes.
    st, over = stack.api("POST", "/config", {"name": "key-for-saas", "providers": [
        {"name": "saas-x", "api_key": "sk-override-000000"}]})
    assert names(over["resolved_providers"]) == ["demo-local", "saas-x"], over
    # `only` narrows, in its order.
    st, narrow = stack.api("POST", "/config", {"name": "saas-first", "only": ["saas-x", "demo-local"]})
    assert names(narrow["resolved_providers"]) == ["saas-x", "demo-local"], narrow
    st, solo = stack.api("POST", "/config", {"name": "demo-only", "inherits": cfg["config_id"],
                                             "restrictTo": ["demo-local"],
                                             "providers": [{"name": "demo-local", "models": ["demo-small"]}]})
    assert st == 201, solo
    k_solo = new_key(stack, {"config_id": solo["config_id"], "name": "solo"})
    st, _, raw = request("GET", stack.gw + "/openai/v1/models", headers={"X-API-Key": k_solo})
    assert raw.count(b'"id"') == 1 and b"demo-small" in raw, raw
    # Refused configs name what was sent, not an id generated for them.
    st, out = stack.api("POST", "/config", {"name": "bad", "only": ["ghost"]})
    assert st == 400 and "the new config 'bad'" in out["error"]["message"] and "cfg_" not in out["error"]["message"]
    # A per-key settings.provider outside the key's config: 400.
    st, out = stack.api("POST", "/v1/llm/api-keys", {"config_id": solo["config_id"],
                                                       "settings": {"provider": "saas-x"}})
    assert st == 400 and out["error"]["code"] == "provider_not_in_config", out

    # Hosted first: saas-x comes first in the config and is the settings provider, yet the hosted
    # demo-local serves demo-small, with or without a model, and /models says so.
    k_first = new_key(stack, {"config_id": narrow["config_id"], "name": "first",
                              "settings": {"provider": "saas-x"}})
    for model in (None, "demo-small"):
        st, out = stack.chat(key=k_first, model=model)
        assert st == 200 and "demo model" in out["choices"][0]["message"]["content"], out
    st, _, raw = request("GET", stack.gw + "/openai/v1/models/demo-small", headers={"X-API-Key": k_first})
    assert b'"owned_by":"demo-local"' in raw, raw
    st, _, raw = request("GET", stack.gw + "/openai/v1/models", headers={"X-API-Key": k_first})
    assert b'"id":"demo-small","object":"model","owned_by":"demo-local"' in raw.replace(b" ", b""), raw

    # Cluster scope: a cluster token asking for a SaaS model is told the scope is the reason; usage of an
    # org key served by a cluster's hosted provider records that cluster; hosted specs link deployments.
    register(stack, [{"name": "hosted-c1", "supportedProvider": "OPENAI_COMPATIBLE", "url": demo_url,
                      "isHosted": True, "clusterId": "c1",
                      "models": [{"name": "llama3.1:8b", "upstreamName": "demo-small"}]}])
    k_c1 = new_key(stack, {"config_id": "default", "scope": "cluster", "cluster_id": "c1"})
    st, out = stack.chat(key=k_c1, model="saas-only")
    assert st == 403 and out["error"]["code"] == "model_not_in_scope", out
    assert "cluster 'c1'" in out["error"]["message"]
    st, out = stack.chat(key=k_c1, model="llama3.1:8b")
    assert st == 200, out
    k_org = new_key(stack, {"config_id": "default", "name": "org"})
    st, out = stack.chat(key=k_org, model="llama3.1:8b")
    assert st == 200, out
    wait_usage(stack, lambda u: any(r["group"].get("cluster") == "c1" and r["requests"] >= 2
                                    for r in u["rows"]), query="?group_by=cluster")
    st, specs = stack.api("GET", "/ai-optimizer/v1beta/hosted-model-specs")
    item = next(i for i in specs["items"] if i["model"] == "llama3.1:8b")
    assert item["deployments"] == [{"provider": "hosted-c1", "clusterId": "c1", "model": "llama3.1:8b"}]
    st, specs = stack.api("GET", "/ai-optimizer/v1beta/hosted-model-specs", key=k_c1)
    item = next(i for i in specs["items"] if i["model"] == "llama3.1:8b")
    assert [d["clusterId"] for d in item["deployments"]] == ["c1"]
    k_c2 = new_key(stack, {"config_id": "default", "scope": "cluster", "cluster_id": "c2"})
    st, specs = stack.api("GET", "/ai-optimizer/v1beta/hosted-model-specs", key=k_c2)
    assert all(not i["deployments"] for i in specs["items"]), "another cluster's deployments leak"
