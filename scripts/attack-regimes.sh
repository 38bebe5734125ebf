#!/usr/bin/env bash
# The per-regime attack tables of docs/results/README.md (issue 14): FedSGD batches and FedAvg
# clients (the FedAvg-aware attack against the pseudo-gradient attack and the mean image), on
# real Fashion-MNIST test images with vit-micro-28 at initialisation, for each PE mode.
# Usage: scripts/attack-regimes.sh [OUT_DIR]        (default docs/results/attack-regimes)
#   ITER=300 (optimisation iterations; ITER50=200 for the 50-image clients), ONLY=<case regex>,
#   MJPFL_BIN=target/release/mjpfl
# Each case writes OUT_DIR/<case>.txt (the printed table and the exact command, with its wall
# time); pictures stay under runs/attack-regimes/. Cases already written are skipped.
# Every optimisation attack runs with total variation 5e-2 (batches need a stronger prior than
# the 1e-4 of the batch-1 table).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-docs/results/attack-regimes}"
bin="${MJPFL_BIN:-target/release/mjpfl}"
iter="${ITER:-300}"
only="${ONLY:-.}"
work=runs/attack-regimes
mkdir -p "$out" "$work"

# shellcheck source=scripts/attack-run.sh
source scripts/attack-run.sh

images=(--images fashion-mnist --split test --preset vit-micro-28 --attack-tv 5e-2)
fmnist=("${images[@]}" --attack-iterations "$iter")
pe_modes=("learned" "mjp --ratio 0.1" "mjp --ratio 0.25" "mjp --ratio 0.5" "naive-shuffle" "none")
tag() { echo "$1" | sed 's/ --ratio //'; }
attacks_for() { # the attacks that apply to a PE mode (MJP also gets the MJP-aware ones)
  case "$1" in
    mjp*) echo "april,april-mjp,april-mjp-ig,ig-pe,ig-pe-adaptive,mean-image" ;;
    none) echo "ig-pe,mean-image" ;;
    *) echo "april,ig-pe,mean-image" ;;
  esac
}

# FedAvg, plain local SGD at the cross-device learning rate (examples/cross-device.toml).
# Small clients: 8 images, batch 4, 2 epochs (4 local steps); 2 clients.
for pe in "learned" "mjp --ratio 0.1" "mjp --ratio 0.5"; do
  # shellcheck disable=SC2086
  run "fedavg-n8-b4-e2-$(tag "$pe")" "${fmnist[@]}" --count 16 --pe $pe --fedavg-epochs 2 \
    --client-size 8 --batch 4 --local-lr 0.05 --attacks fedavg-ig,ig-pe,mean-image
done
# Cross-device clients: 50 images, batch 10, 1 epoch (5 local steps); 1 client.
for pe in "learned" "mjp --ratio 0.1" "mjp --ratio 0.5"; do
  # shellcheck disable=SC2086
  run "fedavg-n50-b10-e1-$(tag "$pe")" "${images[@]}" --count 50 --pe $pe --fedavg-epochs 1 \
    --attack-iterations "${ITER50:-200}" \
    --client-size 50 --batch 10 --local-lr 0.05 --attacks fedavg-ig,ig-pe,mean-image
done

# Restarts fused (4 restarts matched and averaged: --attack-fuse-restarts) and a longer descent
# on the 8-image clients, and clients of 4 images (learned PE).
fuse=(--attack-restarts 4 --attack-fuse-restarts)
learned=(--images fashion-mnist --split test --preset vit-micro-28 --attack-tv 5e-2 --pe learned --local-lr 0.05)
run "fedavg-n8-b4-e2-learned-fuse4" "${learned[@]}" --count 16 --client-size 8 --batch 4 \
  --fedavg-epochs 2 --attack-iterations 300 "${fuse[@]}" --attacks fedavg-ig,mean-image
run "fedavg-n8-b4-e2-learned-it1000" "${learned[@]}" --count 16 --client-size 8 --batch 4 \
  --fedavg-epochs 2 --attack-iterations 1000 --attacks fedavg-ig,mean-image
