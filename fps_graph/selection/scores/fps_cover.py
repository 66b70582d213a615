"""fps-cover: FPS scores, but no input feature (column of the canonical [out, fan_in] weight) is taken by more than
``ceil(COVER_SLACK * chosen / fan_in)`` output neurons of a tensor (evidence in docs/quality.md).

Where the statistic is large for a few inputs, plain top-K per neuron gives every neuron the same few inputs;
trained together those entries can only change the layer along those inputs. The coverage-aware choice itself is
``selection.variants.select_cover``.
"""
from __future__ import annotations

import numpy as np

from fps_graph.selection.scores._registry import ScoreContext, register


@register("fps-cover", stat="mean-abs", cover=True, order=5,
          help="FPS, but no input taken by over 2x its share of a layer's neurons")
def fps_cover(ctx: ScoreContext) -> np.ndarray:
    """|W| * E|x|, whole (the coverage-aware top-K reads every row)."""
    return ctx.abs_weight() * ctx.act()
