"""Fine-tuning in PyTorch: the adapters (what trains), the tasks (data, head, loss, metrics), one loop, one run
folder. Public entry points:

- ``attach(model, masks)`` / ``load_delta(model, file)``: sparse deltas on any PyTorch model (the Hugging Face
  Trainer recipe of docs/train_apply.md uses these).
- ``fit(model, adapter, task, train_data, val_data, OptimConfig, RunConfig)``: the training loop for any adapter
  (``SparseAdapter``, ``LoraAdapter``, ``FullAdapter``) and task (``get_task('image-cls' | 'causal-lm' |
  'seq-cls')``), measuring loss, metrics, time per step and peak memory.
- ``run_train(TrainJob(...))``: the `fps-graph train` job (model from a factory or ``hf:DIR``, data files).

The names load on first use (PEP 562), so reading the option configs (``training.config``, torch-free) does not
import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "fps_graph.training.adapters": ("ADAPTERS", "Adapter", "Attached", "FullAdapter", "LoraAdapter", "SparseAdapter"),
    "fps_graph.training.config": ("DataConfig", "ModelConfig", "OptimConfig", "Optimizer", "RunConfig",
                                  "TrainsConfig"),
    "fps_graph.training.heads": ("HeadInfo",),
    "fps_graph.training.job": ("TrainJob", "run_train"),
    "fps_graph.training.loop": ("Callbacks", "Prepared", "Setup", "TrainResult", "evaluate", "fit", "prepare"),
    "fps_graph.training.sparse": ("SparseFineTune", "attach", "load_delta", "save_delta"),
    "fps_graph.training.summary": ("TrainableSummary",),
    "fps_graph.training.tasks": ("TASKS", "DataContext", "Task", "TaskData", "get_task"),
}
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module 'fps_graph.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
