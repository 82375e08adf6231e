#!/usr/bin/env bash
# Build the wheel users get (the tunnel core compiled with mypyc, see hatch_build.py)
# and unpack it into build/compiled, to run the tests or the benchmarks against it:
#
#   tools/build_compiled.sh
#   PYTHONPATH=$PWD/build/compiled .venv/bin/pytest     # absolute: children run elsewhere
#   PYTHONPATH=$PWD/build/compiled .venv/bin/python benchmarks/bench_http.py
#
# (not `python -m pytest`: -m puts ./, the source tree's pure core, first)
#
# The editable install in .venv stays pure Python, so edits take effect at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
rm -rf build/compiled build/wheel
OVERLAY_HTTPX_COMPILE=require "$PYTHON" -m pip wheel -q --no-deps -w build/wheel .
"$PYTHON" -m pip install -q --no-deps --target build/compiled build/wheel/*.whl
"$PYTHON" - <<'PY'
import sys
sys.path.insert(0, "build/compiled")
from overlay_httpx._protocol import COMPILED
if not COMPILED:
    sys.exit("build/compiled: the tunnel core is not compiled")
print("build/compiled: overlay_httpx with the compiled tunnel core")
PY
