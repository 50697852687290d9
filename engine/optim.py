"""Optimizer parameter groups and LR schedulers shared by every backend."""
from __future__ import annotations

import torch

from backends.base import OptimizerSpec, SchedulerSpec


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other 1-D parameters are not decayed
    (the usual rule of GPT-2 / HF Trainer fine-tuning)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # a ZeRO-3 partitioned parameter is a flat shard; its real shape is `ds_shape`
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    # foreach=False keeps the per-parameter update order identical across backends (parity tests)
    groups = [g for g in param_groups(model, spec.weight_decay) if g["params"]]  # ZeRO rejects empty groups
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, foreach=False)


def build_scheduler(optimizer, spec: SchedulerSpec):
    """transformers' schedulers, so names and warm-up mean what HF users expect."""
    from transformers import get_scheduler
    return get_scheduler(spec.name, optimizer, num_warmup_steps=spec.warmup_steps,
                         num_training_steps=spec.total_steps)
