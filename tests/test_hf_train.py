"""`fps-graph train hf:DIR`: causal-LM and sequence-classification runs on tiny random Llamas, checked against
transformers' own losses, the base weights, the ONNX export after `apply`, and bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import hf_helpers as H  # noqa: E402

from fps_graph import FpsGraphError  # noqa: E402
from fps_graph.formats.delta import read_delta  # noqa: E402
from fps_graph.formats.masks import load_indices  # noqa: E402
from fps_graph.data.text import TextTokenizer as Tokenizer  # noqa: E402
from fps_graph.training.config import DataConfig  # noqa: E402
from fps_graph.training.job import TrainJob, run_train, train_job  # noqa: E402
from fps_graph.training.models import load_hf_model as _load  # noqa: E402
from fps_graph.training.tasks import DataContext, get_task  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama folder (tied embeddings), its ONNX export, masks from select (k=2), cycle text train/val."""
    root = tmp_path_factory.mktemp("hf_lm")
    folder = H.make_folder(root / "lm")
    onnx_path = H.export_onnx(folder, root / "lm.onnx")
    texts = H.cycle_text(48, seed=0)
    (root / "train.txt").write_text("\n".join(texts) + "\n")
    (root / "val.txt").write_text("\n".join(H.cycle_text(16, seed=1)) + "\n")
    npz = H.tokenize_npz(folder, texts[:16], root / "calib.npz")
    masks = H.select_masks(onnx_path, npz, root / "masks.safetensors", k=2)
    return {"root": root, "folder": folder, "onnx": onnx_path, "masks": masks}


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    """A tiny LlamaForSequenceClassification folder (2 labels), its export and masks; 3-class jsonl data."""
    root = tmp_path_factory.mktemp("hf_cls")
    folder = H.make_folder(root / "cls", kind="seq-cls", seed=3, num_labels=2)
    onnx_path = H.export_onnx(folder, root / "cls.onnx", kind="seq-cls")
    recs = H.cls_records(60, seed=0)
    H.write_jsonl(root / "train.jsonl", recs)
    H.write_jsonl(root / "val.jsonl", H.cls_records(24, seed=1))
    npz = H.tokenize_npz(folder, [r["text"] for r in recs[:16]], root / "calib.npz")
    masks = H.select_masks(onnx_path, npz, root / "masks.safetensors", k=2)
    return {"root": root, "folder": folder, "onnx": onnx_path, "masks": masks}


def options(setup, out: Path, data: str, **kw) -> TrainJob:
    base = dict(masks=str(setup["masks"]), data=str(setup["root"] / data), output=str(out), epochs=3, lr=3e-2,
                batch_size=8, warmup_epochs=0.5, seed=0, threads=1)
    base.update(kw)
    return train_job(f"hf:{setup['folder']}", **base)


def load_hf_model(folder: Path, kind: str):
    return _load(folder, get_task(kind).hf_class)


def _base_state(folder: Path, kind: str = "causal-lm") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_hf_model(folder, kind).state_dict().items()}


