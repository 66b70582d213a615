"""Helpers of the selection-quality experiments (bench/quality), each checked against an independent computation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.quality import common  # noqa: E402
from bench.quality.crepe import (bin_to_cents, colored_noise, hz_to_bin, hz_to_cents,  # noqa: E402
                                 raw_pitch_accuracy)


# ------------------------------------------------------------------------------------------- pitch units


def _torchcrepe_convert():
    """torchcrepe/convert.py loaded by path (its package __init__ needs audio libraries), or skip."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchcrepe is not installed (pip install --no-deps torchcrepe)")
    pytest.importorskip("scipy")
    path = Path(list(spec.submodule_search_locations)[0]) / "convert.py"
    stub = types.ModuleType("torchcrepe")
    stub.CENTS_PER_BIN = 20
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        cspec = importlib.util.spec_from_file_location("_torchcrepe_convert", path)
        mod = importlib.util.module_from_spec(cspec)
        cspec.loader.exec_module(mod)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    return mod


def test_cents_and_bins_match_torchcrepe():
    conv = _torchcrepe_convert()
    f = np.exp(np.random.default_rng(0).uniform(np.log(40.0), np.log(1900.0), 200))
    ft = torch.from_numpy(f)
    np.testing.assert_allclose(hz_to_cents(f), conv.frequency_to_cents(ft).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(hz_to_bin(f), conv.frequency_to_bins(ft, torch.round).numpy())
    # bin centres: torchcrepe's bins_to_cents dithers; its cents_to_bins is the exact inverse of ours
    b = np.arange(360)
    np.testing.assert_array_equal(conv.cents_to_bins(torch.from_numpy(bin_to_cents(b)), torch.round).numpy(), b)


def test_cents_units():
    assert hz_to_cents(10.0) == 0.0 and abs(hz_to_cents(440.0) - 1200 * math.log2(44.0)) < 1e-9
    assert abs(hz_to_cents(880.0) - hz_to_cents(440.0) - 1200.0) < 1e-9        # an octave is 1200 cents
    c = hz_to_cents(220.0)
    assert hz_to_bin(10 * 2 ** ((c + 1200) / 1200)) - hz_to_bin(220.0) == 60   # = 60 bins of 20 cents
    f = np.array([80.0, 220.0, 1000.0])
    assert np.all(np.abs(bin_to_cents(hz_to_bin(f)) - 1200 * np.log2(f / 10)) <= 10.0 + 1e-9)   # nearest bin
    assert hz_to_bin(np.array([1.0, 1e5])).tolist() == [0, 359]


def test_raw_pitch_accuracy_threshold():
    f0 = np.array([440.0, 440.0, 440.0, 440.0])
    b = hz_to_bin(f0)[0]
    # bin centre offsets of 0, 2 (40 cents + rounding), 3 and -3 bins (60 cents): independent count by hand
    off = bin_to_cents(b) - hz_to_cents(440.0)
    preds = np.array([b, b + 2, b + 3, b - 3])
    want = np.mean([abs(off + 20 * d) <= 50 for d in (0, 2, 3, -3)])
    assert raw_pitch_accuracy(preds, f0) == pytest.approx(want)


def test_colored_noise_spectral_slope():
    rng = np.random.default_rng(0)
    for beta in (0.0, 1.0, 2.0):
        x = colored_noise(256, beta, rng)
        p = (np.abs(np.fft.rfft(x, axis=1)) ** 2).mean(0)
        f = np.fft.rfftfreq(x.shape[1])
        sel = (f > 0.01) & (f < 0.4)
        slope = np.polyfit(np.log(f[sel]), np.log(p[sel]), 1)[0]
        assert abs(slope + beta) < 0.15, (beta, slope)


# ------------------------------------------------------------------------------------- GPS-style selection


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_gradient_scores_equal_summed_batch_gradients():
    torch.manual_seed(0)
    model = Small()
    xs = [torch.randn(6, 2, 5, 5) for _ in range(3)]
    ys = [torch.randint(0, 3, (6,)) for _ in range(3)]
    keys = ["conv.weight", "fc.weight"]
    got = common.gradient_scores(model, list(zip(xs, ys)), torch.nn.functional.cross_entropy, keys)
    # independent: torch.autograd.grad per batch, summed, then abs; BatchNorm in eval mode
    ref = Small()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    params = [dict(ref.named_parameters())[k] for k in keys]
    total = [torch.zeros_like(p) for p in params]
    for x, y in zip(xs, ys):
        gs = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), params)
        total = [t + g for t, g in zip(total, gs)]
    for k, t in zip(keys, total):
        np.testing.assert_allclose(got[k], t.abs().double().numpy(), rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())   # flags restored


def test_select_from_scores_topk_per_output_neuron():
    rng = np.random.default_rng(1)
    scores = {"conv.weight": rng.random((4, 2, 3, 3)), "fc.weight": rng.random((3, 100))}
    got = common.select_from_scores(scores, common.Point(k=3))
    for key, s in scores.items():
        flat = torch.from_numpy(s.reshape(s.shape[0], -1))
        top = torch.topk(flat, 3, dim=1).indices.numpy()
        want = np.sort((top + np.arange(flat.shape[0])[:, None] * flat.shape[1]).reshape(-1))
        np.testing.assert_array_equal(got[key], want)
    # a layer budget: the best entries of each tensor, in proportion to its size
    got = common.select_from_scores(scores, common.Point(budget=0.1, granularity="layer"))
    total = sum(s.size for s in scores.values())
    assert sum(len(v) for v in got.values()) == round(0.1 * total)
    for key, s in scores.items():
        n = len(got[key])
        want = np.sort(np.argsort(-s.reshape(-1))[:n])
        np.testing.assert_array_equal(got[key], want)


