#!/usr/bin/env python3
"""Proves the engine's GPU path on one GPU, through the engine's CLI only, one part per device call.

Started by benchmarks/gpu/run.sh (which installs the carried wheels first); see README.md here.

    python benchmarks/gpu/driver.py PART [PART ...] [--dry-run] [--cpu] [--out DIR] [--budget-s S]
    python benchmarks/gpu/driver.py next            # the first part whose results are not in the tree yet
    python benchmarks/gpu/driver.py plan [PART]     # every run with its estimated time; no GPU needed

PART: headline, smoke-bf16, smoke-fp16, matrix-xl-1, matrix-xl-2, largest-neo, largest-gptj, offload,
gemini, matrix-gpt2, largest-gptj-z2 (NEXT_ORDER), estimate; groups: smoke, matrix, largest, all.

Every training run is an `engine launch` or `engine bench` subprocess (python -m launch.cli) and
every figure is read from run directories (metrics.jsonl, model/) or the bench's result JSONs, so
this script does not depend on engine internals (the bench harness is moving, the backends are
being refactored). Results: OUT/<device-slug>/<part>.jsonl (one row per finished run, appended the
moment it finishes), <part>.md (rewritten after every row), and at the part's end <part>.json,
<part>.png, <part>-bench.tar.gz (the bench's own JSONs) and RESULTS.md: at most 6 files per part,
since the device tool brings back 8.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENGINE = [sys.executable, "-m", "launch.cli"]

# ------------------------------------------------------------------------------------------------
# Tolerances (stated in README.md and in every result JSON)
# ------------------------------------------------------------------------------------------------
# Cross-backend: max over logged steps of |loss - ddp_loss| / ddp_loss, same precision, same seed,
# data and model init, dropout off. The backends do mixed precision differently: engine DDP and
# colossal torch_ddp run torch.autocast over fp32 weights; DeepSpeed and ColossalAI's ZeRO/Gemini
# keep 16-bit weights with fp32 master copies, so every matmul sees differently rounded weights.
# bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%), fp16 11 bits (2^-12 = 0.024%); the
# first-step losses then differ by ~0.1-0.5% (bf16), and 20 Adam steps on differently rounded
# weights let the trajectories drift a little further. 2% (bf16) / 1% (fp16) is ~10x one rounding
# step yet far below what a real bug does on this job: a missing or doubled optimizer step, wrong
# lr schedule, gradients not unscaled (fp16), or frozen parameters change the loss at step 20 by
# 5-30% (it falls from ln(vocab) ~ 6.9 to ~4-5 in 20 steps). fp32 (the CPU check): DeepSpeed is
# bit-identical to DDP when gradient clipping is set the same way (../shared/NOTES.md), so 1e-5.
# Measured on the H200 (benchmarks/results/h200-x1, GPT-2 124M, 16 x 1024, 13 steps): within a
# weight precision the backends agree (DeepSpeed ZeRO-2/3 and ColossalAI ZeRO-2 to 3e-4, FSDP2 and
# DDP to 0.6%); across it, with lr warm-up, 0.2% up to step 6, then a loss spike at step 7 (all of
# them) widens it to 2.55% at step 10 (0.66% at step 13). Without warm-up the spike left them 13%
# apart: the bench warms up since. A real change is larger: those 3 warm-up steps alone moved the
# losses 7-19%. So bf16 is 3%, set from that measurement; fp16's 1% is not measured yet.
CROSS_TOL = {"bf16": 0.03, "fp16": 0.01, "fp32": 1e-5}
# Resume: the relaunched run's per-step losses against the uninterrupted run's. fp32 on CPU must
# be bit-exact (the engine's tested claim). On a GPU a resume that restores everything is exact as
# long as the kernels are deterministic; atomics in some backward kernels (and cuBLAS split-K
# choices) make two *uninterrupted* runs differ in the last bits, and a 16-bit loss then differs
# by ~1e-4 relative. A broken resume (optimizer moments, loss scale, lr schedule or data position
# not restored) shows at step 11 as a jump of 1e-2 or more. So 1e-3 relative for bf16/fp16, and
# the JSON records whether it was bit-exact and how far two uninterrupted DDP runs differ.
RESUME_TOL = {"bf16": 1e-3, "fp16": 1e-3, "fp32": 0.0}
ESTIMATE_TARGET = 0.15  # |predicted / measured - 1| for the peak allocated GPU memory

# ------------------------------------------------------------------------------------------------
# Time: a grant is 15 minutes of device time, the machine's start (1-2 min) included, and one call
# runs at most 10 minutes, so one call of at most 8 minutes (the wheel install included) leaves room
# for the start and the copying. Runs stop starting once BUDGET is used (counted from the call's
# start: run.sh exports ENGINE_GPU_T0), and a bench still running then is stopped, so the call ends
# inside the limit and returns what finished.
# ------------------------------------------------------------------------------------------------
CALL_LIMIT_S = 480
BUDGET_S = 450

# Plan estimates, seconds on a fresh GPU machine (16 cores). Measured where the H200's first two calls
# (benchmarks/results/h200-x1, headline and parity-gpt2, 2026-11-27) ran it: each figure says so;
# the rest are still guesses (README "Time estimates").
EST = {
    "install": 35,         # measured 35 s and 25 s: 12 wheels --no-deps into /tmp, one process importing them
    "device": 2,           # nvidia-smi for the device's name (the result folder's slug)
    "bench": 22,           # measured: `engine bench` itself (imports, a CUDA device query) and between runs
    "launch": 42,          # measured 36-44 s for gpt2's 13 steps: one `engine launch --gpus 1`, launcher +
                           # worker (imports, CUDA context, builtin:sample's tokenizer and blocks, the model)
    "deepspeed": 3,        # measured 37-45 s for deepspeed:zero2/zero3 against ddp's 36-44
    "colossal": 4,         # measured 30-46 s for colossal:zero2
    "gemini": 4,           # more: Gemini's chunk manager (not measured yet)
    "trainer": 34,         # measured: torchrun + HF Trainer (its imports, accelerate, set-up)
    "hand": 24,            # measured: torchrun + the hand-written loop
    "estimate": 8,         # `engine estimate --json`: one process per model size, side by side
    "report": 3,           # JSON, Markdown, chart, tarball
    "export": 25,          # smoke: from_pretrained + generate for every run's export, one process on CPU
}
EST_INIT = 21              # measured: gpt2's random init from config, saved (InitWeights)
EST_HOST_BUILD = {"gpt2-xl": 16, "gpt-neo-2.7B": 40, "gpt-j-6B": 100,  # random init from config on the host
                  "llama-3.2-1b": 14}
# one GPU step as sized: measured on the H200 for gpt2 (16 x 1024: 107 ms) and gpt2-xl (8 x 1024: 361 ms);
# llama-3.2-1b (4 x 1024) guessed from gpt2-xl's by FLOPs
EST_STEP_S = {"gpt2": 0.11, "gpt2-xl": 0.36, "gpt-neo-2.7B": 0.6, "gpt-j-6B": 1.4, "llama-3.2-1b": 0.2}
EST_OFFLOAD = {"gpt2": 10, "gpt2-xl": 40, "gpt-j-6B": 150}  # CPU Adam steps, pinning host memory
EST_BUILD = {  # JIT builds with this GPU's nvcc, done ahead of the runs that need them (build_kernels.py)
    "colossalai-kernels": 90,   # cpu_adam_x86 + fused_optim_cuda side by side, sm_90 only
    "deepspeed-cpu-adam": 90,   # DeepSpeed's cpu_adam (2 C++ files)
}

GPU_VARIANTS = [  # (label, engine launch arguments); dropout is off in the model config
    ("ddp", ["--backend", "ddp"]),
    ("deepspeed:zero0", ["--backend", "deepspeed", "backend.deepspeed.zero_stage=0"]),
    ("deepspeed:zero1", ["--backend", "deepspeed", "backend.deepspeed.zero_stage=1"]),
    ("deepspeed:zero2", ["--backend", "deepspeed", "backend.deepspeed.zero_stage=2"]),
    ("deepspeed:zero3", ["--backend", "deepspeed", "backend.deepspeed.zero_stage=3"]),
    ("deepspeed:zero2+offload", ["--backend", "deepspeed", "backend.deepspeed.zero_stage=2",
                                 "backend.deepspeed.offload_optimizer=cpu"]),
    ("deepspeed:zero3+offload", ["--backend", "deepspeed", "backend.deepspeed.zero_stage=3",
                                 "backend.deepspeed.offload_optimizer=cpu", "backend.deepspeed.offload_params=cpu"]),
    ("colossal:torch_ddp", ["--backend", "colossal", "backend.colossal.plugin=torch_ddp"]),
    ("colossal:zero2", ["--backend", "colossal", "backend.colossal.plugin=low_level_zero", "backend.colossal.zero_stage=2"]),
    ("colossal:gemini", ["--backend", "colossal", "backend.colossal.plugin=gemini"]),
]
# Resume exactness costs two more launches per variant: a subset per precision that still covers
# every checkpoint format (torch state dicts + GradScaler, DeepSpeed ZeRO-2/3 partitions, DeepSpeed
# CPU-offloaded optimizer + fp16 loss scaler, ColossalAI low-level ZeRO and Gemini); --resume-all
# does every variant.
RESUME_SUBSET = {
    "bf16": ["ddp", "deepspeed:zero2", "deepspeed:zero3", "colossal:gemini"],
    # Gemini again under fp16: its bf16 resume, fixed after the first H200 smoke, ran out of that
    # call's time on the second (benchmarks/results/h200-x1/smoke-bf16.md)
    "fp16": ["ddp", "deepspeed:zero2+offload", "deepspeed:zero3", "colossal:zero2", "colossal:gemini"],
    "fp32": ["ddp", "deepspeed:zero2"],
}
CPU_VARIANTS = ["ddp", "deepspeed:zero0", "deepspeed:zero2"]  # what runs on CPU processes (gloo)
# --negative-control: ddp with twice the learning rate, a planted bug the closeness check must flag
NEGATIVE = "ddp:lr-x2 (negative control)"

# `next` runs the first of these whose <part>.json is not in benchmarks/results/<slug>/ yet
NEXT_ORDER = ["headline", "profile", "smoke-bf16", "smoke-fp16", "families-lora", "matrix-xl-1", "matrix-xl-2",
              "largest-neo", "largest-gptj", "offload", "gemini", "matrix-gpt2", "largest-gptj-z2"]
GROUPS = {"smoke": ["smoke-bf16", "smoke-fp16"], "matrix": ["matrix-xl-1", "matrix-xl-2", "matrix-gpt2"],
          "largest": ["largest-neo", "largest-gptj", "largest-gptj-z2"], "all": NEXT_ORDER + ["estimate"]}
KNOWN = set(NEXT_ORDER) | {"smoke-fp32", "estimate", "parity-gpt2", "profile"}


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Launch:          # one `engine launch` (smoke parts)
    name: str
    label: str
    precision: str
    argv: list[str]
    output_dir: Path
    role: str = "main"     # main | repeat (ddp twice: GPU determinism) | resume-1 | resume-2
    est_s: int = 40
    needs: str | None = None  # the Build it waits for


@dataclass
class Row:             # one bench run, one row of the part's table
    section: str           # headline: a | b | c; other parts: the bench's tag
    name: str              # what the tables show, e.g. "engine ddp", "HF Trainer (its defaults)"
    spec: str              # the bench's backend spec (with the dropout-off overrides)
    model: str
    est_s: int
    compare: bool = False  # losses checked against the same model's ddp row (CROSS_TOL)
    on_cpu: bool = True    # runs in the CPU rehearsal (--cpu); Gemini does not


@dataclass
class Bench:           # one `engine bench`; runs its rows in order
    name: str
    argv: list[str]
    rows: list[Row]
    results_dir: Path
    needs: str | None = None  # the Build whose ops its rows load

    @property
    def est_s(self) -> int:
        return EST["bench"] + sum(r.est_s for r in self.rows)


@dataclass
class Build:           # a JIT build done on its own (build_kernels.py); its commands run side by side
    name: str
    argvs: list[list[str]]
    est_s: int


@dataclass
class InitWeights:     # one random init from config, saved: the rows that compare losses start from it
    model: str             # the bench's model preset, or what the smoke parts' `overrides` build
    out_dir: Path
    est_s: int = EST_INIT
    overrides: list[str] | None = None  # smoke: the engine config (model.config.*, tokenizer) to build

    def argv(self) -> list[str]:
        # as the engine (seed 0, train.seed) and the baselines build it from config, dropout off; loaded
        # by every engine row, because DeepSpeed ZeRO-3 builds from config inside zero.Init, where
        # transformers initialises the partitioned weights on the GPU (measured: another step-1 loss)
        if self.overrides is not None:  # the model `engine launch` would build from these overrides
            code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
                    "from engine.config import load_config; "
                    "from engine.modeling import load_model_config, load_tokenizer; "
                    "cfg = load_config(None, sys.argv[3:]); "
                    "conf = load_model_config(cfg, load_tokenizer(cfg), None); "
                    "torch.manual_seed(0); AutoModelForCausalLM.from_config(conf, dtype=torch.float32)"
                    ".save_pretrained(sys.argv[2])")
            return [sys.executable, "-c", code, self.model, str(self.out_dir), *self.overrides]
        code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
                "from engine.flops import hf_config, parse_model; "
                "conf = hf_config(parse_model(sys.argv[1])); "
                "[setattr(conf, k, 0.0) for k in ('resid_pdrop', 'embd_pdrop', 'attn_pdrop')]; "
                "torch.manual_seed(0); AutoModelForCausalLM.from_config(conf, dtype=torch.float32)"
                ".save_pretrained(sys.argv[2])")
        return [sys.executable, "-c", code, self.model, str(self.out_dir)]


@dataclass
class EstimateStep:    # `engine estimate` for every measured run without an estimate row yet
    est_s: int = EST["estimate"]


@dataclass
class Part:
    name: str
    kind: str              # smoke | bench | estimate
    precision: str = "bf16"
    launches: list[Launch] = field(default_factory=list)
    steps: list = field(default_factory=list)        # bench parts: Bench | Build | EstimateStep, in order
    builds: list[Build] = field(default_factory=list)  # smoke parts: done first, beside other launches
    notes: list[str] = field(default_factory=list)
    common: list[str] = field(default_factory=list)  # smoke: overrides every launch shares
    init: InitWeights | None = None  # smoke: the one saved init every launch starts from
    sections: dict[str, str] = field(default_factory=dict)  # bench parts: section -> title
    jobs: int = 1

    @property
    def benches(self) -> list[Bench]:
        return [s for s in self.steps if isinstance(s, Bench)]


def build_step(name: str) -> Build:
    ops = {"colossalai-kernels": ["colossalai-cpu-adam", "colossalai-fused-optim"],
           "deepspeed-cpu-adam": ["deepspeed-cpu-adam"]}[name]
    return Build(name, [[sys.executable, str(HERE / "build_kernels.py"), op] for op in ops], EST_BUILD[name])


def needs_build(label: str) -> str | None:
    """The JIT build a backend label's first use needs (none on CPU: those rows do not run there)."""
    if "gemini" in label:
        return "colossalai-kernels"   # HybridAdam: ColossalAI's CPU Adam + fused CUDA Adam
    if "offload" in label:
        return "deepspeed-cpu-adam"   # DeepSpeedCPUAdam
    return None


