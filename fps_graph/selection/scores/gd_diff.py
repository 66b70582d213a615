"""gd-diff: |W| * |E_data|x| - E_anchor|x||: the inputs whose statistic moved between the pre-training domain (the
anchor) and the task data, in either direction (GD-FPS's ratio only rewards growth; docs/quality.md)."""
from __future__ import annotations

import numpy as np

from fps_graph.selection.scores._registry import ScoreContext, register


@register("gd-diff", stat="mean-abs", anchor=True, order=8,
          help="|W| * |E_data|x| - E_anchor|x||: inputs that moved from the anchor, either way (needs --anchor)")
def gd_diff(ctx: ScoreContext) -> np.ndarray:
    """|W| times the absolute change of the statistic from the anchor."""
    return ctx.abs_weight() * np.abs(ctx.act() - ctx.anchor_act())
