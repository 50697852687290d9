#!/usr/bin/env python3
"""Proves the engine's GPU path on one GPU, through the engine's CLI only.

Started by benchmarks/gpu/run.sh (which installs the carried wheels first); see README.md here.

    python benchmarks/gpu/driver.py PART [PART ...] [--dry-run] [--cpu] [--out DIR] [--budget-s S]

PART: smoke (= smoke-bf16 + smoke-fp16), smoke-bf16, smoke-fp16, matrix (= matrix-gpt2 +
matrix-xl-1 + matrix-xl-2), matrix-gpt2, matrix-xl-1, matrix-xl-2, largest (= largest-neo +
largest-gptj), largest-neo, largest-gptj, estimate, all, plan (= every part, --dry-run).

Every training run is an `engine launch` or `engine bench` subprocess (python -m engine.cli) and
every figure is read from run directories (metrics.jsonl, model/) or the bench's result JSONs, so
this script does not depend on engine internals (the bench harness is moving, the backends are
being refactored). Results: OUT/<device-slug>/<part>.json, <part>.md, <part>.png,
<part>-bench.tar.gz (the bench's own JSONs), and RESULTS.md (every <part>.md there, concatenated):
at most 6 files per part, since the device tool brings back 8.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE = [sys.executable, "-m", "engine.cli"]

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
CROSS_TOL = {"bf16": 0.02, "fp16": 0.01, "fp32": 1e-5}
# Resume: the relaunched run's per-step losses against the uninterrupted run's. fp32 on CPU must
# be bit-exact (the engine's tested claim). On a GPU a resume that restores everything is exact as
# long as the kernels are deterministic; atomics in some backward kernels (and cuBLAS split-K
# choices) make two *uninterrupted* runs differ in the last bits, and a 16-bit loss then differs
# by ~1e-4 relative. A broken resume (optimizer moments, loss scale, lr schedule or data position
# not restored) shows at step 11 as a jump of 1e-2 or more. So 1e-3 relative for bf16/fp16, and
# the JSON records whether it was bit-exact and how far two uninterrupted DDP runs differ.
RESUME_TOL = {"bf16": 1e-3, "fp16": 1e-3, "fp32": 0.0}
ESTIMATE_TARGET = 0.15  # |predicted / measured - 1| for the peak allocated GPU memory

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
    "fp16": ["ddp", "deepspeed:zero2+offload", "deepspeed:zero3", "colossal:zero2"],
    "fp32": ["ddp", "deepspeed:zero2"],
}
CPU_VARIANTS = ["ddp", "deepspeed:zero0", "deepspeed:zero2"]  # what runs on CPU processes (gloo)
# --negative-control: ddp with twice the learning rate, a planted bug the closeness check must flag
NEGATIVE = "ddp:lr-x2 (negative control)"

ALL_BACKENDS = ("ddp,deepspeed:zero0,deepspeed:zero1,deepspeed:zero2,deepspeed:zero3,deepspeed:zero2+offload,"
                "deepspeed:zero3+offload,colossal:torch_ddp,colossal:zero1,colossal:zero2,colossal:gemini")


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Launch:          # one `engine launch`
    name: str
    label: str
    precision: str
    argv: list[str]
    output_dir: Path
    role: str = "main"     # main | repeat (ddp twice: GPU determinism) | resume-1 | resume-2
    est_s: int = 40


@dataclass
class Bench:           # one `engine bench`
    name: str
    argv: list[str]
    runs: list[str]        # "model x backend" it will start, for the plan
    est_s: int
    results_dir: Path


@dataclass
class Part:
    name: str
    kind: str              # smoke | bench | estimate
    precision: str = "bf16"
    launches: list[Launch] = field(default_factory=list)
    benches: list[Bench] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    common: list[str] = field(default_factory=list)  # smoke: overrides every launch shares


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
    resume = labels if a.resume_all else [x for x in RESUME_SUBSET[precision] if x in labels]
    p = Part(name, "smoke", precision)
    p.common = common
    # slow first uses (JIT-built CPU Adam, ColossalAI kernels) first, so they overlap the rest
    order = sorted(labels, key=lambda x: 0 if ("offload" in x or "gemini" in x) else 1)
    for label in order:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")
        flags = [x for x in args[label] if x.startswith("--") or x in ("ddp", "deepspeed", "colossal")]
        over = [x for x in args[label] if x not in flags]
        base = [*ENGINE, "launch", *gpus, *flags, *common, *over]  # later overrides win
        out = work / slug
        p.launches.append(Launch(f"{slug}", label, precision, base + [f"output_dir={out}"], out,
                                 est_s=90 if ("offload" in label or "gemini" in label) else 40))
        if label in resume:
            rout = work / f"{slug}-resume"
            p.launches.append(Launch(f"{slug}-resume-1", label, precision,
                                     base + [f"output_dir={rout}", f"train.stop_at_step={stop}"], rout, "resume-1"))
            p.launches.append(Launch(f"{slug}-resume-2", label, precision, base + [f"output_dir={rout}"], rout,
                                     "resume-2"))
        if label == "ddp":
            rep = work / f"{slug}-repeat"
            p.launches.append(Launch(f"{slug}-repeat", label, precision, base + [f"output_dir={rep}"], rep, "repeat"))
    p.notes = [
        f"model: GPT-2 built from config ({model['n_layer']} layers x {model['n_embd']}, {model['n_head']} heads, "
        f"dropout off), tokenizer and data builtin:sample, seq {seq}, micro-batch {mb}, {steps} steps, "
        f"lr 1e-3 linear with 10% warm-up, clipping 1.0, seed 0, {precision}, "
        + ("CPU processes (gloo) x " + str(a.nproc) if cpu else "1 GPU") + ".",
        f"resume checked for: {', '.join(resume)} (stop at step {stop}, relaunch on the same output_dir).",
        f"tolerances: cross-backend {CROSS_TOL[precision]:g} relative per step vs ddp; resume "
        f"{RESUME_TOL[precision]:g} relative per step vs the uninterrupted run.",
    ]
    return p


def bench_part(name: str, a) -> Part:
    out = a.work / name / "results"
    wd = a.work / name / "runs"

    def bench(tag, models, backends, baselines, seq, mb, warmup, steps, est_s, timeout):
        argv = [*ENGINE, "bench", "--gpus", "1", "--models", models, "--backends", backends,
                "--baselines", baselines, "--seq", str(seq), "--micro-batch", str(mb), "--precision", "bf16",
                "--warmup", str(warmup), "--steps", str(steps), "--timeout", str(timeout),
                "--out", str(out), "--work-dir", str(wd / tag)]
        runs = [f"{m} x {b}" for m in models.split(",") for b in (backends + "," + baselines).split(",") if b]
        return Bench(f"{name}:{tag}", argv, runs, est_s, out)

    p = Part(name, "bench")
    compile_note = []
    if name == "matrix-gpt2":
        # the bench logs every step (a host sync per step, like both baselines); the log_every=5 row
        # measures what keeping losses on the device between log steps saves (5-step windows)
        backends = ALL_BACKENDS + ",ddp@train.log_every=5"
        if a.compile:
            backends += ",ddp@train.compile=true,deepspeed:zero2@train.compile=true"
            compile_note = ["--compile: adds ddp and deepspeed:zero2 with train.compile=true."]
        p.benches.append(bench("gpt2", "gpt2", backends, "trainer,hand", 1024, 16, 5, 10, 480, 240))
        p.notes = ["gpt2 (124M), bf16, seq 1024, micro-batch 16 (model states 2 GB, activations + logits "
                   "about 17 GB: far from 80 GB, big enough to keep the GPU busy), 5 warm-up + 10 measured steps "
                   "(multiples of 5, so the log_every=5 row's windows hold measured steps only)."]
    elif name == "matrix-xl-1":
        p.benches.append(bench("xl-1", "gpt2-xl", "ddp,deepspeed:zero0,deepspeed:zero1,deepspeed:zero2,deepspeed:zero3",
                               "trainer,hand", 1024, 4, 2, 6, 500, 240))
        p.notes = ["gpt2-xl (1.5B), bf16, seq 1024, micro-batch 4: DDP holds 16 B/param of fp32 weights, "
                   "grads and Adam (25 GB) + 2 B autocast copies + ~14 GB activations and logits (~42 GB); "
                   "2 warm-up + 6 measured steps (each run also builds a 1.5B model on the host first)."]
    elif name == "matrix-xl-2":
        p.benches.append(bench("xl-2", "gpt2-xl",
                               "deepspeed:zero2+offload,deepspeed:zero3+offload,colossal:torch_ddp,"
                               "colossal:zero1,colossal:zero2,colossal:gemini", "hand", 1024, 4, 2, 6, 520, 300))
        p.notes = ["gpt2-xl, same settings as matrix-xl-1, the offload and ColossalAI rows (+ the hand loop "
                   "again, as the in-call reference for ratios: machines differ between calls)."]
    elif name == "largest-neo":
        p.benches.append(bench("neo", "gpt-neo-2.7B", "ddp+gc,deepspeed:zero2+gc,colossal:gemini+gc", "",
                               1024, 1, 1, 3, 480, 200))
        p.notes = ["gpt-neo-2.7B, bf16, seq 1024, micro-batch 1, gradient checkpointing, 1 warm-up + 3 steps: "
                   "DDP needs ~16 B/param = 43 GB of states + 5 GB autocast copies; ZeRO-2 and Gemini ~16 B/param "
                   "too on one GPU (no sharding partner) but 16-bit working weights."]
    elif name == "largest-gptj":
        p.benches.append(bench("gptj-z3off", "gpt-j-6B", "deepspeed:zero3+offload+gc", "", 1024, 1, 1, 3, 330, 320))
        p.benches.append(bench("gptj-z2off", "gpt-j-6B", "deepspeed:zero2+offload+gc", "", 1024, 1, 1, 3, 300, 280))
        p.notes = ["gpt-j-6B (6.05B), bf16, seq 1024, micro-batch 1, gradient checkpointing, 1 warm-up + 3 steps: "
                   "ZeRO-3 with parameters and optimizer offloaded (host: fp32 master + Adam + fp32 grads = "
                   "16 B/param = ~97 GB of the machine's 128 GB), then, if time is left, ZeRO-2 + optimizer "
                   "offload (GPU keeps 16-bit weights + grads, ~24 GB)."]
    p.notes += compile_note
    return p


def expand(parts: list[str]) -> list[str]:
    groups = {"smoke": ["smoke-bf16", "smoke-fp16"], "matrix": ["matrix-gpt2", "matrix-xl-1", "matrix-xl-2"],
              "largest": ["largest-neo", "largest-gptj"]}
    groups["all"] = groups["smoke"] + groups["matrix"] + groups["largest"] + ["estimate"]
    groups["plan"] = groups["all"]
    out = []
    for p in parts:
        for q in groups.get(p, [p]):
            if q not in out:
                out.append(q)
    return out


KNOWN = {"smoke-bf16", "smoke-fp16", "smoke-fp32", "matrix-gpt2", "matrix-xl-1", "matrix-xl-2",
         "largest-neo", "largest-gptj", "estimate"}


def build(name: str, a) -> Part:
    if name.startswith("smoke-"):
        return smoke_part(name, name.split("-", 1)[1], a)
    if name == "estimate":
        return Part(name, "estimate", notes=["`engine estimate MODEL --gpus 1 --seq S --micro-batch B --precision P "
                                             "--json` for every measured run found in the result folder."])
    return bench_part(name, a)


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


def run_cmd(argv: list[str], log: Path, timeout: float, env: dict) -> tuple[int, float, bool]:
    """Run in its own process group; on timeout kill the whole group (torchrun workers too)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(argv) + "\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
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


