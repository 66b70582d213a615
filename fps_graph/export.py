"""Deprecated path (until round 2 the PyTorch -> ONNX export lived here): it moved to
``fps_graph.integrations.torch_export`` (``fps-graph export`` on the command line). Importing a name from here
still works, with a DeprecationWarning."""
from fps_graph._moved import moved

__getattr__ = moved(__name__, {
    "export": "fps_graph.integrations.torch_export:export",
    "build_model": "fps_graph.integrations.torch_export:build_model",
})
