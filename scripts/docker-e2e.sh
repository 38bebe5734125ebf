#!/usr/bin/env bash
# End-to-end test of the container federation (docker-compose.yml with docker/coordinator.toml):
#   1. builds the image (scripts/docker-local.sh: no registry needed) unless MJPFL_E2E_NO_BUILD=1;
#   2. `up`: coordinator, 4 clients and the adversary; times the first finished round;
#   3. `down` in the middle of the run, checks the run directory on the volume is consistent
#      (state.json, rounds.jsonl and checkpoints agree; nothing half-written);
#   4. `up` again: the coordinator resumes; waits for the final report and times it;
#   5. checks every round ran exactly once, the report holds accuracy and attack results, all
#      containers exited 0; then removes containers, network and volume.
# Security along the way: the coordinator serves mutual TLS with per-client credentials made by
# the `secrets` service; a plaintext client and a TLS client without a certificate are refused
# while the run is live, the operator's certificate with the Status token is answered, and the
# aggregated updates come from the pool's credential ids.
# Prints the figures (seconds from `up` to the first round and to the report). Exit 0 = pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

project="${MJPFL_E2E_PROJECT:-mjpfl-e2e}"
export MJPFL_IMAGE="${MJPFL_IMAGE:-mjpfl:latest}"
export MJPFL_PORT="${MJPFL_PORT:-50151}"
timeout_s="${MJPFL_E2E_TIMEOUT:-900}"
if docker compose version >/dev/null 2>&1; then compose=(docker compose -p "$project");
else compose=(docker-compose -p "$project"); fi
volume="${project}_runs"
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[docker-e2e] %s\n' "$*"; }
fail() { log "FAIL: $*"; "${compose[@]}" logs --tail 40 >&2 || true; exit 1; }
cleanup() { "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

# A file from the run directory on the volume (empty when absent).
on_volume() {
  docker run --rm --entrypoint sh -v "$volume:/runs:ro" "$MJPFL_IMAGE" -c "cat /runs/federation/$1 2>/dev/null || true"
}
rounds_done() { on_volume rounds.jsonl | grep -c '"round"' || true; }
total_rounds() { sed -n 's/^rounds *= *\([0-9]*\).*/\1/p' docker/coordinator.toml | head -1; }

# The run directory must be self-consistent: state.json names the last committed round, rounds.jsonl
# has exactly rounds 1..=that once each, and that round's checkpoint exists.
check_consistent() {
  local state rounds committed
  state="$(on_volume state.json)"
  committed="$(printf '%s' "$state" | sed -n 's/.*"completed_rounds": *\([0-9]*\).*/\1/p' | head -1)"
  committed="${committed:-0}"
  rounds="$(on_volume rounds.jsonl | sed -n 's/^{"round":\([0-9]*\).*/\1/p' | tr '\n' ' ')"
  local expected=""
  for ((r = 1; r <= committed; r++)); do expected+="$r "; done
  [[ "$rounds" == "$expected" ]] || fail "rounds.jsonl has rounds [$rounds], state.json says $committed"
  docker run --rm --entrypoint sh -v "$volume:/runs:ro" "$MJPFL_IMAGE" \
    -c "test -s /runs/federation/checkpoints/round-$(printf %04d "$committed").safetensors" \
    || fail "checkpoint of committed round $committed missing"
  log "run directory consistent: $committed round(s) committed"
}

if [[ "${MJPFL_E2E_NO_BUILD:-0}" != 1 ]]; then scripts/docker-local.sh; fi
cleanup
total="$(total_rounds)"

log "docker compose up (coordinator, 4 clients, adversary)"
t0=$(date +%s.%N)
"${compose[@]}" up -d >/dev/null
first=""
while :; do
  elapsed="$(since "$t0")"
  (( ${elapsed%.*} > timeout_s )) && fail "no round finished within ${timeout_s}s"
  n="$(rounds_done)"
  if [[ -z "$first" && "$n" -ge 1 ]]; then
    first="$elapsed"
    log "first round finished ${first}s after up"
    probe() { docker run --rm --network "${project}_default" -v "${project}_secrets:/secrets:ro" "$MJPFL_IMAGE" status "$@"; }
    if probe --coordinator http://coordinator:50051 >/dev/null 2>&1; then fail "a plaintext Status was answered"; fi
    if probe --coordinator https://coordinator:50051 --tls-ca /secrets/ca.pem >/dev/null 2>&1; then
      fail "a TLS client without a certificate was answered"
    fi
    if probe --coordinator https://coordinator:50051 --tls-ca /secrets/ca.pem --tls-cert /secrets/operator/cert.pem \
         --tls-key /secrets/operator/key.pem >/dev/null 2>&1; then fail "Status answered without its token"; fi
    answer="$(probe --coordinator https://coordinator:50051 --tls-ca /secrets/ca.pem --tls-cert /secrets/operator/cert.pem \
         --tls-key /secrets/operator/key.pem --status-token-file /secrets/status.token 2>&1)" \
      || fail "the operator's Status over mutual TLS failed: $answer"
    log "mutual TLS: plaintext, certificate-less and token-less Status refused; operator answered: $answer"
  fi
  [[ "$n" -ge 2 ]] && break
  sleep 1
done

log "docker compose down mid-run (after round $(rounds_done) of $total)"
td=$(date +%s.%N)
"${compose[@]}" down >/dev/null
log "down took $(since "$td")s"
check_consistent
before="$(rounds_done)"

log "docker compose up again: the coordinator resumes from round $before"
t1=$(date +%s.%N)
"${compose[@]}" up -d >/dev/null
while :; do
  elapsed="$(since "$t1")"
  (( ${elapsed%.*} > timeout_s )) && fail "no report within ${timeout_s}s"
  running="$("${compose[@]}" ps -q | xargs -r docker inspect -f '{{.State.Running}}' | grep -c true || true)"
  if [[ "$running" -eq 0 ]] && on_volume report.md | grep -q "honest-but-curious"; then break; fi
  sleep 2
done
second="$(since "$t1")"
log "report written ${second}s after the second up"

# Every container exited 0.
for id in $("${compose[@]}" ps -q); do
  code="$(docker inspect -f '{{.State.ExitCode}}' "$id")"
  name="$(docker inspect -f '{{.Name}}' "$id")"
  [[ "$code" == 0 ]] || fail "$name exited with $code"
done
check_consistent
[[ "$(rounds_done)" == "$total" ]] || fail "expected $total rounds, found $(rounds_done)"
report="$(on_volume report.md)"
grep -q "accuracy" <<<"$report" || fail "report.md has no accuracy"
grep -q "april" <<<"$report" || fail "report.md has no closed-form attack results"
[[ -n "$(on_volume attacks/rounds.jsonl)" ]] || fail "attacks/rounds.jsonl is empty"
ids="$(on_volume rounds.jsonl | grep -o '"client-[0-9]*"' | sort -u | tr '\n' ' ')"
[[ -n "$ids" ]] || fail "no credential ids among the aggregated updates"
log "aggregated updates came from the pool's credentials: $ids"
final_acc="$(on_volume rounds.jsonl | tail -1 | sed -n 's/.*"test":{[^}]*"accuracy":\([0-9.]*\).*/\1/p')"
log "PASS: $total rounds (resumed after down at round $before), final test accuracy ${final_acc:-?}"
log "figures: first round ${first}s after up; report ${second}s after the resuming up"
