# The control-plane sidecar, built with ordinary base images:
#   docker build -f deploy/docker/sidecar.Dockerfile -t llm-gateway/sidecar:TAG .
# (deploy/docker/build-scratch.sh builds the same image without pulling any base image.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p llm-gateway-sidecar

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/llm-gateway-sidecar /usr/local/bin/llm-gateway-sidecar
COPY config/hosted-model-specs.json config/model-prices.json /etc/llm-gateway/catalog/
ENV LLM_GATEWAY_DATA_DIR=/var/lib/llm-gateway \
    LLM_GATEWAY_MODEL_SPECS=/etc/llm-gateway/catalog/hosted-model-specs.json \
    LLM_GATEWAY_MODEL_PRICES=/etc/llm-gateway/catalog/model-prices.json
RUN mkdir -p /var/lib/llm-gateway && chown 65532:65532 /var/lib/llm-gateway
USER 65532:65532
VOLUME /var/lib/llm-gateway
EXPOSE 8081 8082
ENTRYPOINT ["/usr/local/bin/llm-gateway-sidecar"]
CMD ["--listen", "0.0.0.0:8081"]
