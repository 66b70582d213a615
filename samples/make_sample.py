"""Regenerate the bundled sample: images in class folders, the tiny model's weights, and its ONNX export.

    python samples/make_sample.py        # needs the [torch] extra; writes into samples/

Images are drawn procedurally (no downloads): 4 classes (disc, square, horizontal and vertical stripes), random
colours, positions and noise, 40x40 PNG (the model input is 32x32, so the loader resizes and crops).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
CLASSES = ("disc", "square", "hstripes", "vstripes")


def draw(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """One procedurally drawn image of a class."""
    bg = tuple(int(v) for v in rng.integers(0, 120, 3))
    fg = tuple(int(v) for v in rng.integers(120, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    if kind in ("disc", "square"):
        r = int(rng.integers(8, 15))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        box = (cx - r, cy - r, cx + r, cy + r)
        (d.ellipse if kind == "disc" else d.rectangle)(box, fill=fg)
    else:
        step = int(rng.integers(4, 9))
        off = int(rng.integers(0, step))
        for p in range(off, size, step):
            if kind == "hstripes":
                d.rectangle((0, p, size, p + step // 2 - 1), fill=fg)
            else:
                d.rectangle((p, 0, p + step // 2 - 1, size), fill=fg)
    arr = np.asarray(im, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_images(root: Path, per_class: int, seed: int) -> None:
    """Write per_class PNGs for every class under root/<class>/."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(c, rng).save(root / c / f"{c}_{i:03d}.png")


def main() -> None:
    """Images, weights and ONNX export of the sample."""
    sys.path.insert(0, str(HERE))
    from safetensors.torch import save_file
    from tiny_model import tiny_hybrid

    from fps_graph.integrations.torch_export import export

    make_images(HERE / "images", per_class=16, seed=0)
    save_file(tiny_hybrid().state_dict(), str(HERE / "tiny_hybrid.safetensors"))
    export(str(HERE / "tiny_model.py") + ":tiny_hybrid", (1, 3, 32, 32), HERE / "tiny_hybrid.onnx",
           weights=str(HERE / "tiny_hybrid.safetensors"), force=True, fold=True)
    print("wrote", HERE / "images", HERE / "tiny_hybrid.safetensors", HERE / "tiny_hybrid.onnx")


if __name__ == "__main__":
    main()
