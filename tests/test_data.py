"""Calibration data: image preprocessing, layouts, array files, shards and shape checks."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fps_graph.data.sources import ArraySource, ImageOptions, InputSpec, Loader, load_image, open_source
from fps_graph.errors import FpsGraphError


def test_image_resize_crop_normalise(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    opts = ImageOptions(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.8)
    got = load_image(tmp_path / "a.png", 3, (16, 16), opts, "NCHW")
    # reference: shorter side 30 -> 16/0.8 = 20, so 50 -> 33; center crop 16x16
    im = Image.fromarray(arr).resize((33, 20), Image.BILINEAR)
    left, top = (33 - 16) // 2, (20 - 16) // 2
    ref = np.asarray(im.crop((left, top, left + 16, top + 16)), dtype=np.float32) / 255.0
    ref = ((ref - np.array([0.5, 0.4, 0.3], np.float32)) / np.array([0.2, 0.25, 0.3], np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    nhwc = load_image(tmp_path / "a.png", 3, (16, 16), opts, "NHWC")
    np.testing.assert_allclose(nhwc, ref.transpose(1, 2, 0))


def test_image_folder_with_classes_is_sorted_and_checked(tmp_path):
    for cls in ("b", "a"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (12, 9), color=i * 40).save(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    spec = InputSpec("img", ("N", 1, 8, 8), np.dtype(np.float32))
    src = open_source(tmp_path, [spec], ImageOptions(mean=(0.0,), std=(1.0,)))
    assert [p.relative_to(tmp_path).as_posix() for p in src.files][:2] == ["a/0.jpg", "a/1.jpg"]
    batches = list(Loader(src, batch_size=4))
    assert [b["img"].shape for b in batches] == [(4, 1, 8, 8), (2, 1, 8, 8)]
    np.testing.assert_allclose(batches[0]["img"][1], 40 / 255.0, rtol=1e-6)


def test_npz_multi_input_and_shards(tmp_path):
    ids = np.arange(30, dtype=np.int64).reshape(10, 3)
    mask = np.ones((10, 3), dtype=np.int64)
    np.savez(tmp_path / "part0.npz", input_ids=ids[:6], attention_mask=mask[:6])
    np.savez(tmp_path / "part1.npz", input_ids=ids[6:], attention_mask=mask[6:])
    specs = [InputSpec("input_ids", ("N", "T"), np.dtype(np.int64)),
             InputSpec("attention_mask", ("N", "T"), np.dtype(np.int64))]
    src = open_source(tmp_path, specs)
    assert isinstance(src, ArraySource) and len(src) == 10
    loader = Loader(src, batch_size=4, shuffle=True, seed=3)
    got = np.concatenate([b["input_ids"] for b in loader])
    assert sorted(got[:, 0].tolist()) == list(range(0, 30, 3))
    assert got[:, 0].tolist() == (np.random.default_rng(3).permutation(10) * 3).tolist()
    lim = Loader(src, batch_size=4, max_samples=5)
    assert sum(b["input_ids"].shape[0] for b in lim) == 5


def test_array_shape_mismatch_names_input(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 9), np.float32))
    spec = InputSpec("pixels", ("N", 3, 8, 8), np.dtype(np.float32))
    with pytest.raises(FpsGraphError, match=r"input 'pixels' expects shape \[\?, 3, 8, 8\], found \[4, 3, 8, 9\]"):
        open_source(tmp_path / "x.npy", [spec])


def test_npz_missing_input(tmp_path):
    np.savez(tmp_path / "d.npz", input_ids=np.zeros((2, 3), np.int64))
    specs = [InputSpec("input_ids", ("N", "T"), np.dtype(np.int64)),
             InputSpec("attention_mask", ("N", "T"), np.dtype(np.int64))]
    with pytest.raises(FpsGraphError, match="missing model input 'attention_mask'"):
        open_source(tmp_path / "d.npz", specs)


def test_float_data_for_int_input_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(FpsGraphError, match="expects int64, found float32"):
        open_source(tmp_path / "x.npy", [InputSpec("ids", ("N", 3), np.dtype(np.int64))])
