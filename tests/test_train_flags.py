"""Each `fps-graph train` flag has its effect, checked through the CLI on tiny models (the optimiser flags and
--grad-clip: tests/test_train.py; --task, --max-length, --peft: test_hf_train.py, test_peft.py; --image-size,
--no-train-head: test_train.py; --num-classes, --save-merged: test_train.py, test_apply.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest_train import SPEC_TOKEN, token_net, token_run_inputs  # noqa: E402

from fps_graph.formats.delta import read_delta  # noqa: E402
from fps_graph.training.optim import lr_factor  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return token_run_inputs(tmp_path_factory.mktemp("flags"), 40)


def run(tok, out: Path, *flags: str, capsys=None, code: int = 0) -> dict:
    args = ["train", SPEC_TOKEN, "--weights", tok["weights"], "--masks", tok["masks"], "--data", tok["train"],
            "-o", str(out), "--epochs", "2", "--batch-size", "8", "--threads", "1", "--no-plot", *flags]
    if capsys is not None:
        capsys.readouterr()
    assert entry(args) == code
    return json.loads((out / "metrics.json").read_text()) if code == 0 else {}


def test_batch_size_and_max_samples_set_the_steps(tok, tmp_path):
    m = run(tok, tmp_path / "a", "--batch-size", "16")
    assert m["time"]["steps"] == 2 * math.ceil(40 / 16) and m["samples"]["train"] == 40
    m = run(tok, tmp_path / "b", "--max-samples", "12", "--batch-size", "5")
    assert m["time"]["steps"] == 2 * math.ceil(12 / 5) and m["samples"]["train"] == 12


def test_warmup_epochs_and_min_lr_shape_the_schedule(tok, tmp_path):
    m = run(tok, tmp_path / "r", "--epochs", "4", "--lr", "0.1", "--warmup-epochs", "2", "--min-lr", "0.01")
    steps = math.ceil(40 / 8)
    got = [e["lr"] for e in m["epochs"]]             # the rate the next step would use, after each epoch
    assert got == pytest.approx([0.1 * lr_factor(e * steps, 2 * steps, 4 * steps, 0.1) for e in range(1, 5)])
    assert got[1] == pytest.approx(0.1) and got[-1] == pytest.approx(0.01)   # peak after warm-up, min at the end
    assert got[0] == pytest.approx(0.1 * (steps + 1) / (2 * steps))           # half-way through the warm-up


def test_label_smoothing_changes_the_loss_as_cross_entropy_says(tok, tmp_path):
    """The validation loss before training equals PyTorch's smoothed cross-entropy of the base model."""
    from safetensors.torch import load_file

    m = run(tok, tmp_path / "r", "--val", tok["train"], "--label-smoothing", "0.3", "--epochs", "1")
    model = token_net()
    model.load_state_dict(load_file(tok["weights"]))
    with torch.no_grad():
        logits = model(torch.from_numpy(tok["x"]))
    y = torch.from_numpy(tok["y"])
    smooth = float(torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.3))
    plain = float(torch.nn.functional.cross_entropy(logits, y))
    assert m["initial"]["val_loss"] == pytest.approx(smooth, rel=1e-5) and abs(smooth - plain) > 1e-3


def test_seed_orders_the_data(tok, tmp_path):
    a = read_delta(run(tok, tmp_path / "a", "--seed", "1") and tmp_path / "a" / "delta.safetensors")
    b = read_delta(run(tok, tmp_path / "b", "--seed", "1") and tmp_path / "b" / "delta.safetensors")
    c = read_delta(run(tok, tmp_path / "c", "--seed", "2") and tmp_path / "c" / "delta.safetensors")
    k = "fc1.weight"
    assert np.array_equal(a.sparse[k].delta, b.sparse[k].delta) and not np.array_equal(a.sparse[k].delta,
                                                                                         c.sparse[k].delta)


@pytest.mark.parametrize("flag,reason,names", [
    ("--no-train-bias", None, set()),
    ("--train-norms", "norm", {"norm1.weight", "norm1.bias", "norm.weight", "norm.bias"}),
    ("--train-embeddings", "embedding", {"pos_embed", "cls_token"}),
    ("--train-full=fc2.*", "train-full", {"fc2.weight"}),              # fc2.bias trains in full as a bias
    ("--head=fc2", "head", {"fc2.weight", "fc2.bias"}),
])
def test_what_trains_in_full(tok, tmp_path, flag, reason, names):
    m = run(tok, tmp_path / "r", flag)
    full = m["trained_in_full"]
    d = read_delta(tmp_path / "r" / "delta.safetensors")
    assert set(d.full) == set(full)
    if flag == "--no-train-bias":
        assert not any(k.endswith(".bias") and v == "bias" for k, v in full.items())
        assert "bias" not in m["trainable"]["full_by_reason"]
        return
    assert {k for k, v in full.items() if v == reason} == names
    if flag == "--head=fc2":
        assert m["head"]["name"] == "fc2" and m["head_from"] == "option"
    for k in names:          # these tensors did train
        assert not np.array_equal(d.full[k].value, d.full[k].base), k


