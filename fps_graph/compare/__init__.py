"""Comparing ways of fine-tuning on one's own model and data: ``fps-graph compare`` (``run_compare``), and the
statistics, run records and report the quality studies share (bench/quality, bench/quality_lm).

- ``run_compare(CompareConfig(...))``: the default selection vs random selection vs LoRA at the same trainable
  count, learning rates swept and chosen on validation, several seeds; ``compare.{md,json,png}``.
- ``paired`` / ``paired_seeds``: paired differences between two methods over the seeds (and budgets) both ran.
- ``train_run``: one run through the training loop, scored on evaluation splits; ``report``: tables and plot.

The names load on first use (PEP 562): reading ``CompareConfig`` (torch-free) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "fps_graph.compare.config": ("CompareConfig",),
    "fps_graph.compare.job": ("CompareCallbacks", "CompareResult", "run_compare"),
    "fps_graph.compare.report": ("RunMeta", "report", "score"),
    "fps_graph.compare.runs": ("train_run",),
    "fps_graph.compare.stats": ("paired", "paired_seeds"),
}
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module 'fps_graph.compare' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
