"""Universal checkpoints: resume a checkpoint on another number of ranks, backend, ZeRO stage,
plugin or TP/PP layout.

Every checkpoint records the layout that wrote it (layout.json, `Backend.layout()`). A relaunch
whose backend has the same layout loads the native files (`Backend.load_state`, the fast path).
Any other is read here into a `backends.base.UniversalState` (full fp32 weights and AdamW moments
keyed by parameter name, AdamW's step) and the new backend puts that into its own layout
(`Backend.load_universal`); the LR schedule is set to the run's step. One log line says so.

Reading (no process of the old layout is started) is the writing backend's: the weights through
`Backend.read_weights` (as `engine export` reads them), the AdamW moments through
`Backend.read_moments`, after its `convert_for_reading` on rank 0 (DeepSpeed runs its own
universal-checkpoint converter there).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from backends.base import MOMENTS, UniversalState, backend_class
from engine.checkpoint import STATE_FILE, RunState, barrier, saved_layout, set_rng_state
from engine.errors import EngineError


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


def describe_layout(layout: dict) -> str:
    rest = ", ".join(f"{k} {v}" for k, v in layout.items() if k != "backend")
    return f"{layout.get('backend', '?')} ({rest})" if rest else str(layout.get("backend", "?"))


def load_checkpoint(backend, directory: Path, names: ModelNames | None) -> tuple[RunState, str | None]:
    """Resume: the backend's state (natively, or through the universal form when the checkpoint's
    layout is not this run's), the run state and this rank's RNG. Returns the run state and, when
    the layout changed, the one line that says so. All ranks call."""
    directory = Path(directory)
    saved, now = saved_layout(directory), backend.layout()
    note = None
    if saved == now:
        backend.load_state(directory)
    else:
        if names is None:
            raise EngineError(f"checkpoint {directory} was written by {describe_layout(saved)}; resuming it as "
                              f"{describe_layout(now)} needs the model's parameter names")
        load_universal(backend, directory, names, saved)
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


def load_universal(backend, directory: Path, names: ModelNames, saved: dict) -> None:
    """Read `directory` (written in layout `saved`) into a UniversalState and hand it to the
    backend. All ranks call."""
    scratch = directory.parent / f".universal-{directory.name}"
    if backend.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    barrier()
    try:
        source = backend_class(saved["backend"])
        problem = None
        if backend.is_main:
            try:
                source.convert_for_reading(directory, scratch / "source")
            except EngineError as e:
                problem = str(e)
        problem = _from_rank0(problem)  # every rank stops with it, none waits for rank 0 forever
        if problem:
            raise EngineError(problem)
        state = read_universal(directory, names, saved, scratch / "source")
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


def read_universal(directory: Path, names: ModelNames, saved: dict, scratch: Path) -> UniversalState:
    """A checkpoint written in layout `saved` as full fp32 tensors by name. `scratch`: where the
    writing backend's convert_for_reading put anything it converted."""
    directory = Path(directory)
    source = backend_class(saved["backend"])
    raw, _ = source.read_weights(directory, saved, names.order, names.aliases)
    # every parameter's weights; moments of those the optimizer steps (a LoRA run's frozen base has none)
    weights = {name: _lookup(raw, name, names).float() for name in names.shapes}
    moments, step = source.read_moments(directory, names.order, names.aliases, saved, scratch)
    for name, shape in names.shapes.items():
        if tuple(weights[name].shape) != shape:  # TP vocabulary padding the Booster kept, if any
            weights[name] = weights[name][tuple(slice(0, n) for n in shape)].contiguous()
        if name not in moments:
            continue
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
