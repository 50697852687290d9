"""SIGTERM / SIGINT to a worker (a cluster preempting the job, a user's Ctrl-C; torchrun's agent
forwards the signal it gets to every worker): finish the current step, write a checkpoint, stop.

Every rank must stop after the same step, so the flag is agreed on after each step with a MAX
all-reduce of one integer over a small gloo group: a host-to-host exchange (well under a
millisecond on one node) that never waits for the GPU.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self) -> None:
        self.received = 0
        # collective: every rank creates it at the same point (the loop does, after set-up)
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # handlers can only be installed from the main thread (a Ray actor runs elsewhere: no graceful stop)
        in_main = threading.current_thread() is threading.main_thread()
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS} if in_main else {}

    def _on_signal(self, signum, frame) -> None:
        self.received = self.received or signum  # the first signal counts; a second changes nothing

    def requested(self) -> int:
        """The signal number any rank received (0 = none): the same answer on every rank."""
        flag = torch.tensor([self.received], dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
            self.group = None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
