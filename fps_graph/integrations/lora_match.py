"""LoRA at the same trainable count as a sparse selection, module by module.

A LoRA adapter of rank ``r`` on an ``nn.Linear`` with ``in`` inputs and ``out`` outputs trains
``r * (in + out)`` values (A: ``r x in``, B: ``out x r``). To compare it with a selection of ``n`` entries of
the same weight, each module gets ``r = max(1, round(n / (in + out)))``: the counts then agree within half of
``in + out`` per module, the finest step LoRA allows. A selection smaller than ``(in + out) / 2`` on a module
cannot be matched (LoRA's smallest adapter, rank 1, is larger); ``LoraMatch.unmatched`` lists those modules, so a
comparison can say so rather than compare unequal counts silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass(frozen=True)
class LoraMatch:
    """Per module (the weight key without ``.weight``): LoRA rank, LoRA's count and the selection's count."""

    ranks: dict[str, int]
    lora_counts: dict[str, int]
    sparse_counts: dict[str, int]
    unmatched: tuple[str, ...] = field(default=())

    @property
    def lora_total(self) -> int:
        return int(sum(self.lora_counts.values()))

    @property
    def sparse_total(self) -> int:
        return int(sum(self.sparse_counts.values()))

    def peft_kwargs(self, alpha_ratio: float = 2.0) -> dict:
        """``LoraConfig`` arguments: target modules by exact name, ``rank_pattern`` and ``alpha_pattern``
        (alpha = ``alpha_ratio * r``, so the LoRA scale alpha / r is the same for every module)."""
        r0 = max(self.ranks.values())
        return {"r": r0, "lora_alpha": alpha_ratio * r0, "target_modules": sorted(self.ranks),
                "rank_pattern": dict(self.ranks),
                "alpha_pattern": {n: alpha_ratio * r for n, r in self.ranks.items()}}


def match_lora(counts: Mapping[str, int], shapes: Mapping[str, Sequence[int]]) -> LoraMatch:
    """Ranks that give LoRA each weight's selected count: counts and shapes ([out, in]) keyed by weight name
    (``model.layers.0.self_attn.q_proj.weight``); the result is keyed by module name (``...q_proj``)."""
    ranks, lora, sparse, unmatched = {}, {}, {}, []
    for key, n in counts.items():
        shape = tuple(int(d) for d in shapes[key])
        if len(shape) != 2:
            raise ValueError(f"{key}: LoRA adapts 2-D Linear weights, not shape {list(shape)}")
        out_f, in_f = shape
        module = key[:-len(".weight")] if key.endswith(".weight") else key
        per_rank = in_f + out_f
        r = max(1, int(round(int(n) / per_rank)))
        if int(n) * 2 < per_rank:
            unmatched.append(module)
        ranks[module] = r
        lora[module] = r * per_rank
        sparse[module] = int(n)
    return LoraMatch(ranks, lora, sparse, tuple(sorted(unmatched)))


__all__ = ["LoraMatch", "match_lora"]
