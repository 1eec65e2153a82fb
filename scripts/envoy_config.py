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
