#!/usr/bin/env python3
"""Bounded load-and-fault test (issue 9, "make it stay fixed"): usage accounting survives a failing
control plane and an Envoy restart.

Real parts: Envoy (--concurrency 2) with the built filter, the real sidecar (SQLite) holding the key and
the provider, and a fake OpenAI-compatible upstream that reports usage. Load (JSON and SSE requests,
several client threads) runs through these phases:

  warm      the key is resolved and cached;
  killed    the sidecar is SIGKILLed (cached key keeps serving; records wait in the filter's queue);
  restarted the sidecar comes back (queued records drain);
  hung      the sidecar is SIGSTOPped: it accepts connections and never answers;
  resumed   SIGCONT;
  reloaded  Envoy hot restart (a new Envoy process with --restart-epoch 1 takes the listeners over; the
            old one drains and exits);
  after     the new Envoy alone.

Then it waits for the records to reach the sidecar and asserts that the records stored equal the
requests served (every 200 the clients got), minus the records the filter counted as dropped
(llmgw.usage.records_dropped), and that nothing was dropped while the outage stayed within the
documented bounds (docs/security.md). It also reports latency per phase: a hung control plane must
not add its timeout to every request.

  python3 scripts/fault_test.py --short        # ~20-30 s, part of ./build.sh test
  python3 scripts/fault_test.py                # longer: more requests per phase, longer outages
  python3 scripts/fault_test.py --requests 2000 --concurrency 16 --outage 20

Exit status 0 when every assertion holds. Servers are bounded in time and stopped by PID.
"""
import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from harness import (Envoy, FakeUpstream, SidecarProcess, chat_response, request, sse_chunks,  # noqa: E402
                     vm_failures)

