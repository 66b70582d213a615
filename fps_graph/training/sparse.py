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
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fps_graph.formats.delta import DeltaFile, FullEntry, SparseEntry, read_delta, write_delta
from fps_graph.errors import FpsGraphError
from fps_graph.graph.names import looks_generated

EMBEDDING_PATTERNS = ("*pos_embed*", "*pos_embedding*", "*position_embedding*", "*position_embeddings*",
                      "*absolute_pos_embed*", "*cls_token*", "*class_token*", "*dist_token*", "*reg_token*",
                      "*register_tokens*", "*class_embedding*")


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


def load_mask_set(masks: str | os.PathLike | Mapping[str, Any] | MaskSet) -> MaskSet:
    """Masks from a masks file, or from a dict of bool masks / flat index arrays (numpy or torch)."""
    if isinstance(masks, MaskSet):
        return masks
    if isinstance(masks, (str, os.PathLike)):
        from fps_graph.formats.io import sha256_file
        from fps_graph.formats.masks import load_indices, read_metadata

        meta = read_metadata(masks)
        indices = load_indices(masks)
        tensors = meta.get("tensors") or {}
        shapes = {k: tuple(int(d) for d in tensors[k]["shape"]) if k in tensors else None for k in indices}
        return MaskSet({k: np.unique(v) for k, v in indices.items()}, shapes,
                       {k: tensors.get(k, {}) for k in indices}, str(masks), sha256_file(masks), meta)
    if not isinstance(masks, Mapping):
        raise FpsGraphError(f"masks must be a masks file or a dict of arrays, not {type(masks).__name__}")
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
            raise FpsGraphError(f"mask {key!r}: expected a bool mask or 1-D integer indices, got {a.dtype.name} "
                                f"of shape {list(a.shape)}")
    return MaskSet(indices, shapes)


# ---------------------------------------------------------------------------------------- parametrization


class SparseDelta(nn.Module):
    """Parametrization W -> W + scatter(delta) over fixed flat indices (row-major, the weight's own layout)."""

    def __init__(self, index: torch.Tensor, shape: Sequence[int]):
        super().__init__()
        self.register_buffer("index", index.to(torch.int64), persistent=False)
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

    def _materialise(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(-1)
        return flat.index_put((self.index,), self.delta.to(weight.dtype), accumulate=True).view(weight.shape)

    def extra_repr(self) -> str:
        return f"selected={self.index.numel()}, shape={list(self.shape)}, merged={self.merged}"


@dataclass
class HeadInfo:
    """The classifier head: its module name, and whether (and from which size) it was replaced."""

    name: str
    replaced: bool = False
    old_classes: int | None = None
    num_classes: int | None = None
    in_features: int | None = None
    bias: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "replaced": self.replaced, "old_classes": self.old_classes,
                "num_classes": self.num_classes, "in_features": self.in_features, "bias": self.bias}


def find_head(model: nn.Module, example_input: Any = None) -> str | None:
    """The last nn.Linear whose out_features equals the model's output size (with an example input), else the
    last nn.Linear; None when there is none."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    if example_input is None:
        return linears[-1][0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
    out = _logits(out)
    n_out = int(out.shape[-1])
    cands = [n for n, m in linears if m.out_features == n_out]
    return cands[-1] if cands else None


def _logits(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, the first of a tuple, or 'logits' of a dict/object."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise FpsGraphError(f"cannot find logits in a model output of type {type(out).__name__}")


def replace_head(model: nn.Module, name: str, num_classes: int, seed: int = 0) -> HeadInfo:
    """Swap the Linear module `name` for a fresh one with num_classes outputs (seeded PyTorch default init)."""
    old = _get_module(model, name, "head")
    if not isinstance(old, nn.Linear):
        raise FpsGraphError(f"head {name!r} is a {type(old).__name__}; only an nn.Linear head can be replaced")
    if num_classes < 1:
        raise FpsGraphError(f"--num-classes must be at least 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return HeadInfo(name, True, old.out_features, num_classes, old.in_features, old.bias is not None)


def _is_transformers(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (duck-typed: no transformers import needed)."""
    return hasattr(model, "config") and hasattr(model, "get_output_embeddings") and hasattr(model, "save_pretrained")