def smoke_part(name: str, precision: str, a) -> Part:
    cpu = a.cpu
    work = a.work / name
    if cpu:
        model = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128}
        seq, mb, steps = 64, 4, 10
        gpus = ["--gpus", "0", "--nproc", str(a.nproc)]
        labels = CPU_VARIANTS
    else:
        model = {"n_layer": 6, "n_embd": 512, "n_head": 8, "n_positions": 256}
        seq, mb, steps = 256, 8, 20
        gpus = ["--gpus", "1"]
        labels = [v[0] for v in GPU_VARIANTS]
    stop = steps // 2
    args = dict(GPU_VARIANTS)
    args[NEGATIVE] = ["--backend", "ddp", "train.lr=2e-3"]
    if a.negative_control:
        labels = [*labels, NEGATIVE]
    common = [
        "task=causal_lm", "model.config.model_type=gpt2",
        *[f"model.config.{k}={v}" for k, v in model.items()],
        "model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0", "model.config.attn_pdrop=0.0",
        "tokenizer=builtin:sample", "data.train=builtin:sample", f"data.block_size={seq}",
        "data.validation_split=0.0",
        f"train.max_steps={steps}", f"train.micro_batch_size={mb}", "train.lr=1e-3", "train.warmup_ratio=0.1",
        "train.scheduler=linear", "train.weight_decay=0.01", "train.max_grad_norm=1.0", "train.seed=0",
        f"train.precision={precision}", "train.log_every=1", "train.save_every=0", "train.keep_last=1",
    ]
    # every launch starts from one saved init of that model: ZeRO-3 would build it inside zero.Init,
    # on the GPU, from other random numbers than the backends that build it on the CPU
    init = InitWeights("smoke", work / "init", overrides=common)
    common = [*common, f"model.name_or_path={init.out_dir}"]
    resume = labels if a.resume_all else [x for x in RESUME_SUBSET[precision] if x in labels]
    p = Part(name, "smoke", precision, jobs=1 if cpu else a.jobs, init=init)
    p.common = common
    # launches that need a JIT build first, so their chains (build, then them) start at once
    order = sorted(labels, key=lambda x: 0 if needs_build(x) else 1)
    for label in order:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")
        flags = [x for x in args[label] if x.startswith("--") or x in ("ddp", "deepspeed", "colossal")]
        over = [x for x in args[label] if x not in flags]
        base = [*ENGINE, "launch", *gpus, *flags, *common, *over]  # later overrides win
        need = None if cpu else needs_build(label)
        est = 50 if need else 40
        out = work / slug
        p.launches.append(Launch(slug, label, precision, base + [f"output_dir={out}"], out, est_s=est, needs=need))
        if label in resume:
            rout = work / f"{slug}-resume"
            p.launches.append(Launch(f"{slug}-resume-1", label, precision,
                                     base + [f"output_dir={rout}", f"train.stop_at_step={stop}"], rout, "resume-1",
                                     est, need))
            p.launches.append(Launch(f"{slug}-resume-2", label, precision, base + [f"output_dir={rout}"], rout,
                                     "resume-2", est, need))
        if label == "ddp":
            rep = work / f"{slug}-repeat"
            p.launches.append(Launch(f"{slug}-repeat", label, precision, base + [f"output_dir={rep}"], rep, "repeat"))
    for b in dict.fromkeys(l.needs for l in p.launches if l.needs):
        p.builds.append(build_step(b))
    p.notes = [
        f"model: GPT-2 from config ({model['n_layer']} layers x {model['n_embd']}, {model['n_head']} heads, "
        f"dropout off; one random init, seed 0, saved and loaded by every launch), tokenizer and data builtin:sample, seq {seq}, micro-batch {mb}, {steps} steps, "
        f"lr 1e-3 linear with 10% warm-up, clipping 1.0, seed 0, {precision}, "
        + ("CPU processes (gloo) x " + str(a.nproc) if cpu else "1 GPU") + ".",
        f"resume checked for: {', '.join(resume)} (stop at step {stop}, relaunch on the same output_dir).",
        f"tolerances: cross-backend {CROSS_TOL[precision]:g} relative per step vs ddp; resume "
        f"{RESUME_TOL[precision]:g} relative per step vs the uninterrupted run.",
    ]
    if p.builds:
        p.notes.append("JIT builds first, each beside the other launches, then the launches that need it: "
                       + ", ".join(b.name for b in p.builds) + ".")
    return p


# -- bench parts ----------------------------------------------------------------------------------
@dataclass
class Size:            # what one bench trains
    model: str
    seq: int
    micro_batch: int
    warmup: int
    steps: int
    precision: str = "bf16"

    def describe(self) -> str:
        return (f"{self.model}, {self.precision}, seq {self.seq}, micro-batch {self.micro_batch} (1 rank: global batch "
                f"{self.micro_batch} x {self.seq} tokens), {self.warmup} warm-up + {self.steps} measured steps")


# the headline's two sizes on the GPU, and what stands in for them on CPU (--cpu: checks this script)
HEADLINE_SMALL = Size("gpt2", 1024, 16, 3, 10)   # 124M; ~18 GiB (`engine estimate`): the GPU kept busy
HEADLINE_XL = Size("gpt2-xl", 1024, 8, 3, 10)    # 1.5B; DDP ~51 GiB of 80 by `engine estimate`
CPU_SMALL = Size("micro", 64, 4, 1, 3, "fp32")
CPU_XL = Size("tiny", 64, 2, 1, 2, "fp32")
# today's families, full vs LoRA (issue 21): Llama-3.2-1B (1.24B, grouped-query attention, a 128k
# vocabulary, tied head); ~37 GiB for full DDP by `engine estimate` (4 x 1024, bf16)
FAMILIES = Size("llama-3.2-1b", 1024, 4, 3, 10)
CPU_FAMILIES = Size("llama-tiny", 64, 2, 1, 2, "fp32")


def no_dropout(model: str) -> str:
    """Dropout off (as in the smoke parts): backends can then differ only by their arithmetic, and the
    loss comparison means something. The bench passes `model.config.*` to the baselines too."""
    if model.startswith(("llama", "qwen", "mistral")):
        return ""  # their only dropout, attention_dropout, is 0 by default
    keys = ("resid_dropout", "embed_dropout", "attention_dropout") if model.startswith("gpt-neo") else \
        ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    return "".join(f"@model.config.{k}=0.0" for k in keys)


def run_est(spec: str, size: Size) -> int:
    """Seconds one bench run takes (EST): start-ups, set-up, the model's host build, the steps."""
    head = spec.split("@")[0]
    base = head.split("+")[0]
    if base in ("trainer", "hand"):
        t = EST[base]
    else:
        t = EST["launch"] + (EST["deepspeed"] if base.startswith("deepspeed") else 0)
        t += (EST["colossal"] + (EST["gemini"] if "gemini" in base else 0)) if base.startswith("colossal") else 0
    t += EST_HOST_BUILD.get(size.model, 0) + EST_STEP_S.get(size.model, 0.05) * (size.warmup + size.steps)
    if "offload" in head:
        t += EST_OFFLOAD.get(size.model, 40)
    return int(round(t))


def make_row(section: str, name: str, spec: str, size: Size, compare: bool = False, on_cpu: bool = True) -> Row:
    return Row(section, name, spec + no_dropout(size.model), size.model, run_est(spec, size), compare, on_cpu)


def make_bench(part: str, tag: str, size: Size, rows: list[Row], a, timeout: int) -> Bench:
    if a.cpu:  # 2 busy cores, and DeepSpeed's first CPU run JIT-builds its shm comm op (CPU-only: not there)
        timeout = max(timeout, 600)
    out = a.work / part / "results"
    gpus = ["--gpus", "0", "--nproc", str(a.nproc)] if a.cpu else ["--gpus", "1"]
    argv = [*ENGINE, "bench", *gpus, "--models", size.model, "--backends", ",".join(r.spec for r in rows),
            "--baselines", "", "--seq", str(size.seq), "--micro-batch", str(size.micro_batch),
            "--precision", size.precision, "--warmup", str(size.warmup), "--steps", str(size.steps),
            "--timeout", str(timeout), "--out", str(out), "--work-dir", str(a.work / part / "runs" / tag)]
    needs = {needs_build(r.spec.split("@")[0]) for r in rows} - {None}
    return Bench(f"{part}:{tag}", argv, rows, out, needs.pop() if needs else None)