class SmallBlk(torch.nn.Module):
    """Conv -> BatchNorm (what an optimising exporter folds), a Linear on 3-D input (a transposed MatMul), a head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.blk = torch.nn.Linear(5, 7)
        self.fc = torch.nn.Linear(4 * 5 * 7, 3)

    def forward(self, x):
        return self.fc(self.blk(torch.relu(self.bn(self.conv(x)))).flatten(1))


def test_gradient_masks_share_the_onnx_masks_geometry(tmp_path):
    """|W| ranked on the PyTorch tensors by select_from_scores == `fps-graph select --score magnitude` on the
    model exported by export_unfolded, so GPS masks index the same entries as the ONNX path's masks."""
    from fps_graph.formats.masks import load_indices

    torch.manual_seed(0)
    model = SmallBlk()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 3.0)     # folding would rescale the conv rows unequally
        model.bn.weight.uniform_(0.5, 2.0)
    onnx_path = common.export_unfolded(model, torch.randn(2, 2, 5, 5), tmp_path / "m.onnx")
    sel = common.Selector.__new__(common.Selector)   # no calibration needed for magnitude
    sel.onnx, sel.workdir, sel.threads, sel.batch_size, sel.template = onnx_path, tmp_path, 1, 8, None
    sel.stats = sel.anchor_stats = None
    assert common.check_geometry(onnx_path, sel.template_masks(), model)["problems"] == []
    params = dict(model.named_parameters())
    for point in (common.Point(k=2), common.Point(budget=0.2, granularity="layer")):
        onnx_masks = load_indices(sel.onnx_masks("magnitude", point))
        assert sorted(onnx_masks) == ["blk.weight", "conv.weight", "fc.weight"]
        mine = common.select_from_scores({k: params[k].detach().abs().double().numpy() for k in onnx_masks}, point)
        for k in onnx_masks:
            np.testing.assert_array_equal(np.sort(onnx_masks[k]), mine[k], err_msg=f"{k} at {point.label}")
        out = common.write_masks_like(sel.template, mine, tmp_path / "gps.safetensors", "gps")
        back = load_indices(out)
        for k in mine:
            np.testing.assert_array_equal(back[k], mine[k])


def test_aggregate_and_paired_diff():
    runs = [{"method": m, "point": "K=1", "seed": s, "trainable": 10, "selected": 5,
             "metrics": {"acc": v}} for m, s, v in
            [("a", 0, 0.5), ("a", 1, 0.7), ("b", 0, 0.4), ("b", 1, 0.8)]]
    agg = {r["method"]: r for r in common.aggregate(runs, ["acc"])}
    assert agg["a"]["acc"]["mean"] == pytest.approx(0.6)
    assert agg["a"]["acc"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    d = common.paired_diff(runs, "a", "b", "acc")
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.0) and d["a_ge_b"] == 0.5


def test_row_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from bench.quality.diagnose import row_spearman

    rng = np.random.default_rng(3)
    a = rng.random((5, 40))
    b = a + rng.normal(0, 0.3, a.shape)
    want = np.mean([stats.spearmanr(a[i], b[i]).statistic for i in range(5)])
    assert row_spearman(a, b) == pytest.approx(want, abs=1e-12)
    assert row_spearman(a, a) == pytest.approx(1.0)
    assert row_spearman(a, -a) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------ the variant study (issue 13)


def test_study_row_spearman_matches_scipy_and_skips_constant_rows():
    stats = pytest.importorskip("scipy.stats")
    from bench.quality.study import row_spearman

    rng = np.random.default_rng(4)
    a = rng.random((6, 30))
    b = a + rng.normal(0, 0.5, a.shape)
    want = np.mean([stats.spearmanr(a[i], b[i]).statistic for i in range(6)])
    assert row_spearman(a, b) == pytest.approx(want, abs=1e-12)
    # a statistic shared by every row (input rms alone) broadcasts; a constant row of b is left out
    b[2] = 1.0
    want = np.mean([stats.spearmanr(a[0], b[i]).statistic for i in range(6) if i != 2])
    assert row_spearman(a[:1], b) == pytest.approx(want, abs=1e-12)


def test_phone_split_removes_low_fundamentals():
    from bench.quality import crepe as C

    a, b = C.make_phone_split(64, 9, snr_db=(60.0, 60.0)), C.make_phone_split(64, 9, snr_db=(60.0, 60.0))
    assert np.array_equal(a["x"], b["x"]) and a["x"].dtype == np.float32
    np.testing.assert_allclose(a["x"].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(a["x"].std(1), 1, atol=1e-4)
    assert np.array_equal(a["y"], C.hz_to_bin(a["f0"]))
    # the same tones without the channel: their fundamental holds energy; after it, low fundamentals are gone
    clean, f0 = C.harmonic_tones(64, np.random.default_rng(9))
    assert np.array_equal(f0, a["f0"])
    f = np.fft.rfftfreq(C.FRAME, 1.0 / C.SR)
    low = np.flatnonzero(f0 < 250)
    assert low.size > 5

    def share_near_f0(x, i):
        p = np.abs(np.fft.rfft(x[i] * np.hanning(C.FRAME))) ** 2
        return p[np.abs(f - f0[i]) < 30].sum() / p.sum()

    before = np.median([share_near_f0(clean, i) for i in low])
    after = np.median([share_near_f0(a["x"], i) for i in low])
    assert after < 0.05 * before, (before, after)
