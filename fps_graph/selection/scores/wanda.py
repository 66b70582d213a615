"""wanda: |W| * sqrt(E x_i^2), the pruning metric of Wanda (Sun et al., 2023) read as a selection score."""
from __future__ import annotations

from fps_graph.selection.scores._registry import ScoreContext, WeightTimes, register


@register("wanda", stat="l2", own_stat=True, order=1, help="|W| * sqrt(E x^2) (Wanda's statistic)")
def wanda(ctx: ScoreContext) -> WeightTimes:
    """|W| times the root-mean-square input."""
    return ctx.weight_times(ctx.act())
