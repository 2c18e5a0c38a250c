#!/usr/bin/env bash
# Lint and type checks configured in pyproject.toml (ruff: lint rules; mypy: vskip_kernels/,
# the vLLM integration excluded: it is type-checked where vllm is importable).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q ruff mypy
ruff check .
mypy
