"""`engine bench`: every (backend, model) combination is its own short training run in a subprocess.

The engine runs through `engine launch` (its real launcher, config file, backends and loop); the
baselines (HF Trainer, a hand-written PyTorch loop) through `torchrun` with the same process count
and thread settings. A crash, OOM or hang in one run is recorded as that run's outcome and the
bench moves on. Per run: one JSON with the device, software versions, the full config, step
statistics over the measured steps (warm-up excluded), MFU on GPUs, per-rank peak memory and the
memory estimate for the same configuration.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

SCHEMA = 1
BASELINES = {"trainer": "hf-trainer", "hf-trainer": "hf-trainer", "hand": "hand-loop", "hand-loop": "hand-loop"}


# --------------------------------------------------------------------------------------------
# Backend specs: deepspeed:zero3+offload -> backend name + options + overrides
# --------------------------------------------------------------------------------------------
@dataclass
class BenchBackend:
    label: str                       # as given, e.g. deepspeed:zero2+offload
    system: str                      # engine | hf-trainer | hand-loop
    backend: str | None = None       # engine backend name
    options: dict = field(default_factory=dict)     # backend.<name>.* options
    overrides: dict = field(default_factory=dict)   # other dotted config keys (train.gradient_checkpointing)


def parse_backend(spec: str) -> BenchBackend:
    """`NAME[:VARIANT][+MODIFIER...]` for an engine backend, each backend parsing its own variant and
    modifiers (`Backend.bench_options`: e.g. `ddp`, `deepspeed:zero{0,1,2,3}[+offload|+offload_opt]`,
    `colossal:{torch_ddp,low_level_zero,zero1,zero2,gemini,hybrid}[+tp2][+pp2]`), or a baseline:
    `trainer`, `hand`; any may end in `+gc` (gradient checkpointing) and `@KEY=VALUE[@KEY=VALUE]`
    (extra config overrides, e.g. `ddp@train.grad_accum=2`)."""
    from backends.base import backend_class, backend_names

    label = spec.strip()
    head, *extra = label.split("@")
    overrides = {}
    for item in extra:
        if "=" not in item:
            raise ValueError(f"backend spec {label!r}: {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    parts = head.split("+")
    base, mods = parts[0], parts[1:]
    if "gc" in mods:
        mods.remove("gc")
        overrides["train.gradient_checkpointing"] = True
    if base in BASELINES:
        if mods:
            raise ValueError(f"backend spec {label!r}: baselines take only +gc and @KEY=VALUE")
        return BenchBackend(label, BASELINES[base], overrides=overrides)
    name, _, variant = base.partition(":")
    if name not in backend_names():
        forms = [backend_class(n).bench_spec_help or n for n in backend_names()] + ["trainer", "hand"]
        raise ValueError(f"unknown backend spec {label!r}: " + ", ".join(forms))
    try:
        options = backend_class(name).bench_options(variant, mods)
    except ValueError as e:
        raise ValueError(f"backend spec {label!r}: {e}") from None
    return BenchBackend(label, "engine", name, options, overrides)


def estimate_key(spec: str) -> str | None:
    """The `engine estimate` row of a bench spec: the backend's own mapping (`Backend.estimate_key`);
    the baselines (torch DDP with torch AdamW) take the replicated row."""
    from backends.base import backend_class
    from engine.estimate import replicated_row

    b = parse_backend(spec)
    if b.system != "engine":
        return replicated_row().key
    return backend_class(b.backend).estimate_key(b.options)


# --------------------------------------------------------------------------------------------
# Environment facts recorded with every result
# --------------------------------------------------------------------------------------------
def device_info(gpus: int) -> dict:
    info = {"kind": "cpu", "cpu_model": _cpu_model(), "cpu_cores": os.cpu_count(), "hostname": platform.node()}
    if gpus > 0:
        # asked in a child process: a CUDA context in the bench itself would hold GPU memory
        # that the measured runs then lack
        code = ("import torch, json; p = torch.cuda.get_device_properties(0); "
                "print(json.dumps([p.name, p.total_memory, torch.version.cuda]))")
        try:
            name, total, cuda = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                          text=True, timeout=300).stdout.strip().splitlines()[-1])
        except (IndexError, ValueError, subprocess.TimeoutExpired):
            name, total, cuda = "unknown GPU", 0, None
        info.update(kind="cuda", gpu_name=name, gpu_count=gpus, gpu_memory_gb=round(total / 2**30, 1), cuda=cuda)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def software_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "deepspeed", "colossalai"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def device_slug(device: dict, procs: int) -> str:
    if device["kind"] == "cuda":
        name = re.sub(r"[^a-z0-9]+", "-", device["gpu_name"].lower().replace("nvidia", "")).strip("-")
        return f"{name}-x{procs}"
    return f"cpu-{procs}proc"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    backend: BenchBackend
    model: str
    procs: int
    gpus: int
    seq: int
    micro_batch: int
    steps: int          # measured steps
    warmup: int         # excluded steps before them
    precision: str
    timeout: int

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def name(self) -> str:
        return f"{self.model}__{slug(self.backend.label)}__{self.precision}_s{self.seq}_b{self.micro_batch}"


def engine_config(run: RunSpec, output_dir: Path) -> dict:
    from engine.flops import parse_model
    from engine.config import BUILTIN_SAMPLE, apply_override

    arch = parse_model(run.model)
    raw = {
        "task": "causal_lm",
        "model": {"config": dict(arch.kwargs)},
        "tokenizer": BUILTIN_SAMPLE,
        "data": {"train": BUILTIN_SAMPLE, "block_size": run.seq, "validation_split": 0.0},
        # lr warms up over the bench's warm-up steps: without it a random-init GPT-2 spikes (step 7 of the
        # first H200 headline, loss 7.5 -> 11.8) and backends that agree to 0.3% before it end 13% apart
        "train": {"max_steps": run.total_steps, "micro_batch_size": run.micro_batch, "lr": 1e-4,
                  "warmup_steps": run.warmup, "precision": run.precision, "log_every": 1, "save_every": 0, "save_final": False, "seed": 0},
        "backend": {"name": run.backend.backend, run.backend.backend: dict(run.backend.options)},
        "output_dir": str(output_dir),
    }
    for key, value in run.backend.overrides.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return raw


def baseline_config(run: RunSpec) -> dict:
    # `model.config.KEY=VALUE` overrides (e.g. dropout off) change the architecture every row trains, so the
    # baselines build the same model; other overrides are the engine's own settings
    model_config = {k[len("model.config."):]: v for k, v in run.backend.overrides.items()
                    if k.startswith("model.config.")}
    return {"kind": run.backend.system, "model": run.model, "seq": run.seq, "micro_batch": run.micro_batch,
            "steps": run.total_steps, "precision": run.precision, "lr": 1e-4, "warmup_steps": run.warmup, "seed": 0,
            "gradient_checkpointing": bool(run.backend.overrides.get("train.gradient_checkpointing", False)),
            "max_grad_norm": 1.0, "model_config": model_config}


def _env(run: RunSpec) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR":
           os.environ.get("DS_ACCELERATOR", "cuda" if run.gpus else "cpu")}
    # DeepSpeed's JIT-built ops (shm comm, cpu_adam): the cache the Makefile and tests use
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "engine" / "torch_extensions"))
    if run.gpus == 0:  # what `engine launch` and torchrun do: share the cores between the processes
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // run.procs))
    # the subprocesses import the same engine, backends and benchmarks as this process (a checkout
    # on PYTHONPATH or an install): put the folders holding them first on their path
    paths = list(dict.fromkeys(_package_roots() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _package_roots() -> list[str]:
    import backends
    import benchmarks
    import engine
    return list(dict.fromkeys(str(Path(m.__file__).resolve().parent.parent) for m in (engine, backends, benchmarks)))


def run_one(run: RunSpec, work_dir: Path, progress=None) -> dict:
    """Run one combination to completion (or failure) and return its raw measurements."""
    run_dir = work_dir / run.name
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    if run.backend.system == "engine":
        out_dir = run_dir / "run"
        cfg = engine_config(run, out_dir)
        cfg_path = run_dir / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "launch.cli", "launch", str(cfg_path), "--gpus", str(run.gpus)]
        if run.gpus == 0:
            cmd += ["--nproc", str(run.procs)]
        steps_file = out_dir / "metrics.jsonl"
        refused = _config_error(cfg_path)
        if refused:  # what `engine launch` would refuse in its first second: said without starting it
            (run_dir / "log.txt").write_text(f"error: {refused}\n")
            return {"exit_code": 2, "wall_s": 0.0, "config": cfg, "command": cmd, "log_tail": f"error: {refused}",
                    "outcome": "error", "message": refused[:600]}
    else:
        cfg = baseline_config(run)
        cfg_path = run_dir / "baseline.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        result_path = run_dir / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(run.procs),
               "-m", "benchmarks.baselines", str(cfg_path), str(result_path)]
        steps_file = run_dir / "steps.jsonl"
    log_path = run_dir / "log.txt"
    started = time.time()
    timed_out = False
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_env(run),
                                start_new_session=True)  # in the caller's folder, as relative --out/--work-dir mean
        try:
            while proc.poll() is None:
                if progress:
                    progress(_count_lines(steps_file, '"event": "train"' if run.backend.system == "engine" else ""),
                             time.time() - started)
                if time.time() - started > run.timeout:
                    _kill_group(proc)
                    timed_out = True
                    break
                time.sleep(0.5)
        finally:
            # the bench itself stopped (Ctrl-C, or SIGTERM: see run_matrix): the run has its own session,
            # which a kill of the bench's process group does not reach, so it goes here
            if proc.poll() is None:
                _kill_group(proc)
        proc.wait()
    wall = time.time() - started
    log_text = log_path.read_text(errors="replace")
    raw = {"exit_code": proc.returncode, "wall_s": round(wall, 1), "config": cfg, "command": cmd,
           "log_tail": log_text[-4000:]}
    if timed_out:
        raw.update(outcome="timeout", message=f"no result within --timeout {run.timeout} s")
    elif proc.returncode != 0:
        raw.update(classify_failure(proc.returncode, log_text))
    else:
        try:
            raw.update(outcome="ok", message="", **(read_engine_steps(out_dir) if run.backend.system == "engine"
                                                   else json.loads(result_path.read_text())))
            if run.backend.system == "engine" and (out_dir / "config.yaml").exists():
                raw["config"] = yaml.safe_load((out_dir / "config.yaml").read_text())
        except (OSError, ValueError, KeyError) as e:
            raw.update(outcome="error", message=f"run exited 0 but left no usable measurements: {e}")
    return raw


def _config_error(cfg_path: Path) -> str | None:
    """The one-line reason the engine's config loader refuses a run's config (an unknown key, a value
    out of range, e.g. `ddp@train.precision=fp8`), or None."""
    from engine.config import load_config
    from engine.errors import EngineError
    try:
        load_config(str(cfg_path), [])
    except EngineError as e:
        return str(e)
    return None


def _count_lines(path: Path, needle: str) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if needle in line)
    except OSError:
        return 0


def _kill_group(proc) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the run's own session: launcher and its workers
    except ProcessLookupError:
        pass


OOM_PATTERNS = ("out of GPU memory", "CUDA out of memory", "OutOfMemoryError", "out of memory",
                "DefaultCPUAllocator: can't allocate memory")


_LOG_PREFIX = re.compile(r"^[EWI]\d{4} [\d:.]+ \d+ \S+\] ?")  # torch elastic's per-line prefix


def classify_failure(code: int, log_text: str) -> dict:
    lines = [_LOG_PREFIX.sub("", ln).strip() for ln in log_text.splitlines()]
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith("error:")]
    exc = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", ln)]
    message = (errors[-1] if errors else exc[-1] if exc else (lines[-1] if lines else ""))
    # the engine's launcher error ("training stopped on rank N (see the error above)") is less
    # telling than the worker's own reason: keep both
    if errors and "see the error above" in errors[-1] and (len(errors) > 1 or exc):
        message = (errors[-2] if len(errors) > 1 else exc[-1]) + " | " + errors[-1]
    elif errors and exc and "traceback is above" in errors[-1]:
        message = exc[-1] + " | " + errors[-1]
    oom = any(p in log_text for p in OOM_PATTERNS) or code in (-9, 137) or "exit code -9" in log_text
    if oom and not any(p in log_text for p in OOM_PATTERNS):
        message = f"killed by SIGKILL (likely the host OOM killer): {message}"
    if message.startswith("error: "):
        message = message[len("error: "):]
    return {"outcome": "oom" if oom else "error", "message": message[:600]}


def read_engine_steps(out_dir: Path) -> dict:
    records = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train = [r for r in records if r["event"] == "train"]
    memory = [r for r in records if r["event"] == "memory"]
    steps = [{"step": r["step"], "tokens_per_s": r["tokens_per_s"], "samples_per_s": r["samples_per_s"],
              "end": r["time"], "loss": r["loss"]} for r in train]
    return {"steps": steps, "memory_per_rank": memory[-1]["per_rank"] if memory else
            [{k: v for k, v in train[-1].items() if k.endswith("_mb")}]}


# --------------------------------------------------------------------------------------------
# Statistics and the result record
# --------------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    q = lambda f: v[min(len(v) - 1, max(0, round(f * (len(v) - 1))))]
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "p10": q(0.1), "p90": q(0.9),
            "mean": statistics.fmean(v), "n": len(v)}


def summarize(run: RunSpec, raw: dict, device: dict) -> dict:
    from engine.estimate import estimate
    from engine.flops import device_peak_tflops, flops_per_token, param_counts

    counts = param_counts(run.model)
    fpt = flops_per_token(run.model, run.seq)
    global_batch = run.micro_batch * run.procs * int(raw.get("config", {}).get("train", {}).get("grad_accum", 1)
                                                   if run.backend.system == "engine" else 1)
    result = {
        "schema": SCHEMA, "name": run.name, "label": run.backend.label, "system": run.backend.system,
        "backend": run.backend.backend, "backend_options": run.backend.options, "overrides": run.backend.overrides,
        "model": run.model, "params": counts.total, "flops_per_token": fpt, "precision": run.precision,
        "seq": run.seq, "micro_batch": run.micro_batch, "procs": run.procs, "gpus": run.gpus,
        "global_batch": global_batch, "tokens_per_step": global_batch * run.seq,
        "warmup_steps": run.warmup, "measured_steps": run.steps,
        "outcome": raw["outcome"], "message": raw.get("message", ""), "exit_code": raw["exit_code"],
        "wall_s": raw["wall_s"], "device": device, "software": software_versions(),
        "config": raw.get("config"), "command": raw.get("command"),
    }
    if raw.get("optimizer"):  # what a baseline reports it trained with (the Trainer picks its own)
        result["optimizer"] = raw["optimizer"]
    if raw["outcome"] != "ok":
        result["log_tail"] = raw.get("log_tail", "")[-2000:]
    # step -> loss, warm-up included (the first round's): lets a caller compare backends' trajectories
    # step by step (a run logging every k steps has every k-th)
    losses = {s["step"]: s["loss"] for s in raw.get("steps", [])
              if s.get("round", 1) == 1 and isinstance(s.get("loss"), (int, float))}
    if losses:
        result["losses"] = losses
    steps = [s for s in raw.get("steps", []) if s["step"] > run.warmup]
    if raw["outcome"] == "ok" and not steps:
        result.update(outcome="error", message=f"only {len(raw.get('steps', []))} steps recorded, none after "
                                               f"the {run.warmup} warm-up steps")
    if steps:
        tps = [s["tokens_per_s"] for s in steps]
        result["tokens_per_s"] = spread(tps)
        result["samples_per_s"] = spread([s["samples_per_s"] for s in steps])
        # from samples, not tokens: tokens_per_s counts real (non-padding) tokens, which a step of
        # instruction data has fewer of than tokens_per_step (global batch x seq)
        result["step_s"] = spread([global_batch / s["samples_per_s"] for s in steps])
        walls, medians = [], []
        for k in sorted({s.get("round", 1) for s in raw["steps"]}):
            ends = [s["end"] for s in raw["steps"] if s["step"] >= run.warmup and s.get("round", 1) == k]
            if len(ends) >= 2 and ends[-1] > ends[0]:  # includes logging and data loading between steps
                walls.append(result["tokens_per_step"] * (len(ends) - 1) / (ends[-1] - ends[0]))
            medians.append(statistics.median([s["tokens_per_s"] for s in steps if s.get("round", 1) == k]))
        if walls:
            result["wall_tokens_per_s"] = statistics.median(walls)
        if len(medians) > 1:
            result["round_median_tokens_per_s"] = medians
        achieved = result["tokens_per_s"]["median"] * fpt / max(1, run.procs) / 1e12  # TFLOP/s per device
        peak = device_peak_tflops(device.get("gpu_name", ""), run.precision) if device["kind"] == "cuda" else None
        result["mfu"] = {"achieved_tflops_per_device": achieved, "peak_tflops_per_device": peak,
                         "mfu": achieved / peak if peak else None,
                         "note": "model FLOPs (6N + 12*L*d_attn*seq per token) / device peak, dense, no sparsity"}
    mem = raw.get("memory_per_rank") or []
    if mem:
        keys = sorted({k for m in mem if m for k in m})
        peak = {k: max((m or {}).get(k) or 0 for m in mem) for k in keys}
        deltas = [m["host_rss_mb"] - m["host_rss_before_setup_mb"] for m in mem
                  if m and "host_rss_before_setup_mb" in m and "host_rss_mb" in m]
        if deltas:
            peak["host_rss_delta_mb"] = max(deltas)
        result["memory"] = {"per_rank": mem, "max_over_ranks": peak}
    key = estimate_key(run.backend.label)
    if key:
        gc = bool(run.backend.overrides.get("train.gradient_checkpointing"))
        n_dev = max(run.gpus, run.procs)
        # a LoRA run: the adapters get gradients and AdamW state, the base only its (frozen) weights
        model_cfg = (result.get("config") or {}).get("model") if run.backend.system == "engine" else None
        lora = model_cfg.get("lora") if isinstance(model_cfg, dict) else None  # baselines: no engine config
        trainable = None
        if lora:
            from engine.flops import lora_params
            trainable = lora_params(run.model, lora["r"])
        est = estimate(run.model, n_dev, seq=run.seq, micro_batch=run.micro_batch, precision=run.precision,
                       rows=(key,), lora_trainable=trainable, quantized=bool(lora and lora.get("quantize")))[0]
        result["estimate"] = {"row": key, "gradient_checkpointing": gc, "lora_trainable": trainable, **est.to_dict(),
                              "predicted_per_rank_mb": ((est.total_ckpt if gc else est.total_full)
                                                        + (est.host_per_node / n_dev if run.gpus == 0 else 0)) / 2**20}
    return result


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------
def run_matrix(backends: list[str], models: list[str], *, gpus: int, procs: int, seq: int, micro_batch: int,
               steps: int, warmup: int, precision: str, out: Path | None, work_dir: Path, timeout: int,
               repeat: int = 1, echo=print) -> list[dict]:
    parsed = [parse_backend(b) for b in backends]  # bad specs fail before anything runs
    from engine.flops import parse_model
    for m in models:
        parse_model(m)
    device = device_info(gpus)
    session = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = out if out is not None else work_dir / session / "results"  # a user's bench never lands in the project's
    slug_dir = out / device_slug(device, procs)
    slug_dir.mkdir(parents=True, exist_ok=True)
    runs = [RunSpec(b, m, procs, gpus, seq, micro_batch, steps, warmup, precision, timeout)
            for m in models for b in parsed]
    results = []
    tty = sys.stderr.isatty()
    echo(f"bench: {len(runs)} runs on {device.get('gpu_name') or device['cpu_model']} "
         f"({procs} process{'es' if procs > 1 else ''}), {precision}, seq {seq}, micro-batch {micro_batch}, "
         f"{warmup} warm-up + {steps} measured steps; results in {slug_dir}")
    rounds = [(k, run) for k in range(repeat) for run in runs]  # interleaved: drift in load hits all alike
    raws: dict[str, list[dict]] = {}
    previous = _exit_on_sigterm()  # a caller's time limit stops the run in progress too (run_one)
    for i, (k, run) in enumerate(rounds, 1):
        head = (f"[{i}/{len(rounds)}] {run.model} {run.backend.label}"
                + (f" (round {k + 1}/{repeat})" if repeat > 1 else ""))

        def progress(done, elapsed, head=head, total=run.total_steps):
            if tty:
                sys.stderr.write(f"\r{head}: step {done}/{total}  {elapsed:5.0f}s ")
                sys.stderr.flush()

        if not tty:
            echo(f"{head}: running")
        load_before = load_average()
        raw = run_one(run, work_dir / session / (f"round{k + 1}" if repeat > 1 else ""), progress)
        raw["load_average"] = {"before": load_before, "after": load_average()}
        raws.setdefault(run.name, []).append(raw)
        if tty:
            sys.stderr.write("\r" + " " * 80 + "\r")
        echo(f"{head}: {one_line(summarize(run, raw, device))}")
        if k == repeat - 1:
            merged = merge_rounds(raws[run.name])
            result = summarize(run, merged, device)
            result.update(session=session, rounds=repeat,
                          finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          load_average={"before": raws[run.name][0]["load_average"]["before"],
                                        "after": raw["load_average"]["after"],
                                        "per_round": [r["load_average"] for r in raws[run.name]]})
            (slug_dir / f"{run.name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
            results.append(result)
            if repeat > 1:
                echo(f"{head}: all rounds: {one_line(result)}")
    _restore_sigterm(previous)  # (an exception ends the bench: nothing to restore for)
    from benchmarks.report import write_report
    paths = write_report(slug_dir)
    echo("report: " + ", ".join(str(p) for p in paths))
    return results


def _exit_on_sigterm():
    """SIGTERM (what a caller's timeout sends first) becomes SystemExit, so run_one's clean-up kills the
    run in progress instead of leaving it running on its own. Only the main thread can set a handler;
    returns the one it replaced (None where it set none)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _restore_sigterm(previous) -> None:
    if previous is not None:
        import signal
        signal.signal(signal.SIGTERM, previous)


def merge_rounds(raws: list[dict]) -> dict:
    """Several rounds of one combination: steps pooled (tagged by round), the first failure wins,
    memory from the last round (peaks barely move between identical runs)."""
    if len(raws) == 1:
        return raws[0]
    bad = next((r for r in raws if r["outcome"] != "ok"), None)
    if bad is not None:
        return bad
    merged = dict(raws[-1])
    merged["steps"] = [{**st, "round": k + 1} for k, r in enumerate(raws) for st in r["steps"]]
    merged["wall_s"] = round(sum(r["wall_s"] for r in raws), 1)
    return merged


def one_line(r: dict) -> str:
    if r["outcome"] != "ok":
        return f"{r['outcome'].upper()} {r['message'][:200]}"
    mem = r.get("memory", {}).get("max_over_ranks", {})
    m = (f"gpu alloc {mem['gpu_alloc_mb']:.0f} MiB" if "gpu_alloc_mb" in mem
         else f"host rss {mem.get('host_rss_mb', 0):.0f} MiB")
    mfu = r.get("mfu", {}).get("mfu")
    return (f"ok {r['tokens_per_s']['median']:,.0f} tok/s (p10-p90 {r['tokens_per_s']['p10']:,.0f}-"
            f"{r['tokens_per_s']['p90']:,.0f}), step {r['step_s']['median'] * 1000:.0f} ms, {m}"
            + (f", MFU {mfu:.1%}" if mfu else "") + f" [{r['wall_s']:.0f}s]")
