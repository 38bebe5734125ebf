#!/usr/bin/env bash
# Checks that the `tch` (LibTorch) feature still compiles and passes the model tests, where a
# PyTorch is installed. Usage: scripts/check-tch.sh [PYTHON]   (default: $MJPFL_PYTHON or python3)
# tch 0.22 expects torch 2.9.0; set LIBTORCH_BYPASS_VERSION_CHECK=1 for another version.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${1:-${MJPFL_PYTHON:-python3}}"
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "[check-tch] $py has no torch: pip install torch==2.9.0 (then rerun with that python)" >&2
  exit 2
fi
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LIBTORCH_USE_PYTORCH=1
export PATH="$(dirname "$("$py" -c 'import sys; print(sys.executable)')"):$PATH"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/tch}"
echo "[check-tch] torch $("$py" -c 'import torch; print(torch.__version__)') from $torch_lib"
cargo build --release --features tch
MJPFL_TEST_DEVICE=tch-cpu cargo test --release -p mjp --features tch --test model
echo "[check-tch] the tch build compiles and the model tests pass"
