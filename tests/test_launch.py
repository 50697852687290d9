"""Launching beyond one process group: Ray, multi-node torchrun (simulated on one machine) and
automatic recovery from a killed worker. Real processes throughout: the `engine` CLI in
subprocesses, torchrun's elastic agent, a private local Ray instance.

Every run trains the same tiny job (8 steps, a checkpoint every 2 steps, loss logged every step),
so each scenario's per-step losses are compared with one uninterrupted single-node 2-process run.
Workers are killed with SIGKILL by PID at known moments through the test-only hooks in
engine/testhooks.py (ENGINE_TEST_PID_DIR, ENGINE_TEST_PAUSE).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ENGINE, REPO, SHAKESPEARE, assert_one_error_line, losses

STEPS, SAVE_EVERY, KILL_STEP = 8, 2, 4
# one thread per process everywhere, so every layout computes with the same kernels
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def job(model: Path, out: Path) -> list[str]:
    return ["task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}",
            "data.max_train_samples=64", "data.block_size=32", "train.micro_batch_size=4",
            f"train.max_steps={STEPS}", "train.log_every=1", f"train.save_every={SAVE_EVERY}",
            f"output_dir={out}"]


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
                                     stderr=subprocess.STDOUT, env={**os.environ, **ENV, **(env or {})},
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


@pytest.fixture(scope="module")
def reference(tiny_gpt2, tmp_path_factory):
    """Per-step losses of an uninterrupted single-node 2-process torchrun run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    launch_ok(["--gpus", "0", "--nproc", "2", *job(tiny_gpt2, out)], out.parent / "log.txt")
    got = losses(out)
    assert len(got) == STEPS
    return got


def test_two_nodes_on_one_machine_equal_single_node(tiny_gpt2, reference, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = [Launch(["--gpus", "0", "--nproc", "1", "--nnodes", "2", "--node-rank", rank,
                     "--master-addr", "127.0.0.1", "--master-port", port, *job(tiny_gpt2, out)],
                    tmp_path / f"node{rank}.log") for rank in (0, 1)]
    results = [n.wait() for n in nodes]
    for code, log in results:
        assert code == 0, log[-6000:]
    assert losses(out) == reference


def test_two_nodes_recover_from_sigkilled_worker(tiny_gpt2, reference, tmp_path):
    """Multi-node recovery: rank 1 (on one of the two simulated nodes) is SIGKILLed after step-4 is
    saved; both nodes' agents restart their workers in a new rendezvous round and resume."""
    out, pids, port = tmp_path / "run", tmp_path / "pids", free_port()
    pids.mkdir()
    env = {"ENGINE_TEST_PID_DIR": str(pids), "ENGINE_TEST_PAUSE": f"saved:{KILL_STEP}:300"}
    nodes = [Launch(["--gpus", "0", "--nproc", "1", "--nnodes", "2", "--node-rank", rank, "--max-restarts", "1",
                     "--master-addr", "127.0.0.1", "--master-port", port, *job(tiny_gpt2, out)],
                    tmp_path / f"node{rank}.log", env) for rank in (0, 1)]
    try:
        kill_rank_when(pids, lambda: (out / "checkpoints" / f"step-{KILL_STEP}").is_dir(), nodes[0])
    finally:
        results = [n.wait() for n in nodes]
    for code, log in results:
        assert code == 0, log[-6000:]
    assert f"resumed from step-{KILL_STEP}" in "".join(log for _, log in results)
    assert losses(out) == reference


def test_node_that_never_joins_times_out_with_one_line(tiny_gpt2, tmp_path):
    started = time.time()
    code, out = Launch(["--gpus", "0", "--nproc", "1", "--nnodes", "2", "--node-rank", "0", "--master-port",
                        free_port(), "--rdzv-timeout", "5", *job(tiny_gpt2, tmp_path / "run")],
                       tmp_path / "log.txt").wait(timeout=300)
    assert code == 2, out[-4000:]
    line = assert_one_error_line(out, "error: not all 2 nodes joined the rendezvous")
    assert "--node-rank" in line, line
    assert time.time() - started < 120


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
def test_sigkilled_worker_recovers_from_last_checkpoint(launcher, tiny_gpt2, reference, tmp_path):
    """Rank 1 is SIGKILLed right after checkpoint step-4 is complete; the launcher restarts the
    workers by itself (--max-restarts 1) and they resume from step-4."""
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
    assert losses(out) == reference
    assert_gone([killed, *rank_pids(pids)])
    if launcher == "ray":
        assert "restarting all 2 workers (1/1)" in log
        assert_ray_stopped(log)


def test_kill_during_checkpoint_write_resumes_from_previous(tiny_gpt2, reference, tmp_path):
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
    assert losses(out) == reference
    assert not list(ckpts.glob(".tmp-step-*"))


def test_ray_two_cpu_workers_equal_torchrun(tiny_gpt2, reference, tmp_path):
    out = tmp_path / "run"
    log = launch_ok(["--launcher", "ray", "--gpus", "0", "--nproc", "2", *job(tiny_gpt2, out)], tmp_path / "log.txt")
    assert "Ray: 2 CPU worker(s) on 1 node(s), master 127.0.0.1:" in log
    assert losses(out) == reference
    assert_ray_stopped(log)


def test_ray_errors_are_one_line(tiny_gpt2, tmp_path):
    """Unreachable address, a local cluster smaller than asked (no hang), Ray not installed."""
    def one_line(args, env=None, python_prefix=None):
        code, out = Launch(args, tmp_path / "log.txt", env).wait(timeout=300)
        assert code == 2, out[-4000:]
        return assert_one_error_line(out, "error: ")

    line = one_line(["--launcher", "ray", "--address", f"127.0.0.1:{free_port()}", "--gpus", "0", "--nproc", "2",
                     *job(tiny_gpt2, tmp_path / "a")])
    assert line.startswith("error: cannot reach the Ray cluster at --address 127.0.0.1:"), line

    cpus = os.cpu_count()
    line = one_line(["--launcher", "ray", "--gpus", "0", "--nproc", cpus + 1, *job(tiny_gpt2, tmp_path / "b")])
    assert line.startswith(f"error: {cpus + 1} CPU worker(s) asked, but the local Ray instance has {cpus} CPU(s)"), line

    blocker = tmp_path / "noray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('No module named ray')\n")
    line = one_line(["--launcher", "ray", "--gpus", "0", *job(tiny_gpt2, tmp_path / "c")],
                    env={"PYTHONPATH": str(blocker)})
    assert line.startswith("error: --launcher ray needs Ray, which is not installed; pip install"), line
