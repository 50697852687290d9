"""Start one node's share of a job through torchrun's elastic agent, in-process.

The agent spawns `nproc` workers running engine.worker.run_and_exit, restarts them all up to
`max_restarts` times when one dies (they resume from the last complete checkpoint), and joins
other nodes through a static rendezvous at master_addr:master_port (node_rank given).
"""
from __future__ import annotations

import os
import uuid

from engine.errors import EngineError


def launch(cfg_dict: dict, *, nproc: int, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int, max_restarts: int = 0,
           threads_per_proc: int | None = None, rdzv_timeout: int = 900) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from engine.worker import run_and_exit

    if threads_per_proc:
        # like torchrun: keep nproc processes from each grabbing every core
        os.environ["OMP_NUM_THREADS"] = str(threads_per_proc)
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
        run_id=os.environ.get("ENGINE_RUN_ID", f"engine-{uuid.uuid4().hex[:8]}" if nnodes == 1 else "engine"),
        rdzv_backend="static", rdzv_endpoint=f"{master_addr}:{master_port}",
        rdzv_configs={"rank": node_rank, "timeout": rdzv_timeout}, rdzv_timeout=rdzv_timeout,
        max_restarts=max_restarts, monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, run_and_exit)(cfg_dict)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 2:  # the worker already printed the one-line reason
            raise EngineError(f"training stopped on rank {rank} (see the error above)") from None
        raise EngineError(f"worker rank {rank} failed with exit code {failure.exitcode}"
                          + (f" after {max_restarts} restarts" if max_restarts else "")
                          + "; its traceback is above") from None