def extra_rows() -> tuple[list[tuple[str, str, bool]], list[str]]:
    """The headline's `fsdp` row once the registry (backends.base.backend_names) has that backend, with
    its first bench default as the spec. Returns ([(name, spec, compare with ddp)], notes saying what
    was not added and why)."""
    rows, notes = [], []
    try:
        from backends.base import backend_class, backend_names
        if "fsdp" in backend_names():
            defaults = backend_class("fsdp").bench_defaults
            rows.append(("fsdp", defaults[0] if defaults else "fsdp", True))
        else:
            notes.append("no fsdp row: the backend registry has no `fsdp` yet (picked up once it has).")
    except ImportError as e:  # a plan printed where torch is missing: the GPU machine decides
        notes.append(f"fsdp row decided where the run happens (the registry did not import here: {e}).")
    return rows, notes


def lora_override() -> str | None:
    """`model.lora=true` if ModelConfig.lora is a bool; else a rank for a LoRA options group
    (`enabled=true` if it has that field, else `r=8`/`rank=8`, peft's default rank); None without the field."""
    try:
        from engine.config import ModelConfig
    except ImportError:
        return None
    f = next((f for f in dataclasses.fields(ModelConfig) if f.name == "lora"), None)
    if f is None:
        return None
    if str(f.type).strip() == "bool":
        return "model.lora=true"
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    names = {x.name for x in dataclasses.fields(default)} if dataclasses.is_dataclass(default) else set()
    if "enabled" in names:
        return "model.lora.enabled=true"
    return "model.lora.rank=8" if "rank" in names and "r" not in names else "model.lora.r=8"


def headline_part(a, extras: list[tuple[str, str, bool]] | None = None) -> Part:
    """The figures asked first, measured in one call (README "headline"). Order: (a) GPT-2 124M on engine
    DDP, the HF Trainer with its defaults, the hand loop; (b) the same job on DeepSpeed ZeRO-2/3 and
    ColossalAI low-level ZeRO-2 (+ an fsdp row once the registry has it); (c) GPT-2-XL on DDP (MFU);
    (d) `engine estimate` against every peak."""
    small, xl = (CPU_SMALL, CPU_XL) if a.cpu else (HEADLINE_SMALL, HEADLINE_XL)
    extras, extra_notes = extra_rows() if extras is None else (extras, [])
    init = InitWeights(small.model, a.work / "headline" / f"init-{small.model}")
    same = f"@model.name_or_path={init.out_dir}"  # every engine row starts from the same weights
    ab = [make_row("a", "engine ddp", "ddp" + same, small),
          make_row("a", "HF Trainer (its defaults)", "trainer", small),
          make_row("a", "hand-written loop", "hand", small),
          make_row("b", "deepspeed:zero2", "deepspeed:zero2" + same, small, compare=True),
          make_row("b", "deepspeed:zero3", "deepspeed:zero3" + same, small, compare=True),
          make_row("b", "colossal:low_level_zero (zero2)", "colossal:zero2" + same, small, compare=True),
          *[make_row("b", name, spec + same, small, compare=cmp) for name, spec, cmp in extras]]
    c = [make_row("c", "engine ddp", "ddp", xl)]
    p = Part("headline", "bench", small.precision)
    p.steps = [init, make_bench("headline", "gpt2", small, ab, a, 150), make_bench("headline", "gpt2-xl", xl, c, a, 240),
               EstimateStep()]
    p.sections = {"a": f"a. {small.describe()}: engine DDP, the HF Trainer (its own defaults), the hand-written loop",
                  "b": f"b. the same job on the other backends; losses per step vs engine ddp (tol "
                       f"{CROSS_TOL[small.precision]:g} relative)",
                  "c": f"c. {xl.describe()}: engine DDP, MFU",
                  "d": "d. `engine estimate` vs the measured peak allocated GPU memory "
                       f"(target |error| <= {ESTIMATE_TARGET:.0%})"}
    p.notes = ["Rows are written to headline.jsonl (and headline.md rewritten) the moment each run ends.",
               "Dropout is off in every row (model.config.*_pdrop=0.0, baselines included), so backends differ "
               "only by their arithmetic.",
               "Gemini (its kernel build takes 90 s) is in the `gemini` part, LoRA in `matrix-gpt2`: measured on "
               "the H200, the headline with them took 10 minutes, over one call."]
    p.notes += extra_notes
    return p


def parity_part(a) -> Part:
    """The headline's loss comparison again, on its own (~3.5 min with the wheel install): engine ddp,
    DeepSpeed ZeRO-2 and ColossalAI low-level ZeRO-2 from one saved init, at the headline's gpt2 size.
    Run by name, not by `next`: it re-checks (b) after a change to the bench's job (the lr warm-up that
    followed the first H200 headline, where all three spiked at step 7 and ended 13% apart)."""
    small = CPU_SMALL if a.cpu else HEADLINE_SMALL
    init = InitWeights(small.model, a.work / "parity-gpt2" / f"init-{small.model}")
    same = f"@model.name_or_path={init.out_dir}"
    rows = [make_row("b", "engine ddp", "ddp" + same, small),
            make_row("b", "deepspeed:zero2", "deepspeed:zero2" + same, small, compare=True),
            make_row("b", "colossal:low_level_zero (zero2)", "colossal:zero2" + same, small, compare=True)]
    p = Part("parity-gpt2", "bench", small.precision)
    p.steps = [init, make_bench("parity-gpt2", "gpt2", small, rows, a, 150)]
    p.sections = {"b": f"b. {small.describe()}, lr warm-up over the warm-up steps; losses per step vs engine "
                       f"ddp (tol {CROSS_TOL[small.precision]:g} relative)"}
    p.notes = ["The bench's job since the first H200 headline: lr 1e-4 warmed up linearly over the 3 warm-up steps, "
               "then linear decay; dropout off; every row from one saved init."]
    return p


PROFILE_STEP = 5  # the second measured step: after the 3 warm-up steps and one more


def profile_part(a) -> Part:
    """Where a step's time goes where the headline missed its targets (issue: 1.2x the HF Trainer,
    40% MFU on GPT-2-XL): `train.profile_step` on engine ddp at the headline's two sizes and on
    DeepSpeed ZeRO-3 (0.61x ddp there), and ddp with torch.compile. The operator tables come back in
    the part's Markdown, rank 0's tables and summaries in its tarball (the traces stay: MBs each)."""
    small, xl = (CPU_SMALL, CPU_XL) if a.cpu else (HEADLINE_SMALL, HEADLINE_XL)
    step = f"@train.profile_step={PROFILE_STEP if not a.cpu else small.warmup + 1}"
    rows = [make_row("gpt2", "engine ddp (profiled)", "ddp" + step, small),
            make_row("gpt2", "deepspeed:zero3 (profiled)", "deepspeed:zero3" + step, small),
            make_row("gpt2", "engine ddp + torch.compile", "ddp@train.compile=true", small)]
    p = Part("profile", "bench", small.precision)
    p.steps = [make_bench("profile", "gpt2", small, rows, a, 150),
               make_bench("profile", "gpt2-xl", xl, [make_row("xl", "engine ddp (profiled)", "ddp" + step, xl)], a, 240)]
    p.sections = {"gpt2": small.describe(), "xl": xl.describe()}
    p.notes = [f"Step {PROFILE_STEP} of each run under torch.profiler (`train.profile_step`): its tokens/s is "
               "slowed by the profiler, the other measured steps are not; the operator tables are below.",
               "engine ddp + torch.compile (not profiled): what compiling the model gives against the headline's "
               "1.06x the HF Trainer (its compile happens in the warm-up steps)."]
    return p


def collect_profiles(runs_dir: Path) -> list[dict]:
    """Rank 0's `profile/step-N.json` of every run under runs_dir (the bench's run directories)."""
    out = []
    for f in sorted(runs_dir.glob("**/profile/step-*.json")):
        if f.name.endswith(".trace.json"):
            continue
        try:
            d = json.loads(f.read_text())
        except ValueError:
            continue
        run = next(part for part in reversed(f.parts[:-2]) if part != "run")  # the bench's run directory
        out.append({"run": run, "table": str(f.with_suffix(".txt")), **d})
    return out


def profiles_md(profiles: list[dict]) -> list[str]:
    lines = []
    for pr in profiles:
        lines += [f"### profile: {pr['run']}, step {pr['step']} ({pr['wall_s'] * 1000:.0f} ms with the profiler; "
                  f"{pr['total_self_ms']:.0f} ms of {pr['time']} time)", "",
                  "| operator | self ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{op['name'][:80]}` | {op['self_ms']:.2f} | {op['share']:.1%} | {op['calls']} |" for op in pr["ops"][:15]]
        lines.append("")
    return lines


