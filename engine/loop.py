"""THE training loop, shared by every backend. It knows tasks, data and the run directory;
it talks to the backend only through the verbs of backends.base.Backend."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from backends.base import Backend, OptimizerSpec, SchedulerSpec
from engine.checkpoint import (RunState, barrier, latest_checkpoint, load_checkpoint, save_checkpoint,
                               seed_everything, write_run_status)
from engine.config import Config
from engine.errors import EngineError
from engine.metrics import MetricsLog, Progress, log
from engine.tasks import Collective, Task, TaskData


def step_batches(n_examples: int, global_batch: int, seed: int, epoch: int, step_in_epoch: int) -> list[int]:
    """The example indices of one optimizer step: a seeded per-epoch permutation cut into global
    batches. Which ranks/micro-batches share them out does not change the set, so 2 ranks x b
    and 1 rank x grad_accum 2 x b see the same examples in every step."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_examples, generator=g)
    return order[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch].tolist()


def train(cfg: Config, backend: Backend, task: Task, data: TaskData, build_model, tokenizer,
          output_dir: Path) -> dict:
    t = cfg.train
    main = backend.is_main
    micro, accum, dp = t.micro_batch_size, t.grad_accum, backend.dp_size
    global_batch = micro * accum * dp
    n_train = len(data.train)
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise EngineError(f"the training set has {n_train} examples, fewer than one global batch of "
                          f"{global_batch} (micro_batch_size {micro} x grad_accum {accum} x {dp} ranks)")
    dropped = n_train - steps_per_epoch * global_batch
    if dropped and main:
        log(f"warning: {dropped} of {n_train} training examples are dropped each epoch "
            f"(not a multiple of the global batch {global_batch})")
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))

    seed_everything(t.seed)
    rss_before_setup = _current_rss_mb()
    backend.setup(build_model,
                  OptimizerSpec(t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps),
                  SchedulerSpec(t.scheduler, round(t.warmup_ratio * total_steps), total_steps))
    state = RunState(dp_size=dp, global_batch=global_batch)
    resume_from = latest_checkpoint(output_dir)
    if resume_from is not None:
        state = load_checkpoint(backend, resume_from)
        if state.global_batch != global_batch and main:
            log(f"warning: global batch changed from {state.global_batch} to {global_batch} on resume")
        state.global_batch, state.dp_size = global_batch, dp
    if main:
        write_run_status(output_dir, "running", step=state.step, total_steps=total_steps)
        log(f"backend {cfg.backend.name} {backend.describe()} | {dp} data-parallel ranks | global batch "
            f"{global_batch} | {total_steps} steps ({steps_per_epoch}/epoch)"
            + (f" | resumed from {resume_from.name}" if resume_from else ""))
    metrics = MetricsLog(output_dir, state.step, enabled=main)
    progress = Progress(total_steps, state.step, enabled=main)
    collective = _collective(backend)

    window = _new_window()
    last_saved = state.step
    finished = True
    while state.step < total_steps:
        epoch, step_in_epoch = divmod(state.step, steps_per_epoch)
        indices = step_batches(n_train, global_batch, t.seed, epoch, step_in_epoch)
        mine = indices[backend.dp_rank * micro * accum:(backend.dp_rank + 1) * micro * accum]

        started = time.perf_counter()
        backend.train_mode(True)
        step_loss = 0.0
        for k in range(accum):
            batch = _to_device(task.collate([data.train[i] for i in mine[k * micro:(k + 1) * micro]]),
                               backend.device)
            step_loss += float(backend.forward_backward(batch, sync_grads=k == accum - 1)) / accum
            window["tokens"] += task.tokens_in(batch)
        info = backend.step()
        seconds = time.perf_counter() - started

        state.step += 1
        state.samples_seen += global_batch
        window["loss"] += step_loss
        window["steps"] += 1
        window["samples"] += micro * accum
        window["seconds"] += seconds
        window["skipped"] += int(info.skipped)
        progress.update(seconds, loss=f"{step_loss:.4f}")

        if state.step % t.log_every == 0 or state.step == total_steps:
            loss, tokens, samples = _reduce_mean_sums(backend, collective, window)
            state.tokens_seen += int(tokens)
            metrics.write("train", state.step, loss=loss, lr=info.lr, grad_norm=info.grad_norm,
                          tokens_per_s=tokens / window["seconds"], samples_per_s=samples / window["seconds"],
                          skipped_steps=window["skipped"], epoch=round(state.step / steps_per_epoch, 4),
                          **{k: round(v, 1) for k, v in backend.memory_stats().items()})
            window = _new_window()

        if t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps:
            _evaluate(cfg, backend, task, data, collective, metrics, state.step)
        if t.save_every and state.step % t.save_every == 0 and state.step < total_steps:
            save_checkpoint(backend, output_dir, state, t.keep_last)
            last_saved = state.step
        if t.stop_at_step and state.step >= t.stop_at_step and state.step < total_steps:
            finished = False
            break

    progress.close()
    _write_rank_memory(backend, metrics, state.step, rss_before_setup)
    if state.step != last_saved and t.save_final:
        save_checkpoint(backend, output_dir, state, t.keep_last)
    result = {"step": state.step, "finished": finished}
    if finished:
        result.update(_evaluate(cfg, backend, task, data, collective, metrics, state.step))
        export_dir = Path(output_dir) / "model"
        if t.save_final:
            backend.export_pretrained(export_dir)
        if main:
            if t.save_final:
                tokenizer.save_pretrained(export_dir)
            write_run_status(output_dir, "finished", step=state.step, total_steps=total_steps)
            log(f"finished: model saved to {export_dir}" if t.save_final else "finished (train.save_final=false: "
                "no final checkpoint or model export)")
    elif main:
        log(f"stopped at step {state.step} (train.stop_at_step); relaunch with the same output_dir to resume")
    barrier()
    metrics.close()
    return result


