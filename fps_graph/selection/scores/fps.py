"""fps: |W| * E|x_i|, the rule of the FPS paper (arXiv:2510.27359): a connection matters in proportion to its weight's
magnitude and to how large its input is on the task's data."""
from __future__ import annotations

from fps_graph.selection.scores._registry import ScoreContext, WeightTimes, register


@register("fps", stat="mean-abs", order=0, help="|W| * E|x| (the FPS paper's rule; the default)")
def fps(ctx: ScoreContext) -> WeightTimes:
    """|W| times the mean absolute input."""
    return ctx.weight_times(ctx.act())