def _get_module(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        mods = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, mods, n=3)
        raise FpsGraphError(f"{what} {name!r} is no module of the model"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")) from exc


def _is_norm(m: nn.Module) -> bool:
    norm_types: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types += (nn.RMSNorm,)
    return isinstance(m, norm_types) or "Norm" in type(m).__name__


# ------------------------------------------------------------------------------------------------ handle


class SparseFineTune:
    """What `attach` returns: the deltas and fully trained tensors of a model, and the ways to save or fold them."""

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
            w.put_(d.index, saved + d.delta.to(w.dtype))
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
            out[f"{key}:delta"] = d.delta.detach().cpu().float().clone()
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
            recs[key] = rec
        for key, p in self.full.items():
            rec = {"kind": "full", "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                   "selected": int(p.numel()), "total": int(p.numel()), "reason": self.full_reason.get(key, ""),
                   "has_base": key in self._base_full}
            rec.update(_onnx_record(info.get(key)))
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
        from fps_graph import __version__

        meta.setdefault("fps_graph_version", __version__)
        write_delta(path, sparse, full, self.tensor_records(), self.head.to_json() if self.head else {}, meta)

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


def attach(model: nn.Module, masks: str | os.PathLike | Mapping[str, Any] | MaskSet, *,
           head: str | None = "auto", num_classes: int | None = None, example_input: Any = None,
           train_bias: bool = True, train_head: bool = True, train_norms: bool = False,
           train_embeddings: bool = False, train_full: Sequence[str] = (), seed: int = 0) -> SparseFineTune:
    """Make a model sparse-trainable: freeze every parameter, train a delta over each mask's selected entries.

    masks: a masks file (``fps-graph select``), or {name: bool mask | flat indices}; keys are parameter names.
    head: the classifier module ('auto': the last Linear with the model's output size, given example_input, else
    the last Linear; None: no head). num_classes: replace the head with a fresh seeded Linear of this size when
    it differs. Trained in full: head (train_head), biases of the masked layers (train_bias), normalisation
    layers (train_norms), position embeddings and class tokens (train_embeddings), and parameters matching any
    glob of train_full. A masked tensor that is also trained in full gets no delta (recorded in `superseded`).
    """
    if not isinstance(model, nn.Module):
        raise FpsGraphError(f"attach needs a torch.nn.Module, not {type(model).__name__}")
    ms = load_mask_set(masks)
    if not ms.indices:
        raise FpsGraphError(f"{ms.source}: holds no masks")
    handle = SparseFineTune(model)
    handle.masks = ms
    _check_masks(model, ms)
    names0 = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for pat in train_full:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names0):
            raise FpsGraphError(f"--train-full {pat!r} matches no parameter of the model")

    # the head, replaced when the number of classes changes
    head_name = None
    if head == "auto" and _is_transformers(model):
        from fps_graph.training.hf import auto_head

        head_name = auto_head(model)       # an LM head is the vocabulary projection, not a task head: none
        if head_name is not None:
            handle.notes.append(f"head: {head_name} (detected)")
    elif head == "auto":
        head_name = find_head(model, example_input)
        if head_name is None and (num_classes is not None):
            raise FpsGraphError("cannot find the classifier head (no nn.Linear with the model's output size); "
                                "name it with --head")
        if head_name is not None:
            handle.notes.append(f"head: {head_name} (detected)")
    elif head:
        _get_module(model, head, "head")
        head_name = head
    if head_name is not None:
        hm = _get_module(model, head_name, "head")
        out_f = getattr(hm, "out_features", None)
        if num_classes is not None and num_classes != out_f:
            if not train_head:
                raise FpsGraphError(f"a new head ({num_classes} classes) must be trained; drop --no-train-head")
            handle.head = replace_head(model, head_name, num_classes, seed)
        else:
            handle.head = HeadInfo(head_name, False, out_f, out_f, getattr(hm, "in_features", None),
                                   getattr(hm, "bias", None) is not None)
    elif num_classes is not None:
        raise FpsGraphError("--num-classes needs a head to replace; name it with --head")

    params = dict(model.named_parameters(remove_duplicate=False))
    # what trains in full, and why
    full: dict[str, str] = {}
    if handle.head is not None and train_head:
        for n, _ in _get_module(model, handle.head.name, "head").named_parameters(prefix=handle.head.name):
            full[n] = "head"
    if train_bias:
        for key in ms.indices:
            prefix, _, attr = key.rpartition(".")
            bias = f"{prefix}.{attr.replace('weight', 'bias')}" if prefix else attr.replace("weight", "bias")
            if "weight" in attr and bias in params and params[bias] is not None:
                full.setdefault(bias, "bias")
    if train_norms:
        for mname, m in model.named_modules():
            if _is_norm(m):
                for n, _ in m.named_parameters(prefix=mname, recurse=False):
                    full.setdefault(n, "norm")
    for n in params:
        if train_embeddings and any(fnmatch.fnmatchcase(n, p) for p in EMBEDDING_PATTERNS):
            full.setdefault(n, "embedding")
        if any(fnmatch.fnmatchcase(n, p) for p in train_full):
            full.setdefault(n, "train-full")

    # freeze everything, remember the flags for detach()
    seen: set[int] = set()
    for p in model.parameters():
        handle._requires_grad.append((p, p.requires_grad))
        p.requires_grad_(False)
        if id(p) not in seen:
            seen.add(id(p))
            handle.full_finetune_params += p.numel()
    order = {n: i for i, n in enumerate(params)}
    for n in sorted(full, key=order.__getitem__):
        p = params[n]
        if not p.is_floating_point():
            continue
        p.requires_grad_(True)
        handle.full[n] = p
        handle.full_reason[n] = full[n]
        if not (handle.head is not None and handle.head.replaced and full[n] == "head"):
            handle._base_full[n] = p.detach().clone()

    # deltas on the masked weights not trained in full (shared tensors: one delta for every owner)
    full_ids = {id(p) for p in handle.full.values()}
    for key in sorted(ms.indices, key=order.__getitem__):
        p = params[key]
        if id(p) in full_ids:
            handle.superseded.append(key)
            continue
        owners = [(m, a) for m in model.modules() for a, q in m._parameters.items() if q is p]
        for m, _ in owners:
            handle._own_order.setdefault(id(m), list(m._parameters) + list(m._buffers))
        idx = torch.as_tensor(ms.indices[key], dtype=torch.int64, device=p.device)
        sd = SparseDelta(idx, p.shape)
        for module, attr in owners:
            if parametrize.is_parametrized(module, attr):
                raise FpsGraphError(f"{key} is parametrized already (attach called twice?)")
            parametrize.register_parametrization(module, attr, sd)
            module.parametrizations[attr].original.requires_grad_(False)
        handle.deltas[key] = sd
        handle._originals[key] = p
        handle._owners[key] = owners
        handle._base_sparse[key] = p.detach().reshape(-1).index_select(0, idx).clone()
    if handle.superseded:
        handle.notes.append(f"trained in full instead of sparsely: {', '.join(handle.superseded)}")
    _install_state_dict_hooks(handle)
    if handle.deltas:   # W + scatter(delta) is rebuilt in the backward pass instead of saved (recompute.py)
        from fps_graph.training.recompute import install

        owners = list({id(m): m for key in handle.deltas for m, _ in handle._owners[key]}.values())
        rebuilder, hooks = install(owners)
        handle._hooks.extend(hooks)
        for d in handle.deltas.values():
            d.rebuilder = rebuilder
    for m in model.modules():
        if _is_norm(m) and isinstance(m, nn.modules.batchnorm._NormBase) and \
                not any(p.requires_grad for p in m.parameters(recurse=False)):
            handle._frozen_norms.append(m)
    if not handle.trainable_parameters():
        raise FpsGraphError("nothing to train: the masks select nothing and no tensor is trained in full")
    return handle


