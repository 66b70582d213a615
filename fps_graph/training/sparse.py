"""Masked (sparse) fine-tuning in PyTorch: frozen dense weights plus a trained 1-D delta over the selected entries.

``attach(model, masks)`` registers, on every masked weight, a parametrization that computes
``W + scatter(delta)`` from the frozen ``W`` and a float32 ``delta`` with one value per selected entry. Only the
deltas and the tensors trained in full (by default, as in GPS: the biases of the masked layers and the classifier
head) require gradients, so an optimiser built from ``handle.trainable_parameters()`` keeps state for nothing
else, and weight decay, momentum and clipping cannot touch unselected entries.

``model.state_dict()`` keeps the model's own names while attached: masked weights appear under their usual key
with their effective (fine-tuned) value, and loading such a state dict sets the weight and clears its delta.
"""
from __future__ import annotations

import difflib
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from safetensors.torch import save_file
from torch.nn.utils import parametrize

from fps_graph._version import __version__
from fps_graph.formats.delta import DeltaFile, FullEntry, SparseEntry, read_delta, write_delta
from fps_graph.formats.io import atomic_output, save_safetensors, sha256_file
from fps_graph.formats.masks import load_indices, load_input_scales, read_metadata
from fps_graph.errors import DataError, ModelError, OptionError
from fps_graph.graph.names import looks_generated
from fps_graph.selection.step_scale import step_factors
from fps_graph.training.config import StepScale
from fps_graph.training.full import check_globs, is_norm, trained_in_full
from fps_graph.training.heads import (HeadInfo, find_head, get_module, is_transformers, replace_head,
                                      setup_head, transformers_head)
from fps_graph.training.recompute import install as install_rebuilder
from fps_graph.training.rundir import FILES
from fps_graph.training.summary import TrainableSummary



# --------------------------------------------------------------------------------------------------- masks


@dataclass
class MaskSet:
    """Selected flat indices per key (sorted int64), the key shapes where known, and the masks file's records."""

    indices: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...] | None]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<dict>"
    sha256: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)   # per key: each entry's input statistic (select)
    notes: list[str] = field(default_factory=list)      # what align_masks changed (attach reports them)


def load_mask_set(masks: str | os.PathLike | Mapping[str, Any] | MaskSet) -> MaskSet:
    """Masks from a masks file, or from a dict of bool masks / flat index arrays (numpy or torch)."""
    if isinstance(masks, MaskSet):
        return masks
    if isinstance(masks, (str, os.PathLike)):
        meta = read_metadata(masks)
        indices = load_indices(masks)
        tensors = meta.get("tensors") or {}
        shapes = {k: tuple(int(d) for d in tensors[k]["shape"]) if k in tensors else None for k in indices}
        # file indices are sorted and unique, so the per-entry scales stay aligned with them
        return MaskSet({k: np.unique(v) for k, v in indices.items()}, shapes,
                       {k: tensors.get(k, {}) for k in indices}, str(masks), sha256_file(masks), meta,
                       load_input_scales(masks))
    if not isinstance(masks, Mapping):
        raise DataError(f"masks must be a masks file or a dict of arrays, not {type(masks).__name__}")
    indices, shapes = {}, {}
    for key, arr in masks.items():
        a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        if a.dtype == bool:
            indices[key] = np.flatnonzero(a.reshape(-1)).astype(np.int64)
            shapes[key] = tuple(a.shape)
        elif a.dtype.kind in "iu" and a.ndim == 1:
            indices[key] = np.unique(a.astype(np.int64))
            shapes[key] = None
        else:
            raise DataError(f"mask {key!r}: expected a bool mask or 1-D integer indices, got {a.dtype.name} "
                                f"of shape {list(a.shape)}")
    return MaskSet(indices, shapes)


def canonical_masks(model: nn.Module, masks: str | os.PathLike | Mapping[str, Any] | MaskSet) -> MaskSet:
    """The masks under this model's names (``align_masks``): a tied tensor under one key, indices united."""
    return align_masks(model, load_mask_set(masks))


