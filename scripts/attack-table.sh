#!/usr/bin/env bash
# The attack table of docs/results/README.md (issue: the honest-but-curious adversary): FedSGD,
# batch 1, real images, closed-form and optimisation attacks against each PE mode, model at
# initialisation and after a few federated rounds (checkpoints of the sweep's cells).
# Usage: scripts/attack-table.sh [OUT_DIR] [SWEEP_DIR]    (default docs/results/attacks, runs/sweep-fmnist)
# Each case writes OUT_DIR/<case>.txt (the printed table); pictures stay under runs/attack-table/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-docs/results/attacks}"
sweep="${2:-runs/sweep-fmnist}"
bin="${MJPFL_BIN:-target/release/mjpfl}"
work=runs/attack-table
mkdir -p "$out" "$work"

# shellcheck source=scripts/attack-run.sh
source scripts/attack-run.sh

cifar=(--images folder:data/attack-targets/cifar10 --count 20 --preset vit-tiny-32)
fmnist=(--images fashion-mnist --split test --count 20 --preset vit-micro-28)
closed=(--attacks april,april-mjp,mean-image)

# Closed form, model at initialisation.
run cifar10-tiny32-learned-init "${cifar[@]}" --pe learned --attacks april,april-mjp
run cifar10-tiny32-mjp0.5-init "${cifar[@]}" --pe mjp --ratio 0.5 --attacks april,april-mjp
run fmnist-micro28-learned-init "${fmnist[@]}" --pe learned "${closed[@]}"
run fmnist-micro28-mjp0.5-init "${fmnist[@]}" --pe mjp --ratio 0.5 "${closed[@]}"

# Closed form after 5 FedSGD rounds (the sweep's seed-1 checkpoints).
ck() { echo "$sweep/cells/$1/checkpoints/round-0005.safetensors"; }
if [[ -f "$(ck learned_seed=1)" ]]; then
  run fmnist-micro28-learned-round5 "${fmnist[@]}" --checkpoint "$(ck learned_seed=1)" "${closed[@]}"
fi
if [[ -f "$(ck mjp_0.5_seed=1)" ]]; then
  run fmnist-micro28-mjp0.5-round5 "${fmnist[@]}" --checkpoint "$(ck mjp_0.5_seed=1)" --ratio 0.5 "${closed[@]}"
fi

# Optimisation attacks on vit-micro-28 at initialisation.
run fmnist-micro28-learned-ig-dlg "${fmnist[@]}" --pe learned --attacks ig,dlg,mean-image --attack-iterations 500
run fmnist-micro28-learned-igpe --images fashion-mnist --split test --count 10 --preset vit-micro-28 \
  --pe learned --attacks ig-pe,mean-image --attack-iterations 1000
# The other PE modes: the sweep (docs/results/sweep-fmnist) attacks 16 updates of each with ig-pe
# (round 1 = initialisation); here the first 5 test images at initialisation.
for s in "mjp --ratio 0.1" "mjp --ratio 0.5" "naive-shuffle" "none"; do
  name="fmnist-micro28-$(echo "$s" | sed 's/ --ratio //')-igpe"
  # shellcheck disable=SC2086
  run "$name" --images fashion-mnist --split test --count 5 --preset vit-micro-28 --pe $s \
    --attacks ig-pe,mean-image --attack-iterations 500
done

# Label recovery with batch 8 (bias-gradient counting), 5 batches of real images.
run fmnist-micro28-learned-labels-b8 --images fashion-mnist --split test --count 40 --batch 8 \
  --preset vit-micro-28 --pe learned --attacks mean-image
