"""Kubernetes and Istio manifests (issue 11.3, 11.4): every kustomize overlay renders with
`kubectl kustomize` and passes strict offline schema validation (kubernetes-validate for Kubernetes
kinds, Istio's published CRD schemas for Istio kinds); a misspelled field fails; the Helm chart renders
to exactly the kustomize output; the Istio EnvoyFilter's extension config runs in a real Envoy through
file-based ECDS."""
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from harness import ROOT, Envoy, FakeUpstream, envoy_config, request

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import helm_chart  # noqa: E402

K8S_VERSION = "1.33"
SCHEMAS = os.path.join(ROOT, "deploy", "istio", "schemas")
ISTIO_SCHEMA = {("networking.istio.io/v1alpha3", "EnvoyFilter"): "envoyfilter-v1alpha3.json",
                ("networking.istio.io/v1", "Gateway"): "gateway-v1.json",
                ("networking.istio.io/v1", "VirtualService"): "virtualservice-v1.json"}
OVERLAYS = {
    "sqlite": "deploy/kustomize/overlays/sqlite",
    "postgres": "deploy/kustomize/overlays/postgres",
    "istio-ingress": "deploy/istio/ingress-gateway",
    "istio-sidecar-gateway": "deploy/istio/sidecar-gateway",
}

if not shutil.which(os.environ.get("KUBECTL", "kubectl")):
    pytest.skip("kubectl not installed (./build.sh test installs it)", allow_module_level=True)


