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


def generated_files():
    out = {}
    out.update(plain_ecds_files())
    out.update(k8s_files())
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
