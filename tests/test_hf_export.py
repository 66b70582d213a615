"""`fps-graph export hf:DIR`: a Hugging Face folder -> the ONNX folder `select` reads. ONNX Runtime equals PyTorch
(relative 1e-4) at batch sizes and lengths other than the example's, with padding; weights keep their PyTorch
names (a tied matrix under the embedding's name); `select` runs on the folder with text."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

import hf_helpers as H  # noqa: E402

from fps_graph.errors import FpsGraphError  # noqa: E402
from fps_graph.formats.masks import load_indices, read_metadata  # noqa: E402
from fps_graph.integrations.hf_export import HfExportOptions, Task, export_hf  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402

REL = 1e-4


def _reference(folder, task):
    import transformers

    cls = {"causal-lm": transformers.AutoModelForCausalLM, "seq-cls": transformers.AutoModelForSequenceClassification,
           "feature-extraction": transformers.AutoModel}[task]
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def _batches(vocab, token_types):
    """(inputs) at batch 1 / length 5, batch 3 / length 11 with two rows right-padded, batch 4 / length 2."""
    g = torch.Generator().manual_seed(7)
    out = []
    for b, t, pads in ((1, 5, ()), (3, 11, ((0, 4), (2, 7))), (4, 2, ())):
        ids = torch.randint(5, vocab, (b, t), generator=g)
        am = torch.ones(b, t, dtype=torch.int64)
        for row, keep in pads:
            am[row, keep:] = 0
        x = {"input_ids": ids, "attention_mask": am}
        if token_types:
            x["token_type_ids"] = torch.zeros_like(ids)
        out.append(x)
    return out


def assert_matches(folder, out, task):
    """ONNX Runtime outputs == PyTorch outputs (relative 1e-4) on the _batches shapes; padded positions skipped."""
    ref = _reference(folder, task)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    key = "last_hidden_state" if task == "feature-extraction" else "logits"
    for x in _batches(ref.config.vocab_size, "token_type_ids" in names):
        assert set(names) == set(x)
        got = sess.run(None, {n: x[n].numpy() for n in names})[0]
        with torch.no_grad():
            want = ref(**x)[key].numpy()
        assert got.shape == want.shape
        diff = np.abs(got - want)
        if want.ndim == 3:
            diff = diff[x["attention_mask"].numpy().astype(bool)]
        assert diff.max() / np.abs(want).max() < REL


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    return {"llama": H.make_folder(root / "llama"), "qwen": H.make_qwen_folder(root / "qwen"),
            "bert": H.make_bert_folder(root / "bert"), "bert_base": H.make_bert_folder(root / "bert_base", "base"),
            "root": root}


@pytest.mark.parametrize("name,task", [("llama", "causal-lm"), ("qwen", "causal-lm"), ("bert", "seq-cls"),
                                       ("bert_base", "feature-extraction")])
def test_ort_equals_pytorch(folders, tmp_path, name, task):
    out = tmp_path / "onnx"
    report = export_hf(folders[name], out)          # the task from config.json's architectures
    assert report["task"] == task
    assert {"model.onnx", "tokenizer.json", "config.json", "tokenizer_config.json"} <= set(report["files"])
    assert all((out / f).is_file() for f in report["files"])
    assert report["max_rel_error"] < REL
    assert_matches(folders[name], out, task)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in __import__("onnx").load(str(out / "model.onnx")).graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]


def test_weights_keep_pytorch_names_tied_once(folders, tmp_path):
    import onnx

    out = tmp_path / "onnx"
    report = export_hf(folders["llama"], out)
    assert report["tied"] == {"model.embed_tokens.weight": ["lm_head.weight"]}
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    ref = _reference(folders["llama"], "causal-lm")
    for name, p in ref.named_parameters():       # each tensor stored once, under its own name, in its own layout
        assert np.array_equal(onnx.numpy_helper.to_array(inits[name]), p.detach().numpy()), name
    assert "lm_head.weight" not in inits
    big = [n for n, t in inits.items() if list(t.dims) in ([H.VOCAB, 16], [16, H.VOCAB])]
    assert big == ["model.embed_tokens.weight"]          # the tied matrix: one copy
    wmap = json.loads({p.key: p.value for p in proto.metadata_props}["fps_graph.weight_map"])
    assert wmap["model.embed_tokens.weight"]["aliases"] == ["lm_head.weight"]


def test_select_on_export_with_text(folders, tmp_path):
    out = tmp_path / "onnx"
    export_hf(folders["llama"], out)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(H.cycle_text(24)) + "\n")
    masks = tmp_path / "masks.safetensors"
    assert entry(["select", str(out), str(calib), "--k", "2", "-o", str(masks)]) == 0
    idx = load_indices(masks)
    ref = _reference(folders["llama"], "causal-lm")
    linears = {f"{n}.weight" for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    # every Linear, under its PyTorch name; the tied LM head under the embedding's name
    assert set(idx) == (linears - {"lm_head.weight"}) | {"model.embed_tokens.weight"}
    meta = read_metadata(masks)
    assert meta["tensors"]["model.embed_tokens.weight"]["op"] == "MatMul"
    assert meta["data"]["kind"] == "text" and meta["data"]["tokenizer"].endswith("tokenizer.json")
    # K per output neuron: rows of [out, in] keys hold 2 entries each
    q = "model.layers.0.self_attn.q_proj.weight"
    rows = idx[q] // 16
    assert np.array_equal(np.bincount(rows, minlength=16), np.full(16, 2))


def test_cache_export_same_masks(folders, tmp_path):
    """--cache: Optimum's decoder_with_past inputs; select fills an empty cache and picks the same entries."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(H.cycle_text(16, seed=3)) + "\n")
    masks = {}
    for cache in (False, True):
        out = tmp_path / f"onnx{int(cache)}"
        report = export_hf(folders["llama"], out, HfExportOptions(cache=cache))
        assert report["max_rel_error"] < REL
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        if cache:
            assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
            assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
            assert [o.name for o in sess.get_outputs()][1:] == [f"present.{i}.{kv}" for i in range(2)
                                                                for kv in ("key", "value")]
            _check_cache_step(folders["llama"], sess)
        else:
            assert names == ["input_ids", "attention_mask"]
        masks[cache] = tmp_path / f"m{int(cache)}.safetensors"
        assert entry(["select", str(out), str(calib), "--k", "3", "-o", str(masks[cache])]) == 0
    a, b = load_indices(masks[False]), load_indices(masks[True])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _check_cache_step(folder, sess):
    """One decoding step with a 4-token past: ONNX logits and presents == PyTorch's."""
    from transformers import DynamicCache

    ref = _reference(folder, "causal-lm")
    g = torch.Generator().manual_seed(1)
    prompt, step = torch.randint(5, H.VOCAB, (2, 4), generator=g), torch.randint(5, H.VOCAB, (2, 1), generator=g)
    with torch.no_grad():
        first = ref(input_ids=prompt, use_cache=True, past_key_values=DynamicCache(config=ref.config))
        past = first.past_key_values
        flat = [t.numpy().copy() for layer in past.layers for t in (layer.keys, layer.values)]
        nxt = ref(input_ids=step, attention_mask=torch.ones(2, 5, dtype=torch.int64), past_key_values=past,
                  position_ids=torch.full((2, 1), 4), use_cache=True)
    feeds = {"input_ids": step.numpy(), "attention_mask": np.ones((2, 5), np.int64),
             "position_ids": np.full((2, 1), 4, np.int64)}
    feeds.update({f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": t for i, t in enumerate(flat)})
    got = sess.run(None, feeds)
    want = nxt.logits.numpy()
    assert np.abs(got[0] - want).max() / np.abs(want).max() < REL
    assert got[1].shape == (2, 1, 5, 8)                    # [batch, kv heads, past + 1, head dim]


def test_tokenizer_json_written_from_vocab(tmp_path):
    """A folder with only a WordPiece vocab.txt: export writes the tokenizer.json `select` needs."""
    folder = H.make_bert_folder(tmp_path / "bert", tokenizer_json=False)
    assert not (folder / "tokenizer.json").exists()
    out = tmp_path / "onnx"
    export_hf(folder, out)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("w0 w1").ids == [2, 5, 6, 3]           # [CLS] w0 w1 [SEP]
    calib = tmp_path / "c.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in H.cls_records(12)))
    assert entry(["select", str(out), str(calib), "--k", "1", "-o", str(tmp_path / "m.safetensors")]) == 0
    assert "classifier.weight" in load_indices(tmp_path / "m.safetensors")


def test_cli_export_and_refusals(folders, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert entry(["export", f"hf:{folders['bert']}", "--task", "feature-extraction", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "BertModel, feature-extraction" in err and "ONNX Runtime == PyTorch" in err
    # feature-extraction keys are the base model's names
    import onnx
    wmap = json.loads({p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
                      ["fps_graph.weight_map"])
    assert "encoder.layer.0.attention.self.query.weight" in {r["torch"] for r in wmap.values()}
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["-o", str(out)], "output folder exists and is not empty"),
        (["-o", str(tmp_path / "x"), "--input-shape", "1,8"], "--input-shape is for a FACTORY export"),
        (["-o", str(tmp_path / "x"), "--task", "feature-extraction", "--cache"], "causal-lm exports only"),
        (["-o", str(tmp_path / "no" / "x")], "parent does not exist"),
    ]
    for extra, msg in cases:
        assert entry(["export", f"hf:{folders['bert']}", *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert entry(["export", f"hf:{tmp_path / 'missing'}", "-o", str(tmp_path / "x")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert entry(["export", "m.py:f", "-o", "x.onnx", "--cache"]) == 2
    assert "--cache is for an hf:DIR export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before           # nothing left behind
    # --force replaces the folder's files
    assert entry(["export", f"hf:{folders['bert']}", "-o", str(out), "--force"]) == 0
    assert "BertForSequenceClassification, seq-cls" in capsys.readouterr().err


def test_seq_cls_from_causal_lm_checkpoint_warns_and_is_deterministic(folders, tmp_path, capsys):
    """A seq-cls export of a causal-LM checkpoint has a new head: said, and seeded (same file twice)."""
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"o{i}")
        assert entry(["export", f"hf:{folders['llama']}", "--task", "seq-cls", "-o", str(outs[-1])]) == 0
        err = capsys.readouterr().err
        assert "warning: score.weight not in" in err and "initialised at random" in err
    assert (outs[0] / "model.onnx").read_bytes() == (outs[1] / "model.onnx").read_bytes()


def test_options_validated():
    with pytest.raises(FpsGraphError, match="unknown task"):
        HfExportOptions(task="image-cls")
    with pytest.raises(FpsGraphError, match="causal-lm exports only"):
        HfExportOptions(task=Task.SEQ_CLS, cache=True)


def _masks_from(folder, tmp_path, task, records=False):
    out = tmp_path / f"onnx_{task}"
    export_hf(folder, out, HfExportOptions(task=task))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in H.cls_records(12)))
    masks = tmp_path / f"m_{task}.safetensors"
    assert entry(["select", str(out), str(calib), "--k", "1", "-o", str(masks)]) == 0
    return masks


def test_feature_extraction_masks_train_a_classifier(folders, tmp_path):
    """Masks of the plain encoder (encoder.*) attach to BertForSequenceClassification (bert.encoder.*) through
    base_model_prefix, entry for entry; and back (classifier masks on the plain model lose the prefix)."""
    from transformers import BertForSequenceClassification, BertModel

    from fps_graph.training.sparse import attach

    masks = _masks_from(folders["bert_base"], tmp_path, "feature-extraction")
    idx = load_indices(masks)
    assert all(not k.startswith("bert.") for k in idx)
    model = BertForSequenceClassification.from_pretrained(str(folders["bert"]), dtype=torch.float32)
    handle = attach(model, masks)
    assert set(handle.deltas) == {f"bert.{k}" for k in idx}
    for k, v in idx.items():
        assert np.array_equal(handle.deltas[f"bert.{k}"].index.numpy(), v)
    assert any("mask keys renamed" in n and "-> bert." in n for n in handle.notes)
    cls_masks = _masks_from(folders["bert"], tmp_path, "seq-cls")
    base = BertModel.from_pretrained(str(folders["bert_base"]), dtype=torch.float32)
    h2 = attach(base, {k: v for k, v in load_indices(cls_masks).items() if k.startswith("bert.")})
    assert all(not k.startswith("bert.") for k in h2.deltas) and h2.deltas


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_causal_lm_masks_train_seq_cls_without_the_lm_head(folders, tmp_path, name):
    """Masks of a causal-LM export on a seq-cls model: the LM head's entries (lm_head.weight, or the tied embedding
    used as the head) are left out with a note, never a misleading 'did you mean score.weight?'."""
    from transformers import AutoModelForSequenceClassification

    from fps_graph.training.sparse import attach

    masks = _masks_from(folders[name], tmp_path, "causal-lm")
    head_key = "model.embed_tokens.weight" if name == "llama" else "lm_head.weight"
    assert head_key in load_indices(masks)
    model = AutoModelForSequenceClassification.from_pretrained(str(folders[name]), dtype=torch.float32,
                                                               num_labels=3)
    handle = attach(model, masks)
    assert head_key not in handle.deltas and "model.embed_tokens.weight" not in handle.deltas
    assert set(handle.deltas) == set(load_indices(masks)) - {head_key}
    assert any(f"left out {head_key}: selected on the LM head" in n for n in handle.notes), handle.notes
    assert "score.weight" in handle.full


def test_check_refuses_a_mismatch_and_no_check_skips_it(folders, tmp_path, monkeypatch, capsys):
    """--check (default): an export whose ONNX Runtime outputs differ from PyTorch's is refused, nothing written;
    --no-check does not run the comparison."""
    import fps_graph.integrations.hf_export as hx

    monkeypatch.setattr(hx, "_check", lambda *a: 0.5)
    out = tmp_path / "o"
    assert entry(["export", f"hf:{folders['qwen']}", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "differ from PyTorch's by 5.00e-01" in err and err.count("\n") == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []

    def boom(*a):
        raise AssertionError("--no-check ran the check")

    monkeypatch.setattr(hx, "_check", boom)
    assert entry(["export", f"hf:{folders['qwen']}", "-o", str(out), "--no-check"]) == 0
    assert "ONNX Runtime ==" not in capsys.readouterr().err and (out / "model.onnx").is_file()


def test_large_model_goes_to_external_data(folders, tmp_path, monkeypatch):
    """Over the size limit (lowered here) the weights go to model.onnx.data beside model.onnx; select and ONNX
    Runtime read it, and an export --force that is small again removes the stale data file."""
    import fps_graph.integrations.hf_export as hx

    monkeypatch.setattr(hx, "EXTERNAL_OVER", 1000)
    out = tmp_path / "onnx"
    report = export_hf(folders["llama"], out)
    assert "model.onnx.data" in report["files"] and (out / "model.onnx.data").stat().st_size > 10_000
    assert (out / "model.onnx").stat().st_size < 200_000
    assert_matches(folders["llama"], out, "causal-lm")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(H.cycle_text(8)) + "\n")
    assert entry(["select", str(out), str(calib), "-o", str(tmp_path / "m.safetensors")]) == 0
    monkeypatch.setattr(hx, "EXTERNAL_OVER", 1_800_000_000)
    export_hf(folders["llama"], out, HfExportOptions(force=True))
    assert not (out / "model.onnx.data").exists()
    assert_matches(folders["llama"], out, "causal-lm")
