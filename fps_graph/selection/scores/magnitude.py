"""magnitude: |W| alone, needing no data (a baseline: what FPS adds over it is the activation statistic)."""
from __future__ import annotations

from fps_graph.selection.scores._registry import ScoreContext, WeightTimes, register


@register("magnitude", order=2, help="|W| alone (no data needed)")
def magnitude(ctx: ScoreContext) -> WeightTimes:
    """|W|."""
    return ctx.weight_times(None)
