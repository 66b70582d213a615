"""Selection memory is O(largest layer): a synthetic model with many large layers, measured in fresh processes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

LAYERS, WIDTH = 40, 1024          # 40 x 1024 x 1024 fp32 = 160 MB of weights; one layer = 4 MB (8 MB as float64)

PEAK = """
import json, resource, sys
from fps_graph_cli.main import entry
code = entry(sys.argv[1:])
print(json.dumps({"code": code, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(*args: str) -> float:
    p = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["code"] == 0, p.stderr
    return rec["peak_mb"]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "x"
    for i in range(LAYERS):
        inits.append(numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 32, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"a{i}"]))
        prev = f"a{i}"
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, d / "big.onnx", save_as_external_data=True, location="big.data")
    np.save(d / "x.npy", rng.standard_normal((16, WIDTH)).astype(np.float32))
    return d


def test_network_budget_memory_is_bounded_by_largest_layer(big_model, tmp_path):
    model = str(big_model / "big.onnx")
    base = peak("inspect", model)
    sel = peak("select", model, "--score", "magnitude", "--budget", "10%", "--granularity", "network", "-q",
               "-o", str(tmp_path / "a.safetensors"))
    all_scores_mb = LAYERS * WIDTH * WIDTH * 8 / 2**20           # 320 MB if every score were held at once
    layer_mb = WIDTH * WIDTH * 8 / 2**20
    # bound: a dozen float64 copies of the largest layer above what loading the model costs
    assert sel - base < 12 * layer_mb < all_scores_mb, (base, sel)


def test_calibrated_selection_memory(big_model, tmp_path):
    model = str(big_model / "big.onnx")
    base = peak("inspect", model)
    sel = peak("select", model, str(big_model / "x.npy"), "--budget", "10%", "--granularity", "network", "-q",
               "-o", str(tmp_path / "b.safetensors"))
    weights_mb = LAYERS * WIDTH * WIDTH * 4 / 2**20
    # ONNX Runtime holds the weights once (160 MB); selection adds O(largest layer) on top
    assert sel - base < weights_mb + 12 * WIDTH * WIDTH * 8 / 2**20, (base, sel)
