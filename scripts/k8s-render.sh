#!/usr/bin/env bash
# Renders deploy/k8s/ for one sweep file: the Indexed Job gets one completion per cell (counted
# by `mjpfl sweep --dry-run`), the sweep file goes into a ConfigMap, IMAGE is the container
# image (docker build -t ... .). Writes OUT_DIR/sweep-job.yaml and OUT_DIR/report-job.yaml.
#   scripts/k8s-render.sh SWEEP_FILE OUT_DIR [IMAGE] [PARALLELISM]
# then: kubectl apply -f OUT_DIR/sweep-job.yaml
#       kubectl wait --for=condition=complete --timeout=24h job/mjpfl-sweep
#       kubectl apply -f OUT_DIR/report-job.yaml
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sweep_file="${1:?usage: k8s-render.sh SWEEP_FILE OUT_DIR [IMAGE] [PARALLELISM]}"
out="${2:?usage: k8s-render.sh SWEEP_FILE OUT_DIR [IMAGE] [PARALLELISM]}"
image="${3:-mjpfl:latest}"
bin="${MJPFL_BIN:-${CARGO_TARGET_DIR:-target}/release/mjpfl}"
cells=$("$bin" sweep --config "$sweep_file" --out /nonexistent --dry-run | sed -n 's/^sweep .*: \([0-9][0-9]*\) cells$/\1/p')
[ -n "$cells" ] && [ "$cells" -gt 0 ] || { echo "k8s-render: $sweep_file has no cells" >&2; exit 1; }
parallelism="${4:-$cells}"
mkdir -p "$out"
indented=$(sed 's/^/    /' "$sweep_file")
SWEEP_TEXT="$indented" awk -v cells="$cells" -v par="$parallelism" -v image="$image" '
  /^__SWEEP_FILE__$/ { print ENVIRON["SWEEP_TEXT"]; next }
  { gsub(/__CELLS__/, cells); gsub(/__PARALLELISM__/, par); gsub(/__IMAGE__/, image); print }
' deploy/k8s/sweep-job.yaml > "$out/sweep-job.yaml"
sed "s|__IMAGE__|$image|g" deploy/k8s/report-job.yaml > "$out/report-job.yaml"
echo "rendered $cells cells (parallelism $parallelism, image $image) into $out"
