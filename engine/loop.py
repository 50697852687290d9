"""THE training loop, shared by every backend. It knows tasks, data and the run directory;
it talks to the backend only through the verbs of backends.base.Backend.

Read top to bottom: `train` plans the run, sets the backend up, resumes, and runs the steps with
their bookkeeping (log, eval, checkpoint); `_train_step` is one optimizer step over this rank's
micro-batches; `_log_window` reduces a log window over ranks; `_finish` saves, evaluates, exports. Losses and token counts stay on
the device between log steps: the host never waits for the device inside a step, so it can queue
work ahead (the progress bar shows the last logged loss).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from backends.base import Backend, SchedulerSpec
from backends.host import current_rss_mb
from engine.checkpoint import (RunState, barrier, kept_export_dir, run_status, save_checkpoint, seed_everything,
                               write_run_status)
from engine.config import Config
from engine.errors import EngineError
from engine.metrics import MetricsLog, Progress, format_metrics, log
from engine.modeling import parameter_counts
from engine.preemption import Preemption, signal_name
from engine.profiling import profiled_step
from engine.tasks import Collective, Task, TaskData
from engine.universal import ModelNames, load_checkpoint


def step_batches(n_examples: int, global_batch: int, seed: int, epoch: int, step_in_epoch: int) -> list[int]:
    """The example indices of one optimizer step: a seeded per-epoch permutation cut into global
    batches. Which ranks/micro-batches share them out does not change the set, so 2 ranks x b
    and 1 rank x grad_accum 2 x b see the same examples in every step."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_examples, generator=g)
    return order[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch].tolist()


@dataclass
class Plan:
    micro: int
    accum: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int


@dataclass
class Run:
    """What the step and the bookkeeping share for one training session."""
    cfg: Config
    backend: Backend
    task: Task
    data: TaskData
    plan: Plan
    output_dir: Path
    state: RunState
    metrics: MetricsLog
    collective: Collective
    params: dict                    # parameter_counts of the model the backend built (memory event)
    no_train_metrics: bool = False  # the backend returned no training logits (said once)


def plan_run(cfg: Config, n_train: int, dp_size: int, main: bool) -> Plan:
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum * dp_size
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise EngineError(f"the training set has {n_train} examples, fewer than one global batch of "
                          f"{global_batch} (micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x "
                          f"{dp_size} ranks)")
    dropped = n_train - steps_per_epoch * global_batch
    if dropped and main:
        log(f"warning: {dropped} of {n_train} training examples are dropped each epoch "
            f"(not a multiple of the global batch {global_batch})")
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    return Plan(t.micro_batch_size, t.grad_accum, global_batch, steps_per_epoch, total_steps)