run "fedavg-n4-b4-e3-learned-fuse4" "${learned[@]}" --attack-iterations 300 "${fuse[@]}" \
  --attacks fedavg-ig,ig-pe,mean-image --count 8 --client-size 4 --batch 4 --fedavg-epochs 3
run "fedavg-n4-b2-e2-learned-fuse4" "${learned[@]}" --attack-iterations 300 "${fuse[@]}" \
  --attacks fedavg-ig,ig-pe,mean-image --count 8 --client-size 4 --batch 2 --fedavg-epochs 2

# The frontier sweep's privacy axis with more clients (issue 15): the sweep attacks one client
# per cell on round 1, which is this case (8 images, batch 4, 2 epochs, lr 0.05, the model at
# initialisation); 8 clients per PE mode, scored against the mean image on the same images.
for pe in "learned" "mjp --ratio 0.1" "mjp --ratio 0.25"; do
  # shellcheck disable=SC2086
  run "fedavg-n8-b4-e2-$(tag "$pe")-8clients" "${fmnist[@]}" --count 64 --pe $pe \
    --fedavg-epochs 2 --client-size 8 --batch 4 --local-lr 0.05 --attacks fedavg-ig,mean-image
done
# ... and the frontier's DP and pruning points on the same 8 clients (learned PE).
n8=("${fmnist[@]}" --count 64 --pe learned --fedavg-epochs 2 --client-size 8 --batch 4 --local-lr 0.05)
run "fedavg-n8-b4-e2-learned-dp0.001-8clients" "${n8[@]}" --clip-norm 0.5 --noise-multiplier 0.001 \
  --attacks fedavg-ig,mean-image
run "fedavg-n8-b4-e2-learned-prune0.9-8clients" "${n8[@]}" --prune 0.9 --attacks fedavg-ig,mean-image
# The frontier's other points on the same 8 clients, labels refitted as the pipeline now does.
for pe in "mjp --ratio 0.5" "naive-shuffle" "none"; do
  # shellcheck disable=SC2086
  run "fedavg-n8-b4-e2-$(tag "$pe")-8clients" "${fmnist[@]}" --count 64 --pe $pe \
    --fedavg-epochs 2 --client-size 8 --batch 4 --local-lr 0.05 --attacks fedavg-ig,mean-image
done
run "fedavg-n8-b4-e2-learned-dp0.01-8clients" "${n8[@]}" --clip-norm 0.5 --noise-multiplier 0.01 \
  --attacks fedavg-ig,mean-image
run "fedavg-n8-b4-e2-learned-prune0.99-8clients" "${n8[@]}" --prune 0.99 --attacks fedavg-ig,mean-image
run "fedavg-n8-b4-e2-mjp0.25-dp0.001-8clients" "${fmnist[@]}" --count 64 --pe mjp --ratio 0.25 \
  --fedavg-epochs 2 --client-size 8 --batch 4 --local-lr 0.05 --clip-norm 0.5 \
  --noise-multiplier 0.001 --attacks fedavg-ig,mean-image
# A longer descent on the 8 clients (issue 14's 3 dB figure), and combined with fused restarts on
# the first 2 of them.
n8l=(--images fashion-mnist --split test --preset vit-micro-28 --attack-tv 5e-2 --count 64 \
  --pe learned --fedavg-epochs 2 --client-size 8 --batch 4 --local-lr 0.05)
run "fedavg-n8-b4-e2-learned-it1000-8clients" "${n8l[@]}" --attack-iterations 1000 \
  --attacks fedavg-ig,mean-image
run "fedavg-n8-b4-e2-learned-it1000-fuse4-2clients" "${learned[@]}" --count 16 --client-size 8 \
  --batch 4 --fedavg-epochs 2 --attack-iterations 1000 "${fuse[@]}" --attacks fedavg-ig,mean-image
run "fedavg-n8-b4-e2-learned-it1000-fuse4-8clients" "${n8l[@]}" --attack-iterations 1000 "${fuse[@]}" \
  --attacks fedavg-ig,mean-image
