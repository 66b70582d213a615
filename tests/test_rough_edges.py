"""The rough edges a new user hits (issue 12, section 3): each one fixed, checked here against a reference."""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fps_graph import FpsGraphError
from fps_graph.selection.floor import select_network_floor
from fps_graph.selection.ranking import Budget, select

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"


def cli(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    """The console script in a fresh process: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", *map(str, args)], capture_output=True, text=True,
                       env=env)
    return p.returncode, p.stdout, p.stderr


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], err


# --- --min-per-layer: a floor per tensor under a network-wide budget ----------------------------------------------


def _brute_floor(scores: list[np.ndarray], budget: int, minimum: int) -> list[list[int]]:
    """Exhaustive search: of all selections of `budget` entries with at least min(minimum, size) in every tensor,
    the one with the largest total score (unique for distinct scores)."""
    flat = [(float(v), i, j) for i, s in enumerate(scores) for j, v in enumerate(s.reshape(-1))]
    best, best_sum = None, -1.0
    for combo in itertools.combinations(range(len(flat)), budget):
        counts = np.bincount([flat[c][1] for c in combo], minlength=len(scores))
        if any(counts[i] < min(minimum, s.size) for i, s in enumerate(scores)):
            continue
        total = sum(flat[c][0] for c in combo)
        if total > best_sum:
            best, best_sum = combo, total
    return [sorted(flat[c][2] for c in best if flat[c][1] == i) for i in range(len(scores))]


@pytest.mark.parametrize("seed", range(6))
def test_min_per_layer_matches_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    shapes = [(2, 3), (1, 2), (3, 2)]
    # one tensor's scores far below the others': a plain network budget leaves it empty
    scores = [rng.random(s) * (1e-3 if i == 1 else 1.0) for i, s in enumerate(shapes)]
    minimum = 1 + seed % 2
    budget = 5 if minimum == 1 else 7
    got, _ = select(3, shapes, lambda i: scores[i], budget=Budget(count=budget), granularity="network",
                    min_per_layer=minimum)
    assert [g.tolist() for g in got] == _brute_floor(scores, budget, minimum)
    plain, _ = select(3, shapes, lambda i: scores[i], budget=Budget(count=budget), granularity="network")
    assert plain[1].size == 0                     # what the floor is for
    assert sum(g.size for g in got) == budget


def test_min_per_layer_ties_follow_the_network_order():
    """Equal scores everywhere: the floor takes each tensor's first positions, the rest go to earlier tensors."""
    scores = [np.ones((2, 2)), np.ones((1, 3)), np.ones((2, 1))]
    got = select_network_floor(3, [4, 3, 2], lambda i: scores[i], 6, 1)
    assert [g.tolist() for g in got] == [[0, 1, 2, 3], [0], [0]]
    got = select_network_floor(3, [4, 3, 2], lambda i: scores[i], 8, 3)   # the floor is capped at a tensor's size
    assert [g.tolist() for g in got] == [[0, 1, 2], [0, 1, 2], [0, 1]]
    with pytest.raises(FpsGraphError, match="needs 8 entries over 3 tensors, more than the budget of 6"):
        select_network_floor(3, [4, 3, 2], lambda i: scores[i], 6, 3)


def test_min_per_layer_is_for_network_budgets_only():
    with pytest.raises(FpsGraphError, match="network-wide budget only"):
        select(1, [(2, 2)], lambda i: np.ones((2, 2)), k=1, min_per_layer=1)
    with pytest.raises(FpsGraphError, match="network-wide budget only"):
        select(1, [(2, 2)], lambda i: np.ones((2, 2)), budget=Budget(count=2), granularity="layer", min_per_layer=1)


def test_network_budget_warns_and_counts_empty_tensors(tmp_path):
    from fps_graph.formats.masks import load_indices

    out = tmp_path / "m.safetensors"
    code, _, err = cli("select", SAMPLE, IMAGES, "-o", out, "--budget", "0.2%", "--granularity", "network")
    assert code == 0, err
    empty = [k for k, v in load_indices(out).items() if v.size == 0]
    assert empty, "the sample's network budget no longer leaves a tensor empty; pick a smaller budget"
    assert f"warning: {len(empty)} of 10 scored tensors got no selected entry" in err
    assert f"; {len(empty)} tensor(s) with nothing selected" in err
    floor = tmp_path / "f.safetensors"
    code, _, err = cli("select", SAMPLE, IMAGES, "-o", floor, "--budget", "0.2%", "--granularity", "network",
                       "--min-per-layer", "2")
    assert code == 0 and "nothing selected" not in err, err
    got = load_indices(floor)
    assert all(v.size >= 2 for v in got.values()) and sum(v.size for v in got.values()) == round(0.002 * 18048)


# --- --stats-in A B: never drop input -----------------------------------------------------------------------------


def test_stats_in_with_data_is_refused_and_repeated_flag_sums(tmp_path):
    from fps_graph.formats.masks import read_metadata

    a, b = tmp_path / "a.stats", tmp_path / "b.stats"
    half = tmp_path / "half"
    for cls in ("disc", "square"):
        (half / cls).mkdir(parents=True)
        for f in sorted((IMAGES / cls).iterdir()):
            (half / cls / f.name).write_bytes(f.read_bytes())
    rest = tmp_path / "rest"
    for cls in ("hstripes", "vstripes"):
        (rest / cls).mkdir(parents=True)
        for f in sorted((IMAGES / cls).iterdir()):
            (rest / cls / f.name).write_bytes(f.read_bytes())
    assert cli("select", SAMPLE, half, "-o", tmp_path / "x.safetensors", "--stats-out", a, "-q")[0] == 0
    assert cli("select", SAMPLE, rest, "-o", tmp_path / "y.safetensors", "--stats-out", b, "-q")[0] == 0
    out = tmp_path / "m.safetensors"
    code, _, err = cli("select", SAMPLE, "--stats-in", a, b, "-o", out)        # the README's old spelling
    assert code == 2 and not out.exists()
    one_error_line(err, f"DATA ({b}) and --stats-in both given", "--stats-in A --stats-in B")
    code, _, err = cli("select", SAMPLE, "--stats-in", a, "--stats-in", b, "-o", out, "-q")
    assert code == 0, err
    assert read_metadata(out)["num_samples"] == 64                           # both halves, all 64 images


# --- train/export without torch: one line saying what to install ------------------------------------------------


@pytest.mark.parametrize("args", [
    ["train", "m.py:f", "--masks", "m.safetensors", "--data", "d", "-o", "run"],
    ["export", "m.py:f", "--input-shape", "1,3,8,8", "-o", "m.onnx"],
])
def test_without_torch_one_line_says_what_to_install(tmp_path, args):
    code = ("import sys; sys.modules['torch'] = None\n"       # what a machine without torch sees on `import torch`
            "from fps_graph_cli.main import entry\n"
            f"sys.exit(entry({args!r}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    one_error_line(p.stderr, f"`fps-graph {args[0]}` needs torch, which is not installed",
                   "pip install torch==2.13.0, then pip install 'fps-graph[torch]'")
    assert "index-url" not in p.stderr and "download.pytorch.org" not in p.stderr   # nothing against the README
    assert list(tmp_path.iterdir()) == []


def test_missing_package_deeper_down_is_one_line(tmp_path):
    code = ("import sys; sys.modules['PIL'] = None\n"
            "from fps_graph_cli.main import entry\n"
            f"sys.exit(entry(['select', {str(SAMPLE)!r}, {str(IMAGES)!r}, '-o', 'm.safetensors']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    one_error_line(p.stderr, "the Python package 'PIL' is missing or broken: pip install PIL")


# --- ONNX Runtime errors: the whole text, one line ---------------------------------------------------------------


def _mlp(ir: int = 8, opset: int = 17, dims=("N", "T", 12), extra_value: tuple | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((12, 24)).astype(np.float32), rng.standard_normal((24, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    if extra_value:
        g.value_info.append(helper.make_tensor_value_info(*extra_value))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def test_ort_message_keeps_the_line_naming_the_dimension():
    import onnxruntime as ort

    from fps_graph.runtime.session import ort_message

    sess = ort.InferenceSession(_mlp(dims=(2, 3, 12)).SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as info:
        sess.run(None, {"x": np.zeros((2, 3, 13), np.float32)})
    assert "\n" in str(info.value)                                     # ORT's own text spans lines
    text = ort_message(info.value)
    assert "\n" not in text and "index: 2 Got: 13 Expected: 12" in text


def test_ort_failure_in_select_is_one_line_with_the_node(tmp_path):
    onnx.save(_mlp(dims=("N", "T", "F")), tmp_path / "dyn.onnx")    # nothing declared: only ORT can tell
    np.save(tmp_path / "x.npy", np.ones((4, 3, 13), np.float32))
    code, _, err = cli("select", tmp_path / "dyn.onnx", tmp_path / "x.npy", "-o", tmp_path / "m.safetensors")
    assert code == 2
    one_error_line(err, "ONNX Runtime failed on a batch", "Name:'mm1'", "MatMul dimension mismatch")
    assert not (tmp_path / "m.safetensors").exists()


# --- models saved by a newer onnx (IR 14, opset 28) ----------------------------------------------------------------


def test_newer_ir_and_opset_load_when_nothing_newer_is_used(tmp_path):
    from fps_graph.formats.masks import load_indices
    from fps_graph.graph.model import load_model
    from fps_graph.graph.versions import runtime_limits

    limits = runtime_limits()
    if limits is None or limits >= (14, 28):
        pytest.skip("this ONNX Runtime reads IR 14 / opset 28 itself")
    onnx.save(_mlp(), tmp_path / "old.onnx")
    new = _mlp(ir=14, opset=28)
    onnx.save(new, tmp_path / "new.onnx")
    raw = (tmp_path / "new.onnx").read_bytes()
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((6, 3, 12)).astype(np.float32))
    for name in ("old", "new"):
        code, _, err = cli("select", tmp_path / f"{name}.onnx", tmp_path / "x.npy", "-o", tmp_path / f"{name}.m", "-q")
        assert code == 0, err
    a, b = load_indices(tmp_path / "old.m"), load_indices(tmp_path / "new.m")
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    assert (tmp_path / "new.onnx").read_bytes() == raw                  # the file is never rewritten
    m = load_model(tmp_path / "new.onnx")
    assert m.proto.ir_version == limits[0] and m.opset == limits[1] and len(m.version_notes) == 2


def test_newer_ir_features_are_refused_in_one_line(tmp_path):
    from fps_graph.graph.versions import runtime_limits

    limits = runtime_limits()
    if limits is None or limits[0] >= 14:
        pytest.skip("this ONNX Runtime reads IR 14 itself")
    onnx.save(_mlp(ir=14, extra_value=("z", TensorProto.FLOAT6E2M3, [1])), tmp_path / "f6.onnx")
    np.save(tmp_path / "x.npy", np.ones((2, 3, 12), np.float32))
    code, _, err = cli("select", tmp_path / "f6.onnx", tmp_path / "x.npy", "-o", tmp_path / "m.safetensors")
    assert code == 2
    one_error_line(err, "ONNX Runtime cannot load this model", "FLOAT6E2M3 in value 'z'", "upgrade onnxruntime")
    code, out, _ = cli("inspect", tmp_path / "f6.onnx")                 # no runtime needed: still works
    assert code == 0 and "mm1" in out


def test_opset_with_a_changed_operator_is_not_lowered():
    from fps_graph.graph.versions import changed_ops

    m = _mlp(opset=28)
    assert changed_ops(m, 26) == []
    assert changed_ops(m, 14) == []
    assert changed_ops(m, 13) == ["Relu"]                       # Relu-14 (bfloat16) is newer than opset 13
    assert changed_ops(m, 12) == ["MatMul", "Relu"]             # and MatMul-13 newer than opset 12


# --- integer / float64 arrays that look unnormalised --------------------------------------------------------------


@pytest.mark.parametrize("dtype,scale,warns", [(np.uint8, 255, True), (np.int64, 255, True), (np.float64, 255, True),
                                               (np.float64, 1, False), (np.int64, 1, False), (np.float32, 255, False)])
def test_unnormalised_arrays_warn(tmp_path, dtype, scale, warns):
    x = (np.random.default_rng(0).random((8, 3, 32, 32)) * scale).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    code, _, err = cli("select", SAMPLE, tmp_path / "x.npy", "-o", tmp_path / "m.safetensors", "-q")
    assert code == 0, err
    if warns:
        assert err.count("warning: ") == 1 and f"input 'input' is {np.dtype(dtype).name} with values" in err
        assert "normalise them first" in err
    else:
        assert "warning" not in err, err


# --- .npz shards whose sequence lengths differ ----------------------------------------------------------------------


def test_npz_shards_of_different_lengths_batch_by_shape(tmp_path):
    from fps_graph.selection.pipeline import SelectOptions, run_select

    onnx.save(_mlp(), tmp_path / "m.onnx")
    rng = np.random.default_rng(2)
    shards = [rng.standard_normal((5, 3, 12)), rng.standard_normal((4, 7, 12)), rng.standard_normal((3, 3, 12))]
    data = tmp_path / "shards"
    data.mkdir()
    for i, x in enumerate(shards):
        np.savez(data / f"part{i}.npz", x=x.astype(np.float32))
    res = run_select(tmp_path / "m.onnx", str(data), SelectOptions(k=2, batch_size=4, provider="cpu"))
    tokens = np.concatenate([x.astype(np.float32).reshape(-1, 12) for x in shards]).astype(np.float64)
    np.testing.assert_allclose(res.stats.sums["mm1"]["abs"], np.abs(tokens).sum(0), rtol=1e-6)
    assert res.stats.counts["mm1"] == tokens.shape[0] and res.stats.num_samples == 12
    shuffled = run_select(tmp_path / "m.onnx", str(data), SelectOptions(k=2, batch_size=3, provider="cpu",
                                                                       shuffle=True, max_samples=10))
    assert shuffled.stats.num_samples == 10
    # one shape per batch, shapes in order of first appearance; the 3-token shards share batches
    assert [b.tolist() for b in _batches(data, 3)] == [[0, 1, 2], [3, 4, 9], [10, 11], [5, 6, 7], [8]]


def _batches(folder: Path, batch_size: int) -> list[np.ndarray]:
    from fps_graph.data.sources import InputSpec, open_source

    src = open_source(folder, [InputSpec("x", ("N", "T", 12), np.dtype(np.float32))])
    return src.batches(np.arange(len(src)), batch_size)


def test_anchor_with_anchor_stats_is_refused(tmp_path):
    out = tmp_path / "m.safetensors"
    code, _, err = cli("select", SAMPLE, IMAGES, "--score", "gd-fps", "--anchor", IMAGES, "--anchor-stats",
                       tmp_path / "a.stats", "-o", out)
    assert code == 2 and not out.exists()
    one_error_line(err, "--anchor and --anchor-stats both given")
