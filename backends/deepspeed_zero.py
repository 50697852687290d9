"""DeepSpeed ZeRO (stages 0-3, CPU/NVMe offload) behind the engine's Backend protocol.

Semantics match the DDP backend (engine/loop.py drives both the same way):
- gradient accumulation: DeepSpeed's `gradient_accumulation_steps` = train.grad_accum (it divides
  each micro-batch loss by it, as DDP does); the loop's `sync_grads` is passed on through
  `engine.set_gradient_accumulation_boundary`, so `engine.step()` runs once per optimizer step.
- clipping: `gradient_clipping` is always written = train.max_grad_norm (0 = off). DeepSpeed's own
  default is 1.0 and clips silently, so it is never left to the default.
- optimizer: torch AdamW with the shared parameter groups (backends.optim.adamw: fused on CUDA by
  default) without offload; DeepSpeedCPUAdam with the same groups and hyper-parameters when the
  optimizer is offloaded.
- scheduler: the transformers scheduler from backends.optim, stepped here after every optimizer step
  (also after an fp16-overflow skip, like DDP's GradScaler path); saved in the checkpoint's
  client_state.

Importing this module must stay cheap: deepspeed is imported inside methods only.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.base import (MOMENTS, Backend, EngineError, EstimateRow, ForwardOutput, SchedulerSpec, StepInfo,
                           TrainingSpec, UniversalState, compile_options, compiled, loss_and_logits, moments_by_index,
                           register_backend)
from backends.files import files_problem, load_torch_file
from backends.host import stale_build_locks
from backends.optim import adamw, adamw_impl, build_scheduler, param_groups

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
CHECKPOINT_TAG = "deepspeed"  # DeepSpeed's sub-folder inside the engine's step-N directory
REDUCE_BUCKET_DEFAULT = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)


@dataclass
class DeepSpeedOptions:
    zero_stage: int | None = None         # 0-3; None = the config_file's stage, else 2
    offload_optimizer: str | None = None  # none | cpu | nvme; None = the config_file's, else none
    offload_params: str | None = None     # none | cpu | nvme (ZeRO-3 only)
    nvme_path: str | None = None          # folder for nvme offload (needs DeepSpeed's async_io op)
    config_file: str | None = None        # the user's DeepSpeed JSON; "auto" values are filled in
    reduce_bucket_size: int | None = None  # elements; None = DeepSpeed's default (or "auto": hidden^2)
    log_level: str = "warning"            # DeepSpeed's own logger (info shows its per-step chatter)

    def __post_init__(self) -> None:
        p = "backend.deepspeed"
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise EngineError(f"{p}.zero_stage must be 0-3, got {self.zero_stage}")
        for key in ("offload_optimizer", "offload_params"):
            value = getattr(self, key)
            if value is not None and value not in OFFLOAD_DEVICES:
                raise EngineError(f"{p}.{key} must be one of {', '.join(OFFLOAD_DEVICES)}; got {value!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise EngineError(f"{p}.log_level must be debug, info, warning or error; got {self.log_level!r}")
        # the user's JSON, read and its legacy keys mapped once: (json, notes, legacy origins)
        self._user: tuple[dict, list[str], dict[str, str]] = ({}, [], {})
        if self.config_file is not None:
            path = Path(self.config_file).expanduser()
            if not path.is_file():
                raise EngineError(f"{p}.config_file not found: {path}")
            try:
                user = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise EngineError(f"{p}.config_file {path} is not valid JSON: {e}") from None
            if not isinstance(user, dict):
                raise EngineError(f"{p}.config_file {path} must hold a JSON object")
            self._user = _map_legacy_offload(user)
        # cross-checks that need the file's values too are done in resolved_zero()
        self.resolved_zero()

    # -- what the options and the user's JSON say together ---------------------------------
    def user_config(self) -> dict:
        """The user's JSON with DeepSpeed's legacy offload keys read as today's sections (see
        _map_legacy_offload); {} without a config_file. Shared: copy before changing it."""
        return self._user[0]

    def legacy_notes(self) -> list[str]:
        """One line per legacy key of the config_file that was mapped (for the launcher's log)."""
        return self._user[1]

    def resolved_zero(self) -> tuple[int, str, str]:
        """(stage, offload_optimizer, offload_params), options first, then the JSON, then defaults;
        an option that contradicts an explicit JSON value is an error, never a silent pick."""
        p = "backend.deepspeed"
        user, _, legacy = self._user
        zero = user.get("zero_optimization", {}) or {}
        src = f"{p}.config_file"

        def pick(option, option_name, json_value, json_name, default):
            if json_value == "auto" or json_value is None:
                return default if option is None else option
            if option is not None and option != json_value:
                said = legacy.get(json_name) or f"{json_name}={json_value!r}"
                raise EngineError(f"{p}.{option_name}={option} conflicts with {said} "
                                  f"in {src}; remove one or make them equal")
            return json_value

        stage = pick(self.zero_stage, "zero_stage", zero.get("stage"), "zero_optimization.stage", 2)
        if stage not in (0, 1, 2, 3):
            raise EngineError(f"zero_optimization.stage in {src} must be 0-3, got {stage!r}")
        opt_dev = pick(self.offload_optimizer, "offload_optimizer",
                       (zero.get("offload_optimizer") or {}).get("device"),
                       "zero_optimization.offload_optimizer.device", "none")
        par_dev = pick(self.offload_params, "offload_params", (zero.get("offload_param") or {}).get("device"),
                       "zero_optimization.offload_param.device", "none")
        for name, dev in (("offload_optimizer", opt_dev), ("offload_params", par_dev)):
            if dev not in OFFLOAD_DEVICES:
                raise EngineError(f"{p}.{name} must be one of {', '.join(OFFLOAD_DEVICES)}; got {dev!r}")
        if opt_dev != "none" and stage == 0:
            raise EngineError(f"{p}.offload_optimizer={opt_dev} needs zero_stage 1, 2 or 3 (got 0)")
        if par_dev != "none" and stage != 3:
            raise EngineError(f"{p}.offload_params={par_dev} needs zero_stage=3 (got {stage})")
        if "nvme" in (opt_dev, par_dev) and not self.nvme_path:
            raise EngineError(f"{p}.nvme_path is required with nvme offload (a folder on a fast local disk)")
        return stage, opt_dev, par_dev


# DeepSpeed's deprecated zero_optimization keys -> (today's section, what `true` means). DeepSpeed
# itself still maps them, but it asserts when a key and its replacement are both present, and the
# engine must know about the offload before it picks the optimizer (DeepSpeedCPUAdam).
_LEGACY_OFFLOAD = {"cpu_offload": "offload_optimizer", "cpu_offload_param": "offload_param"}


def _map_legacy_offload(user: dict) -> tuple[dict, list[str], dict[str, str]]:
    """The user's JSON with zero_optimization.cpu_offload / cpu_offload_param / cpu_offload_use_pin_memory
    rewritten as offload_optimizer / offload_param sections (the legacy keys removed), one log note per
    mapped key, and {new dotted key: "legacy_key=value"} for error messages. A legacy key that
    contradicts its replacement in the same file is an EngineError."""
    zero = user.get("zero_optimization")
    if not isinstance(zero, dict) or not any(k in zero for k in (*_LEGACY_OFFLOAD, "cpu_offload_use_pin_memory")):
        return user, [], {}
    user = copy.deepcopy(user)
    zero = user["zero_optimization"]
    src = "backend.deepspeed.config_file"
    notes, origin = [], {}
    for old, new in _LEGACY_OFFLOAD.items():
        if old not in zero:
            continue
        value = zero.pop(old)
        if not isinstance(value, bool):
            raise EngineError(f"zero_optimization.{old} in {src} must be true or false, got {value!r}")
        device = "cpu" if value else "none"
        section = zero.get(new)
        section = dict(section) if isinstance(section, dict) else {}
        present = section.get("device", "auto")
        if present not in ("auto", None) and present != device:
            raise EngineError(f"zero_optimization.{old}={str(value).lower()} in {src} conflicts with "
                              f"zero_optimization.{new}.device={present!r}; keep one of them")
        section["device"] = device
        zero[new] = section
        origin[f"zero_optimization.{new}.device"] = f"zero_optimization.{old}={str(value).lower()}"
        notes.append(f"{src}: legacy zero_optimization.{old}={str(value).lower()} read as "
                     f"zero_optimization.{new}.device={device} (the legacy key is not passed to DeepSpeed)")
    if "cpu_offload_use_pin_memory" in zero:
        pin = zero.pop("cpu_offload_use_pin_memory")
        if not isinstance(pin, bool):
            raise EngineError(f"zero_optimization.cpu_offload_use_pin_memory in {src} must be true or false, "
                              f"got {pin!r}")
        targets = [new for new in _LEGACY_OFFLOAD.values()
                   if isinstance(zero.get(new), dict) and zero[new].get("device", "none") != "none"]
        for new in targets:
            zero[new].setdefault("pin_memory", pin)
        notes.append(f"{src}: legacy zero_optimization.cpu_offload_use_pin_memory={str(pin).lower()} read as "
                     + (" and ".join(f"zero_optimization.{t}.pin_memory" for t in targets) or "nothing (no offload)")
                     + " (the legacy key is not passed to DeepSpeed)")
    return user, notes, origin


# --------------------------------------------------------------------------------------------
# The DeepSpeed config: built from the engine config, merged with the user's JSON
# --------------------------------------------------------------------------------------------
_SCHEDULER_TYPES = {  # DeepSpeed scheduler type -> engine train.scheduler values it means
    "WarmupDecayLR": ("linear",), "WarmupCosineLR": ("cosine",), "WarmupLR": ("constant_with_warmup", "constant"),
}
_FILL_FROM_HIDDEN = {  # HF-integration style "auto" values that depend on the model width
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def build_ds_config(spec: TrainingSpec, options: DeepSpeedOptions, world_size: int | None,
                    hidden_size: int | None, scheduler: SchedulerSpec | None = None) -> dict:
    """The DeepSpeed config dict the engine runs with. The engine's values win where the user's JSON
    says "auto" or nothing; an explicit, different value in the JSON is an EngineError naming both.
    hidden_size and scheduler are None in preflight (not known before the model and data are);
    world_size is the launcher's process count there (None when not known: train_batch_size unchecked)."""
    t, optimizer = spec, spec.optimizer
    stage, opt_dev, par_dev = options.resolved_zero()
    user = copy.deepcopy(options.user_config())
    src = "backend.deepspeed.config_file"

    def settle(node: dict, key: str, ours, ours_name: str, dotted: str, same=lambda a, b: a == b):
        value = node.get(key, "auto")
        if value == "auto":
            node[key] = ours
        elif not same(value, ours):
            raise EngineError(f"{dotted}={value!r} in {src} conflicts with {ours_name}={ours!r}; "
                              f"set it to \"auto\" or make them equal")

    close = lambda a, b: isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a - b) <= 1e-12 * max(1, abs(b))
    ds = user
    settle(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size",
           "train_micro_batch_size_per_gpu")
    settle(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", "gradient_accumulation_steps")
    if world_size is not None:  # the launcher's process count in preflight, the process group's in setup
        settle(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
               f"train.micro_batch_size x train.grad_accum x ranks ({t.micro_batch_size} x {t.grad_accum} x "
               f"{world_size})",
               "train_batch_size")
    elif ds.get("train_batch_size") == "auto":  # no process count given (preflight outside `engine launch`)
        ds.pop("train_batch_size")
    settle(ds, "gradient_clipping", float(t.max_grad_norm), "train.max_grad_norm", "gradient_clipping", close)

    # precision: train.precision decides; the JSON may only agree
    for kind in ("bf16", "fp16"):
        section = ds.setdefault(kind, {})
        if not isinstance(section, dict):
            raise EngineError(f"{kind} in {src} must be an object")
        settle(section, "enabled", t.precision == kind, "(train.precision == " + kind + ")", f"{kind}.enabled")
    if t.precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
        ds["fp16"].setdefault("initial_scale_power", 16)
    if not ds["fp16"]["enabled"] and list(ds["fp16"]) == ["enabled"]:
        ds.pop("fp16")
    if not ds["bf16"]["enabled"] and list(ds["bf16"]) == ["enabled"]:
        ds.pop("bf16")

    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = stage
    for key, dev in (("offload_optimizer", opt_dev), ("offload_param", par_dev)):
        section = zero.get(key) or {}
        if dev == "none":
            zero.pop(key, None)
            continue
        section["device"] = dev
        section.setdefault("pin_memory", torch.cuda.is_available())
        if dev == "nvme":
            section["nvme_path"] = options.nvme_path
        zero[key] = section
    if options.reduce_bucket_size is not None:
        settle(zero, "reduce_bucket_size", options.reduce_bucket_size, "backend.deepspeed.reduce_bucket_size",
               "zero_optimization.reduce_bucket_size")
    for key, fill in _FILL_FROM_HIDDEN.items():
        if zero.get(key) == "auto":
            if hidden_size:
                zero[key] = fill(hidden_size)
            else:
                zero.pop(key)  # DeepSpeed's default
    if zero.get("stage3_gather_16bit_weights_on_model_save") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = True

    # optimizer / scheduler sections: the engine builds both from train.*; the JSON may only agree
    if "optimizer" in ds:
        section = ds.pop("optimizer") or {}
        kind = str(section.get("type", "AdamW"))
        if kind.lower() not in ("adam", "adamw"):
            raise EngineError(f"optimizer.type={kind!r} in {src}: the engine trains with AdamW "
                              f"(torch AdamW, or DeepSpeedCPUAdam with offload); use AdamW or remove the section")
        params = dict(section.get("params") or {})
        if kind.lower() == "adam" and params.get("adam_w_mode") is False:
            raise EngineError(f"optimizer adam_w_mode=false in {src}: the engine's AdamW decouples weight decay")
        ours = {"lr": optimizer.lr, "eps": optimizer.eps, "weight_decay": optimizer.weight_decay,
                "betas": list(optimizer.betas)}
        names = {"lr": "train.lr", "eps": "train.adam_eps", "weight_decay": "train.weight_decay",
                 "betas": "[train.adam_beta1, train.adam_beta2]"}
        for key, value in ours.items():
            same = (lambda a, b: isinstance(a, list) and len(a) == 2 and all(close(x, y) for x, y in zip(a, b))) \
                if key == "betas" else close
            settle(params, key, value, names[key], f"optimizer.params.{key}", same)
    if "scheduler" in ds:
        section = ds.pop("scheduler") or {}
        kind = str(section.get("type", ""))
        if kind not in _SCHEDULER_TYPES:
            raise EngineError(f"scheduler.type={kind!r} in {src} is not supported; the engine's schedulers are "
                              f"train.scheduler (transformers): remove the section or use one of "
                              f"{', '.join(_SCHEDULER_TYPES)}")
        if spec.scheduler_name not in _SCHEDULER_TYPES[kind]:
            raise EngineError(f"scheduler.type={kind!r} in {src} conflicts with train.scheduler="
                              f"{spec.scheduler_name!r} (it means {' or '.join(_SCHEDULER_TYPES[kind])})")
        params = dict(section.get("params") or {})
        if scheduler is None:  # preflight: total steps are known only once the data is
            params.pop("warmup_num_steps", None), params.pop("total_num_steps", None)
            scheduler = SchedulerSpec(spec.scheduler_name, "auto", "auto")
        settle(params, "warmup_num_steps", scheduler.warmup_steps, "train.warmup_steps (or round(train.warmup_ratio x total steps))",
               "scheduler.params.warmup_num_steps")
        settle(params, "warmup_max_lr", optimizer.lr, "train.lr",
               "scheduler.params.warmup_max_lr", close)
        settle(params, "warmup_min_lr", 0.0, "the engine's warm-up start", "scheduler.params.warmup_min_lr", close)
        if kind != "WarmupLR":
            settle(params, "total_num_steps", scheduler.total_steps, "the run's total steps",
                   "scheduler.params.total_num_steps")

    ds.setdefault("steps_per_print", 2**31 - 1)  # the engine logs progress itself
    ds.setdefault("wall_clock_breakdown", False)
    ds["zero_allow_untested_optimizer"] = True
    if opt_dev != "none":
        ds["zero_force_ds_cpu_optimizer"] = True  # we pass DeepSpeedCPUAdam ourselves
    leftover = _find_auto(ds)
    if leftover:
        raise EngineError(f"{leftover}=\"auto\" in {src}: the engine has no value for it; set it explicitly "
                          f"or remove it")
    return ds


def _find_auto(node, prefix="") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{prefix}{k}.")
            if found:
                return found
    elif node == "auto":
        return prefix.rstrip(".")
    return None


def _ds_model_states(ds_dir: Path) -> dict:
    files = sorted(ds_dir.glob("*model_states.pt"))
    if not files:
        raise EngineError(f"DeepSpeed checkpoint {ds_dir} has no *_model_states.pt file")
    # memory-mapped: the shapes are read without reading the tensors
    return load_torch_file(files[0], "DeepSpeed checkpoint", weights_only=False, mmap=True)


def _stage0_masters(module: dict, groups, order: list[str], aliases: dict[str, str]) -> dict | None:
    """DeepSpeed stage 0 under bf16/fp16 keeps its fp32 master weights as lists per optimizer param
    group, in the order the groups were built (backends.optim.param_groups = `order`). The module
    state dict with those masters by name (tied aliases too); None unless every shape agrees and the
    16-bit module weights are the masters rounded."""
    flat = [t for g in groups or [] for t in g]
    if not flat or len(flat) != len(order):
        return None
    masters = dict(module)
    for name, tensor in zip(order, flat):
        low = module.get(name)
        if low is None or tuple(low.shape) != tuple(tensor.shape) or not torch.equal(tensor.to(low.dtype), low):
            return None
        masters[name] = tensor.float()
    for alias, name in aliases.items():  # tied aliases (lm_head.weight) take their master too
        if alias in masters:
            masters[alias] = masters[name]
    return masters


def _undo_state_init_step(wrapper, optimizer) -> None:
    """Stage 0 under bf16/fp16 wraps a torch optimizer in DeepSpeed's FP16_UnfusedOptimizer, which
    creates the optimizer state by taking a real step with zero gradients (deepspeedai/DeepSpeed#5104):
    AdamW's step count is then 1 before training, so every update uses the next step's bias correction
    (the first is 0.74x DDP's; measured on the H200 smoke: 25% off DDP's losses by step 20), and its
    decoupled weight decay has shrunk the fp32 masters once. Forget that state (AdamW re-creates it
    on the first real step) and re-copy the masters from the 16-bit weights they were cloned from."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    if not isinstance(wrapper, FP16_UnfusedOptimizer) or not optimizer.state:
        return
    optimizer.state.clear()
    with torch.no_grad():
        for masters, weights in zip(wrapper.fp32_groups, wrapper.fp16_groups):
            for master, weight in zip(masters, weights):
                master.copy_(weight)


def _import_deepspeed():
    """Import deepspeed with the CPU accelerator picked explicitly when there is no CUDA (silences
    DeepSpeed's auto-detection warning)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    return deepspeed


def _check_precision(precision: str) -> None:
    """EngineError when DeepSpeed's accelerator on this machine cannot train in `precision`
    (fp16 on CPUs without mkldnn fp16, bf16 on old GPUs)."""
    if precision == "fp32":
        return
    _import_deepspeed()
    from deepspeed.accelerator import get_accelerator
    accel = get_accelerator()
    if (precision == "fp16" and not accel.is_fp16_supported()) or \
            (precision == "bf16" and not accel.is_bf16_supported()):
        raise EngineError(f"train.precision={precision} is not supported by DeepSpeed on this device "
                          f"({accel.device_name()}); use " + ("bf16 or fp32" if precision == "fp16" else "fp32"))


def _hidden_size(conf) -> int | None:
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(conf, attr, None)
        if isinstance(value, int):
            return value
    return None


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------
@register_backend("deepspeed", DeepSpeedOptions)
class DeepSpeedBackend(Backend):

    @classmethod
    def init_distributed(cls, timeout_s: float = 600) -> None:
        if "WORLD_SIZE" not in os.environ:
            return
        deepspeed = _import_deepspeed()
        from datetime import timedelta
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        else:
            # DeepSpeed's CPU comm layer JIT-builds a shared-memory all-reduce op (deepspeed_shm_comm) as it
            # starts, 30 s on 2 cores in every new environment, for inference_all_reduce only (AutoTP
            # inference); training's collectives are torch.distributed's. Its own table says it is not here.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # joins the torch process group (or wraps one a caller made) and builds DeepSpeed's comm layer
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(seconds=timeout_s))

    @classmethod
    def preflight(cls, spec: TrainingSpec, options: DeepSpeedOptions, world_size: int | None = None) -> list[str]:
        """Before `engine launch` spawns processes: deepspeed importable, the user's JSON consistent
        with the engine config (train_batch_size against world_size, the launcher's process count;
        all but the values that need the data), the precision supported by this device. Returns the
        notes for the launcher's log (legacy keys mapped)."""
        import importlib.util
        if importlib.util.find_spec("deepspeed") is None:
            raise EngineError("backend deepspeed needs the deepspeed package: pip install 'engine[deepspeed]' "
                              "(deepspeed and ninja)")
        build_ds_config(spec, options, world_size, None)
        if spec.precision != "fp32":  # importing deepspeed costs seconds: only when there is something to ask
            _check_precision(spec.precision)
        return options.legacy_notes() + stale_build_locks()  # DeepSpeed JIT-builds its ops (cpu_adam, shm comm)

    def __init__(self, spec: TrainingSpec, options: DeepSpeedOptions) -> None:
        super().__init__(spec, options)
        self.stage, self.offload_optimizer, self.offload_params = options.resolved_zero()
        self.engine = None
        self._hf_ds_config = None
        self._grad_norm_fallback = False

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, build_model, scheduler: SchedulerSpec) -> None:
        deepspeed = _import_deepspeed()
        logging.getLogger("DeepSpeed").setLevel(self.options.log_level.upper())
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(self.options.log_level.upper())

        # first without the model: "auto" sizes that depend on its width fall back to DeepSpeed's
        # defaults for zero.Init (which does not use them); settled below once the model exists
        self.ds_config = build_ds_config(self.spec, self.options, self.world_size, None, scheduler)
        _check_precision(self.spec.precision)  # also in preflight; here for runs not started by `engine launch`
        if "nvme" in (self.offload_optimizer, self.offload_params):
            if not deepspeed.ops.__compatible_ops__.get("async_io", False):
                raise EngineError("nvme offload needs DeepSpeed's async_io op (libaio-dev and a DeepSpeed "
                                  "build that supports it on this machine); use offload ... =cpu instead")

        if self.stage == 3:
            # ZeRO-3: parameters are partitioned while the model is built: transformers' from_config /
            # from_pretrained see the live HfDeepSpeedConfig and construct under deepspeed.zero.Init,
            # so a model that does not fit on one device can still be loaded.
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
            module = build_model()
            # LoRA adapters are added after the base is built (PEFT): deepspeed.initialize partitions them
            if not any(hasattr(p, "ds_id") for p in module.parameters()):
                raise EngineError("ZeRO-3: the model was not built partitioned (not a transformers model?)")
        else:
            module = build_model()
        self.module = module
        hidden = _hidden_size(getattr(module, "config", None))
        if hidden:
            self.ds_config = build_ds_config(self.spec, self.options, self.world_size, hidden, scheduler)

        optimizer = self.spec.optimizer
        if self.offload_optimizer != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            opt = DeepSpeedCPUAdam(param_groups(module, optimizer.weight_decay), lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                                   weight_decay=optimizer.weight_decay, adamw_mode=True)
            self.optimizer_name = "DeepSpeedCPUAdam"
        else:
            opt = adamw(module, optimizer, self.device)  # the same optimizer as the DDP backend
            self.optimizer_name = f"torch.optim.AdamW ({adamw_impl(optimizer.impl, self.device)})"
        self.basic_optimizer = opt
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt,
                                                                 config=self.ds_config)
        _undo_state_init_step(self.engine.optimizer, opt)
        # on the optimizer whose param_groups DeepSpeed kept (ZeRO swaps their params for its flat
        # partitions but keeps the group dicts, so the lr this scheduler sets is the lr used)
        self.scheduler = build_scheduler(opt, scheduler)
        self.model = self.engine
        if self.spec.compile:
            # DeepSpeed's own torch.compile of the wrapped module (keeps its hooks)
            options = compile_options(self.spec)
            backend = {"backend": options.pop("backend")} if "backend" in options else {}
            self.engine.compile(**backend, compile_kwargs=options)
        # Stage 0 in fp32 has no ZeRO optimizer wrapper, so DeepSpeed keeps no norm: measure it with
        # DeepSpeed's own global-norm helper before its step (grads are all-reduced by then).
        self._grad_norm_fallback = not hasattr(self.engine.optimizer, "_global_grad_norm")

    # -- training ---------------------------------------------------------------------------
    def forward_backward(self, batch, sync_grads: bool, return_logits: bool = False):
        # the loop's accumulation window is DeepSpeed's: reduce (stage 0/1) and step only at its end
        self.engine.set_gradient_accumulation_boundary(sync_grads)
        loss, logits = loss_and_logits(self.engine(**batch), return_logits)
        self.engine.backward(loss)  # divides by gradient_accumulation_steps (= train.grad_accum)
        return ForwardOutput(loss.detach().float(), logits)

    def step(self) -> StepInfo:
        self.engine.set_gradient_accumulation_boundary(True)
        measured = None
        if self._grad_norm_fallback:
            from deepspeed.runtime.utils import get_global_norm_of_tensors
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            measured = get_global_norm_of_tensors(grads) if grads else 0.0
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()
        applied = self.engine.was_step_applied()
        self.scheduler.step()  # also after an fp16 overflow skip, as under DDP
        norm = self.engine.get_global_grad_norm() if measured is None else measured
        return StepInfo(grad_norm=norm, skipped=not applied, lr=lr)

    @torch.no_grad()
    def eval_forward(self, inputs) -> torch.Tensor:
        # under ZeRO-3 the forward gathers parameters collectively: every rank must call it the
        # same number of times (the loop gives every data-parallel rank the same number of batches)
        return self.engine(**inputs).logits

    def train_mode(self, training: bool) -> None:
        self.engine.train(training)

    # -- state ------------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG,
                                    client_state={"engine_scheduler": self.scheduler.state_dict()},
                                    save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, client = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if path is None:
            raise EngineError(f"no DeepSpeed checkpoint in {directory / CHECKPOINT_TAG} (was it written by "
                              f"another backend?)")
        self.scheduler.load_state_dict(client["engine_scheduler"])

    def layout(self) -> dict:
        # DeepSpeed's files are per data-parallel rank and stage (its universal checkpoint is an
        # offline conversion): anything else goes through load_universal
        return {"backend": "deepspeed", "zero_stage": self.stage, "offload_optimizer": self.offload_optimizer,
                "offload_params": self.offload_params, "dp_size": self.world_size}

    @torch.no_grad()
    def load_universal(self, state: UniversalState, scratch: Path) -> None:
        """Through DeepSpeed's own per-parameter API (deepspeed.utils.safe_set_full_*), which writes
        each rank's fragment of a full tensor into whatever ZeRO partitioning this run has."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        named = list(self.module.named_parameters())
        if not any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for _, p in named):
            # stage 0 in fp32: the client AdamW steps the module's own parameters
            state.load_weights(self.module)
            self.basic_optimizer.load_state_dict(state.optimizer_state_dict(self.basic_optimizer.param_groups))
            return
        self._init_optimizer_state(state.adam_step)
        for name, p in named:
            full = state.weights[name]
            if self.stage == 3:
                import deepspeed
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.rank == 0:
                        p.data.copy_(full.view(p.ds_shape))  # the compute copy; DeepSpeed repartitions it
            else:
                p.data.copy_(full)  # ZeRO-1/2 keep whole compute weights on every rank
            if not p.requires_grad:  # a LoRA run's frozen base: no fp32 master, no optimizer state
                continue
            safe_set_full_fp32_param(p, full.to(self.device))
            for key, value in state.moments[name].items():
                safe_set_full_optimizer_state(p, value.to(self.device), key)

    @classmethod
    def convert_for_reading(cls, directory, scratch) -> None:
        """DeepSpeed's own universal-checkpoint converter (deepspeed.checkpoint.ds_to_universal):
        ZeRO 1-3's per-rank flat partitions -> one folder per parameter name with fp32, exp_avg,
        exp_avg_sq. Stage 0 has no partitions: nothing to convert."""
        ds_dir = Path(directory) / CHECKPOINT_TAG
        if not list(ds_dir.glob("*optim_states.pt")):
            return
        import argparse
        import contextlib
        import io
        _import_deepspeed()
        from deepspeed.checkpoint import ds_to_universal
        args = argparse.Namespace(input_folder=str(ds_dir), output_folder=str(Path(scratch) / "universal"),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=True)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal.main(args)  # prints progress and bars; errors still raise
        except Exception as e:  # noqa: BLE001 - its failures come as many kinds
            raise EngineError(f"DeepSpeed's universal-checkpoint conversion of {directory} failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    @classmethod
    def read_moments(cls, directory, order, aliases, layout, scratch):
        zero = Path(scratch) / "universal" / "zero"
        if not zero.is_dir():  # stage 0 in fp32: the client AdamW's own torch state dict
            states = sorted((Path(directory) / CHECKPOINT_TAG).glob("*model_states.pt"))
            optimizer = torch.load(states[0], map_location="cpu", weights_only=False).get("optimizer") or {}
            if "state" not in optimizer:
                raise EngineError(f"checkpoint {directory}: DeepSpeed stage 0 under bf16/fp16 resumes only in its "
                                  f"own layout (its optimizer state is not kept by parameter)")
            return moments_by_index(optimizer["state"], order, directory)

        def load(name: str, key: str) -> torch.Tensor:
            for stored in [name] + [a for a, n in aliases.items() if n == name]:
                if (zero / stored / f"{key}.pt").is_file():
                    value = torch.load(zero / stored / f"{key}.pt", map_location="cpu", weights_only=False)
                    return value["param"] if isinstance(value, dict) else value  # stage 3: a flat tensor
            raise EngineError(f"checkpoint {directory}: DeepSpeed's conversion has no {key} for {name}")

        moments = {name: {key: load(name, key) for key in MOMENTS} for name in order}
        step_file = next(zero.glob("*/step.pt"), None)
        if step_file is not None:
            step = torch.load(step_file, weights_only=False)
        else:  # stage 3 keeps it in the common optimizer state
            common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
            step = common["optimizer_state_dict"]["state"][0]["step"]
        return moments, int(step.item() if torch.is_tensor(step) else step)

    # -- this backend's files, read offline (engine export/eval, the resume checks) -------------
    # DeepSpeed's native checkpoint under step-N/deepspeed/: per-rank *model_states.pt (module state
    # dict, recorded parameter shapes) and, with ZeRO 1-3, *optim_states.pt holding the fp32 master
    # partitions, which DeepSpeed's own zero_to_fp32 consolidates.
    @classmethod
    def checkpoint_problem(cls, directory, layout):
        ds_dir, where = Path(directory) / CHECKPOINT_TAG, f"checkpoint {Path(directory).name}"
        if not list(ds_dir.glob("*model_states.pt")):
            return f"it has no DeepSpeed {CHECKPOINT_TAG}/*model_states.pt"
        return files_problem(sorted(ds_dir.glob("*.pt")), where)

    @classmethod
    def checkpoint_shapes(cls, directory, layout):
        states = _ds_model_states(Path(directory) / CHECKPOINT_TAG)
        shapes: dict[str, tuple[int, ...]] = {}
        for group in states.get("param_shapes") or []:
            shapes.update({k: tuple(v) for k, v in group.items()})
        # parameters the optimizer does not step (a LoRA run's frozen base) are recorded apart
        shapes.update({k: tuple(v) for k, v in (states.get("frozen_param_shapes") or {}).items()})
        if not shapes:  # stage 0: the module state dict itself
            shapes = {k: tuple(v.shape) for k, v in (states.get("module") or {}).items()}
        return shapes or None

    @classmethod
    def read_weights(cls, directory, layout, order, aliases):
        """ZeRO 1-3: the fp32 masters from the optimizer partitions (zero_to_fp32). Stage 0 keeps no
        partitions: the module state dict, or under bf16/fp16 the fp32 masters it keeps per param group."""
        ds_dir = Path(directory) / CHECKPOINT_TAG
        if os.environ.get("DS_ACCELERATOR") is None and not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
        if list(ds_dir.glob("*optim_states.pt")):
            import contextlib
            import io
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            try:
                # it prints its progress (stdout) and progress bars (stderr); errors still raise
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=CHECKPOINT_TAG)
                return dict(state), "DeepSpeed ZeRO fp32 master weights (zero_to_fp32)"
            except ValueError as e:
                if "is not a zero checkpoint" not in str(e):
                    raise EngineError(f"DeepSpeed checkpoint {ds_dir} could not be consolidated: "
                                      f"{str(e).splitlines()[0]}") from None
            except (FileNotFoundError, RuntimeError, KeyError) as e:
                raise EngineError(f"DeepSpeed checkpoint {ds_dir} could not be consolidated "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        states = _ds_model_states(ds_dir)
        module = states.get("module")
        if not module:
            raise EngineError(f"DeepSpeed checkpoint {ds_dir} holds neither ZeRO optimizer partitions nor a "
                              "module state dict")
        if not any(v.is_floating_point() and v.dtype != torch.float32 for v in module.values()):
            return module, "DeepSpeed module state dict"
        masters = _stage0_masters(module, (states.get("optimizer") or {}).get("fp32_groups"), order, aliases)
        if masters is not None:
            return masters, "DeepSpeed stage-0 fp32 master weights"
        return module, "DeepSpeed module state dict (16-bit: no fp32 master copy matching the model's parameters)"

    def _init_optimizer_state(self, adam_step: int) -> None:
        """AdamW state exists only after a first step: create it (zeros, the resumed step count) on
        ZeRO's flat fp32 partitions, so the per-parameter setters have fragments to write into."""
        zero = self.engine.optimizer
        inner = zero.optimizer  # the client optimizer, stepping ZeRO's partitions
        # ZeRO-3 hands its flat fp32 partitions to the client optimizer's groups only during a step
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [
            p for group in inner.param_groups for p in group["params"]]
        fused = bool(inner.param_groups[0].get("fused"))
        for flat in flats:
            slot = inner.state[flat]
            for key in ("exp_avg", "exp_avg_sq"):
                slot.setdefault(key, torch.zeros_like(flat))
            # DeepSpeedCPUAdam counts steps in an int; torch's AdamW in a float tensor
            slot["step"] = adam_step if not isinstance(inner, torch.optim.AdamW) else (
                torch.tensor(float(adam_step), device=flat.device if fused else "cpu"))
        link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2: point each parameter's fragment at the state just made
            zero._hp_optimizer_states_linked = False
            link()

    def export_pretrained(self, directory: Path) -> None:
        """Consolidated HF folder on rank 0. Weights are the module's: fp32 when training in fp32,
        the 16-bit compute copy under bf16/fp16 (the weights the logged evals ran with)."""
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective: all ranks call
        else:
            state = self.module.state_dict() if self.is_main else None
        if self.is_main:
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.module.save_pretrained(directory, state_dict=state, safe_serialization=True)

    # -- reporting --------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"zero_stage": self.stage, "optimizer": getattr(self, "optimizer_name", "?"),
                "offload_optimizer": self.offload_optimizer, "offload_params": self.offload_params,
                "precision": self.spec.precision, "gradient_clipping": self.spec.max_grad_norm,
                "compiled": compiled(self.spec)}

    def close(self) -> None:
        if self._hf_ds_config is not None:
            # the global HfDeepSpeedConfig would make later models in this process build under ZeRO-3
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
            self._hf_ds_config = None
        if self.engine is not None:
            try:
                self.engine.destroy()
            except Exception:  # older DeepSpeed: nothing to release
                pass
            self.engine = None

    # -- bench specs and memory-estimate rows (see Backend) ---------------------------------------
    bench_spec_help = "deepspeed:zero{0,1,2,3}[+offload|+offload_opt]"
    bench_defaults = ("deepspeed:zero0", "deepspeed:zero1", "deepspeed:zero2", "deepspeed:zero3")

    @classmethod
    def bench_options(cls, variant: str, modifiers: list[str]) -> dict:
        import re
        m = re.fullmatch(r"zero([0-3])", variant or "zero2")
        if not m:
            raise ValueError("use deepspeed:zero0..zero3")
        options: dict = {"zero_stage": int(m.group(1))}
        for mod in modifiers:
            if mod == "offload":  # optimizer to host; on ZeRO-3 also the parameters
                options["offload_optimizer"] = "cpu"
                if options["zero_stage"] == 3:
                    options["offload_params"] = "cpu"
            elif mod == "offload_opt":
                options["offload_optimizer"] = "cpu"
            else:
                raise ValueError(f"unknown modifier +{mod} (deepspeed takes +offload, +offload_opt)")
        return options

    @classmethod
    def estimate_rows(cls):
        # ZeRO 1-3 allocate their reduce buffer whole: DeepSpeed's reduce_bucket_size, 5e8 elements unless
        # set (measured on the H200 smoke: 954 MiB in bf16 on a 19M-parameter model, none on stage 0)
        row = lambda key, stage, **kw: EstimateRow(key, stage, deepspeed_estimator=True,
                                                   reduce_bucket=REDUCE_BUCKET_DEFAULT if stage else 0, **kw)
        return (row("deepspeed:zero0", 0), row("deepspeed:zero1", 1), row("deepspeed:zero2", 2),
                row("deepspeed:zero2+offload", 2, offload_optimizer=True), row("deepspeed:zero3", 3),
                row("deepspeed:zero3+offload_opt", 3, offload_optimizer=True),
                row("deepspeed:zero3+offload", 3, offload_optimizer=True, offload_params=True),
                # not in the table; for bench runs of deepspeed:zero0/zero1+offload
                row("deepspeed:zero0+offload", 0, offload_optimizer=True, listed=False),
                row("deepspeed:zero1+offload", 1, offload_optimizer=True, listed=False))

    @classmethod
    def estimate_key(cls, options: dict) -> str | None:
        key = f"deepspeed:zero{options.get('zero_stage', 2)}"
        if options.get("offload_params") == "cpu":
            return key + "+offload"
        if options.get("offload_optimizer") == "cpu":
            return key + ("+offload_opt" if key.endswith("zero3") else "+offload")
        return key
    # -- end of bench specs and memory-estimate rows --------------------------------------------