# The pseudo-gradient attack on the same 8 clients; 1000 iterations and 4 restarts fused with
# TV 2e-2 (the best TV of the screen on the first 4 of these clients,
# attack-regimes/fedavg-n8-b4-e2-learned-screen-4clients.txt; clients 5-8 are held out), for
# fedavg-ig and for the pseudo-gradient attack with the same budget; and 8 restarts fused
# (stopped after the first client: about 600 s per update on 2 cores).
run "fedavg-n8-b4-e2-learned-igpe-8clients" "${n8[@]}" --attacks ig-pe,mean-image
run "fedavg-n8-b4-e2-learned-it1000-fuse4-tv2e-2-8clients" --images fashion-mnist --split test \
  --preset vit-micro-28 --attack-tv 2e-2 --count 64 --pe learned --fedavg-epochs 2 --client-size 8 \
  --batch 4 --local-lr 0.05 --attack-iterations 1000 "${fuse[@]}" --attacks fedavg-ig,mean-image
run "fedavg-n8-b4-e2-learned-igpe-it1000-fuse4-tv2e-2-8clients" --images fashion-mnist --split test \
  --preset vit-micro-28 --attack-tv 2e-2 --count 64 --pe learned --fedavg-epochs 2 --client-size 8 \
  --batch 4 --local-lr 0.05 --attack-iterations 1000 "${fuse[@]}" --attacks ig-pe,mean-image
run "fedavg-n8-b4-e2-learned-it1000-fuse8-8clients" "${n8l[@]}" --attack-iterations 1000 \
  --attack-restarts 8 --attack-fuse-restarts --attacks fedavg-ig,mean-image
# Patch-owner refinement (--attack-patch-swaps) on the first 4 of those clients.
run "fedavg-n8-b4-e2-learned-swaps2-4clients" "${fmnist[@]}" --count 32 --pe learned \
  --fedavg-epochs 2 --client-size 8 --batch 4 --local-lr 0.05 --attack-patch-swaps 2 \
  --attacks fedavg-ig,mean-image

# CIFAR-10 (the 20 real images) on vit-tiny-32, FedSGD batch 1: the closed forms.
cifar=(--images folder:data/attack-targets/cifar10 --count 20 --preset vit-tiny-32)
for pe in "${pe_modes[@]}"; do
  # shellcheck disable=SC2086
  run "cifar-tiny32-b1-closed-$(tag "$pe")" "${cifar[@]}" --pe $pe --attacks april,april-mjp,mean-image
done
# ... and FedSGD batch 4 with the optimisation attacks (100 iterations: 0.93 s each on 2 cores).
cifar_opt=("${cifar[@]}" --attack-tv 5e-2 --attack-iterations "${ITER_CIFAR:-100}" --batch 4)
run "cifar-tiny32-b4-learned" "${cifar_opt[@]}" --pe learned --attacks ig-pe,mean-image
run "cifar-tiny32-b4-mjp0.5" "${cifar_opt[@]}" --pe mjp --ratio 0.5 --attacks ig-pe,ig-pe-adaptive,mean-image
run "cifar-tiny32-b4-none" "${cifar_opt[@]}" --pe none --attacks ig-pe,mean-image
run "cifar-tiny32-b4-mjp0.1" "${cifar_opt[@]}" --pe mjp --ratio 0.1 --attacks ig-pe,ig-pe-adaptive,mean-image
run "cifar-tiny32-b4-mjp0.25" "${cifar_opt[@]}" --pe mjp --ratio 0.25 --attacks ig-pe,ig-pe-adaptive,mean-image
run "cifar-tiny32-b4-naive-shuffle" "${cifar_opt[@]}" --pe naive-shuffle --attacks ig-pe,mean-image
run "cifar-tiny32-b1-none" "${cifar[@]}" --attack-tv 5e-2 --attack-iterations "${ITER_CIFAR:-100}" \
  --batch 1 --pe none --attacks ig-pe,mean-image

# FedSGD: one gradient per batch of B images (10 images at B = 1, 12 at B = 4, 16 at 8 and 16).
for b in 1 4 8 16; do
  count=16; [[ $b -eq 1 ]] && count=10; [[ $b -eq 4 ]] && count=12
  for pe in "${pe_modes[@]}"; do
    # shellcheck disable=SC2086
    run "fedsgd-b$b-$(tag "$pe")" "${fmnist[@]}" --count "$count" --batch "$b" --pe $pe \
      --attacks "$(attacks_for "$pe")"
  done
done

