# The gateway: Envoy + the llm-gateway filter + the Kubernetes/compose bootstrap (ECDS filter config
# under /etc/llm-gateway/filter, replaceable by a mount). Built with ordinary base images:
#   docker build -f deploy/docker/gateway.Dockerfile -t llm-gateway/gateway:TAG .
# (deploy/docker/build-scratch.sh builds the same layout without pulling any base image.)
FROM rust:1-bookworm AS wasm
RUN rustup target add wasm32-wasip1 \
    && apt-get update && apt-get install -y --no-install-recommends binaryen && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN ./build.sh wasm

FROM envoyproxy/envoy:v1.40-latest
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wasm /src/target/llm_gateway.wasm /etc/llm-gateway/wasm/llm_gateway.wasm
COPY deploy/kustomize/base/gateway/envoy.yaml /etc/llm-gateway/envoy/envoy.yaml
COPY deploy/kustomize/base/gateway/llm_gateway.yaml /etc/llm-gateway/filter/llm_gateway.yaml
COPY deploy/docker/llm-gateway-drain /usr/local/bin/llm-gateway-drain
USER 65532:65532
EXPOSE 10000 9902
ENTRYPOINT ["/usr/local/bin/envoy"]
CMD ["--config-path", "/etc/llm-gateway/envoy/envoy.yaml", "--log-level", "warn", \
     "--component-log-level", "wasm:info,config:info", "--drain-time-s", "20"]
