"""The Task protocol: what the model head is, how examples are tokenized and batched, how eval
is scored.

A task is backend-agnostic: it sees logits and batches, and reduces eval results over the
data-parallel group through the `Collective` the loop hands it.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.errors import EngineError


@dataclass
class Collective:
    """Reductions over the data-parallel group, so tasks need not know about process groups."""
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    all_gather_object: Callable[[Any], list]


@dataclass
class TaskData:
    train: Any                 # indexable: train[i] -> example for collate
    eval: Any | None
    num_labels: int | None = None
    notes: tuple[str, ...] = ()  # facts worth logging (rows read, blocks made, ...)


class Task(ABC):
    name: str

    @abstractmethod
    def auto_model_class(self):
        """transformers Auto class for this head."""

    @abstractmethod
    def prepare(self, cfg, tokenizer) -> TaskData:
        """Read, tokenize and (for LM) pack the data. Deterministic: every rank gets the same."""

    @abstractmethod
    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """Model kwargs including `labels`."""

    @abstractmethod
    def eval_init(self) -> dict: ...

    @abstractmethod
    def eval_update(self, state: dict, logits: torch.Tensor, batch: dict, indices: list[int]) -> None: ...

    @abstractmethod
    def eval_finish(self, state: dict, collective: Collective, device) -> dict[str, float]: ...

    def example_records(self, logits: torch.Tensor, batch: dict, indices: list[int]) -> list[dict]:
        """One JSON-able record per example of an eval batch (`engine eval --predictions`), keyed by
        `index` (position in the eval set), computed as eval_update scores it."""
        raise NotImplementedError(f"task {self.name} writes no per-example predictions")

    # -- training-set metrics per log window (optional) -------------------------------------
    # The loop keeps the task's sums on the device beside the window's loss, adds them up over
    # the data-parallel group at the log step (in the same all-reduce as the loss) and writes what
    # train_metrics_finish makes of them into the `train` event. No host sync inside a step.
    def train_metrics_init(self, device) -> torch.Tensor | None:
        """A zeroed float64 device vector of sums, or None: this task reports no training metrics
        (and the loop does not ask the backend for the training logits)."""
        return None

    def train_metrics_update(self, sums: torch.Tensor, logits: torch.Tensor, batch: dict) -> None:
        """Add one micro-batch (its logits and device batch) to `sums` in place, on the device."""

    def train_metrics_finish(self, sums: list[float]) -> dict[str, float]:
        """The metrics of a window from its sums over all data-parallel ranks."""
        return {}

    @staticmethod
    def tokens_in(batch: dict) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic hold-out: the same split on every rank and every resume."""
    if len(rows) < 2:
        raise EngineError(f"data.validation_split needs at least 2 rows to hold some out, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