def _moved(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Flat positions that changed, per tensor that changed."""
    out = {}
    for k, v in after.items():
        diff = np.flatnonzero((v != before[k]).reshape(-1).numpy())
        if diff.size:
            out[k] = diff
    return out


def test_causal_lm_moves_only_selected_and_learns(lm, tmp_path):
    r = run_train(options(lm, tmp_path / "run", "train.txt", val=str(lm["root"] / "val.txt")))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["task"] == "causal-lm" and [e["epoch"] for e in m["epochs"]] == [1, 2, 3]
    losses = [e["train_loss"] for e in m["epochs"]]
    assert losses[-1] < losses[0] - 0.2                      # a learnable toy text: the loss goes down
    assert m["epochs"][-1]["val_loss"] < m["initial"]["val_loss"] - 0.2
    for e in m["epochs"]:
        assert e["train_ppl"] == pytest.approx(math.exp(e["train_loss"]))
        assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
    assert (tmp_path / "run" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"

    # the tied lm_head / embedding is one tensor with one delta, keyed by the model's first name for it
    idx = load_indices(lm["masks"])
    assert "lm_head.weight" in idx and "model.embed_tokens.weight" not in idx
    d = read_delta(tmp_path / "run" / "delta.safetensors")
    assert set(d.sparse) == (set(idx) - {"lm_head.weight"}) | {"model.embed_tokens.weight"}
    assert not d.full                                        # Llama has no biases; the LM head stays sparse
    assert m["trainable"]["selected"] == sum(v.size for v in idx.values())

    # only selected entries moved (both names of the tied tensor), everything else is bit for bit the base
    before = _base_state(lm["folder"])
    after = r.handle.model.state_dict()
    moved = _moved(after, before)
    want = dict(idx)
    want["model.embed_tokens.weight"] = idx["lm_head.weight"]
    assert set(moved) == set(want)
    for k, pos in moved.items():
        assert np.isin(pos, want[k]).all(), k
        assert pos.size > 0.9 * want[k].size                 # and (almost) all of them did move


def test_delta_reloads_bit_for_bit_and_runs_are_deterministic(lm, tmp_path):
    from fps_graph.training.sparse import load_delta

    r1 = run_train(options(lm, tmp_path / "a", "train.txt", epochs=2))
    run_train(options(lm, tmp_path / "b", "train.txt", epochs=2))
    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "a" / "delta.safetensors")), load_file(str(tmp_path / "b" / "delta.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)    # same values bit for bit
    fresh = load_hf_model(lm["folder"], "causal-lm")
    h = load_delta(fresh, tmp_path / "a" / "delta.safetensors")
    for k, t in r1.handle.delta_state_dict().items():
        assert torch.equal(t, h.delta_state_dict()[k]), k
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 20, 21, 22, 0, 0]])
    am = (ids != 0).long()
    with torch.no_grad():
        assert torch.equal(r1.handle.model(input_ids=ids, attention_mask=am).logits,
                           fresh(input_ids=ids, attention_mask=am).logits)


def test_causal_lm_loss_matches_transformers_and_ignores_padding(lm, tmp_path):
    """step_loss == transformers' own loss with labels -100 on padding and prompts; padding changes nothing."""
    model = load_hf_model(lm["folder"], "causal-lm")
    recs = [{"q": "w1 w2 w3", "a": "w4 w5"}, {"q": "w10", "a": "w11 w12 w13 w14"}, {"q": "w30 w31", "a": "w32"}]
    H.write_jsonl(tmp_path / "pc.jsonl", recs)
    task = get_task("causal-lm")
    cfg = DataConfig(data=str(tmp_path / "pc.jsonl"), prompt_field="q", completion_field="a")
    data = task.read(cfg.data, DataContext(model, cfg, lm["folder"]))
    assert list(data.loss_from) == [4, 2, 3]                 # <s> + prompt words
    assert [len(x) for x in data.ids] == [7, 7, 5]           # + completion + </s>
    b = next(data.batches(3))
    assert data.pad_id == 0 and (b["input_ids"][b["attention_mask"] == 0] == 0).all()

    def step_loss(model, batch, *_):
        s = task.step(model, batch, "cpu", 0.0)
        return s.loss, s.n, s.correct

    with torch.no_grad():
        ours, n, _ = step_loss(model, b, "causal-lm", "cpu")
        labels = torch.from_numpy(b["input_ids"]).clone()
        labels[~torch.from_numpy(b["loss_mask"])] = -100
        ref = model(input_ids=torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"]),
                    labels=labels).loss
        assert n == 3 + 5 + 2 and float(ours) == pytest.approx(float(ref), rel=1e-6)
        # each sample alone (no padding): the token-weighted mean of their losses is the padded batch's loss
        sums = []
        for i in range(3):
            one = {k: v[i:i + 1, :len(data.ids[i])] for k, v in b.items()}
            loss_i, n_i, _ = step_loss(model, one, "causal-lm", "cpu")
            sums.append((float(loss_i) * n_i, n_i))
        assert float(ours) == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), rel=1e-5)


def test_prompt_completion_run_learns_only_completions(lm, tmp_path):
    recs = [{"prompt": " ".join(t.split()[:3]), "completion": " ".join(t.split()[3:])} for t in H.cycle_text(40)]
    H.write_jsonl(lm["root"] / "pc_train.jsonl", recs)
    r = run_train(options(lm, tmp_path / "run", "pc_train.jsonl", epochs=2, prompt_field="prompt",
                          completion_field="completion"))
    assert r.metrics["epochs"][-1]["train_loss"] < r.metrics["epochs"][0]["train_loss"]
    # learnt tokens: each completion's words and its </s>, never the prompt's
    assert r.metrics["epochs"][0]["train_tokens"] == sum(len(x["completion"].split()) + 1 for x in recs)


