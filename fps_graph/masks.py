"""Deprecated path (until round 2 the masks file lived here): use ``fps_graph.load_masks``; the rest moved to
``fps_graph.formats.masks``. Importing a name from here still works, with a DeprecationWarning."""
from fps_graph._moved import moved

__getattr__ = moved(__name__, {
    "load_masks": "fps_graph:load_masks",
    "read_metadata": "fps_graph.formats.masks:read_metadata", "write_masks": "fps_graph.formats.masks:write_masks",
    "load_indices": "fps_graph.formats.masks:load_indices", "data_record": "fps_graph.formats.masks:data_record",
})
