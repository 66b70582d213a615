"""Weights whose layers the calibration data never reached (every consumer sits in an If branch never taken).

FPS ranks a weight by the activations it multiplies; with none seen there is nothing to rank. Such weights are
taken out of the selection and listed as skipped with the reason, and the run warns, rather than failing the whole
selection (silero-vad holds a separate set of weights for each sample rate, one If branch each).
"""
from __future__ import annotations

from fps_graph.graph.inventory import layer_record
from fps_graph.graph.layers import Skipped
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.walk import branch_conditions
from fps_graph.graph.plan import WeightGroup
from fps_graph.formats.stats import Stats


def split_unreached(model: OnnxModel, groups: list[WeightGroup], stats: Stats
                    ) -> tuple[list[WeightGroup], list[Skipped]]:
    """The groups some data reached, and a Skipped weight record for every layer of the others."""
    kept: list[WeightGroup] = []
    dropped: list[Skipped] = []
    for group in groups:
        if any(stats.reached(layer.node) for layer in group.layers):
            kept.append(group)
            continue
        for layer in group.layers:
            where = "; ".join(branch_conditions(model, layer.graph)) or layer.graph or "the main graph"
            dropped.append(layer_record(model, layer, f"no calibration data reached this layer: the If branch "
                                                      f"holding it ({where}) was never taken"))
    return kept, dropped
