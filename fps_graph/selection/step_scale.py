"""Per-entry step sizes from the statistics `select` measured: why FPS needs them, and what the masks carry.

A trained entry ``W[o, i]`` changes its neuron's pre-activation by ``delta * x_i``. With Adam(W), every trainable
entry moves by about the learning rate per step whatever its gradient's size, so an entry on an input feature
with a 100x larger mean ``|x_i|`` moves its output 100x more. FPS ranks by ``|W| * E|x_i|``, so on a pretrained
language model it puts a layer's entries on the few outlier features (SmolLM2-135M, layer 0's gate projection:
80 of 576 input features; one feature in 1,463 of 1,536 rows): at a learning rate that suits random entries,
training the FPS selection collapsed below training the head alone (issue 16, docs/quality.md).

The fix is the reparametrisation ``delta_i = c_i * theta_i`` with ``c_i = min(1, ref / s_i)``, ``s_i`` the
statistic of entry i's input feature and ``ref`` the median statistic over the weight's input features: with
Adam, entry i's effect on its output then grows like ``ref`` instead of ``s_i``, so no entry moves its output
faster than an entry on a typical input would (entries on small inputs keep c = 1: never faster than the learning
rate). `select` writes ``s_i`` per selected entry and ``ref`` per weight into the masks file; training
(``fps_graph.training.sparse.attach``) turns them into ``c_i``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def entry_scales(stat: np.ndarray, canonical_shape: Sequence[int], positions: np.ndarray) -> tuple[np.ndarray, float]:
    """The statistic of each selected entry's input (flat positions in the canonical [out, fan_in] layout), and
    the weight's reference: the median of the statistic over its input connections."""
    out_f, fan_in = (int(d) for d in canonical_shape)
    full = np.broadcast_to(np.asarray(stat, dtype=np.float64), (out_f, fan_in))   # a view: no copy
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    entry = full[pos // fan_in, pos % fan_in].astype(np.float32)
    base = np.asarray(stat, dtype=np.float64)
    ref = float(np.median(base)) if base.size else 0.0
    return entry, ref


def step_factors(entry: np.ndarray, ref: float) -> np.ndarray:
    """Per-entry step factors c = min(1, ref / s) (float32); an input that never moved (s = 0) keeps c = 1."""
    s = np.asarray(entry, dtype=np.float64)
    c = np.ones_like(s)
    pos = s > 0
    c[pos] = np.minimum(1.0, ref / s[pos])
    return c.astype(np.float32)


__all__ = ["entry_scales", "step_factors"]
