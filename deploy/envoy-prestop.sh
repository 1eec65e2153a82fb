#!/bin/sh
# preStop hook of the gateway's Envoy container (also what `./build.sh run` and the tests do before
# stopping Envoy). Envoy calls the filter's on_done on SIGTERM but exits without waiting for it, so the
# usage records still queued in the filter VMs must be handed to the sidecar BEFORE SIGTERM:
#   1. fail health checks (load balancers / kube-proxy stop sending new requests),
#   2. drain the listeners gracefully (in-flight requests finish; no new connections),
#   3. wait until the filter reports no buffered usage record (gauge llmgw.usage.records_buffered,
#      summed over worker VMs) — bounded by PRESTOP_MAX_WAIT seconds (keep it below the pod's
#      terminationGracePeriodSeconds).
# Usage: envoy-prestop.sh [admin address, default 127.0.0.1:9901]
ADMIN=${1:-${ENVOY_ADMIN:-127.0.0.1:9901}}
MAX_WAIT=${PRESTOP_MAX_WAIT:-20}
post() { curl -fsS -X POST "http://$ADMIN$1" >/dev/null 2>&1 || wget -q -O /dev/null --post-data= "http://$ADMIN$1" 2>/dev/null; }
get() { curl -fsS "http://$ADMIN$1" 2>/dev/null || wget -q -O - "http://$ADMIN$1" 2>/dev/null; }
post /healthcheck/fail
post "/drain_listeners?graceful&inboundonly"
i=0
while [ "$i" -lt $((MAX_WAIT * 5)) ]; do
  # Sum this gauge over every line (one per filter chain / VM group that defined it).
  left=$(get "/stats?filter=llmgw\.usage\.records_buffered" | awk -F': ' '{s += $2} END {print s + 0}')
  [ "${left:-0}" -le 0 ] && [ "$i" -ge 10 ] && exit 0
  sleep 0.2
  i=$((i + 1))
done
echo "envoy-prestop: usage records still buffered after ${MAX_WAIT}s" >&2
exit 0
