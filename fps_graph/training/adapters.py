"""What trains: the adapter, one object per way of fine-tuning, all driven by the same loop (``loop.fit``).

An ``Adapter`` is a frozen description (which entries or modules, what trains in full); ``adapter.attach(model,
head, seed)`` freezes the model, makes the adapter's values trainable and returns a handle (an ``Attached``) with
the trainable parameters, one honest ``summary()`` (``summary.TrainableSummary``), ``train(mode)``, and
``write_files(folder, metadata)`` for the run folder. Kinds (``ADAPTERS``):

- ``sparse``: a trained delta over the selected entries of each masked weight (``fps_graph.training.sparse``);
  ``SparseAdapter(masks=None)`` trains only what trains in full (the head and biases: the floor of the study).
- ``lora``: PEFT's LoRA at a given rank on given modules (peft is imported when used).
- ``full``: every parameter (full fine-tuning, the upper reference).

Beside the adapter's own values, what trains in full follows one rule for every kind (``full.trained_in_full``,
set by a ``TrainsConfig``). A new adapter is one class here with ``kind`` and ``attach``, registered in
``ADAPTERS``.
"""
from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol


from fps_graph.errors import ModelError, OptionError, RuntimeFailure
from fps_graph.training.config import StepScale, TrainsConfig
from fps_graph.training.full import is_norm
from fps_graph.training.heads import HeadInfo
from fps_graph.training.rundir import FILES, write_json
from fps_graph.training.sparse import MaskSet, SparseFineTune, attach, canonical_masks, save_state_dict
from fps_graph.training.summary import TrainableSummary

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Adapter", "Attached", "SparseAdapter", "LoraAdapter", "FullAdapter", "ADAPTERS"]



class Attached(Protocol):
    """What an adapter's attach returns: the handle the loop trains and the run folder is written from."""

    kind: str
    model: "nn.Module"
    head: HeadInfo | None
    notes: list[str]

    def trainable_parameters(self) -> list["torch.nn.Parameter"]: ...

    def named_trainable(self) -> dict[str, "torch.nn.Parameter"]: ...

    def summary(self) -> TrainableSummary: ...

    def train(self, mode: bool = True) -> Any: ...

    def merged_state_dict(self) -> dict[str, "torch.Tensor"]: ...

    def write_files(self, folder: Path, metadata: Mapping[str, Any]) -> dict[str, str]: ...


class Adapter(abc.ABC):
    """A way of fine-tuning: which values train. Subclasses are frozen dataclasses with a ``kind``."""

    kind: ClassVar[str]
    trains: TrainsConfig

    @abc.abstractmethod
    def attach(self, model: "nn.Module", head: HeadInfo | None, seed: int = 0) -> Attached:
        """Freeze the model and make this adapter's values (and what trains in full) trainable."""

    def describe(self) -> dict[str, Any]:
        """The adapter's settings for run_config.json and the delta metadata."""
        return {"kind": self.kind}

    def layer_weights(self, model: "nn.Module") -> list[str]:
        """The weights the adapter adapts (their biases train in full with trains.train_bias)."""
        return []


# ------------------------------------------------------------------------------------------------- sparse


@dataclass(frozen=True)
class SparseAdapter(Adapter):
    """Selected entries of masked weights train as sparse deltas (``fps_graph.training.sparse.attach``).

    Args:
        masks: a masks file, a MaskSet or {name: bool mask | flat indices}; None: no selected entries, only what
            trains in full (head, biases of ``bias_of`` layers...).
        trains: what trains in full beside the deltas.
        step_scale: per-entry step sizes from the input statistics the masks file records (``input``, the
            default: fps_graph/selection/step_scale.py) or none.
    """

    kind: ClassVar[str] = "sparse"
    masks: str | os.PathLike | MaskSet | Mapping[str, Any] | None = None
    trains: TrainsConfig = field(default_factory=TrainsConfig)
    step_scale: StepScale = StepScale.INPUT

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "step_scale", StepScale(self.step_scale))
        except ValueError as exc:
            raise OptionError(f"--step-scale {self.step_scale!r}: use "
                              f"{', '.join(s.value for s in StepScale)}") from exc

    def attach(self, model: "nn.Module", head: HeadInfo | None, seed: int = 0) -> SparseFineTune:
        t = self.trains
        masks = canonical_masks(model, self.masks) if self.masks is not None else None
        return attach(model, masks, head=head, train_bias=t.train_bias, train_head=t.train_head,
                      train_norms=t.train_norms, train_embeddings=t.train_embeddings, train_full=t.train_full,
                      seed=seed, step_scale=self.step_scale)

    def describe(self) -> dict[str, Any]:
        m = self.masks
        return {"kind": self.kind, "masks": str(m) if isinstance(m, (str, os.PathLike)) else
                (getattr(m, "source", "<dict>") if m is not None else None), "step_scale": self.step_scale.value}


