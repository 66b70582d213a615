"""`fps-graph apply`: the patched ONNX model computes what the fine-tuned PyTorch model computes."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from conftest_train import (CONV_SHAPE, SPEC_CONV, SPEC_CONV_FOLDED, SPEC_TOKEN, TOKEN_SHAPE,  # noqa: E402
                            conv_data, conv_net, conv_net_folded, export, save_weights, select_masks, token_data,
                            token_net)

from fps_graph import FpsGraphError  # noqa: E402
from fps_graph.graph.apply import apply_delta  # noqa: E402
from fps_graph.training.job import run_train, train_job  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402

MODELS = {"token": (token_net, TOKEN_SHAPE, token_data, SPEC_TOKEN),
          "conv": (conv_net, CONV_SHAPE, conv_data, SPEC_CONV),
          "conv_folded": (conv_net_folded, CONV_SHAPE, conv_data, SPEC_CONV_FOLDED)}


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within 1e-4 relative to the output's scale."""
    assert got.shape == want.shape
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-4 * float(np.max(np.abs(want))), f"max abs error {err}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per (model, exporter): weights, plain export (no fps-graph metadata), masks, labelled data; cached."""
    root = tmp_path_factory.mktemp("apply")
    cache: dict = {}

    def get(name: str, exporter: str) -> dict:
        key = (name, exporter)
        if key not in cache:
            factory, shape, data_fn, spec = MODELS[name]
            d = root / f"{name}_{exporter}"
            d.mkdir()
            model = factory()
            onnx_path = export(model, shape, d / "model.onnx", dynamo=exporter == "dynamo")
            x, y = data_fn(64, seed=0, classes=6)
            np.savez(d / "train6.npz", x=x, y=y)
            np.savez(d / "train4.npz", x=x, y=np.minimum(y, 3))
            cache[key] = {"dir": d, "onnx": onnx_path, "spec": spec, "factory": factory,
                          "weights": str(save_weights(model, d / "w.safetensors")),
                          "masks": str(select_masks(onnx_path, x[:32], d / "masks.safetensors", k=2)),
                          "x": data_fn(7, seed=11)[0]}
        return cache[key]

    return get


def train(b: dict, out: Path, num_classes: int | None = None):
    data = b["dir"] / ("train6.npz" if num_classes == 6 else "train4.npz")
    return run_train(train_job(b["spec"], b["masks"], str(data), str(out), weights=b["weights"], epochs=2, lr=2e-2,
                               batch_size=16, num_classes=num_classes, plot=False, threads=1))


@pytest.mark.parametrize("name,exporter,classes", [
    ("token", "legacy", None), ("token", "legacy", 6), ("token", "dynamo", None), ("token", "dynamo", 6),
    ("conv", "legacy", None), ("conv", "dynamo", 6)])
def test_apply_matches_finetuned_pytorch(built, tmp_path, name, exporter, classes):
    b = built(name, exporter)
    result = train(b, tmp_path / "run", classes)
    out = tmp_path / "finetuned.onnx"
    before = sha(b["onnx"])
    report = apply_delta(b["onnx"], tmp_path / "run" / "delta.safetensors", out)
    assert sha(b["onnx"]) == before                       # the input model is never modified

    model = result.handle.model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(b["x"])).numpy()
    got = run_onnx(out, b["x"])
    assert got.shape == (7, classes or 4)
    assert_close(got, want)
    if classes is None:                                   # the fine-tuning did change the outputs
        assert np.max(np.abs(run_onnx(b["onnx"], b["x"]) - want)) > 1e-3

    # same graph, only the trained initializers differ; transposed MatMul copies were patched
    src, dst = onnx.load(str(b["onnx"])), onnx.load(str(out))
    assert [n.SerializeToString() for n in src.graph.node] == [n.SerializeToString() for n in dst.graph.node]
    touched = {u["initializer"] for ups in report["updated"].values() for u in ups}
    for t_src, t_dst in zip(src.graph.initializer, dst.graph.initializer):
        assert t_src.name == t_dst.name
        a, c = onnx.numpy_helper.to_array(t_src), onnx.numpy_helper.to_array(t_dst)
        if t_src.name in touched:
            assert a.shape != c.shape or not np.array_equal(a, c), t_src.name
        else:
            assert np.array_equal(a, c), f"{t_src.name} should be untouched"
    assert set(report["updated"]) == set(result.handle.deltas) | set(result.handle.full)
    if name == "token":
        assert all(report["updated"][k][0]["transpose"] == [1, 0] for k in ("embed.weight", "fc1.weight"))
    if classes:
        shape = dst.graph.output[0].type.tensor_type.shape
        assert shape.dim[1].dim_value == classes and src.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4