def test_image_preparation_flags_override_select(tmp_path, capsys):
    masks = tmp_path / "m.safetensors"
    assert entry(["select", str(SAMPLES / "tiny_hybrid.onnx"), str(SAMPLES / "images"), "-o", str(masks), "--k", "1",
                  "-q"]) == 0
    capsys.readouterr()
    assert entry(["train", f"{SAMPLES / 'tiny_model.py'}:tiny_hybrid", "--weights",
                  str(SAMPLES / "tiny_hybrid.safetensors"), "--masks", str(masks), "--data", str(SAMPLES / "images"),
                  "-o", str(tmp_path / "run"), "--epochs", "1", "--threads", "1", "--no-plot", "--mean", "0.5",
                  "--std", "0.25", "--crop-pct", "1.0"]) == 0
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    img = m["data"]["images"]
    assert img["mean"] == [0.5] and img["std"] == [0.25] and img["crop_pct"] == 1.0
    assert img["from"] == {"size": "masks", "mean": "option", "std": "option", "crop_pct": "option"}
    assert "the options override how select prepared its images: mean 0.5 instead of 0.485,0.456,0.406; std 0.25 " \
           "instead of 0.229,0.224,0.225; crop_pct 1 instead of 0.875" in err


def test_no_plot_quiet_force_threads_device(tok, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", SPEC_TOKEN, "--weights", tok["weights"], "--masks", tok["masks"], "--data", tok["train"], "-o",
            str(out), "--epochs", "1", "--threads", "1"]
    capsys.readouterr()
    assert entry(args + ["-q"]) == 0
    assert capsys.readouterr().err == ""                                   # --quiet: nothing (no warnings here)
    assert (out / "training_curve.png").is_file()                          # plotted without --no-plot
    assert entry(args) == 2 and "--force" in capsys.readouterr().err       # the run exists
    (out / "training_curve.png").unlink()
    before = (out / "delta.safetensors").stat().st_mtime_ns
    assert entry(args + ["--force", "--no-plot"]) == 0
    assert not (out / "training_curve.png").exists() and (out / "delta.safetensors").stat().st_mtime_ns != before
    m = json.loads((out / "metrics.json").read_text())
    assert m["machine"]["torch_threads"] == 1 and m["machine"]["device"] == "cpu"
    assert m["plot"] is None and "epoch   1/1" in capsys.readouterr().err
    assert entry(args + ["--force", "--device", "auto", "-q"]) == 0
    assert json.loads((out / "metrics.json").read_text())["machine"]["device"] == ("cuda" if torch.cuda.is_available()
                                                                                   else "cpu")
    if not torch.cuda.is_available():
        assert entry(args + ["--force", "--device", "cuda"]) == 2
        assert "PyTorch sees no CUDA device" in capsys.readouterr().err


# --- text flags on a tiny Llama ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    pytest.importorskip("transformers")
    import hf_helpers as H

    root = tmp_path_factory.mktemp("flags_lm")
    folder = H.make_folder(root / "lm")
    onnx_path = H.export_onnx(folder, root / "lm.onnx")
    texts = H.cycle_text(24)
    npz = H.tokenize_npz(folder, texts[:8], root / "calib.npz")
    masks = H.select_masks(onnx_path, npz, root / "masks.safetensors", k=2)
    body = H.select_masks(onnx_path, npz, root / "body.safetensors", k=2, exclude=["lm_head*"])   # for seq-cls
    return {"root": root, "folder": folder, "masks": str(masks), "body_masks": str(body), "texts": texts, "H": H}


def lm_run(llm, out: Path, data: Path, *flags: str, code: int = 0) -> dict:
    masks = llm["body_masks"] if "seq-cls" in flags else llm["masks"]
    args = ["train", f"hf:{llm['folder']}", "--masks", masks, "--data", str(data), "-o", str(out), "--epochs",
            "1", "--batch-size", "8", "--threads", "1", "--no-plot", "-q", *flags]
    assert entry(args) == code
    return json.loads((out / "metrics.json").read_text()) if code == 0 else {}


def test_text_and_label_fields(llm, tmp_path, capsys):
    H = llm["H"]
    H.write_jsonl(tmp_path / "body.jsonl", [{"body": t} for t in llm["texts"]])
    m = lm_run(llm, tmp_path / "a", tmp_path / "body.jsonl", "--text-field", "body")
    assert m["epochs"][0]["train_tokens"] == sum(len(t.split()) for t in llm["texts"])   # <s> w1 ... : n words learnt
    recs = [{"text": r["text"], "y": ["no", "yes", "maybe"][r["label"]]} for r in H.cls_records(24)]
    H.write_jsonl(tmp_path / "y.jsonl", recs)
    m = lm_run(llm, tmp_path / "b", tmp_path / "y.jsonl", "--task", "seq-cls", "--label-field", "y")
    assert m["classes"] == ["maybe", "no", "yes"] and m["head"]["num_classes"] == 3
    capsys.readouterr()
    lm_run(llm, tmp_path / "c", tmp_path / "y.jsonl", "--task", "seq-cls", code=2)
    assert "no field 'label'" in capsys.readouterr().err