# --------------------------------------------------------------------------------------------------- full


class _FullFineTune:
    """Every parameter trains (full fine-tuning); the run folder holds the fine-tuned state dict."""

    kind = "full"

    def __init__(self, model: "nn.Module", head: HeadInfo | None):
        self.model = model
        self.head = head
        self.notes: list[str] = []
        self.full: dict[str, Any] = {}
        seen: set[int] = set()
        for n, p in model.named_parameters():
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            p.requires_grad_(True)
            self.full[n] = p

    def trainable_parameters(self) -> list[Any]:
        return list(self.full.values())

    def named_trainable(self) -> dict[str, Any]:
        return dict(self.full)

    def summary(self) -> TrainableSummary:
        n = int(sum(p.numel() for p in self.full.values()))
        head = None
        if self.head is not None:
            head = "full"
        return TrainableSummary("full", 0, 0, {k: "all" for k in self.full}, {"all": n} if n else {}, n,
                                head=self.head.to_json() if self.head else None, head_trains=head)

    def train(self, mode: bool = True) -> "_FullFineTune":
        self.model.train(mode)
        return self

    def merged_state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def write_files(self, folder: Path, metadata: Mapping[str, Any]) -> dict[str, str]:
        path = folder / FILES["model"]
        save_state_dict(self.merged_state_dict(), path, force=True,
                        metadata={"format": "pt", "fps_graph": json.dumps(dict(metadata), default=str)})
        return {"model": str(path)}


@dataclass(frozen=True)
class FullAdapter(Adapter):
    """Full fine-tuning: every parameter trains (the upper reference of a study)."""

    kind: ClassVar[str] = "full"
    trains: TrainsConfig = field(default_factory=TrainsConfig)

    def attach(self, model: "nn.Module", head: HeadInfo | None, seed: int = 0) -> _FullFineTune:
        return _FullFineTune(model, head)


# --------------------------------------------------------------------------------------------------- LoRA


class _LoraFineTune:
    """PEFT LoRA layers injected in place (``peft.inject_adapter_in_model``); the head trains in full as PEFT's
    ``modules_to_save``; biases of adapted layers as PEFT's ``bias='lora_only'``."""

    kind = "lora"

    def __init__(self, model: "nn.Module", head: HeadInfo | None, config: Any, full_reason: dict[str, str],
                 total: int):
        self.model = model
        self.head = head
        self.config = config
        self.notes: list[str] = []
        self.full_reason = full_reason
        self.full_finetune_params = total
        self._frozen_norms = [m for m in model.modules() if is_norm(m) and hasattr(m, "running_mean")
                              and not any(p.requires_grad for p in m.parameters(recurse=False))]

    def adapter_parameters(self) -> dict[str, Any]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and ".lora_" in n}

    def named_trainable(self) -> dict[str, Any]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[Any]:
        return list(self.named_trainable().values())

    def summary(self) -> TrainableSummary:
        lora = self.adapter_parameters()
        full = {n: p for n, p in self.named_trainable().items() if n not in lora}
        by_reason: dict[str, int] = {}
        named = {}
        for n, p in full.items():
            reason = self.full_reason.get(n, "other")
            named[n] = reason
            by_reason[reason] = by_reason.get(reason, 0) + int(p.numel())
        modules = {n.split(".lora_")[0] for n in lora}
        head_trains = None
        if self.head is not None:
            head_trains = "full" if "head" in by_reason else "frozen"
        return TrainableSummary("lora", int(sum(p.numel() for p in lora.values())), len(modules), named, by_reason,
                                self.full_finetune_params, head=self.head.to_json() if self.head else None,
                                head_trains=head_trains)

    def train(self, mode: bool = True) -> "_LoraFineTune":
        self.model.train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self

    def merged_state_dict(self) -> dict[str, Any]:
        raise OptionError("a LoRA run has no merged state dict here; merge with PEFT (merge_and_unload)")

    def write_files(self, folder: Path, metadata: Mapping[str, Any]) -> dict[str, str]:
        """lora.safetensors (PEFT's adapter state dict: A, B, trained biases and modules_to_save) and
        lora_config.json (the LoraConfig)."""
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.model)
        path, cfg = folder / FILES["lora"], folder / FILES["lora_config"]
        save_state_dict(sd, path, force=True, metadata={"format": "pt"})
        write_json(cfg, {k: (sorted(v) if isinstance(v, set) else v) for k, v in self.config.to_dict().items()})
        return {"lora": str(path), "lora_config": str(cfg)}