def test_seq_cls_new_seeded_head_and_only_selected_move(cls, tmp_path):
    r = run_train(options(cls, tmp_path / "run", "train.jsonl", val=str(cls["root"] / "val.jsonl"), epochs=4,
                          lr=5e-2))
    m = r.metrics
    assert m["task"] == "seq-cls" and m["classes"] == ["0", "1", "2"]
    assert m["head"] == {"name": "score", "replaced": True, "old_classes": 2, "num_classes": 3, "in_features": 16,
                         "bias": False}
    assert set(m["trained_in_full"]) == {"score.weight"}
    assert m["epochs"][-1]["train_loss"] < m["epochs"][0]["train_loss"]
    assert {"train_acc", "val_acc", "val_loss"} <= set(m["epochs"][0]) and "train_ppl" not in m["epochs"][0]
    # val accuracy equals an independent count with the fine-tuned model
    model = r.handle.model
    tok = Tokenizer(cls["folder"], json.loads((cls["folder"] / "config.json").read_text()))
    correct = 0
    val = [json.loads(x) for x in (cls["root"] / "val.jsonl").read_text().splitlines()]
    with torch.no_grad():
        for rec in val:
            ids = torch.from_numpy(tok.encode([rec["text"]])[0])[None]
            correct += int(model(input_ids=ids).logits.argmax(-1).item() == rec["label"])
    assert m["epochs"][-1]["val_acc"] == pytest.approx(correct / len(val))

    before = _base_state(cls["folder"], "seq-cls")
    after = {k: v for k, v in model.state_dict().items() if k != "score.weight"}
    idx = load_indices(cls["masks"])
    moved = _moved(after, before)
    assert set(moved) <= set(idx) - {"score.weight"} and len(moved) >= len(idx) - 2
    for k, pos in moved.items():
        assert np.isin(pos, idx[k]).all(), k
    # the new head is seeded: the same seed gives the same head before training
    r2 = run_train(options(cls, tmp_path / "run2", "train.jsonl", epochs=1, lr=1e-9, warmup_epochs=0))
    r3 = run_train(options(cls, tmp_path / "run3", "train.jsonl", epochs=1, lr=1e-9, warmup_epochs=0))
    h2 = read_delta(tmp_path / "run2" / "delta.safetensors").full["score.weight"].value
    h3 = read_delta(tmp_path / "run3" / "delta.safetensors").full["score.weight"].value
    assert np.array_equal(h2, h3) and h2.shape == (3, 16)
    assert r2.metrics["head"]["replaced"] and r3.metrics["head"]["replaced"]


def test_apply_onnx_logits_equal_pytorch(lm, tmp_path):
    """Fine-tuned ONNX (apply on the torch.onnx.export) == fine-tuned PyTorch, relative 1e-4; tied copies too."""
    ort = pytest.importorskip("onnxruntime")
    r = run_train(options(lm, tmp_path / "run", "train.txt"))
    out = tmp_path / "ft.onnx"
    assert entry(["apply", str(lm["onnx"]), str(tmp_path / "run" / "delta.safetensors"), "-o", str(out)]) == 0
    ids = np.array([[1, 5, 6, 7, 8, 9, 10, 11], [1, 30, 31, 32, 33, 0, 0, 0]], dtype=np.int64)
    am = (ids != 0).astype(np.int64)
    with torch.no_grad():
        want = r.handle.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(am)).logits.numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids, "attention_mask": am})[0]
    base = ort.InferenceSession(str(lm["onnx"]), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids, "attention_mask": am})[0]
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel
    assert np.abs(base - want).max() / np.abs(want).max() > 1e-2     # training changed the logits