def test_apply_to_the_other_exporters_model_and_via_cli(built, tmp_path, capsys):
    legacy, dynamo = built("token", "legacy"), built("token", "dynamo")
    result = train(legacy, tmp_path / "run", 6)
    out = tmp_path / "dyn.onnx"
    code = entry(["apply", str(dynamo["onnx"]), str(tmp_path / "run" / "delta.safetensors"), "-o", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "selected on another ONNX file" in err and "wrote" in err
    with torch.no_grad():
        want = result.handle.model.eval()(torch.from_numpy(dynamo["x"])).numpy()
    assert_close(run_onnx(out, dynamo["x"]), want)
    assert entry(["apply", str(dynamo["onnx"]), str(tmp_path / "run" / "delta.safetensors"), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_external_data_stays_external(built, tmp_path):
    b = built("token", "legacy")
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    proto = onnx.load(str(b["onnx"]))
    src = ext_dir / "model.onnx"
    onnx.save(proto, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
              size_threshold=0)
    data_sha = sha(ext_dir / "model.onnx.data")
    result = train(b, tmp_path / "run")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "ft.onnx"
    report = apply_delta(src, tmp_path / "run" / "delta.safetensors", out)
    assert report["external_data"] == str(out_dir / "ft.onnx.data") and (out_dir / "ft.onnx.data").is_file()
    assert sha(ext_dir / "model.onnx.data") == data_sha
    head = onnx.load(str(out), load_external_data=False)
    big = [t for t in head.graph.initializer if np.prod(t.dims) >= 256]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"ft.onnx.data"}
    assert sorted(p.name for p in out_dir.iterdir()) == ["ft.onnx", "ft.onnx.data"]   # no temporary leftovers
    with torch.no_grad():
        want = result.handle.model.eval()(torch.from_numpy(b["x"])).numpy()
    assert_close(run_onnx(out, b["x"]), want)
    with pytest.raises(FpsGraphError, match="would overwrite the input model"):
        apply_delta(src, tmp_path / "run" / "delta.safetensors", ext_dir / "model.onnx", force=True)


def test_wrong_base_model_and_unmappable_tensors_are_clear_errors(built, tmp_path):
    b = built("token", "legacy")
    train(b, tmp_path / "run")
    delta = tmp_path / "run" / "delta.safetensors"
    other = token_net()
    with torch.no_grad():
        other.fc1.weight.mul_(1.5)
    other_onnx = export(other, TOKEN_SHAPE, tmp_path / "other.onnx", dynamo=False)
    with pytest.raises(FpsGraphError, match=r"the copy of fc1.weight.*does not hold the values training started"):
        apply_delta(other_onnx, delta, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    sample = Path(__file__).resolve().parent.parent / "samples" / "tiny_hybrid.onnx"
    with pytest.raises(FpsGraphError, match=r"cannot find embed.bias \(shape \[16\]\)"):
        apply_delta(sample, delta, tmp_path / "y.onnx")
    # exporters fold a BatchNorm into the conv before it: its initializers are no longer the trained tensors
    # (legacy: renamed; dynamo: same name, other values)
    for exporter, message in (("legacy", r"cannot find conv1.bias .*folded"),
                              ("dynamo", r"'conv1.bias' .*does not hold the values.*BatchNorm into a Conv")):
        conv = built("conv_folded", exporter)
        train(conv, tmp_path / f"conv_{exporter}")
        with pytest.raises(FpsGraphError, match=message):
            apply_delta(conv["onnx"], tmp_path / f"conv_{exporter}" / "delta.safetensors", tmp_path / "z.onnx")


def test_end_to_end_sample_runs(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "samples" / "end_to_end.py"
    spec = importlib.util.spec_from_file_location("end_to_end_sample", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = mod.main(["--workdir", str(tmp_path), "--per-class", "12", "--test-per-class", "8", "--epochs", "3"])
    assert summary["test_images"] == 32 and summary["onnx_vs_pytorch_max_rel_error"] <= 1e-4
    assert summary["accuracy"]["finetuned_onnx"] == summary["accuracy"]["finetuned_pytorch"]
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "tiny_hybrid_finetuned.onnx").is_file()
    assert "held-out accuracy" in capsys.readouterr().out


def test_apply_patches_a_constant_node_inside_an_if_branch(tmp_path):
    """A Conv kernel held by a Constant node inside an If branch (as other producers store weights) is patched in
    place, keeps its name, and the patched model computes what a plain Conv with the trained kernel computes."""
    from onnx import TensorProto as TP, helper as h, numpy_helper as nh

    from fps_graph.formats.delta import SparseEntry, write_delta

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    conv = h.make_node("Conv", ["x", "conv.weight"], ["y"], name="conv", pads=[1, 1, 1, 1])
    const = h.make_node("Constant", [], ["conv.weight"], name="w", value=nh.from_array(kernel, "conv.weight"))
    vi = lambda n, s: h.make_tensor_value_info(n, TP.FLOAT, s)   # noqa: E731
    then = h.make_graph([const, conv], "then", [], [vi("y", ["N", 4, 6, 6])])
    other = h.make_graph([h.make_node("Identity", ["z"], ["y2"], name="id")], "else", [], [vi("y2", ["N", 4, 6, 6])])
    g = h.make_graph([h.make_node("If", ["c"], ["out"], name="sr", then_branch=then, else_branch=other)], "g",
                     [vi("x", ["N", 3, 6, 6]), h.make_tensor_value_info("c", TP.BOOL, []), vi("z", ["N", 4, 6, 6])],
                     [vi("out", ["N", 4, 6, 6])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    idx = np.array([0, 5, 40, 107], dtype=np.int64)
    delta = rng.normal(size=idx.size).astype(np.float32)
    entry = SparseEntry(idx, delta, kernel.reshape(-1)[idx], kernel.shape)
    write_delta(tmp_path / "d.safetensors", {"conv.weight": entry}, {},
                {"conv.weight": {"kind": "sparse", "shape": list(kernel.shape), "dtype": "float32"}}, {}, {})
    report = apply_delta(tmp_path / "m.onnx", tmp_path / "d.safetensors", tmp_path / "out.onnx")
    assert [u["initializer"] for u in report["updated"]["conv.weight"]] == ["sr/then_branch::conv.weight"]
    tuned = kernel.copy().reshape(-1)
    tuned[idx] = entry.values()
    out = onnx.load(str(tmp_path / "out.onnx"))
    body = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert body.node[0].output[0] == "conv.weight" and body.node[0].attribute[0].t.name == "conv.weight"
    np.testing.assert_array_equal(nh.to_array(body.node[0].attribute[0].t).reshape(-1), tuned)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x, "c": np.array(True), "z": np.zeros((2, 4, 6, 6), np.float32)})[0]
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(tuned.reshape(kernel.shape)), padding=1)
    assert_close(got, want.numpy())
