"""torch.amp mixed precision for backends that step a torch optimizer themselves (DDP, FSDP2 and
ColossalAI's torch_ddp plugin): autocast for bf16/fp16, GradScaler loss scaling for fp16, and the
one unscale -> clip -> step -> skipped-step sequence (the job of Lightning Fabric's Precision
plug-in). Backends whose library owns mixed precision (DeepSpeed, ColossalAI's ZeRO plugins) use
only `autocast`, or nothing."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from backends.base import StepInfo

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AmpPrecision:
    def __init__(self, precision: str, device: torch.device) -> None:
        self.dtype = DTYPES.get(precision)
        self.device_type = device.type
        # fp16 needs loss scaling; bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def clip_and_step(self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
                      max_norm: float) -> tuple[torch.Tensor, bool]:
        """Unscale (fp16), clip to max_norm (0 = off: the norm is measured, nothing clipped), step.
        Returns the pre-clip gradient norm as a device tensor (no host sync) and whether an fp16
        overflow skipped the step (reading the scale is a host sync, on fp16 only)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf"))
        if not self.scaler:
            optimizer.step()
            return grad_norm, False
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return grad_norm, self.scaler.get_scale() < scale

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scheduler, parameters: Iterable[torch.Tensor],
                       max_norm: float) -> StepInfo:
        """A whole step of a backend that steps a torch optimizer itself (DDP, FSDP2): clip_and_step,
        the schedule, fresh gradients; with the lr the step used. A DTensor norm (FSDP2's sharded
        gradients) is made the norm over all ranks' shards."""
        grad_norm, skipped = self.clip_and_step(optimizer, parameters, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return StepInfo(grad_norm=grad_norm, skipped=skipped, lr=lr)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