def bench_part(name: str, a) -> Part:
    p = Part(name, "bench")
    gpt2 = Size("gpt2", 1024, 16, 5, 10)       # 5 + 10: the log_every=5 row's windows hold measured steps only
    xl = HEADLINE_XL
    large = lambda m: Size(m, 1024, 1, 1, 3)   # noqa: E731 (micro-batch 1, gradient checkpointing)
    if name == "matrix-xl-1":
        rows = [make_row("xl", n, s, xl, compare=s.startswith("deepspeed")) for n, s in
                [("engine ddp", "ddp"), ("deepspeed:zero2", "deepspeed:zero2"), ("deepspeed:zero3", "deepspeed:zero3"),
                 ("HF Trainer (its defaults)", "trainer"), ("hand-written loop", "hand")]]
        p.steps = [make_bench(name, "xl", xl, rows, a, 240)]
        p.sections = {"xl": xl.describe() + ": DDP again as this call's reference, ZeRO-2/3, both baselines"}
        p.notes = ["DDP holds 16 B/param of fp32 weights, grads and Adam (25 GB) + bf16 autocast copies + "
                   "activations and logits: ~51 GiB by `engine estimate`."]
    elif name == "matrix-xl-2":
        rows = [make_row("xl", s, s, xl) for s in
                ["colossal:torch_ddp", "deepspeed:zero0", "deepspeed:zero1", "colossal:zero2"]]
        p.steps = [make_bench(name, "xl", xl, rows, a, 240)]
        p.sections = {"xl": xl.describe() + ": the remaining rows (colossal:torch_ddp is this call's DDP)"}
    elif name == "matrix-gpt2":
        specs = ["ddp", "ddp@train.log_every=5", "deepspeed:zero0", "deepspeed:zero1", "colossal:torch_ddp",
                 "colossal:zero1"]
        if a.compile:
            specs += ["ddp@train.compile=true", "deepspeed:zero2@train.compile=true"]
            p.notes.append("--compile: adds ddp and deepspeed:zero2 with train.compile=true.")
        rows = [make_row("gpt2", s, s, gpt2, compare=s != "ddp") for s in specs]
        lora = lora_override()
        if lora:  # LoRA trains other parameters: its losses are not ddp's, so no closeness check
            rows.append(make_row("gpt2", "ddp + LoRA", f"ddp@{lora}", gpt2))
        p.steps = [make_bench(name, "gpt2", gpt2, rows, a, 150)]
        p.sections = {"gpt2": gpt2.describe() + ": the gpt2 rows the headline leaves out"}
        p.notes.append("ddp@train.log_every=5 measures what keeping losses on the device between log steps saves "
                       "(the bench logs every step, a host sync per step, like both baselines).")
    elif name == "families-lora":
        fam = CPU_FAMILIES if a.cpu else FAMILIES
        lora = lora_override() or "model.lora.r=8"
        # every row from one saved init (ZeRO-3 would build its own inside zero.Init); losses compared
        # with ddp's for full ZeRO-3 only: LoRA trains other parameters
        init = InitWeights(fam.model, a.work / name / f"init-{fam.model}",
                           est_s=EST_INIT + EST_HOST_BUILD.get(fam.model, 0))
        same = f"@model.name_or_path={init.out_dir}"
        rows = [make_row("llama", "ddp", "ddp" + same, fam),
                make_row("llama", "ddp + LoRA", f"ddp{same}@{lora}", fam),
                make_row("llama", "deepspeed:zero3", "deepspeed:zero3" + same, fam, compare=True),
                make_row("llama", "deepspeed:zero3 + LoRA", f"deepspeed:zero3{same}@{lora}", fam),
                make_row("llama", "fsdp + LoRA", f"fsdp{same}@{lora}", fam)]
        p.steps = [init, make_bench(name, "llama", fam, rows, a, 200), EstimateStep()]
        p.sections = {"llama": fam.describe() + ": full fine-tuning and LoRA r=8 (PEFT's default targets) on DDP "
                                                "and ZeRO-3 side by side, and LoRA on FSDP2"}
        p.notes = ["What LoRA saves on a today's-family model: the frozen base keeps no fp32 gradient or AdamW "
                   "moments (12 B/param); `engine estimate --lora 8` is checked against each peak."]
    elif name == "gemini":
        small = HEADLINE_SMALL
        init = InitWeights(small.model, a.work / name / f"init-{small.model}")
        same = f"@model.name_or_path={init.out_dir}"
        rows = [make_row("gpt2", "engine ddp", "ddp" + same, small),
                make_row("gpt2", "colossal:gemini", "colossal:gemini" + same, small, compare=True)]
        p.steps = [build_step("colossalai-kernels"), init, make_bench(name, "gpt2", small, rows, a, 150),
                   make_bench(name, "xl", xl, [make_row("xl", "colossal:gemini", "colossal:gemini", xl)], a, 240)]
        p.sections = {"gpt2": small.describe() + ": the headline's (b) row for Gemini, losses vs ddp from one init",
                      "xl": xl.describe()}
    elif name == "offload":
        rows = [make_row("xl", s, s, xl) for s in ["deepspeed:zero2+offload", "deepspeed:zero3+offload"]]
        p.steps = [build_step("deepspeed-cpu-adam"), make_bench(name, "xl", xl, rows, a, 300)]
        p.sections = {"xl": xl.describe() + ": optimizer (and ZeRO-3 parameters) in host memory, DeepSpeedCPUAdam"}
    elif name == "largest-neo":
        neo = large("gpt-neo-2.7B")
        rows = [make_row("neo", "ddp+gc", "ddp+gc", neo), make_row("neo", "deepspeed:zero2+gc", "deepspeed:zero2+gc", neo)]
        gemini = [make_row("neo", "colossal:gemini+gc", "colossal:gemini+gc", neo)]
        # Gemini after its build, after the others: a failed build costs only its row
        p.steps = [make_bench(name, "neo", neo, rows, a, 300), build_step("colossalai-kernels"),
                   make_bench(name, "neo-gemini", neo, gemini, a, 300)]
        p.sections = {"neo": neo.describe() + ", gradient checkpointing"}
        p.notes = ["DDP needs ~16 B/param = 43 GB of states + 5 GB autocast copies; ZeRO-2 ~16 B/param too on one GPU "
                   "(no sharding partner) but 16-bit working weights; Gemini places chunks between GPU and host."]
    elif name in ("largest-gptj", "largest-gptj-z2"):
        gptj = large("gpt-j-6B")
        spec = "deepspeed:zero3+offload+gc" if name == "largest-gptj" else "deepspeed:zero2+offload+gc"
        p.steps = [build_step("deepspeed-cpu-adam"), make_bench(name, "gptj", gptj, [make_row("gptj", spec, spec, gptj)],
                                                                 a, 360)]
        p.sections = {"gptj": gptj.describe() + ", gradient checkpointing"}
        p.notes = ["gpt-j-6B (6.05B): ZeRO-3 with parameters and optimizer offloaded (host: fp32 master + Adam + fp32 "
                   "grads = 16 B/param = ~97 GB of the machine's 128 GB)" if name == "largest-gptj" else
                   "gpt-j-6B (6.05B): ZeRO-2 + optimizer offload (GPU keeps 16-bit weights + grads, ~24 GB)."]
    else:
        raise ValueError(name)
    p.notes.append("Dropout off in every row (model.config.*=0.0, baselines included).")
    p.notes.append("An `oom` outcome is a finding (the model does not fit that way), not a bug."
                   if name.startswith(("largest", "gemini", "offload")) else "")
    p.notes = [n for n in p.notes if n]
    return p


def expand(parts: list[str]) -> list[str]:
    out = []
    for p in parts:
        for q in GROUPS.get(p, [p]):
            if q not in out:
                out.append(q)
    return out


def build(name: str, a) -> Part:
    if name.startswith("smoke-"):
        return smoke_part(name, name.split("-", 1)[1], a)
    if name == "estimate":
        return Part(name, "estimate", notes=["`engine estimate MODEL --gpus 1 --seq S --micro-batch B --precision P "
                                             "--json` for every measured run found in the result folder."])
    if name == "headline":
        return headline_part(a)
    if name == "parity-gpt2":
        return parity_part(a)
    if name == "profile":
        return profile_part(a)
    return bench_part(name, a)


def gpu_result_dirs(root: Path, slug: str) -> list[Path]:
    """This device's result folder first, then every other GPU's (folders holding a headline.json, not
    the CPU rehearsals'): a part done on an H200 is not redone on an H100, since each grant is short."""
    others = sorted(d for d in root.glob("*") if d.is_dir() and d.name != slug and not d.name.startswith("cpu")
                    and (d / "headline.json").exists())
    return [root / slug, *others]


def next_part(results_dirs: Path | list[Path], order: list[str] = NEXT_ORDER) -> str | None:
    """The first part whose <part>.json (written when a part ends, pass or fail) is in none of
    results_dirs. A call cut short leaves no <part>.json, so that part comes again; to redo a finished
    part, run it by name."""
    dirs = [results_dirs] if isinstance(results_dirs, Path) else results_dirs
    for name in order:
        if not any((d / f"{name}.json").exists() for d in dirs):
            return name
    return None


# -- estimated time ---------------------------------------------------------------------------------
def chain_schedule(chains: list[int], jobs: int) -> int:
    """Seconds `jobs` workers take for these chains (each run start to end), taken in order, each by the
    first free worker: what ThreadPoolExecutor.map does."""
    free = [0] * max(1, jobs)
    for c in chains:
        i = free.index(min(free))
        free[i] += c
    return max(free) if chains else 0


def smoke_chains(p: Part) -> list[list]:
    """Build + the launches needing it, then each resume-2 after its resume-1, every other launch alone."""
    chains, by_build = [], {b.name: [b] for b in p.builds}
    chains += list(by_build.values())
    for l in p.launches:
        if l.needs in by_build:
            by_build[l.needs].append(l)
        elif l.role == "resume-2":
            chains[-1].append(l)
        else:
            chains.append([l])
    return chains


def part_estimate(p: Part, setup: bool = True) -> list[tuple[str, int]]:
    """(what, seconds) for everything the part starts, in order; their sum is the call's estimate."""
    out = [("wheel install + import check (run.sh)", EST["install"]), ("device query", EST["device"])] if setup else []
    if p.kind == "smoke":
        if p.init:
            out.append(("initial weights (one random init, saved)", p.init.est_s))
        chains = smoke_chains(p)
        secs = chain_schedule([sum(x.est_s for x in c) for c in chains], p.jobs)
        out.append((f"{len(p.launches)} launches + {len(p.builds)} build(s), {p.jobs} at a time", secs))
        out.append(("export checks (from_pretrained + generate)", EST["export"]))
    for s in p.steps:
        if isinstance(s, Bench):
            out.append((f"bench {s.name} (start)", EST["bench"]))
            out += [(f"  {r.section}: {r.model} {r.name}", r.est_s) for r in s.rows]
        elif isinstance(s, Build):
            out.append((f"JIT build {s.name}", s.est_s))
        elif isinstance(s, InitWeights):
            out.append((f"initial weights of {s.model} (one random init, saved)", s.est_s))
        elif isinstance(s, EstimateStep) and s.est_s:
            out.append(("engine estimate", s.est_s))
    if p.kind == "estimate":
        out.append(("engine estimate per model size", EST["estimate"]))
    out.append(("reports", EST["report"]))
    return out


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def child_env(cpu: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "engine" / "torch_extensions"))
    env["DS_ACCELERATOR"] = env.get("DS_ACCELERATOR") or ("cpu" if cpu else "cuda")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    return env


def run_cmd(argv: list[str], log: Path, timeout: float, env: dict, poll=None, every: float = 2.0
            ) -> tuple[int, float, bool]:
    """Run in its own process group; on timeout kill the whole group (torchrun workers too). `poll()` is
    called every `every` seconds while it runs and once after, to pick up results as they appear."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timed_out = False
    with open(log, "w") as f:
        f.write("$ " + shlex.join(argv) + "\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            left = t0 + max(1.0, timeout) - time.time()
            try:
                code = proc.wait(timeout=max(0.1, min(every, left)) if poll else max(0.1, left))
                break
            except subprocess.TimeoutExpired:
                if poll:
                    poll()
                if time.time() < t0 + max(1.0, timeout):
                    continue
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = proc.returncode if proc.returncode is not None else -9
            break
    if poll:
        poll()
    return code, time.time() - t0, timed_out


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [l for l in lines if "Warning" not in l and "warn(" not in l]
    return "\n".join(keep[-n:])


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record of a step wins: a resumed run may repeat)."""
    losses = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return losses
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("event") == "train" and isinstance(r.get("loss"), (int, float)):
            losses[int(r["step"])] = float(r["loss"])
    return losses


def read_memory(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    mem = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("event") == "memory":
            ranks = [x for x in r.get("per_rank", []) if x]
            mem = {k: max(x.get(k, 0) for x in ranks) for k in {k for x in ranks for k in x}}
    return mem


def max_rel(a: dict[int, float], b: dict[int, float], steps=None) -> tuple[float, int]:
    common = sorted(set(a) & set(b) if steps is None else set(a) & set(b) & set(steps))
    if not common:
        return math.inf, 0
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in common), len(common)


# -- rows, written the moment they are measured ------------------------------------------------------
class RowLog:
    """<part>.jsonl gets each row (one JSON line, flushed) the moment it is measured, and <part>.md is
    rewritten from all rows so far, so a call stopped at its time limit still brings back every row that
    finished: the device tool returns whatever is under $OUT."""

    def __init__(self, slug_dir: Path, part: Part, device: dict, started: str, t0: float) -> None:
        self.part, self.device, self.started, self.t0 = part, device, started, t0
        self.jsonl, self.md = slug_dir / f"{part.name}.jsonl", slug_dir / f"{part.name}.md"
        self.rows: list[dict] = []
        self.lock = threading.Lock()  # smoke launches finish on several threads
        slug_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl.write_text("")  # a new call measures the part afresh

    def add(self, row: dict) -> dict:
        with self.lock:
            row = {"t_s": round(time.time() - self.t0, 1), **row}
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.rows.append(row)
            self.md.write_text(rows_md(self.part, self.rows, self.device, self.started, time.time() - self.t0))
            write_index(self.md.parent)
        print(f"  row {row.get('section', '')} {row.get('name', '')}: {row_line(row)}", flush=True)
        return row


def row_line(r: dict) -> str:
    bits = [r.get("outcome", "")]
    if r.get("tokens_per_s"):
        bits.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu"):
        bits.append(f"MFU {r['mfu']:.1%}")
    if r.get("peak_alloc_mib"):
        bits.append(f"peak {r['peak_alloc_mib'] / 1024:.1f} GiB")
    if r.get("vs_ddp") is not None:
        bits.append(f"vs ddp {r['vs_ddp']:.2e}")
    if r.get("predicted_mib"):
        bits.append(f"predicted {r['predicted_mib'] / 1024:.1f} GiB ({r['rel_error']:+.1%})")
    if r.get("wall_s") is not None:
        bits.append(f"{r['wall_s']:.0f} s")
    if r.get("message"):
        bits.append(str(r["message"])[:160])
    return ", ".join(b for b in bits if b)


