"""How long the training loop is blocked per checkpoint under FSDP2: synchronous DCP saves
(`torch.distributed.checkpoint.save`) against `backend.fsdp.async_save=true` (`dcp.async_save`).

    python -m benchmarks.fsdp_async_save [--model gpt2] [--repeat 5] [--out benchmarks/results/fsdp-async]

2 processes (torchrun, gloo), CPU, fp32, random init from the architecture's config (gpt2: 124M
parameters, nothing downloaded). Each rank builds the model, shards it through the engine's own
FSDP backend (backends/fsdp.py), trains one real optimizer step (batch 1 x 64 tokens, so AdamW
moments exist), then checkpoints it --repeat times in each mode, sync and async taking turns at
going first, through the engine's own `save_checkpoint` (what the loop calls: .tmp-step-N, the
backend's files, RNG files, layout.json, the rename to step-N). Per checkpoint it records, as the
slowest rank saw them:

- blocked: the wall time of save_checkpoint, i.e. how long the loop stops;
- save_state: the backend's part of it;
- staging (async only): until dcp.async_save returned (the state copied to host memory, the write
  handed to a background thread). The engine renames .tmp-step-N as soon as save_state returns,
  so the backend waits for the write before returning; `staging` is what the loop would be blocked
  for if the engine could finish the rename after the write (docs/fsdp.md).

DCP's FileSystemWriter fsyncs every file it writes. The median per mode is reported. Writes
<out>/fsdp-async-save.json; checkpoints go to a temporary folder (--work-dir), removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHITECTURES = {  # GPT-2 sizes by name, built from config (no download)
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
}


def worker(model: str, repeat: int, work: Path) -> None:
    """One rank: shard, one step, then --repeat checkpoints per mode; rank 0 writes work/result.json."""
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    from backends.base import OptimizerSpec, SchedulerSpec, TrainingSpec
    from backends.fsdp import FSDPBackend, FSDPOptions
    from engine.checkpoint import RunState, save_checkpoint

    FSDPBackend.init_distributed()
    spec = TrainingSpec("causal_lm", "fp32", 1, 1, 0.0, OptimizerSpec(1e-4, 0.0, (0.9, 0.999), 1e-8, "auto"),
                        "constant")
    backend = FSDPBackend(spec, FSDPOptions())

    def build():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(**ARCHITECTURES[model]))

    backend.setup(build, SchedulerSpec("constant", 0, 10))
    n_params = sum(p.numel() for p in backend.module.parameters())
    ids = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(1))
    backend.forward_backward({"input_ids": ids, "labels": ids}, sync_grads=True)
    backend.step()

    samples = {"sync": [], "async": []}
    for i in range(repeat):
        for mode in (("sync", "async") if i % 2 == 0 else ("async", "sync")):  # neither always goes first
            # the same backend, its option switched between checkpoints (save_state reads it each time)
            backend.options = FSDPOptions(async_save=mode == "async")
            dist.barrier()
            started = time.perf_counter()
            final = save_checkpoint(backend, work / mode, RunState(step=i + 1), keep_last=1)
            blocked = time.perf_counter() - started
            mine = {"blocked": blocked, "save_state": backend.last_save["seconds"],
                    **({"staging": backend.last_save["staging_seconds"]} if mode == "async" else {})}
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            sample = {k: max(r[k] for r in every) for k in mine}  # the slowest rank holds the loop up
            sample["bytes"] = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
            samples[mode].append(sample)
    if dist.get_rank() == 0:
        (work / "result.json").write_text(json.dumps({"parameters": n_params, "samples": samples}))
    backend.close()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", choices=sorted(ARCHITECTURES))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp-async"))
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.model, args.repeat, args.work_dir)

    import torch
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fsdp-async-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "benchmarks.fsdp_async_save", "--worker", "--model", args.model, "--repeat", str(args.repeat),
           "--work-dir", str(work)]
    started, load = time.perf_counter(), os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the benchmark job failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        raw = json.loads((work / "result.json").read_text())
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    median = lambda mode, key: statistics.median(s[key] for s in raw["samples"][mode])  # noqa: E731
    summary = {mode: {key: round(median(mode, key), 3) for key in raw["samples"][mode][0] if key != "bytes"}
               for mode in ("sync", "async")}
    result = {"model": args.model, "parameters": raw["parameters"], "processes": args.nproc, "repeat": args.repeat,
              "checkpoint_mib": round(raw["samples"]["sync"][0]["bytes"] / 2**20, 1), "median_seconds": summary,
              "samples": raw["samples"], "job_seconds": round(time.perf_counter() - started, 1),
              "machine": {"cpu_cores": os.cpu_count(), "load_average_1min_at_start": round(load, 2),
                          "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsdp-async-save.json").write_text(json.dumps(result, indent=1))
    print(f"{args.model} ({raw['parameters'] / 1e6:.0f}M parameters), {args.nproc} processes, CPU, fp32; "
          f"checkpoint {result['checkpoint_mib']} MiB; median of {args.repeat} (slowest rank), seconds:")
    print("| mode | loop blocked (save_checkpoint) | save_state | of which staging |")
    print("|---|---:|---:|---:|")
    for mode in ("sync", "async"):
        s = summary[mode]
        staging = f"{s['staging']:.2f}" if "staging" in s else "-"
        print(f"| {mode} | {s['blocked']:.2f} | {s['save_state']:.2f} | {staging} |")
    print(f"written to {args.out / 'fsdp-async-save.json'} (job {result['job_seconds']} s)")


if __name__ == "__main__":
    main()
