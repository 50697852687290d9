"""Run a job on a Ray cluster: one plain Ray actor per rank (one per GPU, or one per CPU worker
with gloo), each calling the same per-rank entry as torchrun (engine.worker.run).

Why actors and not Ray Train's TorchTrainer: measured on this project's machines (docs/launch.md),
TorchTrainer adds a large fixed cost per fit() and its own storage/run-name bookkeeping (reusing a
name resumes an old run), while the engine already owns the process group, checkpoints and resume.
The actors here only place processes and wire the environment torchrun would have set:
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK (GROUP_RANK), MASTER_ADDR, MASTER_PORT.

Stop: SIGTERM / SIGINT to the driver asks the workers, through the run directory, to finish their
step and write a checkpoint (engine.preemption); the driver then exits 143 / 130 as torchrun's
launcher does.

Recovery: when any actor dies (SIGKILL, OOM killer, node lost) or a rank raises, every actor of
the group is killed and a fresh group is started, up to `max_restarts` times; the training loop
resumes from the last complete checkpoint in the (shared) output_dir. Bad input (EngineError) is
not retried: it would fail the same way again.

Ray is optional: nothing here imports it until a Ray launch starts.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import uuid
from pathlib import Path

from engine.errors import EngineError, Interrupted
from engine.metrics import log
from engine.preemption import LAUNCH_ID, STOP_FILE, catch_signals, request_stop, restore_signals

INSTALL_HINT = "pip install 'ray>=2.50' (or: pip install -e '.[ray]')"
_FORWARDED_ENV_PREFIXES = ("ENGINE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "DS_", "NCCL_")


def require_ray():
    try:
        import ray  # noqa: F401
    except ImportError:
        raise EngineError(f"--launcher ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


def check_local_capacity(workers: int, use_gpu: bool) -> None:
    """A private local instance gets this machine's CPUs (and GPUs): a job it can never hold is
    refused before the instance (or anything else) is started."""
    kind, total = ("GPU", _local_gpu_count()) if use_gpu else ("CPU", os.cpu_count() or 1)
    if total < workers:
        hint = "" if use_gpu else "; use --nproc N with N <= the CPU count, or a Ray cluster (--address)"
        raise EngineError(f"{workers} {kind} worker(s) asked, but the local Ray instance has {total} {kind}(s) "
                          f"(this machine's){hint}")


class _RankWorker:
    """One rank. Plain class; wrapped with ray.remote at launch (so this module imports without Ray)."""

    def node_info(self) -> dict:
        import ray
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(), "cpus": os.cpu_count()}

    def free_port(self) -> int:
        from backends.host import free_port
        return free_port("")  # on the actor's own (possibly remote) node, every interface

    def run(self, cfg_dict: dict, env: dict) -> str | None:
        """Train as one rank. Returns None, or the one-line message of a bad-input EngineError."""
        os.environ.update(env)
        import torch
        if "OMP_NUM_THREADS" in env:
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        from engine.worker import run
        try:
            run(cfg_dict)
        except EngineError as e:
            return str(e) or type(e).__name__
        return None


def launch(cfg_dict: dict, *, workers: int, use_gpu: bool, address: str | None = None,
           gpus_per_node: int | None = None, max_restarts: int = 0, resource_timeout: float = 300) -> None:
    ray = require_ray()
    if gpus_per_node is not None:
        if not use_gpu:
            raise EngineError("--gpus-per-node needs GPU workers (--gpus N)")
        if gpus_per_node < 1 or workers % gpus_per_node:
            raise EngineError(f"--gpus {workers} must be a multiple of --gpus-per-node {gpus_per_node}")
    temp_dir = _connect(ray, address, workers, use_gpu)
    stop = _StopOnSignal(Path(cfg_dict["output_dir"]))
    try:
        _check_capacity(ray, workers, use_gpu, gpus_per_node, address)
        for attempt in range(max_restarts + 1):
            failure = _run_group(ray, cfg_dict, workers, use_gpu, gpus_per_node, attempt, resource_timeout,
                                 stop.launch_id)
            if failure is None:
                if stop.signum:
                    from engine.checkpoint import stop_summary
                    raise Interrupted(f"{signal.Signals(stop.signum).name} received: the workers "
                                      f"{stop_summary(Path(cfg_dict['output_dir']))}; relaunch the same command to "
                                      "resume", stop.signum)
                return
            rank, reason = failure
            if attempt == max_restarts:
                raise EngineError(f"worker rank {rank} failed ({reason})"
                                  + (f" after {max_restarts} restart(s)" if max_restarts else
                                     "; --max-restarts N restarts the workers from the last checkpoint"))
            log(f"worker rank {rank} failed ({reason}); restarting all {workers} workers "
                f"({attempt + 1}/{max_restarts}); they resume from the last complete checkpoint")
    finally:
        stop.close()
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
            log("local Ray instance stopped")


class _StopOnSignal:
    """SIGTERM / SIGINT to the driver (a cluster preempting the job, a user's Ctrl-C): the workers
    are asked through the run directory (engine.preemption.request_stop) to finish their step,
    checkpoint and return; the driver waits for them. Ray's actors cannot take the signal itself."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir, self.signum = output_dir, 0
        self.launch_id = uuid.uuid4().hex
        self.previous = catch_signals(self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.signum:
            return  # a second signal changes nothing: the checkpoint is being written
        self.signum = signum
        self.output_dir.mkdir(parents=True, exist_ok=True)
        request_stop(self.output_dir, self.launch_id, signum)
        log(f"{signal.Signals(signum).name} received: the workers finish their step, write a checkpoint and stop")

    def close(self) -> None:
        restore_signals(self.previous)
        (self.output_dir / STOP_FILE).unlink(missing_ok=True)


def _connect(ray, address: str | None, workers: int, use_gpu: bool) -> str | None:
    """Join the cluster at `address`, or start a private local instance (returns its temp dir)."""
    common = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address:
        if address != "auto" and not address.startswith("ray://"):
            _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EngineError(f"cannot connect to the Ray cluster at --address {address}: {first}") from None
        log(f"connected to Ray cluster at {address}")
        return None
    # a private instance for this run: loopback only, no dashboard, its own temp dir (short: sockets live there)
    # Ray turns a 127.0.0.1 node address into the machine's public IP and binds its servers to every
    # interface, unless "clusters" are off (its single-machine mode for macOS/Windows): then GCS, raylet
    # and workers bind to 127.0.0.1. The variable reaches the processes ray.init starts; the module
    # attribute covers a ray already imported in this process.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    temp_dir = tempfile.mkdtemp(prefix="ray-engine-", dir="/tmp")
    gpus = _local_gpu_count() if use_gpu else 0
    try:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, num_gpus=gpus, _node_ip_address="127.0.0.1",
                 _temp_dir=temp_dir, namespace=f"engine-{os.getpid()}", **common)
    except Exception:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    log(f"local Ray instance started (127.0.0.1 only, dashboard off, temp dir {temp_dir})")
    return temp_dir


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"--address {address!r}: expected auto or HOST:PORT (the head's GCS port, default 6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise EngineError(f"cannot reach the Ray cluster at --address {address} ({e.strerror or e}); "
                          f"is `ray start --head --port {port}` running there?") from None


