#!/usr/bin/env bash
# The Slurm path of `mjpfl sweep`, for real (issue 15): starts a private single-node Slurm
# (Debian's slurm-wlm and munge; its own config, munge key, socket and spool under a temporary
# directory, so a system Slurm is left alone), submits tests/fixtures/sweep-tiny.toml as a job
# array with scripts/slurm/submit-sweep.sh, waits for the array and the report job, and checks
# that every cell finished and that the merged report names every setting.
#   scripts/slurm-e2e.sh            (MJPFL_BIN: the binary, default $CARGO_TARGET_DIR/release/mjpfl)
# Installs slurm-wlm and munge with apt where they are missing (root or sudo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
export MJPFL_BIN="${MJPFL_BIN:-$target/release/mjpfl}"
[ -x "$MJPFL_BIN" ] || { echo "slurm-e2e: no binary at $MJPFL_BIN (cargo build --release)" >&2; exit 1; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "[slurm-e2e] installing slurm-wlm and munge"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

work="$(mktemp -d /tmp/mjpfl-slurm.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
mkdir -p "$work"/{spool/ctld,spool/d,munge,log}
user="$(id -un)"
host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))

# munge: a fresh key and a private socket.
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$work/munge"; chmod 400 "$work/munge/munge.key"
munged --key-file="$work/munge/munge.key" --socket="$work/munge/munge.socket" \
  --pid-file="$work/munge/munged.pid" --log-file="$work/log/munged.log" \
  --seed-file="$work/munge/munged.seed" --force
sleep 1
pids+=("$(cat "$work/munge/munged.pid")")

export SLURM_CONF="$work/slurm.conf"
cat > "$SLURM_CONF" <<CONF
ClusterName=mjpfl-e2e
SlurmctldHost=$host
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$work/munge/munge.socket
CredType=cred/munge
SlurmctldPort=$((17000 + RANDOM % 1000))
SlurmdPort=$((18000 + RANDOM % 1000))
StateSaveLocation=$work/spool/ctld
SlurmdSpoolDir=$work/spool/d
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=e2e Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -D -f "$SLURM_CONF" >"$work/log/slurmctld.out" 2>&1 &
pids+=("$!")
slurmd -D -f "$SLURM_CONF" >"$work/log/slurmd.out" 2>&1 &
pids+=("$!")
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then break; fi
  sleep 1
done
if ! sinfo -h -o '%T' | grep -qE '^(idle|mixed|allocated)'; then
  echo "[slurm-e2e] FAIL: the node did not come up" >&2
  sinfo || true
  tail -n 30 "$work"/log/*.log "$work"/log/*.out >&2 || true
  exit 1
fi
echo "[slurm-e2e] single-node Slurm up on $host ($cpus CPUs): $(sinfo -h -o '%P %T %C')"

sweep_file=tests/fixtures/sweep-tiny.toml
out="$work/sweep"
cells=$("$MJPFL_BIN" sweep --config "$sweep_file" --out "$out" --dry-run | sed -n 's/^sweep .*: \([0-9][0-9]*\) cells$/\1/p')
started=$(date +%s)
submitted=$(scripts/slurm/submit-sweep.sh "$sweep_file" "$out" --cpus-per-task=1 --time=20)
echo "[slurm-e2e] $submitted"
report_job=$(echo "$submitted" | sed -n 's/.*report job \([0-9]*\).*/\1/p')
for _ in $(seq 900); do
  [ -z "$(squeue -h -u "$user" -o '%i')" ] && break
  sleep 1
done
wall=$(( $(date +%s) - started ))
if [ -n "$(squeue -h -u "$user" -o '%i')" ]; then
  echo "[slurm-e2e] FAIL: jobs still queued after 15 min" >&2
  squeue >&2
  exit 1
fi
fail=0
done_cells=$(find "$out/cells" -name DONE | wc -l)
if [ "$done_cells" -ne "$cells" ]; then
  echo "[slurm-e2e] FAIL: $done_cells of $cells cells finished" >&2
  fail=1
fi
if [ ! -s "$out/report.md" ]; then
  echo "[slurm-e2e] FAIL: no merged report (report job $report_job)" >&2
  fail=1
else
  for setting in "learned" "mjp 0.5" "dp z=1"; do
    grep -q "^| $setting |" "$out/report.md" || { echo "[slurm-e2e] FAIL: report lacks '$setting'" >&2; fail=1; }
  done
  grep -q "$cells cells finished" "$out/report.md" || { echo "[slurm-e2e] FAIL: report does not merge $cells cells" >&2; fail=1; }
fi
if [ "$fail" -ne 0 ]; then
  for f in "$out"/slurm-*.out; do echo "== $f"; tail -n 20 "$f"; done >&2
  exit 1
fi
echo "[slurm-e2e] PASS: $cells cells as array tasks + merged report in ${wall} s"
sed -n '/^## Privacy/,/^± /p' "$out/report.md"
