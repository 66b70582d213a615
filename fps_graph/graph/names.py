"""Mapping ONNX weight initializers back to PyTorch state_dict names and layouts.

Sources, tried in order (each result records which one found it, in ``how``):

1. ``export-metadata``: the map ``fps-graph export`` wrote into the model (checked by value at export time);
2. ``initializer-name``: the initializer already has a parameter-like name (``blocks.0.attn.qkv.weight``);
3. ``folded-from``: dynamo's value_info metadata ``pkg.onnxscript.optimizer.folded_from`` on a folded constant;
4. ``node-scope``: the module path of the consuming node (dynamo ``pkg.torch.onnx.name_scopes`` or a legacy node
   name such as ``/blocks.0/attn/qkv/MatMul``) plus ``.weight``;
5. ``value-match``: a tensor of a user-given state dict equal to the initializer or to its transpose.

With a state dict, sources 2-4 are accepted only if the values agree. A name found from a folded constant of a
MatMul is taken to be a Linear weight, i.e. the transpose of the [in, out] initializer.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fps_graph.graph.layers import Layer, eval_list
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.walk import local_name, model_scopes

META_KEY = "fps_graph.weight_map"
_GENERATED = re.compile(r"^(onnx::|val_|_val|/|\d+$)")


@dataclass
class NameInfo:
    """Where a stored ONNX weight lives in PyTorch, and how its layout differs."""

    onnx: str
    key: str                      # PyTorch name when known, else the ONNX name
    torch: str | None
    perm: list[int] | None        # key tensor = stored.transpose(perm); None = same layout
    key_shape: tuple[int, ...]
    how: str
    notes: list[str] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)   # more of the layout: a derived tensor's gather (recurrent)

    def to_json(self) -> dict[str, Any]:
        """Metadata record for masks and stats files."""
        return {"onnx": self.onnx, "torch": self.torch, "layout": {"transpose": self.perm, **self.layout},
                "shape": list(self.key_shape), "name_source": self.how}

    def key_index(self, stored_shape: tuple[int, ...]) -> np.ndarray:
        """For each flat position of the key tensor, the flat position of the stored tensor it holds."""
        idx = np.arange(int(np.prod(stored_shape)), dtype=np.int64).reshape(stored_shape)
        if self.perm is not None:
            idx = idx.transpose(self.perm)
        return idx.reshape(-1)


# Converters whose initializer names are their own framework's (TensorFlow variable paths, PaddlePaddle's
# ``conv2d_0.w_0``, ...), never PyTorch state_dict names.
_OTHER_PRODUCERS = ("tf2onnx", "keras2onnx", "tflite", "paddle", "skl2onnx", "onnxmltools", "mxnet", "caffe",
                    "coreml", "chainer", "jax", "mindspore", "tensorflow")
_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")
_INLINED = re.compile(r"__Inline_\d+__|(then|else)_branch__|^(If|Loop|Scan)_\d+_")
_PADDLE_PARAM = re.compile(r"\.(w|b)_\d+$")        # conv2d_0.w_0, linear_1.b_0: PaddlePaddle's parameter names


def _foreign(model: OnnxModel) -> bool:
    """True for a model another framework's converter wrote, by its producer name or, where that was stripped, by
    the converter's node names (paddle2onnx's ``p2o.``, TensorFlow's ``StatefulPartitionedCall``)."""
    cached = model.__dict__.get("_fpsg_foreign")
    if cached is None:
        producer = (model.proto.producer_name or "").lower()
        cached = any(p in producer for p in _OTHER_PRODUCERS) or any(
            n.name.startswith(("p2o.", "StatefulPartitionedCall")) for n in model.graph.node)
        model.__dict__["_fpsg_foreign"] = cached
    return cached


def is_pytorch_name(model: OnnxModel, name: str) -> bool:
    """Whether a name read off the graph may be taken for a PyTorch state_dict name: a dotted module path
    (``blocks.0.attn.qkv.weight``; a bare name only in a PyTorch export), not one an inliner made up (``If_0_then_branch__Inline_0__...``), in a model
    that no other framework's converter wrote (a TensorFlow or PaddlePaddle name is that framework's own)."""
    producer = (model.proto.producer_name or "").lower()
    if _foreign(model) or looks_generated(name) or _INLINED.search(name) or _PADDLE_PARAM.search(name):
        return False
    # a bare name ("W") is a PyTorch name only in a PyTorch export (a top-level parameter, "weight")
    return bool(_MODULE_PATH.match(name)) and ("." in name or producer == "pytorch")