def _local_gpu_count() -> int:
    from backends.host import gpu_count
    return gpu_count()


def _describe_cluster(ray) -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = ", ".join(f"{n['NodeManagerAddress']}: {int(n['Resources'].get('CPU', 0))} CPU "
                         f"{int(n['Resources'].get('GPU', 0))} GPU" for n in nodes)
    return f"{len(nodes)} node(s): {per_node}"


def _check_capacity(ray, workers: int, use_gpu: bool, gpus_per_node: int | None, address: str | None) -> None:
    """Fail at once, saying what is there, when the cluster can never hold the job."""
    kind = "GPU" if use_gpu else "CPU"
    total = int(ray.cluster_resources().get(kind, 0))
    where = f"the Ray cluster at {address}" if address else "the local Ray instance"
    if total < workers:
        hint = "" if use_gpu or address else "; use --nproc N with N <= the CPU count, or a Ray cluster (--address)"
        raise EngineError(f"{workers} {kind} worker(s) asked, but {where} has {total} {kind}(s) "
                          f"({_describe_cluster(ray)}){hint}")
    if gpus_per_node:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= gpus_per_node]
        if len(nodes) < workers // gpus_per_node:
            raise EngineError(f"{workers // gpus_per_node} node(s) with {gpus_per_node} GPUs asked, but {where} "
                              f"has {len(nodes)} such node(s) ({_describe_cluster(ray)})")


