#!/usr/bin/env python3
"""Vendors strict JSON Schemas of the Istio CRDs the shipped manifests use (EnvoyFilter, Gateway,
VirtualService) from istio/api's kubernetes/customresourcedefinitions.gen.yaml:

  python3 scripts/istio_schemas.py path/to/customresourcedefinitions.gen.yaml

Each CRD version's openAPIV3Schema becomes deploy/istio/schemas/<kind>-<version>.json, made strict:
objects with declared properties reject unknown ones (as `kubectl apply --validate=strict` does),
except where the CRD says x-kubernetes-preserve-unknown-fields (EnvoyFilter patch values)."""
import json
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "deploy", "istio", "schemas")
WANT = {("networking.istio.io", "EnvoyFilter", "v1alpha3"), ("networking.istio.io", "Gateway", "v1"),
        ("networking.istio.io", "VirtualService", "v1")}


def strict(node):
    if isinstance(node, dict):
        out = {k: strict(v) for k, v in node.items()}
        if out.get("type") == "object" and "properties" in out \
                and not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if out.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def main(src):
    with open(src) as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition"]
    os.makedirs(OUT, exist_ok=True)
    for crd in docs:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if (group, kind, v["name"]) not in WANT:
                continue
            schema = strict(v["schema"]["openAPIV3Schema"])
            props = schema.setdefault("properties", {})
            props["apiVersion"] = {"const": f"{group}/{v['name']}"}
            props["kind"] = {"const": kind}
            props["metadata"] = {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
                "additionalProperties": False}
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
            schema["additionalProperties"] = False
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            path = os.path.join(OUT, f"{kind.lower()}-{v['name']}.json")
            with open(path, "w") as f:
                json.dump(schema, f, indent=1, sort_keys=True)
                f.write("\n")
            print(path)


if __name__ == "__main__":
    main(sys.argv[1])
