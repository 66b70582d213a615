"""Training tasks, by name: each supplies its data, head, loss and metrics to the one loop (``base.Task``).

Adding a task: one file in this folder with a ``Task`` subclass, and its line in ``TASKS`` below.
"""
from __future__ import annotations

from fps_graph.errors import OptionError
from fps_graph.training.tasks.base import DataContext, HeadPlan, Step, Task, TaskData
from fps_graph.training.tasks.causal_lm import CausalLM
from fps_graph.training.tasks.image_cls import ImageClassification
from fps_graph.training.tasks.seq_cls import SequenceClassification

__all__ = ["TASKS", "get_task", "Task", "TaskData", "DataContext", "HeadPlan", "Step", "ImageClassification",
           "CausalLM", "SequenceClassification"]

TASKS: dict[str, type[Task]] = {t.name: t for t in (ImageClassification, CausalLM, SequenceClassification)}


def get_task(name: str) -> Task:
    """A fresh task object by its name (image-cls, causal-lm, seq-cls)."""
    if name not in TASKS:
        raise OptionError(f"unknown task {name!r} (use {', '.join(TASKS)})")
    return TASKS[name]()
