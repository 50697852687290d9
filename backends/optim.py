"""The optimizer pieces every backend shares: AdamW parameter groups, the AdamW implementation
for the device, and transformers' LR schedulers (names and warm-up mean what HF users expect)."""
from __future__ import annotations

import torch

from backends.base import OptimizerSpec, SchedulerSpec

# auto: the fastest correct one for the device (fused on CUDA, as the HF Trainer does; foreach on
# CPU); for_loop: torch's per-parameter path, whose update order is the same whatever the backend
# flattened or sharded, so CPU parity tests between backends can compare losses bit for bit.
ADAMW_IMPLS = ("auto", "fused", "foreach", "for_loop")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other 1-D parameters are not decayed
    (the usual rule of GPT-2 / HF Trainer fine-tuning). Empty groups are dropped (ZeRO rejects them)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # a ZeRO-3 partitioned parameter is a flat shard; its real shape is `ds_shape`
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw_impl(impl: str, device: torch.device) -> str:
    """The implementation `auto` means on this device."""
    if impl == "auto":
        return "fused" if device.type == "cuda" else "foreach"
    return impl


def adamw(model: torch.nn.Module, spec: OptimizerSpec, device: torch.device) -> torch.optim.Optimizer:
    impl = adamw_impl(spec.impl, device)
    flags = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas, eps=spec.eps,
                             **flags)


def build_scheduler(optimizer, spec: SchedulerSpec):
    from transformers import get_scheduler
    return get_scheduler(spec.name, optimizer, num_warmup_steps=spec.warmup_steps,
                         num_training_steps=spec.total_steps)
