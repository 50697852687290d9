"""Test-only fault-injection hooks, off unless their environment variable is set.

They let the launch tests kill a worker at a known moment (tests/test_launch.py):

ENGINE_TEST_PID_DIR=DIR
    every rank writes DIR/rank{RANK}.pid (its process id) when it starts, so a test can
    SIGKILL one by PID whatever the launcher (torchrun children, Ray actors).
ENGINE_TEST_PAUSE=WHERE:STEP:SECONDS
    every rank sleeps SECONDS at checkpoint step STEP, only in the first attempt of a job
    (restart count 0), so the test has time to kill it there. WHERE is
      `saving`  inside the write: its shards are in checkpoints/.tmp-step-STEP, not yet renamed;
      `saved`   right after checkpoints/step-STEP became complete.

Nothing else reads these variables; without them each hook is one dictionary lookup.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def restart_count() -> int:
    """How many times the launcher restarted this job's workers (torchrun and the Ray launcher set it)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def write_pid() -> None:
    where = os.environ.get("ENGINE_TEST_PID_DIR")
    if where:
        path = Path(where) / f"rank{os.environ.get('RANK', 0)}.pid"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()} {restart_count()}\n")
        os.replace(tmp, path)


def pause(where: str, step: int) -> None:
    spec = os.environ.get("ENGINE_TEST_PAUSE")
    if not spec or restart_count() != 0:
        return
    at, at_step, seconds = spec.split(":")
    if at == where and int(at_step) == step:
        time.sleep(float(seconds))
