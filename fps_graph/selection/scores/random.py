"""random: uniform [0, 1) scores seeded per weight, needing no data (the baseline of the quality study)."""
from __future__ import annotations

import numpy as np

from fps_graph.selection.scores._registry import ScoreContext, register


@register("random", seeded=True, order=3, help="uniform random, seeded by --seed and the weight's name (no data needed)")
def random(ctx: ScoreContext) -> np.ndarray:
    """Uniform [0, 1) draws, the same on every run with the same seed."""
    return ctx.rng().random(ctx.shape)