def _current_rss_mb() -> float | None:
    """This process's resident memory now (Linux /proc), for the `memory` event's baseline."""
    try:
        import os
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _write_rank_memory(backend, metrics, step: int, rss_before_setup: float | None) -> None:
    """One `memory` event after the training steps (before the final save/export): every rank's
    peak memory_stats(), plus its host RSS just before the model was built (what training added
    is the difference). Gathered over all ranks, not only the data-parallel group."""
    mine = {k: round(v, 1) for k, v in backend.memory_stats().items()}
    if rss_before_setup is not None:
        mine["host_rss_before_setup_mb"] = round(rss_before_setup, 1)
    per_rank = [mine]
    if dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
    metrics.write("memory", step, per_rank=per_rank)


def _new_window() -> dict:
    """Sums over the steps since the last log line."""
    return {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "seconds": 0.0, "skipped": 0}


def _evaluate(cfg, backend, task, data, collective, metrics, step) -> dict:
    if data.eval is None:
        return {}
    backend.train_mode(False)
    size = cfg.train.eval_batch_size or cfg.train.micro_batch_size
    # each example on exactly one data-parallel rank: no padding, no duplicates
    mine = list(range(backend.dp_rank, len(data.eval), backend.dp_size))
    state = task.eval_init()
    # every rank runs the same number of forwards (that of the rank with the most examples):
    # backends that shard parameters (ZeRO-3) gather them collectively inside the forward
    n_batches = math.ceil(math.ceil(len(data.eval) / backend.dp_size) / size)
    for start in range(0, n_batches * size, size):
        chunk = mine[start:start + size]
        if not chunk:  # this rank has run out: a forward whose result is discarded
            backend.eval_forward(_to_device(task.collate([data.eval[0]]), backend.device))
            continue
        batch = _to_device(task.collate([data.eval[i] for i in chunk]), backend.device)
        task.eval_update(state, backend.eval_forward(batch), batch, chunk)
    results = task.eval_finish(state, collective, backend.device)
    metrics.write("eval", step, **results)
    if backend.is_main:
        log(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in results.items()))
    return results


def _collective(backend: Backend) -> Collective:
    group = backend.dp_group

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(tensor, group=group)
        return tensor

    def all_gather_object(obj) -> list:
        if not dist.is_initialized():
            return [obj]
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    return Collective(all_reduce_sum, all_gather_object)


def _reduce_mean_sums(backend, collective, window) -> tuple[float, float, float]:
    """Loss averaged over steps and dp ranks; tokens and samples summed over dp ranks."""
    t = torch.tensor([window["loss"], float(window["tokens"]), float(window["samples"])],
                     dtype=torch.float64, device=backend.device)
    t = collective.all_reduce_sum(t)
    return float(t[0]) / (window["steps"] * backend.dp_size), float(t[1]), float(t[2])


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
