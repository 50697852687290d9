"""Real `engine launch` processes for the launch tests (tests/test_launch.py, tests/test_run_guard.py):
the shared tiny job, a launch in its own session that a failing test can end, and waits/kills by
PID through the test hooks (tests/hooks/sitecustomize.py)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from helpers import ENGINE, REPO, SHAKESPEARE, with_hooks

STEPS, SAVE_EVERY, KILL_STEP = 8, 2, 4
# one thread per process everywhere, so every layout computes with the same kernels
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def job(model: Path, out: Path) -> list[str]:
    return ["task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}",
            "data.max_train_samples=64", "data.block_size=32", "train.micro_batch_size=4",
            f"train.max_steps={STEPS}", "train.log_every=1", f"train.save_every={SAVE_EVERY}",
            f"output_dir={out}"]


def reference_dir(root: Path) -> Path:
    return root / "reference"


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    """The job uninterrupted (conftest.py launch_reference), in the session's shared 2-process job."""
    from engine.config import load_config
    return [load_config(None, job(model, reference_dir(root))).to_dict()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`engine launch ...` in its own session (so a failing test can end all it started)."""

    def __init__(self, args: list, log: Path, env: dict | None = None) -> None:
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(ENGINE + ["launch", *map(str, args)], cwd=REPO, stdout=self._file,
                                     stderr=subprocess.STDOUT, env=with_hooks({**os.environ, **ENV, **(env or {})}),
                                     start_new_session=True)

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.stop()
        return code, self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._file.close()


def launch_ok(args: list, log: Path, env: dict | None = None) -> str:
    code, out = Launch(args, log, env).wait()
    assert code == 0, out[-6000:]
    return out


def kill_rank_when(pid_dir: Path, ready, launch: Launch, rank: int = 1, timeout: float = 300) -> int:
    """SIGKILL `rank` (first attempt) as soon as ready() holds; returns its pid."""
    deadline = time.time() + timeout
    pid_file = pid_dir / f"rank{rank}.pid"
    while time.time() < deadline:
        assert launch.proc.poll() is None, "the job ended before the worker could be killed:\n" + launch.log.read_text()
        if pid_file.exists() and ready():
            pid, restart = map(int, pid_file.read_text().split())
            assert restart == 0
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.2)
    raise AssertionError("kill point never reached:\n" + launch.log.read_text())


def assert_gone(pids) -> None:
    deadline = time.time() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.time() < deadline, f"processes still running: {pids}"
        time.sleep(0.5)


def rank_pids(pid_dir: Path) -> list[int]:
    return [int(f.read_text().split()[0]) for f in pid_dir.glob("rank*.pid")]


def assert_ray_stopped(out: str) -> None:
    """The private Ray instance is gone: its temp dir removed, no process mentioning it left."""
    temp = re.search(r"local Ray instance started .*temp dir (\S+?)\)", out).group(1)
    assert "local Ray instance stopped" in out
    assert not Path(temp).exists()
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp in part for part in p.info["cmdline"] or []):
                left.append(p.info["pid"])
        except psutil.Error:
            pass
    assert_gone(left)


def wait_for(predicate, launch: Launch, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert launch.proc.poll() is None, f"the job ended before {what}:\n" + launch.log.read_text()[-4000:]
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} never happened:\n" + launch.log.read_text()[-4000:])
