#!/usr/bin/env bash
# Sidecar tests: the API tests against SQLite, the browser test of the savings report
# (sidecar/report_test.sh), then the same API tests against a throwaway PostgreSQL
# server (Debian's packages, installed if missing) started on a free loopback port and always stopped
# by PID. Non-interactive (CI=true, no stdin). SIDECAR_SKIP_PG=1 skips the PostgreSQL pass.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

log "sidecar tests (SQLite)"
env -u DATABASE_URL timeout 900 cargo test -q -p llm-gateway-sidecar </dev/null

log "savings report in headless chromium"
timeout 600 "$(dirname "$0")/report_test.sh" </dev/null

if [ "${SIDECAR_SKIP_PG:-0}" = 1 ]; then
  log "SIDECAR_SKIP_PG=1: skipping the PostgreSQL pass"
  exit 0
fi

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(readlink -f "$(command -v initdb)")"; return 0
  fi
  return 1
}

PGBIN=$(pg_bin || true)
if [ -z "$PGBIN" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL is not installed and we are not root: install 'postgresql' or set SIDECAR_SKIP_PG=1" >&2
    exit 1
  fi
  log "installing PostgreSQL (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null
  apt-get install -y -qq postgresql </dev/null >/dev/null
  PGBIN=$(pg_bin)
fi

# initdb refuses to run as root: run the server as the `postgres` user then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

PGTMP=$(mktemp -d /tmp/llm-sidecar-pg.XXXXXX)
PGDATA=$PGTMP/data
PGPID=""
cleanup() {
  local rc=$?
  if [ -n "$PGPID" ] && kill -0 "$PGPID" 2>/dev/null; then
    log "stopping PostgreSQL (pid $PGPID)"
    kill -INT "$PGPID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$PGPID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$PGPID" 2>/dev/null || true
  fi
  rm -rf "$PGTMP"
  exit $rc
}
trap cleanup EXIT INT TERM
[ "$(id -u)" = 0 ] && chown postgres "$PGTMP"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
log "starting PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --no-sync >"$PGTMP/initdb.log" 2>&1 || {
  cat "$PGTMP/initdb.log" >&2; exit 1; }
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGTMP/server.log" -w -t 60 start \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDATA -c fsync=off -c max_connections=300" >/dev/null || {
  cat "$PGTMP/server.log" >&2; exit 1; }
PGPID=$(head -n1 "$PGDATA/postmaster.pid")

log "sidecar tests (PostgreSQL)"
# pg_dump / pg_restore of the same installation for the backup test.
PATH="$PGBIN:$PATH" DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres" \
  timeout 900 cargo test -q -p llm-gateway-sidecar </dev/null