def looks_generated(name: str) -> bool:
    """True for exporter-made names (onnx::MatMul_12, val_7, /x/Constant_output_0) that are no parameter names."""
    return bool(_GENERATED.match(name))


def export_map(model: OnnxModel) -> dict[str, dict[str, Any]]:
    """The weight map recorded by ``fps-graph export``, if any."""
    for p in model.proto.metadata_props:
        if p.key == META_KEY:
            try:
                return json.loads(p.value)
            except ValueError:
                return {}
    return {}


def folded_from(model: OnnxModel) -> dict[str, list[str]]:
    """Dynamo's record of which named values a folded constant was computed from."""
    out: dict[str, list[str]] = {}
    for scope in model_scopes(model):          # bodies of If/Loop/Scan too, keyed model-wide (graph.walk)
        g = scope.graph
        for item in [*g.value_info, *g.input, *g.output, *g.initializer]:
            for p in item.metadata_props:
                if p.key == "pkg.onnxscript.optimizer.folded_from":
                    try:
                        out[scope.const_key(item.name) or item.name] = eval_list(p.value)
                    except ValueError:
                        pass
    return out


def _derived_perm(layer: Layer) -> list[int] | None:
    """Layout of a PyTorch weight relative to a derived (folded) initializer: Linear weights are [out, in]."""
    has_transpose = any(s["op"] == "Transpose" for s in layer.chain)
    if layer.op == "MatMul" and len(layer.stored_shape) == 2 and not has_transpose:
        return [1, 0]
    return None


def _shape_after(shape: tuple[int, ...], perm: list[int] | None) -> tuple[int, ...]:
    return tuple(shape[p] for p in perm) if perm else tuple(shape)


