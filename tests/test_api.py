"""The public API at the package face: small, documented, light to import, the same results as the CLI, and old
import paths that keep working for a release with a DeprecationWarning."""
from __future__ import annotations

import dataclasses
import inspect as pyinspect
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import fps_graph
from fps_graph import DataError, OptionError
from fps_graph.selection.pipeline import SelectOptions
from fps_graph_cli.main import entry

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"
PUBLIC = {"select", "Selection", "inspect", "load_masks", "apply", "RuntimeConfig", "ImageOptions", "TextOptions",
          "ClusterOptions", "attach", "load_delta", "SparseFineTune", "FpsGraphError", "OptionError", "DataError",
          "ModelError", "RuntimeFailure", "__version__"}


def _child(code: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


LOADED = "json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'onnx', 'onnxruntime', 'torch'}))"


def test_import_is_light_and_torch_comes_only_with_attach():
    got = _child("import json, sys\nimport fps_graph\na = " + LOADED + "\n"
                 "fps_graph.load_masks, fps_graph.select, fps_graph.RuntimeConfig\nb = " + LOADED + "\n"
                 "fps_graph.attach\nc = " + LOADED + "\nprint(json.dumps([a, b, c]))")
    a, b, c = (json.loads(x) for x in got)
    assert a == []                                       # the face alone: errors and the version
    assert "numpy" in b and "onnx" in b and "torch" not in b     # the select side: never torch
    assert "torch" in c


def test_all_is_the_public_api_and_each_name_resolves():
    assert set(fps_graph.__all__) == PUBLIC
    for name in fps_graph.__all__:
        assert getattr(fps_graph, name) is not None, name
    assert fps_graph.attach is __import__("fps_graph.training.sparse", fromlist=["attach"]).attach
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fps_graph.nothing      # noqa: B018
    assert PUBLIC <= set(dir(fps_graph))


@pytest.mark.parametrize("name", ["select", "inspect", "load_masks", "apply", "Selection", "RuntimeConfig"])
def test_public_entry_points_are_documented(name):
    doc = pyinspect.getdoc(getattr(fps_graph, name)) or ""
    for part in ("Args:" if name != "Selection" else "Attributes:", "Example:"):
        if name == "Selection" and part == "Example:":
            continue
        assert part in doc, (name, part)
    if name in ("select", "inspect", "load_masks", "apply"):
        assert "Returns:" in doc
        args = doc.split("Args:")[1].split("Returns:")[0]
        for param in pyinspect.signature(getattr(fps_graph, name)).parameters:
            assert re.search(rf"\b{param}\b", args), (name, param)


def test_select_defaults_are_select_options_defaults():
    """fps_graph.select spells out SelectOptions' fields; their defaults must not drift apart."""
    sig = pyinspect.signature(fps_graph.select).parameters
    renamed = {"anchor_stats_in": "anchor_stats"}
    for f in dataclasses.fields(SelectOptions):
        name = renamed.get(f.name, f.name)
        if f.name in ("image", "text", "static", "runtime", "k", "budget"):   # None there means the same default
            assert sig[name].default is None, name
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert name in sig, name
        assert sig[name].default == default or (not sig[name].default and not default), (name, sig[name].default)


def test_select_equals_the_cli_byte_for_byte(tmp_path):
    rc = fps_graph.RuntimeConfig(provider="cpu")
    sel = fps_graph.select(SAMPLE, IMAGES, budget="2%", granularity="layer", batch_size=16, max_samples=32,
                           runtime=rc, output=tmp_path / "api.safetensors", stats_out=tmp_path / "api.stats")
    assert entry(["select", str(SAMPLE), str(IMAGES), "--budget", "2%", "--granularity", "layer", "--batch-size",
                  "16", "--max-samples", "32", "--provider", "cpu", "-o", str(tmp_path / "cli.safetensors"),
                  "--stats-out", str(tmp_path / "cli.stats"), "-q"]) == 0
    assert (tmp_path / "api.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()
    assert (tmp_path / "api.stats").read_bytes() == (tmp_path / "cli.stats").read_bytes()
    masks = fps_graph.load_masks(tmp_path / "api.safetensors")
    mine = sel.masks()
    assert masks.keys() == mine.keys() and all(np.array_equal(masks[k], mine[k]) for k in masks)
    assert sum(int(m.sum()) for m in masks.values()) == sel.selected and sel.summary["samples"] == 32
    assert sel.save(tmp_path / "dense.safetensors", dense=True) == tmp_path / "dense.safetensors"
    dense = fps_graph.load_masks(tmp_path / "dense.safetensors")
    assert all(np.array_equal(dense[k], masks[k]) for k in masks)


@pytest.mark.parametrize("budget,k,kwargs", [(0.02, None, {}), (None, 3, {}), (500, None, {"granularity": "network"})])
def test_select_budget_spellings(budget, k, kwargs):
    sel = fps_graph.select(SAMPLE, IMAGES, budget=budget, k=k, max_samples=16, batch_size=16,
                           runtime=fps_graph.RuntimeConfig(provider="cpu"), **kwargs)
    if budget == 500:
        assert sel.selected == 500 and sel.metadata["budget"] == "500"
    elif budget:
        assert sel.metadata["budget"] == "0.02" and abs(sel.selected / sel.total - 0.02) < 0.001
    else:
        assert sel.metadata["k"] == "3"


def test_select_refuses_before_any_work(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(OptionError, match="output file exists"):       # before the (missing) data is looked at
        fps_graph.select(SAMPLE, tmp_path / "no-data", output=out)
    with pytest.raises(OptionError, match="either k or budget"):
        fps_graph.select(SAMPLE, IMAGES, k=2, budget="1%")
    with pytest.raises(OptionError, match="budget must be"):
        fps_graph.select(SAMPLE, IMAGES, budget=[1])
    with pytest.raises(DataError, match="data path not found"):
        fps_graph.select(SAMPLE, tmp_path / "no-data")
    assert out.read_bytes() == b"x"
    with pytest.raises(OptionError, match="holds no statistics"):
        fps_graph.select(SAMPLE, score="magnitude").save_stats(tmp_path / "s.safetensors")


def test_inspect_is_the_cli_view(capsys):
    assert entry(["inspect", str(SAMPLE), "--json"]) == 0
    assert fps_graph.inspect(SAMPLE) == json.loads(capsys.readouterr().out)


def test_apply_writes_the_trained_values(tmp_path):
    """A delta written by hand (no torch) lands on the right initializer entries, nothing else changes."""
    from fps_graph.formats.delta import SparseEntry, write_delta

    view = fps_graph.inspect(SAMPLE)
    layer = next(l for l in view["layers"] if l["op"] == "Conv")      # stored in PyTorch's own layout
    model = onnx.load(str(SAMPLE))
    stored = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == layer["weight"])
    idx = np.array([1, 7, 30], dtype=np.int64)
    delta = np.array([0.5, -0.25, 2.0], dtype=np.float32)
    write_delta(tmp_path / "d.safetensors",
                {layer["name"]: SparseEntry(idx, delta, stored.reshape(-1)[idx], stored.shape)}, {},
                {layer["name"]: {"kind": "sparse", "shape": list(stored.shape), "dtype": "float32"}}, {}, {})
    report = fps_graph.apply(SAMPLE, tmp_path / "d.safetensors", tmp_path / "out.onnx")
    assert report["values_changed"] == 3 and report["sparse"] == 1
    out = onnx.load(str(tmp_path / "out.onnx"))
    got = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    want = stored.copy().reshape(-1)
    want[idx] = (want[idx] + delta).astype(np.float32)
    np.testing.assert_array_equal(got[layer["weight"]].reshape(-1), want)
    for t in model.graph.initializer:                 # nothing else changed
        if t.name != layer["weight"]:
            np.testing.assert_array_equal(got[t.name], numpy_helper.to_array(t))
    with pytest.raises(OptionError, match="output file exists"):
        fps_graph.apply(SAMPLE, tmp_path / "d.safetensors", tmp_path / "out.onnx")


# --- old import paths: one more release, with a warning naming the new one ------------------------------------


@pytest.mark.parametrize("old,name,new", [
    ("fps_graph.masks", "load_masks", "fps_graph.load_masks"),
    ("fps_graph.masks", "read_metadata", "fps_graph.formats.masks.read_metadata"),
    ("fps_graph.torch", "attach", "fps_graph.attach"),
    ("fps_graph.torch", "load_delta", "fps_graph.load_delta"),
    ("fps_graph.export", "build_model", "fps_graph.integrations.torch_export.build_model"),
    ("fps_graph.data", "ImageOptions", "fps_graph.data.sources.ImageOptions"),
    ("fps_graph.data.sources", "open_source", "fps_graph.data.dispatch.open_source"),
    ("fps_graph.selection.stats", "Stats", "fps_graph.formats.stats.Stats"),
])
def test_moved_names_still_import_with_a_warning(old, name, new):
    module = __import__(old, fromlist=[name])
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old}.{name} moved to {new}")):
        value = getattr(module, name)
    mod_path, _, attr = new.rpartition(".")
    assert value is getattr(__import__(mod_path, fromlist=[attr]), attr)


def test_the_new_paths_warn_about_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        fps_graph.select(SAMPLE, score="magnitude", k=1).save(tmp_path / "m.safetensors")
        fps_graph.load_masks(tmp_path / "m.safetensors")
        fps_graph.inspect(SAMPLE)


def test_readme_python_uses_only_the_public_api():
    """README's Python examples import from the package face only (deep paths are private)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            m = re.match(r"\s*(from|import)\s+(fps_graph[\w.]*)", line)
            if m:
                assert m.group(2) == "fps_graph", line