def run_smoke(part: Part, a, deadline: float) -> dict:
    env = child_env(a.cpu)
    results: dict[str, dict] = {}
    logs = a.work / part.name / "logs"

    def one(l: Launch) -> None:
        left = deadline - time.time()
        if left < 20:
            results[l.name] = {"label": l.label, "role": l.role, "outcome": "skipped",
                               "message": "part time budget used up"}
            return
        code, wall, to = run_cmd(l.argv, logs / f"{l.name}.log", left, env)
        r = {"label": l.label, "role": l.role, "command": shlex.join(l.argv[2:]), "exit_code": code,
             "wall_s": round(wall, 1), "outcome": "timeout" if to else ("ok" if code == 0 else "error"),
             "output_dir": str(l.output_dir)}
        if code != 0:
            r["log_tail"] = tail(logs / f"{l.name}.log")
        results[l.name] = r

    # resume-2 must follow its resume-1: chain them; everything else is independent
    chains: list[list[Launch]] = []
    for l in part.launches:
        if l.role == "resume-2":
            chains[-1].append(l)
        else:
            chains.append([l])
    if a.cpu:
        jobs = 1
    else:
        jobs = a.jobs
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        list(ex.map(lambda chain: [one(l) for l in chain], chains))

    # ---- checks ----
    checks = []
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
                       "detail": r["outcome"] + ("" if ok_run else ": " + _first_error(r.get("log_tail", "")))})
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
                               "detail": "a run failed: " + bad["outcome"] + " " + _first_error(bad.get("log_tail", ""))})
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
    return {"runs": results, "checks": checks, "losses": {k: [v for _, v in sorted(x.items())] for k, x in loss.items()}}


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("error:") or "Error" in line or "error" in line:
            return line.strip()[:300]
    return (text.strip().splitlines() or [""])[-1][:300]


