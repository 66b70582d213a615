"""Observed conv graphs keep ONNX Runtime's NCHWc layout: its optimized graph is reordered so that every reducer
(and the layout conversion that feeds it) runs right after its activation exists (graph.observe.reducers_first,
runtime.session regroup). The statistics against PyTorch hooks are in test_select_oracle.py (widecnn)."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from fps_graph.graph.discover import find_layers
from fps_graph.graph.model import load_model
from fps_graph.graph.observe import PREFIX, augment, reducers_first
from fps_graph.runtime.calibrate import BatchStats
from fps_graph.runtime.config import RuntimeConfig
from fps_graph.runtime.session import _options, create_session

from conftest import MODELS


def _node(op, ins, outs, name=None):
    return helper.make_node(op, ins, outs, name=name or outs[0])


def test_reducers_first_moves_each_reducer_right_after_its_input():
    """A chain a -> b -> c with two observed activations whose conversions come last (as NCHWc's Finalize appends
    them): each conversion and its reducer move right after their producer; the chain keeps its order."""
    nodes = [_node("Relu", ["x"], ["a"]), _node("Relu", ["a"], ["b"]), _node("Relu", ["b"], ["c"]),
             _node("Abs", ["x"], [f"{PREFIX}_0_abs"]),
             _node("ReorderOutput", ["a"], ["a_nchw"]), _node("ReorderOutput", ["b"], ["b_nchw"]),
             _node("Abs", ["a_nchw"], [f"{PREFIX}_1_abs"]), _node("Abs", ["b_nchw"], [f"{PREFIX}_2_abs"]),
             _node("Identity", ["c"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                           for n in ("out", f"{PREFIX}_0_abs", f"{PREFIX}_1_abs", f"{PREFIX}_2_abs")])
    reducers_first(g)
    assert [n.output[0] for n in g.node] == [f"{PREFIX}_0_abs", "a", "a_nchw", f"{PREFIX}_1_abs", "b", "b_nchw",
                                             f"{PREFIX}_2_abs", "c", "out"]


def _profiled_order(source, x: np.ndarray, tmp_path, level: str = "disable") -> list[tuple[str, str]]:
    """(node name, op) of every kernel one run executes, in order."""
    so = _options(level, 1)
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / f"prof_{level}")
    sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    sess.run(None, {sess.get_inputs()[0].name: x})
    events = json.load(open(sess.end_profiling()))
    return [(e["name"][: -len("_kernel_time")], e["args"]["op_name"]) for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def test_widecnn_runs_nchwc_with_each_reducer_after_its_activation(exported, tmp_path):
    """16/32-channel convs: the session is regrouped; ONNX Runtime runs the regrouped graph in file order, where
    every ReorderOutput that only reducers read runs right after its producer (in NCHWc's own order they all run
    after the last conv); and the sums are bit for bit those of the same NCHWc graph in ONNX Runtime's order."""
    _, path, _, data = exported("widecnn", "legacy")
    model = load_model(path)
    layers, _ = find_layers(model)
    step = BatchStats(model, layers, runtime=RuntimeConfig(provider="cpu", threads=1, micro_batch=8))
    assert step.session.regrouped
    regrouped = os.path.join(step.session._more_tmp[0], "regrouped.onnx")
    graph = onnx.load(regrouped, load_external_data=False).graph
    assert any(n.domain == "com.microsoft.nchwc" for n in graph.node)          # NCHWc kept
    names = [n.name for n in graph.node]
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    convs = [i for i, n in enumerate(graph.node) if n.op_type == "Conv"]
    late = 0
    for i, n in enumerate(graph.node):
        if n.op_type == "ReorderOutput":
            src = producer[n.input[0]]
            late += any(src < c < i for c in convs)
    assert late == 0
    # ORT kept the file order (but for Shape and Size, which its priority-based order runs as soon as they can)
    timed = {n.name for n in graph.node if n.op_type not in ("Shape", "Size")}
    order = _profiled_order(regrouped, data[:8], tmp_path)
    ran = [name for name, _ in order if name in timed]
    assert len(ran) > 20 and ran == [name for name in names if name in set(ran)]
    ops = [op for _, op in order]
    first_reorder = ops.index("ReorderOutput")
    last_conv = len(ops) - 1 - ops[::-1].index("Conv")
    assert first_reorder < last_conv
    # ONNX Runtime's own order of the same NCHWc graph: every conversion after the last conv (what regroup fixes)
    ops = [op for _, op in _profiled_order(augment(model.proto, step.observers, stats=("abs",)).SerializeToString(),
                                            data[:8], tmp_path, "all")]
    assert ops.index("ReorderOutput") > len(ops) - 1 - ops[::-1].index("Conv")

    x = data[:8]
    got = step({"input": x})
    plain = create_session(augment(model.proto, step.observers, stats=("abs",)), "cpu", threads=1)
    outs = dict(zip([o.name for o in plain.session.get_outputs()], plain.session.run(None, {"input": x})))
    same = BatchStats.__new__(BatchStats)
    same.__dict__.update(step.__dict__)
    same.session, same.out_names = plain, list(outs)
    same.micro = step.micro
    want = same({"input": x})
    for node, slot in want.sums.items():
        assert np.array_equal(got.sums[node]["abs"], slot["abs"]), node
    step.close()
    plain.close()


def test_a_regrouped_graph_onnx_runtime_cannot_read_falls_back_to_nchw(exported, monkeypatch):
    """Should ORT refuse its own optimized graph, the session is the ordinary one without NCHWc (the sums are
    those of an NCHWc-free session bit for bit); control flow never takes the regrouped path."""
    import fps_graph.runtime.session as session_mod
    from fps_graph.graph.versions import ort_errors

    _, path, _, data = exported("widecnn", "legacy")
    model = load_model(path)
    layers, _ = find_layers(model)

    def refuse(*args, **kwargs):
        raise ort_errors()[0]("cannot read it back")

    monkeypatch.setattr(session_mod, "_regrouped", refuse)
    step = BatchStats(model, layers, runtime=RuntimeConfig(provider="cpu", threads=1, micro_batch=8))
    assert not step.session.regrouped
    got = step({"input": data[:8]})
    off = create_session(augment(model.proto, step.observers, stats=("abs",)), "cpu", threads=1,
                         disabled_optimizers=("NchwcTransformer",))
    outs = dict(zip([o.name for o in off.session.get_outputs()], off.session.run(None, {"input": data[:8]})))
    pointwise = [obs for obs in step.observers if obs.kind == "features"]
    assert pointwise                        # c5 (1x1): its sums come from the graph as they are
    for obs in pointwise:
        if obs.kind == "features":
            node = step.users[obs.index][0].node
            assert np.array_equal(got.sums[node]["abs"], outs[obs.output("abs")].astype(np.float64).reshape(
                got.sums[node]["abs"].shape)), node
    step.close()
    off.close()
