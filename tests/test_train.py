"""`fps-graph train`: run folder contents, determinism, trainable counts, heads, data kinds, errors."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest_train import (SPEC_TOKEN, TOKEN_SHAPE, export, save_weights, select_masks,  # noqa: E402
                            token_data, token_net)

from fps_graph import FpsGraphError  # noqa: E402
from fps_graph.data.sources import ImageOptions, InputSpec  # noqa: E402
from fps_graph.formats.delta import read_delta  # noqa: E402
from fps_graph.formats.masks import load_indices  # noqa: E402
from fps_graph.data.labeled import open_labeled  # noqa: E402
from fps_graph.training.job import TrainJob, run_train, train_job  # noqa: E402
from fps_graph.training.optim import lr_factor  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Token model weights, its legacy export, masks from select, and labelled train/val/6-class arrays."""
    root = tmp_path_factory.mktemp("train")
    model = token_net()
    weights = save_weights(model, root / "w.safetensors")
    onnx_path = export(model, TOKEN_SHAPE, root / "m.onnx", dynamo=False)
    x, y = token_data(96, seed=0)
    np.savez(root / "train.npz", x=x, y=y)
    xv, yv = token_data(48, seed=1)
    np.savez(root / "val.npz", inputs=xv, labels=yv)
    x6, y6 = token_data(60, seed=2, classes=6)
    np.savez(root / "six.npz", x=x6, y=y6)
    masks = select_masks(onnx_path, x[:32], root / "masks.safetensors", k=3)
    return {"root": root, "weights": str(weights), "onnx": onnx_path, "masks": str(masks),
            "train": str(root / "train.npz"), "val": str(root / "val.npz"), "six": str(root / "six.npz")}


def options(setup, out: Path, **kw) -> TrainJob:
    base = dict(weights=setup["weights"], masks=setup["masks"], data=setup["train"], val=setup["val"], output=str(out),
                epochs=4, lr=2e-2, batch_size=16, warmup_epochs=1, seed=0, threads=1)
    base.update(kw)
    return train_job(SPEC_TOKEN, **base)


def test_train_writes_run_and_is_deterministic(setup, tmp_path):
    r1 = run_train(options(setup, tmp_path / "a"))
    r2 = run_train(options(setup, tmp_path / "b"))
    run = tmp_path / "a"
    for name in ("delta.safetensors", "run_config.json", "metrics.json", "training_curve.png"):
        assert (run / name).is_file(), name
    assert (run / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3, 4]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} <= set(m["epochs"][0])
    assert m["epochs"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)        # cosine to --min-lr 0
    assert m["epochs"][-1]["train_loss"] < m["epochs"][0]["train_loss"]
    assert m["final"]["val_acc"] > m["initial"]["val_acc"]
    assert m["memory"]["peak_rss_mb"] > 0 and m["memory"]["train_state"]["sparse_mb"] < \
        m["memory"]["train_state"]["full_finetune_mb"]

    # trainable values = the selection (the head's own mask is superseded: it trains in full) + full tensors
    idx = load_indices(setup["masks"])
    selected = sum(v.size for k, v in idx.items() if k != "head.weight")
    full = {"embed.bias": 16, "fc1.bias": 32, "fc2.bias": 16, "head.weight": 64, "head.bias": 4}
    assert set(idx) == {"embed.weight", "fc1.weight", "fc2.weight", "head.weight"}
    t = m["trainable"]
    assert t["selected"] == selected == 3 * (16 + 32 + 16)
    assert t["full_tensors"] == sum(full.values()) and set(m["trained_in_full"]) == set(full)
    assert t["trainable"] == selected + sum(full.values())
    assert t["full_finetune"] == sum(p.numel() for p in token_net().parameters())
    assert m["superseded"] == ["head.weight"]

    # the delta file: indices, deltas and start values; metadata with the masks hash and settings
    d1, d2 = read_delta(run / "delta.safetensors"), read_delta(tmp_path / "b" / "delta.safetensors")
    assert sorted(d1.sparse) == ["embed.weight", "fc1.weight", "fc2.weight"]
    assert sorted(d1.full) == sorted(full)
    for k in d1.sparse:
        assert np.array_equal(d1.sparse[k].indices, idx[k])
        assert np.array_equal(d1.sparse[k].delta, d2.sparse[k].delta)      # bit-identical reruns
        assert np.count_nonzero(d1.sparse[k].delta) == d1.sparse[k].delta.size
    for k in d1.full:
        assert np.array_equal(d1.full[k].value, d2.full[k].value)
    from fps_graph.formats.io import sha256_file

    assert d1.metadata["masks_sha256"] == sha256_file(setup["masks"])
    assert d1.metadata["training"]["optim"]["lr"] == 2e-2 and d1.metadata["training"]["optim"]["epochs"] == 4
    assert [e["train_loss"] for e in r1.metrics["epochs"]] == [e["train_loss"] for e in r2.metrics["epochs"]]
    cfg = json.loads((run / "run_config.json").read_text())
    assert "peft_type" not in cfg and not (run / "adapter_config.json").exists()   # PEFT could not load it
    assert cfg["target_tensors"] == sorted(d1.sparse)
    assert cfg["modules_to_save"] == sorted(full) and cfg["masks_sha256"] == d1.metadata["masks_sha256"]


