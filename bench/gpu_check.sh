#!/usr/bin/env bash
# One command for a GPU machine that has torch, triton and transformers but no package index:
#     bash bench/gpu_check.sh --out "$OUT"            # about 9 minutes; --budget SECONDS to change
#     bash bench/gpu_check.sh --smoke --out /tmp/gc   # the same steps rehearsed on CPU, tiny shapes
# On a copy of the tree without .git, name the commit for the results:
#     VSKIP_GIT_COMMIT=<commit hash> bash bench/gpu_check.sh --out "$OUT"
# Installs the checkout (pip install --no-deps --no-build-isolation -e .), then runs the
# steps of bench/gpu_check.py in priority order, each with its own time cap; see that file.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PY" bench/gpu_check.py --python "$PY" "$@"
