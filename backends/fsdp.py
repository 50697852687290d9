"""PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) behind the engine's Backend protocol.

What maps to what (docs/fsdp.md has the table):
- sharding: `fully_shard` on every repeated decoder block (the classes the model lists in
  `_no_split_modules`, or backend.fsdp.shard_modules), bottom-up, then on the root (embeddings, final
  norm, head). Parameters become DTensors sharded on dim 0 over all ranks.
- reshard_after_forward: True frees the gathered parameters after each block's forward and gathers
  them again in backward (ZeRO-3-like); False keeps them until backward (ZeRO-2-like).
- train.precision bf16/fp16: `MixedPrecisionPolicy(param_dtype=..., reduce_dtype=float32)`: 16-bit
  compute copies, fp32 gradient reduction, and the sharded fp32 parameters are the master weights
  the optimizer steps. fp16 adds torch.amp's GradScaler (DTensor all-reduces its inf check).
- backend.fsdp.offload: `CPUOffloadPolicy`: sharded parameters, gradients and the optimizer step in
  host memory.
- accumulation: `set_requires_gradient_sync(False)` while the loop's sync_grads is False, so only
  the last micro-batch of a step reduce-scatters.
- clipping: torch.nn.utils.clip_grad_norm_ over the DTensor gradients (the norm is reduced over
  ranks); the pre-clip norm goes into StepInfo.
- train.compile: each sharded block is compiled (`Module.compile()`) before `fully_shard`, as
  torchtitan does; the root stays eager.
- checkpoints: torch.distributed.checkpoint (DCP), each rank writing its own shards under step-N/fsdp/
  (`get_state_dict`/`set_state_dict` for model + optimizer), plus scheduler.pt (and scaler.pt in
  fp16). DCP files hold global shapes by parameter name, so they do not depend on the rank count,
  the resharding or offload: any FSDP run resumes them natively, and DCP reshards.

Importing this module must stay cheap: torch.distributed.fsdp / checkpoint are imported in methods.
"""
from __future__ import annotations

import errno
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from backends.base import (MOMENTS, Backend, EngineError, EstimateRow, ForwardOutput, SchedulerSpec, StepInfo,
                           TrainingSpec, UniversalState, compile_options, compiled, loss_and_logits, register_backend)
from backends.files import files_problem
from backends.optim import adamw, adamw_impl, build_scheduler
from backends.precision import DTYPES, AmpPrecision

CHECKPOINT_DIR = "fsdp"  # DCP's folder inside the engine's step-N directory


@dataclass
class FSDPOptions:
    reshard_after_forward: bool = True   # True: ZeRO-3-like (gather again in backward); False: ZeRO-2-like
    offload: bool = False                # CPUOffloadPolicy: sharded params, grads and optimizer step on the host
    async_save: bool = False             # torch.distributed.checkpoint.async_save (see save_state)
    shard_modules: list[str] = field(default_factory=list)  # class names sharded as units; [] = _no_split_modules

    def __post_init__(self) -> None:
        p = "backend.fsdp"
        for key in ("reshard_after_forward", "offload", "async_save"):
            if not isinstance(getattr(self, key), bool):
                raise EngineError(f"{p}.{key} must be true or false, got {getattr(self, key)!r}")
        if isinstance(self.shard_modules, str):  # one class name, or several separated by commas
            self.shard_modules = [s.strip() for s in self.shard_modules.split(",") if s.strip()]
        if not isinstance(self.shard_modules, list) or not all(
                isinstance(s, str) and s.isidentifier() for s in self.shard_modules):
            raise EngineError(f"{p}.shard_modules must be a list of module class names (e.g. [GPT2Block]), "
                              f"got {self.shard_modules!r}")


