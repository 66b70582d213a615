"""fps-graph: forward-only (FPS) parameter selection for sparse fine-tuning, at the ONNX graph level.

Data flows one way: model -> augmented graph -> statistics -> scores -> masks -> training -> patched model.

The public API is what this module lists in ``__all__``; every other path is private and may move. Importing
``fps_graph`` loads nothing heavy (no NumPy, ONNX or torch): each name below is imported on first use.

Example:
    >>> import fps_graph
    >>> sel = fps_graph.select("model.onnx", "calibration_images/", budget="0.5%")
    >>> sel.save("masks.safetensors")
    >>> masks = fps_graph.load_masks("masks.safetensors")          # dict of bool arrays, no torch
    >>> handle = fps_graph.attach(torch_model, "masks.safetensors")  # torch: only the selected entries train
    >>> fps_graph.apply("model.onnx", "run/delta.safetensors", "model_finetuned.onnx")
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fps_graph._version import __version__
from fps_graph.errors import DataError, FpsGraphError, ModelError, OptionError, RuntimeFailure

if TYPE_CHECKING:   # for type checkers and IDEs; at run time these load on first use (__getattr__ below)
    from fps_graph.api import Selection, apply, inspect, load_masks, select
    from fps_graph.data.sources import ImageOptions
    from fps_graph.data.text import TextOptions
    from fps_graph.runtime.config import RuntimeConfig
    from fps_graph.runtime.shards import ClusterOptions
    from fps_graph.training.sparse import SparseFineTune, attach, load_delta

# public name -> "module:attribute", imported on first access (the torch side only when asked for)
_LAZY = {
    "select": "fps_graph.api:select",
    "Selection": "fps_graph.api:Selection",
    "inspect": "fps_graph.api:inspect",
    "load_masks": "fps_graph.api:load_masks",
    "apply": "fps_graph.api:apply",
    "RuntimeConfig": "fps_graph.runtime.config:RuntimeConfig",
    "ImageOptions": "fps_graph.data.sources:ImageOptions",
    "TextOptions": "fps_graph.data.text:TextOptions",
    "ClusterOptions": "fps_graph.runtime.shards:ClusterOptions",
    "attach": "fps_graph.training.sparse:attach",
    "load_delta": "fps_graph.training.sparse:load_delta",
    "SparseFineTune": "fps_graph.training.sparse:SparseFineTune",
}

__all__ = ["select", "Selection", "inspect", "load_masks", "apply", "RuntimeConfig", "ImageOptions", "TextOptions",
           "ClusterOptions", "attach", "load_delta", "SparseFineTune", "FpsGraphError", "OptionError", "DataError", "ModelError", "RuntimeFailure",
           "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562), so that ``import fps_graph`` stays light."""
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'fps_graph' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value          # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
