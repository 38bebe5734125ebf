#!/usr/bin/env bash
# The centralised-training table of docs/results/README.md (issue: the MJP-ViT model): vit-micro-28
# on Fashion-MNIST with each PE mode, the same recipe (5 epochs, batch 128, AdamW 2e-3 cosine;
# MJP/naive-shuffle: jigsaw probability 0.5, MJP ratio 0.1 with nonlinear DAL lambda 0.01).
# Run it alone on the machine: the wall times are the figures.
# Usage: scripts/centralised.sh [OUT_DIR] [PE...]   (default docs/results/centralised, all four)
# Each mode writes OUT_DIR/<pe>.txt (per-epoch lines, summary, /usr/bin/time -v); the run
# directories (checkpoints, epochs.jsonl) stay under runs/centralised/<pe>. A mode whose .txt
# exists is skipped, so an interrupted table resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-docs/results/centralised}"
shift || true
modes=("$@")
[[ ${#modes[@]} -gt 0 ]] || modes=(mjp learned none naive-shuffle)
bin="${MJPFL_BIN:-target/release/mjpfl}"
mkdir -p "$out" runs/centralised

for pe in "${modes[@]}"; do
  if [[ -s "$out/$pe.txt" ]]; then echo "[centralised] $pe: done already"; continue; fi
  echo "[centralised] $pe"
  args=(train --preset vit-micro-28 --pe "$pe" --ratio 0.1 --epochs 5 --batch-size 128 --lr 2e-3
        --seed 0 --out "runs/centralised/$pe")
  rm -rf "runs/centralised/$pe"
  {
    echo "command: mjpfl ${args[*]}"
    /usr/bin/time -v "$bin" "${args[@]}" 2>&1 | grep -v -E '^\s+(Average|Major|Minor|Voluntary|Involuntary|Swaps|File system|Socket|Signals|Page size|Exit status)'
  } > "$out/$pe.txt.tmp"
  mv "$out/$pe.txt.tmp" "$out/$pe.txt"
  grep -E '^epoch|^done|Elapsed' "$out/$pe.txt"
done
