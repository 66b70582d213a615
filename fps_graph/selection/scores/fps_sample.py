"""fps-sample: K entries per neuron drawn without replacement with probability proportional to the FPS score (seeded),
instead of the K largest: keeps FPS's preference but, like a random mask, spreads the entries (docs/quality.md)."""
from __future__ import annotations

import numpy as np

from fps_graph.selection.scores._registry import ScoreContext, register


@register("fps-sample", stat="mean-abs", sample=True, order=6,
          help="K per neuron drawn in proportion to the FPS score (seeded)")
def fps_sample(ctx: ScoreContext) -> np.ndarray:
    """|W| * E|x| as the weights of the draw."""
    return ctx.abs_weight() * ctx.act()
