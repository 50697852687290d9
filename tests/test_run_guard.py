"""One run directory, one live job; SIGTERM saves. Real `engine launch` processes (torchrun's
elastic agent, or Ray, with 2 CPU workers):
- SIGTERM to the launcher (what a cluster sends on preemption) while the ranks stand right after
  step 3, no periodic save step: the workers finish their step, write a checkpoint, the launcher
  says where it stopped and exits 143; the relaunch resumes from that checkpoint and its per-step
  losses equal an uninterrupted run's (conftest.py launch_reference);
- meanwhile, a second launch on the live directory gets one line naming the holder, exit 2, and
  writes nothing (in this process: it is refused before any process starts);
- the lock the first launcher held, left behind as a SIGKILLed launcher leaves it, does not block
  the relaunch.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from click.testing import CliRunner

from helpers import assert_one_error_line, losses
from launch.cli import main
from launching import SAVE_EVERY, STEPS, Launch, job, launch_ok, wait_for
from launching import shared_scenarios  # noqa: F401  (the reference run joins the shared job)

LOCK = ".engine.lock"
STOP_STEP = 3  # the ranks pause right after this step: no periodic save step
assert STOP_STEP % SAVE_EVERY != 0 and STOP_STEP < STEPS


def _second_launch_is_refused(model, out, holder_pid: int) -> None:
    before = sorted(p.name for p in out.rglob("*"))
    events_before = (out / "metrics.jsonl").read_text()
    result = CliRunner().invoke(main, ["launch", "--gpus", "0", "--nproc", "2", *job(model, out)])
    assert result.exit_code == 2, result.output
    line = assert_one_error_line(result.output, "error: output_dir")
    assert f"pid {holder_pid}" in line and "is in use by another job" in line, line
    assert result.output.strip().splitlines() == [line]  # nothing said before the refusal (no "resuming")
    assert (out / "metrics.jsonl").read_text().startswith(events_before)  # the second wrote nothing there
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing added, nothing removed


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
def test_sigterm_checkpoints_stops_and_resumes_exactly(tiny_gpt2, tmp_path, launch_reference, launcher):
    """torchrun's agent forwards the signal to the workers; Ray's driver asks its actors through the
    run directory (engine.preemption.request_stop). Either way: the same stop, exit and resume."""
    if launcher == "ray":
        pytest.importorskip("ray")
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    first = Launch(["--launcher", launcher, "--gpus", "0", "--nproc", "2", *job(tiny_gpt2, out)],
                   tmp_path / "first.log", {"ENGINE_TEST_PAUSE": f"step:{STOP_STEP}:120", "ENGINE_TEST_PID_DIR": str(pids)})
    try:
        wait_for(lambda: (pids / "rank0.paused").exists(), first, f"the pause after step {STOP_STEP}")
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == first.proc.pid and holder["host"] == socket.gethostname()
        if launcher == "torchrun":
            _second_launch_is_refused(tiny_gpt2, out, first.proc.pid)
        os.kill(first.proc.pid, signal.SIGTERM)  # the launcher only, as a scheduler does
        code, text = first.wait(300)
    finally:
        first.stop()
    assert code == 128 + signal.SIGTERM, text[-4000:]
    stopped = [ln for ln in text.splitlines() if "stopped at step" in ln and "SIGTERM" in ln]
    # rank 0's own line: torchrun passes it through; Ray's forwarding of actor output may drop the
    # last lines at shutdown (seen in the suite), so there the launcher's closing line carries the step
    assert len(stopped) == 1 or (launcher == "ray" and not stopped), text[-4000:]
    assert all(int(line.split("stopped at step ")[1].split()[0]) == STOP_STEP for line in stopped)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", f"step-{STOP_STEP}"]
    assert text.strip().splitlines()[-1].startswith(
        f"stopped: SIGTERM received: the workers finished step {STOP_STEP} and wrote checkpoint step-{STOP_STEP}; "
        "relaunch the same command to resume"), text[-2000:]
    assert "Traceback" not in text
    assert not (out / LOCK).exists() and not (out / ".engine-stop").exists()
    status = json.loads((out / "run.json").read_text())
    assert (status["status"], status["step"], status["reason"]) == ("stopped", STOP_STEP, "SIGTERM"), status
    assert losses(out) == launch_reference[:STOP_STEP]  # each step logged once, as uninterrupted
    if launcher == "ray":
        return  # the relaunch below is torchrun's, the same whoever stopped the run
    # the lock as a SIGKILLed launcher leaves it (its holder's pid gone) must not block the relaunch
    (out / LOCK).write_text(json.dumps(holder))
    resumed = launch_ok(["--gpus", "0", "--nproc", "2", *job(tiny_gpt2, out)], tmp_path / "resume.log")
    assert f"taking over the lock of a job that is gone (pid {holder['pid']} on this host has ended)" in resumed
    assert f"resumed from step-{STOP_STEP}" in resumed
    assert losses(out) == launch_reference and not (out / LOCK).exists()


@pytest.mark.fast
def test_a_stop_request_counts_only_for_its_own_launch(tmp_path):
    """A .engine-stop left by an earlier Ray launch must not stop the next one after its first step."""
    from engine.preemption import request_stop, stop_requested
    assert stop_requested(tmp_path, "launch-a") == 0
    request_stop(tmp_path, "launch-a", signal.SIGTERM)
    assert stop_requested(tmp_path, "launch-a") == signal.SIGTERM
    assert stop_requested(tmp_path, "launch-b") == 0


@pytest.mark.fast
def test_a_live_job_on_another_host_keeps_its_lock_by_its_heartbeat(tmp_path, monkeypatch):
    """Seen from another host the holder's pid says nothing: only the heartbeat (the lock file's
    mtime, touched every heartbeat_s) tells a live job from a dead one."""
    from engine.errors import EngineError
    from engine.runlock import RunLock
    holder = RunLock(tmp_path, heartbeat_s=0.1).acquire()
    try:
        monkeypatch.setattr(socket, "gethostname", lambda: "another-host")
        time.sleep(1.0)  # twice the staleness limit below: a lock without heartbeats would look dead
        with pytest.raises(EngineError, match="is in use by another job"):
            RunLock(tmp_path, stale_after_s=0.5).acquire()
    finally:
        holder.release()
    # the same lock without heartbeats (its holder gone without releasing it) is taken over
    (tmp_path / LOCK).write_text(json.dumps({"host": "old-host", "pid": 1, "started": "earlier"}))
    past = time.time() - 1.0
    os.utime(tmp_path / LOCK, (past, past))
    with RunLock(tmp_path, stale_after_s=0.5) as lock:
        assert json.loads((tmp_path / LOCK).read_text())["host"] == "another-host"
    assert lock is not None and not (tmp_path / LOCK).exists()
