"""Benchmark models and data: PyTorch modules, their ONNX exports and weights (cached), seeded inputs and labels.

Models (random weights, perturbed so that no two tensors are bit-identical and the exporter cannot merge them):

* ``tiny``     - the bundled sample (samples/tiny_model.py: tiny_hybrid), 32x32 inputs, 4 classes;
* ``vit-b16``  - transformers ViTForImageClassification(ViTConfig(num_labels=1000)): ViT-B/16, 224x224, 86.6M
                 (SDPA attention, transformers' default); ``vit-b16-eager`` the same with eager attention;
* ``resnet50`` - transformers ResNetForImageClassification(ResNetConfig(num_labels=1000)): ResNet-50, 25.6M.

Exports are made once with fps_graph.integrations.torch_export.export (legacy TorchScript exporter, dynamic batch) and cached under
bench/.cache/ (git-ignored), keyed by the model name and the torch/transformers versions.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, int, int]   # per sample (C, H, W)
    num_classes: int
    description: str


SPECS = {
    "tiny": ModelSpec("tiny", (3, 32, 32), 4, "bundled sample tiny_hybrid (conv stem + 2 blocks, dim 32)"),
    "vit-b16": ModelSpec("vit-b16", (3, 224, 224), 1000,
                         "transformers ViTForImageClassification(ViTConfig(num_labels=1000)), ViT-B/16"),
    "vit-b16-eager": ModelSpec("vit-b16-eager", (3, 224, 224), 1000,
                               "the same ViT-B/16 with eager attention (explicit softmax(QK^T)V, as most exports)"),
    "resnet50": ModelSpec("resnet50", (3, 224, 224), 1000,
                          "transformers ResNetForImageClassification(ResNetConfig(num_labels=1000)), ResNet-50"),
}


def _wrap(hf_model):
    import torch

    class Logits(torch.nn.Module):
        """forward(x) returns the logits tensor of a transformers image classifier."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(pixel_values=x).logits

    return Logits(hf_model)


def _hf(name: str, meta: bool = False):
    import torch

    if name == "vit-b16":
        from transformers import ViTConfig, ViTForImageClassification

        cfg, cls = ViTConfig(num_labels=1000), ViTForImageClassification
    elif name == "vit-b16-eager":
        from transformers import ViTConfig, ViTForImageClassification

        cfg, cls = ViTConfig(num_labels=1000, attn_implementation="eager"), ViTForImageClassification
    elif name == "resnet50":
        from transformers import ResNetConfig, ResNetForImageClassification

        cfg, cls = ResNetConfig(num_labels=1000), ResNetForImageClassification
    else:
        raise ValueError(name)
    if meta:
        with torch.device("meta"):
            return _wrap(cls(cfg))
    return _wrap(cls(cfg))


def _tiny():
    sys.path.insert(0, str(ROOT / "samples"))
    from tiny_model import tiny_hybrid

    return tiny_hybrid()


