#!/usr/bin/env bash
# Runs THERE (the bare, offline GPU machine), from the repository root:
#     bash benchmarks/gpu/run.sh headline         # the first call: the headline figures (~7 min)
#     bash benchmarks/gpu/run.sh next             # later calls: the first part not yet in benchmarks/results/<device>/
#     bash benchmarks/gpu/run.sh PART [PART ...] [--cpu] [driver options]
#     bash benchmarks/gpu/run.sh plan [PART|next --slug SLUG]   # here too: every run, its estimated time, the total
# PART: headline | smoke-bf16 | smoke-fp16 | matrix-xl-1 | matrix-xl-2 | largest-neo | largest-gptj |
#       offload | gemini | matrix-gpt2 | largest-gptj-z2 | estimate; groups smoke, matrix, largest, all
#       (README.md here)
# 1. installs the wheels fetch_wheels.sh brought (benchmarks/gpu/wheels, carried by the device
#    tool: carry ["benchmarks/gpu/wheels"]) with --no-index --no-deps into /tmp/engine-gpu-site,
#    which goes on PYTHONPATH after the repository (the engine itself runs from the checkout);
# 2. runs the part(s) with benchmarks/gpu/driver.py; results in ${OUT:-benchmarks/results}/<device>/,
#    each run's row written the moment it finishes. The driver stops starting runs ENGINE_GPU_BUDGET_S
#    (450) seconds after this script started, so one call ends inside 8 minutes.
# `plan`, --dry-run and --cpu install nothing (--cpu: use an environment that already has the
# engine's dependencies, e.g. PYTHON=.venv/bin/python).
# Exit code: the driver's (non-zero when any check failed or any run was skipped); the results
# are written either way.
set -uo pipefail
T0=$(date +%s.%N)
cd "$(dirname "$0")/../.."
REPO=$(pwd)
PY=${PYTHON:-python3}
SITE=${ENGINE_GPU_SITE:-/tmp/engine-gpu-site}
WHEELS=benchmarks/gpu/wheels

install=1
for arg in "$@"; do
  case "$arg" in plan|--dry-run|--cpu|-h|--help) install=0 ;; esac
done

export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/engine/torch_extensions}
# the image's CUDA toolkit for the JIT-built ops (DeepSpeed CPU Adam, ColossalAI kernels)
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
# JIT builds for this GPU only (sm_90 on H100/H200) instead of every arch torch knows
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  [ -n "$cap" ] && export TORCH_CUDA_ARCH_LIST=$cap
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if [ "$install" = 1 ]; then
  if ! ls $WHEELS/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in $WHEELS: run benchmarks/gpu/fetch_wheels.sh where PyPI is reachable, and carry" \
         "benchmarks/gpu/wheels (device tool: carry [\"benchmarks/gpu/wheels\"])" >&2
    exit 2
  fi
  # typing_extensions only when the image's is older than pydantic's floor: otherwise the
  # carried copy would shadow a newer one for everything else in the process
  skip_te=$("$PY" - <<'PYEOF'
from importlib import metadata
try:
    v = tuple(int(x) for x in metadata.version("typing_extensions").split(".")[:2])
    print("skip" if v >= (4, 16) else "")
except Exception:
    print("")
PYEOF
)
  wheels=$(ls $WHEELS/*.whl | { if [ "$skip_te" = skip ]; then grep -v '/typing_extensions-'; else cat; fi; })
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels \
    || { echo "error: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(echo "$wheels" | wc -w) wheels into $SITE in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.0f", b - a}') s"
  # fail in seconds, with the cause, rather than in the middle of a part
  DS_ACCELERATOR=cuda "$PY" -c "
import deepspeed, colossalai, datasets
from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin
import launch.cli
print('imports ok: deepspeed', deepspeed.__version__, '| colossalai', colossalai.__version__, '| datasets', datasets.__version__)
" 2>&1 | grep -v -i warn || { echo "error: the engine's dependencies do not import (above)" >&2; exit 2; }
  # the driver records this as the call's first row, and counts its time budget from T0
  export ENGINE_GPU_INSTALL_S=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export ENGINE_GPU_T0=$T0

exec "$PY" benchmarks/gpu/driver.py "$@"
