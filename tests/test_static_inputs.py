"""Static inputs (no sample axis: a scale, a bias vector, a recurrent state) fed once for every batch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fps_graph.selection.pipeline import SelectOptions, run_select

F, O, N = 6, 3, 10
RNG = np.random.default_rng(0)
W = RNG.standard_normal((F, O)).astype(np.float32)


def model(tmp_path: Path) -> Path:
    """y = ((x * scale) + shift) @ W, with x [N, F] per sample, scale a scalar and shift [F] static."""
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"]), helper.make_node("Add", ["xs", "shift"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", F]),
                                       helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
                                       helper.make_tensor_value_info("shift", TensorProto.FLOAT, [F])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    return p


@pytest.fixture()
def files(tmp_path):
    x = (RNG.standard_normal((N, F)) + 0.2).astype(np.float32)
    scale = np.array(1.7, dtype=np.float32)
    shift = RNG.standard_normal(F).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "scale.npy", scale)
    np.save(tmp_path / "shift.npy", shift)
    return tmp_path, model(tmp_path), x, scale, shift


def cli(*args) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_static_inputs_enter_statistics_once_per_batch(files, batch):
    root, path, x, scale, shift = files
    opts = SelectOptions(batch_size=batch, provider="cpu", k=1,
                         static={"scale": str(root / "scale.npy"), "shift": str(root / "shift.npy")})
    res = run_select(path, str(root / "x.npy"), opts)
    h = x.astype(np.float64) * float(scale) + shift.astype(np.float64)   # oracle: NumPy on the same data
    np.testing.assert_allclose(res.stats.sums["mm"]["abs"], np.abs(h).sum(0), rtol=1e-5)
    assert res.stats.counts["mm"] == N and res.stats.num_samples == N
    assert not any("fixed" in w for w in res.warnings), res.warnings    # shift's [F] is no batch size


def test_cli_static_option(files):
    root, path, *_ = files
    out = root / "masks.safetensors"
    code, _, err = cli("select", path, root / "x.npy", "-o", out, "-q", "--static", f"scale={root / 'scale.npy'}",
                       "--static", f"shift={root / 'shift.npy'}")
    assert code == 0, err
    assert out.is_file()


@pytest.mark.parametrize("case,message", [
    ("per-sample", "--static shift=FILE.npy"),
    ("npy-only", "--static NAME=FILE.npy"),
    ("missing", "--static shift=FILE.npy"),
    ("unknown", "has no input 'state'"),
    ("malformed", "expected NAME=FILE.npy"),
    ("shape", "does not fit input 'shift'"),
    ("twice", "given twice"),
    ("scalar-in-npz", "--static scale=FILE.npy"),
])
def test_natural_mistakes_are_one_line_errors(files, case, message):
    root, path, x, scale, shift = files
    out = root / "masks.safetensors"
    static = ["--static", f"scale={root / 'scale.npy'}", "--static", f"shift={root / 'shift.npy'}"]
    data = root / "x.npy"
    if case == "per-sample":        # state fed in the data file as if it had a sample axis
        data = root / "all.npz"
        np.savez(data, x=x, scale=np.full(N, scale), shift=shift)
        static = []
    elif case == "npy-only":
        static = []
    elif case == "missing":
        data = root / "some.npz"
        np.savez(data, x=x)
        static = static[:2]
    elif case == "unknown":
        static = static + ["--static", f"state={root / 'scale.npy'}"]
    elif case == "malformed":
        static = ["--static", "scale"]
    elif case == "shape":
        np.save(root / "bad.npy", np.zeros((N, F), np.float32))
        static = static[:2] + ["--static", f"shift={root / 'bad.npy'}"]
    elif case == "twice":
        static = static + static[:2]
    elif case == "scalar-in-npz":
        data = root / "s.npz"
        np.savez(data, x=x, scale=scale, shift=np.tile(shift, (N, 1)))
        static = []
    code, stdout, err = cli("select", path, data, "-o", out, "-q", *static)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