def perturb(model, seed: int = 0):
    """Seeded noise on every parameter and float buffer (BatchNorm variances kept positive)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if not b.is_floating_point():
                continue
            noise = 0.02 * torch.randn(b.shape, generator=g)
            b.add_(noise.abs() if name.endswith("running_var") else noise)
    return model


def factory(name: str):
    """A fresh, seeded, perturbed model in eval mode (used for the export)."""
    import torch

    if name == "tiny":
        return _tiny().eval()
    torch.manual_seed(0)
    return perturb(_hf(name)).eval()


# Factories importable as MODULE:FACTORY by fps_graph.integrations.torch_export.
def vit_b16():
    return factory("vit-b16")


def vit_b16_eager():
    return factory("vit-b16-eager")


def resnet50():
    return factory("resnet50")


def tiny():
    return factory("tiny")


def _versions_key() -> str:
    import torch

    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = "none"
    return hashlib.sha1(f"{torch.__version__}|{tv}|v1".encode()).hexdigest()[:8]


def model_files(name: str) -> tuple[Path, Path]:
    """(onnx, weights) paths for a model; the tiny model uses the bundled sample files."""
    if name == "tiny":
        return ROOT / "samples" / "tiny_hybrid.onnx", ROOT / "samples" / "tiny_hybrid.safetensors"
    d = CACHE / "models"
    return d / f"{name}.onnx", d / f"{name}.safetensors"


def onnx_variant(info: dict, layout: str) -> str:
    """The model's ONNX file with its weights embedded ('embedded') or in a side file ('external', made once).

    With external data, fps-graph leaves the weights on disk and ONNX Runtime maps and pre-packs them itself, so
    they are held once; embedded weights are parsed into Python first (see bench/README.md).
    """
    src = Path(info["onnx"])
    if layout == "embedded":
        return str(src)
    if layout != "external":
        raise ValueError(layout)
    dst = CACHE / "models" / (src.stem + "-ext.onnx")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
        import onnx

        proto = onnx.load(str(src))
        tmp = dst.with_name(dst.stem + ".tmp.onnx")
        onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data", size_threshold=1024)
        tmp.rename(dst)
    return str(dst)


def ensure_model(name: str, log=print) -> dict:
    """Export (once) and return {'onnx', 'weights', 'exporter', ...} for a model."""
    onnx_path, w_path = model_files(name)
    info_path = onnx_path.with_suffix(".json")
    if name == "tiny":
        return {"onnx": str(onnx_path), "weights": str(w_path), "exporter": "bundled sample (dynamo)",
                "params": _count_params(w_path)}
    if onnx_path.is_file() and w_path.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    import time

    import torch
    from safetensors.torch import save_file

    from fps_graph.integrations.torch_export import export

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"[bench] exporting {name} to {onnx_path} (once; cached) ...")
    t0 = time.perf_counter()
    model = factory(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(w_path))
    del model
    # export() builds the model again from the same seeded factory, loads the saved weights and checks the map.
    rep = export(f"bench.models:{name.replace('-', '_')}", (1, *SPECS[name].input_shape), onnx_path,
                 weights=str(w_path), exporter="legacy", force=True)
    info = {"onnx": str(onnx_path), "weights": str(w_path), "exporter": "torch.onnx.export(dynamo=False) via "
            "fps_graph.integrations.torch_export.export(exporter='legacy')", "export_seconds": time.perf_counter() - t0,
            "layers": rep["layers"], "mapped": rep["mapped"], "params": _count_params(w_path),
            "torch": torch.__version__}
    info_path.write_text(json.dumps(info, indent=1))
    log(f"[bench] exported {name}: {rep['layers']} scored layers in {info['export_seconds']:.0f} s")
    return info


def _count_params(w_path: Path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(w_path), framework="numpy") as f:
        for k in f.keys():
            if "running_" in k or "num_batches" in k:
                continue
            n += int(np.prod(f.get_slice(k).get_shape()))
    return n


def load_torch(name: str, weights: str, device: str = "cpu"):
    """The model with the saved weights, built on the meta device (no random init) and loaded in place."""
    from safetensors.torch import load_file

    sd = load_file(weights, device=device)
    if name == "tiny":
        import torch

        with torch.device("meta"):
            model = _tiny()
        model.load_state_dict(sd, assign=True)
    else:
        model = _hf(name, meta=True)
        missing, unexpected = model.load_state_dict(sd, assign=True, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weights do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"{name}: {n} was not loaded")
    return model.eval()


def ensure_data(name: str, samples: int, seed: int = 0) -> tuple[str, str]:
    """(inputs .npy, labels .npy): seeded standard-normal float32 images and uniform labels, written once."""
    spec = SPECS[name]
    d = CACHE / "data"
    d.mkdir(parents=True, exist_ok=True)
    shape = "x".join(map(str, spec.input_shape))
    x_path = d / f"x-{shape}-n{samples}-s{seed}.npy"
    y_path = d / f"y-c{spec.num_classes}-n{samples}-s{seed}.npy"
    if not x_path.is_file():
        rng = np.random.default_rng(seed)
        tmp = x_path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(samples, *spec.input_shape))
        for i in range(0, samples, 64):   # in chunks: flat memory even for many samples
            n = min(64, samples - i)
            out[i:i + n] = rng.standard_normal((n, *spec.input_shape), dtype=np.float32)
        out.flush()
        del out
        tmp.rename(x_path)
    if not y_path.is_file():
        rng = np.random.default_rng(seed + 1)
        np.save(y_path, rng.integers(0, spec.num_classes, samples).astype(np.int64))
    return str(x_path), str(y_path)
