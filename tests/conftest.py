"""Shared fixtures: tiny PyTorch models exported with both exporters, and calibration data on disk."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402


class MLP3D(nn.Module):
    """Linear layers on 3-D input: exported as transposed MatMul weights."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 16, bias=False)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.tanh(self.fc1(x)))))


class CNN(nn.Module):
    """Padded, strided, dilated, grouped and depthwise convs, then a Linear head (Gemm)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)            # depthwise
        self.c4 = nn.Conv2d(8, 12, (2, 3), stride=(2, 1), padding=(0, 1))
        self.c5 = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        x = self.c5(x)
        return self.head(x.mean((2, 3)))


class WideCNN(nn.Module):
    """Convs with 16 and 32 channels, which ONNX Runtime runs in its blocked NCHWc layout: a residual add, a strided,
    a dilated grouped and a pointwise conv, then a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=2)
        self.c5 = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = x + torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        return self.head(self.c5(x).mean((2, 3)))


class Block(nn.Module):
    """A small pre-norm transformer block with a shared-input qkv split into three Linears."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4.0, -1) @ self.v(h)
        x = x + self.proj(a)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Transformer(nn.Module):
    """Token embedding by a Linear, one block, a Gemm head on the mean token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(10, 16)
        self.block = Block()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(1))


MODELS = {
    "mlp": (MLP3D, (2, 7, 12)),
    "cnn": (CNN, (2, 3, 17, 15)),
    "widecnn": (WideCNN, (2, 3, 19, 18)),
    "transformer": (Transformer, (2, 6, 10)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A model with seeded, perturbed weights (no bit-identical tensors for exporters to merge)."""
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def export_model(model: nn.Module, shape: tuple, path: Path, dynamo: bool) -> Path:
    """Export with a dynamic batch axis, quietly."""
    x = torch.randn(*shape)
    kwargs = {"input_names": ["input"], "output_names": ["output"], "dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    else:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


def make_data(name: str, n: int, seed: int = 1) -> np.ndarray:
    """Calibration inputs with non-zero mean so |x| statistics are not all alike."""
    shape = MODELS[name][1]
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *shape[1:])) * rng.uniform(0.5, 2.0, shape[-1]) + 0.3).astype(np.float32)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """{(model, exporter): (torch model, onnx path, data path, data array)} built once per session."""
    root = tmp_path_factory.mktemp("models")
    cache: dict = {}

    def get(name: str, exporter: str):
        key = (name, exporter)
        if key not in cache:
            model = build(name)
            path = export_model(model, MODELS[name][1], root / f"{name}_{exporter}.onnx", exporter == "dynamo")
            data = make_data(name, 37)
            dpath = root / f"{name}.npy"
            np.save(dpath, data)
            cache[key] = (model, path, dpath, data)
        return cache[key]

    return get
