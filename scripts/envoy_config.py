"""Renders a runnable Envoy config from envoy/gateway.yaml: ports, wasm path and the gateway config are
the only things that change. Used by scripts/run_gateway.py, the tests and the benchmark."""
import copy
import json
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "envoy", "gateway.yaml")
WASM = os.path.join(ROOT, "target", "llm_gateway.wasm")


def load_template(path=TEMPLATE):
    with open(path) as f:
        return yaml.safe_load(f)


def _listener(cfg):
    return cfg["static_resources"]["listeners"][0]


def _hcm(cfg):
    return _listener(cfg)["filter_chains"][0]["filters"][0]["typed_config"]


def gateway_filter(cfg):
    for f in _hcm(cfg)["http_filters"]:
        if f["name"] == "llm_gateway":
            return f["typed_config"]["config"]
    raise KeyError("llm_gateway filter not found")


def default_gateway_config(cfg=None):
    cfg = cfg or load_template()
    return copy.deepcopy(gateway_filter(cfg)["configuration"]["value"])


def set_sidecar_port(cfg, port):
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "llm_gateway_sidecar":
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"] = port


def render(port, admin_port, gateway_config=None, wasm=WASM, as_string=False, extra_clusters=(),
           env_keys=None, sidecar_port=None):
    """Returns an Envoy config dict. gateway_config replaces the filter's inline configuration;
    as_string passes it as a JSON StringValue instead of a native Struct."""
    cfg = load_template()
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    _listener(cfg)["address"]["socket_address"]["port_value"] = port
    fc = gateway_filter(cfg)
    fc["vm_config"]["code"]["local"]["filename"] = wasm
    if env_keys is not None:
        fc["vm_config"]["environment_variables"]["host_env_keys"] = list(env_keys)
    if gateway_config is not None:
        if as_string:
            fc["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                   "value": json.dumps(gateway_config)}
        else:
            fc["configuration"]["value"] = gateway_config
    cfg["static_resources"]["clusters"].extend(extra_clusters)
    if sidecar_port is not None:
        set_sidecar_port(cfg, sidecar_port)
    return cfg


def write(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


# --- ECDS: the filter configuration in its own watched file ------------------------------------------
# The main listener's llm_gateway filter is declared with config_discovery; its configuration (a
# TypedExtensionConfig holding the Wasm filter config) comes from a file Envoy watches. Replacing the
# file by rename (what a Kubernetes ConfigMap update does with its ..data symlink swap, and what
# write_ecds below does) makes Envoy load the new configuration without restarting; an invalid one is
# refused and the last good one keeps serving (docs/operations.md "Configuration reload").
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
EXT_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
ECDS_DIR = os.path.join("envoy", "ecds")
ECDS_FILE = "llm_gateway.yaml"


def extension_config(filter_config):
    """The TypedExtensionConfig resource ECDS delivers for the main filter (also what the Istio
    EnvoyFilter carries)."""
    return {"name": "llm_gateway", "typed_config": {"@type": WASM_TYPE, "config": filter_config}}


def ecds_document(filter_config):
    return {"resources": [dict({"@type": EXT_TYPE}, **extension_config(filter_config))]}


def to_ecds(cfg, ecds_dir, ecds_file=ECDS_FILE):
    """Turns a rendered bootstrap into its ECDS form in place; returns the filter config it took out."""
    hcm = _hcm(cfg)
    # File-based xDS needs a node identity.
    cfg.setdefault("node", {"id": "llm-gateway", "cluster": "llm-gateway"})
    for i, f in enumerate(hcm["http_filters"]):
        if f["name"] == "llm_gateway":
            taken = f["typed_config"]["config"]
            hcm["http_filters"][i] = {
                "name": "llm_gateway",
                "config_discovery": {
                    "config_source": {
                        "resource_api_version": "V3",
                        "path_config_source": {
                            "path": os.path.join(ecds_dir, ecds_file),
                            "watched_directory": {"path": ecds_dir},
                        },
                    },
                    "type_urls": [WASM_TYPE],
                },
            }
            return taken
    raise KeyError("llm_gateway filter not found")


def write_ecds(filter_config, path):
    """Writes the ECDS file atomically (temp file + rename in the same directory), so Envoy's
    directory watch sees one complete new file."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        yaml.safe_dump(ecds_document(filter_config), f, sort_keys=False)
    os.replace(tmp, path)
    return path


def render_ecds(port, admin_port, ecds_dir, gateway_config=None, **kw):
    """A runnable ECDS bootstrap plus the filter config for its ECDS file (the caller writes it)."""
    cfg = render(port, admin_port, gateway_config, **kw)
    filt = to_ecds(cfg, ecds_dir)
    return cfg, filt


# --- Generated files shipped in the repository -------------------------------------------------------
# `python3 scripts/envoy_config.py generate` rewrites them from envoy/gateway.yaml; a test checks they
# are up to date, so every shipped form carries the same timeouts, limits, error mapping and access log.
HEADER = ("# GENERATED by `python3 scripts/envoy_config.py generate` from envoy/gateway.yaml: edit that file\n"
          "# (or the generator), not this one.\n")

K8S_WASM = "/etc/llm-gateway/wasm/llm_gateway.wasm"
K8S_FILTER_DIR = "/etc/llm-gateway/filter"
K8S_SIDECAR_HOST = "llm-gateway-sidecar-internal"
K8S_SIDECAR_PORT = 8082
K8S_HEALTH_PORT = 9902

# Filter configuration of a Kubernetes deployment: everything comes from the control plane.
K8S_FILTER_CONFIG = {
    "sidecar": {"tokenEnv": "LLM_GATEWAY_INTERNAL_TOKEN", "timeoutMs": 2000, "staleSeconds": 300},
    # apiKeyFallback: the gateway key (usually a control-plane key) of requests that carry none; unset or
    # empty variable: no fallback, key-less requests get 401.
    "fallbackKeyEnv": "LLM_GATEWAY_FALLBACK_KEY",
    "providers": [],
    "keys": [],
}


def plain_ecds_files():
    """envoy/gateway-ecds.yaml + envoy/ecds/llm_gateway.yaml: the plain-Envoy ECDS example (run from
    the repository root like envoy/gateway.yaml)."""
    cfg = load_template()
    filt = to_ecds(cfg, ECDS_DIR)
    return {os.path.join("envoy", "gateway-ecds.yaml"): cfg,
            os.path.join(ECDS_DIR, ECDS_FILE): ecds_document(filt)}


def health_listener(port, admin_port):
    """Readiness/liveness for kubelet without exposing the admin interface: GET /ready on this
    listener is proxied to the admin's /ready (which turns 503 once draining starts)."""
    return {
        "name": "health",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                         "HttpConnectionManager",
                "stat_prefix": "health",
                "route_config": {"name": "health", "virtual_hosts": [{
                    "name": "health", "domains": ["*"],
                    "routes": [{"match": {"path": "/ready"}, "route": {"cluster": "envoy_admin", "timeout": "2s"}},
                               {"match": {"prefix": "/"},
                                "direct_response": {"status": 404}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }, {
        "name": "envoy_admin", "connect_timeout": "1s", "type": "STATIC",
        "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}}]}]},
    }


def k8s_files(base="deploy/kustomize/base/gateway"):
    """The gateway container's bootstrap and filter config (ConfigMaps in the kustomize base)."""
    cfg = load_template()
    cfg["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 9901}
    _listener(cfg)["address"]["socket_address"] = {"address": "0.0.0.0", "port_value": 10000}
    fc = gateway_filter(cfg)
    fc["vm_config"]["code"]["local"]["filename"] = K8S_WASM
    fc["configuration"] = {"@type": "type.googleapis.com/google.protobuf.Struct", "value": K8S_FILTER_CONFIG}
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "llm_gateway_sidecar":
            c["type"] = "STRICT_DNS"
            c["dns_lookup_family"] = "V4_PREFERRED"
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] = {
                "address": K8S_SIDECAR_HOST, "port_value": K8S_SIDECAR_PORT}
    lst, cl = health_listener(K8S_HEALTH_PORT, 9901)
    cfg["static_resources"]["listeners"].append(lst)
    cfg["static_resources"]["clusters"].append(cl)
    filt = to_ecds(cfg, K8S_FILTER_DIR)
    return {os.path.join(base, "envoy.yaml"): cfg, os.path.join(base, ECDS_FILE): ecds_document(filt)}


# --- Istio: an EnvoyFilter carrying everything the filter needs -----------------------------------
# A WasmPlugin cannot set allow_on_headers_stop_iteration (without it every request hangs: the filter
# holds the headers while it reads the body) nor add the dynamic forward proxy, the cluster_header
# route and the fallback attempt listeners. The EnvoyFilter adds the filter as ECDS extension configs
# (so istio-agent downloads the oci:// module, as it does for WasmPlugins) plus those pieces.
ISTIO_WASM_URL = "oci://ghcr.io/llm-gateway/llm-gateway-filter:latest"
ROUTER = "envoy.filters.http.router"
HCM = "envoy.filters.network.http_connection_manager"


def istio_code(url=ISTIO_WASM_URL):
    # istio-agent fetches oci:// and https:// modules named in ECDS and hands Envoy a local file.
    # Pin a version with a tag or @sha256:<manifest digest>, or add `sha256: <module sha256>`
    # (printed by scripts/oci_image.py).
    return {"remote": {"http_uri": {"uri": url, "timeout": "30s"}}}


def istio_extension_configs(filter_config, url=ISTIO_WASM_URL):
    """The ECDS resources of the EnvoyFilter: the main filter and the fallback attempt roles."""
    cfg = load_template()
    out = []
    main = copy.deepcopy(gateway_filter(cfg))
    main["vm_config"]["code"] = istio_code(url)
    main["configuration"] = {"@type": "type.googleapis.com/google.protobuf.Struct", "value": filter_config}
    out.append(extension_config(main))
    for lst in cfg["static_resources"]["listeners"][1:]:
        for f in lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
            if f["name"] == "llm_gateway":
                c = copy.deepcopy(f["typed_config"]["config"])
                c["vm_config"]["code"] = istio_code(url)
                out.append({"name": c["name"], "typed_config": {"@type": WASM_TYPE, "config": c}})
    return out


def hcm_type():
    return "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _ecds_filter(name):
    return {"name": name, "config_discovery": {
        "config_source": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
        "type_urls": [WASM_TYPE]}}


def istio_envoyfilter(name, namespace, selector, sidecar_address, vhost="*:80", url=ISTIO_WASM_URL,
                      filter_config=None):
    cfg = load_template()
    filter_config = filter_config if filter_config is not None else K8S_FILTER_CONFIG
    patches = []
    for ext in istio_extension_configs(filter_config, url):
        patches.append({"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD", "value": ext}})
    hcm = _hcm(cfg)
    dfp = copy.deepcopy(next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.dynamic_forward_proxy"))
    at_router = {"context": "GATEWAY", "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}}
    # The gateway's HTTP connection manager: Envoy-generated errors in the OpenAI shape, headers timeout.
    patches.append({"applyTo": "NETWORK_FILTER",
                    "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {"name": HCM}}}},
                    "patch": {"operation": "MERGE", "value": {"name": HCM, "typed_config": {
                        "@type": hcm_type(),
                        "request_headers_timeout": hcm["request_headers_timeout"],
                        "local_reply_config": copy.deepcopy(hcm["local_reply_config"])}}}})
    patches.append({"applyTo": "HTTP_FILTER", "match": at_router,
                    "patch": {"operation": "INSERT_BEFORE", "value": _ecds_filter("llm_gateway")}})
    patches.append({"applyTo": "HTTP_FILTER", "match": at_router, "patch": {"operation": "INSERT_BEFORE", "value": dfp}})
    # Routes the filter selects with x-llm-gateway-cluster: fallback chains and single providers.
    for r in reversed([r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "route" in r]):
        patches.append({"applyTo": "HTTP_ROUTE",
                        "match": {"context": "GATEWAY", "routeConfiguration": {"vhost": {"name": vhost}}},
                        "patch": {"operation": "INSERT_FIRST", "value": dict(copy.deepcopy(r), name=(
                            r["match"]["headers"][0].get("string_match", {}).get("exact", "llm_gateway_provider")))}})
    for c in cfg["static_resources"]["clusters"]:
        c = copy.deepcopy(c)
        if c["name"] == "llm_gateway_sidecar":
            host, port = sidecar_address
            c["type"] = "STRICT_DNS"
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] = {
                "address": host, "port_value": port}
        patches.append({"applyTo": "CLUSTER", "match": {"context": "GATEWAY"}, "patch": {"operation": "ADD", "value": c}})
    for lst in cfg["static_resources"]["listeners"][1:]:
        lst = copy.deepcopy(lst)
        hf = lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        for i, f in enumerate(hf):
            if f["name"] == "llm_gateway":
                hf[i] = _ecds_filter(f["typed_config"]["config"]["name"])
        patches.append({"applyTo": "LISTENER", "match": {"context": "GATEWAY"}, "patch": {"operation": "ADD", "value": lst}})
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "llm-gateway"}},
            "spec": {"workloadSelector": {"labels": selector}, "priority": 10, "configPatches": patches}}


def istio_files():
    internal = (f"{K8S_SIDECAR_HOST}.llm-gateway.svc.cluster.local", K8S_SIDECAR_PORT)
    return {
        "deploy/istio/ingress-gateway/envoyfilter.yaml":
            istio_envoyfilter("llm-gateway", "istio-system", {"istio": "ingressgateway"}, internal),
        "deploy/istio/sidecar-gateway/envoyfilter.yaml":
            istio_envoyfilter("llm-gateway", "llm-gateway", {"istio": "llm-gateway"}, internal),
    }


def generated_files():
    out = {}
    out.update(plain_ecds_files())
    out.update(k8s_files())
    out.update(istio_files())
    return out


def dump(doc):
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def generate(root=ROOT):
    for rel, doc in generated_files().items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(dump(doc))
        print(path)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["generate"]:
        generate()
    else:
        sys.exit("usage: envoy_config.py generate")
