"""gd-fps: |W| * E_data|x_i| / (E_anchor|x_i| + eps): our reading of FPS v2 / GD-FPS, "relative activation growth
against a pre-training anchor" (the paper's exact formula is not public)."""
from __future__ import annotations

from fps_graph.selection.scores._registry import ScoreContext, WeightTimes, register


@register("gd-fps", stat="mean-abs", anchor=True, order=4,
          help="|W| * E_data|x| / (E_anchor|x| + eps): growth against anchor data (needs --anchor)")
def gd_fps(ctx: ScoreContext) -> WeightTimes:
    """|W| times the data's statistic over the anchor's."""
    return ctx.weight_times(ctx.act() / (ctx.anchor_act() + ctx.eps))