def run_bench(part: Part, a, deadline: float) -> dict:
    env = child_env(a.cpu)
    out = {"benches": [], "runs": []}
    logs = a.work / part.name / "logs"
    for b in part.benches:
        left = deadline - time.time()
        entry = {"name": b.name, "command": shlex.join(b.argv[2:]), "planned_runs": b.runs}
        if left < min(b.est_s, 120):
            entry.update(outcome="skipped", message=f"part time budget: {left:.0f} s left, ~{b.est_s} s needed")
            out["benches"].append(entry)
            continue
        code, wall, to = run_cmd(b.argv, logs / f"{b.name.replace(':', '-')}.log", left, env)
        entry.update(exit_code=code, wall_s=round(wall, 1), outcome="timeout" if to else ("ok" if code == 0 else "error"))
        if code != 0:
            entry["log_tail"] = tail(logs / f"{b.name.replace(':', '-')}.log")
        out["benches"].append(entry)
    seen = set()
    for f in sorted(part.benches[0].results_dir.glob("*/*.json")) if part.benches else []:
        try:
            r = json.loads(f.read_text())
        except ValueError:
            continue
        if r.get("name") in seen:
            continue
        seen.add(r.get("name"))
        r.pop("config", None)  # the full resolved config is in the tarball
        out["runs"].append(r)
    checks = []
    for b in out["benches"]:
        for run in b["planned_runs"]:
            r = next((x for x in out["runs"] if f"{x['model']} x {x['label']}" == run), None)
            if r is None:
                checks.append({"run": run, "check": "ran", "pass": False,
                               "detail": f"no result ({b.get('outcome')}: {b.get('message', '')})"})
            else:
                checks.append({"run": run, "check": "ran", "pass": r["outcome"] == "ok",
                               "detail": r["outcome"] + (": " + r.get("message", "")[:200] if r["outcome"] != "ok" else "")})
    out["checks"] = checks
    return out


