"""`fps-graph export`: the recorded weight map names every scored initializer, checked against the state dict."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.torch import save_file

from fps_graph.graph.layers import find_layers
from fps_graph.graph.model import load_model
from fps_graph.graph.names import META_KEY, resolve_names

MODELS_PY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        t = self.mlp(self.proj(t))
        return self.head(t.mean(1))

def build():
    torch.manual_seed(1)
    return Net()
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    (d / "mymodels.py").write_text(MODELS_PY)
    sys.path.insert(0, str(d))
    import mymodels
    import torch

    m = mymodels.build()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_file(m.state_dict(), str(d / "w.safetensors"))
    return d


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_export_records_weight_map(project, exporter):
    out = project / f"net_{exporter}.onnx"
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "export", "mymodels:build", "--weights",
                        str(project / "w.safetensors"), "--input-shape", "1,3,6,6", "-o", str(out), "--exporter",
                        exporter], capture_output=True, text=True, cwd=project)
    assert p.returncode == 0, p.stderr
    assert "5 weights mapped to PyTorch names" in p.stderr
    proto = onnx.load(out)
    meta = {e.key: e.value for e in proto.metadata_props}
    wmap = json.loads(meta[META_KEY])
    names = {v["torch"] for v in wmap.values()}
    assert names == {"conv.weight", "proj.weight", "mlp.0.weight", "mlp.2.weight", "head.weight"}
    from safetensors.numpy import load_file

    sd = load_file(str(project / "w.safetensors"))
    model = load_model(out)
    for init, rec in wmap.items():
        stored = model.tensor(init)
        key = stored.transpose(rec["transpose"]) if rec["transpose"] else stored
        np.testing.assert_array_equal(key, sd[rec["torch"]])
    infos = resolve_names(model, find_layers(model)[0])
    assert all(i.how == "export-metadata" for i in infos.values())
    # the batch axis is dynamic
    assert not proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def test_value_match_names_a_bare_export(project, tmp_path):
    """A model exported by someone else (legacy, constant folding, no metadata) maps by value with --state-dict."""
    import warnings

    import torch
    import mymodels

    m = mymodels.build()
    from safetensors.torch import load_file as load_pt

    m.load_state_dict(load_pt(str(project / "w.safetensors")))
    path = tmp_path / "bare.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m.eval(), (torch.randn(1, 3, 6, 6),), str(path), dynamo=False)
    proto = onnx.load(path)
    for n in proto.graph.node:       # strip the scope names so only the value match can find them
        n.name = ""
    onnx.save(proto, path)
    from safetensors.numpy import load_file

    model = load_model(path)
    layers = find_layers(model)[0]
    bare = resolve_names(model, layers)
    assert sum(i.torch is not None for i in bare.values()) == 2          # conv.weight, head.weight by name only
    infos = resolve_names(model, layers, load_file(str(project / "w.safetensors")))
    assert {i.torch for i in infos.values()} == {"conv.weight", "proj.weight", "mlp.0.weight", "mlp.2.weight",
                                                 "head.weight"}
    assert {i.how for i in infos.values()} == {"initializer-name", "value-match"}


BN_PY = '''
import torch
from torch import nn

class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2))

def build():
    torch.manual_seed(2)
    m = ConvBN()
    with torch.no_grad():
        m.bn.running_var.uniform_(0.5, 4.0)
        m.bn.weight.uniform_(0.5, 3.0)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m
'''


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_default_export_keeps_module_weights_for_budgets(tmp_path, exporter):
    """Without --fold, BatchNorm is not folded into the conv weight, so network budgets rank the real weights."""
    (tmp_path / "bnmodels.py").write_text(BN_PY)
    sys.path.insert(0, str(tmp_path))
    import importlib

    import bnmodels
    importlib.reload(bnmodels)
    from oracle import hook_stats, network_oracle, torch_scores

    from fps_graph.selection.pipeline import SelectOptions, run_select
    from fps_graph.selection.ranking import Budget

    out = tmp_path / "m.onnx"
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "export", "bnmodels:build", "--input-shape",
                        "1,3,5,5", "-o", str(out), "--exporter", exporter], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    model = bnmodels.build().eval()
    data = np.random.default_rng(0).standard_normal((12, 3, 5, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    res = run_select(out, str(tmp_path / "x.npy"), SelectOptions(budget=Budget(fraction=0.2), granularity="network",
                                                                  provider="cpu", batch_size=4))
    assert res.warnings == []
    stats, order = hook_stats(model, data)
    scores = torch_scores(model, stats, "fps")
    want = network_oracle(scores, [f"{m}.weight" for m in order], int(round(0.2 * sum(s.size for s in scores.values()))))
    for key, m in want.items():
        assert res.indices[key].tolist() == np.flatnonzero(m).tolist(), key
    # a folded export says so when selecting
    folded = tmp_path / "folded.onnx"
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "export", "bnmodels:build", "--input-shape",
                        "1,3,5,5", "-o", str(folded), "--exporter", exporter, "--fold"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = run_select(folded, str(tmp_path / "x.npy"), SelectOptions(k=1, provider="cpu", batch_size=4))
    assert any("BatchNorm" in w for w in res.warnings), res.warnings
