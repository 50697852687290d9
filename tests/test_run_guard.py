"""One run directory, one live job; SIGTERM saves. Real `engine launch` processes (torchrun's
elastic agent, 2 CPU workers):
- a second launch on a directory whose job is still running gets one line naming the holder, exit
  2, and writes nothing; a lock left by a SIGKILLed launcher does not block the relaunch;
- SIGTERM to the launcher (what a cluster sends on preemption): the workers finish their step,
  write a checkpoint, the launcher says where it stopped and exits 143; the relaunch's per-step
  losses equal an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from helpers import losses, metrics
from test_launch import STEPS, Launch, job, launch_ok

LOCK = ".engine.lock"


def _wait_for(predicate, launch: Launch, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert launch.proc.poll() is None, f"the job ended before {what}:\n" + launch.log.read_text()[-4000:]
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} never happened:\n" + launch.log.read_text()[-4000:])


def _train_steps(out: Path) -> int:
    try:
        return len(metrics(out))
    except (OSError, ValueError):
        return 0


def _paused(model, out, seconds: int):
    """The shared tiny job, paused after its step-2 checkpoint (first attempt only), so a test can
    act while it is surely running."""
    return job(model, out), {"ENGINE_TEST_PAUSE": f"saved:2:{seconds}"}


def test_second_launch_on_a_live_run_is_refused_and_a_dead_holder_does_not_block(tiny_gpt2, tmp_path):
    out = tmp_path / "run"
    args, env = _paused(tiny_gpt2, out, 120)  # killed long before the pause ends
    first = Launch(["--gpus", "0", "--nproc", "2", *args], tmp_path / "first.log", env)
    try:
        # in the pause after its step-2 checkpoint: its files do not change until it is killed
        _wait_for(lambda: (out / LOCK).exists() and (out / "checkpoints" / "step-2").is_dir(), first,
                  "the first job's step-2 checkpoint")
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == first.proc.pid and holder["host"] == socket.gethostname()
        before = sorted(p.name for p in out.rglob("*"))
        events_before = (out / "metrics.jsonl").read_text()
        second = Launch(["--gpus", "0", "--nproc", "2", *args], tmp_path / "second.log")
        code, text = second.wait(300)
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        assert code == 2, text
        assert lines[-1].startswith("error: output_dir") and f"pid {first.proc.pid}" in lines[-1], text
        assert sum(ln.startswith("error:") for ln in lines) == 1 and "Traceback" not in text
        assert (out / "metrics.jsonl").read_text().startswith(events_before)  # the second wrote nothing there
        assert sorted(p.name for p in out.rglob("*")) == before  # nothing added, nothing removed
    finally:
        first.stop()  # SIGKILL to its whole session: the lock is left behind
    assert (out / LOCK).exists()
    relaunch = launch_ok(["--gpus", "0", "--nproc", "2", *args], tmp_path / "relaunch.log")
    assert "taking over the lock of a job that is gone" in relaunch
    assert len(losses(out)) == STEPS and not (out / LOCK).exists()


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    launch_ok(["--gpus", "0", "--nproc", "2", *job(tiny_gpt2, out)], out.parent / "ref.log")
    return losses(out)


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
def test_sigterm_checkpoints_stops_and_resumes_exactly(tiny_gpt2, tmp_path, uninterrupted, launcher):
    """torchrun's agent forwards the signal to the workers; Ray's driver asks its actors through the
    run directory (engine.preemption.request_stop). Either way: the same stop, exit and resume."""
    if launcher == "ray":
        pytest.importorskip("ray")
    out = tmp_path / "run"
    args, env = _paused(tiny_gpt2, out, 5)
    first = Launch(["--launcher", launcher, "--gpus", "0", "--nproc", "2", *args], tmp_path / "first.log", env)
    try:
        _wait_for(lambda: _train_steps(out) >= 2, first, "step 2")
        os.kill(first.proc.pid, signal.SIGTERM)  # the launcher only, as a scheduler does
        code, text = first.wait(300)
    finally:
        first.stop()
    assert code == 128 + signal.SIGTERM, text[-4000:]
    stopped = [ln for ln in text.splitlines() if "stopped at step" in ln and "SIGTERM" in ln]
    assert len(stopped) == 1, text[-4000:]
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert 2 <= step < STEPS and (out / "checkpoints" / f"step-{step}").is_dir()
    assert text.strip().splitlines()[-1].startswith("stopped: SIGTERM received"), text[-2000:]
    assert "Traceback" not in text
    assert not (out / LOCK).exists() and not (out / ".engine-stop").exists()
    launch_ok(["--gpus", "0", "--nproc", "2", *job(tiny_gpt2, out)], tmp_path / "resume.log")
    assert losses(out) == uninterrupted


@pytest.mark.fast
def test_a_stop_request_counts_only_for_its_own_launch(tmp_path):
    """A .engine-stop left by an earlier Ray launch must not stop the next one after its first step."""
    from engine.preemption import request_stop, stop_requested
    assert stop_requested(tmp_path, "launch-a") == 0
    request_stop(tmp_path, "launch-a", signal.SIGTERM)
    assert stop_requested(tmp_path, "launch-a") == signal.SIGTERM
    assert stop_requested(tmp_path, "launch-b") == 0
