"""Universal checkpoints: resume a checkpoint on another number of ranks, backend, ZeRO stage,
plugin or TP/PP layout.

Every checkpoint records the layout that wrote it (layout.json, `Backend.layout()`). A relaunch
whose backend has the same layout loads the native files (`Backend.load_state`, the fast path).
Any other is read here into a `backends.base.UniversalState` (full fp32 weights and AdamW moments
keyed by parameter name, AdamW's step) and the new backend puts that into its own layout
(`Backend.load_universal`); the LR schedule is set to the run's step. One log line says so.

Reading, by who wrote the checkpoint (no process of that layout is started):
- ddp: model.safetensors, and optimizer.pt (torch's AdamW state dict: indices run over the
  parameter groups of backends.optim.param_groups, whose names come from the model).
- colossal: the Booster's model/ and optimizer/ shards, which already hold full tensors (it
  gathers TP/PP/ZeRO shards when it saves) with the optimizer keyed by the same indices.
- deepspeed: weights through zero_to_fp32 (engine.export.read_state_dict, as `engine export`);
  moments through DeepSpeed's own universal-checkpoint converter (deepspeed.checkpoint.
  ds_to_universal), which rank 0 runs into a scratch folder next to the checkpoint. Stage 0 in
  fp32 keeps the client AdamW's torch state dict in its model-states file.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from backends.base import UniversalState
from engine.checkpoint import (DEEPSPEED_DIR, LAYOUT_FILE, STATE_FILE, RunState, barrier, checkpoint_layout,
                               set_rng_state)
from engine.errors import EngineError

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class ModelNames:
    """What a universal read needs to know of the model, taken from a meta-device build before any
    backend exists: names per AdamW group, tied aliases, full shapes."""
    groups: list[list[str]]
    aliases: dict[str, str]          # tied name -> the first name of its tensor
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelNames":
        from backends.optim import param_groups
        first: dict[int, str] = {}
        aliases, shapes = {}, {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
                shapes[name] = tuple(p.shape)
        groups = [[first[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
        return cls(groups, aliases, shapes)

    @property
    def order(self) -> list[str]:
        return [n for g in self.groups for n in g]


def saved_layout(directory: Path) -> dict | None:
    """The layout a checkpoint was written in; None for checkpoints from before layout.json."""
    path = Path(directory) / LAYOUT_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        raise EngineError(f"checkpoint {directory}: {LAYOUT_FILE} is unreadable") from None


def describe_layout(layout: dict) -> str:
    rest = ", ".join(f"{k} {v}" for k, v in layout.items() if k != "backend")
    return f"{layout.get('backend', '?')} ({rest})" if rest else str(layout.get("backend", "?"))


def load_checkpoint(backend, directory: Path, names: ModelNames | None) -> tuple[RunState, str | None]:
    """Resume: the backend's state (natively, or through the universal form when the checkpoint's
    layout is not this run's), the run state and this rank's RNG. Returns the run state and, when
    the layout changed, the one line that says so. All ranks call."""
    directory = Path(directory)
    saved, now = saved_layout(directory), backend.layout()
    if saved is None:  # written before layout.json: only which backend's files it holds is known
        saved = now if checkpoint_layout(directory) == now["backend"] else {"backend": checkpoint_layout(directory)}
    note = None
    if saved == now:
        backend.load_state(directory)
    else:
        if names is None:
            raise EngineError(f"checkpoint {directory} was written by {describe_layout(saved)}; resuming it as "
                              f"{describe_layout(now)} needs the model's parameter names")
        load_universal(backend, directory, names)
    state = RunState(**json.loads((directory / STATE_FILE).read_text()))
    if saved != now:
        backend.set_schedule_step(state.step)
        note = (f"layout changed: checkpoint {directory.name} was written by {describe_layout(saved)}, this run is "
                f"{describe_layout(now)}; resumed through the universal form (weights and AdamW moments by "
                f"parameter name)")
    rng_file = directory / f"rng-rank{backend.rank}.pt"
    if not rng_file.exists():
        rng_file = directory / "rng-rank0.pt"  # resumed on a different number of ranks
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state, note


def load_universal(backend, directory: Path, names: ModelNames) -> None:
    """Read `directory` into a UniversalState and hand it to the backend. All ranks call."""
    scratch = directory.parent / f".universal-{directory.name}"
    if backend.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    barrier()
    try:
        problem = None
        if checkpoint_layout(directory) == "deepspeed" and backend.is_main:
            try:
                _ds_to_universal(directory, scratch / "deepspeed")
            except EngineError as e:
                problem = str(e)
        problem = _from_rank0(problem)  # every rank stops with it, none waits for rank 0 forever
        if problem:
            raise EngineError(problem)
        state = read_universal(directory, names, scratch / "deepspeed")
        backend.load_universal(state, scratch / "backend")
        barrier()
    finally:
        if backend.is_main:
            shutil.rmtree(scratch, ignore_errors=True)


def _from_rank0(value):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_universal(directory: Path, names: ModelNames, ds_universal: Path | None = None) -> UniversalState:
    """A checkpoint of any layout as full tensors by name. `ds_universal`: where _ds_to_universal
    converted a DeepSpeed ZeRO checkpoint."""
    from engine.export import _FP32_GROUPS, read_state_dict
    directory = Path(directory)
    layout = checkpoint_layout(directory)
    raw, _ = read_state_dict(directory)
    if _FP32_GROUPS in raw:
        raise EngineError(f"checkpoint {directory}: DeepSpeed stage 0 under bf16/fp16 resumes only on its own "
                          f"layout (its optimizer state is not kept by parameter)")
    weights = {name: _lookup(raw, name, names).float() for name in names.order}
    if layout == "ddp":
        by_index = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
        moments, step = _by_index(by_index, names, directory)
    elif layout == "colossal":
        moments, step = _by_index(_read_colossal_optimizer(directory / "optimizer"), names, directory)
        from backends.base import backend_class
        backend_class("colossal").moments_from_checkpoint(moments, saved_layout(directory) or {})
    elif layout == "deepspeed":
        moments, step = _read_deepspeed_moments(directory, names, ds_universal)
    else:
        raise EngineError(f"checkpoint {directory} holds no state this engine wrote")
    for name, shape in names.shapes.items():
        if tuple(weights[name].shape) != shape:  # TP vocabulary padding the Booster kept, if any
            weights[name] = weights[name][tuple(slice(0, n) for n in shape)].contiguous()
        for key in MOMENTS:
            m = moments[name][key]
            moments[name][key] = (m if m.numel() == weights[name].numel() else
                                  m[tuple(slice(0, n) for n in shape)]).reshape(shape).float().contiguous()
    return UniversalState(names.groups, weights, moments, step, dict(names.aliases))


def _lookup(state: dict, name: str, names: ModelNames) -> torch.Tensor:
    if name in state:
        return state[name]
    for alias, target in names.aliases.items():  # a tied tensor saved under another of its names
        if target == name and alias in state:
            return state[alias]
    raise EngineError(f"the checkpoint has no parameter {name}")


def _by_index(state: dict, names: ModelNames, directory: Path) -> tuple[dict, int]:
    order = names.order
    if len(state) != len(order):
        raise EngineError(f"checkpoint {directory}: the optimizer state has {len(state)} parameters, "
                          f"the model {len(order)}")
    moments = {order[int(i)]: {k: s[k] for k in MOMENTS} for i, s in state.items()}
    return moments, _step(next(iter(state.values()))["step"])


def _step(value) -> int:
    return int(value.item() if torch.is_tensor(value) else value)


def _read_colossal_optimizer(folder: Path) -> dict:
    index = json.loads((folder / "pytorch_optim.bin.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(torch.load(folder / shard, map_location="cpu", weights_only=False))
    return state


def _ds_to_universal(directory: Path, out: Path) -> None:
    """DeepSpeed's converter (ZeRO 1-3): one folder per parameter name with fp32/exp_avg/exp_avg_sq."""
    if not list((directory / DEEPSPEED_DIR).glob("*optim_states.pt")):
        return  # stage 0: nothing to convert
    if os.environ.get("DS_ACCELERATOR") is None and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.checkpoint import ds_to_universal
    args = argparse.Namespace(input_folder=str(directory / DEEPSPEED_DIR), output_folder=str(out),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # prints progress and bars; errors still raise
    except Exception as e:  # noqa: BLE001 - its failures come as many kinds
        raise EngineError(f"DeepSpeed's universal-checkpoint conversion of {directory} failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _read_deepspeed_moments(directory: Path, names: ModelNames, converted: Path | None) -> tuple[dict, int]:
    zero = converted / "zero" if converted else None
    if zero is None or not zero.is_dir():  # stage 0 in fp32: the client AdamW's own state dict
        from engine.export import _ds_model_states
        optim = (_ds_model_states(directory / DEEPSPEED_DIR).get("optimizer") or {})
        if "state" not in optim:
            raise EngineError(f"checkpoint {directory}: DeepSpeed stage-0 optimizer state is not a torch "
                              f"state dict (16-bit stage 0 resumes only on its own layout)")
        return _by_index(optim["state"], names, directory)

    def load(name: str, key: str) -> torch.Tensor:
        for n in [name] + [a for a, t in names.aliases.items() if t == name]:
            if (zero / n / f"{key}.pt").is_file():
                value = torch.load(zero / n / f"{key}.pt", map_location="cpu", weights_only=False)
                return value["param"] if isinstance(value, dict) else value  # stage 3: a flat tensor
        raise EngineError(f"checkpoint {directory}: DeepSpeed's conversion has no {key} for {name}")

    moments = {name: {key: load(name, key) for key in MOMENTS} for name in names.order}
    step_file = next(zero.glob("*/step.pt"), None)
    if step_file is not None:
        step = _step(torch.load(step_file, weights_only=False))
    else:  # stage 3 keeps it in the common optimizer state
        common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
        step = _step(common["optimizer_state_dict"]["state"][0]["step"])
    return moments, step
