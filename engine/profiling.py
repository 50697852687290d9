"""`train.profile_step=N`: torch.profiler over one optimizer step, so "where does a step's time go"
has an answer from the engine itself (on a GPU: which kernels; on CPU: which operators).

Every rank writes its Chrome/Perfetto trace (`profile/step-N-rankR.trace.json`); rank 0 also writes
the operators by self time as a table (`profile/step-N.txt`) and as JSON (`profile/step-N.json`,
with the step's wall time), and logs the top few. The step is synchronised with the device before
the profiler stops, so its device work is inside the window."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

TOP = 30  # operators in the table and the JSON


@contextmanager
def profiled_step(step: int, output_dir: Path, device: torch.device, rank: int, main: bool):
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    folder = Path(output_dir) / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / f"step-{step}-rank{rank}.trace.json"))
    if main:
        summary = summarize(prof, device, step, seconds)
        (folder / f"step-{step}.json").write_text(json.dumps(summary, indent=1) + "\n")
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (folder / f"step-{step}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=TOP) + "\n")
        from engine.metrics import log
        top = ", ".join(f"{op['name']} {op['share']:.0%}" for op in summary["ops"][:4])
        log(f"profile of step {step} ({seconds * 1000:.0f} ms): {folder / f'step-{step}.txt'}; by self "
            f"{summary['time']} time: {top}")


def summarize(prof, device: torch.device, step: int, seconds: float) -> dict:
    """The operators by self time on the device (CPU time without a GPU), each with its share of
    the step's total self time of that kind."""
    cuda = device.type == "cuda"
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return {"step": step, "wall_s": seconds, "device": str(device), "time": "device" if cuda else "CPU",
            "total_self_ms": total / 1000,
            "ops": [{"name": e.key, "self_ms": self_us(e) / 1000, "share": self_us(e) / total, "calls": e.count}
                    for e in events[:TOP]]}
