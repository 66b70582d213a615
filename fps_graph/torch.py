"""Deprecated path (until round 2 the PyTorch side lived here): use ``fps_graph.attach`` and
``fps_graph.load_delta``. Importing a name from here still works, with a DeprecationWarning."""
from fps_graph._moved import moved

__getattr__ = moved(__name__, {
    "attach": "fps_graph:attach", "load_delta": "fps_graph:load_delta", "SparseFineTune": "fps_graph:SparseFineTune",
})
