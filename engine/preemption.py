"""SIGTERM / SIGINT to a worker (a cluster preempting the job, a user's Ctrl-C; torchrun's agent
forwards the signal it gets to every worker): finish the current step, write a checkpoint, stop.

Every rank must stop after the same step, so the flag is agreed on after each step with a MAX
all-reduce of one integer over a small gloo group: a host-to-host exchange (well under a
millisecond on one node) that never waits for the GPU.

A launcher that cannot signal its workers (Ray: actors run off the main thread and ray.kill is a
SIGKILL) asks them through the run directory instead: it writes OUTPUT_DIR/.engine-stop with its
launch id (ENGINE_LAUNCH_ID, which it gives its workers) and the signal it got; rank 0 looks for
that file after each step. A file from another launch is ignored, so a stale one stops nothing.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from engine.checkpoint import atomic_write

SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_FILE = ".engine-stop"
LAUNCH_ID = "ENGINE_LAUNCH_ID"


def catch_signals(handler) -> dict:
    """Install `handler` for SIGTERM and SIGINT; returns the handlers to restore_signals. Only the
    main thread can install them (a Ray actor runs elsewhere: it gets none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in SIGNALS}


def restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def request_stop(output_dir: Path, launch_id: str, signum: int) -> None:
    """The launcher's side: ask the workers of launch `launch_id` to stop after their step."""
    atomic_write(Path(output_dir) / STOP_FILE, json.dumps({"launch": launch_id, "signal": int(signum)}))


def stop_requested(output_dir: Path, launch_id: str) -> int:
    """The signal a launcher asked this launch to stop on through the run directory, else 0."""
    try:
        request = json.loads((Path(output_dir) / STOP_FILE).read_text())
    except (OSError, ValueError):
        return 0
    return int(request.get("signal", 0)) if request.get("launch") == launch_id else 0


class Preemption:
    def __init__(self, output_dir: Path | None = None) -> None:
        self.received = 0
        launch_id = os.environ.get(LAUNCH_ID)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        # only rank 0 reads the file: the all-reduce tells the others
        self.stop_file = (output_dir, launch_id) if output_dir is not None and launch_id and rank0 else None
        # collective: every rank creates it at the same point (the loop does, after set-up)
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.previous = catch_signals(self._on_signal)  # none in a Ray actor: its driver asks by file

    def _on_signal(self, signum, frame) -> None:
        self.received = self.received or signum  # the first signal counts; a second changes nothing

    def requested(self) -> int:
        """The signal number any rank received (0 = none): the same answer on every rank."""
        if not self.received and self.stop_file is not None:
            self.received = stop_requested(*self.stop_file)
        flag = torch.tensor([self.received], dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def close(self) -> None:
        restore_signals(self.previous)
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
            self.group = None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