ADMIN = "lgw_fault_admin_key_0123456789"
TOKEN = "fault-internal-token"
USAGE_JSON = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
USAGE_SSE = {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
CHAT = "/openai/v1/chat/completions"


def responder(rec):
    doc = json.loads(rec.body)
    if doc.get("stream"):
        usage = USAGE_SSE if (doc.get("stream_options") or {}).get("include_usage") else None
        return 200, {"content-type": "text/event-stream"}, [(0, c) for c in sse_chunks("m-up", ["a", "b"], usage)]
    return 200, {"content-type": "application/json"}, json.dumps(chat_response("m-up", usage=USAGE_JSON)).encode()


class Load:
    """Closed-loop load: `concurrency` threads, each sending requests (alternating JSON and SSE) until
    `n` have been sent in this phase. Keeps per-phase statuses and latencies."""

    def __init__(self, envoy_url, key):
        self.url, self.key = envoy_url, key
        self.lock = threading.Lock()
        self.phases = {}
        self.counter = 0

    def run(self, phase, n, concurrency):
        stats = self.phases.setdefault(phase, {"statuses": {}, "latencies": [], "streams": 0})
        todo = [n]

        def worker():
            while True:
                with self.lock:
                    if todo[0] <= 0:
                        return
                    todo[0] -= 1
                    self.counter += 1
                    i = self.counter
                stream = i % 2 == 1
                body = {"model": "m", "messages": [{"role": "user", "content": f"req {i}"}], "stream": stream}
                t0 = time.monotonic()
                try:
                    s, _, b = request("POST", self.url + CHAT, body,
                                      {"authorization": f"Bearer {self.key}", "content-type": "application/json",
                                       "x-llm-gateway-tags": f"phase={phase}"}, timeout=30)
                    if s == 200 and stream and not b.rstrip().endswith(b"data: [DONE]"):
                        s = "cut"
                except OSError as e:
                    s = type(e).__name__
                dt = time.monotonic() - t0
                with self.lock:
                    stats["statuses"][s] = stats["statuses"].get(s, 0) + 1
                    stats["latencies"].append(dt)
                    stats["streams"] += 1 if (stream and s == 200) else 0

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return stats

    def served(self):
        return sum(p["statuses"].get(200, 0) for p in self.phases.values())

    def report(self):
        for name, p in self.phases.items():
            lat = sorted(p["latencies"]) or [0]
            p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            print(f"  {name:10s} {sum(p['statuses'].values()):5d} requests  statuses {p['statuses']}  "
                  f"p50 {p50 * 1000:6.0f} ms  p99 {p99 * 1000:6.0f} ms")


def hot_restart(envoy):
    """Starts epoch 1 of the same Envoy (same --base-id): it takes over the listeners, the parent drains
    and exits. Returns the new process; the old one is waited for."""
    old = envoy.proc
    log = open(envoy.log_path + ".epoch1", "w")
    new = subprocess.Popen(
        ["envoy", "-c", envoy.config_path, "--base-id", str(envoy.port), "--restart-epoch", "1",
         "--concurrency", "2", "--drain-time-s", "1", "--parent-shutdown-time-s", "3",
         "--log-level", "warn", "--component-log-level", "wasm:info"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=envoy.env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if new.poll() is not None:
            raise RuntimeError(f"hot restart failed ({new.returncode}):\n" + open(envoy.log_path + ".epoch1").read())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/server_info", timeout=1) as r:
                info = json.loads(r.read())
            if info.get("command_line_options", {}).get("restart_epoch") == 1 and info.get("state") == "LIVE":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    envoy.proc = new
    envoy.epoch1_log = log
    try:
        old.wait(timeout=30)
    except subprocess.TimeoutExpired:
        old.kill()
        old.wait(timeout=10)
    return new


def stat(envoy, name):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats?filter={name}", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if k.strip() == name or k.strip().endswith("." + name):
            try:
                total += int(v)
            except ValueError:
                pass
    return total


def usage_totals(sc, key_id):
    s, doc = sc.api("GET", f"/v1/llm/usage?apiKeyId={key_id}")
    if s != 200:
        return None
    return doc["totals"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="CI mode: small phases (about 20-30 s in all)")
    ap.add_argument("--requests", type=int, help="requests per phase")
    ap.add_argument("--concurrency", type=int, help="client threads")
    ap.add_argument("--outage", type=float, help="seconds the sidecar stays killed / hung")
    args = ap.parse_args()
    per_phase = args.requests or (60 if args.short else 1000)
    conc = args.concurrency or (4 if args.short else 16)
    outage = args.outage if args.outage is not None else (3.0 if args.short else 15.0)
    ttl = 1  # the filter's cache TTL for resolved keys: outages outlast it, so stale serving is exercised
    timeout_ms = 1000

    up = FakeUpstream(responder)
    sc = SidecarProcess(ADMIN, TOKEN, ttl=ttl, env={"LLM_GATEWAY_ALLOWED_DESTINATIONS": "127.0.0.1"})
    envoy = None
    failures = []
    t_start = time.time()
    try:
        sc.start()
        s, doc = sc.api("POST", "/v1/llm/providers", {"providers": [
            {"name": "hosted", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1", "isHosted": True,
             "models": [{"name": "m", "upstreamName": "m-up"}]}]})
        assert s == 201, doc
        s, doc = sc.api("POST", "/v1/llm/api-keys", {"config_id": "default"})
        assert s == 201, doc
        key, key_id = doc["key"], doc["id"]
        gw = {"sidecar": {"token": TOKEN, "timeoutMs": timeout_ms, "staleSeconds": 3600}, "providers": [],
              "keys": []}
        envoy = Envoy(gw, sidecar_port=sc.port).start()
        load = Load(envoy.url, key)

        print(f"fault test: {per_phase} requests per phase, {conc} clients, outages of {outage:.0f} s")
        load.run("warm", per_phase, conc)

        sc.proc.send_signal(signal.SIGKILL)
        sc.proc.wait(timeout=10)
        time.sleep(ttl + 0.2)  # cached entries are stale now: served while the sidecar is down
        deadline = time.time() + outage
        while time.time() < deadline:
            load.run("killed", max(per_phase // 4, 4), conc)
        sc.start()
        load.run("restarted", per_phase, conc)

        sc.proc.send_signal(signal.SIGSTOP)
        time.sleep(ttl + 0.2)
        try:
            deadline = time.time() + outage
            while time.time() < deadline:
                load.run("hung", max(per_phase // 4, 4), conc)
        finally:
            sc.proc.send_signal(signal.SIGCONT)
        load.run("resumed", per_phase, conc)

        # Load runs through the whole hot restart: the old Envoy drains while the new one takes over.
        restarting = threading.Event()
        restarting.set()

        def reload_load():
            while restarting.is_set():
                load.run("reloaded", max(per_phase // 4, 4), conc)

        t = threading.Thread(target=reload_load, daemon=True)
        t.start()
        time.sleep(0.5)
        hot_restart(envoy)
        time.sleep(0.5)
        restarting.clear()
        t.join(120)
        load.run("after", per_phase, conc)

        served = load.served()
        # Records drain on the filter's timer; wait until they are all in (or the bound passes).
        deadline = time.time() + 40
        totals = None
        while time.time() < deadline:
            totals = usage_totals(sc, key_id)
            if totals and totals.get("requests", 0) >= served:
                break
            time.sleep(0.5)
        time.sleep(2)  # duplicates would show up now
        totals = usage_totals(sc, key_id) or {}
        records = totals.get("requests", 0)
        dropped = stat(envoy, "llmgw.usage.records_dropped")
        print(f"  served {served}, records {records}, dropped (counted by the filter) {dropped}, "
              f"in {time.time() - t_start:.0f} s")
        load.report()

        streams = sum(p["streams"] for p in load.phases.values())
        want_prompt = 5 * (served - streams) + 4 * streams
        if not dropped and totals.get("promptTokens") != want_prompt:
            failures.append(f"prompt tokens recorded {totals.get('promptTokens')} != served {want_prompt}")
        if records + dropped != served:
            failures.append(f"records ({records}) + dropped ({dropped}) != requests served ({served})")
        if dropped:
            failures.append(f"{dropped} records dropped although the outages stayed within the bounds")
        not_served = {ph: {k: v for k, v in p["statuses"].items() if k != 200}
                      for ph, p in load.phases.items() if ph != "reloaded"}
        not_served = {ph: v for ph, v in not_served.items() if v}
        if not_served:
            # A cached key keeps being served through any control-plane outage (stale bound: 1 h here).
            failures.append(f"requests not served outside the Envoy restart: {not_served}")
        hung = sorted(load.phases.get("hung", {}).get("latencies", [])) or [0]
        if hung[len(hung) // 2] * 1000 >= timeout_ms:
            failures.append(f"a hung sidecar adds its timeout to requests: p50 {hung[len(hung) // 2]:.2f} s")
        logs = envoy.logs()
        if os.path.exists(envoy.log_path + ".epoch1"):
            logs += open(envoy.log_path + ".epoch1", errors="replace").read()
        bad = vm_failures(logs)
        if bad:
            failures.append("wasm failures in Envoy's log:\n    " + "\n    ".join(bad[:5]))
    finally:
        if envoy:
            envoy.stop()
            if getattr(envoy, "epoch1_log", None):
                envoy.epoch1_log.close()
        if sc.proc and sc.proc.poll() is None:
            sc.proc.send_signal(signal.SIGCONT)
        sc.stop()
        up.stop()
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