def _digest(arr: np.ndarray) -> str:
    a = np.ascontiguousarray(arr)
    return hashlib.sha1(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


class _ValueIndex:
    """Digests of a state dict's tensors (and their 2-D transposes), cast to a given dtype, for value matching."""

    def __init__(self, state_dict: dict[str, np.ndarray]):
        self.sd = state_dict
        self._by_dtype: dict[str, dict[str, list[tuple[str, list[int] | None]]]] = {}

    def lookup(self, stored: np.ndarray) -> list[tuple[str, list[int] | None]]:
        """State-dict names (and layouts) whose value equals the stored tensor."""
        key = str(stored.dtype)
        if key not in self._by_dtype:
            table: dict[str, list[tuple[str, list[int] | None]]] = {}
            for name, t in self.sd.items():
                if t.dtype.kind != "f":
                    continue
                c = np.asarray(t).astype(stored.dtype)
                table.setdefault(_digest(c), []).append((name, None))
                if c.ndim == 2:
                    # key tensor = stored.transpose(perm)  <=>  stored = key.T
                    table.setdefault(_digest(c.T), []).append((name, [1, 0]))
            self._by_dtype[key] = table
        return self._by_dtype[key].get(_digest(stored), [])


def _agrees(sd: dict[str, np.ndarray] | None, name: str, stored: np.ndarray | None, perm: list[int] | None) -> bool:
    """Without a state dict any candidate is accepted; with one, values must match."""
    if sd is None:
        return True
    if name not in sd or stored is None:
        return False
    want = np.transpose(stored, perm) if perm else stored
    t = sd[name]
    return t.shape == want.shape and np.array_equal(np.asarray(t).astype(stored.dtype), want)


def resolve_names(model: OnnxModel, layers: list[Layer],
                  state_dict: dict[str, np.ndarray] | None = None) -> dict[str, NameInfo]:
    """A NameInfo for every stored weight of the scored layers (keys are unique)."""
    recorded = export_map(model)
    folded = folded_from(model)
    index = _ValueIndex(state_dict) if state_dict is not None else None
    first: dict[str, Layer] = {}
    for layer in layers:
        first.setdefault(layer.weight, layer)
    infos: dict[str, NameInfo] = {}
    used: dict[str, str] = {}
    for weight, layer in first.items():
        info = _resolve_one(model, weight, layer, recorded, folded, state_dict, index)
        if weight in model.derived:    # a recurrent weight in PyTorch's layout (graph/recurrent.py)
            info.layout = dict(model.derived[weight].layout)
            if info.how == "initializer-name":
                info.how = model.derived[weight].how
        source = model.derived[weight].source if weight in model.derived else weight
        if source in model.quantized:  # a float view of a quantized weight (graph/dequant.py)
            info.layout["quantized"] = model.quantized[source].record()
            if info.how == "initializer-name":
                info.how = "quantized-weight-name"     # the stored name without the quantizer's suffix
                if not is_pytorch_name(model, info.key):
                    info.torch = None
        if info.how == "initializer-name" and not is_pytorch_name(model, info.key):
            info.torch, info.how = None, "onnx-name"    # the graph's own name, not known to be PyTorch's
        if info.how == "onnx-node":
            info.torch = None                           # made from the node's name (graph/recurrent.py)
        if info.key in used and _is_copy(model, weight, used[info.key], info, infos[used[info.key]]):
            info.how = f"{info.how} (a copy of {used[info.key]})"    # one entry (graph/plan.py: merge_copies)
            infos[weight] = info
            continue
        if info.key in used:
            info.notes.append(f"PyTorch name {info.key!r} also maps {used[info.key]!r}; keyed by ONNX name")
            info = NameInfo(weight, weight, None, None, tuple(layer.stored_shape), "duplicate", info.notes)
        used[info.key] = weight
        infos[weight] = info
    return infos


def _is_copy(model: OnnxModel, a: str, b: str, info_a: NameInfo, info_b: NameInfo) -> bool:
    """True when two stored constants hold the same values in the same layout (a weight stored once per If
    branch); they are then one weight with one name."""
    if info_a.perm != info_b.perm or a in model.derived or b in model.derived:
        return False
    if model.tensor_shape(a) != model.tensor_shape(b) or model.tensor_dtype(a) != model.tensor_dtype(b):
        return False
    return bool(np.array_equal(model.tensor(a), model.tensor(b)))


def _resolve_one(model: OnnxModel, weight: str, layer: Layer, recorded: dict, folded: dict,
                 sd: dict[str, np.ndarray] | None, index: _ValueIndex | None) -> NameInfo:
    """Try the name sources in order for one stored weight."""
    shape = tuple(layer.stored_shape)
    stored = model.tensor(weight) if sd is not None else None

    def make(name: str, perm: list[int] | None, how: str) -> NameInfo:
        return NameInfo(weight, name, name, perm, _shape_after(shape, perm), how)

    rec = recorded.get(weight)
    if rec and rec.get("torch"):
        perm = rec.get("transpose")
        return make(rec["torch"], list(perm) if perm else None, "export-metadata")
    notes = []
    if recorded and sd is None:
        # fps-graph export checked every scored weight by value; one it left out differs from its PyTorch tensor
        notes.append(f"{weight}: its values did not match the PyTorch state dict at export (a BatchNorm folded into"
                     " it?); top-K per neuron is unaffected, budgets across neurons rank the folded values")
    sources = [c for c in folded.get(weight, []) if not looks_generated(c)]
    if len(sources) > 1 and sd is None:
        notes.append(f"{weight} was folded from {sources} (a BatchNorm folded into a weight?); top-K per neuron is"
                     " unaffected, budgets across neurons rank the folded values")

    def noted(info: NameInfo) -> NameInfo:
        info.notes.extend(notes)
        return info

    local = local_name(model, weight)         # a constant stored in a body: its name there (graph.walk)
    if not looks_generated(local) and _agrees(sd, local, stored, None):
        return noted(make(local, None, "initializer-name"))
    derived = _derived_perm(layer)
    cands = [c for c in sources if sd is None or c in sd]
    if len(cands) == 1 and _agrees(sd, cands[0], stored, derived):
        return noted(make(cands[0], derived, "folded-from"))
    if layer.scope:
        name = f"{layer.scope}.weight"
        if _agrees(sd, name, stored, derived):
            return noted(make(name, derived, "node-scope"))
    if index is not None and stored is not None:
        hits = index.lookup(stored)
        if hits:
            name, perm = hits[0]
            info = make(name, perm, "value-match")
            if len(hits) > 1:
                info.notes.append(f"value matches several tensors {[h[0] for h in hits]}; took the first")
                info.how = "value-match (ambiguous)"
            return info
    return noted(NameInfo(weight, weight, None, None, shape, "onnx-name"))
