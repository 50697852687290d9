#!/usr/bin/env bash
# The committed CPU results, three bench runs (tiny GPT-2 models, 2 processes with gloo, fp32):
#  1. every backend that runs on CPU, with the HF Trainer and hand-loop baselines in the same bench
#     (baselines right after ddp, so the ratios compare runs taken minutes apart, not tens);
#  2. engine ddp / Trainer / hand loop again in 2 interleaved rounds, for the overhead ratios;
#  3. a wider model (59M params) with short runs for estimate-vs-measured memory: its model states
#     (0.6-1.2 GB per rank) dwarf the few hundred MB every process adds whatever the backend.
# Wall time: 15-35 min on 2 shared cores (process start-up dominates these short runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-.venv/bin/engine}
uptime
$ENGINE bench --gpus 0 --nproc 2 --precision fp32 --baselines '' --models tiny --seq 128 --micro-batch 4 --warmup 3 --steps 10 \
  --backends ddp,hand,trainer,deepspeed:zero0,deepspeed:zero1,deepspeed:zero2,deepspeed:zero3,deepspeed:zero2+offload,deepspeed:zero3+offload,colossal:torch_ddp,colossal:low_level_zero,colossal:zero2,colossal:gemini \
  --out benchmarks/results "$@"
uptime
$ENGINE bench --gpus 0 --nproc 2 --precision fp32 --baselines '' --models tiny --seq 128 --micro-batch 4 --warmup 3 --steps 10 \
  --backends ddp,hand,trainer --repeat 2 --out benchmarks/results/repeat "$@"
uptime
$ENGINE bench --gpus 0 --nproc 2 --precision fp32 --baselines '' --models tiny-wide --seq 64 --micro-batch 1 --warmup 1 --steps 2 \
  --backends ddp,deepspeed:zero0,deepspeed:zero1,deepspeed:zero2,deepspeed:zero3,deepspeed:zero3+offload,colossal:zero2,hand \
  --out benchmarks/results/memory "$@"
uptime
