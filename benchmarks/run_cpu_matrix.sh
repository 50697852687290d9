#!/usr/bin/env bash
# The committed CPU matrix: a tiny GPT-2 (5.4M params), 2 processes (gloo), fp32, every backend
# that runs on CPU, with the HF Trainer and hand-loop baselines in the same bench run.
# The baselines sit right after ddp so the ratios compare runs taken minutes apart, not tens.
# Wall time: 10-20 min on 2 shared cores (process start-up dominates these short runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-.venv/bin/engine}
uptime | tee benchmarks/results/cpu-2proc/uptime-before.txt 2>/dev/null || true
$ENGINE bench --gpus 0 --nproc 2 --models tiny --seq 128 --micro-batch 4 --warmup 3 --steps 10 --precision fp32 \
  --backends ddp,hand,trainer,deepspeed:zero0,deepspeed:zero1,deepspeed:zero2,deepspeed:zero3,deepspeed:zero2+offload,deepspeed:zero3+offload,colossal:torch_ddp,colossal:low_level_zero,colossal:zero2,colossal:gemini \
  --baselines '' --out benchmarks/results "$@"
uptime | tee benchmarks/results/cpu-2proc/uptime-after.txt
