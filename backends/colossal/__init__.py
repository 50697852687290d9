"""ColossalAI backend: TorchDDP, LowLevelZero (ZeRO 1/2), Gemini and HybridParallel (TP/PP/ZeRO)
through ColossalAI's Booster.

Cheap to import: colossalai is imported inside methods only (the registry imports every backend
module to validate config sections). Patches to ColossalAI live in compat.py, the transformers-5
shardformer policies of hybrid parallelism in gpt2_policy.py (GPT-2), neo_j_policy.py (GPT-Neo,
GPT-J) and decoder_policy.py (Llama, Qwen2, Qwen3, Mistral).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from backends.base import (Backend, EngineError, EstimateRow, ForwardOutput, SchedulerSpec,
                           StepInfo, TrainingSpec, UniversalState, loss_and_logits, moments_by_index, register_backend)
from backends.files import bin_shards, files_problem, load_torch_file
from backends.optim import adamw, adamw_impl, build_scheduler, param_groups
from backends.precision import AmpPrecision

PLUGINS = ("torch_ddp", "low_level_zero", "gemini", "hybrid")
INSTALL_HINT = ("ColossalAI is not installed; install it without its 2024-era pins: "
                "pip install --no-deps colossalai==0.5.0 psutil peft einops galore_torch fabric "
                "(or run scripts/setup.sh)")


@dataclass
class ColossalOptions:
    plugin: str = "torch_ddp"        # torch_ddp | low_level_zero | gemini | hybrid
    # THE ZeRO stage (as backend.deepspeed.zero_stage): low_level_zero 1 (optimizer state) or 2
    # (+ gradients), default 1; hybrid 0, 1 or 2 over the data-parallel group, default 0
    zero_stage: int | None = None
    stage: int | None = None         # deprecated alias of zero_stage (low_level_zero's old name)
    tp_size: int = 1                 # hybrid: tensor-parallel degree
    pp_size: int = 1                 # hybrid: pipeline stages
    microbatches: int = 0            # hybrid with pp_size > 1: pipeline micro-batches per micro-batch (0 = pp_size)
    cpu_offload: bool = False        # low_level_zero: optimizer state + master weights in host memory
    placement_policy: str = "static"  # gemini: static | auto
    initial_scale: float = 2.0 ** 16  # fp16 loss scale start (low_level_zero / gemini / hybrid)

    def __post_init__(self) -> None:
        p = "backend.colossal"
        self.notes: tuple[str, ...] = ()  # one-line notes for the engine to log (not a config key)
        if self.stage is not None:
            if self.zero_stage is not None and self.zero_stage != self.stage:
                raise EngineError(f"{p}.stage={self.stage} and {p}.zero_stage={self.zero_stage} disagree: "
                                  f"stage is a deprecated alias of zero_stage; set zero_stage only")
            self.zero_stage = self.stage
            self.notes = (f"note: {p}.stage is a deprecated alias; write {p}.zero_stage={self.stage}",)
        if self.plugin not in PLUGINS:
            raise EngineError(f"{p}.plugin must be one of {', '.join(PLUGINS)}; got {self.plugin!r}")
        if self.plugin == "low_level_zero":
            if self.zero_stage is None:
                self.zero_stage = 1
            if self.zero_stage not in (1, 2):
                raise EngineError(f"{p}.zero_stage must be 1 or 2 for plugin=low_level_zero, got {self.zero_stage}")
        elif self.plugin == "hybrid":
            if self.zero_stage is None:
                self.zero_stage = 0
            if self.zero_stage not in (0, 1, 2):
                raise EngineError(f"{p}.zero_stage must be 0, 1 or 2 for plugin=hybrid, got {self.zero_stage}")
        elif self.zero_stage:
            raise EngineError(f"{p}.zero_stage needs {p}.plugin=low_level_zero (1, 2) or hybrid (0-2); "
                              f"got plugin={self.plugin}"
                              + (" (gemini shards everything already)" if self.plugin == "gemini" else ""))
        else:
            self.zero_stage = 0
        for key in ("tp_size", "pp_size"):
            if getattr(self, key) < 1:
                raise EngineError(f"{p}.{key} must be at least 1, got {getattr(self, key)}")
        if self.microbatches < 0:
            raise EngineError(f"{p}.microbatches must not be negative, got {self.microbatches}")
        if self.plugin != "hybrid" and (self.tp_size > 1 or self.pp_size > 1):
            raise EngineError(f"{p}.tp_size/pp_size need {p}.plugin=hybrid (got plugin={self.plugin})")
        if self.pp_size > 1 and self.zero_stage == 2:
            raise EngineError(f"{p}.zero_stage=2 cannot be combined with {p}.pp_size > 1 (ColossalAI: "
                              "pipeline parallelism supports ZeRO stage 0 or 1)")
        if self.placement_policy not in ("static", "auto"):
            raise EngineError(f"{p}.placement_policy must be static or auto, got {self.placement_policy!r}")
        if self.initial_scale <= 0:
            raise EngineError(f"{p}.initial_scale must be positive, got {self.initial_scale}")

    @property
    def num_microbatches(self) -> int:
        return self.microbatches or self.pp_size


def _require_colossalai() -> None:
    try:
        import colossalai  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "colossalai":
            raise EngineError(INSTALL_HINT) from None
        raise EngineError(f"ColossalAI is installed but cannot be imported: module {e.name!r} is missing "
                          f"({INSTALL_HINT.split('; ', 1)[1]})") from None


def _config_error(spec: TrainingSpec, options: ColossalOptions) -> str | None:
    """What ColossalAI would refuse with an assert deep inside boost(), said up front."""
    o, t = options, spec
    if t.compile:
        return ("train.compile is not supported by the colossal backend: ColossalAI's Booster wraps the model "
                "in its own wrapper (sharded modules, pipeline schedules, ZeRO hooks) that unwrap/save/no_sync "
                "expect uncompiled; use --backend ddp or deepspeed for torch.compile")
    if t.lora and (o.plugin == "gemini" or o.plugin == "hybrid" and o.tp_size > 1):
        # ColossalAI 0.5 itself: GeminiPlugin.support_lora() is False; HybridParallelPlugin.enable_lora
        # asserts tp_size == 1 (its tensor-parallel layers do not take PEFT's wrapped Linear layers)
        return (f"model.lora is not supported by the colossal backend with "
                + ("plugin=gemini (ColossalAI's Gemini has no LoRA support)" if o.plugin == "gemini" else
                   f"tensor parallelism (tp_size={o.tp_size}: ColossalAI's LoRA stops short of it; pp_size and "
                   "ZeRO over data-parallel ranks take LoRA)")
                + "; use backend.colossal.plugin=torch_ddp or low_level_zero, or --backend ddp, deepspeed or fsdp")
    if o.plugin == "hybrid" and o.zero_stage and t.precision == "fp32":
        return (f"backend.colossal.zero_stage={o.zero_stage} needs train.precision=bf16 or fp16 "
                "(ColossalAI's hybrid ZeRO keeps fp32 master weights of half-precision parameters; "
                "for fp32 ZeRO use backend.colossal.plugin=low_level_zero)")
    if o.plugin == "hybrid" and o.pp_size > 1:
        if o.num_microbatches < o.pp_size:
            return (f"backend.colossal.microbatches={o.num_microbatches} must be at least pp_size={o.pp_size} "
                    "(the 1F1B pipeline schedule needs one micro-batch per stage)")
        if t.micro_batch_size % o.num_microbatches:
            return (f"backend.colossal.microbatches={o.num_microbatches} must divide "
                    f"train.micro_batch_size={t.micro_batch_size} (each pipeline micro-batch is a slice of it)")
    reason = _cpu_only_reason(o)
    if reason is None and o.plugin == "gemini" and t.precision == "fp32":
        return "backend.colossal.plugin=gemini needs train.precision=bf16 or fp16 (ColossalAI's Gemini has no fp32 mode)"
    return reason


def _check_hybrid_config(conf, task: str, options: ColossalOptions) -> None:
    """What the hybrid plugin needs of the model (its family's policy module says), from its config."""
    from backends.colossal import decoder_policy, gpt2_policy
    if getattr(conf, "model_type", None) in decoder_policy.FAMILIES:
        decoder_policy.check_config(conf, options.tp_size, options.pp_size)
    else:
        gpt2_policy.check_config(conf, task, options.tp_size, options.pp_size)


def _hybrid_policy(task: str, model_type: str):
    """The shardformer policy of the model's family (the plugin keeps and mutates it: a fresh one)."""
    from backends.colossal import decoder_policy, gpt2_policy, neo_j_policy
    if model_type in decoder_policy.FAMILIES:
        return decoder_policy.policy_for(task, model_type)
    if model_type in neo_j_policy.FAMILIES:
        return neo_j_policy.policy_for(task, model_type)
    return gpt2_policy.policy_for(task)


def _cpu_only_reason(options: ColossalOptions) -> str | None:
    if torch.cuda.is_available():
        return None
    if options.plugin == "gemini":
        return ("backend.colossal.plugin=gemini needs CUDA: Gemini's chunk manager uses CUDA streams and "
                "its HybridAdam/CPUAdam kernels are CUDA builds; on CPU use plugin=low_level_zero "
                "(ZeRO 1/2) or plugin=hybrid")
    if options.cpu_offload:
        return ("backend.colossal.cpu_offload needs CUDA (it offloads from accelerator memory with "
                "ColossalAI's CPUAdam kernel); on CPU the states already live in host memory")
    return None


@register_backend("colossal", ColossalOptions)
class ColossalBackend(Backend):

    @classmethod
    def preflight(cls, spec: TrainingSpec, options: ColossalOptions, world_size: int | None = None) -> None:
        _require_colossalai()
        reason = _config_error(spec, options)
        if reason:
            raise EngineError(reason)
        o = options
        if o.plugin == "hybrid" and world_size is not None and world_size % (o.tp_size * o.pp_size):
            raise EngineError(f"backend.colossal.tp_size={o.tp_size} x pp_size={o.pp_size} does not divide the "
                              f"{world_size} processes; start a multiple of {o.tp_size * o.pp_size} (--nproc / --gpus)")

    @classmethod
    def check_model_config(cls, model_config, spec, options, world_size=None) -> None:
        if options.plugin != "hybrid":
            return
        _check_hybrid_config(model_config, spec.task, options)

    @classmethod
    def init_distributed(cls, timeout_s: float = 600) -> None:
        _require_colossalai()
        from backends.colossal import compat
        compat.apply()
        if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
            return  # a driver (tests/drivers/run_many.py) already owns the process group
        import colossalai
        colossalai.launch_from_torch(verbose=False)  # the loop seeds every RNG itself afterwards

    def __init__(self, spec: TrainingSpec, options: ColossalOptions) -> None:
        super().__init__(spec, options)
        _require_colossalai()
        reason = _config_error(spec, options)
        if reason:
            raise EngineError(reason)
        from backends.colossal import compat
        compat.apply()
        if not dist.is_initialized():
            raise EngineError("the colossal backend needs a process group: start it with `engine launch` "
                              "(torchrun), even for one process")
        from colossalai.booster import Booster
        self.plugin = self._make_plugin()
        # torch_ddp steps a plain torch optimizer: torch.amp as under the DDP backend (autocast, and
        # GradScaler for fp16); the other plugins run their own mixed precision
        self.amp = AmpPrecision(spec.precision if options.plugin == "torch_ddp" else "fp32", self.device)
        self.booster = Booster(plugin=self.plugin)
        self.pipelined = options.plugin == "hybrid" and options.pp_size > 1

    # -- plugin -----------------------------------------------------------------------------
    def _make_plugin(self):
        o, t = self.options, self.spec
        precision = t.precision
        max_norm = float(t.max_grad_norm or 0.0)
        if o.plugin == "torch_ddp":
            from colossalai.booster.plugin import TorchDDPPlugin
            return TorchDDPPlugin()
        if o.plugin == "low_level_zero":
            from colossalai.booster.plugin import LowLevelZeroPlugin
            return LowLevelZeroPlugin(stage=o.zero_stage, precision=precision, max_norm=max_norm,
                                      initial_scale=o.initial_scale, cpu_offload=o.cpu_offload,
                                      overlap_communication=torch.cuda.is_available())
        if o.plugin == "gemini":
            from colossalai.booster.plugin import GeminiPlugin
            return GeminiPlugin(precision=precision, placement_policy=o.placement_policy, max_norm=max_norm,
                                initial_scale=o.initial_scale)
        # hybrid
        if self.world_size % (o.tp_size * o.pp_size):
            raise EngineError(f"backend.colossal.tp_size={o.tp_size} x pp_size={o.pp_size} does not divide "
                              f"the {self.world_size} processes")
        from colossalai.booster.plugin import HybridParallelPlugin

        from backends.colossal.gpt2_policy import policy_for
        kwargs = {}
        if o.pp_size > 1:
            kwargs["num_microbatches"] = o.num_microbatches
            # batches are padded to their longest row, so activation shapes change between steps:
            # the schedule must not reuse the shapes it received first
            kwargs["enable_metadata_cache"] = False
        return HybridParallelPlugin(
            tp_size=o.tp_size, pp_size=o.pp_size, zero_stage=o.zero_stage, precision=precision,
            max_norm=max_norm, initial_scale=o.initial_scale, enable_all_optimization=False,
            enable_fused_normalization=False, enable_flash_attention=False, enable_jit_fused=False,
            # attention stays transformers' own, which the GPT-2 policy keeps: it follows
            # model.attn_implementation (sdpa by default: flash kernels on CUDA, or flash_attention_2).
            # ColossalAI's fused normalization would swap in apex's LayerNorm; torch's own LayerNorm is
            # already one fused CUDA kernel, and apex is not a dependency, so the policy keeps torch's.
            enable_sequence_parallelism=False, parallel_output=True,
            overlap_communication=torch.cuda.is_available(),  # ZeRO's comm stream needs CUDA (record_stream)
            custom_policy=policy_for(self.spec.task), **kwargs)

    # -- data-parallel layout ----------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        if self.options.plugin == "hybrid":
            return dist.get_rank(self.plugin.dp_group)
        return self.rank

    @property
    def dp_size(self) -> int:
        if self.options.plugin == "hybrid":
            return self.plugin.dp_size
        return self.world_size

    @property
    def dp_group(self):
        return self.plugin.dp_group if self.options.plugin == "hybrid" else None

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, build_model, scheduler: SchedulerSpec) -> None:
        optimizer = self.spec.optimizer
        self.build_model = build_model
        module = build_model()
        if self.options.plugin == "hybrid":
            _check_hybrid_config(module.config, self.spec.task, self.options)  # also for runs not started by launch
            self.plugin.custom_policy = _hybrid_policy(self.spec.task, module.config.model_type)
        if self.options.plugin == "gemini":  # GeminiOptimizer accepts ColossalAI's Adam kernels only
            from colossalai.nn.optimizer import HybridAdam
            optim = HybridAdam(param_groups(module, optimizer.weight_decay), lr=optimizer.lr, betas=optimizer.betas,
                               eps=optimizer.eps, weight_decay=optimizer.weight_decay, adamw_mode=True)
        else:
            optim = adamw(module, optimizer, self.device)
        sched = build_scheduler(optim, scheduler)
        self.model, self.optimizer, _, _, self.scheduler = self.booster.boost(module, optim, lr_scheduler=sched)
        # LoRA: the PEFT model itself (the Booster's unwrap shows a view of its base without adapters)
        self.module = self.model.unwrap(unwrap_peft=False) if self.spec.lora else self.model.unwrap()

    # -- training ---------------------------------------------------------------------------
    def _no_sync(self, sync_grads: bool):
        if sync_grads or not self.plugin.support_no_sync():
            return nullcontext()
        return self.booster.no_sync(self.model, self.optimizer)

    def forward_backward(self, batch, sync_grads: bool, return_logits: bool = False):
        if self.pipelined:
            # the logits live on the last stage only: no logits (training metrics that need them
            # are left out of the run), the loss is broadcast to every stage
            with self._no_sync(sync_grads):
                return ForwardOutput(self._pipeline_forward_backward(batch))
        with self._no_sync(sync_grads):
            with self.amp.autocast():
                loss, logits = loss_and_logits(self.model(**batch), return_logits)
            self.booster.backward(self.amp.scale(loss / self.spec.grad_accum), self.optimizer)
        return ForwardOutput(loss.detach(), logits)

    def _pipeline_forward_backward(self, batch) -> torch.Tensor:
        accum = self.spec.grad_accum
        criterion = lambda outputs, inputs: outputs.loss / accum  # noqa: E731
        out = self.booster.execute_pipeline(iter([batch]), self.model, criterion, self.optimizer,
                                            return_loss=True, return_outputs=False)
        return self._from_last_stage(out["loss"] * accum if out["loss"] is not None else None)

    def _from_last_stage(self, value: torch.Tensor | None) -> torch.Tensor:
        """Broadcast a tensor held by the last pipeline stage to every stage of this pipeline."""
        stage = self.plugin.stage_manager
        group = self.plugin.pp_group
        src = dist.get_global_rank(group, self.options.pp_size - 1)
        if stage.is_last_stage():
            value = value.detach().float().contiguous()
            meta = torch.tensor(list(value.shape) + [0] * (4 - value.dim()) + [value.dim()], dtype=torch.long)
        else:
            meta = torch.zeros(5, dtype=torch.long)
        dist.broadcast(meta, src, group=group)
        if not stage.is_last_stage():
            ndim = int(meta[-1])
            value = torch.empty(tuple(int(x) for x in meta[:ndim]), dtype=torch.float32, device=self.device)
        dist.broadcast(value, src, group=group)
        return value

    def step(self) -> StepInfo:
        if self.options.plugin == "torch_ddp":  # a plain torch optimizer inside the Booster's wrapper
            grad_norm, skipped = self.amp.clip_and_step(self.optimizer.optim, self.module.parameters(),
                                                        self.spec.max_grad_norm)
        else:
            fp16 = self.spec.precision == "fp16"
            steps_before = self._optimizer_steps() if fp16 else 0.0
            self.optimizer.step()
            # fp16 overflow: ColossalAI's scalers skip the update silently (and with hysteresis do not
            # always lower the scale), so a skipped step is one where AdamW's step counters did not move
            skipped = fp16 and self._optimizer_steps() == steps_before
            grad_norm = self.optimizer.get_grad_norm()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad()
        return StepInfo(grad_norm=grad_norm, skipped=skipped, lr=lr)

    def _optimizer_steps(self) -> float:
        inner = getattr(self.optimizer, "optim", self.optimizer)
        return sum(float(state.get("step", 0)) for state in inner.state.values())

    @torch.no_grad()
    def eval_forward(self, inputs) -> torch.Tensor:
        if self.pipelined:
            return self._pipeline_eval(inputs)
        with self.amp.autocast():
            return self.model(**inputs).logits

    def _pipeline_eval(self, inputs) -> torch.Tensor:
        # forward-only pipeline: the schedule re-derives its micro-batch count from the eval batch;
        # restore the training split afterwards (the next training batch asserts on it)
        import logging
        schedule = self.plugin.scheduler
        saved = (schedule.num_microbatches, schedule.microbatch_size)
        log = logging.getLogger("colossalai")  # it warns about return_outputs on every eval batch
        level = log.level
        log.setLevel(logging.ERROR)
        try:  # no_sync: forward-only, so skip the plugin's post-step gradient syncs (there are no grads)
            with self.booster.no_sync(self.model, self.optimizer):
                out = self.booster.execute_pipeline(iter([inputs]), self.model, lambda o, i: torch.zeros(()),
                                                    optimizer=None, return_loss=False, return_outputs=True)
        finally:
            schedule.num_microbatches, schedule.microbatch_size = saved
            log.setLevel(level)
        logits = out["outputs"]["logits"] if self.plugin.stage_manager.is_last_stage() else None
        return self._from_last_stage(logits)

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    # -- state ------------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        directory = Path(directory)
        if self.spec.lora:
            self._save_peft_model(directory / "model")
        else:  # torch .bin shards: safetensors refuses GPT-2's tied wte/lm_head (shared storage)
            self.booster.save_model(self.model, str(directory / "model"), shard=True, use_safetensors=False)
        self.booster.save_optimizer(self.optimizer, str(directory / "optimizer"), shard=True)
        if self.is_main:
            self.booster.save_lr_scheduler(self.scheduler, str(directory / "scheduler.pt"))

    def load_state(self, directory: Path) -> None:
        directory = Path(directory)
        self._load_model(directory / "model")
        self.booster.load_optimizer(self.optimizer, str(directory / "optimizer"))
        self.booster.load_lr_scheduler(self.scheduler, str(directory / "scheduler.pt"))

    def _save_peft_model(self, folder: Path) -> None:
        """A LoRA run's model/: the PEFT model's whole state dict by PEFT's names (base and adapters),
        as the ddp backend writes it, in the Booster's shard layout. ColossalAI's own save_model shows
        a PEFT model as its base without the adapters. torch_ddp and low_level_zero keep every weight
        whole on every rank: rank 0 writes; with pipeline stages each stage's first data-parallel rank
        writes the stage's weights (padded vocabularies come out un-padded) and rank 0 the index."""
        self._wait_for_weights()
        stage = self.plugin.stage_manager.stage if self.pipelined else 0
        shard = f"pytorch_model-{stage + 1:05d}.bin"
        state = {}
        if self.dp_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
            torch.save(state, folder / shard)
        weight_map = {k: shard for k in state}
        if self.pipelined:  # the index names every stage's weights
            maps = [None] * self.world_size
            dist.all_gather_object(maps, weight_map)
            weight_map = {k: v for m in maps for k, v in m.items()}
        if self.is_main:
            _write_index(folder / "pytorch_model.bin.index.json", {}, weight_map)
        dist.barrier()

    def _wait_for_weights(self) -> None:
        wait = getattr(self.model, "_force_wait_all_gather", None)
        if wait:  # low_level_zero may still be gathering the weights of the last step
            wait()

    def _load_model(self, folder: Path) -> None:
        if self.spec.lora:  # _save_peft_model's files, read by every rank
            if self.pipelined:  # a stage takes its own weights (the others' are unexpected here)
                missing = self.module.load_state_dict(_read_model_shards(folder), strict=False).missing_keys
                if missing:
                    raise EngineError(f"checkpoint {folder} lacks {len(missing)} weights of this pipeline stage "
                                      f"(e.g. {missing[0]})")
            else:
                self.module.load_state_dict(_read_model_shards(folder), strict=True)
            update = getattr(self.model, "update_master_params", None)
            if update:  # low_level_zero: its fp32 master shards from the weights just loaded
                update()
            return
        strict = True
        if self.options.plugin == "gemini":
            # Gemini writes a tied weight under each of its names (GPT-2's lm_head.weight beside
            # transformer.wte.weight) but loads each parameter once, and strictly it calls the alias
            # unexpected (the H200 smoke's resume failed so): the keys are checked here instead
            problem = gemini_key_problem(self.module, _index_keys(folder))
            if problem:
                raise EngineError(f"checkpoint {folder}: {problem}")
            strict = False
        self.booster.load_model(self.model, str(folder), strict=strict)

    def layout(self) -> dict:
        o = self.options
        return {"backend": "colossal", "plugin": o.plugin, "zero_stage": o.zero_stage, "tp_size": o.tp_size,
                "pp_size": o.pp_size, "world_size": self.world_size}

    def load_universal(self, state: UniversalState, scratch: Path) -> None:
        """The Booster's own sharded checkpoint format is already layout-free (full tensors; the
        optimizer's keyed by parameter index in the unsharded model's group order; the plugin
        shards them for TP/PP/ZeRO as it loads), so the state is written in that format and loaded
        by the Booster. Rank 0 writes into `scratch`, every rank reads."""
        scratch = Path(scratch)
        if self.is_main:
            for sub in ("model", "optimizer"):
                (scratch / sub).mkdir(parents=True, exist_ok=True)
            # tied aliases too (a pipeline's last stage looks its head up as lm_head.weight)
            weights = {**state.weights, **{a: state.weights[n] for a, n in state.aliases.items()}}
            torch.save(weights, scratch / "model" / "pytorch_model-00001.bin")
            _write_index(scratch / "model" / "pytorch_model.bin.index.json", {}, weights, "pytorch_model-00001.bin")
            moments = {n: dict(m) for n, m in state.moments.items()}
            _fused_qkv_order(moments, self.options.tp_size if self.options.plugin == "hybrid" else 1, to_booster=True)
            optim = replace(state, moments=moments).optimizer_state_dict(self.optimizer.param_groups)
            torch.save(optim["state"], scratch / "optimizer" / "pytorch_optim-00001.bin")
            torch.save(optim["param_groups"], scratch / "optimizer" / "pytorch_optim_group.bin")
            _write_index(scratch / "optimizer" / "pytorch_optim.bin.index.json",
                         {"param_groups": "pytorch_optim_group.bin"}, optim["state"], "pytorch_optim-00001.bin")
        dist.barrier()
        self._load_model(scratch / "model")
        self.booster.load_optimizer(self.optimizer, str(scratch / "optimizer"))

    @classmethod
    def read_moments(cls, directory, order, aliases, layout, scratch):
        """The Booster's optimizer/ shards: full tensors by parameter index (TP-fused QKV aside)."""
        folder = Path(directory) / "optimizer"
        index = json.loads((folder / "pytorch_optim.bin.index.json").read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(torch.load(folder / shard, map_location="cpu", weights_only=False))
        moments, step = moments_by_index(state, order, directory)
        tp = layout.get("tp_size", 1) if layout.get("plugin") == "hybrid" else 1
        _fused_qkv_order(moments, tp, to_booster=False)
        return moments, step

    # -- this backend's files, read offline (engine export/eval, the resume checks) -------------
    # step-N/model/ and optimizer/ are the Booster's sharded torch .bin checkpoints (full tensors: it
    # gathers TP and ZeRO shards when it saves; a TP vocabulary keeps its padding rows), scheduler.pt.
    @classmethod
    def checkpoint_problem(cls, directory, layout):
        directory, where = Path(directory), f"checkpoint {Path(directory).name}"
        try:
            files = bin_shards(directory / "model", where)
        except EngineError as e:  # its shard index is damaged
            return str(e).removeprefix(where + ": ")
        if not files:
            return "it has no Booster model/ shards"
        return files_problem(files + sorted((directory / "optimizer").glob("*.bin")) + [directory / "scheduler.pt"],
                             where)

    @classmethod
    def checkpoint_shapes(cls, directory, layout):
        return {k: tuple(v.shape) for k, v in _read_model_shards(Path(directory) / "model", mmap=True).items()}

    @classmethod
    def read_weights(cls, directory, layout, order, aliases):
        return _read_model_shards(Path(directory) / "model"), "model/ (Booster shards)"

    def export_pretrained(self, directory: Path) -> None:
        """Consolidated HF folder: the Booster gathers the (TP/PP/ZeRO-sharded) weights into full
        tensors in a temporary sharded checkpoint; rank 0 loads them into a fresh, unsharded model
        and writes it with save_pretrained, so the folder loads without ColossalAI."""
        directory = Path(directory)
        if self.spec.lora:  # the adapter folder, as the ddp backend writes it (weights are whole on every rank)
            self._wait_for_weights()
            adapters = None
            if self.pipelined:  # each stage holds its own layers' adapters (and the last the head): gathered
                from peft import get_peft_model_state_dict
                mine = get_peft_model_state_dict(self.module) if self.dp_rank == 0 else {}
                parts = [None] * self.world_size
                dist.all_gather_object(parts, {k: v.detach().cpu().contiguous() for k, v in mine.items()})
                adapters = {k: v for part in parts for k, v in part.items()}
            if self.is_main:
                self.module.save_pretrained(directory, safe_serialization=True)
                if adapters is not None:  # rank 0's PEFT wrote its own stage's: all stages' instead
                    from safetensors.torch import save_file
                    save_file(adapters, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
            dist.barrier()
            return
        tmp = directory.parent / f".{directory.name}-gathered"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        self.booster.save_model(self.model, str(tmp), shard=True, gather_dtensor=True, use_safetensors=False)
        if dist.is_initialized():
            dist.barrier()
        if self.is_main:
            state = _read_shards(tmp)
            fresh = self.build_model()
            missing, unexpected = fresh.load_state_dict(state, strict=False)
            tied = set(getattr(fresh, "_tied_weights_keys", None) or {})
            missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
            if missing or unexpected:
                raise RuntimeError(f"export: gathered checkpoint does not match the model "
                                   f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
            fresh.save_pretrained(directory, safe_serialization=True)
            shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    # -- reporting --------------------------------------------------------------------------
    def describe(self) -> dict:
        o = self.options
        info = {"plugin": o.plugin,
                "optimizer": "colossalai HybridAdam (AdamW)" if o.plugin == "gemini" else
                f"torch.optim.AdamW ({adamw_impl(self.spec.optimizer.impl, self.device)})"}
        if o.plugin == "low_level_zero":
            info["zero_stage"] = o.zero_stage
        if o.plugin == "hybrid":
            info.update(tp_size=o.tp_size, pp_size=o.pp_size, zero_stage=o.zero_stage, dp_size=self.dp_size)
            if o.pp_size > 1:
                info["microbatches"] = o.num_microbatches
        return info

    # -- bench specs and memory-estimate rows (see Backend) ---------------------------------------
    bench_spec_help = "colossal:{torch_ddp,low_level_zero,zero1,zero2,gemini,hybrid}[+tpN][+ppN][+stageN][+offload]"
    # +stageN sets zero_stage (low_level_zero: 1/2, hybrid: 0-2)

    @classmethod
    def bench_options(cls, variant: str, modifiers: list[str]) -> dict:
        import re
        variant = variant or "torch_ddp"
        if variant in ("zero1", "zero2"):
            options: dict = {"plugin": "low_level_zero", "zero_stage": int(variant[-1])}
        elif variant in PLUGINS:
            options = {"plugin": variant}
        else:
            raise ValueError(f"unknown plugin {variant!r}; use colossal:{{{','.join(PLUGINS)},zero1,zero2}}")
        for mod in modifiers:
            m = re.fullmatch(r"(tp|pp)(\d+)", mod)
            if m:
                options[f"{m.group(1)}_size"] = int(m.group(2))
            elif mod.startswith("stage") and mod[5:].isdigit():
                options["zero_stage"] = int(mod[5:])
            elif mod == "offload":
                options["cpu_offload"] = True
            else:
                raise ValueError(f"unknown modifier +{mod} (colossal takes +tpN, +ppN, +stageN, +offload)")
        return options

    @classmethod
    def estimate_rows(cls):
        # torch_ddp wraps the model in DDP on one rank too: its gradient buckets exist whatever N
        return (EstimateRow("colossal:torch_ddp", None, grad_bucket=True, grad_bucket_one_rank=True,
                            autocast_copy=True),
                EstimateRow("colossal:zero1", 1), EstimateRow("colossal:zero2", 2),
                EstimateRow("colossal:gemini", 3))

    @classmethod
    def estimate_key(cls, options: dict) -> str | None:
        plugin = options.get("plugin", "torch_ddp")
        stage = options.get("zero_stage", options.get("stage", 1))  # stage: the deprecated alias
        if plugin == "low_level_zero" and stage in (1, 2):
            return f"colossal:zero{stage}"
        if plugin in ("torch_ddp", "gemini"):
            return f"colossal:{plugin}"
        return None  # hybrid (TP/PP): no row
    # -- end of bench specs and memory-estimate rows --------------------------------------------


def _read_model_shards(folder: Path, mmap: bool = False) -> dict:
    """A checkpoint's model/ shards (those its index names), memory-mapped when only shapes are wanted."""
    files = bin_shards(folder, f"checkpoint {folder}")
    if not files:
        raise EngineError(f"checkpoint folder {folder} holds no .bin shards")
    state = {}
    for f in files:
        state.update(load_torch_file(f, "checkpoint shard", weights_only=True, mmap=mmap))
    return state


def _read_shards(folder: Path) -> dict:
    """Merge the torch .bin shards of a Booster sharded checkpoint (full tensors after gather)."""
    state = {}
    for f in sorted(Path(folder).glob("*.bin")):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def gemini_key_problem(module: torch.nn.Module, keys: set[str]) -> str | None:
    """What is wrong with a Gemini model checkpoint's keys for `module`, None if nothing: every
    parameter and persistent buffer present, nothing else but the tied aliases of its parameters."""
    unique = {name for name, _ in module.named_parameters()}
    aliases = {name for name, _ in module.named_parameters(remove_duplicate=False)} - unique
    buffers = set(module.state_dict(keep_vars=True)) - unique - aliases
    missing = sorted((unique | buffers) - keys)
    unknown = sorted(keys - unique - aliases - buffers)
    if missing:
        return f"{len(missing)} weight(s) of the model missing, e.g. {', '.join(missing[:3])}"
    if unknown:
        return f"{len(unknown)} key(s) the model does not have, e.g. {', '.join(unknown[:3])}"
    return None


def _index_keys(folder: Path) -> set[str]:
    """The weight names of a sharded .bin model checkpoint (its index), or of its one shard."""
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    return set(_read_model_shards(folder, mmap=True))


def _write_index(path: Path, metadata: dict, keys, shard: str | None = None) -> None:
    """The index file of a Booster sharded checkpoint: `keys` all in `shard`, or (shard None) a
    {key: shard file} map."""
    weight_map = {str(k): shard for k in keys} if shard is not None else {str(k): v for k, v in keys.items()}
    path.write_text(json.dumps({"metadata": {**metadata, "total_size": 0}, "weight_map": weight_map}, indent=1))


QKV_FUSED = ("attn.c_attn.weight", "attn.c_attn.bias")  # GPT-2's fused [q | k | v] (policy: GPT2FusedLinearConv1D_Col)


def _fused_qkv_order(moments: dict, tp_size: int, to_booster: bool) -> None:
    """Under tensor parallelism the Booster's optimizer checkpoint keeps a fused QKV parameter's
    moments as the ranks' shards one after another, [q0 k0 v0 | q1 k1 v1], while it gathers the
    weight itself into model order, [q0 q1 | k0 k1 | v0 v1] (measured: the moments of a tp=2
    checkpoint equal DDP's only after this reorder). Convert in place, either way."""
    if tp_size <= 1:
        return
    for name, slots in moments.items():
        if not name.endswith(QKV_FUSED):
            continue
        for key, t in slots.items():
            if to_booster:  # model order -> rank after rank
                parts = t.chunk(3, dim=-1)
                slots[key] = torch.cat([p.chunk(tp_size, dim=-1)[r] for r in range(tp_size) for p in parts], dim=-1)
            else:
                pieces = t.chunk(3 * tp_size, dim=-1)  # rank r holds pieces 3r (q), 3r+1 (k), 3r+2 (v)
                slots[key] = torch.cat([pieces[3 * r + j] for j in range(3) for r in range(tp_size)], dim=-1)
