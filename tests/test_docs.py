"""Issue 14: the commands of README.md and docs/*.md work. Shell blocks fenced as ```sh {test} run, in
order (README first, then docs/ by name), against a fresh `./build.sh run` stack (scripts/run_gateway.py with a
fresh run dir and free ports; `127.0.0.1:10000`, `127.0.0.1:8081`, `.run/` and the sidecar binary path are
substituted). Each must exit 0 and its output must match every `<!-- docs-test expect: REGEX -->` line that
follows the block (```sh {test wait}: a read-only block retried for up to 15 s until it matches, for data
that arrives asynchronously, such as batched usage). Every other shell block must be listed in NOT_RUN with the reason, so a new command
in the docs is a decision, not an accident."""
import glob
import os
import re
import subprocess
import time

import pytest

from harness import ROOT
from stack import RunStack, sidecar_bin

SHELLS = ("sh", "bash", "shell", "console")

# (file, first line of the block): why it is not run against a local stack.
NOT_RUN = {
    ("README.md", "./build.sh run     # build everything and run the gateway on"): "starts the stack itself",
    ("docs/api.md", "cargo run -p llm-gateway-sidecar -- --data-dir ./.run/sideca"): "starts a server",
    ("docs/api.md", 'curl -s -X POST $S/v1/llm/report/link -H "X-API-Key: $KEY" -'):
        "fragment (needs $S, $KEY); the quick start block runs the same call",
    ("docs/benchmarks.md", "bench/run.sh                  # builds the .wasm files, runs"): "minutes-long benchmark",
    ("docs/benchmarks.md", "bench/callgrind.sh            # builds main before this work"):
        "minutes-long benchmark (builds the base commit)",
    ("docs/configuration.md", "# A 50 USD monthly budget for one key, a soft 500 USD alert "):
        "fragment with placeholders ($SIDECAR, key ids); tests/test_budgets.py makes the same calls",
    ("docs/deploy.md", "./build.sh wasm"): "build step (tests/test_deploy_*.py cover deployment)",
    ("docs/deploy.md", "skopeo copy oci:target/oci:wasm docker://ghcr.io/YOUR_ORG/ll"): "pushes to a remote registry",
    ("docs/deploy.md", "docker build -f deploy/docker/sidecar.Dockerfile -t llm-gate"): "needs Docker",
    ("docs/deploy.md", "./build.sh wasm && cargo build --release -p llm-gateway-side"): "image build",
    ("docs/deploy.md", "cat > deploy/.env <<EOF"): "Docker compose setup",
    ("docs/deploy.md", "cp envoy/ecds/llm_gateway.yaml /tmp/new.yaml && $EDITOR /tmp"): "interactive ($EDITOR)",
    ("docs/deploy.md", "kubectl create namespace llm-gateway"): "Kubernetes",
    ("docs/deploy.md", "cat >> deploy/kustomize/overlays/sqlite/kustomization.yaml <"): "Kubernetes",
    ("docs/deploy.md", "kubectl apply -k deploy/kustomize/overlays/sqlite"): "Kubernetes",
    ("docs/deploy.md", "kubectl -n llm-gateway create secret generic llm-gateway --d"): "Kubernetes",
    ("docs/deploy.md", "helm install llm-gateway deploy/helm/llm-gateway -n llm-gate"): "Kubernetes (Helm)",
    ("docs/deploy.md", "kubectl -n llm-gateway edit configmap llm-gateway-filter"): "Kubernetes, interactive",
    ("docs/deploy.md", "python3 scripts/oci_image.py build && skopeo copy oci:target"): "pushes to a remote registry",
    ("docs/deploy.md", "kubectl create namespace llm-gateway      # + the Secrets ab"): "Kubernetes",
    ("docs/deploy.md", "kubectl create namespace llm-gateway && kubectl label namesp"): "Kubernetes (Istio)",
    ("docs/operations.md", "llm-gateway-sidecar backup --data-dir /var/lib/llm-gateway -"):
        "production paths; tested by the sidecar's migrations_backup_and_restore",
    ("docs/operations.md", 'pg_dump --format=custom --file=sidecar.dump "$DATABASE_URL"'): "PostgreSQL server",
    ("docs/security.md", "cargo install cargo-fuzz                      # once"): "fuzzing (nightly, long)",
    ("docs/security.md", "python3 scripts/fault_test.py --short     # ~20 s, ~1,400 re"):
        "its own fault-injection run (CI runs it separately)",
}


def doc_files():
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def shell_blocks():
    """(file, line, first line, text, runnable, expectations) of every shell block."""
    out = []
    for f in doc_files():
        lines = open(os.path.join(ROOT, f)).read().split("\n")
        i = 0
        while i < len(lines):
            m = re.match(r"^```(\w*)(.*)$", lines[i])
            if not m:
                i += 1
                continue
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            body = lines[i + 1:j]
            if m.group(1) in SHELLS:
                expects = []
                k = j + 1
                while k < len(lines):
                    e = re.match(r"^<!-- docs-test expect: (.*) -->$", lines[k])
                    if not e:
                        break
                    expects.append(e.group(1))
                    k += 1
                first = next((x.strip() for x in body if x.strip()), "")[:60]
                info = m.group(2).strip()
                out.append((f, i + 1, first, "\n".join(body), info in ("{test}", "{test wait}"), expects,
                            info == "{test wait}"))
            i = j + 1
    return out


def test_every_shell_block_is_run_or_listed():
    blocks = shell_blocks()
    unlisted = [(f, n, first) for f, n, first, _, run, _, _ in blocks if not run and (f, first) not in NOT_RUN]
    assert not unlisted, f"shell blocks neither marked ```sh {{test}} nor listed in NOT_RUN: {unlisted}"
    runnable = [b for b in blocks if b[4]]
    assert len(runnable) >= 3 and all(b[5] for b in runnable), "every run block states what it answers"


def test_docs_commands_against_a_fresh_stack(tmp_path):
    blocks = [b for b in shell_blocks() if b[4]]
    started = time.time()
    with RunStack(tmp_path / "run") as s:
        subs = [("127.0.0.1:10000", f"127.0.0.1:{s.ports['gateway']}"),
                ("127.0.0.1:8081", f"127.0.0.1:{s.ports['sidecar']}"),
                ("target/release/llm-gateway-sidecar", sidecar_bin()),
                (".run/", s.run_dir + "/")]
        for f, line, _, text, _, expects, wait in blocks:
            for a, b in subs:
                text = text.replace(a, b)
            deadline = time.time() + (15 if wait else 0)
            while True:
                r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=ROOT, capture_output=True,
                                   text=True, timeout=30)
                missing = [e for e in expects if not re.search(e, r.stdout, re.M)]
                if r.returncode == 0 and not missing or time.time() > deadline:
                    break
                time.sleep(0.5)
            where = f"{f}:{line}"
            assert r.returncode == 0, f"{where} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
            assert not missing, f"{where}: output does not match {missing}:\n{r.stdout}"
    assert time.time() - started < 60, "the docs test must stay within 60 s"