def test_new_head_and_save_merged(setup, tmp_path):
    with pytest.raises(FpsGraphError, match="6 classes but the model predicts 4; pass --num-classes 6"):
        run_train(options(setup, tmp_path / "x", data=setup["six"], val=None))
    r = run_train(options(setup, tmp_path / "run", data=setup["six"], val=None, num_classes=6, save_merged=True,
                          epochs=2))
    assert r.metrics["head"] == {"name": "head", "replaced": True, "old_classes": 4, "num_classes": 6,
                                 "in_features": 16, "bias": True}
    d = read_delta(tmp_path / "run" / "delta.safetensors")
    assert d.full["head.weight"].value.shape == (6, 16) and d.full["head.weight"].base is None
    assert d.full["fc1.bias"].base is not None
    from safetensors.torch import load_file

    from fps_graph.training.sparse import load_delta

    fresh = token_net()
    load_delta(fresh, tmp_path / "run" / "delta.safetensors")
    merged = token_net(num_classes=6)
    merged.load_state_dict(load_file(str(tmp_path / "run" / "merged.safetensors")))
    x = torch.from_numpy(token_data(5, seed=9)[0])
    with torch.no_grad():
        assert torch.equal(fresh(x), merged(x))


def test_cli_train_on_sample_images(tmp_path, capsys):
    masks = tmp_path / "m.safetensors"
    assert entry(["select", str(SAMPLES / "tiny_hybrid.onnx"), str(SAMPLES / "images"), "-o", str(masks),
                  "--k", "2", "-q"]) == 0
    args = ["train", f"{SAMPLES / 'tiny_model.py'}:tiny_hybrid", "--weights", str(SAMPLES / "tiny_hybrid.safetensors"),
            "--masks", str(masks), "--data", str(SAMPLES / "images"), "-o", str(tmp_path / "run"),
            "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--threads", "1"]
    # no --image-size: the masks file records how select prepared the images (32x32 from the ONNX input)
    assert entry(args + ["--val", str(SAMPLES / "images")]) == 0
    err = capsys.readouterr().err
    assert "epoch   2/2" in err and "of full fine-tuning's 20,900" in err and "peak RSS" in err
    assert "note: images: 32x32 NCHW, mean 0.485,0.456,0.406, std 0.229,0.224,0.225, crop 0.875, as select " \
           "prepared them" in err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["classes"] == ["disc", "hstripes", "square", "vstripes"] and m["samples"] == {"train": 64, "val": 64}
    assert m["data"]["images"]["from"] == {"size": "masks", "mean": "masks", "std": "masks", "crop_pct": "masks"}
    assert entry(args + ["--image-size", "32"]) == 2                     # the run exists
    assert "--force" in capsys.readouterr().err


