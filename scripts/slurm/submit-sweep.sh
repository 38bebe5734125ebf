#!/usr/bin/env bash
# Submits an mjpfl sweep to Slurm: one array task per cell (scripts/slurm/sweep-array.sbatch),
# then a job that merges the cells into SWEEP_DIR/report.md once every task has succeeded.
#   scripts/slurm/submit-sweep.sh SWEEP_FILE SWEEP_DIR [extra sbatch options...]
# Prints the array job id and the report job id. Finished cells are skipped when resubmitted.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
sweep_file="${1:?usage: submit-sweep.sh SWEEP_FILE SWEEP_DIR [sbatch options]}"
sweep_dir="${2:?usage: submit-sweep.sh SWEEP_FILE SWEEP_DIR [sbatch options]}"
shift 2
bin="${MJPFL_BIN:-mjpfl}"
cells=$("$bin" sweep --config "$sweep_file" --out "$sweep_dir" --dry-run | sed -n 's/^sweep .*: \([0-9][0-9]*\) cells$/\1/p')
if [ -z "$cells" ] || [ "$cells" -eq 0 ]; then
  echo "submit-sweep: $sweep_file has no cells" >&2
  exit 1
fi
mkdir -p "$sweep_dir"
array=$(sbatch --parsable --array="0-$((cells - 1))" --chdir="$PWD" \
  --output="$sweep_dir/slurm-%A_%a.out" "$@" "$here/sweep-array.sbatch" "$sweep_file" "$sweep_dir")
array="${array%%;*}"
report=$(sbatch --parsable --dependency="afterok:$array" --chdir="$PWD" --job-name=mjpfl-report \
  --output="$sweep_dir/slurm-report-%j.out" "$@" --wrap "'$bin' report '$sweep_dir'")
report="${report%%;*}"
echo "array job $array ($cells cells), report job $report"
