"""fps-graph: forward-only (FPS) parameter selection for sparse fine-tuning, at the ONNX graph level.

Data flows one way: model -> augmented graph -> statistics -> scores -> masks -> training -> patched model.
"""
from fps_graph._version import __version__
from fps_graph.errors import DataError, FpsGraphError, ModelError, OptionError, RuntimeFailure

__all__ = ["FpsGraphError", "DataError", "ModelError", "OptionError", "RuntimeFailure", "__version__"]
