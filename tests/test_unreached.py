"""A weight in an If branch the calibration data never takes is named as skipped everywhere a user looks: the
select warning, the masks header, and inspect (marked as conditional; with --masks, listed as skipped)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fps_graph.formats.masks import load_indices, read_metadata

RNG = np.random.default_rng(0)


def _model(path) -> None:
    """x [B, 6] -> fc (main graph) -> If(c): then: MatMul by W_then [6, 4] (a body constant); else: MatMul by the
    outer W_else [6, 4] then by W_deep [4, 4] inside a nested If that always takes its then branch."""
    f = lambda *s: RNG.standard_normal(s).astype(np.float32)    # noqa: E731
    vi = lambda n, shape=None: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)   # noqa: E731
    then = helper.make_graph([helper.make_node("MatMul", ["h", "W_then"], ["t"], name="mm_then")], "then", [],
                             [vi("t")], [numpy_helper.from_array(f(6, 4), "W_then")])
    inner_then = helper.make_graph([helper.make_node("MatMul", ["e1", "W_deep"], ["d"], name="mm_deep")], "it", [],
                                   [vi("d")], [numpy_helper.from_array(f(4, 4), "W_deep")])
    inner_else = helper.make_graph([helper.make_node("Identity", ["e1"], ["d2"], name="id2")], "ie", [], [vi("d2")])
    other = helper.make_graph([helper.make_node("MatMul", ["h", "W_else"], ["e1"], name="mm_else"),
                               helper.make_node("If", ["c"], ["e"], name="inner", then_branch=inner_then,
                                                else_branch=inner_else)], "else", [], [vi("e")])
    nodes = [helper.make_node("MatMul", ["x", "W_fc"], ["h"], name="fc"),
             helper.make_node("If", ["c"], ["y"], name="cf", then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "g", [vi("x", ["B", 6]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [vi("y")], [numpy_helper.from_array(f(6, 6), "W_fc"), numpy_helper.from_array(f(6, 4), "W_else")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fps_graph_cli.main", *map(str, args)], capture_output=True,
                          text=True)


def test_untaken_branch_weights_are_named_everywhere(tmp_path):
    path = tmp_path / "m.onnx"
    _model(path)
    np.save(tmp_path / "x.npy", RNG.standard_normal((10, 6)).astype(np.float32))
    np.save(tmp_path / "c.npy", np.array(True))             # the then branch, every batch
    out = tmp_path / "masks.safetensors"
    p = _cli("select", path, tmp_path / "x.npy", "--static", f"c={tmp_path / 'c.npy'}", "--k", "1", "-o", out)
    assert p.returncode == 0, p.stderr
    # by construction: W_fc and W_then run; W_else and W_deep (else branch, and an If nested in it) never do
    unreached = {"W_else", "W_deep"}
    warning = next(line for line in p.stderr.splitlines() if "saw no calibration data" in line)
    assert warning.startswith("warning: 2 weights") and all(w in warning for w in unreached)
    assert "W_fc" not in warning and "W_then" not in warning
    meta = read_metadata(out)
    assert set(load_indices(out)) == {"W_fc", "W_then"}
    records = {r["weight"].split("::")[-1]: r for r in meta["skipped"] if "no calibration data" in r["reason"]}
    assert set(records) == unreached
    assert records["W_else"]["node"] == "cf/else_branch/mm_else" and records["W_else"]["shape"] == [6, 4]
    assert records["W_else"]["dtype"] == "float32" and "cf: else_branch" in records["W_else"]["reason"]
    assert "cf: else_branch" in records["W_deep"]["reason"] and "inner: then_branch" in records["W_deep"]["reason"]

    # inspect alone cannot know the data: it marks the layers that run only when their branch is taken
    p = _cli("inspect", path, "--json")
    assert p.returncode == 0, p.stderr
    view = json.loads(p.stdout)
    branches = {layer["name"]: layer["branches"] for layer in view["layers"]}
    assert branches == {"W_fc": [], "W_then": ["cf: then_branch"], "W_else": ["cf: else_branch"],
                        "W_deep": ["cf: else_branch", "cf/else_branch/inner: then_branch"]}
    text = _cli("inspect", path).stdout
    assert "3 of them sit in If branches" in text
    row = next(line for line in text.splitlines() if line.startswith("fc "))
    assert row.rstrip().endswith("always")

    # inspect --masks: the run's view, the unreached weights listed as skipped with the run's reason
    p = _cli("inspect", path, "--masks", out, "--json")
    assert p.returncode == 0, p.stderr
    view = json.loads(p.stdout)
    assert {layer["name"]: layer["selected"] for layer in view["layers"]} == {"W_fc": 6, "W_then": 4}
    skipped = {s["weight"].split("::")[-1]: s["reason"] for s in view["skipped"] if s["weight"]}
    assert unreached <= set(skipped) and all("never taken" in skipped[w] for w in unreached)
    assert view["weights"]["scored_values"] == 36 + 24
    text = _cli("inspect", path, "--masks", out).stdout
    assert "cf/else_branch/mm_else (MatMul): W_else [6, 4] float32: no calibration data" in text


def test_inspect_masks_of_another_model_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    _model(path)
    other = tmp_path / "o.onnx"
    m = onnx.load(str(path))
    m.graph.initializer[0].float_data[:] = []
    w = numpy_helper.to_array(m.graph.initializer[0]) + 1
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
    onnx.save(m, str(other))
    out = tmp_path / "masks.safetensors"
    assert _cli("select", other, "-o", out, "--score", "magnitude", "-q").returncode == 0
    p = _cli("inspect", path, "--masks", out)
    assert p.returncode == 2 and "selected on another model" in p.stderr and p.stdout == ""