def test_masks_from_another_model_are_a_clear_error(setup, tmp_path):
    with pytest.raises(FpsGraphError, match=r"mask 'blocks.0.fc1.weight' \(.*sample_masks.safetensors\) names no parameter"):
        run_train(options(setup, tmp_path / "r", masks=_sample_masks(tmp_path)))


def _sample_masks(tmp_path: Path) -> str:
    out = tmp_path / "sample_masks.safetensors"
    assert entry(["select", str(SAMPLES / "tiny_hybrid.onnx"), str(SAMPLES / "images"), "-o", str(out), "--k", "1",
                  "-q"]) == 0
    return str(out)


def test_plot_skipped_with_warning_without_matplotlib(setup, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    r = run_train(options(setup, tmp_path / "r", epochs=1, val=None))
    assert r.metrics["plot"] is None and "matplotlib" in r.metrics["plot_warning"]
    assert not (tmp_path / "r" / "training_curve.png").exists()
    assert any("matplotlib" in w for w in r.warnings)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 4, 20, 0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_image_folders_need_class_subfolders(tmp_path):
    spec = lambda: InputSpec("input", (None, 3, 32, 32), np.dtype(np.float32))  # noqa: E731
    data = open_labeled(str(SAMPLES / "images"), spec, ImageOptions())
    assert data.classes == ["disc", "hstripes", "square", "vstripes"] and len(data) == 64
    assert np.bincount(data.labels).tolist() == [16, 16, 16, 16]
    batch = data.fetch(np.array([0, 63]))
    assert batch["input"].shape == (2, 3, 32, 32) and batch["__label__"].tolist() == [0, 3]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((SAMPLES / "images" / "disc" / "disc_000.png").read_bytes())
    with pytest.raises(FpsGraphError, match="one subfolder per class"):
        open_labeled(str(flat), spec, ImageOptions())
    other = tmp_path / "other" / "triangle"
    other.mkdir(parents=True)
    (other / "t.png").write_bytes((SAMPLES / "images" / "disc" / "disc_000.png").read_bytes())
    with pytest.raises(FpsGraphError, match=r"classes \['triangle'\] are not among the training classes"):
        open_labeled(str(tmp_path / "other"), spec, ImageOptions(), classes=data.classes)
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((3, 2), np.float32))
    with pytest.raises(FpsGraphError, match="integer labels"):
        open_labeled(str(tmp_path / "nolabels.npz"), spec, ImageOptions())


# --- train follows select (issue 12): the masks file records how select prepared the data -------------------------


@pytest.fixture(scope="module")
def conv_chain(tmp_path_factory):
    """fps-graph export (2,3,12,12) -> select on the sample images with non-default mean/std/crop."""
    from conftest_train import CONV_SHAPE, SPEC_CONV

    root = tmp_path_factory.mktemp("chain")
    onnx_path, masks = root / "conv.onnx", root / "masks.safetensors"
    assert entry(["export", SPEC_CONV, "--input-shape", ",".join(map(str, CONV_SHAPE)), "-o", str(onnx_path)]) == 0
    assert entry(["select", str(onnx_path), str(SAMPLES / "images"), "-o", str(masks), "--k", "2", "--mean", "0.5",
                  "--std", "0.25", "--crop-pct", "1.0", "-q"]) == 0
    return {"root": root, "onnx": onnx_path, "masks": masks, "spec": SPEC_CONV}