def train(cfg: Config, backend: Backend, task: Task, data: TaskData, build_model, tokenizer,
          output_dir: Path, resume: tuple[Path | None, list[str]] = (None, []), continue_run: bool = False,
          model_names: ModelNames | None = None) -> dict:
    """resume: (the checkpoint to resume from or None, notes on newer unusable ones passed over),
    as engine.checkpoint.resumable_checkpoint found them. model_names: the model's parameter names,
    to resume a checkpoint written in another layout (engine/universal.py)."""
    t = cfg.train
    plan = plan_run(cfg, len(data.train), backend.dp_size, backend.is_main)
    seed_everything(t.seed)
    rss_before_setup = current_rss_mb()
    params = {}

    def build_and_count():  # the backend builds the model (under ZeRO-3, partitioned); count it as built
        model = build_model()
        params.update(parameter_counts(model))
        return model

    backend.setup(build_and_count, SchedulerSpec(t.scheduler, t.warmup_for(plan.total_steps), plan.total_steps))
    state, resumed_from = _resume(backend, plan, *resume, model_names)
    if continue_run:
        _continue_finished(cfg, backend, Path(output_dir), state, plan)
    if backend.is_main:
        write_run_status(output_dir, "running", step=state.step, total_steps=plan.total_steps)
        ranks = f"{backend.dp_size} data-parallel rank{'s' if backend.dp_size != 1 else ''}"
        log(f"backend {cfg.backend.name} {backend.describe()} | {ranks} | global batch "
            f"{plan.global_batch} | {plan.total_steps} steps ({plan.steps_per_epoch}/epoch)"
            + (f" | resumed from {resumed_from.name}" if resumed_from else ""))
    trackers = []
    if backend.is_main and t.report_to:
        from engine.trackers import open_trackers
        trackers = open_trackers(t.report_to, Path(output_dir), cfg.to_dict(), state.step)
    run = Run(cfg, backend, task, data, plan, Path(output_dir), state,
              MetricsLog(output_dir, state.step, enabled=backend.is_main, trackers=trackers), dp_collective(backend),
              params)
    progress = Progress(plan.total_steps, state.step, enabled=backend.is_main)
    if t.profile_step > plan.total_steps and backend.is_main:
        log(f"warning: train.profile_step={t.profile_step} is after the last step ({plan.total_steps}): nothing is profiled")

    window = Window(backend.device, task)
    preemption = Preemption(Path(output_dir))
    last_saved, finished, last_loss = state.step, True, None
    while state.step < plan.total_steps:
        started = time.perf_counter()
        profiling = state.step + 1 == t.profile_step
        with (profiled_step(t.profile_step, run.output_dir, backend.device, backend.rank, backend.is_main)
              if profiling else nullcontext()):
            info = _train_step(run, window)
        state.step += 1
        state.samples_seen += plan.global_batch
        if state.step % t.log_every == 0 or state.step == plan.total_steps:
            last_loss = _log_window(run, window, info, started)  # the one host sync of a step
            window = Window(backend.device, task)
        else:
            window.seconds += time.perf_counter() - started
        progress.update(time.perf_counter() - started, **({"loss": f"{last_loss:.4f}"} if last_loss else {}))
        if _periodic(t.eval_every, state.step, plan.total_steps):
            _evaluate(run)
        if _periodic(t.save_every, state.step, plan.total_steps):
            save_checkpoint(backend, output_dir, state, t.keep_last)
            last_saved = state.step
        if t.stop_at_step and t.stop_at_step <= state.step < plan.total_steps:
            finished = False
            break
        if preemption.requested() and state.step < plan.total_steps:
            finished = False
            break
    progress.close()
    interrupted_by = preemption.requested()
    try:  # a second signal while the checkpoint is written changes nothing
        return _finish(run, tokenizer, finished, last_saved, rss_before_setup, interrupted_by)
    finally:
        preemption.close()


def _resume(backend: Backend, plan: Plan, resume_from: Path | None, skipped: list[str],
            model_names: ModelNames | None) -> tuple[RunState, Path | None]:
    state = RunState(dp_size=backend.dp_size, global_batch=plan.global_batch)
    if skipped and backend.is_main:
        log(f"warning: checkpoint {'; '.join(skipped)} is unusable; resuming from {resume_from.name} instead")
    if resume_from is not None:
        state, layout_note = load_checkpoint(backend, resume_from, model_names)
        if layout_note and backend.is_main:
            log(layout_note)
        if state.global_batch != plan.global_batch and backend.is_main:
            log(f"warning: global batch changed from {state.global_batch} to {plan.global_batch} on resume")
        state.global_batch, state.dp_size = plan.global_batch, backend.dp_size
    return state, resume_from


def _continue_finished(cfg: Config, backend: Backend, output_dir: Path, state: RunState, plan: Plan) -> None:
    """`--continue`: train a finished run further. The scheduler was built for the new total and
    load_state restored its step, so the schedule continues from where the NEW schedule stands at
    the finished step (not from the old one's end value, 0 after a linear decay). The finished
    run's model/ export is kept as model-step-N/ before anything can overwrite it."""
    if state.step >= plan.total_steps:
        raise EngineError(f"--continue: the run finished at step {state.step}; train.max_steps / train.epochs "
                          f"give {plan.total_steps} steps, which must be more")
    lr = backend.realign_schedule()
    if backend.is_main and run_status(output_dir) == "finished":  # not when a restarted worker comes back
        export, kept = output_dir / "model", kept_export_dir(output_dir, state.step)
        if export.exists():
            if kept.exists():
                raise EngineError(f"--continue: {kept} already exists; move it away first")
            export.rename(kept)
        log(f"continuing a finished run from step {state.step} to {plan.total_steps}: the {cfg.train.scheduler} "
            f"schedule is rebuilt for {plan.total_steps} steps and resumes at step {state.step}"
            + (f" (lr {lr:.3g})" if lr is not None else "")
            + (f"; its model/ export is kept as {kept.name}/" if kept.exists() else ""))
    barrier()