# ------------------------------------------------------------------------------------------------
# Estimate vs measured
# ------------------------------------------------------------------------------------------------
def row_key(label: str) -> str:
    """The estimate row for a bench/smoke label (what the bench records as estimate.row)."""
    base = label.split("@")[0].replace("+gc", "")
    if base in ("trainer", "hand", "ddp", "colossal:torch_ddp"):
        return "ddp" if base != "colossal:torch_ddp" else "colossal:torch_ddp"
    if base == "colossal:low_level_zero":
        return "colossal:zero1"
    if base == "deepspeed:zero3+offload_opt":
        return "deepspeed:zero3+offload_opt"
    return base


def collect_measured(slug_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(slug_dir.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except ValueError:
            continue
        if d.get("part", "").startswith(("matrix", "largest")):
            for r in d.get("runs", []):
                m = (r.get("memory") or {}).get("max_over_ranks", {})
                if r.get("outcome") != "ok" or not m.get("gpu_alloc_mb"):
                    continue
                gc = "+gc" in r["label"]
                rows.append({"part": d["part"], "model": r["model"], "label": r["label"], "gpus": max(1, r.get("gpus") or 1),
                             "row": (r.get("estimate") or {}).get("row") or row_key(r["label"]), "gc": gc,
                             "seq": r["seq"], "micro_batch": r["micro_batch"], "precision": r["precision"],
                             "gpu_alloc_mb": m["gpu_alloc_mb"], "gpu_reserved_mb": m.get("gpu_reserved_mb"),
                             "host_rss_mb": m.get("host_rss_mb"),
                             "bench_predicted_mb": (r.get("estimate") or {}).get("predicted_per_rank_mb")})
        elif d.get("part", "").startswith("smoke") and d.get("model_spec"):
            for name, r in d.get("runs", {}).items():
                m = r.get("memory") or {}
                if r.get("role") != "main" or r.get("outcome") != "ok" or not m.get("gpu_alloc_mb"):
                    continue
                rows.append({"part": d["part"], "model": d["model_spec"], "label": r["label"], "row": row_key(r["label"]), "gpus": 1,
                             "gc": False, "seq": d["seq"], "micro_batch": d["micro_batch"], "precision": d["precision"],
                             "gpu_alloc_mb": m["gpu_alloc_mb"], "gpu_reserved_mb": m.get("gpu_reserved_mb"),
                             "host_rss_mb": m.get("host_rss_mb"), "bench_predicted_mb": None})
    return rows


def run_estimate(a, slug_dir: Path) -> dict:
    env = child_env(True)
    cache: dict[tuple, dict] = {}
    rows, checks = [], []
    measured = collect_measured(slug_dir)
    for extra in a.estimate_from:
        measured += collect_measured(Path(extra))
    for m in measured:
        key = (m["model"], m["gpus"], m["seq"], m["micro_batch"], m["precision"])
        if key not in cache:
            argv = [*ENGINE, "estimate", m["model"], "--gpus", str(m["gpus"]), "--seq", str(m["seq"]), "--micro-batch",
                    str(m["micro_batch"]), "--precision", m["precision"], "--json"]
            r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            cache[key] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-300:], "rows": []}
            cache[key]["command"] = shlex.join(argv[2:])
        est = cache[key]
        row = next((x for x in est.get("rows", []) if x.get("backend") == m["row"]), None)
        if row is None:
            rows.append({**m, "predicted_mb": None, "error": f"no estimate row {m['row']!r}: {est.get('error', '')}"})
            continue
        pred = (row["total_ckpt"] if m["gc"] else row["total_full"]) / 2**20
        err = pred / m["gpu_alloc_mb"] - 1
        rows.append({**m, "predicted_mb": pred, "rel_error": err, "within_target": abs(err) <= ESTIMATE_TARGET,
                     "host_per_node_mb": row.get("host_per_node", 0) / 2**20, "command": est["command"]})
        checks.append({"run": f"{m['part']}: {m['model']} x {m['label']}", "check": f"estimate within {ESTIMATE_TARGET:.0%}",
                       "pass": abs(err) <= ESTIMATE_TARGET, "value": err,
                       "detail": f"predicted {pred:,.0f} MiB vs measured peak allocated {m['gpu_alloc_mb']:,.0f} MiB "
                                 f"({err:+.1%})"})
    if not measured:
        checks.append({"run": "-", "check": "measured runs found", "pass": False,
                       "detail": f"no matrix/largest/smoke result JSONs with GPU memory in {slug_dir}"})
    return {"rows": rows, "checks": checks}


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------
def device_info(cpu: bool, nproc: int) -> dict:
    info = {"kind": "cpu", "hostname": platform.node(), "cpu_cores": os.cpu_count(), "python": platform.python_version()}
    if not cpu:
        code = ("import torch, json; p = torch.cuda.get_device_properties(0); "
                "print(json.dumps([p.name, p.total_memory, torch.version.cuda, torch.cuda.device_count()]))")
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            name, total, cuda, count = json.loads(r.stdout.strip().splitlines()[-1])
            info.update(kind="cuda", gpu_name=name, gpu_memory_gb=round(total / 2**30, 1), cuda=cuda, gpu_count=count)
        except (IndexError, ValueError, subprocess.TimeoutExpired):
            info.update(kind="cuda?", gpu_name="unknown GPU")
    code = ("import json\nfrom importlib import metadata as m\nout = {}\n"
            "for p in ['torch','transformers','accelerate','deepspeed','colossalai','datasets','pydantic','peft',"
            "'bitsandbytes','galore_torch','huggingface_hub','pyarrow','fsspec','typing_extensions']:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\nprint(json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    info["software"] = json.loads(r.stdout) if r.returncode == 0 else {}
    info["slug"] = device_slug(info, nproc if cpu else 1)
    return info


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


def render_md(d: dict) -> str:
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
    if d["kind"] == "bench":
        lines += ["| model | run | outcome | tok/s median | MFU | peak alloc GiB | peak reserved GiB | host RSS GiB | "
                  "predicted GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in d["runs"]:
            m = (r.get("memory") or {}).get("max_over_ranks", {})
            g = lambda k: f"{m[k] / 1024:.1f}" if m.get(k) else ""
            tps = (r.get("tokens_per_s") or {}).get("median")
            mfu = (r.get("mfu") or {}).get("mfu")
            pred = (r.get("estimate") or {}).get("predicted_per_rank_mb")
            outcome = r["outcome"] + (f": {r.get('message', '')[:80]}" if r["outcome"] != "ok" else "")
            cells = [r["model"], r["label"], outcome, f"{tps:,.0f}" if tps else "", f"{mfu:.1%}" if mfu else "",
                     g("gpu_alloc_mb"), g("gpu_reserved_mb"), g("host_rss_mb"), f"{pred / 1024:.1f}" if pred else ""]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        lines += ["", "Full tables (x Trainer, x hand, p10-p90, estimate vs measured): the bench's own RESULTS.md "
                      f"in `{d['part']}-bench.tar.gz`.", ""]
    if d["kind"] == "estimate":
        lines += ["| part | model | run | seq | mb | measured peak alloc MiB | predicted MiB | error |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            pred = r.get("predicted_mb")
            tailc = [f"{pred:,.0f}", f"{r['rel_error']:+.1%}"] if pred else [r.get("error", ""), ""]
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
    elif d["kind"] == "estimate" and any(r.get("predicted_mb") for r in d["rows"]):
        fig, ax = plt.subplots(figsize=(6, 6))
        xs = [r["gpu_alloc_mb"] / 1024 for r in d["rows"] if r.get("predicted_mb")]
        ys = [r["predicted_mb"] / 1024 for r in d["rows"] if r.get("predicted_mb")]
        ax.scatter(xs, ys, s=12)
        hi = max(xs + ys) * 1.05
        ax.plot([0, hi], [0, hi], "k-", lw=0.8)
        ax.fill_between([0, hi], [0, hi * (1 - ESTIMATE_TARGET)], [0, hi * (1 + ESTIMATE_TARGET)], alpha=0.15)
        ax.set(xlabel="measured peak allocated GiB", ylabel="predicted GiB", title="engine estimate vs measured")
    elif d["kind"] == "bench" and any((r.get("tokens_per_s") or {}).get("median") for r in d["runs"]):
        ok = [r for r in d["runs"] if (r.get("tokens_per_s") or {}).get("median")]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.35 * len(ok) + 2))
        names = [f"{r['model']} {r['label']}" for r in ok]
        ax1.barh(names, [r["tokens_per_s"]["median"] for r in ok])
        ax1.set(xlabel="tokens/s (median)")
        ax2.barh(names, [((r.get("memory") or {}).get("max_over_ranks", {}).get("gpu_alloc_mb") or 0) / 1024 for r in ok])
        ax2.set(xlabel="peak allocated GiB")
        ax2.set_yticklabels([])
        fig.suptitle(d["part"])
    else:
        return False
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
def print_plan(parts: list[Part], a) -> None:
    for p in parts:
        print(f"\n=== part {p.name} ({p.kind})")
        for n in p.notes:
            print(f"  # {n}")
        if p.common:
            print(f"  COMMON={shlex.quote(shlex.join(p.common))}")
        for l in p.launches:
            args = [x for x in l.argv[3:] if x not in p.common]
            print(f"  [{l.role:8s}] {l.label:24s} {shlex.join(['engine', *args])} $COMMON")
        for b in p.benches:
            print(f"  [bench ~{b.est_s}s] {shlex.join(['engine', *b.argv[3:]])}")
            for r in b.runs:
                print(f"      run: {r}")
        if p.kind == "estimate":
            print("  for each measured run in OUT/<slug>/*.json: engine estimate MODEL --gpus 1 --seq S "
                  "--micro-batch B --precision P --json; row = the run's backend; compare with peak allocated")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--dry-run", action="store_true", help="print every run with its command line; start nothing")
    ap.add_argument("--cpu", action="store_true", help="CPU processes (gloo), fp32, ddp + deepspeed zero0/zero2, "
                    "tiny model: validates this script's own logic without a GPU (smoke only)")
    ap.add_argument("--nproc", type=int, default=1, help="--cpu: processes per run")
    ap.add_argument("--jobs", type=int, default=4, help="smoke on GPU: launches at a time (small models share the GPU)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    ap.add_argument("--work", default=os.environ.get("ENGINE_GPU_WORK", "/tmp/engine-gpu"),
                    help="run directories and logs (not brought back)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("ENGINE_GPU_BUDGET_S", 540)),
                    help="seconds per part; runs that would start after it are recorded as skipped")
    ap.add_argument("--resume-all", action="store_true", help="check resume for every smoke variant")
    ap.add_argument("--no-negative-control", dest="negative_control", action="store_false",
                    help="smoke: leave out ddp with lr x2, the planted bug the closeness check must flag")
    ap.add_argument("--compile", action="store_true", help="matrix-gpt2: add train.compile=true rows")
    ap.add_argument("--estimate-from", action="append", default=[], help="more folders of <part>.json to estimate")
    a = ap.parse_args(argv)
    a.work = Path(a.work)
    names = expand(a.parts)
    if "plan" in a.parts:
        a.dry_run = True
    if a.cpu:
        names = ["smoke-fp32" if n.startswith("smoke") else n for n in names]
        names = [n for i, n in enumerate(names) if n not in names[:i]]
        bad = [n for n in names if n not in ("smoke-fp32", "estimate")]
        if bad:
            print(f"--cpu runs the smoke part only (fp32, ddp + deepspeed zero0/zero2); not: {', '.join(bad)}")
            return 2
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        print(f"unknown part(s): {', '.join(unknown)}; known: smoke, smoke-bf16, smoke-fp16, matrix, matrix-gpt2, "
              f"matrix-xl-1, matrix-xl-2, largest, largest-neo, largest-gptj, estimate, all, plan")
        return 2
    parts = [build(n, a) for n in names]
    if a.dry_run:
        print_plan(parts, a)
        return 0

    device = device_info(a.cpu, a.nproc)
    if not a.cpu and device["kind"] != "cuda":
        print(f"error: no CUDA GPU visible ({device.get('gpu_name')}); use --cpu to check the script's logic on CPU")
        return 2
    slug_dir = Path(a.out) / device["slug"]
    slug_dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {device.get('gpu_name', 'CPU')} -> {slug_dir}; software: {device['software']}", flush=True)
    failed = False
    for p in parts:
        t0 = time.time()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"\n=== {p.name} (budget {a.budget_s:.0f} s)", flush=True)
        deadline = t0 + a.budget_s
        if p.kind == "smoke":
            body = run_smoke(p, a, deadline)
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
        elif p.kind == "bench":
            body = run_bench(p, a, deadline)
        else:
            body = run_estimate(a, slug_dir)
        d = {"part": p.name, "kind": p.kind, "started": started, "wall_s": time.time() - t0, "device": device,
             "notes": p.notes, "tolerances": {"cross_backend_rel": CROSS_TOL, "resume_rel": RESUME_TOL,
                                              "estimate_rel": ESTIMATE_TARGET},
             "plan": [{"role": l.role, "label": l.label, "command": shlex.join(["engine", *l.argv[3:]])}
                      for l in p.launches] + [{"bench": b.name, "command": shlex.join(["engine", *b.argv[3:]]),
                                               "runs": b.runs} for b in p.benches],
             **body}
        d["pass"] = all(c["pass"] for c in d["checks"]) and bool(d["checks"])
        failed |= not d["pass"]
        (slug_dir / f"{p.name}.json").write_text(json.dumps(d, indent=1, default=str) + "\n")
        (slug_dir / f"{p.name}.md").write_text(render_md(d))
        chart(d, slug_dir / f"{p.name}.png")
        if p.benches and p.benches[0].results_dir.exists():
            with tarfile.open(slug_dir / f"{p.name}-bench.tar.gz", "w:gz") as tf:
                tf.add(p.benches[0].results_dir, arcname=f"{p.name}-bench")
        write_index(slug_dir)
        for c in d["checks"]:
            if not c["pass"] or c.get("info"):
                print(f"  {'info' if c.get('info') else 'FAIL'}: {c['run']}: {c['check']}: {c.get('detail', '')}")
        print(f"=== {p.name}: {'PASS' if d['pass'] else 'FAIL'} ({sum(c['pass'] for c in d['checks'])}/"
              f"{len(d['checks'])} checks, {d['wall_s']:.0f} s) -> {slug_dir / (p.name + '.json')}", flush=True)
    return 1 if failed else 0


def write_index(slug_dir: Path) -> None:
    order = ["smoke-fp32", "smoke-bf16", "smoke-fp16", "matrix-gpt2", "matrix-xl-1", "matrix-xl-2", "largest-neo",
             "largest-gptj", "estimate"]
    mds = sorted(slug_dir.glob("*.md"), key=lambda f: order.index(f.stem) if f.stem in order else 99)
    body = [f.read_text() for f in mds if f.name != "RESULTS.md"]
    (slug_dir / "RESULTS.md").write_text(f"# GPU proof: {slug_dir.name}\n\nWritten by benchmarks/gpu/run.sh "
                                         "(see benchmarks/gpu/README.md). One section per part.\n\n" + "\n".join(body))


if __name__ == "__main__":
    sys.exit(main())
