#!/usr/bin/env bash
# Sourced by scripts/attack-table.sh and scripts/attack-regimes.sh: `run <case> <mjpfl attack
# args...>` writes $out/<case>.txt (the printed table, then the exact command and its wall time),
# keeps pictures under $work/<case>, and skips a case already written (or not matching $only).
run() {
  local name="$1"; shift
  [[ "$name" =~ ${only:-.} ]] || return 0
  if [[ -s "$out/$name.txt" ]]; then echo "[$(basename "$0" .sh)] $name: done already"; return; fi
  echo "[$(basename "$0" .sh)] $name"
  local t0=$SECONDS
  "$bin" attack --out "$work/$name" "$@" 2>/dev/null | grep -v '^case-' > "$out/$name.txt.tmp"
  echo "command: mjpfl attack $* ($((SECONDS - t0)) s)" >> "$out/$name.txt.tmp"
  mv "$out/$name.txt.tmp" "$out/$name.txt"
  cat "$out/$name.txt"
}