def test_prompt_and_completion_fields(llm, tmp_path):
    H = llm["H"]
    recs = [{"q": " ".join(t.split()[:3]), "a": " ".join(t.split()[3:])} for t in llm["texts"]]
    H.write_jsonl(tmp_path / "qa.jsonl", recs)
    m = lm_run(llm, tmp_path / "r", tmp_path / "qa.jsonl", "--prompt-field", "q", "--completion-field", "a")
    assert m["epochs"][0]["train_tokens"] == sum(len(r["a"].split()) + 1 for r in recs)   # completion + </s>


def test_tokenizer_flag_is_the_tokenizer_used(llm, tmp_path):
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((llm["folder"] / "tokenizer.json").read_bytes())
    (tmp_path / "t.txt").write_text("\n".join(llm["texts"]) + "\n")
    m = lm_run(llm, tmp_path / "r", tmp_path / "t.txt", "--tokenizer", str(other))
    assert m["data"]["tokenizer"] == str(other / "tokenizer.json")
    (other / "tokenizer.json").write_text("{}")
    lm_run(llm, tmp_path / "bad", tmp_path / "t.txt", "--tokenizer", str(other), code=2)


def test_gradient_checkpointing_gives_the_same_training(llm, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(llm["texts"]) + "\n")
    from fps_graph.training.job import run_train, train_job

    def job(out, **kw):
        return run_train(train_job(f"hf:{llm['folder']}", llm["masks"], str(tmp_path / "t.txt"), str(out), epochs=1,
                                   batch_size=8, threads=1, plot=False, **kw))

    plain, ckpt = job(tmp_path / "a"), job(tmp_path / "b", gradient_checkpointing=True)
    assert ckpt.handle.model.is_gradient_checkpointing and not plain.handle.model.is_gradient_checkpointing
    a, b = read_delta(tmp_path / "a" / "delta.safetensors"), read_delta(tmp_path / "b" / "delta.safetensors")
    for k in a.sparse:
        np.testing.assert_allclose(a.sparse[k].delta, b.sparse[k].delta, rtol=1e-4, atol=1e-7)
    assert entry(["train", SPEC_TOKEN, "--masks", llm["masks"], "--data", str(tmp_path / "t.txt"), "-o",
                  str(tmp_path / "x"), "--gradient-checkpointing", "-q"]) == 2      # factories have none


def test_task_is_checked_once_with_the_known_names(tok, tmp_path, capsys):
    run(tok, tmp_path / "r", "--task", "image-cls")
    run(tok, tmp_path / "x", "--task", "detection", capsys=capsys, code=2)
    err = capsys.readouterr().err
    assert "unknown --task 'detection' (use image-cls, causal-lm, seq-cls)" in err and not (tmp_path / "x").exists()


def test_step_scale_sets_each_entrys_step(tok, tmp_path):
    """One Adam step (update lr * g/|g|): with --step-scale input (default) each entry's change is lr * c, c =
    min(1, ref / its input statistic) from the masks file; with none it is lr for every entry."""
    from fps_graph.formats.masks import load_indices, load_input_scales, read_metadata

    flags = ("--optimizer", "adam", "--batch-size", "40", "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.01",
             "--min-lr", "0.01", "--no-train-bias", "--no-train-head")
    run(tok, tmp_path / "in", *flags)
    run(tok, tmp_path / "none", *flags, "--step-scale", "none")
    scales, meta, idx = load_input_scales(tok["masks"]), read_metadata(tok["masks"]), load_indices(tok["masks"])
    assert scales                                              # the masks carry the statistics
    slowed = 0
    for key, e in read_delta(tmp_path / "in" / "delta.safetensors").sparse.items():
        ref = meta["tensors"][key]["input_scale_ref"]
        c = np.minimum(1.0, ref / scales[key].astype(np.float64))
        free = read_delta(tmp_path / "none" / "delta.safetensors").sparse[key].delta
        moved = np.abs(free) > 1e-3                            # entries whose gradient was not ~0
        np.testing.assert_allclose(np.abs(free[moved]), 0.01, rtol=1e-3)
        np.testing.assert_allclose(np.abs(e.delta[moved]), 0.01 * c[moved], rtol=1e-3)
        slowed += int((c[moved] < 0.99).sum())
        assert np.array_equal(e.indices, idx[key])
    assert slowed > 0
