#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time, one after the other, and prints per
# target the seconds run, executions, corpus size and result. Exits non-zero when a target
# crashed (panic, abort, timeout, out of memory); the input is kept under fuzz/artifacts/<target>/
# and a minimised copy next to it (`<artifact>.min`).
#
#   scripts/fuzz.sh                      # every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh     # longer
#   FUZZ_TARGETS=config_loader scripts/fuzz.sh
#
# Environment (all optional):
#   FUZZ_SECONDS        seconds per target (default 60)
#   FUZZ_TARGETS        space-separated targets (default: all of them)
#   FUZZ_SANITIZER      address | none ... (default none, see fuzz/README.md)
#   FUZZ_CODEGEN_UNITS  codegen units of the fuzz build (default 16: the build is the slow part)
#   FUZZ_JOBS           extra libFuzzer processes per target, -fork style (default 0 = one)
#   FUZZ_TIMEOUT        seconds one input may take before it counts as a hang (default 25)
#   FUZZ_RSS_MB         memory limit of the fuzzing process (default 4096)
#   FUZZ_NO_BUILD=1     reuse the binaries already built
#   CARGO_TARGET_DIR    the build goes to ${CARGO_TARGET_DIR:-$HOME/.cache/mjpfl}/fuzz-target,
#                       the growing corpora and logs to .../fuzz-work: nothing in the clone
#                       changes but fuzz/artifacts/ and the generated seeds (both git-ignored).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR="$ROOT/fuzz"
SECONDS_EACH=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-none}
CGU=${FUZZ_CODEGEN_UNITS:-16}
TIMEOUT=${FUZZ_TIMEOUT:-25}
RSS_MB=${FUZZ_RSS_MB:-4096}
BASE="${CARGO_TARGET_DIR:-$HOME/.cache/mjpfl}"
TARGET_DIR="$BASE/fuzz-target"
WORK="$BASE/fuzz-work"
read -r -a TARGETS <<< "${FUZZ_TARGETS:-upload_decoder config_loader}"

# Largest input per target: an upload of the default model (~840 KB of f32) fits in 1 MiB; a
# configuration file in 64 KiB.
max_len() {
    case "$1" in
        upload_decoder) echo 1048576 ;;
        config_loader) echo 65536 ;;
        *) echo 65536 ;;
    esac
}

# Nightly if rustup has one; else stable, allowed the unstable flags cargo-fuzz passes.
if command -v rustup >/dev/null && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    CARGO=(cargo +nightly)
    TOOLCHAIN="nightly ($(rustup run nightly rustc --version))"
else
    CARGO=(cargo)
    export RUSTC_BOOTSTRAP=1
    TOOLCHAIN="stable with RUSTC_BOOTSTRAP=1 ($(rustc --version))"
fi
HOST=$(rustc -vV | sed -n 's/^host: //p')

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

BUILD_FLAGS=(--fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" --target "$HOST"
    --target-dir "$TARGET_DIR" --codegen-units "$CGU")
BIN_DIR="$TARGET_DIR/$HOST/release"
echo "== toolchain: $TOOLCHAIN; sanitizer: $SANITIZER; target dir: $TARGET_DIR"
if [[ "${FUZZ_NO_BUILD:-0}" != 1 ]]; then
    echo "== building fuzz targets (${TARGETS[*]})"
    build_start=$(date +%s)
    for t in "${TARGETS[@]}"; do
        (cd "$ROOT" && nice -n 10 "${CARGO[@]}" fuzz build "${BUILD_FLAGS[@]}" "$t")
    done
    echo "== built in $(( $(date +%s) - build_start )) s"
fi

# Seeds the code writes (a valid upload needs the real model), next to the committed ones.
for t in "${TARGETS[@]}"; do
    if ! out=$(MJPFL_FUZZ_WRITE_SEEDS="$FUZZ_DIR/corpus/$t" "$BIN_DIR/$t" 2>&1); then
        echo "$out" >&2
        echo "== writing the seeds of $t failed" >&2
        exit 2
    fi
done

mkdir -p "$WORK/logs"
declare -A SUMMARY
failed=0
for t in "${TARGETS[@]}"; do
    corpus="$WORK/corpus/$t"
    artifacts="$FUZZ_DIR/artifacts/$t"
    log="$WORK/logs/$t.log"
    mkdir -p "$corpus" "$artifacts"
    extra=()
    if [[ "${FUZZ_JOBS:-0}" -gt 0 ]]; then extra+=(-fork="$FUZZ_JOBS"); fi
    if [[ -f "$FUZZ_DIR/$t.dict" ]]; then extra+=(-dict="$FUZZ_DIR/$t.dict"); fi
    echo "== $t: ${SECONDS_EACH} s, max_len $(max_len "$t"), log $log"
    start=$(date +%s.%N)
    set +e
    # New inputs go to the first corpus directory (outside the clone); the seeds are read only.
    "$BIN_DIR/$t" "$corpus" "$FUZZ_DIR/corpus/$t" \
        -max_total_time="$SECONDS_EACH" -max_len="$(max_len "$t")" -timeout="$TIMEOUT" \
        -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$RSS_MB" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    ran=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.0f", e - s }')
    # (A crash while the corpus loads leaves no `corp:` line: the greps may find nothing.)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1 || true)
    [[ -n "$execs" ]] || execs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n1 || true)
    corp=$(grep -o 'corp: [0-9]*' "$log" | tail -n1 | awk '{print $2}' || true)
    [[ -n "$corp" ]] || corp=$(sed -n 's/.*seed corpus: files: \([0-9]*\).*/\1 (seed files; crashed while loading)/p' "$log" | tail -n1 || true)
    files=$(find "$corpus" -type f | wc -l)
    if [[ $rc -eq 0 ]]; then
        result="ok (no crash)"
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1 || true)
        result="CRASH (exit $rc)"
        if [[ -n "$artifact" && -f "$artifact" ]]; then
            result+=": $artifact"
            echo "-- $t crashed; panic:"
            grep -A4 -m1 "panicked at" "$log" || tail -n 20 "$log"
            echo "-- minimising $artifact"
            # (No -max_len here: libFuzzer's crash minimiser asserts when it is given.)
            "$BIN_DIR/$t" -minimize_crash=1 -max_total_time=60 \
                -exact_artifact_path="$artifact.min" "$artifact" >"$log.minimize" 2>&1 || true
            if [[ -f "$artifact.min" ]]; then
                result+=" (minimised: $artifact.min, $(wc -c <"$artifact.min") bytes)"
                echo "-- panic of the minimised input:"
                "$BIN_DIR/$t" "$artifact.min" 2>&1 | grep -A1 -m1 "panicked at" || true
            fi
        else
            tail -n 20 "$log"
        fi
    fi
    SUMMARY[$t]="seconds=$ran executions=${execs:-?} corpus=${corp:-?} (files in $corpus: $files) result=$result"
done

echo
echo "== fuzz summary (FUZZ_SECONDS=$SECONDS_EACH, sanitizer $SANITIZER)"
for t in "${TARGETS[@]}"; do
    echo "$t: ${SUMMARY[$t]}"
done
exit "$failed"
