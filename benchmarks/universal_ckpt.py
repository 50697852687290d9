"""What the universal (neutral) checkpoint form costs, beside each backend's native checkpoint.

    python -m benchmarks.universal_ckpt [--model gpt2] [--out benchmarks/results/universal]

One process, CPU, fp32, random init from the architecture's config (nothing downloaded). For each
source backend (DDP; DeepSpeed ZeRO-1, no offload) it trains one real optimizer step (batch 1 x 32
tokens, so AdamW moments exist), then times:

- native save (engine.checkpoint.save_checkpoint) and its bytes on disk;
- native resume: a fresh backend of the same layout + `load_state`;
- universal resume into a fresh DDP backend: for DeepSpeed first DeepSpeed's own converter
  (DeepSpeedBackend.convert_for_reading: ds_to_universal, bytes of its output folder too), then
  engine.universal.read_universal, then `Backend.load_universal`.

After each universal load the fresh DDP module's weights and AdamW moments are compared with the
source's (taken from the live source backend just after its step): max abs diff, expected 0.

Each row is timed --repeat times (default 3; every save into a new folder, every load into a
freshly built backend) and the median is reported. Backend construction and model builds are not
timed. Files are read back right after they were written (warm page cache; safetensors files are
memory-mapped, so for a DDP checkpoint part of the reading shows in load_universal).

Writes <out>/universal.json and <out>/universal.md; checkpoints go to a temporary folder
(--work-dir), removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

DS_STAGE = 1


def _env() -> None:
    """A 1-process group in this process, DeepSpeed on the CPU accelerator, the tests' op cache."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/engine/torch_extensions"))
    from backends.host import free_port
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _timed(run, repeat: int, prepare=None, discard=None) -> tuple[list[float], object, object]:
    """Wall seconds of `repeat` calls of run(ctx), each on a fresh ctx = prepare() (not timed); the
    result and ctx of all but the last call are dropped (discard(ctx), not timed) before the next one
    is prepared, so one copy lives at a time. Returns (seconds per call, last result, last ctx)."""
    times, out, ctx = [], None, None
    for i in range(repeat):
        if i:
            out = None
            if discard is not None:
                discard(ctx)
            ctx = None
            gc.collect()
        ctx = prepare() if prepare is not None else None
        gc.collect()
        t0 = time.perf_counter()
        out = run(ctx)
        times.append(time.perf_counter() - t0)
    return times, out, ctx


def _close(backend) -> None:
    """Release what a backend holds beyond Python references (DeepSpeed's engine); the caller dels it."""
    backend.close()
    gc.collect()