def test_export_select_train_needs_no_image_size(conv_chain, tmp_path, capsys):
    from fps_graph.data.sources import open_source
    from fps_graph.formats.masks import data_record
    from fps_graph.training.models import build_model
    from fps_graph.training.config import DataConfig
    from fps_graph.training.tasks.image_cls import resolve_image_prep

    record = data_record(conv_chain["masks"])
    assert record == {"kind": "image", "inputs": ["input"], "size": [12, 12], "layout": "NCHW", "channels": 3,
                      "mean": [0.5], "std": [0.25], "crop_pct": 1.0}
    capsys.readouterr()
    args = ["train", conv_chain["spec"], "--masks", str(conv_chain["masks"]), "--data", str(SAMPLES / "images"),
            "--epochs", "1", "--batch-size", "16", "--threads", "1", "--no-plot"]
    assert entry(args + ["-o", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "note: images: 12x12 NCHW, mean 0.5, std 0.25, crop 1, as select prepared them" in err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["images"]["size"] == [12, 12] and set(m["data"]["images"]["from"].values()) == {"masks"}
    cfg = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert cfg["data"]["images"]["mean"] == [0.5] and cfg["data"]["images"]["crop_pct"] == 1.0

    # the training images are, value for value, the ones select fed to ONNX Runtime
    spec = InputSpec("input", (None, 3, 12, 12), np.dtype(np.float32))
    fed = open_source(SAMPLES / "images", [spec], ImageOptions(mean=(0.5,), std=(0.25,), crop_pct=1.0))
    prep = resolve_image_prep(DataConfig(data="unused"), record,
                              build_model(conv_chain["spec"]))
    trained = open_labeled(str(SAMPLES / "images"), prep.spec, prep.options)
    every = np.arange(64)
    assert np.array_equal(trained.fetch(every)["input"], fed.fetch(every)["input"])

    # honest counts: the head trains in full by default, and its selected entries are counted apart
    head = "head: head (detected) trains in full: 36 values (the default; --no-train-head trains only its selected"
    assert head in err
    t = m["trainable"]
    assert t["masks_selected"] == 2 * (8 + 8 + 4) and t["selected_in_full"] == {"head.weight": 8}
    assert t["selected"] == t["masks_selected"] - 8 and t["full_by_reason"] == {"bias": 16, "head": 36}
    assert (f"selection: the masks select 40 entries; 8 of them lie in head.weight, trained in full anyway, so 32 "
            "train as sparse deltas") in err
    assert entry(args + ["-o", str(tmp_path / "frozen"), "--no-train-head"]) == 0
    err = capsys.readouterr().err
    assert "head: head (detected) trains only its selected entries" in err and "selection:" not in err
    t = json.loads((tmp_path / "frozen" / "metrics.json").read_text())["trainable"]
    assert t["selected"] == t["masks_selected"] == 40 and t["full_by_reason"] == {"bias": 20}   # + head.bias

    # an option overrides one value, and the summary says so
    assert entry(args + ["-o", str(tmp_path / "big"), "--image-size", "16"]) == 0
    err = capsys.readouterr().err
    assert "note: the options override how select prepared its images: size 16x16 instead of 12x12" in err
    m = json.loads((tmp_path / "big" / "metrics.json").read_text())
    assert m["data"]["images"]["from"] == {"size": "option", "mean": "masks", "std": "masks", "crop_pct": "masks"}


def test_masks_without_a_record_ask_for_the_image_size(conv_chain, tmp_path, capsys):
    stats, masks = tmp_path / "s.stats", tmp_path / "m.safetensors"
    assert entry(["select", str(conv_chain["onnx"]), str(SAMPLES / "images"), "-o", str(tmp_path / "x"),
                  "--stats-out", str(stats), "-q"]) == 0
    # statistics files keep the data record now (--stats-in masks carry it); one written without it, as before:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(stats), framework="numpy") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "data"}
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    save_file(arrays, str(stats), metadata=meta)
    assert entry(["select", str(conv_chain["onnx"]), "--stats-in", str(stats), "-o", str(masks), "-q"]) == 0
    capsys.readouterr()
    assert entry(["train", conv_chain["spec"], "--masks", str(masks), "--data", str(SAMPLES / "images"),
                  "-o", str(tmp_path / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "the masks file records no image size and the model names none; pass --image-size H,W" in err
    assert not (tmp_path / "run").exists()


def test_failed_train_leaves_no_run_folder(setup, tmp_path):
    nested = tmp_path / "a" / "b" / "run"
    with pytest.raises(FpsGraphError, match="data path not found"):
        run_train(options(setup, nested, data=str(tmp_path / "nowhere")))
    assert not (tmp_path / "a").exists()
    with pytest.raises(FpsGraphError, match="6 classes but the model predicts 4"):   # fails after the model is built
        run_train(options(setup, nested, data=setup["six"], val=None))
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FpsGraphError):
        run_train(options(setup, mine, data=setup["six"], val=None))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]       # a folder the run did not make is kept


def test_unnormalised_training_arrays_warn(setup, tmp_path):
    x, y = token_data(32, seed=3)
    np.savez(tmp_path / "raw.npz", x=np.round(x * 40).astype(np.int64), y=y)
    r = run_train(options(setup, tmp_path / "run", data=str(tmp_path / "raw.npz"), val=None, epochs=1, plot=False))
    assert len(r.warnings) == 1 and "input 'x' is int64 with values" in r.warnings[0] and "raw.npz" in r.warnings[0]


# --- --optimizer, --weight-decay, --grad-clip: the update each gives, against torch.optim and hand computations ----


def _trained(run: Path) -> dict[str, np.ndarray]:
    """What training changed, per trained tensor: a sparse delta, or a full tensor's value minus its start."""
    d = read_delta(run / "delta.safetensors")
    out = {f"{k}:delta": e.delta for k, e in d.sparse.items()}
    out.update({k: e.value - e.base for k, e in d.full.items()})
    return out


def _reference(setup, optimizer: str, lr: float, wd: float, clip: float | None, steps: int):
    """The run's updates rebuilt with torch.optim on the same trainable tensors (attach with the defaults), one
    full-batch step per epoch, clipping done by hand; returns the changes and the pre-clip gradient norms."""
    from safetensors.torch import load_file

    from fps_graph.training.sparse import attach

    model = token_net()
    model.load_state_dict(load_file(setup["weights"]))
    z = np.load(setup["train"])
    x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    handle = attach(model, setup["masks"], example_input=x[:1])
    params = handle.trainable_parameters()

    def values() -> dict[str, torch.Tensor]:   # what the weights change by: step * delta (the default step scale)
        out = {f"{k}:delta": d.effective().detach().clone() for k, d in handle.deltas.items()}
        out.update({k: p.detach().clone() for k, p in handle.full.items()})
        return out

    start = values()
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    opt = cls(params, lr=lr, weight_decay=wd, **extra)
    norms = []
    handle.train(True)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
        norms.append(norm)
        if clip is not None and norm > clip:
            for p in params:
                p.grad.mul_(clip / (norm + 1e-6))
        opt.step()
    return {k: (v - start[k]).numpy() for k, v in values().items()}, norms


def _train_cli(setup, out: Path, *flags: str, epochs: int = 3, lr: float = 0.05) -> Path:
    """`fps-graph train` with one full-batch step per epoch at a constant learning rate (no warm-up, --min-lr =
    --lr), so every step's size is the optimiser's own."""
    args = ["train", SPEC_TOKEN, "--weights", setup["weights"], "--masks", setup["masks"], "--data", setup["train"],
            "-o", str(out), "--epochs", str(epochs), "--batch-size", "96", "--lr", str(lr), "--min-lr", str(lr),
            "--warmup-epochs", "0", "--threads", "1", "--no-plot", "-q", *flags]
    assert entry(args) == 0
    return out


@pytest.mark.parametrize("optimizer,wd,clip", [("sgd", 0.0, None), ("sgd", 0.3, None), ("adam", 0.3, None),
                                               ("adamw", 0.3, None), ("adamw", 0.0, 0.05), ("sgd", 0.1, 0.05)])
def test_optimizer_weight_decay_and_clip_give_torch_optims_update(setup, tmp_path, optimizer, wd, clip):
    flags = ["--optimizer", optimizer, "--weight-decay", str(wd)] + (["--grad-clip", str(clip)] if clip else [])
    got = _trained(_train_cli(setup, tmp_path / "run", *flags))
    want, norms = _reference(setup, optimizer, 0.05, wd, clip, steps=3)
    assert sorted(got) == sorted(want)
    for k in want:   # the run's batch is shuffled: the same sums in another order, so not bit for bit
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    if clip is not None:
        assert min(norms) > 2 * clip          # the clip did bind on every step


def test_weight_decay_changes_only_trained_entries_and_shrinks_them(setup, tmp_path):
    """One SGD step: weight decay adds -lr * wd * start value to each fully trained tensor (hand computation),
    nothing to the deltas (they start at 0), and no entry outside the trained ones moves."""
    from safetensors.torch import load_file

    from fps_graph.training.sparse import load_delta

    lr, wd = 0.05, 0.5
    plain = _trained(_train_cli(setup, tmp_path / "plain", "--optimizer", "sgd", epochs=1, lr=lr))
    decayed_run = _train_cli(setup, tmp_path / "wd", "--optimizer", "sgd", "--weight-decay", str(wd), epochs=1, lr=lr)
    decayed = _trained(decayed_run)
    d = read_delta(decayed_run / "delta.safetensors")
    for k, e in d.full.items():
        np.testing.assert_allclose(decayed[k] - plain[k], -lr * wd * e.base, rtol=1e-4, atol=1e-7, err_msg=k)
        assert np.abs(e.base).max() > 0.01
    for k in d.sparse:
        np.testing.assert_allclose(decayed[f"{k}:delta"], plain[f"{k}:delta"], rtol=1e-5, atol=1e-8)
    # three AdamW steps with a large decay: entries outside the selection and the frozen tensors stay bit for bit
    run = _train_cli(setup, tmp_path / "adamw", "--weight-decay", "5")
    base = token_net()
    base.load_state_dict(load_file(setup["weights"]))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    after = load_delta(base, run / "delta.safetensors").merged_state_dict()
    idx = load_indices(setup["masks"])
    full = set(read_delta(run / "delta.safetensors").full)
    for k, v in after.items():
        moved = np.flatnonzero((v != before[k]).reshape(-1).numpy())
        if k in full:
            continue
        allowed = idx.get(k, np.array([], dtype=np.int64))
        assert np.isin(moved, allowed).all(), k


def test_grad_clip_bounds_the_step_of_every_trained_value(setup, tmp_path):
    """One SGD step (its momentum buffer starts as the gradient): the change of all trained values together has
    norm lr * clip when the gradient norm exceeds clip, and more without --grad-clip."""
    lr, clip = 0.05, 0.01
    # --step-scale none: the clip bounds the trained parameters' step; with per-entry step sizes the delta file
    # holds step * delta (the change to the weights), whose norm is smaller
    clipped = _trained(_train_cli(setup, tmp_path / "c", "--optimizer", "sgd", "--grad-clip", str(clip),
                                  "--step-scale", "none", epochs=1, lr=lr))
    free = _trained(_train_cli(setup, tmp_path / "f", "--optimizer", "sgd", "--step-scale", "none", epochs=1, lr=lr))
    norm = lambda t: math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in t.values()))  # noqa: E731
    assert norm(clipped) == pytest.approx(lr * clip, rel=1e-4)
    assert norm(free) > 10 * lr * clip
    for k in free:        # the same direction, scaled
        np.testing.assert_allclose(clipped[k], free[k] * (lr * clip / norm(free)), rtol=1e-3, atol=1e-7)   # float32 value - start
