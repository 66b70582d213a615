"""A model's scored layers, grouped by the weight they read and named: what `select`, `inspect` and `apply` share.

``make_plan`` loads a model, finds its scored layers (graph/layers.py), filters them by name, names every weight
(graph/names.py), and groups the layers by stored weight: a weight read by several nodes (tied weights) is one
group, and a weight stored once per If branch (the same values under one PyTorch name, as some mergers leave it)
is one group too, so the statistics of every copy's layers pool into one mask entry and ``apply`` patches every
copy by name.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fps_graph.errors import OptionError
from fps_graph.graph.inventory import Inventory, inventory, layer_record, name_the_rest
from fps_graph.graph.discover import find_layers
from fps_graph.graph.layers import Layer, Skipped
from fps_graph.graph.model import OnnxModel, load_model
from fps_graph.graph.names import NameInfo, resolve_names

__all__ = ["Plan", "WeightGroup", "group_by_weight", "merge_copies", "make_plan"]


@dataclass
class WeightGroup:
    """One stored weight and the scored nodes that read it (the first one defines the canonical layout)."""

    weight: str
    layers: list[Layer]

    @property
    def primary(self) -> Layer:
        """The first consumer in graph order."""
        return self.layers[0]

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.primary.stored_shape))


def group_by_weight(layers: list[Layer]) -> list[WeightGroup]:
    """Weights in order of first use, each with its consumers."""
    groups: dict[str, WeightGroup] = {}
    for layer in layers:
        groups.setdefault(layer.weight, WeightGroup(layer.weight, [])).layers.append(layer)
    return list(groups.values())


def merge_copies(groups: list[WeightGroup], names: dict[str, NameInfo]) -> list[WeightGroup]:
    """Groups whose weights share a key joined into the first one (its weight stays the primary copy).

    ``names.resolve_names`` names a stored constant that holds the same values, in the same layout, as another one
    with the other's PyTorch name (``how`` says "copy of"); here their groups become one.
    """
    by_key: dict[str, WeightGroup] = {}
    out: list[WeightGroup] = []
    for group in groups:
        key = names[group.weight].key
        first = by_key.get(key)
        if first is None:
            by_key[key] = group
            out.append(group)
        else:
            first.layers.extend(group.layers)
    return out


@dataclass
class Plan:
    """A loaded model, its scored layers grouped by weight, names, and what was skipped."""

    model: OnnxModel
    layers: list[Layer]
    groups: list[WeightGroup]
    names: dict[str, NameInfo]
    skipped: list[Skipped]
    data: dict[str, dict[str, Any]] = field(default_factory=dict)   # label -> Source.record() of the data read

    def inventory(self) -> Inventory:
        """The share of the model's weight values scored now, and what is not (graph/inventory.py)."""
        return inventory(self.model, self.layers, self.skipped)


def _matches(patterns: Sequence[str], names: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def _check_patterns(include: Sequence[str], exclude: Sequence[str], ids: list[list[str]]) -> None:
    """Refuse an include/exclude glob that matches no scored layer (a pattern must match a whole name: the
    PyTorch name, the ONNX weight or the node), naming a near match or a pattern that would match."""
    every = sorted({n for group in ids for n in group if n})
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for pat in patterns:
            if any(fnmatch.fnmatchcase(n, pat) for n in every):
                continue
            loose = f"*{pat.strip('*')}*"
            hits = [n for n in every if fnmatch.fnmatchcase(n, loose)]
            close = difflib.get_close_matches(pat, every, n=1, cutoff=0.5)
            hint = (f"; did you mean {loose!r} (matches {hits[0]}{' ...' if len(hits) > 1 else ''})?" if hits
                    else f"; did you mean {close[0]!r}?" if close else "")
            raise OptionError(f"{flag} {pat!r} matches no scored layer: a pattern must match a whole name (PyTorch "
                              f"name, ONNX weight or node; fps-graph inspect lists them){hint}")


def make_plan(model_path: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = (),
              state_dict: dict[str, np.ndarray] | None = None) -> Plan:
    """Load a model and find, filter and name its scored layers.

    Args:
        model_path: the ONNX file.
        include, exclude: globs matched against a layer's PyTorch name, weight name and node name.
        state_dict: arrays to name weights by value where the graph does not say (graph/names.py).

    Returns:
        The ``Plan``; filtered-out layers are in ``skipped`` with the reason.
    """
    model = load_model(model_path)
    layers, skipped = find_layers(model)
    names = resolve_names(model, layers, state_dict)
    _check_patterns(include, exclude, [[names[layer.weight].key, layer.weight, layer.node] for layer in layers])
    kept = []
    for layer in layers:
        ids = [names[layer.weight].key, layer.weight, layer.node]
        if include and not _matches(include, ids):
            skipped.append(layer_record(model, layer, "not matched by --include"))
        elif exclude and _matches(exclude, ids):
            skipped.append(layer_record(model, layer, "matched by --exclude"))
        else:
            kept.append(layer)
    skipped.extend(name_the_rest(model, kept, skipped))     # every weight-like constant is scored or named
    groups = merge_copies(group_by_weight(kept), names)    # a weight stored once per If branch: one entry
    return Plan(model, kept, groups, {layer.weight: names[layer.weight] for layer in kept}, skipped)
