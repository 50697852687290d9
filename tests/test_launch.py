"""Launching beyond one process group: Ray, multi-node torchrun (simulated on one machine) and
automatic recovery from a killed worker. Real processes throughout: the `engine` CLI in
subprocesses, torchrun's elastic agent, a private local Ray instance.

Every run trains the same tiny job (tests/launching.py: 8 steps, a checkpoint every 2 steps, loss
logged every step), so each scenario's per-step losses are compared with one uninterrupted
single-node 2-process run (conftest.py launch_reference, a scenario of the shared job).
Workers are killed with SIGKILL by PID at known moments through the test-only hooks in
tests/hooks/sitecustomize.py (ENGINE_TEST_PID_DIR, ENGINE_TEST_PAUSE), which every process of a
launch takes (Launch puts them on PYTHONPATH). The errors that need no process (Ray missing, a
local instance too small, an unreachable cluster) are checked in this process.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
from click.testing import CliRunner

from helpers import assert_one_error_line, losses
from launch.cli import main
from launching import (KILL_STEP, SAVE_EVERY, Launch, assert_gone, assert_ray_stopped, free_port, job,
                       kill_rank_when, rank_pids)
from launching import shared_scenarios  # noqa: F401  (the reference run joins the shared job)


def test_two_nodes_recover_from_sigkilled_worker(tiny_gpt2, launch_reference, tmp_path):
    """Two nodes on one machine (--nnodes 2 x --nproc 1, two launches, one master) train the job
    of a single-node --nproc 2 run, loss for loss, through a failure: rank 1 (on one of the two
    simulated nodes) is SIGKILLed after step-4 is saved; both nodes' agents restart their workers
    in a new rendezvous round and resume."""
    out, pids, port = tmp_path / "run", tmp_path / "pids", free_port()
    pids.mkdir()
    env = {"ENGINE_TEST_PID_DIR": str(pids), "ENGINE_TEST_PAUSE": f"saved:{KILL_STEP}:300"}
    nodes = [Launch(["--gpus", "0", "--nproc", "1", "--nnodes", "2", "--node-rank", rank, "--max-restarts", "1",
                     "--master-addr", "127.0.0.1", "--master-port", port, *job(tiny_gpt2, out)],
                    tmp_path / f"node{rank}.log", env) for rank in (0, 1)]
    try:
        killed = kill_rank_when(pids, lambda: (out / "checkpoints" / f"step-{KILL_STEP}").is_dir(), nodes[0])
    finally:
        results = [n.wait() for n in nodes]
    for code, log in results:
        assert code == 0, log[-6000:]
    both = "".join(log for _, log in results)
    assert f"resumed from step-{KILL_STEP}" in both
    assert int((pids / "rank1.pid").read_text().split()[1]) == 1  # a second attempt ran
    assert losses(out) == launch_reference
    assert_gone([killed, *rank_pids(pids)])
    # the agent of the killed worker's node says so in the engine's line, not torchelastic's
    # ProcessExitedException traceback (a single node's agent restarts its workers the same way)
    assert (f"worker local rank 0 (pid {killed}) died, killed by SIGKILL: restarting all workers of this node "
            f"(0 restarts left after this one); they resume from step-{KILL_STEP}") in both, both[-4000:]
    assert "ProcessExitedException" not in both and "Traceback" not in both, both[-4000:]


def test_node_that_never_joins_times_out_with_one_line(tiny_gpt2, tmp_path):
    started = time.time()
    code, out = Launch(["--gpus", "0", "--nproc", "1", "--nnodes", "2", "--node-rank", "0", "--master-port",
                        free_port(), "--rdzv-timeout", "5", *job(tiny_gpt2, tmp_path / "run")],
                       tmp_path / "log.txt").wait(timeout=300)
    assert code == 2, out[-4000:]
    line = assert_one_error_line(out, "error: not all 2 nodes joined the rendezvous")
    assert "--node-rank" in line, line
    assert time.time() - started < 120


def test_sigkilled_ray_worker_recovers_from_last_checkpoint(tiny_gpt2, launch_reference, tmp_path):
    """Rank 1 is SIGKILLed right after checkpoint step-4 is complete; the Ray driver restarts the
    workers by itself (--max-restarts 1) and they resume from step-4: its 2 CPU actors on a private
    local instance give torchrun's losses, and the instance is gone after. (torchrun's agent does the
    same in the two-node test above.)"""
    launcher = "ray"
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    run = Launch(["--launcher", launcher, "--max-restarts", "1", "--gpus", "0", "--nproc", "2",
                  *job(tiny_gpt2, out)], tmp_path / "log.txt",
                 env={"ENGINE_TEST_PID_DIR": str(pids), "ENGINE_TEST_PAUSE": f"saved:{KILL_STEP}:300"})
    killed = kill_rank_when(pids, lambda: (out / "checkpoints" / f"step-{KILL_STEP}").is_dir(), run)
    code, log = run.wait()
    assert code == 0, log[-6000:]
    assert f"resumed from step-{KILL_STEP}" in log
    assert int((pids / "rank1.pid").read_text().split()[1]) == 1  # a second attempt ran
    assert losses(out) == launch_reference
    assert_gone([killed, *rank_pids(pids)])
    assert "Ray: 2 CPU worker(s) on 1 node(s), master 127.0.0.1:" in log
    assert "restarting all 2 workers (1/1)" in log
    assert_ray_stopped(log)


def test_kill_during_checkpoint_write_resumes_from_previous(tiny_gpt2, launch_reference, tmp_path):
    """Rank 1 dies while checkpoint step-4 is being written (its shards are in .tmp-step-4):
    that checkpoint never becomes complete and the restarted job resumes from step-2."""
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    run = Launch(["--max-restarts", "1", "--gpus", "0", "--nproc", "2", *job(tiny_gpt2, out)], tmp_path / "log.txt",
                 env={"ENGINE_TEST_PID_DIR": str(pids), "ENGINE_TEST_PAUSE": f"saving:{KILL_STEP}:300"})
    ckpts = out / "checkpoints"
    kill_rank_when(pids, lambda: (ckpts / f".tmp-step-{KILL_STEP}" / "rng-rank1.pt").exists(), run)
    assert not (ckpts / f"step-{KILL_STEP}").exists()
    code, log = run.wait()
    assert code == 0, log[-6000:]
    assert f"resumed from step-{KILL_STEP - SAVE_EVERY}" in log and f"resumed from step-{KILL_STEP}" not in log
    assert log.count(f"new run in {out}") == 1  # once, by the rank that made the directory, not again on restart
    assert losses(out) == launch_reference
    assert not list(ckpts.glob(".tmp-step-*"))


def test_ray_errors_are_one_line(tiny_gpt2, tmp_path, monkeypatch):
    """Ray not installed, a local instance smaller than asked (no hang), an unreachable address: one
    line each, before any process starts (in this process)."""
    pytest.importorskip("ray")

    def one_line(*args) -> str:
        result = CliRunner().invoke(main, ["launch", "--launcher", "ray", "--gpus", "0", *map(str, args)])
        assert result.exit_code == 2, result.output
        return assert_one_error_line(result.output, "error: ")

    cpus = os.cpu_count()
    line = one_line("--nproc", cpus + 1, *job(tiny_gpt2, tmp_path / "b"))
    assert line.startswith(f"error: {cpus + 1} CPU worker(s) asked, but the local Ray instance has {cpus} CPU(s)"), line
    line = one_line("--address", f"127.0.0.1:{free_port()}", "--nproc", "2", *job(tiny_gpt2, tmp_path / "a"))
    assert line.startswith("error: cannot reach the Ray cluster at --address 127.0.0.1:"), line
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    line = one_line(*job(tiny_gpt2, tmp_path / "c"))
    assert line.startswith("error: --launcher ray needs Ray, which is not installed; pip install"), line
    assert not any((tmp_path / d).exists() for d in "abc")