def tied_aliases(model: nn.Module, keys: Iterable[str]) -> dict[str, list[str]]:
    """For each key naming a tied tensor (one Parameter under several names), its other names."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for key in keys:
        if key in params and len(names[id(params[key])]) > 1:
            out[key] = [n for n in names[id(params[key])] if n != key]
    return out


def align_masks(model: nn.Module, ms: MaskSet) -> MaskSet:
    """Mask keys as this model names its tensors (the one key every stage uses for a tied tensor):

    * a tied tensor takes its first name in ``named_parameters(remove_duplicate=False)`` (for a tied LM head,
      the input embedding, ``model.embed_tokens.weight``); masks under several of its names are united;
    * a transformers model: a key of the base model (``encoder.layer.0...``, a feature-extraction export) gets the
      model's ``base_model_prefix`` (``bert.encoder.layer.0...``) when only that names a parameter, and loses it in
      the other direction;
    * a transformers model without an LM head (seq-cls, base): masks selected on the LM head of a causal-LM export
      (a MatMul/Gemm over the vocabulary matrix: ``lm_head.weight``, or the tied embedding used as the head) are
      left out, with a note: the model replaced that head with its own.
    Keys naming nothing stay as they are (``attach`` then refuses them by name). What changed is said in the
    returned set's ``notes`` (``attach`` adds them to the handle's)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    canon: dict[str, str] = {}
    for n, p in params.items():
        canon[n] = first.setdefault(id(p), n)
    transformers_model = is_transformers(model)
    prefix = str(getattr(model, "base_model_prefix", "") or "") if transformers_model else ""
    no_lm_head = transformers_model and model.get_output_embeddings() is None
    emb = model.get_input_embeddings() if transformers_model else None
    emb_name = next((n for n, p in params.items() if emb is not None and p is getattr(emb, "weight", None)), None)
    vocab = int(getattr(emb, "num_embeddings", 0) or 0)
    groups: dict[str, list[str]] = {}
    dropped: list[str] = []
    for key in ms.indices:
        k = key
        if k not in params and prefix:
            if f"{prefix}.{k}" in params:
                k = f"{prefix}.{k}"
            elif k.startswith(prefix + ".") and k[len(prefix) + 1:] in params:
                k = k[len(prefix) + 1:]
        rec = ms.info.get(key) or {}
        as_head = rec.get("op") in ("MatMul", "Gemm") and (ms.shapes.get(key) or (0,))[0] == vocab and vocab > 0
        if no_lm_head and as_head and (k not in params or canon[k] == emb_name):
            dropped.append(key)
            continue
        groups.setdefault(canon.get(k, k), []).append(key)
    notes = list(ms.notes)
    if dropped:
        notes.append(f"left out {', '.join(dropped)}: selected on the LM head of a causal-LM export; this "
                     f"{type(model).__name__} has no LM head (its own head trains instead)")
    if not dropped and all(len(v) == 1 and v[0] == k for k, v in groups.items()):
        return ms
    indices, shapes, info, scales = {}, {}, {}, {}
    for k, group in groups.items():
        indices[k], first_at = np.unique(np.concatenate([ms.indices[g] for g in group]), return_index=True)
        if all(g in ms.scales for g in group):     # a united entry keeps the statistic of its first occurrence
            scales[k] = np.concatenate([ms.scales[g] for g in group])[first_at]
        shapes[k] = next((ms.shapes[g] for g in group if ms.shapes.get(g) is not None), None)
        info[k] = dict(next((ms.info[g] for g in group if ms.info.get(g)), {}))
        if group != [k]:
            info[k]["mask_key"] = group[0]       # the name select wrote (what --include/--exclude match)
    moved = sorted(f"{g} -> {k}" for k, group in groups.items() for g in group if g != k)
    if moved:
        notes.append(f"mask keys renamed to this model's names: {', '.join(moved[:3])}"
                     + (f" (and {len(moved) - 3} more)" if len(moved) > 3 else ""))
    return MaskSet(indices, shapes, info, ms.source, ms.sha256, ms.metadata, scales, notes)



# ---------------------------------------------------------------------------------------- parametrization


