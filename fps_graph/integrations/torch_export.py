"""`fps-graph export`: PyTorch model -> ONNX, with a recorded map from weight initializers to state_dict names.

The map is checked by value at export time (each initializer equals a state_dict tensor or its transpose), so it
survives the renaming and transposing that both exporters do to Linear weights on 3-D input.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fps_graph.errors import ModelError, OptionError
from fps_graph.formats.io import check_output_path
from fps_graph.graph.discover import find_layers
from fps_graph.graph.model import load_model
from fps_graph.graph.names import META_KEY, folded_from, resolve_names
from fps_graph.training.models import build_model


@contextlib.contextmanager
def _quiet_torch_onnx():
    """Silence the exporters' informational logging (e.g. 'torchvision is not installed')."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def weight_map(onnx_path: str | Path, state_dict: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """For each scored weight initializer, its state_dict name and layout, found by value."""
    model = load_model(onnx_path)
    layers, _ = find_layers(model)
    infos = resolve_names(model, layers, state_dict)
    out = {}
    for weight, info in infos.items():
        if info.torch is None:
            continue
        out[weight] = {"torch": info.torch, "transpose": info.perm, "how": f"{info.how} (at export)"}
    return out


def export(spec: str, input_shape: tuple[int, ...], output: str | Path, weights: str | None = None,
           exporter: str = "dynamo", dynamic_batch: bool = True, opset: int | None = None,
           input_name: str = "input", force: bool = False, fold: bool = False) -> dict[str, Any]:
    """Export the model to ONNX at output (atomically), record the weight map; return a short report."""
    import torch

    out = check_output_path(output, force)
    if exporter not in ("dynamo", "legacy"):
        raise OptionError(f"unknown exporter {exporter!r} (use dynamo or legacy)")
    model = build_model(spec, weights)
    shape = list(input_shape)
    if dynamic_batch and shape[0] == 1:
        shape[0] = 2   # an example batch of 1 would be specialised by torch.export
    example = torch.randn(*shape)
    tmp = Path(tempfile.mkdtemp(prefix=".fpsg_export_", dir=out.parent if str(out.parent) else "."))
    try:
        raw = tmp / "raw.onnx"
        kwargs: dict[str, Any] = {"input_names": [input_name], "output_names": ["output"], "dynamo": exporter == "dynamo"}
        if opset:
            kwargs["opset_version"] = opset
        if not fold:
            # keep weights as the module holds them: no BatchNorm folded into Conv weights, Linear weights used
            # through a Transpose node under their own names (ONNX Runtime folds both when it loads the model)
            kwargs["optimize" if exporter == "dynamo" else "do_constant_folding"] = False
        if dynamic_batch:
            if exporter == "dynamo":
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
            else:
                kwargs["dynamic_axes"] = {input_name: {0: "batch"}, "output": {0: "batch"}}
        if exporter == "dynamo":
            kwargs["verbose"] = False
        try:
            with torch.no_grad(), warnings.catch_warnings(), _quiet_torch_onnx():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(raw), **kwargs)
        except Exception as exc:
            raise ModelError(f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
        wmap = weight_map(raw, sd)
        proto = onnx.load(str(raw))
        del proto.metadata_props[:]
        for key, value in {META_KEY: json.dumps(wmap, sort_keys=True), "fps_graph.source": spec}.items():
            proto.metadata_props.add(key=key, value=value)
        staged = tmp / out.name
        if proto.ByteSize() > 1_800_000_000:
            onnx.save(proto, str(staged), save_as_external_data=True, location=out.name + ".data")
            shutil.move(str(tmp / (out.name + ".data")), str(out.parent / (out.name + ".data")))
        else:
            onnx.save(proto, str(staged))
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_w = sum(1 for _ in find_layers(load_model(out))[0])
    return {"output": str(out), "layers": n_w, "mapped": len(wmap), "exporter": exporter}
