"""Tasks (causal_lm, classification) behind one protocol (engine/tasks/base.py)."""
from __future__ import annotations

from engine.errors import EngineError
from engine.tasks.base import Collective, Task, TaskData, split_rows

__all__ = ["Collective", "Task", "TaskData", "get_task", "split_rows"]


def get_task(name: str) -> Task:
    if name == "causal_lm":
        from engine.tasks.causal_lm import CausalLMTask
        return CausalLMTask()
    if name == "classification":
        from engine.tasks.classification import ClassificationTask
        return ClassificationTask()
    raise EngineError(f"unknown task {name!r}")
