"""Deprecated path: statistics moved to ``fps_graph.formats.stats`` (below runtime/ and selection/), the Conv and
ConvTranspose window sums to ``fps_graph.runtime.windows``. Importing a name from here still works, with a
DeprecationWarning."""
from fps_graph._moved import moved

__getattr__ = moved(__name__, {
    "Stats": "fps_graph.formats.stats:Stats", "load_merged": "fps_graph.formats.stats:load_merged",
    "STATS_FORMAT": "fps_graph.formats.stats:STATS_FORMAT", "STATS_VERSION": "fps_graph.formats.stats:STATS_VERSION",
    **{name: f"fps_graph.runtime.windows:{name}" for name in (
        "conv_pads", "conv_window_sums", "conv_transpose_crop", "conv_transpose_window_sums")},
})