def shard_units(model: torch.nn.Module, names: list[str]) -> tuple[list[torch.nn.Module], list[str]]:
    """The submodules FSDP shards one by one (the model's repeated decoder blocks), in post-order
    (children before parents, as fully_shard must be applied), and the class names looked for:
    `names`, or the model's own `_no_split_modules` (transformers lists its decoder layer classes
    there: GPT2Block, LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    wanted = list(names or getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
    return list(reversed(units)), wanted


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameter names -> the first name of their tensor (GPT-2's lm_head.weight ->
    transformer.wte.weight): the state-dict helpers list both, as separate copies once gathered."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


@register_backend("fsdp", FSDPOptions)
class FSDPBackend(Backend):

    @classmethod
    def init_distributed(cls, timeout_s: float = 600) -> None:
        """fully_shard needs a process group even on one process: without torchrun's environment
        (`engine train` in one process) this process forms a group of one."""
        if dist.is_initialized():
            return
        if "WORLD_SIZE" in os.environ:
            return super().init_distributed(timeout_s)
        from datetime import timedelta

        from backends.host import free_port
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))

    @classmethod
    def preflight(cls, spec: TrainingSpec, options: FSDPOptions, world_size: int | None = None) -> None:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401 - public since torch 2.6
        except ImportError:
            raise EngineError(f"backend fsdp needs torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6); "
                              f"this torch is {torch.__version__}") from None

    def __init__(self, spec: TrainingSpec, options: FSDPOptions) -> None:
        super().__init__(spec, options)
        if not dist.is_initialized():
            raise EngineError("the fsdp backend needs a process group: start it with `engine launch` (torchrun)")
        self._sync = True
        self._save_group = None
        self.last_save: dict[str, float] = {}  # seconds of the last save_state's phases (benchmarks read it)

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, build_model, scheduler: SchedulerSpec) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        o = self.options
        module = build_model()
        self.aliases = tied_aliases(module)
        units, _ = shard_units(module, o.shard_modules)
        if o.shard_modules and not units:
            classes = sorted({type(m).__name__ for m in module.modules()})
            raise EngineError(f"backend.fsdp.shard_modules={o.shard_modules}: the model has no module of these "
                              f"classes (it has {', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})")
        self.unit_class = sorted({type(u).__name__ for u in units})
        self.n_units = len(units)
        param_dtype = DTYPES.get(self.spec.precision)
        kwargs = dict(
            mesh=init_device_mesh(self.device.type, (self.world_size,)),
            reshard_after_forward=o.reshard_after_forward,
            # 16-bit compute copies, fp32 gradient reduction; the fp32 shards stay the master weights
            mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype,
                                           reduce_dtype=torch.float32 if param_dtype else None),
            offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if o.offload else OffloadPolicy())
        for unit in units:
            if self.spec.compile:
                unit.compile(**compile_options(self.spec))  # in place (names unchanged), before its FSDP hooks
            fully_shard(unit, **kwargs)
        fully_shard(module, **kwargs)
        self.module = self.model = module
        # AdamW steps the sharded parameters where they live (host memory under offload)
        self.param_device = torch.device("cpu") if o.offload else self.device
        self.optimizer = adamw(module, self.spec.optimizer, self.param_device)
        self.scheduler = build_scheduler(self.optimizer, scheduler)
        # no autocast (the policy casts); fp16's GradScaler and the shared unscale/clip/step sequence
        self.precision = AmpPrecision(self.spec.precision, self.device)
        if o.async_save and self.device.type != "cpu":
            self._save_group = dist.new_group(backend="gloo")  # async_save needs a CPU process group

    # -- training ---------------------------------------------------------------------------
    def forward_backward(self, batch, sync_grads: bool, return_logits: bool = False) -> ForwardOutput:
        if sync_grads != self._sync:  # no reduce-scatter until the last micro-batch of the step
            self.module.set_requires_gradient_sync(sync_grads)
            self._sync = sync_grads
        loss, logits = loss_and_logits(self.model(**batch), return_logits)
        self.precision.scale(loss / self.spec.grad_accum).backward()
        return ForwardOutput(loss.detach().float(), logits)

    def step(self) -> StepInfo:
        return self.precision.optimizer_step(self.optimizer, self.scheduler, self.module.parameters(),
                                             self.spec.max_grad_norm)

    @torch.no_grad()
    def eval_forward(self, inputs) -> torch.Tensor:
        # the forward gathers parameters collectively: every rank calls it equally often (the loop
        # gives every data-parallel rank the same number of batches)
        return self.model(**inputs).logits

    # -- state ------------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        """DCP: every rank writes its own shards into step-N/fsdp/ (rank 0 also the metadata).

        async_save: DCP stages the state dict (a copy in host memory) and writes the files from a
        background thread. The engine renames .tmp-step-N to step-N (and drops checkpoints beyond
        keep_last) as soon as every rank's save_state has returned, so the write is waited for here:
        a checkpoint is never published half-written, and the loop is blocked for the whole save
        either way (docs/fsdp.md: the measurement, and the engine hook that would let it overlap)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        directory = Path(directory)
        started = time.perf_counter()
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        for alias in self.aliases:  # a tied tensor once, under its first name (as DDP's files keep it)
            model_state.pop(alias, None)
        state = {"model": model_state, "optim": optim_state}
        staged = None
        with _dcp_errors("save"):
            if self.options.async_save:
                future = dcp.async_save(state, checkpoint_id=str(directory / CHECKPOINT_DIR),
                                        process_group=self._save_group)
                staged = time.perf_counter()
                future.result()  # complete before the engine declares the checkpoint complete
            else:
                dcp.save(state, checkpoint_id=str(directory / CHECKPOINT_DIR))
        if self.is_main:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
            if self.precision.scaler:
                torch.save(self.precision.state_dict(), directory / "scaler.pt")
        done = time.perf_counter()
        self.last_save = {"seconds": done - started,
                          **({"staging_seconds": staged - started} if staged is not None else {})}

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        directory = Path(directory)
        # this run's own (sharded) state dict is the template DCP loads into, resharding as needed
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": {k: v for k, v in model_state.items() if k not in self.aliases}, "optim": optim_state}
        with _dcp_errors("load"):
            dcp.load(state, checkpoint_id=str(directory / CHECKPOINT_DIR))
        state["model"].update({alias: state["model"][name] for alias, name in self.aliases.items()})
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        load = lambda name: torch.load(directory / name, map_location="cpu", weights_only=True)  # noqa: E731
        self.scheduler.load_state_dict(load("scheduler.pt"))
        if self.precision.scaler and (directory / "scaler.pt").exists():
            self.precision.load_state_dict(load("scaler.pt"))

    def layout(self) -> dict:
        # DCP keeps global shapes by parameter name: the files depend on nothing else (not the rank
        # count, resharding, offload or precision: the fp32 shards are saved), so one layout
        return {"backend": "fsdp"}

    @torch.no_grad()
    def load_universal(self, state: UniversalState, scratch: Path) -> None:
        """Every rank holds the full state: torch's state-dict helpers with full_state_dict=True cut
        each rank's shards out of the full tensors (weights, then AdamW moments by parameter name)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True)
        weights = {**state.weights, **{alias: state.weights[name] for alias, name in state.aliases.items()}}
        set_model_state_dict(self.module, weights, options=full)
        groups = []
        for names, live in zip(state.groups, self.optimizer.param_groups):
            groups.append({**{k: v for k, v in live.items() if k != "params"}, "params": list(names)})
        moments = {name: {"step": torch.tensor(float(state.adam_step)), **state.moments[name]}
                   for names in state.groups for name in names}
        set_optimizer_state_dict(self.module, self.optimizer, {"state": moments, "param_groups": groups},
                                 options=full)

    @classmethod
    def read_moments(cls, directory, order, aliases, layout, scratch):
        """AdamW's state as get_optimizer_state_dict keys it (by parameter name; a tied tensor under
        one of its names), read from the DCP files into full tensors."""
        directory = Path(directory)
        stored = _metadata(directory / CHECKPOINT_DIR).state_dict_metadata
        keys = {}
        for name in order:
            found = next((n for n in [name] + [a for a, t in aliases.items() if t == name]
                          if f"optim.state.{n}.exp_avg" in stored), None)
            if found is None:
                raise EngineError(f"checkpoint {directory}: its DCP files have no optimizer state for {name}")
            keys[name] = found
        tensors = _read_dcp(directory, [f"optim.state.{keys[n]}.{k}" for n in order for k in (*MOMENTS, "step")])
        moments = {n: {k: tensors[f"optim.state.{keys[n]}.{k}"] for k in MOMENTS} for n in order}
        step = tensors[f"optim.state.{keys[order[0]]}.step"]
        return moments, int(step.item())

    # -- this backend's files, read offline (engine export/eval, the resume checks) -------------
    # step-N/fsdp/ is a DCP checkpoint: .metadata (names, global shapes, where each shard's bytes lie)
    # and one __R_0.distcp per rank; scheduler.pt (and scaler.pt in fp16) beside it.
    @classmethod
    def checkpoint_problem(cls, directory, layout):
        folder = Path(directory) / CHECKPOINT_DIR
        where = f"checkpoint {Path(directory).name}"
        if not (folder / ".metadata").is_file():
            return f"it has no DCP {CHECKPOINT_DIR}/.metadata"
        try:
            metadata = _metadata(folder)
        except EngineError as e:
            return str(e).removeprefix(where + ": ")
        ends: dict[str, int] = {}  # every shard file must hold the bytes the metadata points into
        for info in (metadata.storage_data or {}).values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(ends.items()):
            f = folder / name
            if not f.is_file():
                return f"its DCP shard {CHECKPOINT_DIR}/{name} is missing"
            if f.stat().st_size < end:
                return f"its DCP shard {CHECKPOINT_DIR}/{name} is truncated ({f.stat().st_size} of {end} bytes)"
        files = [Path(directory) / "scheduler.pt"] + [f for f in [Path(directory) / "scaler.pt"] if f.exists()]
        return files_problem(files, where)

    @classmethod
    def checkpoint_shapes(cls, directory, layout):
        metadata = _metadata(Path(directory) / CHECKPOINT_DIR)
        return {key.removeprefix("model."): tuple(m.size) for key, m in metadata.state_dict_metadata.items()
                if key.startswith("model.") and hasattr(m, "size")}

    @classmethod
    def read_weights(cls, directory, layout, order, aliases):
        metadata = _metadata(Path(directory) / CHECKPOINT_DIR)
        keys = [k for k, m in metadata.state_dict_metadata.items() if k.startswith("model.") and hasattr(m, "size")]
        tensors = _read_dcp(Path(directory), keys)
        return {k.removeprefix("model."): v for k, v in tensors.items()}, "DCP shards (fp32 sharded parameters)"

    def export_pretrained(self, directory: Path) -> None:
        """Consolidated HF folder: the full state dict gathered to rank 0 (in host memory), written
        with save_pretrained. The weights are the fp32 sharded parameters (the master weights)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for alias in self.aliases:  # gathered as separate copies, which save_pretrained would both keep
            state.pop(alias, None)
        if self.is_main:
            Path(directory).mkdir(parents=True, exist_ok=True)
            # transformers names the architecture without FSDP's class prefix (FSDPGPT2LMHeadModel)
            self.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        dist.barrier()

    # -- reporting --------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"sharding": f"fully_shard x {self.n_units} ({', '.join(self.unit_class) or 'no block class found'}) "
                            f"+ root",
                "reshard_after_forward": self.options.reshard_after_forward, "offload": self.options.offload,
                "precision": self.spec.precision,
                "optimizer": f"torch.optim.AdamW ({adamw_impl(self.spec.optimizer.impl, self.param_device)})",
                "async_save": self.options.async_save, "compiled": compiled(self.spec)}

    def close(self) -> None:
        if self._save_group is not None:
            dist.destroy_process_group(self._save_group)
            self._save_group = None

    # -- bench specs and memory-estimate rows (see Backend) ---------------------------------------
    # full / grad_op are FSDP1's FULL_SHARD / SHARD_GRAD_OP, what users know the two settings by
    bench_spec_help = "fsdp[:full|:grad_op][+offload]"
    bench_defaults = ("fsdp:full", "fsdp:grad_op")

    @classmethod
    def bench_options(cls, variant: str, modifiers: list[str]) -> dict:
        if variant not in ("", "full", "grad_op"):
            raise ValueError("use fsdp, fsdp:full (reshard after forward) or fsdp:grad_op (keep until backward)")
        options: dict = {"reshard_after_forward": variant != "grad_op"}
        for mod in modifiers:
            if mod != "offload":
                raise ValueError(f"unknown modifier +{mod} (fsdp takes +offload)")
            options["offload"] = True
        return options

    @classmethod
    def estimate_rows(cls):
        # the ZeRO formulas of engine/estimate.py: resharding is stage 3 (parameters sharded too),
        # keeping gathered parameters until backward is stage 2; offload moves the sharded states to
        # the host (with resharding the parameters too, without it the gathered copy stays on the device)
        return (EstimateRow("fsdp:full", 3), EstimateRow("fsdp:grad_op", 2),
                EstimateRow("fsdp:full+offload", 3, offload_optimizer=True, offload_params=True),
                EstimateRow("fsdp:grad_op+offload", 2, offload_optimizer=True))

    @classmethod
    def estimate_key(cls, options: dict) -> str | None:
        key = "fsdp:full" if options.get("reshard_after_forward", True) else "fsdp:grad_op"
        return key + ("+offload" if options.get("offload") else "")
    # -- end of bench specs and memory-estimate rows --------------------------------------------