def _periodic(every: int, step: int, total_steps: int) -> bool:
    """Every `every` steps (0 = never) before the last, which _finish handles."""
    return bool(every) and step % every == 0 and step < total_steps


class Window:
    """Sums over the steps since the last log line. Loss and the task's training-metric sums
    (task.train_metrics_init: e.g. correct/count for accuracy, or None) stay device tensors
    (adding to them queues work, it does not wait); tokens are counted on the host from the
    collated CPU batch."""

    def __init__(self, device, task: Task) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.task_sums = task.train_metrics_init(device)
        self.steps = self.tokens = self.samples = 0
        self.skipped: list = []  # per-step bools or device tensors
        self.seconds = 0.0


def _train_step(run: Run, window: Window):
    """One optimizer step: this rank's micro-batches, forward+backward each, then the backend's step."""
    backend, plan, task, data = run.backend, run.plan, run.task, run.data
    epoch, step_in_epoch = divmod(run.state.step, plan.steps_per_epoch)
    indices = step_batches(len(data.train), plan.global_batch, run.cfg.train.seed, epoch, step_in_epoch)
    per_rank = plan.micro * plan.accum
    mine = indices[backend.dp_rank * per_rank:(backend.dp_rank + 1) * per_rank]
    backend.train_mode(True)
    for k in range(plan.accum):
        batch = task.collate([data.train[i] for i in mine[k * plan.micro:(k + 1) * plan.micro]])
        window.tokens += task.tokens_in(batch)  # CPU tensors: no device sync
        batch = _to_device(batch, backend.device)
        out = backend.forward_backward(batch, sync_grads=k == plan.accum - 1,
                                       return_logits=window.task_sums is not None)
        window.loss += out.loss.double() / plan.accum
        if window.task_sums is not None:
            if out.logits is None:  # this backend cannot give them (e.g. pipeline parallel)
                _no_train_metrics(run)
                window.task_sums = None
            else:
                task.train_metrics_update(window.task_sums, out.logits, batch)
    info = backend.step()
    window.steps += 1
    window.samples += per_rank
    window.skipped.append(info.skipped)
    return info


def _log_window(run: Run, window: Window, info, step_started: float) -> float:
    """Reduce the window over data-parallel ranks (this waits for the device) and write a train event."""
    backend = run.backend
    counts = torch.tensor([window.tokens, window.samples], dtype=torch.float64).to(window.loss.device)
    task_sums = window.task_sums if window.task_sums is not None else counts[:0]
    sums = torch.cat([window.loss.reshape(1), counts, task_sums])
    sums = run.collective.all_reduce_sum(sums).tolist()
    window.seconds += time.perf_counter() - step_started  # after the sync: the device has caught up
    loss, tokens, samples = sums[0] / (window.steps * backend.dp_size), sums[1], sums[2]
    run.state.tokens_seen += int(tokens)
    task_metrics = run.task.train_metrics_finish(sums[3:]) if window.task_sums is not None else {}
    run.metrics.write("train", run.state.step, loss=loss, **task_metrics, lr=info.lr,
                      grad_norm=_number(info.grad_norm), tokens_per_s=tokens / window.seconds,
                      samples_per_s=samples / window.seconds,
                      skipped_steps=sum(int(_number(s)) for s in window.skipped),
                      epoch=round(run.state.step / run.plan.steps_per_epoch, 4),
                      **{k: round(v, 1) for k, v in backend.memory_stats().items()})
    return loss


def _no_train_metrics(run: Run) -> None:
    if not run.no_train_metrics and run.backend.is_main:
        log("training-set metrics (train_accuracy) are not reported: this backend returns no training "
            "logits here (pipeline parallel: they live on the last stage)")
    run.no_train_metrics = True


def _number(value):
    return float(value) if isinstance(value, torch.Tensor) else value


