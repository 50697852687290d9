"""Start one node's share of a job through torchrun's elastic agent, in-process.

The agent spawns `nproc` workers running engine.worker.run_and_exit, restarts them all up to
`max_restarts` times when one dies (they resume from the last complete checkpoint), and joins
the other nodes through a c10d rendezvous whose TCP store node 0 hosts at master_addr:master_port.
Node ranks (and so global ranks) are assigned by the rendezvous; --node-rank 0 marks the host.
"""
from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

from engine.errors import EngineError, Interrupted


def launch(cfg_dict: dict, *, nproc: int, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int, max_restarts: int = 0,
           threads_per_proc: int | None = None, rdzv_timeout: int = 900, entry=None) -> None:
    """entry: the per-rank function called with cfg_dict (default engine.worker.run_and_exit;
    `engine eval` passes engine.evaluate.run_and_exit). It must exit 2 after printing a one-line error."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from engine.worker import REPORTS_TO_LAUNCHER, run_and_exit

    _say_worker_failures(max_restarts, cfg_dict.get("output_dir"))
    # set for the agent and the workers it spawns, and only while they run: a launch from a Python
    # process (a notebook, the tests) must not leave its OMP_NUM_THREADS on later work there
    env = {REPORTS_TO_LAUNCHER: "1",  # workers hand their one-line errors to us (see ChildFailedError below)
           # Restarted workers must not share the agents' rendezvous store: it outlives restarts, and
           # init_process_group keys are not per attempt, so a restarted rank can read a dead rank's
           # gloo/NCCL address and fail with "connectFullMesh ... Connection refused" (torch 2.13, seen
           # in tests/test_launch.py). Opting out makes worker rank 0 host a fresh store on a fresh port
           # in every round.
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if threads_per_proc and "OMP_NUM_THREADS" not in os.environ:  # a user's own setting wins
        env["OMP_NUM_THREADS"] = str(threads_per_proc)  # like torchrun: nproc processes share the cores
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
        run_id=os.environ.get("ENGINE_RUN_ID", f"engine-{uuid.uuid4().hex[:8]}" if nnodes == 1 else "engine"),
        # c10d, not static: static reuses one store for the workers of every attempt (see above)
        # and cannot be told otherwise; c10d starts a new round per restart on every node.
        # port 0 (one node, no --master-port): the store binds a free port itself, no race with other jobs
        rdzv_backend="c10d", rdzv_endpoint=f"{master_addr}:{master_port}",
        rdzv_configs={"is_host": node_rank == 0, "join_timeout": rdzv_timeout, "read_timeout": rdzv_timeout,
                      "last_call_timeout": 1},
        rdzv_timeout=rdzv_timeout,
        max_restarts=max_restarts, monitor_interval=0.5, start_method="spawn",
        # the address other nodes use to reach worker rank 0's store when rank 0 is here
        local_addr="127.0.0.1" if nnodes == 1 else (master_addr if node_rank == 0 else None))
    try:
        with _environment(env):
            elastic_launch(config, entry or run_and_exit)(cfg_dict)
    except (DistError, RendezvousError) as e:  # the agents' rendezvous (node 0 hosts its TCP store)
        if _address_in_use(e) and node_rank == 0:
            raise EngineError(f"--master-port {master_port} is already in use on {master_addr}; pick another port"
                              + (" (or leave --master-port out: a free one is chosen)" if nnodes == 1 else "")) from None
        if nnodes == 1:
            raise EngineError(f"could not start the local process group: {_first_line(e)}") from None
        if node_rank == 0:
            raise EngineError(f"not all {nnodes} nodes joined the rendezvous at {master_addr}:{master_port} within "
                              f"--rdzv-timeout {rdzv_timeout} s ({_first_line(e)}); start `engine launch ... "
                              f"--nnodes {nnodes} --node-rank R --master-addr {master_addr} --master-port "
                              f"{master_port}` on every other node") from None
        raise EngineError(f"node {node_rank} could not join the rendezvous at {master_addr}:{master_port} within "
                          f"--rdzv-timeout {rdzv_timeout} s ({_first_line(e)}); is node 0 running with the same "
                          "--master-addr/--master-port, and is that port reachable from here?") from None
    except SignalException as e:  # the agent forwarded it to the workers, which checkpointed and stopped
        from engine.checkpoint import stop_summary
        done = stop_summary(Path(cfg_dict["output_dir"])) if "output_dir" in cfg_dict else \
            "finished their step and wrote a checkpoint"
        raise Interrupted(f"{signal.Signals(e.sigval).name} received: the workers {done}; relaunch the same "
                          "command to resume", e.sigval) from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode - 128 in (signal.SIGTERM, signal.SIGINT):  # a signal sent to the workers alone
            raise Interrupted(f"rank {rank} stopped on {signal.Signals(failure.exitcode - 128).name} after writing "
                              f"a checkpoint; relaunch the same command to resume", failure.exitcode - 128) from None
        if failure.exitcode == 2:  # bad input: the worker's one line is in its reply file (engine.worker)
            message = failure.message if isinstance(failure.message, str) and failure.message else None
            raise EngineError(message or f"{'training' if entry is None else 'the job'} stopped on rank {rank} "
                              "(see the error above)") from None
        raise EngineError(f"worker rank {rank} failed with exit code {failure.exitcode}"
                          + (f" after {max_restarts} restarts" if max_restarts else "")
                          + "; its traceback is above") from None


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _address_in_use(e: BaseException) -> bool:
    text = str(e)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


class _WorkerFailureFilter:
    """torchelastic logs every failed worker with a traceback of its own polling code. A worker that
    exits 2 has said why in one line (which the launcher prints): that record is noise. A worker that
    died (killed, crashed) while restarts are left becomes one line saying which, how, and what
    happens next; the last failure keeps its traceback (the launcher's error line points to it)."""

    def __init__(self, max_restarts: int, output_dir: str | None):
        self.restarts_left, self.output_dir = max_restarts, output_dir

    def filter(self, record) -> bool:
        if not record.getMessage().startswith("failed (exitcode: "):
            return True
        exitcode, local_rank, pid = record.args[:3]
        if exitcode == 2:
            return False
        if self.restarts_left <= 0:
            return True
        self.restarts_left -= 1
        how = (f"killed by {signal.Signals(-exitcode).name}" if isinstance(exitcode, int) and exitcode < 0
               else f"exit code {exitcode}")
        resume = "the newest complete checkpoint"
        if self.output_dir:
            from engine.checkpoint import latest_checkpoint
            newest = latest_checkpoint(Path(self.output_dir))
            resume = newest.name if newest is not None else "the start (no checkpoint yet)"
        from engine.metrics import log
        log(f"worker local rank {local_rank} (pid {pid}) died, {how}: restarting all workers of this node "
            f"({self.restarts_left} restart{'s' if self.restarts_left != 1 else ''} left after this one); "
            f"they resume from {resume}")
        return False


def _say_worker_failures(max_restarts: int, output_dir: str | None) -> None:
    import logging
    logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    for f in [f for f in logger.filters if isinstance(f, _WorkerFailureFilter)]:
        logger.removeFilter(f)  # one launch per process normally; tests launch several in one
    logger.addFilter(_WorkerFailureFilter(max_restarts, output_dir))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
