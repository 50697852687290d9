"""Plain PyTorch DistributedDataParallel (or a bare module on one process)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from backends.base import (Backend, EstimateRow, ForwardOutput, SchedulerSpec, StepInfo, UniversalState,
                           compile_options, compiled, loss_and_logits, moments_by_index, register_backend)
from backends.errors import EngineError
from backends.files import QUANT_STATE, check_safetensors, files_problem
from backends.optim import adamw, adamw_impl, build_scheduler
from backends.precision import AmpPrecision


WEIGHTS = "model.safetensors"  # in step-N: the plain state dict


@dataclass
class DDPOptions:
    find_unused_parameters: bool = False
    bucket_cap_mb: int = 25
    static_graph: bool = False


@register_backend("ddp", DDPOptions)
class DDPBackend(Backend):
    def setup(self, build_model, scheduler: SchedulerSpec) -> None:
        self.module = build_model().to(self.device)
        model = self.module
        if self.world_size > 1:
            model = DistributedDataParallel(
                self.module, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                find_unused_parameters=self.options.find_unused_parameters,
                bucket_cap_mb=self.options.bucket_cap_mb, static_graph=self.options.static_graph)
        self.ddp = model
        # compiled after wrapping: DDP's optimizer splits the graph at its gradient buckets
        self.model = torch.compile(model, **compile_options(self.spec)) if self.spec.compile else model
        self.optimizer = adamw(self.module, self.spec.optimizer, self.device)
        self.scheduler = build_scheduler(self.optimizer, scheduler)
        self.precision = AmpPrecision(self.spec.precision, self.device)

    def forward_backward(self, batch, sync_grads: bool, return_logits: bool = False) -> ForwardOutput:
        skip_sync = not sync_grads and isinstance(self.ddp, DistributedDataParallel)
        with self.ddp.no_sync() if skip_sync else nullcontext():
            with self.precision.autocast():
                loss, logits = loss_and_logits(self.model(**batch), return_logits)
            self.precision.scale(loss / self.spec.grad_accum).backward()
        return ForwardOutput(loss.detach(), logits)

    def step(self) -> StepInfo:
        return self.precision.optimizer_step(self.optimizer, self.scheduler, self.module.parameters(),
                                             self.spec.max_grad_norm)

    @torch.no_grad()
    def eval_forward(self, inputs) -> torch.Tensor:
        with self.precision.autocast():
            return self.module(**inputs).logits  # uncompiled: eval shapes vary, no recompiles

    def train_mode(self, training: bool) -> None:
        self.module.train(training)

    # DDP replicas are identical: rank 0 writes, every rank reads.
    def save_state(self, directory: Path) -> None:
        if self.is_main:
            from safetensors.torch import save_model
            save_model(self.module, str(directory / WEIGHTS))  # handles tied weights
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
            if self.precision.scaler:
                torch.save(self.precision.state_dict(), directory / "scaler.pt")

    def load_state(self, directory: Path) -> None:
        from safetensors.torch import load_model
        # a 4-bit base (QLoRA) saves its quantization state beside each weight; the module rebuilt it
        # from the same pretrained weights, so those keys are the only ones it may not take
        missing, unexpected = load_model(self.module, str(directory / WEIGHTS), device=str(self.device),
                                         strict=not self.spec.quantized_base)
        unexpected = [k for k in unexpected if not QUANT_STATE.search(k)]
        if missing or unexpected:
            raise EngineError(f"checkpoint {directory.name}: {WEIGHTS} does not fit the model: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}")
        load = lambda name: torch.load(directory / name, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(load("optimizer.pt"))
        self.scheduler.load_state_dict(load("scheduler.pt"))
        if self.precision.scaler:
            self.precision.load_state_dict(load("scaler.pt"))

    def layout(self) -> dict:
        return {"backend": "ddp"}  # rank 0 writes the whole state: any number of ranks reads it

    def load_universal(self, state: UniversalState, scratch: Path) -> None:
        state.load_weights(self.module)
        self.optimizer.load_state_dict(state.optimizer_state_dict(self.optimizer.param_groups))

    @classmethod
    def read_moments(cls, directory, order, aliases, layout, scratch):
        optimizer = torch.load(Path(directory) / "optimizer.pt", map_location="cpu", weights_only=True)
        return moments_by_index(optimizer["state"], order, directory)

    # model.safetensors is the whole state dict (tied tensors once); optimizer/scheduler/scaler are torch files
    @classmethod
    def checkpoint_problem(cls, directory, layout):
        directory = Path(directory)
        files = [directory / WEIGHTS, directory / "optimizer.pt", directory / "scheduler.pt"]
        files += [f for f in [directory / "scaler.pt"] if f.exists()]  # fp16 runs only
        return files_problem(files, f"checkpoint {directory.name}")

    @classmethod
    def checkpoint_shapes(cls, directory, layout):
        from safetensors import safe_open
        path = Path(directory) / WEIGHTS
        check_safetensors(path, f"checkpoint {directory}")
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    @classmethod
    def read_weights(cls, directory, layout, order, aliases):
        from safetensors.torch import load_file
        path = Path(directory) / WEIGHTS
        check_safetensors(path, f"checkpoint {directory}")
        return load_file(str(path), device="cpu"), WEIGHTS

    def export_pretrained(self, directory: Path) -> None:
        if self.is_main:
            self.module.save_pretrained(directory, safe_serialization=True)

    def describe(self) -> dict:
        return {"optimizer": f"torch.optim.AdamW ({adamw_impl(self.spec.optimizer.impl, self.device)})",
                "wrapper": "DDP" if self.world_size > 1 else "none", "compiled": compiled(self.spec)}

    # -- bench specs and memory-estimate rows (see Backend) ---------------------------------------
    bench_spec_help = "ddp"
    quantized_base = True  # replicas of the whole module: bitsandbytes' 4-bit layers stay as they are
    bench_defaults = ("ddp",)

    @classmethod
    def estimate_rows(cls):
        # fp32 weights, grads and AdamW on every rank; DDP's gradient bucket; autocast's weight copies
        return (EstimateRow("ddp", None, grad_bucket=True, autocast_copy=True, quantized_base=cls.quantized_base),)

    @classmethod
    def estimate_key(cls, options: dict) -> str | None:
        return "ddp"
    # -- end of bench specs and memory-estimate rows --------------------------------------------