def kustomize(path):
    out = subprocess.run([os.environ.get("KUBECTL", "kubectl"), "kustomize", os.path.join(ROOT, path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered():
    return {name: kustomize(path) for name, path in OVERLAYS.items()}


def validate_k8s(doc):
    import kubernetes_validate
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_istio(docs, tmp_path):
    """check-jsonschema (PyPI) against the vendored Istio CRD schemas; returns (code, output)."""
    outs, code = [], 0
    for i, doc in enumerate(docs):
        schema = os.path.join(SCHEMAS, ISTIO_SCHEMA[(doc["apiVersion"], doc["kind"])])
        f = tmp_path / f"istio-{i}.json"
        f.write_text(json.dumps(doc))
        p = subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile", schema, str(f)],
                           capture_output=True, text=True, timeout=120)
        code = code or p.returncode
        outs.append(p.stdout + p.stderr)
    return code, "\n".join(outs)


def is_istio(doc):
    return doc["apiVersion"].startswith("networking.istio.io/")


def test_every_manifest_validates_strictly(rendered, tmp_path):
    istio = []
    for name, docs in rendered.items():
        assert docs, name
        for doc in docs:
            if is_istio(doc):
                istio.append(doc)
            else:
                validate_k8s(doc)
    code, out = validate_istio(istio, tmp_path)
    assert code == 0, out
    assert {d["kind"] for d in istio} == {"EnvoyFilter", "Gateway", "VirtualService"}


def test_misspelled_fields_fail(rendered, tmp_path):
    import kubernetes_validate
    dep = copy.deepcopy(next(d for d in rendered["sqlite"] if d["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/ready"}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(dep)
    ef = copy.deepcopy(next(d for d in rendered["istio-ingress"] if d["kind"] == "EnvoyFilter"))
    ef["spec"]["workloadSelectr"] = ef["spec"].pop("workloadSelector")
    code, out = validate_istio([ef], tmp_path)
    assert code != 0 and "workloadSelectr" in out
    ef = copy.deepcopy(next(d for d in rendered["istio-ingress"] if d["kind"] == "EnvoyFilter"))
    ef["spec"]["configPatches"][0]["applyTo"] = "EXTENSION_CONFIGS"
    assert validate_istio([ef], tmp_path)[0] != 0


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def container(dep):
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_sidecar_gateway_shape(rendered):
    sq, pg = rendered["sqlite"], rendered["postgres"]
    for docs in (sq, pg):
        gw = find(docs, "Deployment", "llm-gateway")
        c = container(gw)
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and "livenessProbe" in c
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["/usr/local/bin/llm-gateway-drain"]
        assert gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 25
        assert find(docs, "PodDisruptionBudget", "llm-gateway")["spec"]["minAvailable"] == 1
        # Secrets only by reference, never as literal values in the manifests.
        assert not [d for d in docs if d["kind"] == "Secret"]
        sc = find(docs, "Deployment", "llm-gateway-sidecar")
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container(sc)["env"] if "valueFrom" in e}
        assert {"LLM_GATEWAY_INTERNAL_TOKEN", "LLM_GATEWAY_VAULT_KEY", "LLM_GATEWAY_ADMIN_KEY"} <= set(refs)
        assert container(gw)["envFrom"][0]["secretRef"]["name"] == "llm-gateway-provider-keys"
        # Public API and /internal are separate Services on separate ports.
        pub = find(docs, "Service", "llm-gateway-sidecar")["spec"]["ports"]
        internal = find(docs, "Service", "llm-gateway-sidecar-internal")["spec"]["ports"]
        assert [p["targetPort"] for p in pub] == ["http"] and [p["targetPort"] for p in internal] == ["internal"]
        np = find(docs, "NetworkPolicy", "llm-gateway-sidecar")
        assert np["spec"]["ingress"][0]["ports"] == [{"port": 8082}]
        # The filter ConfigMap is the ECDS file Envoy watches, not hashed (updated in place).
        cm = find(docs, "ConfigMap", "llm-gateway-filter")
        ecds = yaml.safe_load(cm["data"]["llm_gateway.yaml"])
        assert ecds["resources"][0]["typed_config"]["config"]["allow_on_headers_stop_iteration"] is True
        env_cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("llm-gateway-envoy-"))
        boot = yaml.safe_load(env_cm["data"]["envoy.yaml"])
        mounts = {v["name"]: v["configMap"]["name"] for v in gw["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
        assert mounts == {"envoy-config": env_cm["metadata"]["name"], "filter-config": "llm-gateway-filter"}
        src = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        llm = next(f for f in src["http_filters"] if f["name"] == "llm_gateway")
        assert llm["config_discovery"]["config_source"]["path_config_source"]["watched_directory"]["path"] == \
            "/etc/llm-gateway/filter"
    sc = find(sq, "Deployment", "llm-gateway-sidecar")
    assert sc["spec"]["replicas"] == 1 and sc["spec"]["strategy"]["type"] == "Recreate"
    assert find(sq, "PersistentVolumeClaim", "llm-gateway-sidecar-data")
    sc = find(pg, "Deployment", "llm-gateway-sidecar")
    assert sc["spec"]["replicas"] >= 2 and sc["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not [d for d in pg if d["kind"] == "PersistentVolumeClaim"]
    env = {e["name"]: e for e in container(sc)["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "llm-gateway", "key": "database-url"}


def test_helm_chart_equals_kustomize(rendered):
    for overlay, values in (("sqlite", {}), ("postgres", {"postgres": {"enabled": True}})):
        chart = helm_chart.render(values=values, namespace="llm-gateway")
        assert sorted(chart, key=helm_chart.key) == sorted(rendered[overlay], key=helm_chart.key), overlay
    # Values are live: images, replicas and the namespace change the output, and it still validates.
    chart = helm_chart.render(values=helm_chart.parse_set(["gateway.image=reg.example/gw:1.2", "gateway.replicas=4",
                                                           "postgres.enabled=true", "sidecar.replicas=5"]),
                              namespace="ai")
    gw, sc = find(chart, "Deployment", "llm-gateway"), find(chart, "Deployment", "llm-gateway-sidecar")
    assert container(gw)["image"] == "reg.example/gw:1.2" and gw["spec"]["replicas"] == 4
    assert sc["spec"]["replicas"] == 5 and {d["metadata"]["namespace"] for d in chart} == {"ai"}
    for doc in chart:
        validate_k8s(doc)


def test_helm_chart_is_up_to_date():
    for rel, text in helm_chart.chart_files().items():
        with open(os.path.join(helm_chart.CHART, rel)) as f:
            assert f.read() == text, f"{rel} is stale: run python3 scripts/helm_chart.py generate"
    assert sorted(os.listdir(os.path.join(helm_chart.CHART, "templates"))) == sorted(
        r.split("/", 1)[1] for r in helm_chart.chart_files() if r.startswith("templates/"))


def test_no_wasmplugin_shipped(rendered):
    # A WasmPlugin cannot set allow_on_headers_stop_iteration: the filter would hang every request.
    for docs in rendered.values():
        assert not [d for d in docs if d["kind"] == "WasmPlugin"]


KEY = "sk-gw-istio-key"


def test_istio_extension_config_runs_in_envoy(rendered):
    """The exact ECDS extension configs the EnvoyFilter carries (main filter and fallback attempt roles),
    served to a real Envoy from watched files. Only the module source differs: in a mesh istio-agent
    downloads the oci:// module and hands Envoy a local file, which is what this test gives it."""
    ef = find(rendered["istio-ingress"], "EnvoyFilter", "llm-gateway")
    patches = ef["spec"]["configPatches"]
    exts = [p["patch"]["value"] for p in patches if p["applyTo"] == "EXTENSION_CONFIG"]
    assert [e["name"] for e in exts] == ["llm_gateway"] + [f"llm_gateway_attempt_{k}" for k in range(4)]
    main = exts[0]["typed_config"]["config"]
    assert main["allow_on_headers_stop_iteration"] is True
    assert main["vm_config"]["code"]["remote"]["http_uri"]["uri"].startswith("oci://")
    # The filter insertion uses ECDS; routes, clusters and attempt listeners come along.
    kinds = [p["applyTo"] for p in patches]
    assert {"HTTP_FILTER", "HTTP_ROUTE", "CLUSTER", "LISTENER", "NETWORK_FILTER"} <= set(kinds)
    clusters = {p["patch"]["value"]["name"] for p in patches if p["applyTo"] == "CLUSTER"}
    assert {"llm_gateway_dfp_http", "llm_gateway_dfp_https", "llm_gateway_sidecar", "llm_gateway_chain_2"} <= clusters

    wasm = os.path.join(ROOT, "target", "llm_gateway.wasm")
    up = FakeUpstream()
    ecds_dir = tempfile.mkdtemp(prefix="llmgw-istio-ecds-")

    def local(ext, configuration=None):
        ext = copy.deepcopy(ext)
        cfg = ext["typed_config"]["config"]
        cfg["vm_config"]["code"] = {"local": {"filename": wasm}}
        if configuration is not None:
            cfg["configuration"] = configuration
        return dict({"@type": envoy_config.EXT_TYPE}, **ext)

    def write(name, doc):
        tmp = os.path.join(ecds_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            yaml.safe_dump({"resources": [doc]}, f)
        os.replace(tmp, os.path.join(ecds_dir, name + ".yaml"))

    def patch(cfg):
        cfg.setdefault("node", {"id": "istio-test", "cluster": "istio-test"})
        for lst in cfg["static_resources"]["listeners"]:
            hf = lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            for i, f in enumerate(hf):
                if f["name"] == "llm_gateway":
                    name = f["typed_config"]["config"]["name"]
                    hf[i] = {"name": "llm_gateway", "config_discovery": {
                        "config_source": {"resource_api_version": "V3", "path_config_source": {
                            "path": os.path.join(ecds_dir, name + ".yaml"), "watched_directory": {"path": ecds_dir}}},
                        "type_urls": [envoy_config.WASM_TYPE]}}
        return cfg

    static = {"providers": [{"name": "p", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
                             "isHosted": True, "models": ["m1"]}],
              "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}]}
    try:
        # 1. Exactly as shipped (configuration included: everything from the control plane).
        for e in exts:
            write(e["name"], local(e))
        with Envoy({"providers": []}, patch=patch, env={"LLM_GATEWAY_INTERNAL_TOKEN": "t"}) as envoy:
            s, hd, b = request("POST", envoy.url + "/openai/v1/chat/completions",
                               {"model": "m1", "messages": [{"role": "user", "content": "x"}]})
            assert s == 401 and json.loads(b)["error"]["code"] == "missing_api_key", b
            assert "sidecar" in envoy.logs()
            # 2. The same extension config with an operator's static providers/keys serves a request
            # end to end (headers held while the body is read, dynamic forward proxy, cluster_header).
            write("llm_gateway", local(exts[0], {"@type": "type.googleapis.com/google.protobuf.Struct",
                                                 "value": static}))
            import time
            deadline = time.time() + 15
            while True:
                s, _, b = request("POST", envoy.url + "/openai/v1/chat/completions",
                                  {"model": "m1", "messages": [{"role": "user", "content": "x"}]},
                                  {"authorization": "Bearer " + KEY}, timeout=10)
                if s == 200 or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert s == 200, b
            assert up.last().json()["model"] == "m1"
    finally:
        up.stop()
        shutil.rmtree(ecds_dir, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose not installed: compose files not checked")
@pytest.mark.parametrize("name", ["compose.yaml", "compose.host.yaml"])
def test_compose_files_are_valid(name):
    env = dict(os.environ, LLM_GATEWAY_INTERNAL_TOKEN="t", LLM_GATEWAY_VAULT_KEY="k", LLM_GATEWAY_ADMIN_KEY="a")
    p = subprocess.run(["docker-compose", "-f", os.path.join(ROOT, "deploy", name), "config"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    doc = yaml.safe_load(p.stdout)
    assert set(doc["services"]) == {"sidecar", "gateway"}
    # Secrets are required, never defaulted.
    env.pop("LLM_GATEWAY_VAULT_KEY")
    p = subprocess.run(["docker-compose", "-f", os.path.join(ROOT, "deploy", name), "config"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "LLM_GATEWAY_VAULT_KEY" in p.stderr
