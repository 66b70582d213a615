"""One honest account of what trains, for every adapter: the adapter's own values (selected entries, LoRA
factors), what trains in full and why, and how that compares with full fine-tuning.

The numbers add up by construction: ``trainable = adapter_values + full_values``, ``full_values`` is the sum of
``full_by_reason``, and every trained tensor is counted once (a tied tensor is one tensor). The masks' own count
is kept apart: entries the masks select inside a tensor that trains in full anyway (the head, by default) are
``selected_in_full``, not counted twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainableSummary", "state_memory"]


@dataclass(frozen=True)
class TrainableSummary:
    """What trains in a model, counted once.

    Attributes:
        kind: the adapter ('sparse', 'lora', 'full').
        adapter_values: the adapter's own trained values (sparse deltas' entries, LoRA's A and B).
        adapter_tensors: how many tensors carry them (masked weights, adapted modules).
        trained_in_full: {parameter name: reason} for tensors trained in full (reasons: full.REASONS).
        full_by_reason: values trained in full per reason.
        full_finetune: the model's parameter count (tied tensors once): what full fine-tuning trains.
        masks_selected: the masks' own entry count (sparse), else 0.
        selected_in_full: {tensor: entries} the masks select inside tensors that train in full anyway.
        head: the task head's record (heads.HeadInfo.to_json()), or None.
        head_trains: 'full', 'adapter' (only its selected entries / adapter values) or 'frozen'; None without a head.
    """

    kind: str
    adapter_values: int
    adapter_tensors: int
    trained_in_full: dict[str, str]
    full_by_reason: dict[str, int]
    full_finetune: int
    masks_selected: int = 0
    selected_in_full: dict[str, int] = field(default_factory=dict)
    head: dict[str, Any] | None = None
    head_trains: str | None = None

    @property
    def full_values(self) -> int:
        return int(sum(self.full_by_reason.values()))

    @property
    def trainable(self) -> int:
        return self.adapter_values + self.full_values

    def to_json(self) -> dict[str, Any]:
        """The metrics' 'trainable' record (the sparse names 'selected' and 'sparse_tensors' kept for readers)."""
        sparse = self.kind == "sparse"
        return {"kind": self.kind, "adapter_values": self.adapter_values, "adapter_tensors": self.adapter_tensors,
                "selected": self.adapter_values if sparse else 0,
                "sparse_tensors": self.adapter_tensors if sparse else 0,
                "full_tensors": self.full_values, "full_tensor_count": len(self.trained_in_full),
                "trainable": self.trainable, "full_finetune": self.full_finetune,
                "fraction": self.trainable / self.full_finetune if self.full_finetune else 0.0,
                "masks_selected": self.masks_selected, "selected_in_full": dict(self.selected_in_full),
                "full_by_reason": dict(self.full_by_reason), "trained_in_full": dict(self.trained_in_full),
                "head": self.head, "head_trains": self.head_trains}


def state_memory(summary: TrainableSummary, optimizer: str) -> dict[str, float]:
    """Bytes of training state beyond the frozen model (trainable copies, gradients, optimiser moments; indices and
    start values for sparse deltas), for this run and for full fine-tuning with the same optimiser; in MB."""
    moments = 2 if optimizer in ("adam", "adamw") else 0
    per_value = 4 * (1 + 1 + moments)                       # the value (or its start copy), gradient, moments
    extra = 8 + 4 if summary.kind == "sparse" else 0        # a delta's int64 index and float32 start value
    full_each = 4 * (1 + moments) if summary.kind == "full" else per_value   # full fine-tuning keeps no start copy
    run = summary.adapter_values * (per_value + extra) + summary.full_values * full_each
    full = summary.full_finetune * 4 * (1 + moments)
    return {"adapter_mb": round(run / 2 ** 20, 3), "sparse_mb": round(run / 2 ** 20, 3),
            "full_finetune_mb": round(full / 2 ** 20, 3)}
