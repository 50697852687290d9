"""Fixed cost of starting a 2-worker CPU (gloo) process group on Ray: plain actors vs Ray Train's
TorchTrainer. Each worker imports torch, joins the group and does one all_reduce; no training.

    .venv/bin/python benchmarks/ray_launch_overhead.py [--repeat 2]

Prints one JSON line per measurement; docs/launch.md quotes the results. Uses a private local
Ray instance (loopback, no dashboard, temporary dirs) and stops it afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time


def _allreduce_once() -> float:
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    value = float(t)
    dist.destroy_process_group()
    return value


class Rank:
    def port(self) -> int:
        from backends.host import free_port
        return free_port("")

    def run(self, env: dict) -> float:
        os.environ.update(env)
        return _allreduce_once()


def actors(ray, n: int) -> float:
    start = time.perf_counter()
    cls = ray.remote(num_cpus=1)(Rank)
    group = [cls.remote() for _ in range(n)]
    port = ray.get(group[0].port.remote())
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n)}
    out = ray.get([a.run.remote({**env, "RANK": str(i), "LOCAL_RANK": str(i)}) for i, a in enumerate(group)])
    assert out == [float(n)] * n, out
    for a in group:
        ray.kill(a)
    return time.perf_counter() - start


def trainer(n: int, storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(_config):
        import torch
        import torch.distributed as dist
        t = torch.ones(1)
        dist.all_reduce(t)
        assert float(t) == n

    start = time.perf_counter()
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=n, use_gpu=False),
                 run_config=RunConfig(name=f"overhead-{os.getpid()}-{time.time_ns()}", storage_path=storage)).fit()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind to loopback (see launch/ray_launcher.py)
    import ray
    temp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    storage = tempfile.mkdtemp(prefix="ray-bench-storage-")
    try:
        start = time.perf_counter()
        ray.init(num_cpus=max(args.workers, os.cpu_count() or 1), include_dashboard=False,
                 _temp_dir=temp, configure_logging=False)
        print(json.dumps({"what": "ray.init (local)", "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        for i in range(args.repeat):
            print(json.dumps({"what": "actors", "run": i, "seconds": round(actors(ray, args.workers), 1)}), flush=True)
            print(json.dumps({"what": "TorchTrainer", "run": i, "seconds": round(trainer(args.workers, storage), 1)}),
                  flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
