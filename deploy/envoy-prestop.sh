#!/bin/sh
# Kept for existing references: the preStop hook is deploy/docker/llm-gateway-drain (same arguments).
exec "$(dirname "$0")/docker/llm-gateway-drain" "$@"
