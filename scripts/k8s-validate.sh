#!/usr/bin/env bash
# Renders the Kubernetes manifests of a sweep (scripts/k8s-render.sh, on
# tests/fixtures/sweep-tiny.toml) and validates them offline against the Kubernetes API schemas
# bundled in the `kubernetes-validate` wheel (PyPI), strictly (unknown fields are errors); then
# checks what the rendering must get right: one completion per cell, the completion index as
# the cell, the sweep file intact in the ConfigMap. Needs a Python venv (scripts/test.sh's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${MJPFL_VENV:-$HOME/.cache/mjpfl/venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check 'kubernetes-validate==1.37.0' pyyaml
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
scripts/k8s-render.sh tests/fixtures/sweep-tiny.toml "$out" mjpfl:test 2
k8s="${K8S_VERSION:-1.33.0}"
"$venv/bin/kubernetes-validate" --strict -k "$k8s" "$out/sweep-job.yaml" "$out/report-job.yaml"
"$venv/bin/python" - "$out" <<'PY'
import sys, tomllib, yaml
out = sys.argv[1]
docs = list(yaml.safe_load_all(open(f"{out}/sweep-job.yaml")))
kinds = {d["kind"]: d for d in docs}
assert set(kinds) == {"ConfigMap", "PersistentVolumeClaim", "Job"}, kinds.keys()
job = kinds["Job"]["spec"]
assert job["completionMode"] == "Indexed" and job["completions"] == 3 and job["parallelism"] == 2, job
args = job["template"]["spec"]["containers"][0]["args"]
assert args[args.index("--cell") + 1] == "$(JOB_COMPLETION_INDEX)", args
rendered = tomllib.loads(kinds["ConfigMap"]["data"]["sweep.toml"])
assert rendered == tomllib.load(open("tests/fixtures/sweep-tiny.toml", "rb")), "sweep file changed"
report = yaml.safe_load(open(f"{out}/report-job.yaml"))
assert report["spec"]["template"]["spec"]["containers"][0]["args"] == ["report", "/sweep"]
print(f"[k8s] manifests valid against Kubernetes {sys.argv[0] and ''}schemas: Indexed Job of 3 cells, report job")
PY
echo "[k8s] PASS (Kubernetes $k8s schemas, strict)"
