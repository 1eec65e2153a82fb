#!/usr/bin/env python3
"""Packages the filter's .wasm as an OCI image without Docker, in the two layouts Istio's and Envoy
Gateway's image fetchers pull with `oci://`:

  wasm    the OCI wasm artifact: config `application/vnd.module.wasm.config.v1+json`, one layer
          `application/vnd.module.wasm.content.layer.v1+wasm` holding the raw module
  compat  the Docker-compatible image: one tar+gzip layer holding `plugin.wasm`

`build` writes an OCI image layout (oci-layout, index.json, blobs/sha256/...) that skopeo, oras, crane
or regctl push to any registry (`skopeo copy oci:target/oci:wasm docker://REGISTRY/llm-gateway-filter:TAG`);
`push` uploads it itself over the registry v2 API (plain HTTP or HTTPS, optional basic auth from
REGISTRY_USER/REGISTRY_PASSWORD), enough for a loopback or in-cluster registry. Both print the
module's sha256 (what `sha256:` in Envoy's `remote` code source and Istio's WasmPlugin check) and the
manifest digests. Layers are built byte-for-byte reproducibly (fixed mtimes, owners, gzip header).

  python3 scripts/oci_image.py build [--wasm target/llm_gateway.wasm] [--out target/oci]
  python3 scripts/oci_image.py push --registry http://127.0.0.1:5000 --repo llm-gateway/filter --tag 1.0
"""
import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WASM = os.path.join(ROOT, "target", "llm_gateway.wasm")
OUT = os.path.join(ROOT, "target", "oci")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TITLE = "org.opencontainers.image.title"


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type, data, annotations=None):
    d = {"mediaType": media_type, "digest": sha256(data), "size": len(data)}
    if annotations:
        d["annotations"] = annotations
    return d


def canonical(doc):
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def plugin_tar(wasm):
    """A tar holding plugin.wasm (0644, root, mtime 0): the compat image's only layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_bytes(data):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as g:
        g.write(data)
    return buf.getvalue()


def images(wasm):
    """{"wasm": (manifest bytes, {digest: blob}), "compat": ...} for the given module bytes."""
    out = {}
    # 1. OCI wasm artifact.
    config = canonical({})
    blobs = {sha256(config): config, sha256(wasm): wasm}
    manifest = canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(WASM_CONFIG, config),
        "layers": [descriptor(WASM_LAYER, wasm, {TITLE: "plugin.wasm"})],
        "annotations": {"org.opencontainers.image.source": "https://github.com/llm-gateway/llm-gateway"}})
    out["wasm"] = (manifest, blobs)
    # 2. Docker-compatible image: one layer with plugin.wasm.
    tar = plugin_tar(wasm)
    layer = gzip_bytes(tar)
    config = canonical({"architecture": "amd64", "os": "linux", "config": {},
                        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]}})
    blobs = {sha256(config): config, sha256(layer): layer}
    manifest = canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(IMAGE_CONFIG, config),
        "layers": [descriptor(TAR_GZIP_LAYER, layer)]})
    out["compat"] = (manifest, blobs)
    return out


def build(wasm_path=WASM, out=OUT):
    with open(wasm_path, "rb") as f:
        wasm = f.read()
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    manifests = []
    result = {"wasm_sha256": hashlib.sha256(wasm).hexdigest(), "layout": out, "manifests": {}}
    for name, (manifest, blobs) in images(wasm).items():
        for digest, data in list(blobs.items()) + [(sha256(manifest), manifest)]:
            with open(os.path.join(out, "blobs", "sha256", digest.split(":", 1)[1]), "wb") as f:
                f.write(data)
        manifests.append(descriptor(OCI_MANIFEST, manifest, {"org.opencontainers.image.ref.name": name}))
        result["manifests"][name] = sha256(manifest)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
    return result


def _request(method, url, data=None, headers=None):
    headers = dict(headers or {})
    user, password = os.environ.get("REGISTRY_USER"), os.environ.get("REGISTRY_PASSWORD")
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    return urllib.request.urlopen(req, timeout=60)


def push(registry, repo, tag, layout=OUT, variant="wasm"):
    """Uploads one image of the layout as repo:tag (monolithic blob uploads, then the manifest)."""
    registry = registry.rstrip("/")
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == variant)

    def blob(digest):
        with open(os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1]), "rb") as f:
            return f.read()

    manifest = blob(desc["digest"])
    doc = json.loads(manifest)
    for d in [doc["config"]] + doc["layers"]:
        try:
            _request("HEAD", f"{registry}/v2/{repo}/blobs/{d['digest']}").close()
            continue  # already there
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        with _request("POST", f"{registry}/v2/{repo}/blobs/uploads/") as r:
            location = urllib.parse.urljoin(registry + "/", r.headers["Location"])
        sep = "&" if "?" in location else "?"
        _request("PUT", f"{location}{sep}digest={urllib.parse.quote(d['digest'])}", blob(d["digest"]),
                 {"Content-Type": "application/octet-stream"}).close()
    _request("PUT", f"{registry}/v2/{repo}/manifests/{tag}", manifest, {"Content-Type": OCI_MANIFEST}).close()
    return desc["digest"]


def pull_wasm(registry, repo, ref):
    """Fetches the module the way Istio's image fetcher does: the manifest, then either the wasm
    layer (OCI artifact) or plugin.wasm out of the single tar+gzip layer (Docker-compatible image)."""
    registry = registry.rstrip("/")
    accept = ", ".join([OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"])
    with _request("GET", f"{registry}/v2/{repo}/manifests/{ref}", headers={"Accept": accept}) as r:
        manifest = json.loads(r.read())
    layers = manifest["layers"]
    if len(layers) != 1:
        raise ValueError(f"expected one layer, got {len(layers)}")
    with _request("GET", f"{registry}/v2/{repo}/blobs/{layers[0]['digest']}") as r:
        data = r.read()
    if sha256(data) != layers[0]["digest"]:
        raise ValueError("layer digest mismatch")
    if layers[0]["mediaType"] == WASM_LAYER:
        return data
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        for m in tar.getmembers():
            if os.path.basename(m.name) == "plugin.wasm" and m.isfile():
                return tar.extractfile(m).read()
    raise ValueError("no plugin.wasm in the image layer")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--wasm", default=WASM)
    b.add_argument("--out", default=OUT)
    p = sub.add_parser("push")
    p.add_argument("--wasm", default=WASM)
    p.add_argument("--out", default=OUT)
    p.add_argument("--registry", required=True, help="http(s)://host:port")
    p.add_argument("--repo", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--variant", choices=["wasm", "compat"], default="wasm")
    args = ap.parse_args()
    res = build(args.wasm, args.out)
    print(f"wasm sha256: {res['wasm_sha256']}")
    for name, digest in res["manifests"].items():
        print(f"{name} image manifest: {digest}  (layout {args.out}, ref {name})")
    if args.cmd == "push":
        digest = push(args.registry, args.repo, args.tag, args.out, args.variant)
        host = urllib.parse.urlparse(args.registry).netloc
        print(f"pushed {host}/{args.repo}:{args.tag}@{digest}")
        print(f"Istio/Envoy Gateway: url: oci://{host}/{args.repo}:{args.tag}  sha256: {res['wasm_sha256']}")


if __name__ == "__main__":
    sys.exit(main())
