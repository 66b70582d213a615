"""One mask entry for a weight stored more than once (a copy per If branch, as some mergers leave it).

``names.resolve_names`` gives a stored constant that holds the same values, in the same layout, as another one
with the same PyTorch name that same name (``how`` says "copy of"); here their weight groups become one, so the
statistics of every copy's layers are pooled and the weight is one mask entry. ``apply`` finds and patches every
copy by name.
"""
from __future__ import annotations

from fps_graph.graph.names import NameInfo
from fps_graph.selection.scores import WeightGroup


def merge_copies(groups: list[WeightGroup], names: dict[str, NameInfo]) -> list[WeightGroup]:
    """Groups whose weights share a key joined into the first one (its weight stays the primary copy)."""
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
