"""The `apply` job: write a fine-tuned ONNX model by patching initializers with a delta file's values (no torch).

Every trained tensor (PyTorch name) is carried back to each stored copy of it in the graph: the initializer the
masks file recorded (key tensor = initializer.transpose(perm)), any other scored copy that names it (export
metadata, folded-constant metadata, node scope), an initializer with the same name, and folded copies of it whose
values match. Each copy is checked against the values training started from, so a delta never lands on another
model. A replaced head changes its initializers' shapes and the declared shapes downstream of it. Nodes are not
touched: the graph and its speed stay as they were. External data stays external.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from fps_graph._version import __version__
from fps_graph.data.hf_inputs import read_genai_config
from fps_graph.data.text import resolve_model_path
from fps_graph.formats.delta import DeltaFile, read_delta
from fps_graph.errors import DataError, ModelError, OptionError
from fps_graph.formats.io import check_output_path, sha256_file
from fps_graph.graph.model import SHAPE_ERRORS, OnnxModel
from fps_graph.graph.names import folded_from, resolve_names
from fps_graph.graph.plan import make_plan
from fps_graph.graph.walk import local_name, model_scopes, node_reads, scope_of_key

META_FINETUNED = "fps_graph.finetuned"
log = logging.getLogger(__name__)


@dataclass
class Target:
    """A stored copy of a trained tensor: key tensor = stored.transpose(perm) (perm None: same layout)."""

    name: str
    perm: list[int] | None
    how: str


def _shape_after(shape: tuple[int, ...], perm: list[int] | None) -> tuple[int, ...]:
    return tuple(shape[p] for p in perm) if perm else tuple(shape)


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _head_key(key: str, df: DeltaFile) -> bool:
    """True for a tensor of a replaced (or new) classification head."""
    head = df.head or {}
    return bool(head.get("replaced")) and (key == head["name"] or key.startswith(head["name"] + "."))


def _old_shape(key: str, shape: tuple[int, ...], df: DeltaFile) -> tuple[int | None, ...]:
    """The key tensor's shape in the base model: a replaced head had old_classes rows; a head the checkpoint did
    not have (old_classes unknown) any number of rows (None)."""
    if _head_key(key, df) and shape:
        old = (df.head or {}).get("old_classes")
        return (int(old) if old is not None else None, *shape[1:])
    return shape


def _fits(stored: tuple[int, ...], shape: tuple[int | None, ...]) -> bool:
    return len(stored) == len(shape) and all(w is None or s == w for s, w in zip(stored, shape))


def find_targets(model: OnnxModel, df: DeltaFile, layers: list[Any]) -> dict[str, list[Target]]:
    """For every trained tensor, its stored copies in the graph (raises naming a tensor that has none).

    A tensor is found under its key and under the other names of a tied tensor (the delta's ``aliases``): by the
    masks' record, by the names resolved for the scored layers, by initializer name (in bodies too), as a folded
    constant; then every other constant of the same values, in the key's layout or transposed (a tied LM head's
    embedding table, a folded transposed copy), unless the graph names it as another tensor."""
    per_layer: dict[str, Any] = {}
    for layer in layers:
        if layer.weight not in per_layer:
            per_layer[layer.weight] = resolve_names(model, [layer])[layer.weight]
    folded = folded_from(model)
    in_bodies = body_constants(model)
    out: dict[str, list[Target]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key in df.keys:
        rec = df.tensors.get(key, {})
        shape = _old_shape(key, tuple(int(d) for d in rec.get("shape", [])), df)
        shapes[key] = shape
        names = _names_of(key, rec, df)
        found: dict[str, Target] = {}

        def add(name: str, perm: list[int] | None, how: str) -> None:
            if name in found or not model.is_constant(name):
                return
            if not _fits(_shape_after(model.tensor_shape(name), perm), shape):
                return
            found[name] = Target(name, list(perm) if perm else None, how)

        onnx_name = rec.get("onnx")
        if onnx_name:
            perm = (rec.get("layout") or {}).get("transpose")
            if not model.is_constant(onnx_name):
                pass   # another export of the same model: found by the other sources
            elif not _fits(_shape_after(model.tensor_shape(onnx_name), perm), shape):
                raise DataError(f"{key}: initializer {onnx_name!r} has shape {list(model.tensor_shape(onnx_name))}"
                                    f", which with layout {perm} does not give the trained shape {list(shape)}")
            else:
                add(onnx_name, perm, "masks-record")
        for weight, info in per_layer.items():
            if info.torch in names:
                add(weight, info.perm, f"graph ({info.how})")
        for name in names:
            add(name, None, "initializer-name")
            for body_name in in_bodies.get(name, ()):      # stored inside If/Loop/Scan bodies under that name
                add(body_name, None, "initializer-name (in a subgraph)")
        for name, sources in folded.items():
            if len(sources) == 1 and sources[0] in names and model.is_constant(name) and name not in found:
                stored = model.tensor_shape(name)
                if _fits(stored, shape):
                    add(name, None, "folded-copy")
                elif len(stored) == 2 and _fits(stored[::-1], shape):
                    add(name, [1, 0], "folded-copy")
        if not found and _head_key(key, df):
            head = df.head or {}
            kind = "a new head: the checkpoint had none" if head.get("old_classes") is None else "a replaced head"
            raise DataError(f"{model.path} has no classification head {head['name']!r} to write the trained "
                                f"{key} into ({kind}; was the model exported without a head, as causal-lm or "
                                "feature-extraction?); export the base model with its head (fps-graph export hf:DIR "
                                "--task seq-cls -o FOLDER) and apply to that")
        if not found:
            raise DataError(f"cannot find {key} (shape {list(shape)}) in {model.path}: no initializer holds it "
                                "(by recorded layout, graph metadata, node scope or name); was the model exported "
                                "from the network that was trained, without folding it into other constants (e.g. "
                                "BatchNorm folded into a Conv by the legacy exporter)?")
        out[key] = list(found.values())
    _value_copies(model, df, out, shapes, per_layer)
    return out


def _names_of(key: str, rec: dict[str, Any], df: DeltaFile) -> list[str]:
    """The PyTorch names a trained tensor may have in the graph: its key, the other names of a tied tensor, and the
    key with or without the training model's base-model prefix (a task model trained, its base model exported:
    `bert.encoder...` vs `encoder...`). Every copy found is checked against the values training started from."""
    names = [key, *[a for a in rec.get("aliases", []) if a != key]]
    prefix = str(df.metadata.get("base_model_prefix") or "")
    if prefix:
        for n in list(names):
            names.append(n[len(prefix) + 1:] if n.startswith(prefix + ".") else f"{prefix}.{n}")
    return list(dict.fromkeys(names))


def _value_copies(model: OnnxModel, df: DeltaFile, out: dict[str, list[Target]], shapes: dict[str, tuple[int, ...]],
                  per_layer: dict[str, Any]) -> None:
    """Add to each trained matrix every other constant that holds the same values, as stored or transposed (a
    tied embedding table beside its LM-head copy, however the exporter named them). A constant the graph names as
    another tensor (scored layers' names) or that another key claims is left alone; matrices whose entries are all
    equal carry no identity and are not searched."""
    claimed = {t.name for ts in out.values() for t in ts}
    other_name = {w: info.torch for w, info in per_layer.items() if info.torch}
    digests: dict[str, str] = {}

    def digest(a: np.ndarray) -> str:
        a = np.ascontiguousarray(a)
        return hashlib.sha1(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()

    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in [*model.initializers, *model.constant_nodes]:
        if name not in claimed and name not in model.derived:
            by_shape.setdefault(tuple(model.tensor_shape(name)), []).append(name)
    for key, targets in out.items():
        shape = shapes[key]
        names = set(_names_of(key, df.tensors.get(key, {}), df))
        if len(shape) < 2 or None in shape or not targets:
            continue
        first = targets[0]
        ref = _key_view(model.tensor(first.name), first.perm)
        if ref.size == 0 or np.all(ref.reshape(-1) == ref.reshape(-1)[0]):
            continue
        want = {digest(ref): None}
        if ref.ndim == 2:
            want[digest(ref.T)] = [1, 0]
        for cand_shape in {shape, shape[::-1]} if len(shape) == 2 else {shape}:
            for name in by_shape.get(cand_shape, []):
                if name in claimed or (other_name.get(name) and other_name[name] not in names):
                    continue
                if name not in digests:
                    value = model.tensor(name)
                    if value.dtype != ref.dtype:
                        continue
                    digests[name] = digest(value)
                if digests[name] in want:
                    perm = want[digests[name]]
                    targets.append(Target(name, perm, f"a copy of {first.name} by value"))
                    claimed.add(name)


def body_constants(model: OnnxModel) -> dict[str, list[str]]:
    """Constants stored inside If/Loop/Scan bodies, by their name there: model-wide keys (graph.walk)."""
    model_scopes(model)
    out: dict[str, list[str]] = {}
    for key in [*model.initializers, *model.constant_nodes]:
        if scope_of_key(model, key):
            out.setdefault(local_name(model, key), []).append(key)
    return out


def _refuse_quantized(model: OnnxModel, path: Path, key: str, t: Target) -> None:
    """Policy for quantized weights: never re-quantize, refuse in one line with what to do instead.

    Re-quantizing the touched entries with their existing scales would lose any trained change smaller than half
    a quantization step (most of them, for int4 blocks) and clip larger ones, silently; new scales would change
    untouched weights. The float model takes the delta exactly, and quantizing it again is the quantizer's job.
    """
    name = model.derived[t.name].source if t.name in model.derived else t.name
    how = ""
    if name in model.quantized:
        q = model.quantized[name]
        name, how = q.source, q.how
    elif np.dtype(model.tensor_dtype(name)).kind in "iu":
        how = f"{np.dtype(model.tensor_dtype(name)).name}, dequantized in the graph"
    if how:
        raise ModelError(f"{key}: its ONNX weight {name!r} in {path} is stored quantized ({how}); apply does not "
                            "re-quantize (changes under half a quantization step would be lost); apply the delta to "
                            "the float model this one was quantized from, then quantize it again")


def _key_view(stored: np.ndarray, perm: list[int] | None) -> np.ndarray:
    return np.transpose(stored, perm) if perm else stored


def _check_base(key: str, t: Target, stored: np.ndarray, df: DeltaFile) -> bool:
    """True when the stored copy holds the values training started from (or no such values were recorded)."""
    view = _key_view(stored, t.perm)
    if key in df.sparse:
        e = df.sparse[key]
        if e.base is None:
            return True
        have = view.reshape(-1)[e.indices]
        return bool(np.array_equal(have, e.base.astype(stored.dtype)))
    e = df.full[key]
    if e.base is None:
        return True
    return view.shape == e.base.shape and bool(np.array_equal(view, e.base.astype(stored.dtype)))


def _new_value(key: str, t: Target, stored: np.ndarray, df: DeltaFile) -> np.ndarray:
    """The stored tensor with the fine-tuned values, in its own layout and dtype."""
    if key in df.sparse:
        e = df.sparse[key]
        view = np.array(_key_view(stored, t.perm))     # copy in key layout
        flat = view.reshape(-1)
        flat[e.indices] = (flat[e.indices].astype(np.float32) + e.delta).astype(stored.dtype)
        new = flat.reshape(view.shape)
    else:
        new = df.full[key].value.astype(stored.dtype)
    if t.perm:
        new = np.transpose(new, _inverse(t.perm))
    return np.ascontiguousarray(new)


def _set_tensor(model: OnnxModel, name: str, value: np.ndarray) -> None:
    """Replace the data of an initializer or Constant node in place (name, metadata kept)."""
    if name in model.derived:   # a recurrent weight/bias in PyTorch's gate order: scatter into its stored tensor
        d = model.derived[name]
        stored = np.array(model.tensor(d.source))
        stored.reshape(-1)[d.index.reshape(-1)] = value.reshape(-1)
        _set_tensor(model, d.source, stored)
        return
    new = numpy_helper.from_array(value, name)
    if name in model.initializers:
        t = model.initializers[name]
        props = [(p.key, p.value) for p in t.metadata_props] if hasattr(t, "metadata_props") else []
        doc = t.doc_string
        new.name = t.name          # its own name (a body's constant has a model-wide key, graph.walk)
        t.CopyFrom(new)
        t.doc_string = doc
        for k, v in props:
            t.metadata_props.add(key=k, value=v)
        return
    node = model.constant_nodes[name]
    for attr in node.attribute:
        if attr.name == "value":
            new.name = attr.t.name
            attr.t.CopyFrom(new)
            return
    raise ModelError(f"Constant node for {name!r} holds no 'value' tensor this tool can rewrite")


def _downstream(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Every value computed from these tensors."""
    tainted = set(names)
    changed = True
    while changed:
        changed = False
        for node in graph.node:     # a body reading a changed outer weight taints its node's outputs
            if any(i in tainted for i in node_reads(node)) and not all(o in tainted for o in node.output if o):
                tainted.update(o for o in node.output if o)
                changed = True
    return tainted


def _update_shapes(model: OnnxModel, changed: set[str]) -> list[str]:
    """After head tensors changed shape: drop stale value_info downstream and re-infer the outputs' shapes."""
    graph = model.graph
    tainted = _downstream(graph, changed) - changed
    keep = [vi for vi in graph.value_info if vi.name not in tainted]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    outs = [o for o in graph.output if o.name in tainted]
    if not outs:
        return []
    inferred = _infer_output_shapes(model, {o.name for o in outs})
    notes = []
    for o in outs:
        t = o.type.tensor_type
        new = inferred.get(o.name)
        if new is not None and t.HasField("shape") and len(t.shape.dim) == len(new.dim):
            for d, n in zip(t.shape.dim, new.dim):   # keep symbolic dims; take the inferred sizes
                if d.HasField("dim_value") and n.HasField("dim_value"):
                    d.dim_value = n.dim_value
                elif d.HasField("dim_value"):
                    d.ClearField("dim_value")
            notes.append(f"output {o.name!r} shape updated")
        elif new is not None:
            t.shape.CopyFrom(new)
            notes.append(f"output {o.name!r} shape updated")
        else:
            t.ClearField("shape")
            notes.append(f"output {o.name!r} shape cleared (could not infer it)")
    return notes


def _infer_output_shapes(model: OnnxModel, names: set[str]) -> dict[str, onnx.TensorShapeProto]:
    """Shapes of graph outputs by ONNX shape inference on a copy without big weights (stored as typed inputs)."""
    proto = model.proto
    copy = onnx.ModelProto()
    copy.ir_version = proto.ir_version
    copy.opset_import.extend(proto.opset_import)
    g = copy.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    have_inputs = {i.name for i in proto.graph.input}
    for t in proto.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if n <= 64 and not (t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL):
            g.initializer.append(t)
        elif t.name not in have_inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for o in proto.graph.output:
        vi = g.output.add()
        vi.CopyFrom(o)
        if o.name in names:
            vi.type.tensor_type.ClearField("shape")
    copy.functions.extend(proto.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, strict_mode=False)
    except SHAPE_ERRORS as exc:   # the caller clears those shapes and says so in its notes
        log.info("shape inference failed after a head change: %s", exc)
        return {}
    out = {}
    for vi in list(inferred.graph.output) + list(inferred.graph.value_info):
        if vi.name in names and vi.type.tensor_type.HasField("shape"):
            out.setdefault(vi.name, vi.type.tensor_type.shape)
    return out


def _protect_input(model_path: Path, model: OnnxModel, out: Path) -> None:
    """Refuse an output that is the input model or one of its external data files."""
    ins = {model_path.resolve()}
    for t in model.initializers.values():
        for e in t.external_data:
            if e.key == "location":
                ins.add((model.base_dir / e.value).resolve())
    for p in (out, out.parent / (out.name + ".data")):
        if p.resolve() in ins:
            raise OptionError(f"output {p} would overwrite the input model or its data; choose another -o")


def apply_to_genai_folder(folder: Path, delta_path: str | os.PathLike, output: str | os.PathLike,
                          force: bool = False, check: bool = True) -> dict[str, Any]:
    """An ONNX Runtime GenAI folder in, a folder out that onnxruntime-genai loads the same way: every file copied
    as it is (genai_config.json, tokenizer, templates), the decoder patched under its own file name (external data
    in ``<file>.data``); inputs, outputs and the config unchanged. Written to a temporary folder beside the output
    and renamed at the end, so a failure leaves nothing."""
    genai = read_genai_config(folder)
    assert genai is not None
    out = Path(output)
    if not out.parent.is_dir():
        raise OptionError(f"output folder's parent does not exist: {out.parent}")
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise OptionError(f"output {out} is the input folder {folder} or inside it; choose another -o")
    if out.exists() and not (force and out.is_dir()):
        raise OptionError(f"output exists: {out} (use --force to overwrite a folder)" if not out.is_dir() or not
                            force else f"output exists: {out}")
    model_file = folder / genai.filename
    base = onnx.load(str(model_file), load_external_data=False)
    skip = {model_file.resolve()} | {(model_file.parent / e.value).resolve() for t in base.graph.initializer
                                     for e in t.external_data if e.key == "location"}
    del base
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for src in sorted(folder.rglob("*")):
            rel = src.relative_to(folder)
            if src.is_dir() or src.resolve() in skip:
                continue
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, stage / rel)
        (stage / genai.filename).parent.mkdir(parents=True, exist_ok=True)
        report = apply_delta(model_file, delta_path, stage / genai.filename, force=True, check=check)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    report["output"] = str(out)
    if report.get("external_data"):
        report["external_data"] = str(out / Path(report["external_data"]).name)
    report["notes"].append(f"ONNX Runtime GenAI folder: {genai.filename} patched, the other files copied")
    return report


