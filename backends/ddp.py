"""Plain PyTorch DistributedDataParallel (or a bare module on one process)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from backends.base import Backend, OptimizerSpec, SchedulerSpec, StepInfo, register_backend
from engine.optim import adamw, build_scheduler


@dataclass
class DDPOptions:
    find_unused_parameters: bool = False
    bucket_cap_mb: int = 25
    static_graph: bool = False


@register_backend("ddp", DDPOptions)
class DDPBackend(Backend):
    def setup(self, build_model, optimizer: OptimizerSpec, scheduler: SchedulerSpec) -> None:
        self.module = build_model().to(self.device)
        if self.world_size > 1:
            self.model = DistributedDataParallel(
                self.module, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                find_unused_parameters=self.options.find_unused_parameters,
                bucket_cap_mb=self.options.bucket_cap_mb, static_graph=self.options.static_graph)
        else:
            self.model = self.module
        self.optimizer = adamw(self.module, optimizer)
        self.scheduler = build_scheduler(self.optimizer, scheduler)
        # fp16 needs loss scaling; bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(self.device.type) if self.cfg.train.precision == "fp16" else None

    def forward_backward(self, batch, sync_grads: bool) -> torch.Tensor:
        skip_sync = not sync_grads and isinstance(self.model, DistributedDataParallel)
        with self.model.no_sync() if skip_sync else nullcontext():
            with self.autocast():
                loss = self.model(**batch).loss
            scaled = loss / self.cfg.train.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach()

    def step(self) -> StepInfo:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or float("inf")  # inf: measure the norm, clip nothing
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        skipped = False
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepInfo(grad_norm=grad_norm, skipped=skipped, lr=lr)

    @torch.no_grad()
    def eval_forward(self, batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self.autocast():
            return self.module(**inputs).logits

    def train_mode(self, training: bool) -> None:
        self.module.train(training)

    # DDP replicas are identical: rank 0 writes, every rank reads.
    def save_state(self, directory: Path) -> None:
        if self.is_main:
            from safetensors.torch import save_model
            save_model(self.module, str(directory / "model.safetensors"))  # handles tied weights
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
            if self.scaler:
                torch.save(self.scaler.state_dict(), directory / "scaler.pt")

    def load_state(self, directory: Path) -> None:
        from safetensors.torch import load_model
        load_model(self.module, str(directory / "model.safetensors"), device=str(self.device))
        load = lambda name: torch.load(directory / name, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(load("optimizer.pt"))
        self.scheduler.load_state_dict(load("scheduler.pt"))
        if self.scaler:
            self.scaler.load_state_dict(load("scaler.pt"))

    def export_pretrained(self, directory: Path) -> None:
        if self.is_main:
            self.module.save_pretrained(directory, safe_serialization=True)

    def describe(self) -> dict:
        return {"optimizer": "torch.optim.AdamW", "wrapper": "DDP" if self.world_size > 1 else "none"}

    # -- bench specs and memory-estimate rows (see Backend) ---------------------------------------
    bench_spec_help = "ddp"

    @classmethod
    def estimate_rows(cls):
        from backends.base import EstimateRow
        # fp32 weights, grads and AdamW on every rank; DDP's gradient bucket; autocast's weight copies
        return (EstimateRow("ddp", None, grad_bucket=True, autocast_copy=True),)

    @classmethod
    def estimate_key(cls, options: dict) -> str | None:
        return "ddp"
    # -- end of bench specs and memory-estimate rows --------------------------------------------
