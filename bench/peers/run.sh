#!/usr/bin/env bash
# mjpfl `simulate` against Flower 1.42 and pfl-research 0.6 on the same cross-device scale job
# (issue 16), back to back on this machine, then a table of seconds per round and the ratios.
#
#   bench/peers/run.sh                       # N = 100, 1000, 10000 (cohort 100 x 1 step of 8),
#                                            # then the cross-device round at N = 1000
#   SIZES="100" CROSS_DEVICE=0 bench/peers/run.sh
#
# Environment (all optional):
#   PEERS_VENV    venv for the peers (default ~/.cache/mjpfl/peers-venv; created on first use)
#   MJPFL_BIN     the mjpfl binary (default: $CARGO_TARGET_DIR/release/mjpfl, then
#                 target/release/mjpfl, then /work/target/release/mjpfl); none: mjpfl is skipped
#   MJPFL_ARGS    extra flags for `mjpfl simulate` (e.g. "--no-audit", "--train-concurrency 2")
#   SIZES         registered clients of the main job (default "100 1000 10000"; "" = none)
#   ROUNDS        rounds of every job (default 5)
#   FRAMEWORKS    which to run, in order (default "mjpfl flower pfl")
#   CROSS_DEVICE  1 (default): also the cross-device round, cohort 50 x 5 steps of batch 10
#   CROSS_N       its registered clients (default 1000)
#   PFL_THREADS   torch threads of the in-process pfl simulation (default 1, see README.md)
#   RUN_TIMEOUT   seconds one run may take before it is killed (default 1800)
#   OUT           results directory (default bench/peers/results/<time>)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${PEERS_VENV:-$HOME/.cache/mjpfl/peers-venv}
SIZES=${SIZES-100 1000 10000}
ROUNDS=${ROUNDS:-5}
FRAMEWORKS=${FRAMEWORKS:-mjpfl flower pfl}
CROSS_DEVICE=${CROSS_DEVICE:-1}
CROSS_N=${CROSS_N:-1000}
PFL_THREADS=${PFL_THREADS:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-1800}
OUT=${OUT:-$HERE/results/$(date +%Y%m%d-%H%M%S)}
MJPFL_ARGS=${MJPFL_ARGS:-}

# Pins: torch 2.9.0 is the reference of `mjpfl bench train-step`; the default PyPI wheel (with its
# CUDA packages) is used, the CPU-only index not being reachable here.
REQUIREMENTS=(torch==2.9.0 "flwr[simulation]==1.42.*" "pfl==0.6.*" numpy psutil)

setup_venv() {
    local stamp="$VENV/.mjpfl-peers-requirements"
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "${REQUIREMENTS[*]}" ]]; then
        return
    fi
    echo "== creating $VENV (${REQUIREMENTS[*]})"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install "${REQUIREMENTS[@]}"
    echo "${REQUIREMENTS[*]}" >"$stamp"
}

find_mjpfl() {
    if [[ -n "${MJPFL_BIN:-}" ]]; then
        echo "$MJPFL_BIN"
        return
    fi
    local c
    for c in ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/release/mjpfl"} "$REPO/target/release/mjpfl" \
        /work/target/release/mjpfl; do
        if [[ -x "$c" ]]; then
            echo "$c"
            return
        fi
    done
}

setup_venv
PY="$VENV/bin/python"
"$PY" -c 'import flwr, pfl, torch, ray; print("flwr", flwr.__version__, "| ray", ray.__version__, "| pfl", getattr(pfl, "__version__", "?"), "| torch", torch.__version__)'

MJPFL=$(find_mjpfl || true)
if [[ " $FRAMEWORKS " == *" mjpfl "* ]]; then
    if [[ -z "$MJPFL" || ! -x "$MJPFL" ]]; then
        echo "warning: no mjpfl binary (set MJPFL_BIN or build with cargo build --release); skipping mjpfl" >&2
        FRAMEWORKS=${FRAMEWORKS//mjpfl/}
    else
        echo "mjpfl: $MJPFL"
    fi
fi

mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
cd "$REPO" # mjpfl reads data/ relative to the working directory
echo "results: $OUT"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB; load $(cut -d' ' -f1-3 /proc/loadavg)"

# run_job NAME N K STEPS BATCH
run_job() {
    local job=$1 n=$2 k=$3 steps=$4 batch=$5 fw tag
    local common=(--clients "$n" --per-round "$k" --rounds "$ROUNDS" --local-steps "$steps"
        --batch-size "$batch")
    for fw in $FRAMEWORKS; do
        tag="$job-n$n-$fw"
        echo
        echo "== $fw: $job, N=$n, cohort $k, $ROUNDS rounds, $steps step(s) of batch $batch (load $(cut -d' ' -f1 /proc/loadavg))"
        case $fw in
        mjpfl)
            # shellcheck disable=SC2086  # MJPFL_ARGS is a list of flags
            if timeout "$RUN_TIMEOUT" "$PY" "$HERE/measure.py" --out "$OUT/$tag.measure.json" -- \
                "$MJPFL" simulate --config "$HERE/mjpfl-scale.toml" "${common[@]}" \
                --min-fit "$k" --no-adversary --pe learned --out "$OUT/$tag.run" $MJPFL_ARGS \
                2>&1 | tee "$OUT/$tag.log"; then
                "$PY" "$HERE/report.py" mjpfl "$OUT/$tag.run" "$OUT/$tag.measure.json" --job "$job" \
                    "${common[@]}" | tee -a "$RESULTS"
            else
                echo "error: mjpfl failed (log $OUT/$tag.log)" >&2
            fi
            ;;
        flower | pfl)
            local extra=()
            [[ $fw == pfl ]] && extra=(--threads "$PFL_THREADS")
            if timeout "$RUN_TIMEOUT" "$PY" "$HERE/measure.py" --out "$OUT/$tag.measure.json" -- \
                "$PY" "$HERE/${fw}_bench.py" "${common[@]}" "${extra[@]}" --label "$job" \
                2>&1 | tee "$OUT/$tag.log" | grep -E --line-buffered '^(round |total wall|\{|error|Traceback)'; then
                "$PY" "$HERE/report.py" peer "$OUT/$tag.log" "$OUT/$tag.measure.json" --job "$job" \
                    >>"$RESULTS"
            else
                echo "error: $fw failed (log $OUT/$tag.log)" >&2
            fi
            ;;
        *) echo "unknown framework $fw" >&2 ;;
        esac
    done
}

for n in $SIZES; do
    run_job scale "$n" 100 1 8
done
if [[ "$CROSS_DEVICE" == 1 ]]; then
    run_job cross-device "$CROSS_N" 50 5 10
fi

echo
"$PY" "$HERE/report.py" table "$RESULTS" | tee "$OUT/table.txt"
