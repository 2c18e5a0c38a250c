#!/usr/bin/env bash
# Lint, format and type checks configured in pyproject.toml (ruff: lint rules and format; mypy: vskip_kernels/,
# the vLLM integration included: vllm's own classes are Any where it is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q ruff mypy
ruff check .
ruff format --check .
mypy