# --------------------------------------------------------------------------------------------
# Reading a DCP checkpoint offline: one CPU process, no process group
# --------------------------------------------------------------------------------------------
def _metadata(folder: Path):
    """DCP's .metadata (names, global shapes and dtypes, where each shard's bytes lie), or one line."""
    from torch.distributed.checkpoint import FileSystemReader
    where = f"checkpoint {folder.parent.name}"
    if not (folder / ".metadata").is_file():
        raise EngineError(f"{where}: it has no DCP {CHECKPOINT_DIR}/.metadata (was it written by another backend?)")
    try:
        return FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises many kinds
        raise EngineError(f"{where}: DCP {CHECKPOINT_DIR}/.metadata is unreadable ({type(e).__name__})") from None


def _read_dcp(directory: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Full CPU tensors of these flattened DCP keys (e.g. "model.transformer.wte.weight"): empty
    tensors of the recorded global shapes, filled by DCP's own loader without a process group."""
    import torch.distributed.checkpoint as dcp
    folder = directory / CHECKPOINT_DIR
    metadata = _metadata(folder).state_dict_metadata
    missing = [k for k in keys if k not in metadata]
    if missing:
        raise EngineError(f"checkpoint {directory}: its DCP files have no {missing[0]}")
    state = {k: torch.empty(tuple(metadata[k].size), dtype=metadata[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():  # DCP warns that no process group means one process: meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            dcp.load(state, checkpoint_id=str(folder), no_dist=True)
        except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - truncated or damaged shard files
            raise EngineError(f"checkpoint {directory}: its DCP files could not be read "
                              f"({_first_failure(e)})") from None
    return state


def _first_failure(e: BaseException) -> str:
    """One line for an exception, or for the first rank's failure inside DCP's CheckpointException."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextmanager
def _dcp_errors(what: str):
    """DCP raises CheckpointException (a BaseException, past any `except Exception`) holding every
    rank's failure. A full disk becomes the OSError the engine's checkpoint code recognises (it
    removes the partial checkpoint and says so in one line); anything else a RuntimeError."""
    import torch.distributed.checkpoint as dcp
    try:
        yield
    except dcp.CheckpointException as e:
        for failure, _ in (e.failures or {}).values():
            if isinstance(failure, OSError) and failure.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(failure.errno, f"DCP checkpoint {what} failed: {failure.strerror}") from None
        raise RuntimeError(f"DCP checkpoint {what} failed ({_first_failure(e)})") from None