def apply_delta(model_path: str | os.PathLike, delta_path: str | os.PathLike, output: str | os.PathLike,
                force: bool = False, check: bool = True) -> dict[str, Any]:
    """Write a copy of the ONNX model with the fine-tuned values of a delta file; return a short report.

    ``model_path`` may be an ONNX Runtime GenAI folder (genai_config.json): ``output`` is then a folder
    (``apply_to_genai_folder``). Another folder means the ONNX file found in it (data.text.resolve_model_path).
    """
    if Path(model_path).is_dir():
        if read_genai_config(model_path) is not None:
            return apply_to_genai_folder(Path(model_path), delta_path, output, force, check)
        model_path = resolve_model_path(model_path)
    df = read_delta(delta_path)
    out = check_output_path(output, force)
    mp = Path(model_path)
    plan = make_plan(mp)
    model = plan.model
    _protect_input(mp, model, out)
    external = model.has_external_data()
    data_out = out.parent / (out.name + ".data")
    if external and data_out.exists() and not force:
        raise OptionError(f"output data file exists: {data_out} (use --force to overwrite)")
    notes: list[str] = []
    if df.metadata.get("model_sha256") and df.metadata["model_sha256"] != model.sha256:
        notes.append("the masks were selected on another ONNX file; tensors matched by name and value")
    targets = find_targets(model, df, plan.layers)
    for key, found in targets.items():
        for t in found:
            _refuse_quantized(model, mp, key, t)
    if external:

        load_external_data_for_model(model.proto, str(model.base_dir))
    updated: dict[str, list[dict[str, Any]]] = {}
    changed_shape: set[str] = set()
    for key in df.keys:
        for t in targets[key]:
            stored = model.tensor(t.name)
            if check and not _check_base(key, t, stored, df):
                raise DataError(f"{t.name!r} in {mp} (the copy of {key}, found by {t.how}) does not hold the "
                                    "values training started from: the delta belongs to another model or weights, "
                                    "or the exporter folded other constants into it (e.g. BatchNorm into a Conv)")
            new = _new_value(key, t, stored, df)
            if new.shape != stored.shape:
                changed_shape.add(t.name)
            _set_tensor(model, t.name, new)
            updated.setdefault(key, []).append({"initializer": t.name, "transpose": t.perm, "how": t.how,
                                                "shape": list(new.shape)})
    if changed_shape:
        notes.extend(_update_shapes(model, changed_shape))
    stamp = {"delta_sha256": sha256_file(delta_path), "base_model_sha256": model.sha256,
             "masks_sha256": df.metadata.get("masks_sha256", ""), "tensors": len(updated),
             "head": df.head or None, "fps_graph_version": __version__}
    props = [p for p in model.proto.metadata_props if p.key != META_FINETUNED]
    del model.proto.metadata_props[:]
    model.proto.metadata_props.extend(props)
    model.proto.metadata_props.add(key=META_FINETUNED, value=json.dumps(stamp, sort_keys=True))
    _save(model.proto, out, external or model.proto.ByteSize() > 1_800_000_000)
    n_init = sum(len(v) for v in updated.values())
    return {"output": str(out), "tensors": len(updated), "initializers": n_init,
            "sparse": len(df.sparse), "full": len(df.full),
            "values_changed": int(sum(e.indices.size for e in df.sparse.values())
                                  + sum(e.value.size for e in df.full.values())),
            "external_data": str(data_out) if external else None, "updated": updated, "notes": notes}


def _save(proto: onnx.ModelProto, out: Path, external: bool) -> None:
    """Write the model (and its external data file, named <output>.data) through a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix=".fpsg_apply_", dir=out.parent if str(out.parent) else "."))
    try:
        staged = tmp / out.name
        if external:
            location = out.name + ".data"
            onnx.save(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=location, size_threshold=1024)
            if (tmp / location).exists():   # a small model (every tensor under 1 KB) keeps its weights inline
                os.replace(tmp / location, out.parent / location)
        else:
            onnx.save(proto, str(staged))
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["apply_delta", "find_targets", "Target"]