def bench_row(row: Row, r: dict, ref: dict | None, tol: float) -> dict:
    """One measured bench run as a row: throughput, memory, MFU, losses and how far they are from the
    same model's ddp row (when the row is compared)."""
    mem = (r.get("memory") or {}).get("max_over_ranks", {})
    tps = r.get("tokens_per_s") or {}
    out = {"section": row.section, "name": row.name, "model": row.model, "spec": row.spec, "outcome": r["outcome"],
           "message": r.get("message", "")[:300] if r["outcome"] != "ok" else "",
           "tokens_per_s": tps.get("median"), "tokens_per_s_p10_p90": [tps.get("p10"), tps.get("p90")],
           "wall_tokens_per_s": r.get("wall_tokens_per_s"), "step_ms": (r.get("step_s") or {}).get("median", 0) * 1000,
           "mfu": (r.get("mfu") or {}).get("mfu"), "achieved_tflops": (r.get("mfu") or {}).get("achieved_tflops_per_device"),
           "peak_alloc_mib": mem.get("gpu_alloc_mb"), "peak_reserved_mib": mem.get("gpu_reserved_mb"),
           "host_rss_mib": mem.get("host_rss_mb"), "optimizer": r.get("optimizer"), "wall_s": r.get("wall_s"),
           "losses": r.get("losses"), "seq": r.get("seq"), "micro_batch": r.get("micro_batch"),
           "precision": r.get("precision"), "bench_json": r.get("name")}
    if row.compare and r["outcome"] == "ok":
        mine, theirs = step_losses(r), step_losses(ref or {})
        if mine and theirs:
            d, n = max_rel(mine, theirs)
            out.update(vs_ddp=d, vs_ddp_steps=n, tolerance=tol)
        else:
            out["vs_ddp_missing"] = "no ddp row with losses to compare with" if not theirs else "no losses logged"
    return out


def step_losses(r: dict) -> dict[int, float]:
    """A bench result's step -> loss (JSON keeps the steps as strings)."""
    return {int(k): v for k, v in (r.get("losses") or {}).items() if isinstance(v, (int, float))}


def rows_md(part: Part, rows: list[dict], device: dict, started: str, elapsed: float, final: dict | None = None) -> str:
    """Markdown for a bench part from its rows: while it runs (after every row) and at its end."""
    head = f"{started} on {device.get('gpu_name') or 'CPU'} ({device['slug']}), "
    head += (f"{final['wall_s']:.0f} s, {'PASS' if final['pass'] else 'FAIL'} ({sum(c['pass'] for c in final['checks'])}/"
             f"{len(final['checks'])} checks)" if final else f"running: {elapsed:.0f} s so far, {len(rows)} rows")
    lines = [f"## {part.name}", "", head, ""] + [f"- {n}" for n in part.notes] + [""]
    runs = [r for r in rows if r.get("kind") == "run"]
    sections = list(dict.fromkeys([*part.sections, *(r["section"] for r in runs)]))
    ddp_tps = {}
    for r in runs:
        if r["spec"].split("@")[0] == "ddp" and r.get("tokens_per_s"):
            ddp_tps.setdefault(r["model"], r["tokens_per_s"])
    for sec in sections:
        mine = [r for r in runs if r["section"] == sec]
        if not mine:
            continue
        lines += [f"### {part.sections.get(sec, sec)}", "",
                  "| run | outcome | tokens/s (p10-p90) | x engine ddp | MFU | peak alloc GiB | peak reserved GiB | "
                  "loss first -> last | max rel. diff vs ddp | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            t = r.get("tokens_per_s")
            lo, hi = r.get("tokens_per_s_p10_p90") or [None, None]
            losses = [v for _, v in sorted(step_losses(r).items())]
            if r.get("vs_ddp") is not None:
                ok = r["vs_ddp"] <= r["tolerance"]
                vs = f"{r['vs_ddp']:.2e} {'<=' if ok else '**>**'} {r['tolerance']:g}"
            else:
                vs = r.get("vs_ddp_missing", "")
            ratio = f"{t / ddp_tps[r['model']]:.2f}" if t and ddp_tps.get(r["model"]) else ""
            gib = lambda k: f"{r[k] / 1024:.2f}" if r.get(k) else ""  # noqa: E731
            outcome = r["outcome"] + (f": {r['message'][:100]}" if r.get("message") else "")
            cells = [r["name"] + (f" ({r['optimizer']})" if r.get("optimizer") else ""), outcome,
                     f"{t:,.0f} ({lo:,.0f}-{hi:,.0f})" if t else "", ratio, f"{r['mfu']:.1%}" if r.get("mfu") else "",
                     gib("peak_alloc_mib"), gib("peak_reserved_mib"),
                     f"{losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} steps)" if losses else "", vs,
                     f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else ""]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        lines.append("")
    est = [r for r in rows if r.get("kind") == "estimate"]
    if est:
        lines += [f"### {part.sections.get('d', 'engine estimate vs measured peak allocated GPU memory')}", "",
                  "| run | estimate row | measured GiB | predicted GiB | error |", "|---|---|---|---|---|"]
        for r in est:
            pred = r.get("predicted_mib")
            lines.append(f"| {r['model']} {r['name']} | {r.get('row', '')} | {r['measured_mib'] / 1024:.2f} | "
                         + (f"{pred / 1024:.2f} | {r['rel_error']:+.1%} |" if pred else f" | {r.get('message', '')} |"))
        lines.append("")
    timed = [r for r in rows if r.get("kind") in ("setup", "build", "bench", "launch")]
    if timed:
        lines += ["### time", "", "| step | outcome | seconds |", "|---|---|---|"]
        for r in timed:
            msg = (f": {r['message'][:120]}" if r.get("message") else "").replace("|", "/")
            lines.append(f"| {r['kind']}: {r['name']} | {r.get('outcome', '')}{msg} | {r['wall_s']:.0f} |")
        lines.append("")
    todo = pending(part, rows)
    if todo and not final:
        lines += ["### not measured yet", ""] + [f"- {x}" for x in todo] + [""]
    return "\n".join(lines)


def pending(part: Part, rows: list[dict]) -> list[str]:
    done = {(r["section"], r["name"], r["model"]) for r in rows if r.get("kind") == "run"}
    return [f"{r.section}: {r.model} {r.name}" for b in part.benches for r in b.rows
            if (r.section, r.name, r.model) not in done]


def run_bench_part(part: Part, a, deadline: float, log: RowLog) -> dict:
    """Walk the part's steps in order; every finished run becomes a row at once."""
    env = child_env(a.cpu)
    logs = a.work / part.name / "logs"
    runs: list[dict] = []        # the bench's own result JSONs, as they appear
    seen: set[str] = set()
    ref: dict[str, dict] = {}    # model -> its ddp run (losses to compare with)
    failed_builds: set[str] = set()
    cache: dict[tuple, dict] = {}
    estimated: set[str] = set()
    tol = CROSS_TOL[part.precision]

    def collect(b: Bench) -> None:
        for f in sorted(b.results_dir.glob("*/*.json")):
            if f.name in seen:
                continue
            try:
                r = json.loads(f.read_text())
            except (OSError, ValueError):  # being written: next poll
                continue
            row = next((x for x in b.rows if x.spec == r.get("label") and x.model == r.get("model")), None)
            if row is None:
                continue
            seen.add(f.name)
            r.pop("config", None)  # the full resolved config is in the tarball
            runs.append(r)
            if r.get("label", "").split("@")[0] in ("ddp", "ddp+gc") and r["outcome"] == "ok":
                ref.setdefault(r["model"], r)
            log.add({"kind": "run", **bench_row(row, r, ref.get(r["model"]), tol)})

    def skip(b: Bench, why: str) -> None:
        for row in b.rows:
            log.add({"kind": "run", "section": row.section, "name": row.name, "model": row.model, "spec": row.spec,
                     "outcome": "skipped", "message": why})

    for step in part.steps:
        left = deadline - time.time()
        if isinstance(step, Build):
            if a.cpu:  # its rows are GPU-only
                log.add({"kind": "build", "name": step.name, "outcome": "n/a on CPU", "wall_s": 0})
                continue
            if left < step.est_s:
                failed_builds.add(step.name)
                log.add({"kind": "build", "name": step.name, "outcome": "skipped", "wall_s": 0,
                         "message": f"time budget: {left:.0f} s left, ~{step.est_s} s needed"})
                continue
            res = run_build(step, logs, left, env)
            if res["outcome"] != "ok":
                failed_builds.add(step.name)
            log.add({"kind": "build", "name": step.name, **res})
        elif isinstance(step, Bench):
            rows = [r for r in step.rows if r.on_cpu or not a.cpu]
            for row in step.rows:
                if row not in rows:
                    log.add({"kind": "run", "section": row.section, "name": row.name, "model": row.model,
                             "spec": row.spec, "outcome": "n/a on CPU", "message": "GPU-only"})
            if not rows:
                continue
            if step.needs in failed_builds and not a.cpu:
                skip(step, f"not run: the {step.needs} build did not finish")
                continue
            first = EST["bench"] + rows[0].est_s
            if left < first:
                skip(step, f"time budget: {left:.0f} s left, ~{first} s needed")
                continue
            name = step.name.replace(":", "-")
            code, wall, to = run_cmd(step.argv, logs / f"{name}.log", left, env, poll=lambda b=step: collect(b))
            outcome = "timeout (time budget)" if to else ("ok" if code == 0 else f"exit {code}")
            log.add({"kind": "bench", "name": step.name, "outcome": outcome, "wall_s": round(wall, 1),
                     "message": "" if code == 0 and not to else _first_error(tail(logs / f"{name}.log"))})
            done = {(r["section"], r["name"], r["model"]) for r in log.rows if r.get("kind") == "run"}
            for row in rows:
                if (row.section, row.name, row.model) not in done:
                    log.add({"kind": "run", "section": row.section, "name": row.name, "model": row.model,
                             "spec": row.spec, "outcome": "not run" if not to else "stopped (time budget)",
                             "message": f"bench {outcome}"})
        elif isinstance(step, InitWeights):
            code, wall, to = run_cmd(step.argv(), logs / f"init-{step.model}.log", left, env)
            log.add({"kind": "build", "name": f"initial weights {step.model}", "wall_s": round(wall, 1),
                     "outcome": "ok" if code == 0 and not to else ("timeout" if to else f"exit {code}"),
                     "message": "" if code == 0 else _first_error(tail(logs / f"init-{step.model}.log"))})
        elif isinstance(step, EstimateStep):
            todo = [m for m in measured_runs(part.name, runs, a.cpu) if m["bench_json"] not in estimated]
            for row, check in zip(*estimate_measured(todo, env, cache)):
                estimated.add(row["bench_json"])
                log.add({"kind": "estimate", "section": "d", **row, "name": row["label"].split("@")[0],
                         "check": check})
    checks = []
    for r in log.rows:
        if r.get("kind") == "run":
            run = f"{r['section']}: {r['model']} {r['name']}"
            if r["outcome"] == "n/a on CPU":
                checks.append({"run": run, "check": "ran", "pass": True, "info": True, "detail": "GPU-only: not on CPU"})
                continue
            checks.append({"run": run, "check": "ran", "pass": r["outcome"] == "ok",
                           "detail": r["outcome"] + (f": {r['message'][:200]}" if r.get("message") else "")})
            if r.get("vs_ddp") is not None:
                checks.append({"run": run, "check": "close to ddp", "pass": r["vs_ddp"] <= r["tolerance"],
                               "value": r["vs_ddp"], "tolerance": r["tolerance"],
                               "detail": f"max relative diff {r['vs_ddp']:.2e} over {r['vs_ddp_steps']} steps "
                                         f"(tol {r['tolerance']:g})"})
            elif r.get("vs_ddp_missing"):
                checks.append({"run": run, "check": "close to ddp", "pass": False, "detail": r["vs_ddp_missing"]})
        elif r.get("kind") == "build" and r["outcome"] == "n/a on CPU":
            checks.append({"run": r["name"], "check": "JIT build", "pass": True, "info": True, "detail": "GPU-only"})
        elif r.get("kind") == "build":
            checks.append({"run": r["name"], "check": "JIT build", "pass": r["outcome"] == "ok",
                           "detail": f"{r['outcome']} in {r['wall_s']:.0f} s" + (f": {r['message']}" if r.get("message") else "")})
        elif r.get("kind") == "estimate" and r.get("check"):
            checks.append(r["check"])
    return {"rows": log.rows, "runs": runs, "checks": checks}


def run_build(step: Build, logs: Path, left: float, env: dict) -> dict:
    """The build's commands side by side; ok when all are."""
    with ThreadPoolExecutor(max_workers=len(step.argvs)) as ex:
        res = list(ex.map(lambda argv: (argv[-1], *run_cmd(argv, logs / f"build-{argv[-1]}.log", left, env)), step.argvs))
    bad = [(op, code, to) for op, code, _, to in res if code != 0 or to]
    return {"outcome": "ok" if not bad else ("timeout" if any(to for _, _, to in bad) else "error"),
            "wall_s": round(max(w for _, _, w, _ in res), 1), "per_op_s": {op: round(w, 1) for op, _, w, _ in res},
            "message": "; ".join(f"{op}: " + _first_error(tail(logs / f"build-{op}.log")) for op, _, _ in bad)}


def check_exports(model_dirs: list[Path]) -> dict[str, dict]:
    """from_pretrained(run/model) + a short greedy generate for each folder, in one child process
    on CPU (imports paid once; no GPU memory taken from runs)."""
    code = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for d in sys.argv[1:]:
    try:
        m = AutoModelForCausalLM.from_pretrained(d).eval()
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok("Ada went to", return_tensors="pt").input_ids
        with torch.no_grad():
            finite = all(bool(torch.isfinite(p).all()) for p in m.parameters())
            out = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id or 0)
        r = {"params": sum(p.numel() for p in m.parameters()), "dtype": str(next(m.parameters()).dtype),
             "finite": finite, "new_tokens": int(out.shape[1] - ids.shape[1]), "text": tok.decode(out[0])}
        r["ok"] = bool(finite and r["new_tokens"] == 8)
    except Exception as e:
        r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    print("EXPORT " + json.dumps({"dir": d, **r}), flush=True)
