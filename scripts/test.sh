#!/usr/bin/env bash
# The README's test command: every test of the workspace, none skipped, built in the release
# profile so that it reuses what `cargo run --release` (the README's first command) compiled.
# The protocol-client tests need a Python with examples/python-client/requirements.txt: this
# script makes one in a venv ($MJPFL_VENV, default ~/.cache/mjpfl/venv) unless MJPFL_PYTHON
# already names one. Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${MJPFL_PYTHON:-}" ]; then
  venv="${MJPFL_VENV:-$HOME/.cache/mjpfl/venv}"
  req=examples/python-client/requirements.txt
  stamp="$venv/.mjpfl-requirements"
  if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv"; then
      echo "scripts/test.sh: python3 cannot make a venv (Debian/Ubuntu: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  if ! cmp -s "$req" "$stamp" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
  fi
  export MJPFL_PYTHON="$venv/bin/python"
fi

exec cargo test --workspace --release "$@"
