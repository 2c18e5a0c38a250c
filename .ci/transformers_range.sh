#!/usr/bin/env bash
# The HF-facing tests (marker `hf`) under the oldest supported transformers, in a virtual
# environment that reuses the main one's packages (torch, triton, the project) and
# overrides transformers alone. The main run covers the newest release with the full suite.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST="${VSKIP_OLDEST_TRANSFORMERS:-5.17.0}"
VENV="${VSKIP_TF_VENV:-.ci/.venv-transformers-$OLDEST}"
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "transformers==$OLDEST"
"$VENV/bin/python" -c "import transformers; assert transformers.__version__ == '$OLDEST', transformers.__version__"
"$VENV/bin/python" -m pytest python_tests -m hf -q -p no:cacheprovider