"""
    out = {str(d): {"ok": False, "error": f"no {d}/config.json"} for d in model_dirs}
    todo = [str(d) for d in model_dirs if (d / "config.json").exists()]
    if not todo:
        return out
    env = child_env(True)
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code, *todo], capture_output=True, text=True, env=env, timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("EXPORT "):
            info = json.loads(line[7:])
            out[info.pop("dir")] = info
    for d in todo:
        if out[d].get("error", "").startswith("no ") and r.returncode != 0:
            out[d] = {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return out


def run_smoke(part: Part, a, deadline: float, log: RowLog) -> dict:
    env = child_env(a.cpu)
    results: dict[str, dict] = {}
    logs = a.work / part.name / "logs"
    builds: dict[str, dict] = {}

    def one(item) -> bool:
        """Run a launch or a build; False stops its chain (a failed build)."""
        left = deadline - time.time()
        if isinstance(item, Build):
            if left < item.est_s:
                builds[item.name] = {"outcome": "skipped", "wall_s": 0, "message": "part time budget used up"}
            else:
                builds[item.name] = run_build(item, logs, left, env)
            log.add({"kind": "build", "name": item.name, **builds[item.name]})
            return builds[item.name]["outcome"] == "ok"
        l = item
        if left < 20:
            results[l.name] = {"label": l.label, "role": l.role, "outcome": "skipped",
                               "message": "part time budget used up"}
        else:
            code, wall, to = run_cmd(l.argv, logs / f"{l.name}.log", left, env)
            r = {"label": l.label, "role": l.role, "command": shlex.join(l.argv[2:]), "exit_code": code,
                 "wall_s": round(wall, 1), "outcome": "timeout" if to else ("ok" if code == 0 else "error"),
                 "output_dir": str(l.output_dir)}
            if code != 0:
                r["log_tail"] = tail(logs / f"{l.name}.log")
            results[l.name] = r
        r = results[l.name]
        ls = read_losses(l.output_dir)
        log.add({"kind": "launch", "name": l.name, "label": l.label, "role": l.role, "outcome": r["outcome"],
                 "wall_s": r.get("wall_s", 0), "message": _first_error(r.get("log_tail", "")) if r["outcome"] != "ok"
                 else (f"loss {ls[min(ls)]:.4f} -> {ls[max(ls)]:.4f}" if ls else "")})
        return True

    def chain(items) -> None:
        for i, item in enumerate(items):
            if not one(item):
                for l in items[i + 1:]:
                    results[l.name] = {"label": l.label, "role": l.role, "outcome": "skipped",
                                       "message": f"the {item.name} build failed"}
                return

    chains = smoke_chains(part)
    if part.init:  # before every launch: they all load it
        init = part.init
        code, wall, to = run_cmd(init.argv(), logs / "init.log", deadline - time.time(), env)
        log.add({"kind": "build", "name": "initial weights", "wall_s": round(wall, 1),
                 "outcome": "ok" if code == 0 and not to else ("timeout" if to else f"exit {code}"),
                 "message": "" if code == 0 else _first_error(tail(logs / "init.log"))})
        if code != 0 or to:
            for l in part.launches:
                results[l.name] = {"label": l.label, "role": l.role, "outcome": "skipped",
                                   "message": "the initial weights were not written"}
            chains = []
    with ThreadPoolExecutor(max_workers=part.jobs) as ex:
        list(ex.map(chain, chains))

    # ---- checks ----
    checks = []
    for name, b in builds.items():
        checks.append({"run": name, "check": "JIT build", "pass": b["outcome"] == "ok",
                       "detail": f"{b['outcome']} in {b['wall_s']:.0f} s" + (f": {b['message']}" if b.get("message") else "")})
    prec = part.precision
    main = {l.label: l for l in part.launches if l.role == "main"}
    loss = {label: read_losses(l.output_dir) for label, l in main.items()}
    ref = loss.get("ddp", {})
    exports = check_exports([l.output_dir / "model" for l in part.launches
                             if l.role == "main" and results[l.name]["outcome"] == "ok"])
    for l in part.launches:
        r = results[l.name]
        if l.role in ("main", "repeat", "resume-2"):
            r["losses"] = [loss_ for _, loss_ in sorted(read_losses(l.output_dir).items())]
        if l.role != "main":
            continue
        label = l.label
        ls = loss[label]
        ok_run = r["outcome"] == "ok"
        checks.append({"run": label, "check": "runs", "pass": ok_run,
                       "detail": r["outcome"] + ("" if ok_run else ": " + (r.get("message") or
                                                                            _first_error(r.get("log_tail", ""))))})
        if not ok_run:
            continue
        steps = sorted(ls)
        finite = all(math.isfinite(v) for v in ls.values())
        falling = bool(steps) and finite and ls[steps[-1]] < ls[steps[0]]
        checks.append({"run": label, "check": "loss falls", "pass": falling,
                       "detail": f"step {steps[0]} {ls[steps[0]]:.4f} -> step {steps[-1]} {ls[steps[-1]]:.4f}"
                       if steps else "no losses logged"})
        if label == NEGATIVE:  # must be caught: its check passes when the difference is over the tolerance
            d, n = max_rel(ls, ref) if ref else (0.0, 0)
            checks.append({"run": label, "check": "negative control caught", "pass": d > CROSS_TOL[prec], "value": d,
                           "detail": f"ddp with lr x2 (a planted bug): max relative diff to ddp {d:.2e} over {n} steps "
                                     f"{'>' if d > CROSS_TOL[prec] else '<='} tol {CROSS_TOL[prec]:g}"})
        elif label != "ddp":
            if ref:
                d, n = max_rel(ls, ref)
                checks.append({"run": label, "check": "close to ddp", "pass": d <= CROSS_TOL[prec], "value": d,
                               "tolerance": CROSS_TOL[prec],
                               "detail": f"max relative diff {d:.2e} over {n} steps (tol {CROSS_TOL[prec]:g})"})
            else:
                checks.append({"run": label, "check": "close to ddp", "pass": False, "detail": "no ddp reference"})
        r["memory"] = read_memory(l.output_dir)
        exp = exports[str(l.output_dir / "model")]
        r["export"] = exp
        checks.append({"run": label, "check": "export loads + generates", "pass": exp["ok"],
                       "detail": (f"{exp['params']:,} params {exp['dtype']}, 8 new tokens: {exp['text'][-60:]!r}"
                                  if exp["ok"] else exp.get("error") or json.dumps(exp)[:200])})
    for l in part.launches:
        if l.role == "repeat" and results[l.name]["outcome"] == "ok" and ref:
            d, n = max_rel(read_losses(l.output_dir), ref)
            results[l.name]["max_rel_vs_first"] = d
            checks.append({"run": "ddp", "check": "run-to-run (info)", "pass": True, "value": d, "info": True,
                           "detail": f"two uninterrupted ddp runs: max relative diff {d:.2e}"
                                     + (" (bit-exact)" if d == 0 else " (kernels not bitwise deterministic)")})
        if l.role == "resume-2":
            first = results[part.launches[part.launches.index(l) - 1].name]
            r = results[l.name]
            label = l.label
            if first["outcome"] != "ok" or r["outcome"] != "ok" or results[main[label].name]["outcome"] != "ok":
                bad = first if first["outcome"] != "ok" else r
                checks.append({"run": label, "check": "exact resume", "pass": False,
                               "detail": "a run failed: " + bad["outcome"] + " "
                                         + (bad.get("message") or _first_error(bad.get("log_tail", "")))})
                continue
            res, full = read_losses(l.output_dir), loss[label]
            stop = max(1, max(full) // 2)
            missing = sorted(set(full) - set(res))
            d_all, n = max_rel(res, full)
            d_after, _ = max_rel(res, full, steps=[s for s in full if s > stop])
            ok = not missing and d_all <= RESUME_TOL[prec]
            checks.append({"run": label, "check": "exact resume", "pass": ok, "value": d_all,
                           "tolerance": RESUME_TOL[prec], "bit_exact": d_all == 0,
                           "detail": (f"stop at {stop} + relaunch vs uninterrupted: max relative diff {d_all:.2e} "
                                      f"over {n} steps ({d_after:.2e} after the resume)"
                                      + (", bit-exact" if d_all == 0 else "")
                                      + (f"; steps missing: {missing}" if missing else ""))})
    return {"runs": results, "builds": builds, "checks": checks,
            "losses": {k: [v for _, v in sorted(x.items())] for k, x in loss.items()}}


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("error:") or "Error" in line or "error" in line:
            return line.strip()[:300]
    return (text.strip().splitlines() or [""])[-1][:300]


# ------------------------------------------------------------------------------------------------
# Estimate vs measured
# ------------------------------------------------------------------------------------------------
def row_key(label: str) -> str:
    """The estimate row for a bench/smoke label (what the bench records as estimate.row)."""
    base = label.split("@")[0].replace("+gc", "")
    if label == NEGATIVE:  # ddp with another lr
        return "ddp"
    if base in ("trainer", "hand", "ddp", "colossal:torch_ddp"):
        return "ddp" if base != "colossal:torch_ddp" else "colossal:torch_ddp"
    if base == "colossal:low_level_zero":
        return "colossal:zero1"
    return base


def measured_runs(part: str, runs: list[dict], cpu: bool = False) -> list[dict]:
    """The bench runs of a part with a measured GPU peak, in the form the estimate takes. On CPU (the
    rehearsal of this script) the host RSS growth stands in, and the comparison is for information."""
    rows = []
    for r in runs:
        m = (r.get("memory") or {}).get("max_over_ranks", {})
        peak = m.get("gpu_alloc_mb") or (m.get("host_rss_delta_mb") if cpu else None)
        if r.get("outcome") != "ok" or not peak:
            continue
        cpu_rss = bool(cpu and not m.get("gpu_alloc_mb"))  # host RSS growth stands in for the GPU peak
        rows.append({"part": part, "model": r["model"], "label": r["label"], "gpus": max(1, r.get("gpus") or 1),
                     "row": (r.get("estimate") or {}).get("row") or row_key(r["label"]), "gc": "+gc" in r["label"],
                     "seq": r["seq"], "micro_batch": r["micro_batch"], "precision": r["precision"],
                     "lora": (r.get("overrides") or {}).get("model.lora.r"),  # a LoRA run: `estimate --lora R`
                     "cpu_rss": cpu_rss,
                     # torch.compile's fused graph keeps less than the estimator's eager constants (43% less
                     # on the H200 profile part): reported, not a failure (the estimate errs on the safe side)
                     "info_only": cpu_rss or "train.compile=true" in r["label"],
                     "gpu_alloc_mb": peak, "gpu_reserved_mb": m.get("gpu_reserved_mb"),
                     "host_rss_mb": m.get("host_rss_mb"), "bench_json": r.get("name"),
                     "bench_predicted_mb": (r.get("estimate") or {}).get("predicted_per_rank_mb")})
    return rows


def collect_measured(slug_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(slug_dir.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except ValueError:
            continue
        if d.get("kind") == "bench":
            rows += measured_runs(d["part"], d.get("runs", []))
        elif d.get("kind") == "smoke" and d.get("model_spec"):
            for name, r in d.get("runs", {}).items():
                m = r.get("memory") or {}
                if r.get("role") != "main" or r.get("outcome") != "ok" or not m.get("gpu_alloc_mb"):
                    continue
                rows.append({"part": d["part"], "model": d["model_spec"], "label": r["label"], "row": row_key(r["label"]),
                             "gpus": 1, "gc": False, "seq": d["seq"], "micro_batch": d["micro_batch"],
                             "precision": d["precision"], "gpu_alloc_mb": m["gpu_alloc_mb"],
                             "gpu_reserved_mb": m.get("gpu_reserved_mb"), "host_rss_mb": m.get("host_rss_mb"),
                             "bench_json": f"{d['part']}:{name}", "bench_predicted_mb": None, "info_only": False})
    return rows


def estimate_measured(measured: list[dict], env: dict, cache: dict) -> tuple[list[dict], list[dict]]:
    """`engine estimate --json` once per (model, gpus, seq, micro-batch, precision), side by side; then
    each run's row (with or without checkpointing) against its measured peak. One check per run (None
    when the estimate has no row for it)."""
    def key_of(m: dict) -> tuple:
        return m["model"], m["gpus"], m["seq"], m["micro_batch"], m["precision"], m.get("lora")

    keys = list(dict.fromkeys(key_of(m) for m in measured))

    def ask(key) -> None:
        model, gpus, seq, mb, prec, lora = key
        argv = [*ENGINE, "estimate", model, "--gpus", str(gpus), "--seq", str(seq), "--micro-batch", str(mb),
                "--precision", prec, *(["--lora", str(lora)] if lora else []), "--json"]
        r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        try:
            cache[key] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-300:], "rows": []}
        except ValueError:
            cache[key] = {"error": f"not JSON: {r.stdout[:200]}", "rows": []}
        cache[key]["command"] = shlex.join(argv[2:])

    todo = [k for k in keys if k not in cache]
    if todo:
        with ThreadPoolExecutor(max_workers=len(todo)) as ex:
            list(ex.map(ask, todo))
    rows, checks = [], []
    for m in measured:
        est = cache[key_of(m)]
        row = next((x for x in est.get("rows", []) if x.get("backend") == m["row"]), None)
        if row is None:
            rows.append({**m, "measured_mib": m["gpu_alloc_mb"], "predicted_mib": None,
                         "message": f"no estimate row {m['row']!r} {est.get('error', '')}".strip()})
            checks.append(None)
            continue
        pred = (row["total_ckpt"] if m["gc"] else row["total_full"]) / 2**20
        err = pred / m["gpu_alloc_mb"] - 1
        rows.append({**m, "measured_mib": m["gpu_alloc_mb"], "predicted_mib": pred, "rel_error": err,
                     "within_target": abs(err) <= ESTIMATE_TARGET,
                     "host_per_node_mib": row.get("host_per_node", 0) / 2**20, "command": est["command"]})
        checks.append({"run": f"{m['part']}: {m['model']} x {m['label'].split('@')[0]}",
                       "check": f"estimate within {ESTIMATE_TARGET:.0%}",
                       "pass": abs(err) <= ESTIMATE_TARGET or m.get("info_only", False), "info": m.get("info_only", False),
                       "value": err, "detail": f"predicted {pred:,.0f} MiB vs measured "
                                               f"{'host RSS growth (CPU)' if m.get('cpu_rss') else 'peak allocated'} "
                                               f"{m['gpu_alloc_mb']:,.0f} MiB ({err:+.1%})"})
    return rows, checks


def run_estimate(a, slug_dir: Path) -> dict:
    measured = collect_measured(slug_dir)
    for extra in a.estimate_from:
        measured += collect_measured(Path(extra))
    rows, checks = estimate_measured(measured, child_env(True), {})
    checks = [c for c in checks if c]
    if not measured:
        checks.append({"run": "-", "check": "measured runs found", "pass": False,
                       "detail": f"no bench/smoke result JSONs with GPU memory in {slug_dir}"})
    return {"rows": rows, "checks": checks}


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------
def device_info(cpu: bool, nproc: int) -> dict:
    info = {"kind": "cpu", "hostname": platform.node(), "cpu_cores": os.cpu_count(), "python": platform.python_version()}
    if not cpu:
        info.update(gpu_query())
    code = ("import json\nfrom importlib import metadata as m\nout = {}\n"
            "for p in ['torch','transformers','accelerate','deepspeed','colossalai','datasets','pydantic','peft',"
            "'bitsandbytes','galore_torch','huggingface_hub','pyarrow','fsspec','typing_extensions']:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\nprint(json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(cpu))
    info["software"] = json.loads(r.stdout) if r.returncode == 0 else {}
    info["slug"] = device_slug(info, nproc if cpu else 1)
    return info


def gpu_query() -> dict:
    """The GPU's name from nvidia-smi (a fraction of a second; the same name torch reports), else from torch."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=60)
        lines = [x.split(",") for x in r.stdout.strip().splitlines() if x.strip()]
        if r.returncode == 0 and lines:
            return {"kind": "cuda", "gpu_name": lines[0][0].strip(), "gpu_count": len(lines),
                    "gpu_memory_gb": round(float(lines[0][1]) / 1024, 1)}
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        pass
    code = ("import torch, json; p = torch.cuda.get_device_properties(0); "
            "print(json.dumps([p.name, p.total_memory, torch.cuda.device_count()]))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        name, total, count = json.loads(r.stdout.strip().splitlines()[-1])
        return {"kind": "cuda", "gpu_name": name, "gpu_memory_gb": round(total / 2**30, 1), "gpu_count": count}
    except (IndexError, ValueError, subprocess.TimeoutExpired):
        return {"kind": "cuda?", "gpu_name": "unknown GPU"}


def device_slug(info: dict, procs: int) -> str:
    """Same rule as `engine bench` uses for its result folders."""
    if info["kind"].startswith("cuda"):
        name = re.sub(r"[^a-z0-9]+", "-", info["gpu_name"].lower().replace("nvidia", "")).strip("-")
        return f"{name}-x{procs}"
    return f"cpu-{procs}proc"


def fmt_checks(checks: list[dict]) -> list[str]:
    out = ["| run | check | result | detail |", "|---|---|---|---|"]
    for c in checks:
        res = "info" if c.get("info") else ("PASS" if c["pass"] else "**FAIL**")
        out.append(f"| {c['run']} | {c['check']} | {res} | {str(c.get('detail', '')).replace('|', '/')} |")
    return out


def render_md(d: dict, part: Part | None = None) -> str:
    if d["kind"] == "bench" and part is not None:
        return rows_md(part, d["rows"], d["device"], d["started"], d["wall_s"], final=d) + "\n" + "\n".join(
            profiles_md(d.get("profiles", [])) + ["Checks:", ""] + fmt_checks(d["checks"]) + [""])
    lines = [f"## {d['part']}", "", f"{d['started']} on {d['device'].get('gpu_name') or 'CPU'} "
             f"({d['device']['slug']}), {d['wall_s']:.0f} s, "
             f"{'PASS' if d['pass'] else 'FAIL'} ({sum(c['pass'] for c in d['checks'])}/{len(d['checks'])} checks)", ""]
    lines += [f"- {n}" for n in d.get("notes", [])] + [""]
    if d["kind"] == "smoke":
        labels = list(d["losses"])
        if labels:
            steps = max(len(v) for v in d["losses"].values())
            show = sorted({0, 1, steps // 2 - 1, steps // 2, steps - 1} - {-1})
            lines += ["Per-step losses (selected steps; all steps in the JSON):", "",
                      "| backend | " + " | ".join(f"step {s + 1}" for s in show) + " | wall s |",
                      "|---|" + "---|" * (len(show) + 1)]
            for label in labels:
                v = d["losses"][label]
                run = next((r for r in d["runs"].values() if r["label"] == label and r["role"] == "main"), {})
                lines.append(f"| {label} | " + " | ".join(f"{v[s]:.4f}" if s < len(v) else "" for s in show)
                             + f" | {run.get('wall_s', '')} |")
            lines.append("")
        for name, b in d.get("builds", {}).items():
            lines.append(f"- JIT build {name}: {b['outcome']} in {b['wall_s']:.0f} s")
        lines.append("")
    if d["kind"] == "estimate":
        lines += ["| part | model | run | seq | mb | measured peak alloc MiB | predicted MiB | error |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            pred = r.get("predicted_mib")
            tailc = [f"{pred:,.0f}", f"{r['rel_error']:+.1%}"] if pred else [r.get("message", ""), ""]
            cells = [r["part"], r["model"], r["label"], str(r["seq"]), str(r["micro_batch"]), f"{r['gpu_alloc_mb']:,.0f}",
                     *tailc]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        lines += ["", f"Error = predicted / measured - 1 against `torch.cuda.max_memory_allocated` (max over ranks); "
                      f"target |error| <= {ESTIMATE_TARGET:.0%}.", ""]
    lines += ["Checks:", ""] + fmt_checks(d["checks"]) + [""]
    return "\n".join(lines)


def chart(d: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if d["kind"] == "smoke" and d["losses"]:
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, v in d["losses"].items():
            ax.plot(range(1, len(v) + 1), v, label=label, lw=1.2)
        ax.set(xlabel="step", ylabel="train loss", title=f"{d['part']}: per-step loss by backend")
        ax.legend(fontsize=7)
    elif d["kind"] == "estimate" and any(r.get("predicted_mib") for r in d["rows"]):
        fig, ax = plt.subplots(figsize=(6, 6))
        xs = [r["gpu_alloc_mb"] / 1024 for r in d["rows"] if r.get("predicted_mib")]
        ys = [r["predicted_mib"] / 1024 for r in d["rows"] if r.get("predicted_mib")]
        ax.scatter(xs, ys, s=12)
        hi = max(xs + ys) * 1.05
        ax.plot([0, hi], [0, hi], "k-", lw=0.8)
        ax.fill_between([0, hi], [0, hi * (1 - ESTIMATE_TARGET)], [0, hi * (1 + ESTIMATE_TARGET)], alpha=0.15)
        ax.set(xlabel="measured peak allocated GiB", ylabel="predicted GiB", title="engine estimate vs measured")
    elif d["kind"] == "bench" and any(r.get("tokens_per_s") for r in d["rows"] if r.get("kind") == "run"):
        ok = [r for r in d["rows"] if r.get("kind") == "run" and r.get("tokens_per_s")]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.35 * len(ok) + 2))
        names = [f"{r['section']}: {r['model']} {r['name']}" for r in ok]
        ax1.barh(names, [r["tokens_per_s"] for r in ok])
        ax1.set(xlabel="tokens/s (median)")
        ax2.barh(names, [(r.get("peak_alloc_mib") or 0) / 1024 for r in ok])
        ax2.set(xlabel="peak allocated GiB")
        ax2.set_yticklabels([])
        fig.suptitle(d["part"])
    else:
        return False
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_index(slug_dir: Path) -> None:
    order = ["smoke-fp32", *NEXT_ORDER, "estimate"]
    mds = sorted(slug_dir.glob("*.md"), key=lambda f: order.index(f.stem) if f.stem in order else 99)
    body = [f.read_text() for f in mds if f.name != "RESULTS.md"]
    (slug_dir / "RESULTS.md").write_text(f"# GPU proof: {slug_dir.name}\n\nWritten by benchmarks/gpu/run.sh "
                                         "(see benchmarks/gpu/README.md). One section per part.\n\n" + "\n".join(body))


# ------------------------------------------------------------------------------------------------
def print_plan(parts: list[Part], a) -> bool:
    """Every run of every part with its estimated seconds, and each part's total against one call's
    limit. Returns False when a part is over it."""
    ok = True
    for p in parts:
        print(f"\n=== part {p.name} ({p.kind})")
        for n in p.notes:
            print(f"  # {n}")
        if p.common:
            print(f"  COMMON={shlex.quote(shlex.join(p.common))}")
        for b in p.builds:
            print(f"  [build    ~{b.est_s:3d}s] {b.name}: " + " & ".join(shlex.join(x[1:]) for x in b.argvs))
        for l in p.launches:
            args = [x for x in l.argv[3:] if x not in p.common]
            print(f"  [{l.role:8s} ~{l.est_s:3d}s] {l.label:24s} {shlex.join(['engine', *args])} $COMMON")
        for s in p.steps:
            if isinstance(s, Build):
                print(f"  [build ~{s.est_s:3d}s] {s.name}: " + " & ".join(shlex.join(x[1:]) for x in s.argvs))
            elif isinstance(s, Bench):
                print(f"  [bench ~{s.est_s:3d}s] {shlex.join(['engine', *s.argv[3:]])}")
                for r in s.rows:
                    print(f"      {r.section}: {r.model:8s} {r.name:34s} ~{r.est_s:3d}s"
                          + ("  (GPU only)" if not r.on_cpu else "") + ("  [losses vs ddp]" if r.compare else ""))
            elif isinstance(s, EstimateStep):
                print(f"  [estimate ~{s.est_s}s] engine estimate MODEL --gpus 1 --seq S --micro-batch B --precision P "
                      "--json, for every measured run without an estimate yet")
        if p.kind == "estimate":
            print("  for each measured run in OUT/<slug>/*.json: engine estimate MODEL --gpus 1 --seq S "
                  "--micro-batch B --precision P --json; row = the run's backend; compare with peak allocated")
        items = part_estimate(p)
        total = sum(s for _, s in items)
        print("  time, estimated (fresh H100; README \"Time estimates\"):")
        for what, s in items:
            print(f"    {s:4d} s  {what}")
        verdict = "OK" if total <= a.budget_s else ("OVER the runtime budget: its last runs would be skipped"
                                                   if total <= CALL_LIMIT_S else "OVER ONE CALL'S LIMIT")
        print(f"  total ~{total} s ({total // 60} min {total % 60:02d} s) of {CALL_LIMIT_S} s per call "
              f"(runtime budget {a.budget_s:.0f} s): {verdict}")
        if total > CALL_LIMIT_S:
            ok = False
            print(f"  !!! part {p.name} is estimated at {total} s, over the {CALL_LIMIT_S} s one call may take: "
                  f"re-cut it before spending a grant on it !!!")
        elif total > a.budget_s:
            print(f"  !!! warning: part {p.name} ({total} s) is over the runtime budget ({a.budget_s:.0f} s) !!!")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--dry-run", action="store_true", help="print every run with its command line; start nothing")
    ap.add_argument("--cpu", action="store_true", help="CPU processes (gloo), fp32, tiny models: checks this "
                    "script's own logic without a GPU (smoke, headline)")
    ap.add_argument("--nproc", type=int, default=1, help="--cpu: processes per run")
    ap.add_argument("--jobs", type=int, default=4, help="smoke on GPU: launches at a time (small models share the GPU)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    ap.add_argument("--work", default=os.environ.get("ENGINE_GPU_WORK", "/tmp/engine-gpu"),
                    help="run directories and logs (not brought back)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("ENGINE_GPU_BUDGET_S", BUDGET_S)),
                    help="seconds per part (the first counted from the call's start, ENGINE_GPU_T0); runs that "
                         "would start after it are recorded as skipped")
    ap.add_argument("--results", default=None, help="next: the folder of finished parts (default "
                    "benchmarks/results/<device-slug> in this tree)")
    ap.add_argument("--slug", default=None, help="next: the device slug instead of asking the GPU (plan here)")
    ap.add_argument("--resume-all", action="store_true", help="check resume for every smoke variant")
    ap.add_argument("--no-negative-control", dest="negative_control", action="store_false",
                    help="smoke: leave out ddp with lr x2, the planted bug the closeness check must flag")
    ap.add_argument("--compile", action="store_true", help="matrix-gpt2: add train.compile=true rows")
    ap.add_argument("--estimate-from", action="append", default=[], help="more folders of <part>.json to estimate")
    a = ap.parse_args(argv)
    a.work = Path(a.work)
    if a.parts[0] == "plan":
        a.dry_run = True
        a.parts = a.parts[1:] or ["all"]
    device = None
    if "next" in a.parts:
        if a.slug:
            slug = a.slug
        else:
            device = device_info(a.cpu, a.nproc)
            slug = device["slug"]
        results = [Path(a.results)] if a.results else gpu_result_dirs(REPO / "benchmarks" / "results", slug)
        where = ", ".join(str(r) for r in results)
        pick = next_part(results)
        if pick is None:
            print(f"next: every part's <part>.json is in {where}: nothing left to run ({', '.join(NEXT_ORDER)})")
            return 0
        print(f"next: {pick} (the first of {', '.join(NEXT_ORDER)} without {pick}.json in {where})", flush=True)
        a.parts = [pick if x == "next" else x for x in a.parts]
    names = expand(a.parts)
    if a.cpu:
        names = ["smoke-fp32" if n.startswith("smoke") else n for n in names]
        names = [n for i, n in enumerate(names) if n not in names[:i]]
        bad = [n for n in names if n not in ("smoke-fp32", "headline", "parity-gpt2", "profile", "families-lora",
                                             "estimate")]
        if bad:
            print(f"--cpu runs the smoke, headline and families-lora parts only (fp32, tiny models); "
                  f"not: {', '.join(bad)}")
            return 2
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        print(f"unknown part(s): {', '.join(unknown)}; known: {', '.join(NEXT_ORDER)}, estimate; groups: "
              f"{', '.join(GROUPS)}; next; plan [PART]")
        return 2
    parts = [build(n, a) for n in names]
    if a.dry_run:
        return 0 if print_plan(parts, a) else 1

    device = device or device_info(a.cpu, a.nproc)
    if not a.cpu and device["kind"] != "cuda":
        print(f"error: no CUDA GPU visible ({device.get('gpu_name')}); use --cpu to check the script's logic on CPU")
        return 2
    slug_dir = Path(a.out) / device["slug"]
    slug_dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {device.get('gpu_name', 'CPU')} -> {slug_dir}; software: {device['software']}", flush=True)
    failed = False
    call_t0 = float(os.environ.get("ENGINE_GPU_T0") or time.time())  # run.sh's start: the install counts
    for i, p in enumerate(parts):
        t0 = time.time()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        deadline = (call_t0 if i == 0 else t0) + a.budget_s
        print(f"\n=== {p.name} ({deadline - t0:.0f} s of budget left)", flush=True)
        shutil.rmtree(a.work / p.name, ignore_errors=True)  # a warm machine keeps /tmp: no rows from a last call
        log = RowLog(slug_dir, p, device, started, t0)
        if i == 0 and os.environ.get("ENGINE_GPU_INSTALL_S"):
            log.add({"kind": "setup", "name": "wheel install + import check (run.sh)", "outcome": "ok",
                     "wall_s": float(os.environ["ENGINE_GPU_INSTALL_S"])})
        if p.kind == "smoke":
            body = run_smoke(p, a, deadline, log)
            kv = {x.split("=", 1)[0].split(".")[-1]: x.split("=", 1)[1] for x in p.launches[0].argv
                  if x.startswith(("model.config.", "data.block_size=", "train.micro_batch_size="))}
            vocab = None
            for l in p.launches:
                cfg = l.output_dir / "model" / "config.json"
                if cfg.exists():
                    vocab = json.loads(cfg.read_text()).get("vocab_size")
                    break
            body["model_spec"] = (f"gpt2:L={kv['n_layer']},d={kv['n_embd']},h={kv['n_head']},V={vocab},"
                                  f"ctx={kv['n_positions']}") if vocab else None
            body["seq"], body["micro_batch"], body["precision"] = int(kv["block_size"]), int(kv["micro_batch_size"]), p.precision
            body["rows"] = log.rows
        elif p.kind == "bench":
            body = run_bench_part(p, a, deadline, log)
            body["profiles"] = collect_profiles(a.work / p.name / "runs")
        else:
            body = run_estimate(a, slug_dir)
        d = {"part": p.name, "kind": p.kind, "started": started, "wall_s": time.time() - t0, "device": device,
             "notes": p.notes, "tolerances": {"cross_backend_rel": CROSS_TOL, "resume_rel": RESUME_TOL,
                                              "estimate_rel": ESTIMATE_TARGET},
             "plan": [{"role": l.role, "label": l.label, "command": shlex.join(["engine", *l.argv[3:]])}
                      for l in p.launches] + [{"bench": b.name, "command": shlex.join(["engine", *b.argv[3:]]),
                                               "runs": [f"{r.section}: {r.model} {r.name}" for r in b.rows]}
                                              for b in p.benches],
             "estimated_s": part_estimate(p), **body}
        d["pass"] = all(c["pass"] for c in d["checks"]) and bool(d["checks"])
        failed |= not d["pass"]
        (slug_dir / f"{p.name}.json").write_text(json.dumps(d, indent=1, default=str) + "\n")
        (slug_dir / f"{p.name}.md").write_text(render_md(d, p))
        chart(d, slug_dir / f"{p.name}.png")
        if p.benches and p.benches[0].results_dir.exists():
            with tarfile.open(slug_dir / f"{p.name}-bench.tar.gz", "w:gz") as tf:
                tf.add(p.benches[0].results_dir, arcname=f"{p.name}-bench")
                for pr in d.get("profiles", []):  # rank 0's table and summary (traces stay: MBs each on a GPU)
                    for f in (Path(pr["table"]), Path(pr["table"]).with_suffix(".json")):
                        tf.add(f, arcname=f"{p.name}-bench/profile/{pr['run']}/{f.name}")
        write_index(slug_dir)
        for c in d["checks"]:
            if not c["pass"] or c.get("info"):
                print(f"  {'info' if c.get('info') else 'FAIL'}: {c['run']}: {c['check']}: {c.get('detail', '')}")
        print(f"=== {p.name}: {'PASS' if d['pass'] else 'FAIL'} ({sum(c['pass'] for c in d['checks'])}/"
              f"{len(d['checks'])} checks, {d['wall_s']:.0f} s; call {time.time() - call_t0:.0f} s) -> "
              f"{slug_dir / (p.name + '.json')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