class Bench:
    def __init__(self, args):
        import torch
        from transformers import AutoModelForCausalLM

        from engine.config import config_from_dict
        from engine.flops import hf_config, parse_model
        from engine.modeling import model_builder
        from engine.universal import ModelNames

        self.args = args
        self.arch = parse_model(args.model)
        self.conf = hf_config(self.arch)
        raw = {"task": "causal_lm",
               "train": {"precision": "fp32", "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-4,
                         "weight_decay": 0.01, "max_grad_norm": 0.0, "scheduler": "linear", "seed": 1234},
               "backend": {"name": "ddp", "deepspeed": {"zero_stage": DS_STAGE, "offload_optimizer": "none",
                                                        "offload_params": "none"}}}
        self.cfg = config_from_dict(raw)
        self.build = model_builder(self.cfg, self.conf, AutoModelForCausalLM)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(self.conf)
        self.names = ModelNames.of(meta)
        self.n_params = sum(p.numel() for p in meta.parameters())  # tied weights once
        del meta
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.arch.vocab, (1, args.seq), generator=g)
        self.batch = {"input_ids": ids, "labels": ids.clone()}
        self.work = Path(args.work_dir)
        self.rows: list[dict] = []
        self.checks: dict[str, dict] = {}

    # -- backends ----------------------------------------------------------------------------
    def backend(self, name: str):
        from backends.base import SchedulerSpec, backend_class
        b = backend_class(name)(self.cfg.training_spec(), self.cfg.backend_options(name))
        b.setup(self.build, SchedulerSpec("linear", 0, 100))
        return b

    def trained(self, name: str):
        b = self.backend(name)
        b.train_mode(True)
        b.forward_backward(self.batch, sync_grads=True)
        b.step()
        return b

    def reference(self, b, path: Path) -> None:
        """The source's weights and AdamW moments by name (fp32, whole), saved for the later check."""
        import torch
        out = {}
        if hasattr(b, "engine"):  # DeepSpeed: its fp32 master partitions through the per-parameter API
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
            # DeepSpeed 0.19.8 ZeRO-1/2 steps the client optimizer one group at a time and links the
            # per-parameter moment views after the first group's step, when the other groups have no
            # state yet: their safe_get_full_optimizer_state raises until linked again.
            zero = b.engine.optimizer
            if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
                zero._hp_optimizer_states_linked = False
                zero._lazy_init_hp_params_optimizer_state()
            for name, p in b.module.named_parameters():
                out[f"w:{name}"] = safe_get_full_fp32_param(p).detach().cpu().clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    out[f"{key}:{name}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
        else:
            for name, p in b.module.named_parameters():
                out[f"w:{name}"] = p.detach().clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    out[f"{key}:{name}"] = b.optimizer.state[p][key].detach().clone()
        torch.save(out, path)
        del out
        gc.collect()

    def check(self, label: str, ddp, ref_path: Path) -> dict:
        """Max abs diff of the fresh DDP backend's weights and moments against the source's."""
        import torch
        ref = torch.load(ref_path, mmap=True, weights_only=True)
        w = m = 0.0
        n = 0
        for name, p in ddp.module.named_parameters():
            w = max(w, (p.detach() - ref[f"w:{name}"]).abs().max().item())
            st = ddp.optimizer.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                m = max(m, (st[key] - ref[f"{key}:{name}"]).abs().max().item())
            n += 1
        step = int(ddp.optimizer.state[next(iter(ddp.module.parameters()))]["step"].item())
        del ref
        out = {"weights_max_abs_diff": w, "moments_max_abs_diff": m, "params_compared": n, "adam_step": step}
        print(f"check {label}: weights max abs diff {w:g}, AdamW moments max abs diff {m:g} "
              f"({n} parameters, AdamW step {step})", flush=True)
        self.checks[label] = out
        return out

    def row(self, backend: str, what: str, times: list[float], nbytes: int | None, base: str | None,
            size_base: str | None = None) -> float:
        seconds = statistics.median(times)
        self.rows.append({"backend": backend, "what": what, "seconds": seconds,
                          "samples": [round(t, 3) for t in times], "bytes": nbytes,
                          "time_base": base, "size_base": size_base})
        mib = f", {nbytes / 2**20:.1f} MiB" if nbytes is not None else ""
        print(f"  {backend:>15} | {what:<50} {seconds:.2f} s (samples {', '.join(f'{t:.2f}' for t in times)}){mib}",
              flush=True)
        return seconds

    # -- one source backend --------------------------------------------------------------------
    def run_source(self, name: str) -> None:
        from engine.checkpoint import RunState, save_checkpoint
        from backends.base import backend_class
        from engine.universal import read_universal, saved_layout
        label = name if name == "ddp" else f"deepspeed-zero{DS_STAGE}"
        repeat = self.args.repeat
        print(f"[{label}] one optimizer step, then native save / native load / universal load into DDP", flush=True)
        src = self.trained(name)
        ref = self.work / f"ref-{label}.pt"
        self.reference(src, ref)
        out = self.work / label
        step_dir = out / "checkpoints" / "step-1"

        def fresh_dir():
            shutil.rmtree(out, ignore_errors=True)  # every save writes a new folder, as a run's first save does
        times, _, _ = _timed(lambda _: save_checkpoint(src, out, RunState(step=1, dp_size=1), 1), repeat, fresh_dir)
        _close(src)
        src = None  # noqa: F841 - dropped here (one model at a time)
        self.row(label, "native save (save_checkpoint)", times, _bytes(step_dir), "native save", "native save")

        times, _, fresh = _timed(lambda b: b.load_state(step_dir), repeat, lambda: self.backend(name), _close)
        _close(fresh)
        del fresh
        self.row(label, "native load (load_state into a fresh backend)", times, None, "native load")

        total, converted = 0.0, self.work / f"{label}-universal"
        layout = saved_layout(step_dir)
        if name == "deepspeed":
            convert = backend_class(name).convert_for_reading
            times, _, _ = _timed(lambda _: convert(step_dir, converted), repeat,
                                 lambda: shutil.rmtree(converted, ignore_errors=True))
            total += self.row(label, "universal: ds_to_universal (DeepSpeed converter)", times, _bytes(converted),
                              "native load", "native save")

        times, state, _ = _timed(lambda _: read_universal(step_dir, self.names, layout, converted), repeat)
        total += self.row(label, "universal: read_universal", times, None, "native load")
        scratch = self.work / f"scratch-{label}"
        scratch.mkdir(parents=True, exist_ok=True)
        times, _, ddp = _timed(lambda b: b.load_universal(state, scratch), repeat, lambda: self.backend("ddp"),
                               _close)
        total += self.row(label, "universal: load_universal into a fresh DDP", times, None, "native load")
        state = None  # noqa: F841 - dropped here
        gc.collect()
        self.row(label, "universal resume, total (medians summed)", [total], None, "native load")
        self.check(label, ddp, ref)
        _close(ddp)
        del ddp
        gc.collect()
        shutil.rmtree(scratch, ignore_errors=True)
        if not self.args.keep:
            shutil.rmtree(out, ignore_errors=True)
            if converted is not None:
                shutil.rmtree(converted, ignore_errors=True)
            ref.unlink()

    # -- report --------------------------------------------------------------------------------
    def finish(self) -> dict:
        for r in self.rows:
            mine = [x for x in self.rows if x["backend"] == r["backend"]]
            base = {"native save": mine[0], "native load": mine[1]}
            t = base[r["time_base"]]["seconds"] if r["time_base"] else None
            r["time_ratio"] = round(r["seconds"] / t, 2) if t and r["seconds"] is not None else None
            s = base[r["size_base"]]["bytes"] if r["size_base"] else None
            r["size_ratio"] = round(r["bytes"] / s, 2) if s and r["bytes"] is not None else None
            r["seconds"] = round(r["seconds"], 3) if r["seconds"] is not None else None
        return self.rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Model {result['model']} ({result['params'] / 1e6:.1f}M parameters, fp32, random init), one process, "
             f"CPU ({m['cpu_count']} cores, torch {m['torch']}, deepspeed {m['deepspeed']}); "
             f"median of {result['repeat']} timing(s) per row.",
             "",
             "| source backend | what | seconds | MiB on disk | time vs native | size vs native |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        mib = f"{r['bytes'] / 2**20:.1f}" if r["bytes"] is not None else ""
        tr = f"{r['time_ratio']:.2f}x {r['time_base']}" if r["time_ratio"] is not None else ""
        sr = f"{r['size_ratio']:.2f}x" if r["size_ratio"] is not None else ""
        lines.append(f"| {r['backend']} | {r['what']} | {r['seconds']:.2f} | {mib} | {tr} | {sr} |")
    lines.append("")
    for label, c in result["checks"].items():
        lines.append(f"Check, {label} -> fresh DDP through the universal form: weights max abs diff "
                     f"{c['weights_max_abs_diff']:g}, AdamW moments max abs diff {c['moments_max_abs_diff']:g} "
                     f"({c['params_compared']} parameters, AdamW step {c['adam_step']}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help="engine.flops name: gpt2 (124M), tiny, micro, gpt2:L=..,d=..")
    p.add_argument("--out", default="benchmarks/results/universal")
    p.add_argument("--seq", type=int, default=32, help="tokens in the one training batch (batch size 1)")
    p.add_argument("--repeat", type=int, default=3, help="timings per row (fresh backend / fresh folder each); the median is reported")
    p.add_argument("--backends", default="ddp,deepspeed", help="sources to measure: ddp, deepspeed")
    p.add_argument("--work-dir", default=None, help="checkpoints go here (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep --work-dir")
    args = p.parse_args(argv)
    _env()

    import torch
    import transformers
    import deepspeed  # noqa: F401 - the CPU accelerator is picked from DS_ACCELERATOR at import
    import torch.distributed as dist

    from backends.base import backend_class

    made = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="universal-ckpt-")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    backend_class("deepspeed").init_distributed()  # a 1-process gloo group plus DeepSpeed's comm layer
    bench = Bench(args)
    print(f"model {args.model}: {bench.n_params / 1e6:.1f}M parameters; work dir {args.work_dir}", flush=True)
    try:
        sources = [s.strip() for s in args.backends.split(",") if s.strip()]
        for name in sources:
            bench.run_source(name)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if made and not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)

    result = {
        "benchmark": "universal_ckpt",
        "model": args.model, "params": bench.n_params, "seq": args.seq, "precision": "fp32",
        "deepspeed_zero_stage": DS_STAGE, "repeat": args.repeat,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.universal_ckpt " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": bench.finish(),
        "checks": bench.checks,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "universal.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / "universal.md").write_text(md)
    print()
    print(md)
    bad = [k for k, c in bench.checks.items() if c["weights_max_abs_diff"] != 0 or c["moments_max_abs_diff"] != 0]
    if bad:
        print(f"MISMATCH after universal load: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
