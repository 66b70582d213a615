"""The score registry: every ``--score`` is one function in one file of this folder, registered with its properties.

A score function gets a ``ScoreContext`` (one weight: |W|, the activation statistics, the seed) and returns the
float64 [out_features, fan_in] scores of that weight, either whole (an array) or as ``ctx.weight_times(factor)``:
|W| times a per-input factor, made later by blocks of output rows so a large weight never needs a float64 copy.
What the rest of the tool needs to know about a score is declared, never guessed from its name:

* ``stat``: the activation statistic it reads by default ("mean-abs" = E|x|, "l2" = sqrt(E x^2)); None: it needs
  no activations (no calibration data), e.g. magnitude or random;
* ``own_stat``: the statistic is part of the score's definition, so ``--stat`` may not change it (wanda);
* ``anchor``: it compares the data's statistics with an anchor's (the pre-training domain);
* ``sample``: its scores are weights of a seeded draw: the entries are sampled without replacement in proportion
  to them (Efraimidis-Spirakis keys score / E, E ~ Exp(1), seeded per weight), instead of taking the top K;
* ``cover``: it is chosen by the coverage-aware top-K (selection/variants.py) instead of the plain ranking;
* ``seeded``: it draws random numbers (``ctx.rng()``), so ``--seed`` changes it (every ``sample`` score is seeded).

Adding a score: a new file here with one ``@register(...)`` function; the CLI's ``--score`` choices and help come
from this registry.

Example:
    >>> from fps_graph.selection.scores import register
    >>> @register("sq-fps", stat="mean-abs", help="|W|^2 * E|x|")
    ... def sq_fps(ctx):
    ...     return ctx.abs_weight() ** 2 * ctx.act()
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

import numpy as np

from fps_graph.errors import DataError, OptionError
from fps_graph.graph.layers import apply_chain

if TYPE_CHECKING:   # types only
    from fps_graph.formats.stats import Stats
    from fps_graph.graph.model import OnnxModel
    from fps_graph.graph.plan import WeightGroup

__all__ = ["Score", "ScoreContext", "WeightTimes", "register", "get_score", "registered", "exp_keys", "STATS",
           "pooled_mean"]

STATS = ("mean-abs", "l2")


@dataclass(frozen=True)
class WeightTimes:
    """|W| (float64, canonical layout) times ``factor`` (broadcast over rows; None: |W| alone), made by rows."""

    weight: np.ndarray                 # the canonical weight in its own dtype (a view where the layout allows)
    factor: np.ndarray | None


ScoreFn = Callable[["ScoreContext"], Union[np.ndarray, WeightTimes]]


@dataclass(frozen=True)
class Score:
    """A registered score and what it needs (see the module docstring)."""

    name: str
    fn: ScoreFn
    help: str
    stat: str | None = None
    own_stat: bool = False
    anchor: bool = False
    sample: bool = False
    cover: bool = False
    seeded: bool = False
    order: int = 100                   # place in --score's list of choices (then by name)

    @property
    def needs_stats(self) -> bool:
        """Whether the score reads activation statistics (so it needs calibration data)."""
        return self.stat is not None


_REGISTRY: dict[str, Score] = {}


def register(name: str, *, help: str, stat: str | None = None, own_stat: bool = False, anchor: bool = False,
             sample: bool = False, cover: bool = False, seeded: bool = False,
             order: int = 100) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under ``name`` (a decorator; see the module docstring for the properties)."""
    if stat is not None and stat not in STATS:
        raise OptionError(f"score {name!r}: unknown statistic {stat!r} (use {', '.join(STATS)})")
    if anchor and stat is None:
        raise OptionError(f"score {name!r}: an anchor score compares statistics, so it needs a stat")

    def add(fn: ScoreFn) -> ScoreFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise OptionError(f"score {name!r} is registered twice ({_REGISTRY[name].fn.__module__}, {fn.__module__})")
        _REGISTRY[name] = Score(name, fn, help, stat, own_stat, anchor, sample, cover, seeded or sample, order)
        return fn

    return add


def registered() -> tuple[Score, ...]:
    """Every registered score, in listing order."""
    return tuple(sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name)))