@dataclass(frozen=True)
class LoraAdapter(Adapter):
    """LoRA (PEFT) on the given modules: W + (alpha / r) * B A with A: [r, in], B: [out, r] trained.

    Args:
        rank: r for every adapted module, or {module name: r} (a name or a regex, PEFT's rank_pattern) over a
            default of the smallest rank given.
        target_modules: module names or suffixes PEFT adapts (e.g. ("q_proj", "v_proj")).
        alpha: lora_alpha for every module; None: alpha_ratio * the module's rank.
        alpha_ratio: with alpha None, each module's lora_alpha is this times its rank (1: a scale of 1).
        dropout: lora_dropout.
        trains: what trains in full: the head (as PEFT's modules_to_save) and the biases of adapted layers
            (bias='lora_only'); norms, embeddings and globs are refused (PEFT would not save them).
    """

    kind: ClassVar[str] = "lora"
    rank: int | Mapping[str, int] = 8
    target_modules: tuple[str, ...] = ()
    alpha: float | None = None
    alpha_ratio: float = 1.0
    dropout: float = 0.0
    trains: TrainsConfig = field(default_factory=TrainsConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules:
            raise OptionError("LoRA needs target_modules (e.g. ('q_proj', 'v_proj'))")
        ranks = [self.rank] if isinstance(self.rank, int) else list(self.rank.values())
        if not ranks or min(ranks) < 1:
            raise OptionError(f"LoRA rank must be at least 1, got {self.rank}")
        t = self.trains
        if t.train_norms or t.train_embeddings or t.train_full:
            raise OptionError("LoRA trains in full only the head and the biases of adapted layers")

    def attach(self, model: "nn.Module", head: HeadInfo | None, seed: int = 0) -> _LoraFineTune:
        import torch

        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise RuntimeFailure("LoRA needs peft: pip install peft") from exc
        if isinstance(self.rank, int):
            r, pattern = self.rank, {}
        else:
            r, pattern = min(self.rank.values()), dict(self.rank)
        t = self.trains
        to_save = [head.name] if head is not None and t.train_head else None
        alphas = {} if self.alpha is not None else {k: v * self.alpha_ratio for k, v in pattern.items()}
        config = LoraConfig(r=r, rank_pattern=pattern, alpha_pattern=alphas, target_modules=list(self.target_modules),
                            lora_alpha=self.alpha if self.alpha is not None else r * self.alpha_ratio,
                            lora_dropout=self.dropout,
                            bias="lora_only" if t.train_bias else "none", modules_to_save=to_save)
        seen: set[int] = set()
        total = 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)                  # LoRA's A starts random: seeded
            try:
                model = inject_adapter_in_model(config, model)
            except ValueError as exc:
                raise ModelError(f"LoRA cannot adapt {list(self.target_modules)}: {exc}") from exc
        reasons: dict[str, str] = {}
        for n, p in model.named_parameters():
            if not p.requires_grad or ".lora_" in n:
                continue
            reasons[n] = "head" if ".modules_to_save." in n else "bias" if n.endswith("bias") else "other"
        return _LoraFineTune(model, head, config, reasons, total)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank if isinstance(self.rank, int) else dict(self.rank),
                "target_modules": list(self.target_modules), "alpha": self.alpha, "alpha_ratio": self.alpha_ratio,
                "dropout": self.dropout}


ADAPTERS: dict[str, type[Adapter]] = {a.kind: a for a in (SparseAdapter, LoraAdapter, FullAdapter)}
