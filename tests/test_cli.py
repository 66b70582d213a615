"""The CLI end to end: the bundled sample (images), npz inputs, dense masks, stats files, inspect, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fps_graph.formats.masks import load_indices, load_masks, read_metadata
from fps_graph_cli.main import entry

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"


def cli(*args: str) -> tuple[int, str, str]:
    """Run the installed console script in a fresh process (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_select_on_sample_images(tmp_path):
    out = tmp_path / "masks.safetensors"
    code, _, err = cli("select", SAMPLE, IMAGES, "-o", out, "--k", "2", "--batch-size", "16")
    assert code == 0, err
    assert "selected" in err and "samples/s" in err and "peak RSS" in err
    meta = read_metadata(out)
    assert meta["num_samples"] == 64 and meta["score"] == "fps" and meta["k"] == 2
    masks = load_masks(out)
    assert masks["blocks.0.qkv.weight"].shape == (96, 32)                 # PyTorch layout, not the [in, out] ONNX one
    assert (masks["blocks.0.qkv.weight"].sum(1) == 2).all()
    assert (masks["patch_embed.weight"].reshape(32, -1).sum(1) == 2).all()
    assert meta["tensors"]["blocks.0.qkv.weight"]["layout"] == {"transpose": [1, 0]}
    total = sum(t["total"] for t in meta["tensors"].values())
    assert total == 18048 and meta["selected"] == sum(int(m.sum()) for m in masks.values())
    # dense output holds the same selection
    dense = tmp_path / "dense.safetensors"
    assert cli("select", SAMPLE, IMAGES, "-o", dense, "--k", "2", "--dense", "-q")[0] == 0
    d = load_masks(dense)
    assert all(np.array_equal(d[k], masks[k]) for k in masks)
    assert {k: v.tolist() for k, v in load_indices(dense).items()} == \
        {k: v.tolist() for k, v in load_indices(out).items()}


def test_stats_out_then_stats_in_and_wanda(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st = tmp_path / "stats.safetensors"
    assert cli("select", SAMPLE, IMAGES, "-o", a, "--score", "wanda", "--stats-out", st, "-q")[0] == 0
    code, _, err = cli("select", SAMPLE, "-o", b, "--score", "wanda", "--stats-in", st, "-q")
    assert code == 0, err
    assert {k: v.tolist() for k, v in load_indices(a).items()} == {k: v.tolist() for k, v in load_indices(b).items()}


def test_inspect_json():
    code, out, _ = cli("inspect", SAMPLE, "--json")
    assert code == 0
    view = json.loads(out)
    assert len(view["layers"]) == 10 and view["scored_params"] == 18048
    assert {s["reason"] for s in view["skipped"] if not s["weight"]} == {
        "weight input 'transpose_1' is computed at run time, not a constant",
        "weight input 'getitem_2' is computed at run time, not a constant",
        "weight input 'transpose_3' is computed at run time, not a constant",
        "weight input 'getitem_5' is computed at run time, not a constant"}
    weights = [s for s in view["skipped"] if s["weight"]]
    assert weights == [{"node": weights[0]["node"], "op": "Add", "weight": "pos_embed", "shape": [1, 64, 32],
                        "dtype": "float32", "values": 2048,
                        "reason": "a constant input of Add, which is not scored (only MatMul, Gemm and Conv weights are)"}]
    # every >= 2-D float initializer is either scored or that one skipped record
    m = onnx.load(SAMPLE)
    total = sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) >= 2)
    assert view["weights"]["total_values"] == total and view["weights"]["scored_values"] == total - 2048
    assert view["weights"]["unscored_by_kind"] == {"Add": 2048}
    qkv = next(l for l in view["layers"] if l["name"] == "blocks.0.qkv.weight")
    assert qkv["weight_shape"] == [32, 96] and qkv["name_source"] == "export-metadata"


def test_budget_network_on_sample(tmp_path):
    out = tmp_path / "m.safetensors"
    assert cli("select", SAMPLE, IMAGES, "-o", out, "--budget", "0.5%", "--granularity", "network", "-q")[0] == 0
    meta = read_metadata(out)
    assert meta["selected"] == round(0.005 * 18048) and meta["granularity"] == "network"


@pytest.mark.parametrize("args,message", [
    (["select", "missing.onnx", str(IMAGES)], "model file not found: missing.onnx"),
    (["select", str(SAMPLE), "nowhere/"], "data path not found: nowhere"),
    (["select", str(SAMPLE), str(IMAGES), "--budget", "0"], "--budget 0: a count must be positive"),
    (["select", str(SAMPLE), str(IMAGES), "--k", "2", "--budget", "1%"], "give either --k or --budget, not both"),
    (["select", str(SAMPLE), str(IMAGES), "--score", "gd-fps"], "--score gd-fps needs --anchor"),
    (["select", str(SAMPLE), str(IMAGES), "--score", "bogus"], "Invalid value for '--score'"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "m.safetensors"
    code, stdout, err = cli(*args, "-o", out)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = cli("select", SAMPLE, IMAGES, "-o", out, "-q")
    assert code == 2 and "exists" in err and out.read_bytes() == b"keep me"
    assert cli("select", SAMPLE, IMAGES, "-o", out, "-q", "--force")[0] == 0
    assert read_metadata(out)["format"] == "fps-graph-masks"


def test_entry_function_returns_code(tmp_path):
    assert entry(["select", str(SAMPLE), str(IMAGES), "-o", str(tmp_path / "m.safetensors"), "-q"]) == 0
