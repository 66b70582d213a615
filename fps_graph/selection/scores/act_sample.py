"""act-sample: drawn in proportion to the input's root-mean-square activation alone (docs/quality.md).

The gradient of a weight is the (back-propagated error) x (its input), so the input's scale bounds how fast that
entry can move, while |W| (a pruning criterion) says nothing about it.
"""
from __future__ import annotations

import numpy as np

from fps_graph.selection.scores._registry import ScoreContext, register


@register("act-sample", stat="l2", sample=True, order=7,
          help="drawn in proportion to the input's rms alone (seeded)")
def act_sample(ctx: ScoreContext) -> np.ndarray:
    """sqrt(E x^2) of each input, the same for every neuron, as the weights of the draw."""
    return np.broadcast_to(ctx.act(), ctx.shape)
