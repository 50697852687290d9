#!/usr/bin/env bash
# Idempotent set-up: one virtualenv (.venv) holding every backend on the modern stack.
# torch is pinned first so no package can pull a multi-GB CUDA build on CPU machines.
# ColossalAI 0.5.0 pins torch<=2.5.1 and transformers==4.51.3; we install it --no-deps and
# bridge the gaps in backends/colossal/compat.py (see README "Why ColossalAI is installed --no-deps").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENGINE_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.engine-setup-v1"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
TORCH=${ENGINE_TORCH:-torch==2.13.0}
$PIP --upgrade pip wheel setuptools >/dev/null
$PIP "$TORCH"
$PIP -e ".[all,test,trackers]" "$TORCH"
# ColossalAI without its 2024-era pins; its imports need only these.
echo "setup: installing colossalai --no-deps; pip's warnings about its unmet pins below are expected (README)"
$PIP --no-deps "colossalai==0.5.0"
$PIP psutil peft einops galore_torch fabric "$TORCH"
touch "$STAMP"
echo "setup: $VENV ready"