class SparseDelta(nn.Module):
    """Parametrization W -> W + scatter(step * delta) over fixed flat indices (row-major, the weight's own layout).

    ``step`` (optional, per entry, fixed): the reparametrisation of fps_graph/selection/step_scale.py; the trained
    parameter is ``delta``, the change to the weight is ``effective() = step * delta``."""

    def __init__(self, index: torch.Tensor, shape: Sequence[int], step: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("index", index.to(torch.int64), persistent=False)
        self.register_buffer("step", None if step is None else step.to(torch.float32).reshape(-1), persistent=False)
        self.delta = nn.Parameter(torch.zeros(index.numel(), dtype=torch.float32, device=index.device))
        self.shape = tuple(int(d) for d in shape)
        self.merged = False
        self.rebuilder: Any = None       # fps_graph.training.recompute.Rebuilder: W' is rebuilt, not saved

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return weight
        out = self._materialise(weight)
        if self.rebuilder is not None:
            self.rebuilder.note(out, lambda: self._materialise(weight), self.delta)
        return out

    def effective(self) -> torch.Tensor:
        """The change to the selected entries: step * delta (delta itself without a step)."""
        return self.delta if self.step is None else self.delta * self.step

    def _materialise(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(-1)
        return flat.index_put((self.index,), self.effective().to(weight.dtype), accumulate=True).view(weight.shape)

    def extra_repr(self) -> str:
        return (f"selected={self.index.numel()}, shape={list(self.shape)}, merged={self.merged}, "
                f"step={'none' if self.step is None else 'per entry'}")


# ------------------------------------------------------------------------------------------------ handle


class SparseFineTune:
    """What `attach` returns: the deltas and fully trained tensors of a model, and the ways to save or fold them."""

    kind = "sparse"

    def __init__(self, model: nn.Module):
        self.model = model
        self.deltas: dict[str, SparseDelta] = {}
        self.full: dict[str, nn.Parameter] = {}
        self.full_reason: dict[str, str] = {}
        self.head: HeadInfo | None = None
        self.superseded: list[str] = []
        self.notes: list[str] = []
        self.masks: MaskSet | None = None
        self.full_finetune_params = 0
        self._originals: dict[str, nn.Parameter] = {}
        self._owners: dict[str, list[tuple[nn.Module, str]]] = {}
        self._base_sparse: dict[str, torch.Tensor] = {}
        self._base_full: dict[str, torch.Tensor] = {}
        self._saved_merge: dict[str, torch.Tensor] = {}
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._hooks: list[Any] = []
        self._own_order: dict[int, list[str]] = {}
        self._frozen_norms: list[nn.Module] = []
        self.aliases: dict[str, list[str]] = {}     # key of a tied tensor -> its other names (align_masks)
        self.merged = False
        self.attached = True

    # ---- what trains

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The deltas, then the fully trained tensors: the only parameters an optimiser should see."""
        return [d.delta for d in self.deltas.values()] + list(self.full.values())

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by name: '<key>:delta' for deltas, the state_dict name for full tensors."""
        out = {f"{k}:delta": d.delta for k, d in self.deltas.items()}
        out.update(self.full)
        return out

    def owners(self, key: str) -> list[tuple[nn.Module, str]]:
        """The (module, attribute) pairs that hold the masked weight `key` (several for a tied weight)."""
        return list(self._owners[key])

    def summary(self) -> TrainableSummary:
        """What trains, counted once (see fps_graph.training.summary)."""
        indices = self.masks.indices if self.masks else {}
        by_reason: dict[str, int] = {}
        seen: set[int] = set()
        for name, p in self.full.items():
            if id(p) in seen:
                continue
            seen.add(id(p))
            reason = self.full_reason.get(name, "") or "train-full"
            by_reason[reason] = by_reason.get(reason, 0) + int(p.numel())
        head_trains = None
        if self.head is not None:
            prefix = self.head.name + "."
            if any(r == "head" for r in self.full_reason.values()):
                head_trains = "full"
            elif any(k.startswith(prefix) for k in self.deltas):
                head_trains = "adapter"
            else:
                head_trains = "frozen"
        return TrainableSummary(
            kind=self.kind, adapter_values=int(sum(d.delta.numel() for d in self.deltas.values())),
            adapter_tensors=len(self.deltas), trained_in_full={k: self.full_reason.get(k, "") for k in self.full},
            full_by_reason=by_reason, full_finetune=int(self.full_finetune_params),
            masks_selected=int(sum(np.asarray(v).size for v in indices.values())),
            selected_in_full={k: int(np.asarray(indices[k]).size) for k in self.superseded if k in indices},
            head=self.head.to_json() if self.head else None, head_trains=head_trains)

    def counts(self) -> dict[str, Any]:
        """Numbers of trainable values (selection, full tensors) and of full fine-tuning's trainable values."""
        selected = int(sum(d.delta.numel() for d in self.deltas.values()))
        full = int(sum(p.numel() for p in self.full.values()))
        total = selected + full
        return {"selected": selected, "full_tensors": full, "trainable": total,
                "full_finetune": self.full_finetune_params,
                "fraction": total / self.full_finetune_params if self.full_finetune_params else 0.0,
                "sparse_tensors": len(self.deltas), "full_tensor_names": sorted(self.full)}

    def train(self, mode: bool = True) -> "SparseFineTune":
        """model.train(mode), with frozen normalisation layers kept in eval mode (running statistics frozen)."""
        self.model.train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self

    # ---- merging

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the deltas into the weights (bit-identical to the forward); the forward then uses W as stored."""
        if self.merged:
            return
        for key, d in self.deltas.items():
            w = self._originals[key].data
            saved = w.reshape(-1).index_select(0, d.index).clone()
            self._saved_merge[key] = saved
            w.put_(d.index, saved + d.effective().to(w.dtype))
            d.merged = True
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): restore the weights bit for bit and use the deltas again."""
        if not self.merged:
            return
        for key, d in self.deltas.items():
            self._originals[key].data.put_(d.index, self._saved_merge.pop(key))
            d.merged = False
        self.merged = False

    def detach(self, merge: bool = True) -> nn.Module:
        """Remove the parametrizations (folding the deltas in when merge is true) and restore requires_grad."""
        if not self.attached:
            return self.model
        if merge:
            self.merge()
        else:
            self.unmerge()
        for key in self.deltas:
            for module, attr in self._owners[key]:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        for p in self.full.values():
            p.requires_grad_(True)
        self._saved_merge.clear()
        self.merged = False
        self.attached = False
        return self.model

    # ---- saving

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained values, keyed as in delta.safetensors (see fps_graph.formats.delta): sparse '<key>:indices',
        '<key>:delta', '<key>:base'; full '<key>' (and '<key>:base')."""
        out: dict[str, torch.Tensor] = {}
        for key, d in self.deltas.items():
            out[f"{key}:indices"] = d.index.detach().cpu().to(torch.int32)
            out[f"{key}:delta"] = d.effective().detach().cpu().float().clone()   # what the weight changed by
            out[f"{key}:base"] = self._base_sparse[key].cpu().float().clone()
        for key, p in self.full.items():
            out[key] = p.detach().cpu().clone()
            if key in self._base_full:
                out[f"{key}:base"] = self._base_full[key].cpu().clone()
        return out

    def tensor_records(self) -> dict[str, dict[str, Any]]:
        """Per trained tensor: kind, shape, dtype, counts and the ONNX layout the masks file recorded."""
        recs: dict[str, dict[str, Any]] = {}
        info = self.masks.info if self.masks else {}
        for key, d in self.deltas.items():
            w = self._originals[key]
            rec = {"kind": "sparse", "shape": list(w.shape), "dtype": str(w.dtype).replace("torch.", ""),
                   "selected": int(d.delta.numel()), "total": int(w.numel())}
            rec.update(_onnx_record(info.get(key)))
            if key in self.aliases:
                rec["aliases"] = list(self.aliases[key])
            recs[key] = rec
        for key, p in self.full.items():
            rec = {"kind": "full", "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                   "selected": int(p.numel()), "total": int(p.numel()), "reason": self.full_reason.get(key, ""),
                   "has_base": key in self._base_full}
            rec.update(_onnx_record(info.get(key)))
            if key in self.aliases:
                rec["aliases"] = list(self.aliases[key])
            recs[key] = rec
        return recs

    def save(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        """Write delta.safetensors to path (the caller makes it atomic); metadata values become strings."""
        sd = self.delta_state_dict()
        sparse = {k: SparseEntry(sd[f"{k}:indices"].numpy().astype(np.int64), sd[f"{k}:delta"].numpy(),
                                 sd[f"{k}:base"].numpy(), tuple(self._originals[k].shape)) for k in self.deltas}
        full = {k: FullEntry(_np(sd[k]), _np(sd[f"{k}:base"]) if f"{k}:base" in sd else None) for k in self.full}
        meta = dict(metadata or {})
        if self.masks is not None:
            meta.setdefault("masks_sha256", self.masks.sha256 or "")
            meta.setdefault("model_sha256", str(self.masks.metadata.get("model_sha256", "")))
            meta.setdefault("masks_model", str(self.masks.metadata.get("model", "")))
        meta.setdefault("fps_graph_version", __version__)
        prefix = getattr(self.model, "base_model_prefix", "") if is_transformers(self.model) else ""
        if prefix:      # apply matches `bert.encoder...` keys to a base-model export's `encoder...` and back
            meta.setdefault("base_model_prefix", str(prefix))
        write_delta(path, sparse, full, self.tensor_records(), self.head.to_json() if self.head else {}, meta)

    def write_files(self, folder: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
        """The run folder's files of a sparse run: delta.safetensors (atomic, overwritten)."""
        path = Path(folder) / FILES["delta"]
        save_delta(self, path, metadata, force=True)
        return {"delta": str(path)}

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every delta folded in, under the model's own names (detached copies)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor as NumPy (bfloat16 widened to float32, which NumPy lacks)."""
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _onnx_record(rec: dict[str, Any] | None) -> dict[str, Any]:
    if not rec:
        return {}
    out = {}
    for k in ("onnx", "layout", "onnx_shape", "nodes", "op"):
        if k in rec:
            out[k] = rec[k]
    return out


# ------------------------------------------------------------------------------------------------- attach


def attach(model: nn.Module, masks: str | os.PathLike | Mapping[str, Any] | MaskSet | None = None, *,
           head: str | HeadInfo | None = "auto", num_classes: int | None = None, example_input: Any = None,
           train_bias: bool = True, train_head: bool = True, train_norms: bool = False,
           train_embeddings: bool = False, train_full: Sequence[str] = (), seed: int = 0,
           step_scale: StepScale | str = StepScale.INPUT) -> SparseFineTune:
    """Make a model sparse-trainable: freeze every parameter, train a delta over each mask's selected entries.

    masks: a masks file (``fps-graph select``), or {name: bool mask | flat indices}; keys are parameter names.
    None: no selected entries (only what trains in full: the head, biases...).
    head: the classifier module ('auto': for a transformers model the num_labels Linear unless it has an LM head,
    else the last Linear with the model's output size, given example_input, else the last Linear; None: no head;
    a HeadInfo from ``heads.setup_head``: that head, as prepared). num_classes: replace the head with a fresh
    seeded Linear of this size when it differs. Trained in full (``full.trained_in_full``): head (train_head),
    biases of the masked layers (train_bias), normalisation layers (train_norms), position embeddings and class
    tokens (train_embeddings), and parameters matching any glob of train_full. A masked tensor that is also
    trained in full gets no delta (recorded in `superseded`). step_scale 'input' (default): where the masks file
    records each entry's input statistic (``select`` with activation statistics), an entry's delta is
    ``c * theta`` with ``c = min(1, median / its statistic)`` (fps_graph/selection/step_scale.py: with Adam no entry
    then moves its output faster than one on a typical input); 'none', or masks without statistics: c = 1.
    """
    try:
        step_scale = StepScale(step_scale)
    except ValueError as exc:
        raise OptionError(f"step_scale {step_scale!r}: use {', '.join(s.value for s in StepScale)}") from exc
    if not isinstance(model, nn.Module):
        raise OptionError(f"attach needs a torch.nn.Module, not {type(model).__name__}")
    ms = load_mask_set(masks) if masks is not None else MaskSet({}, {}, source="<none>")
    if masks is not None and not ms.indices:
        raise DataError(f"{ms.source}: holds no masks")
    handle = SparseFineTune(model)
    ms = align_masks(model, ms)                  # one key per tensor, this model's names
    handle.notes.extend(ms.notes)
    handle.masks = ms if masks is not None else None
    _check_masks(model, ms, head.name if isinstance(head, HeadInfo) and head.replaced else None)
    check_globs(model, train_full)
    tied = tied_aliases(model, [n for n, _ in model.named_parameters(remove_duplicate=False)])  # before parametrizing

    # the head, replaced when the number of classes changes
    if isinstance(head, HeadInfo):
        get_module(model, head.name, "head")
        handle.head = head
    else:
        head_name = head
        if head == "auto":
            head_name = transformers_head(model) if is_transformers(model) else find_head(model, example_input)
            if head_name is None and num_classes is not None:
                raise ModelError("cannot find the classifier head (no nn.Linear with the model's output size); "
                                    "name it with --head")
            if head_name is not None:
                handle.notes.append(f"head: {head_name} (detected)")
        handle.head = setup_head(model, head_name, num_classes, seed=seed, train_head=train_head)

    params = dict(model.named_parameters(remove_duplicate=False))
    full = trained_in_full(model, handle.head, ms.indices, train_head=train_head, train_bias=train_bias,
                           train_norms=train_norms, train_embeddings=train_embeddings, train_full=train_full)

    # freeze everything, remember the flags for detach()
    seen: set[int] = set()
    for p in model.parameters():
        handle._requires_grad.append((p, p.requires_grad))
        p.requires_grad_(False)
        if id(p) not in seen:
            seen.add(id(p))
            handle.full_finetune_params += p.numel()
    order = {n: i for i, n in enumerate(params)}
    first_name: dict[int, str] = {}
    for n, p in params.items():
        first_name.setdefault(id(p), n)
    for n0 in full:
        n = first_name[id(params[n0])]          # a tied tensor: under its first name, once
        if n in handle.full:
            continue
        p = params[n]
        p.requires_grad_(True)
        handle.full[n] = p
        handle.full_reason[n] = full[n0]
        if not (handle.head is not None and handle.head.replaced and full[n0] == "head"):
            handle._base_full[n] = p.detach().clone()

    # deltas on the masked weights not trained in full (shared tensors: one delta for every owner)
    full_ids = {id(p) for p in handle.full.values()}
    steps: list[torch.Tensor] = []
    recorded = str((ms.metadata or {}).get("input_scale", "none"))
    if step_scale is StepScale.INPUT and recorded != "none":
        missing = sorted(k for k in ms.indices if ms.indices[k].size and k not in ms.scales)
        if missing:
            raise DataError(f"{ms.source}: the header says each entry's input scale ({recorded}) was recorded, but "
                            f"the file holds none for {len(missing)} tensors ({', '.join(missing[:3])}): re-run "
                            "`fps-graph select` to write them, or train with --step-scale none")
    for key in sorted(ms.indices, key=order.__getitem__):
        p = params[key]
        if id(p) in full_ids:
            handle.superseded.append(key)
            continue
        owners = [(m, a) for m in model.modules() for a, q in m._parameters.items() if q is p]
        for m, _ in owners:
            handle._own_order.setdefault(id(m), list(m._parameters) + list(m._buffers))
        idx = torch.as_tensor(ms.indices[key], dtype=torch.int64, device=p.device)
        step = None
        ref = (ms.info.get(key) or {}).get("input_scale_ref")
        if step_scale is StepScale.INPUT and key in ms.scales and ref:
            step = torch.from_numpy(step_factors(ms.scales[key], float(ref))).to(p.device)
            steps.append(step)
        sd = SparseDelta(idx, p.shape, step)
        for module, attr in owners:
            if parametrize.is_parametrized(module, attr):
                raise OptionError(f"{key} is parametrized already (attach called twice?)")
            parametrize.register_parametrization(module, attr, sd)
            module.parametrizations[attr].original.requires_grad_(False)
        handle.deltas[key] = sd
        handle._originals[key] = p
        handle._owners[key] = owners
        handle._base_sparse[key] = p.detach().reshape(-1).index_select(0, idx).clone()
    handle.aliases = {k: tied[k] for k in [*handle.deltas, *handle.full] if k in tied}
    if handle.superseded:
        handle.notes.append(f"trained in full instead of sparsely: {', '.join(handle.superseded)}")
    if steps:
        c = torch.cat(steps)
        handle.notes.append(f"per-entry step sizes from the input scale (step_scale=input) on {len(steps)} of "
                            f"{len(handle.deltas)} weights: median {float(c.median()):.3g}, "
                            f"{float((c < 1).float().mean()) * 100:.0f}% of entries slowed")
    _install_state_dict_hooks(handle)
    if handle.deltas:   # W + scatter(delta) is rebuilt in the backward pass instead of saved (recompute.py)
        owners = list({id(m): m for key in handle.deltas for m, _ in handle._owners[key]}.values())
        rebuilder, hooks = install_rebuilder(owners)
        handle._hooks.extend(hooks)
        for d in handle.deltas.values():
            d.rebuilder = rebuilder
    for m in model.modules():
        if is_norm(m) and isinstance(m, nn.modules.batchnorm._NormBase) and \
                not any(p.requires_grad for p in m.parameters(recurse=False)):
            handle._frozen_norms.append(m)
    if not handle.trainable_parameters():
        raise OptionError("nothing to train: the masks select nothing and no tensor is trained in full")
    return handle


def _check_masks(model: nn.Module, ms: MaskSet, new_head: str | None = None) -> None:
    """Every mask key must name a floating-point parameter of the model, with the recorded shape (a replaced head's
    keys name the head the masks were made for: that head is new and trains in full, so they are not checked)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, idx in ms.indices.items():
        if new_head is not None and key.startswith(new_head + ".") and key in params:
            continue
        prefix, _, attr = key.rpartition(".")
        if f"{prefix + '.' if prefix else ''}parametrizations.{attr}.original" in params:
            raise OptionError(f"{key} carries a sparse delta already (attach called twice? detach() first)")
        if key not in params:
            if looks_generated(key):
                raise DataError(
                    f"mask {key!r} ({ms.source}) is keyed by an ONNX initializer name, not a PyTorch parameter name;"
                    " select again with --state-dict WEIGHTS, or export with `fps-graph export` so names are recorded")
            close = difflib.get_close_matches(key, list(params), n=3)
            raise DataError(f"mask {key!r} ({ms.source}) names no parameter of the model"
                                + (f" (did you mean {', '.join(close)}?)" if close else ""))
        p = params[key]
        shape = ms.shapes.get(key)
        if shape is not None and tuple(shape) != tuple(p.shape):
            raise DataError(f"mask {key!r} ({ms.source}) does not fit the model: expected shape "
                                f"{list(p.shape)} (the model's parameter), found {list(shape)} (the mask)")
        if not p.is_floating_point():
            raise DataError(f"mask {key!r}: parameter has dtype {p.dtype}, not floating point")
        if idx.size and (idx[0] < 0 or idx[-1] >= p.numel()):
            raise DataError(f"mask {key!r} ({ms.source}): index {int(idx[-1])} is outside the parameter of shape "
                                f"{list(p.shape)} ({p.numel()} entries)")


def _install_state_dict_hooks(handle: SparseFineTune) -> None:
    """Keep the model's state_dict names: report W + delta as `<module>.<attr>`, load it back into the weight."""
    by_module: dict[int, tuple[nn.Module, list[tuple[str, SparseDelta]]]] = {}
    for key, d in handle.deltas.items():
        for module, attr in handle._owners[key]:
            by_module.setdefault(id(module), (module, []))[1].append((attr, d))
    for module, attrs in by_module.values():
        order = handle._own_order.get(id(module), [])
        handle._hooks.append(module.register_state_dict_post_hook(_make_save_hook(attrs, order)))
        handle._hooks.append(module.register_load_state_dict_pre_hook(_make_load_hook(handle, attrs)))


def _make_save_hook(attrs: list[tuple[str, SparseDelta]], own_order: list[str]) -> Callable:
    """A state_dict post-hook: `<prefix><attr>` = W + delta in place of the parametrization's entries, in the
    module's original key order."""
    rank = {n: i for i, n in enumerate(own_order)}

    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        values = {}
        with torch.no_grad():
            for attr, _ in attrs:
                if f"{prefix}parametrizations.{attr}.original" in state_dict:
                    values[f"{prefix}{attr}"] = getattr(module, attr).detach()
        if not values:
            return
        inner = tuple(f"{prefix}parametrizations.{attr}." for attr, _ in attrs)
        items = [(k, v) for k, v in state_dict.items() if not k.startswith(inner)]
        own = dict(values)
        own.update((k, v) for k, v in items if k.startswith(prefix) and "." not in k[len(prefix):])
        ordered = sorted(own, key=lambda k: rank.get(k[len(prefix):], len(rank)))
        state_dict.clear()
        emitted = False
        for k, v in items:
            if k in own:
                if not emitted:
                    state_dict.update((o, own[o]) for o in ordered)
                    emitted = True
            elif not emitted and k.startswith(prefix):
                state_dict.update((o, own[o]) for o in ordered)
                emitted = True
                state_dict[k] = v
            else:
                state_dict[k] = v
        if not emitted:
            state_dict.update((o, own[o]) for o in ordered)
    return hook


def _make_load_hook(handle: SparseFineTune, attrs: list[tuple[str, SparseDelta]]) -> Callable:
    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for attr, d in attrs:
            k = f"{prefix}{attr}"
            if k not in state_dict:
                continue
            if d.merged:
                handle.unmerge()
            state_dict[f"{prefix}parametrizations.{attr}.original"] = state_dict.pop(k)
            state_dict[f"{prefix}parametrizations.{attr}.0.delta"] = torch.zeros_like(d.delta)
    return hook


# ----------------------------------------------------------------------------------------- delta files


def load_delta(model: nn.Module, delta: str | os.PathLike | DeltaFile, check: bool = True) -> SparseFineTune:
    """Attach a saved delta file to a fresh base model (replacing the head if training did); returns the handle.

    With check, the base model's weights must equal the values training started from (recorded in the file)."""
    df = delta if isinstance(delta, DeltaFile) else read_delta(delta)
    head = df.head or {}
    if head.get("replaced"):
        hm = get_module(model, head["name"], "head")
        if getattr(hm, "in_features", None) != head.get("in_features"):
            raise DataError(f"{df.path}: head {head['name']!r} has {getattr(hm, 'in_features', None)} inputs in "
                                f"this model, {head.get('in_features')} in the delta file")
        if getattr(hm, "out_features", None) != head.get("num_classes"):
            replace_head(model, head["name"], int(head["num_classes"]))
    masks = MaskSet({k: e.indices for k, e in df.sparse.items()}, {k: e.shape for k, e in df.sparse.items()},
                    {k: df.tensors.get(k, {}) for k in df.sparse}, df.path,
                    str(df.metadata.get("masks_sha256", "")) or None,
                    {"model_sha256": df.metadata.get("model_sha256", ""), "model": df.metadata.get("masks_model", "")})
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, e in df.full.items():
        if key not in params:
            raise DataError(f"{df.path}: tensor {key!r} names no parameter of the model")
        if tuple(params[key].shape) != tuple(e.value.shape):
            raise DataError(f"{df.path}: tensor {key!r} does not fit the model: expected shape "
                                f"{list(params[key].shape)} (the model's parameter), found {list(e.value.shape)}")
    if not df.sparse:
        masks.indices = {}
    handle = _attach_exact(model, masks, list(df.full))
    if head:
        handle.head = HeadInfo.from_json(head)
    with torch.no_grad():
        for key, e in df.sparse.items():
            if check and e.base is not None:
                cur = handle._base_sparse[key].float().cpu().numpy()
                if not np.array_equal(cur, e.base.astype(np.float32)):
                    raise DataError(f"{df.path}: {key} of this model does not hold the values training started "
                                        "from (another base model or weights?)")
            handle.deltas[key].delta.copy_(torch.from_numpy(np.ascontiguousarray(e.delta)))
        for key, e in df.full.items():
            p = handle.full[key]
            if check and e.base is not None and key in handle._base_full:
                if not np.array_equal(_np(handle._base_full[key].cpu()), e.base):
                    raise DataError(f"{df.path}: {key} of this model does not hold the values training started "
                                        "from (another base model or weights?)")
            p.copy_(torch.from_numpy(np.ascontiguousarray(e.value)).to(p.dtype))
            if e.base is not None:
                handle._base_full[key] = torch.from_numpy(np.ascontiguousarray(e.base)).to(p.dtype)
            else:
                handle._base_full.pop(key, None)
    return handle


def _attach_exact(model: nn.Module, masks: MaskSet, full_names: Iterable[str]) -> SparseFineTune:
    """attach() with exactly these tensors trained in full and nothing detected."""
    names = [glob.escape(n) for n in full_names]
    return attach(model, masks if masks.indices else None, head=None, train_bias=False, train_head=False,
                  train_full=names, step_scale=StepScale.NONE)


def save_delta(handle: SparseFineTune, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
               force: bool = False) -> None:
    """Write the handle's delta file atomically."""
    with atomic_output(path, force) as tmp:
        handle.save(tmp, metadata)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, force: bool = False,
                    metadata: Mapping[str, str] | None = None) -> None:
    """A state dict as safetensors, atomically, with a canonical header (bfloat16 kept through torch)."""
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_output(path, force) as tmp:
        if any(v.dtype == torch.bfloat16 for v in sd.values()):
            save_file(sd, str(tmp), metadata=dict(metadata or {}))
        else:
            save_safetensors({k: v.numpy() for k, v in sd.items()}, tmp, metadata=dict(metadata or {}))


__all__ = ["attach", "canonical_masks", "load_delta", "save_delta", "save_state_dict", "find_head", "replace_head", "SparseFineTune",
           "SparseDelta", "MaskSet", "load_mask_set", "HeadInfo"]