def _cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = entry(["train", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["no-config", "no-weights", "label-missing", "too-long", "other-masks",
                                  "field-missing", "factory-task"])
def test_bad_inputs_are_one_line_errors_and_leave_nothing(lm, cls, tmp_path, capsys, case):
    out = tmp_path / "run"
    common = ["-o", str(out), "--epochs", "1", "--threads", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "no-config":
        args = [f"hf:{empty}", "--masks", str(lm["masks"]), "--data", str(lm["root"] / "train.txt")]
        want = "holds no config.json"
    elif case == "no-weights":
        (empty / "config.json").write_text((lm["folder"] / "config.json").read_text())
        args = [str(empty), "--masks", str(lm["masks"]), "--data", str(lm["root"] / "train.txt")]
        want = "holds no weights"
    elif case == "label-missing":
        H.write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "w1 w2", "label": 0}, {"text": "w3 w4"}])
        args = [f"hf:{cls['folder']}", "--masks", str(cls["masks"]), "--data", str(tmp_path / "nolabel.jsonl")]
        want = "nolabel.jsonl:2: no field 'label'"
    elif case == "too-long":
        args = [f"hf:{lm['folder']}", "--masks", str(lm["masks"]), "--data", str(lm["root"] / "train.txt"),
                "--max-length", "5"]
        want = "longer than max_length 5"
    elif case == "other-masks":
        args = [f"hf:{lm['folder']}", "--masks", str(cls["masks"]), "--data", str(lm["root"] / "train.txt")]
        want = "mask 'score.weight'"
    elif case == "field-missing":
        H.write_jsonl(tmp_path / "t.jsonl", [{"body": "w1 w2 w3"}])
        args = [f"hf:{lm['folder']}", "--masks", str(lm["masks"]), "--data", str(tmp_path / "t.jsonl")]
        want = "no field 'text'"
    else:
        args = [str(Path(__file__).parent / "conftest_train.py") + ":token_net", "--masks", str(lm["masks"]),
                "--data", str(lm["root"] / "train.txt"), "--task", "causal-lm"]
        want = "needs a Hugging Face model folder"
    code, err = _cli(args + common, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and want in err, err
    assert not out.exists()


def test_masks_of_a_differently_sized_model_name_the_key(lm, tmp_path):
    other = H.make_folder(tmp_path / "wide", intermediate_size=48)
    with pytest.raises(FpsGraphError, match=r"mask 'model\.layers\.0\.mlp\.down_proj\.weight' .* expected shape "
                                            r"\[16, 48\]"):
        run_train(options({"folder": other, "masks": lm["masks"], "root": lm["root"]}, tmp_path / "run",
                          "train.txt"))
    assert not (tmp_path / "run").exists()


def test_apply_merged_decoder_logits_equal_trained_pytorch(tmp_path):
    """Trained by `train hf:DIR`, applied to an Optimum-style merged decoder (weights shared by both If branches):
    both branches give the fine-tuned PyTorch model's logits (relative 1e-4), tied embedding copies included."""
    pytest.importorskip("onnxruntime")
    import test_control_flow as cf      # the decoder export and If merge of the control-flow tests

    folder = H.make_folder(tmp_path / "lm", vocab_size=cf.VOCAB, use_cache=True)
    no_past, with_past = cf._export_decoders(load_hf_model(folder, "causal-lm"), tmp_path)
    merged = cf.merge_decoders(no_past, with_past, tmp_path / "decoder_model_merged.onnx")
    texts = H.cycle_text(32)
    (tmp_path / "train.txt").write_text("\n".join(texts) + "\n")
    npz = H.tokenize_npz(folder, texts[:8], tmp_path / "calib.npz", width=8)
    z = dict(np.load(npz))
    z["position_ids"] = np.tile(np.arange(8, dtype=np.int64), (8, 1))
    np.savez(npz, **z)
    masks = H.select_masks(no_past, npz, tmp_path / "masks.safetensors", k=2)
    r = run_train(options({"folder": folder, "masks": masks, "root": tmp_path}, tmp_path / "run", "train.txt"))
    assert entry(["apply", str(merged), str(tmp_path / "run" / "delta.safetensors"), "-o",
                  str(tmp_path / "ft.onnx")]) == 0
    tuned = r.handle.model
    for branch in ("no_past", "with_past"):
        feed = cf._decoder_batches(branch, merged=True, n=1, seed=5)[0]
        got = cf._run(tmp_path / "ft.onnx", feed)[0]
        cf._close(got, cf._torch_logits(tuned, feed))
        assert np.max(np.abs(cf._run(merged, feed)[0] - got)) > 1e-3      # training changed the outputs


def test_seq_cls_from_a_causal_lm_folder_gets_a_new_seeded_head(lm, tmp_path):
    """A causal-LM checkpoint trained for seq-cls: `score` is not in it, so it is new and seeded, and the delta
    reloads onto a fresh AutoModelForSequenceClassification of that folder with the trained outputs."""
    from fps_graph.training.sparse import load_delta

    masks = H.select_masks(lm["onnx"], lm["root"] / "calib.npz", tmp_path / "masks.safetensors", k=2,
                           exclude=["lm_head*"])
    H.write_jsonl(tmp_path / "train.jsonl", H.cls_records(40))
    setup = {"folder": lm["folder"], "masks": masks, "root": tmp_path}
    runs = [run_train(options(setup, tmp_path / f"run{i}", "train.jsonl", task="seq-cls", epochs=1)) for i in (0, 1)]
    heads = [read_delta(tmp_path / f"run{i}" / "delta.safetensors").full["score.weight"] for i in (0, 1)]
    assert heads[0].base is None and np.array_equal(heads[0].value, heads[1].value)
    assert runs[0].metrics["head"]["replaced"] and runs[0].metrics["head"]["num_classes"] == 3
    assert any("not in the checkpoint" in n for n in runs[0].metrics["notes"])
    fresh = load_hf_model(lm["folder"], "seq-cls")
    load_delta(fresh, tmp_path / "run0" / "delta.safetensors")
    ids = torch.tensor([[1, 5, 6, 7], [1, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, runs[0].handle.model(input_ids=ids).logits)


def test_train_follows_the_masks_text_record(lm, tmp_path, capsys):
    """`select` from text records its tokenizer and max length in the masks; train uses them unless told."""
    masks = tmp_path / "masks.safetensors"
    assert entry(["select", str(lm["onnx"]), str(lm["root"] / "train.txt"), "-o", str(masks), "--k", "2",
                  "--tokenizer", str(lm["folder"]), "--max-length", "8"]) == 0
    setup = {"folder": lm["folder"], "masks": masks, "root": lm["root"]}
    with pytest.raises(FpsGraphError, match="longer than max_length 8"):
        run_train(options(setup, tmp_path / "run", "train.txt"))
    r = run_train(options(setup, tmp_path / "run", "train.txt", epochs=1, max_length=16))
    assert r.metrics["data"]["max_length"] == 16
    assert r.metrics["data"]["tokenizer"] == str(lm["folder"] / "tokenizer.json")
    assert r.metrics["data"]["masks_record"]["max_length"] == 8


def test_dynamo_export_keys_are_the_parameter_names(lm, tmp_path):
    """select on a torch.onnx.export(dynamo=True) export keys its masks by parameter name too (folded-from
    metadata), so attach on the transformers model takes them as they are."""
    from fps_graph.training.sparse import attach, canonical_masks

    onnx_path = H.export_onnx(lm["folder"], tmp_path / "dynamo.onnx", dynamo=True)
    masks = H.select_masks(onnx_path, lm["root"] / "calib.npz", tmp_path / "masks.safetensors", k=2)
    legacy, dyn = load_indices(lm["masks"]), load_indices(masks)
    assert sorted(dyn) == sorted(legacy)
    model = load_hf_model(lm["folder"], "causal-lm")
    handle = attach(model, canonical_masks(model, masks))
    assert sorted(handle.deltas) == sorted((set(dyn) - {"lm_head.weight"}) | {"model.embed_tokens.weight"})


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_hf_grad_clip_bounds_the_step_and_optimizer_is_sgd(lm, cls, tmp_path, capsys, task):
    """`train hf:DIR --optimizer sgd --grad-clip C`, one full-batch step (SGD's momentum buffer starts as the
    gradient): all trained values together move by lr * C, in the direction of the unclipped step."""
    setup, data = (lm, "train.txt") if task == "causal-lm" else (cls, "train.jsonl")
    lr, clip = 0.05, 1e-3

    def run(name: str, *flags: str, rate: float = lr):
        out = tmp_path / name
        code, err = _cli([f"hf:{setup['folder']}", "--masks", str(setup["masks"]), "--data",
                          str(setup["root"] / data), "-o", str(out), "--epochs", "1", "--batch-size", "64", "--lr",
                          str(rate), "--warmup-epochs", "0", "--optimizer", "sgd", "--threads", "1", "--no-plot",
                          "-q", "--task", task, "--step-scale", "none", *flags], capsys)   # the clip bounds theta
        assert code == 0, err
        return read_delta(out / "delta.safetensors")

    # the new, seeded seq-cls head has no start value in the file: a run at lr 1e-30 leaves it at its start
    start = {k: e.value for k, e in run("zero", rate=1e-30).full.items() if e.base is None}
    assert ("score.weight" in start) == (task == "seq-cls")

    def changed(d) -> dict[str, np.ndarray]:
        out = {f"{k}:delta": e.delta for k, e in d.sparse.items()}
        out.update({k: e.value - (e.base if e.base is not None else start[k]) for k, e in d.full.items()})
        return out

    def norm(t: dict[str, np.ndarray]) -> float:
        return math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in t.values()))

    clipped, free = changed(run("clip", "--grad-clip", str(clip))), changed(run("free"))
    assert norm(clipped) == pytest.approx(lr * clip, rel=1e-4)
    assert norm(free) > 10 * lr * clip
    for k in free:
        np.testing.assert_allclose(clipped[k], free[k] * (lr * clip / norm(free)), rtol=1e-3, atol=1e-8, err_msg=k)