def _check_masks(model: nn.Module, ms: MaskSet) -> None:
    """Every mask key must name a floating-point parameter of the model, with the recorded shape."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, idx in ms.indices.items():
        prefix, _, attr = key.rpartition(".")
        if f"{prefix + '.' if prefix else ''}parametrizations.{attr}.original" in params:
            raise FpsGraphError(f"{key} carries a sparse delta already (attach called twice? detach() first)")
        if key not in params:
            if looks_generated(key):
                raise FpsGraphError(
                    f"mask {key!r} ({ms.source}) is keyed by an ONNX initializer name, not a PyTorch parameter name;"
                    " select again with --state-dict WEIGHTS, or export with `fps-graph export` so names are recorded")
            close = difflib.get_close_matches(key, list(params), n=3)
            raise FpsGraphError(f"mask {key!r} ({ms.source}) names no parameter of the model"
                                + (f" (did you mean {', '.join(close)}?)" if close else ""))
        p = params[key]
        shape = ms.shapes.get(key)
        if shape is not None and tuple(shape) != tuple(p.shape):
            raise FpsGraphError(f"mask {key!r} ({ms.source}) does not fit the model: expected shape "
                                f"{list(p.shape)} (the model's parameter), found {list(shape)} (the mask)")
        if not p.is_floating_point():
            raise FpsGraphError(f"mask {key!r}: parameter has dtype {p.dtype}, not floating point")
        if idx.size and (idx[0] < 0 or idx[-1] >= p.numel()):
            raise FpsGraphError(f"mask {key!r} ({ms.source}): index {int(idx[-1])} is outside the parameter of shape "
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
        hm = _get_module(model, head["name"], "head")
        if getattr(hm, "in_features", None) != head.get("in_features"):
            raise FpsGraphError(f"{df.path}: head {head['name']!r} has {getattr(hm, 'in_features', None)} inputs in "
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
            raise FpsGraphError(f"{df.path}: tensor {key!r} names no parameter of the model")
        if tuple(params[key].shape) != tuple(e.value.shape):
            raise FpsGraphError(f"{df.path}: tensor {key!r} does not fit the model: expected shape "
                                f"{list(params[key].shape)} (the model's parameter), found {list(e.value.shape)}")
    if not df.sparse:
        masks.indices = {}
    handle = _attach_exact(model, masks, list(df.full))
    if head:
        handle.head = HeadInfo(head["name"], bool(head.get("replaced")), head.get("old_classes"),
                               head.get("num_classes"), head.get("in_features"), bool(head.get("bias", True)))
    with torch.no_grad():
        for key, e in df.sparse.items():
            if check and e.base is not None:
                cur = handle._base_sparse[key].float().cpu().numpy()
                if not np.array_equal(cur, e.base.astype(np.float32)):
                    raise FpsGraphError(f"{df.path}: {key} of this model does not hold the values training started "
                                        "from (another base model or weights?)")
            handle.deltas[key].delta.copy_(torch.from_numpy(np.ascontiguousarray(e.delta)))
        for key, e in df.full.items():
            p = handle.full[key]
            if check and e.base is not None and key in handle._base_full:
                if not np.array_equal(_np(handle._base_full[key].cpu()), e.base):
                    raise FpsGraphError(f"{df.path}: {key} of this model does not hold the values training started "
                                        "from (another base model or weights?)")
            p.copy_(torch.from_numpy(np.ascontiguousarray(e.value)).to(p.dtype))
            if e.base is not None:
                handle._base_full[key] = torch.from_numpy(np.ascontiguousarray(e.base)).to(p.dtype)
            else:
                handle._base_full.pop(key, None)
    return handle


def _attach_exact(model: nn.Module, masks: MaskSet, full_names: Iterable[str]) -> SparseFineTune:
    """attach() with exactly these tensors trained in full and nothing detected."""
    names = list(full_names)
    if masks.indices:
        return attach(model, masks, head=None, train_bias=False, train_head=False, train_full=names)
    return _full_only(model, names)   # no sparse tensors at all


def _full_only(model: nn.Module, names: list[str]) -> SparseFineTune:
    handle = SparseFineTune(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    for p in model.parameters():
        handle._requires_grad.append((p, p.requires_grad))
        p.requires_grad_(False)
        if id(p) not in seen:
            seen.add(id(p))
            handle.full_finetune_params += p.numel()
    for n in names:
        params[n].requires_grad_(True)
        handle.full[n] = params[n]
        handle._base_full[n] = params[n].detach().clone()
    return handle


def save_delta(handle: SparseFineTune, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
               force: bool = False) -> None:
    """Write the handle's delta file atomically."""
    from fps_graph.formats.io import atomic_output

    with atomic_output(path, force) as tmp:
        handle.save(tmp, metadata)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, force: bool = False,
                    metadata: Mapping[str, str] | None = None) -> None:
    """A state dict as safetensors, atomically, with a canonical header (bfloat16 kept through torch)."""
    from fps_graph.formats.io import atomic_output, save_safetensors

    sd = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_output(path, force) as tmp:
        if any(v.dtype == torch.bfloat16 for v in sd.values()):
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata=dict(metadata or {}))
        else:
            save_safetensors({k: v.numpy() for k, v in sd.items()}, tmp, metadata=dict(metadata or {}))


__all__ = ["attach", "load_delta", "save_delta", "save_state_dict", "find_head", "replace_head", "SparseFineTune",
           "SparseDelta", "MaskSet", "load_mask_set", "HeadInfo"]