def get_score(name: str) -> Score:
    """The registered score called ``name``; an OptionError listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError as exc:
        raise OptionError(f"unknown --score {name!r} (use {', '.join(s.name for s in registered())})") from exc


def exp_keys(seed: int, weight: str, shape: tuple[int, ...]) -> np.ndarray:
    """Exp(1) draws for one weight, seeded by (seed, weight name), in a stream apart from ``random``'s."""
    rng = np.random.default_rng([seed, zlib.crc32(weight.encode()), 1])
    return np.maximum(rng.standard_exponential(shape), np.finfo(np.float64).tiny)


def pooled_mean(group: "WeightGroup", stats: "Stats", stat: str) -> np.ndarray:
    """Per-connection statistic in the primary's canonical layout, pooled over all consumers of the weight.

    A weight read by several scored nodes (tied weights) pools the sums and counts of all its consumers per
    element; a consumer that did not run (the untaken branch of an If) adds zero sums and a zero count.
    """
    kind = {"mean-abs": "abs", "l2": "sq"}[stat]
    if len(group.layers) == 1:
        return group.primary.stat_to_canonical(stats.mean(group.primary.node, stat))
    n = group.size
    sums = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.float64)
    for layer in group.layers:
        if kind not in stats.sums.get(layer.node, {}):
            stats.mean(layer.node, stat)   # raises naming the missing layer
        idx = layer.canonical_index()
        s = np.broadcast_to(layer.stat_to_canonical(stats.sums[layer.node][kind]), idx.shape)
        sums[idx.reshape(-1)] += s.reshape(-1)
        count = stats.counts.get(layer.node, 0.0)     # per value for ConvTranspose taps (runtime/windows.py)
        if np.ndim(count):
            count = np.broadcast_to(layer.stat_to_canonical(count), idx.shape).reshape(-1)
        counts[idx.reshape(-1)] += count
    if not any(stats.reached(layer.node) for layer in group.layers):
        raise DataError(f"weight {group.weight} saw no data (none of its layers ran)")
    pidx = group.primary.canonical_index()
    mean = sums[pidx] / np.maximum(counts[pidx], 1e-300)
    return np.sqrt(mean) if kind == "sq" else mean


class ScoreContext:
    """What a score function may read of one weight; everything is computed on first use.

    Attributes:
        weight (`str`): the stored weight's name (seeds draws per weight).
        shape (`tuple[int, int]`): the canonical [out_features, fan_in] shape the scores must have.
        seed (`int`), eps (`float`): the run's seed and the anchor ratio's epsilon.
    """

    def __init__(self, score: Score, group: "WeightGroup", model: "OnnxModel", stats: "Stats | None",
                 stat: str | None, anchor: "Stats | None", seed: int, eps: float):
        self.score, self._group, self._model = score, group, model
        self._stats, self._anchor, self._stat = stats, anchor, stat or score.stat
        self.weight, self.shape = group.weight, tuple(group.primary.canonical_shape)
        self.seed, self.eps = seed, eps
        self._w: np.ndarray | None = None

    def canonical_weight(self) -> np.ndarray:
        """The weight in its canonical [out, fan_in] layout and its own dtype (a view where the layout allows)."""
        if self._w is None:
            layer = self._group.primary
            self._w = layer.to_canonical(apply_chain(self._model.tensor(layer.weight), layer.chain, values=True,
                                                     model=self._model))
        return self._w

    def abs_weight(self) -> np.ndarray:
        """|W| in float64, canonical layout (a full copy: prefer ``weight_times`` for |W| x factor scores)."""
        return np.abs(self.canonical_weight(), dtype=np.float64)

    def weight_times(self, factor: np.ndarray | None) -> WeightTimes:
        """|W| times a per-input factor (None: |W| alone), made by blocks of rows, bit for bit the full product."""
        return WeightTimes(self.canonical_weight(), None if factor is None else np.asarray(factor, dtype=np.float64))

    def act(self) -> np.ndarray:
        """The data's activation statistic (``--stat``, else the score's own) per connection, broadcastable."""
        if self._stats is None:
            raise OptionError(f"score {self.score.name!r} needs activation statistics")
        return pooled_mean(self._group, self._stats, self._stat)

    def anchor_act(self) -> np.ndarray:
        """The same statistic on the anchor data."""
        if self._anchor is None:
            raise OptionError(f"--score {self.score.name} needs --anchor DATA (or --anchor-stats FILE)")
        return pooled_mean(self._group, self._anchor, self._stat)

    def rng(self) -> np.random.Generator:
        """A generator seeded by (seed, weight name): the same draws on every run and every shard."""
        return np.random.default_rng([self.seed, zlib.crc32(self.weight.encode())])