def _run_group(ray, cfg_dict, workers, use_gpu, gpus_per_node, attempt, resource_timeout, launch_id):
    """Start one worker group and wait for it. Returns None on success or (rank, reason) on a failure
    worth a restart; raises EngineError for bad input or missing resources."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    per = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    if gpus_per_node:
        bundles, strategy = [{"CPU": gpus_per_node, "GPU": gpus_per_node}] * (workers // gpus_per_node), "STRICT_SPREAD"
    else:
        bundles, strategy = [dict(per)] * workers, "PACK"
    pg = placement_group(bundles, strategy=strategy)
    actors = []
    try:
        try:
            ray.get(pg.ready(), timeout=resource_timeout)
        except GetTimeoutError:
            raise EngineError(f"the Ray cluster could not give {workers} {'GPU' if use_gpu else 'CPU'} worker slot(s) "
                              f"within {resource_timeout:.0f} s (free now: {_free(ray)}; {_describe_cluster(ray)}); "
                              "other jobs may hold them") from None
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=0)(_RankWorker)
        for i in range(workers):
            strategy_i = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i // gpus_per_node if gpus_per_node else i)
            actors.append(actor_cls.options(scheduling_strategy=strategy_i).remote())
        try:
            infos = ray.get([a.node_info.remote() for a in actors], timeout=resource_timeout)
        except RayActorError as e:
            return 0, f"a worker died while starting: {_one_line(e)}"
        ranks = _assign_ranks(infos, use_gpu)
        rank0 = next(i for i, r in enumerate(ranks) if r["RANK"] == 0)
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}  # as the cluster knows them
        master_addr = addresses.get(infos[rank0]["node_id"], infos[rank0]["ip"])
        master_port = ray.get(actors[rank0].free_port.remote())
        shared = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}
        futures = {}
        for i, actor in enumerate(actors):
            env = {**shared, **{k: str(v) for k, v in ranks[i].items()},
                   "WORLD_SIZE": str(workers), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
                   "TORCHELASTIC_RESTART_COUNT": str(attempt), "TORCHELASTIC_MAX_RESTARTS": "0",
                   LAUNCH_ID: launch_id}
            if not use_gpu:  # like torchrun: split a node's cores between its ranks (a user's setting wins)
                env.setdefault("OMP_NUM_THREADS",
                               os.environ.get("OMP_NUM_THREADS") or
                               str(max(1, (infos[i]["cpus"] or 1) // ranks[i]["LOCAL_WORLD_SIZE"])))
            futures[actor.run.remote(cfg_dict, env)] = ranks[i]["RANK"]
        if attempt == 0:
            nodes = len({info["node_id"] for info in infos})
            log(f"Ray: {workers} {'GPU' if use_gpu else 'CPU'} worker(s) on {nodes} node(s), "
                f"master {master_addr}:{master_port}")
        pending = list(futures)
        while pending:
            # with a timeout: the driver's signal handler runs only when control returns to Python
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if not done:
                continue
            rank = futures[done[0]]
            try:
                message = ray.get(done[0])
            except RayActorError as e:
                return rank, f"its process died: {_one_line(e)}"
            except RayTaskError as e:
                return rank, _one_line(e)
            if message is not None:
                raise EngineError(message)
        return None
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)


def _assign_ranks(infos: list[dict], use_gpu: bool) -> list[dict]:
    """torchrun's numbering: ranks contiguous per node, nodes in order of their first actor,
    LOCAL_RANK ordered by GPU id. GPU workers on a node see all of that node's job GPUs
    (CUDA_VISIBLE_DEVICES) and pick theirs by LOCAL_RANK, as under torchrun."""
    by_node: dict[str, list[int]] = {}
    for i, info in enumerate(infos):
        by_node.setdefault(info["node_id"], []).append(i)
    out: list[dict] = [{} for _ in infos]
    rank = 0
    for node_rank, members in enumerate(by_node.values()):
        if use_gpu:
            members = sorted(members, key=lambda i: [int(g) if g.isdigit() else g for g in infos[i]["gpu_ids"]])
            visible = ",".join(g for i in members for g in infos[i]["gpu_ids"])
        for local_rank, i in enumerate(members):
            out[i] = {"RANK": rank, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": len(members),
                      "NODE_RANK": node_rank, "GROUP_RANK": node_rank}
            if use_gpu:
                out[i]["CUDA_VISIBLE_DEVICES"] = visible
            rank += 1
    return out


def _free(ray) -> str:
    free = ray.available_resources()
    return ", ".join(f"{int(free.get(k, 0))} {k}" for k in ("CPU", "GPU"))


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # RayTaskError: the last line is the original exception ("RuntimeError: ...")
    return (lines[-1] if isinstance(e, Exception) and "Traceback" in text else lines[0] if lines else type(e).__name__)[:300]
