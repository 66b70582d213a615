"""Helpers for the train/apply tests: tiny models with factories, labelled data, exports and masks.

Imported by tests/test_torch.py, test_train.py and test_apply.py (pytest puts tests/ on sys.path). The factories
are also reachable as 'tests/conftest_train.py:token_net' for `fps-graph train`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SPEC_TOKEN = f"{HERE / 'conftest_train.py'}:token_net"
SPEC_CONV = f"{HERE / 'conftest_train.py'}:conv_net"
SPEC_CONV_FOLDED = f"{HERE / 'conftest_train.py'}:conv_net_folded"
TOKENS, FEATURES = 6, 10
TOKEN_SHAPE = (2, TOKENS, FEATURES)
CONV_SHAPE = (2, 3, 12, 12)


class TokenNet(nn.Module):
    """Linear token embedding (3-D input: transposed MatMul weights), position embedding, class token,
    LayerNorm, an MLP, and a Linear head on the mean token (2-D input: Gemm)."""

    def __init__(self, num_classes: int = 4, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(FEATURES, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, TOKENS, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos_embed
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm1(h))))
        return self.head(self.norm(h).mean(1))


class ConvNet(nn.Module):
    """BatchNorm, Conv, Conv, mean pool, Linear head. With folded=True the BatchNorm follows the first conv instead,
    where both exporters fold it into the conv's weights (so those initializers are no trained tensor)."""

    def __init__(self, num_classes: int = 4, folded: bool = False):
        super().__init__()
        self.folded = folded
        self.bn = nn.BatchNorm2d(8 if folded else 3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x))) if self.folded else torch.relu(self.conv1(self.bn(x)))
        return self.head(torch.relu(self.conv2(h)).mean((2, 3)))


def _perturb(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():   # no bit-identical tensors for exporters to merge
            p.add_(0.05 * torch.randn_like(p))
        if isinstance(model, ConvNet):
            model.bn.running_mean.uniform_(-0.1, 0.1)
            model.bn.running_var.uniform_(0.8, 1.2)
    return model.eval()


def token_net(num_classes: int = 4) -> TokenNet:
    """Seeded, perturbed TokenNet."""
    torch.manual_seed(0)
    return _perturb(TokenNet(num_classes))


def conv_net(num_classes: int = 4) -> ConvNet:
    """Seeded, perturbed ConvNet."""
    torch.manual_seed(1)
    return _perturb(ConvNet(num_classes))


def conv_net_folded(num_classes: int = 4) -> ConvNet:
    """Seeded, perturbed ConvNet with a BatchNorm that exporters fold into conv1."""
    torch.manual_seed(1)
    return _perturb(ConvNet(num_classes, folded=True))


def token_data(n: int, seed: int = 0, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and learnable labels: the argmax of a fixed projection of the mean token."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, TOKENS, FEATURES)).astype(np.float32)
    proj = np.random.default_rng(123).standard_normal((FEATURES, classes))
    y = np.argmax(x.mean(1) @ proj, axis=1).astype(np.int64)
    return x, y


def conv_data(n: int, seed: int = 0, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Image-like inputs and labels from the mean of each colour channel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 12, 12)).astype(np.float32)
    y = (np.argmax(x.mean((2, 3)) @ np.random.default_rng(7).standard_normal((3, classes)), axis=1)).astype(np.int64)
    return x, y


def export(model: nn.Module, shape: tuple, path: Path, dynamo: bool) -> Path:
    """Plain torch.onnx.export (no fps-graph metadata) with a dynamic batch axis, quietly."""
    x = torch.randn(*shape)
    kwargs = {"input_names": ["input"], "output_names": ["output"], "dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    else:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


def select_masks(onnx_path: Path, data: np.ndarray, out: Path, k: int = 2) -> Path:
    """fps-graph select with k per neuron on the given inputs."""
    from fps_graph.selection.pipeline import SelectOptions, run_select, write_result

    npy = out.with_suffix(".calib.npy")
    np.save(npy, data)
    write_result(run_select(onnx_path, str(npy), SelectOptions(k=k)), out, force=True)
    return out


def save_weights(model: nn.Module, path: Path) -> Path:
    """The model's state dict as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def token_run_inputs(root: Path, n: int, k: int = 2, calib: int = 16) -> dict:
    """A seeded TokenNet's weights, its legacy export, masks from select (k per neuron on the first `calib`
    samples) and n labelled samples in train.npz: what a `train` run on the token model needs."""
    model = token_net()
    weights = save_weights(model, root / "w.safetensors")
    onnx_path = export(model, TOKEN_SHAPE, root / "m.onnx", dynamo=False)
    x, y = token_data(n, seed=0)
    np.savez(root / "train.npz", x=x, y=y)
    masks = select_masks(onnx_path, x[:calib], root / "masks.safetensors", k=k)
    return {"root": root, "weights": str(weights), "onnx": onnx_path, "masks": str(masks),
            "train": str(root / "train.npz"), "x": x, "y": y}
