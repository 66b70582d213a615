"""The weight inventory: every weight-like constant named as scored or skipped, the scored share, its warning."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from fps_graph.formats.masks import read_metadata
from fps_graph.graph.inventory import inventory, weight_constants
from fps_graph.graph.layers import Skipped, find_layers, is_weight_like
from fps_graph.graph.model import load_model
from fps_graph.selection.pipeline import SelectOptions, describe, make_plan, run_select

RNG = np.random.default_rng(7)


def _vi(name, elem=TP.FLOAT, shape=None):
    return h.make_tensor_value_info(name, elem, shape)


def cli(*args):
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def embed_graph(path: Path) -> Path:
    """A big embedding table (Gather, 100x20 = 2,000 values) and a small scored MatMul (20x4 = 80); a 3-D MatMul
    weight, a 1-D one, a constant only an Identity to an output reads, a half-precision constant inside a Loop body
    that nothing scores, and an int8 table (quantized, not scored)."""
    f = lambda *s: RNG.normal(size=s).astype(np.float32)   # noqa: E731
    body = h.make_graph([h.make_node("Add", ["h_in", "B16c"], ["h_out"], name="add16"),
                         h.make_node("Identity", ["cond_in"], ["cond_out"], name="cid")], "body",
                        [_vi("i", TP.INT64, []), _vi("cond_in", TP.BOOL, []), _vi("h_in", TP.FLOAT16, [2, 3])],
                        [_vi("cond_out", TP.BOOL, []), _vi("h_out", TP.FLOAT16, [2, 3])],
                        initializer=[nh.from_array(np.ones((2, 3), np.float16), "B16c")])
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             h.make_node("MatMul", ["e", "W"], ["y"], name="fc"),
             h.make_node("MatMul", ["e", "W3"], ["y3"], name="fc3"),
             h.make_node("MatMul", ["e", "w1"], ["y1"], name="fc1"),
             h.make_node("Identity", ["out_table"], ["o"], name="passthrough"),
             h.make_node("Gather", ["q8", "ids"], ["g8"], name="embed8"),
             h.make_node("Loop", ["n", "c"], ["hh"], name="loop", body=body)]
    inits = [nh.from_array(f(100, 20), "table"), nh.from_array(f(20, 4), "W"), nh.from_array(f(2, 20, 3), "W3"),
             nh.from_array(f(20), "w1"), nh.from_array(f(3, 5), "out_table"),
             nh.from_array(RNG.integers(-5, 5, (6, 7)).astype(np.int8), "q8"),
             nh.from_array(np.array(2, np.int64), "n"), nh.from_array(np.array(True), "c")]
    g = h.make_graph(nodes, "g", [_vi("ids", TP.INT64, ["N", 5]), _vi("hh_init", TP.FLOAT16, [2, 3])],
                     [_vi("y"), _vi("y3"), _vi("y1"), _vi("o"), _vi("g8", TP.INT8), _vi("hh", TP.FLOAT16)],
                     initializer=inits)
    # the Loop carries hh_init through the body
    g.node[-1].input.append("hh_init")
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_weight_like():
    assert is_weight_like((2, 3), np.dtype(np.float16)) and is_weight_like((2, 3), np.dtype(np.int8))
    assert not is_weight_like((6,), np.dtype(np.float32)) and not is_weight_like((2, 3), np.dtype(np.int64))
    assert not is_weight_like((2, 3), np.dtype(bool))


def test_every_weight_like_constant_is_scored_or_named(tmp_path):
    path = embed_graph(tmp_path / "e.onnx")
    plan = make_plan(path)
    view = describe(plan)
    assert [layer["weight"] for layer in view["layers"]] == ["W"]
    rec = {s["weight"]: s for s in view["skipped"] if s["weight"]}
    # independently: every >= 2-D float/int8 initializer of every graph, by hand
    m = onnx.load(path)
    expected = {t.name for t in m.graph.initializer if len(t.dims) >= 2} | {"loop/body::B16c"}
    assert set(rec) | {"W"} == expected | {"w1"}      # w1: the 1-D MatMul weight, named though not weight-like
    assert (rec["table"]["node"], rec["table"]["op"], rec["table"]["shape"], rec["table"]["dtype"]) == \
        ("embed", "Gather", [100, 20], "float32")
    assert rec["W3"]["node"] == "fc3" and rec["W3"]["shape"] == [2, 20, 3] and "3 dimensions" in rec["W3"]["reason"]
    assert rec["out_table"]["node"] == "passthrough" and "no scored op reads it" in rec["out_table"]["reason"]
    assert rec["q8"]["dtype"] == "int8" and rec["q8"]["op"] == "Gather"
    assert rec["loop/body::B16c"]["dtype"] == "float16" and rec["loop/body::B16c"]["node"] == "loop/body/add16"
    # the 1-D MatMul weight is named with its shape although it is no weight-like constant
    one_d = next(s for s in view["skipped"] if s["node"] == "fc1")
    assert one_d["weight"] == "w1" and one_d["shape"] == [20] and "1 dimensions" in one_d["reason"]
    sizes = {"table": 2000, "W": 80, "W3": 120, "out_table": 15, "q8": 42, "loop/body::B16c": 6}
    assert sorted(weight_constants(plan.model)) == sorted(sizes)
    inv = plan.inventory()
    assert inv.total_values == sum(sizes.values()) and inv.scored_values == 80
    assert inv.unscored_by_kind == {"Gather": 2042, "MatMul": 120, "Identity": 15, "Add": 6}
    assert inv.largest_unscored(2) == [("Gather", 2042), ("MatMul", 120)]


def test_select_reports_share_and_warns_when_small(tmp_path):
    path = embed_graph(tmp_path / "e.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, ids=RNG.integers(0, 100, (8, 5)).astype(np.int64),
             hh_init=np.zeros((2, 3), np.float16))
    np.save(tmp_path / "hh.npy", np.zeros((2, 3), np.float16))
    np.save(tmp_path / "ids.npy", RNG.integers(0, 100, (8, 5)).astype(np.int64))
    out = tmp_path / "m.safetensors"
    code, _, err = cli("select", path, tmp_path / "ids.npy", "--static", f"hh_init={tmp_path / 'hh.npy'}", "-o", out)
    assert code == 0, err
    total = 2000 + 80 + 120 + 15 + 42 + 6
    share = 80 / total
    warn = [line for line in err.splitlines() if line.startswith("warning: only")]
    assert warn == [f"warning: only {100 * share:.1f}% of the model's {total:,} weight values are scored; the largest "
                    f"unscored kinds: Gather {100 * 2042 / total:.1f}%, MatMul {100 * 120 / total:.1f}%, Identity "
                    f"{100 * 15 / total:.1f}% (inspect lists each weight and why)"]
    assert f"{100 * share:.1f}% of the model's weight values scored" in err
    meta = read_metadata(out)
    assert meta["weights"]["total_values"] == total and meta["weights"]["scored_values"] == 80
    named = {s["weight"] for s in meta["skipped"] if s["weight"]}
    assert named == {"table", "W3", "w1", "out_table", "q8", "loop/body::B16c"}
    code, out_text, _ = cli("inspect", path)
    assert code == 0 and "table [100, 20] float32: read by Gather" in out_text
    assert f"{100 * share:.1f}% of the model's {total:,} weight values are scored" in out_text


def test_no_warning_when_most_is_scored(tmp_path):
    w = RNG.normal(size=(6, 4)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [_vi("x", shape=["N", 6])],
                     [_vi("y")], initializer=[nh.from_array(w, "W")])
    path = tmp_path / "m.onnx"
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", RNG.normal(size=(4, 6)).astype(np.float32))
    res = run_select(path, str(tmp_path / "x.npy"), SelectOptions(k=1))
    assert res.summary["weight_share"] == 1.0 and not any("weight values are scored" in w for w in res.warnings)


def test_include_keeps_the_left_out_weight_named(tmp_path):
    f = lambda *s: RNG.normal(size=s).astype(np.float32)   # noqa: E731
    g = h.make_graph([h.make_node("MatMul", ["x", "A"], ["a"], name="ma"),
                      h.make_node("MatMul", ["a", "B"], ["y"], name="mb")], "g", [_vi("x", shape=["N", 6])],
                     [_vi("y")], initializer=[nh.from_array(f(6, 5), "A"), nh.from_array(f(5, 3), "B")])
    path = tmp_path / "m.onnx"
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    plan = make_plan(path, include=["A"])
    assert [l.weight for l in plan.layers] == ["A"]
    assert plan.skipped == [Skipped("mb", "MatMul", "not matched by --include", weight="B", shape=(5, 3),
                                    dtype="float32", values=15)]
    assert plan.inventory().share == 30 / 45
    layers, skipped = find_layers(load_model(path))
    assert inventory(load_model(path), layers, skipped).share == 1.0