def _finish(run: Run, tokenizer, finished: bool, last_saved: int, rss_before_setup: float | None,
            interrupted_by: int = 0) -> dict:
    backend, state, t = run.backend, run.state, run.cfg.train
    _write_rank_memory(run, rss_before_setup)
    if state.step != last_saved and (t.save_final or interrupted_by):
        save_checkpoint(backend, run.output_dir, state, t.keep_last)
    result = {"step": state.step, "finished": finished, "interrupted_by": 0 if finished else interrupted_by}
    if finished:
        result.update(_evaluate(run))
        export_dir = run.output_dir / "model"
        if t.save_final:
            backend.export_pretrained(export_dir)
        if backend.is_main:
            if t.save_final:
                tokenizer.save_pretrained(export_dir)
            write_run_status(run.output_dir, "finished", step=state.step, total_steps=run.plan.total_steps)
            log(f"finished: model saved to {export_dir}" if t.save_final else "finished (train.save_final=false: "
                "no final checkpoint or model export)")
    elif backend.is_main:
        why = signal_name(interrupted_by) if result["interrupted_by"] else "train.stop_at_step"
        write_run_status(run.output_dir, "stopped", step=state.step, total_steps=run.plan.total_steps, reason=why)
        if result["interrupted_by"]:
            log(f"stopped at step {state.step} of {run.plan.total_steps} on {why}: checkpoint "
                f"{run.output_dir / 'checkpoints' / f'step-{state.step}'} written; relaunch the same command to resume")
        else:
            log(f"stopped at step {state.step} (train.stop_at_step); relaunch with the same output_dir to resume")
    barrier()
    run.metrics.close()
    return result


def _write_rank_memory(run: Run, rss_before_setup: float | None) -> None:
    """One `memory` event after the training steps (before the final save/export): every rank's
    peak memory_stats(), plus its host RSS just before the model was built (what training added
    is the difference) and the parameter elements it holds (`params_held`: what TP/PP/ZeRO-3/FSDP
    left on it, beside `params.total` for the whole model). Gathered over all ranks, not only the
    data-parallel group. With frozen parameters (LoRA), `frozen_states_saved_mb`: the fp32 gradient
    and two AdamW moments (12 bytes a parameter) that full fine-tuning would keep for them, for one
    copy of the model (replicated backends keep it on every rank; sharded ones divide it between
    ranks)."""
    mine = {k: round(v, 1) for k, v in run.backend.memory_stats().items()}
    held = run.backend.held_parameters()
    if held is not None:
        mine["params_held"] = held
    if rss_before_setup is not None:
        mine["host_rss_before_setup_mb"] = round(rss_before_setup, 1)
    per_rank = [mine]
    if dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
    frozen = run.params.get("total", 0) - run.params.get("trainable", 0)
    saved = {"frozen_states_saved_mb": round(frozen * 12 / 2**20, 1)} if frozen else {}
    run.metrics.write("memory", run.state.step, per_rank=per_rank, params=run.params, **saved)


def _evaluate(run: Run) -> dict:
    if run.data.eval is None:
        return {}
    size = run.cfg.train.eval_batch_size or run.cfg.train.micro_batch_size
    results = evaluate_examples(run.backend, run.task, run.data.eval, size, run.collective)
    run.metrics.write("eval", run.state.step, **results)
    if run.backend.is_main:
        log(f"eval @ step {run.state.step}: " + format_metrics(results))
    return results


def evaluate_examples(backend: Backend, task: Task, examples, size: int, collective: Collective,
                      on_batch=None) -> dict:
    """The task's metrics over `examples`, each scored on exactly one data-parallel rank (no
    padding, no duplicates), reduced over ranks by the task. Used by the loop's eval and by
    `engine eval`; on_batch(logits, batch, indices) sees each real batch (per-example output)."""
    backend.train_mode(False)
    mine = list(range(backend.dp_rank, len(examples), backend.dp_size))
    state = task.eval_init()
    # every rank runs the same number of forwards (that of the rank with the most examples):
    # backends that shard parameters (ZeRO-3) gather them collectively inside the forward
    n_batches = math.ceil(math.ceil(len(examples) / backend.dp_size) / size)
    for start in range(0, n_batches * size, size):
        chunk = mine[start:start + size] or [0]  # a rank that has run out: a forward whose result is discarded
        batch = _to_device(task.collate([examples[i] for i in chunk]), backend.device)
        logits = backend.eval_forward({k: v for k, v in batch.items() if k != "labels"})
        if mine[start:start + size]:
            task.eval_update(state, logits, batch, chunk)
            if on_batch is not None:
                on_batch(logits, batch, chunk)
    return task.eval_finish(state, collective, backend.device)


def dp_collective(backend: Backend) -> Collective:
    """Reductions over the backend's data-parallel group, for tasks (the loop's eval, `engine eval`)."""
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


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
