#!/usr/bin/env python3
"""Where the Envoy CPU per request goes, per variant: one short side-by-side bench run (bench.py) while
`perf record` samples the CPU the Envoy under test is pinned to. Samples are split by the thread's
process (which variant) and by where the code lives: the `envoy` binary (Envoy itself, V8's runtime and
the host calls), `[JIT]` (V8-compiled wasm: the filter's own code), the kernel and libc. Each share is
multiplied by the variant's measured Envoy CPU per request (mean of the header-path and body-rewrite
throughput cases), so the figures are µs per request. Sampling slows Envoy a little, so the totals run
above the plain bench's; compare variants within one run.

    python3 bench/perf_attribution.py            # about 90 s; needs perf and root (or perf_event_paranoid <= 0)

Not part of the timed tests (it needs perf and a quiet machine)."""
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["plain", "empty", "floor", "gateway-pinned", "gateway-lean"]


def envoy_threads():
    """tid -> variant, for every running Envoy whose config file names a variant."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        if not args or not args[0].endswith(b"envoy"):
            continue
        cfg = next((a.decode() for a in args if a.endswith(b".yaml")), "")
        variant = os.path.basename(cfg)[:-5]
        if variant in VARIANTS:
            for t in tids:
                out[int(t)] = variant
    return out


def dso_class(dso):
    if dso.startswith("[JIT]"):
        return "wasm (JIT)"
    if dso == "envoy":
        return "envoy binary"
    if dso.startswith("[kernel"):
        return "kernel"
    return "libc/vdso/other"


def main():
    work = tempfile.mkdtemp(prefix="perfatt-")
    data = os.path.join(work, "perf.data")
    bench = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "bench.py"), "--variants", ",".join(VARIANTS), "--rounds", "1",
         "--duration", "8", "--c1-duration", "1", "--ttfb-requests", "10", "--initial-warmup", "2",
         "--warmup", "1", "--no-doc"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    perf = subprocess.Popen(["perf", "record", "-q", "-C", "1", "-F", "999", "-o", data],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    threads = {}
    deadline = time.time() + 600
    while bench.poll() is None and time.time() < deadline:
        threads.update(envoy_threads())
        time.sleep(0.5)
    perf.terminate()
    perf.wait(timeout=30)
    log = bench.communicate(timeout=60)[0] if bench.poll() is not None else ""
    if bench.returncode != 0:
        bench.kill()
        sys.exit("bench.py failed:\n" + log[-2000:])
    per_req = collections.defaultdict(list)
    for m in re.finditer(r"(header_load|body_load)\s+(\S+)\s+rps=.*?envoy=\s*([\d.]+)us/req", log):
        per_req[m.group(2)].append(float(m.group(3)))
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "pid,dso", "-g", "none",
                             "--stdio"], capture_output=True, text=True, check=True).stdout
    share = collections.defaultdict(lambda: collections.defaultdict(float))
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\d+):\S.*?\s{2,}(\S.*?)\s*$", line)
        if m and int(m.group(2)) in threads:
            share[threads[int(m.group(2))]][dso_class(m.group(3))] += float(m.group(1))
    classes = ["wasm (JIT)", "envoy binary", "kernel", "libc/vdso/other"]
    print("| variant | Envoy CPU µs/req (under perf) | " + " | ".join(classes) + " |")
    print("|---|---:|" + "---:|" * len(classes))
    for v in VARIANTS:
        total = sum(share[v].values())
        if not total or not per_req[v]:
            continue
        us = sum(per_req[v]) / len(per_req[v])
        cells = [f"{us * share[v][c] / total:.1f}" for c in classes]
        print(f"| {v} | {us:.1f} | " + " | ".join(cells) + " |")
    print(f"\n(perf data and bench log kept in {work})")
    with open(os.path.join(work, "bench.log"), "w") as f:
        f.write(log)


if __name__ == "__main__":
    main()
