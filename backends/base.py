"""The backend protocol: the few verbs the training loop uses, and the registry of backends.

The loop (engine/loop.py) never asks which backend it runs on. A backend owns how the model
is built (e.g. ZeRO-3 partitions it while it is constructed), wrapped, stepped, checkpointed
and exported. If a backend needs more from the loop, grow this protocol; never add a
backend check to the loop.

Backends sit below the engine: they import nothing from engine/ and receive only what they need
(a TrainingSpec, their own options dataclass, a model factory, the schedule), never the whole
run config.

Backend modules must stay cheap to import (import deepspeed / colossalai inside methods),
because the registry imports them all to validate config sections.
"""
from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from backends.errors import EngineError
from backends.host import peak_memory_mb


@dataclass(frozen=True)
class OptimizerSpec:
    """What the user asked for; each backend builds the AdamW that fits it."""
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    impl: str = "auto"      # torch AdamW: auto | fused | foreach | for_loop (backends.optim)


@dataclass(frozen=True)
class SchedulerSpec:
    name: str               # transformers SchedulerType name
    warmup_steps: int
    total_steps: int


@dataclass(frozen=True)
class TrainingSpec:
    """All a backend is told about the run (built from the run config by the engine)."""
    task: str               # causal_lm | classification
    precision: str          # fp32 | bf16 | fp16
    micro_batch_size: int   # per data-parallel rank
    grad_accum: int
    max_grad_norm: float    # 0 = no clipping
    optimizer: OptimizerSpec
    scheduler_name: str     # transformers SchedulerType name (steps come with setup())
    compile: bool = False   # torch.compile the model where the backend allows it
    compile_backend: str | None = None  # torch.compile(backend=...); None: torch's default (inductor)
    compile_mode: str | None = None     # torch.compile(mode=...); None: torch's default
    lora: bool = False      # the model is a PEFT LoRA model: only its adapters train
    quantized_base: bool = False  # QLoRA: the frozen base is 4-bit bitsandbytes layers


def compile_options(spec: TrainingSpec) -> dict:
    """torch.compile's keyword arguments for the run: only what the config set."""
    return {k: v for k, v in (("backend", spec.compile_backend), ("mode", spec.compile_mode)) if v is not None}


def compiled(spec: TrainingSpec) -> bool | str:
    """What describe() says: False, True (torch's default backend) or the backend the config named."""
    return (spec.compile_backend or True) if spec.compile else False


@dataclass
class StepInfo:
    # grad_norm and skipped may be device tensors: the loop reads them only on log steps, so a
    # step does not wait for the device
    grad_norm: torch.Tensor | float | None  # before clipping; None when the backend cannot tell
    skipped: torch.Tensor | bool = False    # fp16 overflow: the optimizer step was skipped
    lr: float = 0.0


@dataclass
class ForwardOutput:
    """What forward_backward gives back: device tensors, detached, never read on the host here."""
    loss: torch.Tensor                   # unscaled loss of the micro-batch (not divided by grad_accum)
    logits: torch.Tensor | None = None   # only when asked for (return_logits) and this backend can


