"""Comparing ways of fine-tuning on one's own model and data: the statistics, run records and report the quality
studies share (bench/quality, bench/quality_lm), and (landing next) ``fps-graph compare``.

- ``paired`` / ``paired_seeds``: paired differences between two methods over the seeds (and budgets) both ran.
- ``train_run``: one run through the training loop, scored on evaluation splits; ``report``: tables and plot.

The names load on first use (PEP 562): the statistics and the report do not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
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
