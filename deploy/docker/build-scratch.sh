#!/usr/bin/env bash
# Builds the container images without any base image (for machines that reach no image registry):
# each image is a root filesystem assembled from this machine's binaries and the shared libraries
# they load, imported with `docker import`. Same paths, entrypoints and user as the Dockerfiles.
#   deploy/docker/build-scratch.sh sidecar [TAG]   llm-gateway/sidecar:TAG (default: scratch)
#   deploy/docker/build-scratch.sh gateway [TAG]   llm-gateway/gateway:TAG (Envoy from PATH, ~110 MB)
# Environment: SIDECAR_BIN (default target/release, else target/debug), ENVOY_BIN (resolved from PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:?usage: build-scratch.sh sidecar|gateway [TAG]}
tag=${2:-scratch}
root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT

add_bin() {  # add_bin SRC DEST: a binary and every shared library it loads
  install -D -m 0755 "$1" "$root$2"
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$lib" ] && install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}

base_files() {
  mkdir -p "$root/etc" "$root/tmp" "$root/etc/ssl/certs"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/" 2>/dev/null || true
}

case "$what" in
  sidecar)
    bin=${SIDECAR_BIN:-}
    if [ -z "$bin" ]; then
      bin=target/release/llm-gateway-sidecar
      [ -x "$bin" ] || bin=target/debug/llm-gateway-sidecar
    fi
    [ -x "$bin" ] || { echo "build the sidecar first (cargo build -p llm-gateway-sidecar)" >&2; exit 1; }
    base_files
    add_bin "$bin" /usr/local/bin/llm-gateway-sidecar
    install -D -m 0644 config/hosted-model-specs.json "$root/etc/llm-gateway/catalog/hosted-model-specs.json"
    install -D -m 0644 config/model-prices.json "$root/etc/llm-gateway/catalog/model-prices.json"
    install -d -o 65532 -g 65532 "$root/var/lib/llm-gateway"
    tar -C "$root" --numeric-owner -c . | docker import \
      --change 'ENV LLM_GATEWAY_DATA_DIR=/var/lib/llm-gateway' \
      --change 'ENV LLM_GATEWAY_MODEL_SPECS=/etc/llm-gateway/catalog/hosted-model-specs.json' \
      --change 'ENV LLM_GATEWAY_MODEL_PRICES=/etc/llm-gateway/catalog/model-prices.json' \
      --change 'USER 65532:65532' \
      --change 'EXPOSE 8081 8082' \
      --change 'ENTRYPOINT ["/usr/local/bin/llm-gateway-sidecar"]' \
      --change 'CMD ["--listen", "0.0.0.0:8081"]' \
      - "llm-gateway/sidecar:$tag"
    ;;
  gateway)
    envoy=${ENVOY_BIN:-$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null || command -v envoy)}
    [ -f target/llm_gateway.wasm ] || { echo "build the filter first (./build.sh wasm)" >&2; exit 1; }
    base_files
    add_bin "$envoy" /usr/local/bin/envoy
    add_bin "$(command -v dash || command -v sh)" /bin/sh
    add_bin "$(command -v curl)" /usr/bin/curl
    add_bin "$(command -v sleep)" /bin/sleep
    install -D -m 0644 target/llm_gateway.wasm "$root/etc/llm-gateway/wasm/llm_gateway.wasm"
    install -D -m 0644 deploy/kustomize/base/gateway/envoy.yaml "$root/etc/llm-gateway/envoy/envoy.yaml"
    install -D -m 0644 deploy/kustomize/base/gateway/llm_gateway.yaml "$root/etc/llm-gateway/filter/llm_gateway.yaml"
    install -D -m 0755 deploy/docker/llm-gateway-drain "$root/usr/local/bin/llm-gateway-drain"
    tar -C "$root" --numeric-owner -c . | docker import \
      --change 'USER 65532:65532' \
      --change 'EXPOSE 10000 9902' \
      --change 'ENTRYPOINT ["/usr/local/bin/envoy"]' \
      --change 'CMD ["--config-path", "/etc/llm-gateway/envoy/envoy.yaml", "--log-level", "warn", "--component-log-level", "wasm:info,config:info", "--drain-time-s", "20"]' \
      - "llm-gateway/gateway:$tag"
    ;;
  *)
    echo "usage: build-scratch.sh sidecar|gateway [TAG]" >&2; exit 2 ;;
esac