def loss_and_logits(model_output, return_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss (attached, for backward) and the logits only when asked for. Callers pass the model's
    output straight in, so it is gone before backward: kept, its 16-bit logits (b*s*V) live through
    the whole backward, 1.5 GiB more peak memory for GPT-2 at 16 x 1024 (measured on the H200)."""
    return model_output.loss, (model_output.logits.detach() if return_logits else None)


@dataclass
class BackendSpec:
    name: str
    module: str             # import path of the module holding the class
    class_name: str
    options_cls: type       # dataclass of this backend's own config section


class Backend(ABC):
    """One instance per rank. Lifetime: __init__ -> setup -> (train/eval verbs)* -> close."""

    @classmethod
    def init_distributed(cls, timeout_s: float = 600) -> None:
        """Join the process group torchrun/Ray described in the environment (RANK, WORLD_SIZE,
        MASTER_ADDR, ...). Backends whose library must own this (e.g. colossalai.launch) override."""
        if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
            return
        from datetime import timedelta
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=timeout_s))

    @classmethod
    def preflight(cls, spec: TrainingSpec, options, world_size: int | None = None) -> list[str] | None:
        """Cheap checks before any process starts (library installed, options fit this machine and
        `world_size`, the number of processes the launcher will start; None when not known), raising
        EngineError with a one-line reason. May return notes for the launcher's log. Called by
        `engine launch`; default: none."""

    @classmethod
    def check_model_config(cls, model_config, spec: TrainingSpec, options, world_size: int | None = None) -> None:
        """Checks that need the model's architecture (its transformers config: heads, layers,
        vocabulary, model_type), before any process starts: one-line EngineError saying what would
        work. Called by `engine launch` after the data and model config are read; default: none."""

    def __init__(self, spec: TrainingSpec, options) -> None:
        self.spec = spec
        self.options = options    # this backend's options dataclass
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = (torch.device("cuda", self.local_rank) if torch.cuda.is_available()
                       else torch.device("cpu"))

    # -- data parallel layout: the loop shards data by these, not by global rank -------------
    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def dp_group(self):
        """Process group over which data-parallel ranks hold different data (None = world)."""
        return None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up ---------------------------------------------------------------------------
    @abstractmethod
    def setup(self, build_model: Callable[[], torch.nn.Module], scheduler: SchedulerSpec) -> None:
        """Build the model (inside any partitioning context), wrap it, create the optimizer
        (self.spec.optimizer) and the scheduler."""

    # -- training ---------------------------------------------------------------------------
    @abstractmethod
    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool,
                         return_logits: bool = False) -> ForwardOutput:
        """Forward on one micro-batch (with `labels`), backward of loss / grad_accum.

        `sync_grads` is False for all but the last micro-batch of an accumulation window so
        backends can skip the gradient all-reduce. Returns the detached, unscaled loss as a device
        tensor (no host sync) and, when `return_logits` and the backend can, the detached logits
        of this micro-batch on this rank (for training metrics such as accuracy; callers ask only
        for small heads: a causal LM's logits are batch x sequence x vocabulary). A backend that
        cannot (logits on another rank, e.g. the last pipeline stage) returns logits=None."""

    @abstractmethod
    def step(self) -> StepInfo:
        """Clip (train.max_grad_norm, 0 = off), optimizer and scheduler step, zero grads."""

    @abstractmethod
    def eval_forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """No-grad forward in eval mode on model inputs (no `labels`); returns full logits on
        every rank of this dp group."""

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    # -- state ------------------------------------------------------------------------------
    @abstractmethod
    def save_state(self, directory: Path) -> None:
        """Write model+optimizer+scheduler state (backend-native, possibly sharded). All ranks call."""

    @abstractmethod
    def load_state(self, directory: Path) -> None:
        """Restore what save_state wrote. All ranks call."""

    # -- the layout a checkpoint is written in, and resuming one of another layout ------------
    def layout(self) -> dict[str, Any]:
        """What this backend's native checkpoint files depend on (saved as layout.json in every
        checkpoint): a checkpoint whose layout equals the resuming run's is loaded natively
        (load_state); any other goes through load_universal. Include the backend's name."""
        raise NotImplementedError

    def load_universal(self, state: UniversalState, scratch: Path) -> None:
        """Put a layout-free state (weights, AdamW moments and step) into this backend's own
        layout. All ranks call, each with the full state. `scratch` is an empty folder on the run's
        (shared) filesystem for files the backend's own loader wants; the caller removes it."""
        raise EngineError(f"{type(self).__name__} cannot resume a checkpoint written by another layout")

    @classmethod
    def convert_for_reading(cls, directory: Path, scratch: Path) -> None:
        """Run once (rank 0) before read_moments: any offline conversion this backend's checkpoint
        files need, into `scratch` (shared by every rank). Default: none."""

    @classmethod
    def read_moments(cls, directory: Path, order: list[str], aliases: dict[str, str], layout: dict,
                     scratch: Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
        """Full AdamW moments by parameter name ({name: {"exp_avg", "exp_avg_sq"}}) and AdamW's step,
        read offline from a checkpoint this backend wrote in `layout`. `order`: the parameter names
        in optimizer-index order (backends.optim.param_groups over the model); `aliases`: tied
        name -> the name in `order`. Shapes may be flat: the caller reshapes."""
        raise EngineError(f"{cls.__name__} checkpoints cannot be resumed in another layout")

    # -- reading a checkpoint this backend wrote, offline: one CPU process, no process group -----
    # The engine asks these through layout.json's backend name (engine/checkpoint.py
    # checkpoint_reader) for the resume checks, `engine export`, `engine eval` and universal moves;
    # it never reads a backend's files itself.
    @classmethod
    def checkpoint_problem(cls, directory: Path, layout: dict) -> str | None:
        """Why the files this backend wrote into a complete-looking checkpoint cannot be resumed
        from (missing, truncated, not a whole torch zip), as a phrase; None when they look whole.
        Headers and zip directories only, the same answer on every rank. Default: nothing checked."""
        return None

    @classmethod
    def checkpoint_shapes(cls, directory: Path, layout: dict) -> dict[str, tuple[int, ...]] | None:
        """Parameter name -> full shape as the checkpoint recorded it, without reading tensor data
        where the format allows (the resume check that a checkpoint belongs to the model); None when
        nothing is recorded. Default: None (the check is skipped)."""
        return None

    @classmethod
    def read_weights(cls, directory: Path, layout: dict, order: list[str],
                     aliases: dict[str, str]) -> tuple[dict[str, torch.Tensor], str]:
        """The full, consolidated weights of a checkpoint this backend wrote (fp32 masters where the
        files keep them) by parameter name, and a few words on where they came from. `order` and
        `aliases` as for read_moments. Tensors may keep padding (a TP vocabulary): the caller trims."""
        raise EngineError(f"{cls.__name__} cannot read its checkpoints offline")

    def set_schedule_step(self, step: int) -> float | None:
        """After load_universal: the LR schedule stands at optimizer step `step`."""
        sched = getattr(self, "scheduler", None)
        if sched is None:
            return None
        sched.last_epoch = step
        return self.realign_schedule()

    def realign_schedule(self) -> float | None:
        """After load_state into a scheduler built for a different total (`engine launch --continue`),
        set the optimizer's lr to the value the new schedule has at the restored step (load_state
        keeps the lr the old schedule left, e.g. 0 at the end of a linear decay). Returns that lr,
        or None for a scheduler that is not a LambdaLR (all of the engine's are: backends.optim)."""
        sched = getattr(self, "scheduler", None)
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is None:
            return None
        groups = sched.optimizer.param_groups
        for group, base_lr, fn in zip(groups, sched.base_lrs, lambdas):
            group["lr"] = base_lr * fn(sched.last_epoch)  # what LambdaLR.get_lr computes at a step
        sched._last_lr = [group["lr"] for group in groups]
        return sched._last_lr[0]

    @abstractmethod
    def export_pretrained(self, directory: Path) -> None:
        """Consolidated HF model folder (safetensors) written by rank 0. All ranks call."""

    # -- reporting --------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A few facts for the log (optimizer chosen, stage, ...)."""
        return {}

    def memory_stats(self) -> dict[str, float]:
        """Peak memory in MiB: accelerator allocated/reserved when present, host RSS always."""
        return peak_memory_mb(self.device)

    def held_parameters(self) -> int | None:
        """How many parameter elements this rank holds once the backend has placed the model: its
        tensor-parallel shards and pipeline stage, its ZeRO-3 or FSDP partition (tied weights once,
        vocabulary padding included); None when the backend keeps no `module`."""
        module = getattr(self, "module", None)
        if module is None:
            return None

        def held(p):
            if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: the partition this rank owns
                return p.ds_tensor.numel()
            if hasattr(p, "to_local"):  # FSDP2's DTensor: the local shard
                return p.to_local().numel()
            return p.numel()
        return sum(held(p) for p in module.parameters())

    def close(self) -> None:
        pass

    # -- bench specs and memory-estimate rows (read by `engine bench` and `engine estimate`) ------
    # A backend describes itself here so that the bench and the estimator never name a backend.
    bench_spec_help: str = ""   # the bench spec forms, for error messages, e.g. "NAME:zeroN[+offload]"
    # QLoRA's 4-bit base (bitsandbytes Params4bit: packed uint8 data + quantization state) trains here;
    # sharding backends flatten or partition parameters, which such tensors do not survive
    quantized_base: bool = False
    bench_defaults: tuple[str, ...] = ()  # the specs `engine bench` runs when --backends is not given

    @classmethod
    def estimate_rows(cls) -> tuple[EstimateRow, ...]:
        """The rows this backend adds to `engine estimate`, in table order. Default: none."""
        return ()

    @classmethod
    def bench_options(cls, variant: str, modifiers: list[str]) -> dict:
        """This backend's options (backend.<name>.*) for the bench spec NAME[:VARIANT][+MODIFIER...]
        (`variant` is "" when absent). Raise ValueError naming what is accepted for an unknown
        variant or modifier. Default: neither is accepted."""
        if variant or modifiers:
            raise ValueError("this backend takes no :variant or +modifier")
        return {}

    @classmethod
    def estimate_key(cls, options: dict) -> str | None:
        """The key of the `estimate_rows` row that models a run with `options` (as bench_options
        returns them), or None when no row does."""
        return None
    # -- end of bench specs and memory-estimate rows --------------------------------------------


@dataclass
class UniversalState:
    """A training state in no backend's layout (a checkpoint read by engine/universal.py, resumed by
    a backend of another layout): full, unpartitioned fp32 tensors keyed by parameter name. Names
    are the model's `named_parameters()` (a tied tensor once, under its first name)."""
    groups: list[list[str]]                     # parameter names per AdamW group (backends.optim.param_groups order)
    weights: dict[str, torch.Tensor]            # fp32 (master) weights
    moments: dict[str, dict[str, torch.Tensor]]  # name -> {"exp_avg": ..., "exp_avg_sq": ...}
    adam_step: int                              # AdamW's own step count (bias correction)
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the name its tensor is under

    def load_weights(self, module: torch.nn.Module) -> None:
        """Into a whole (unpartitioned) module; a tied alias is filled through its first name."""
        missing, unexpected = module.load_state_dict(self.weights, strict=False)
        params = dict(module.named_parameters(remove_duplicate=False))
        loaded = {id(params[n]) for n in self.weights if n in params}
        missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]
        if missing or unexpected:
            raise EngineError(f"the universal state does not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")

    def optimizer_state_dict(self, param_groups: list[dict]) -> dict:
        """As torch's Optimizer.state_dict() of an AdamW over these groups (indices run over the
        groups in order), with the hyperparameters of `param_groups` (the live optimizer's)."""
        state, index, groups = {}, 0, []
        for names, live in zip(self.groups, param_groups):
            ids = list(range(index, index + len(names)))
            for i, name in zip(ids, names):
                state[i] = {"step": torch.tensor(float(self.adam_step)), **self.moments[name]}
            groups.append({**{k: v for k, v in live.items() if k != "params"}, "params": ids})
            index += len(names)
        return {"state": state, "param_groups": groups}


MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides its step


def moments_by_index(state: dict, order: list[str], where: Path) -> tuple[dict, int]:
    """A torch-style optimizer state ({index: {"step", "exp_avg", "exp_avg_sq"}}, indices over the
    param groups in order) as moments by name, and the step."""
    if len(state) != len(order):
        raise EngineError(f"checkpoint {where}: the optimizer state has {len(state)} parameters, "
                          f"the model {len(order)}")
    moments = {order[int(i)]: {k: s[k] for k in MOMENTS} for i, s in state.items()}
    step = next(iter(state.values()))["step"]
    return moments, int(step.item() if torch.is_tensor(step) else step)


@dataclass(frozen=True)
class EstimateRow:
    """One row of `engine estimate`: how a backend configuration holds its model states on each
    rank, as data the estimator (engine/estimate.py) computes from without knowing backends."""
    key: str                           # the row's name, e.g. "deepspeed:zero3+offload"
    zero_stage: int | None             # 0-3: ZeRO partitioning; None: replicated (fp32 weights, grads, AdamW)
    offload_optimizer: bool = False    # gradients and optimizer states in host memory
    offload_params: bool = False       # the parameters too (ZeRO-3)
    deepspeed_estimator: bool = False  # DeepSpeed's own estimator functions are the source (16-bit ZeRO-2/3)
    grad_bucket: bool = False          # replicated: a gradient bucket copy for the all-reduce when N > 1
    grad_bucket_one_rank: bool = False  # ... on one rank too (the wrapper is there whatever N)
    reduce_bucket: int = 0             # elements of a gradient reduce buffer allocated whole, in the
                                       # weights' width (DeepSpeed ZeRO 1-3: reduce_bucket_size)
    autocast_copy: bool = False        # replicated: autocast's 16-bit weight copies in bf16/fp16
    quantized_base: bool = False       # QLoRA rows: the backend keeps bitsandbytes' 4-bit base layers
    listed: bool = True                # shown by `engine estimate`; False: only for bench runs mapped to it


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
_SPECS: dict[str, BackendSpec] = {}
_BUILTIN_MODULES = ("backends.ddp", "backends.deepspeed_zero", "backends.colossal", "backends.fsdp")


def register_backend(name: str, options_cls: type):
    """Class decorator: `@register_backend("ddp", DDPOptions)`."""
    def wrap(cls):
        _SPECS[name] = BackendSpec(name, cls.__module__, cls.__name__, options_cls)
        return cls
    return wrap


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a backend module that exists but fails to import is a bug
                raise


def _builtin_rank(spec: BackendSpec) -> int:
    top = spec.module.split(".")[:2]
    names = [m.split(".") for m in _BUILTIN_MODULES]
    return names.index(top) if top in names else len(names)


def backend_names() -> tuple[str, ...]:
    """Built-in backends in `_BUILTIN_MODULES` order, then others as registered: a fixed order
    whichever module a caller happened to import first (tables and reports list in this order)."""
    _load_builtin()
    return tuple(sorted(_SPECS, key=lambda name: _builtin_rank(_SPECS[name])))


def backend_spec(name: str) -> BackendSpec:
    _load_builtin()
    if name not in _SPECS:
        raise EngineError(f"unknown backend {name!r}; available: {', '.join(backend_names())}")
    return _SPECS[name]


def backend_class(name: str) -> type[Backend]:
    spec = backend_spec(name)
    return getattr(importlib.import_module(spec.module), spec.class_name)
