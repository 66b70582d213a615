"""Tiny random transformers models for the Hugging Face tests: a model folder (config, safetensors, a word-level
tokenizer.json), a learnable toy text, its ONNX export by torch.onnx.export and masks from `select` on it.

Imported by tests/test_hf_train.py, test_hf_trainer.py and test_peft.py (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "<s>", "</s>", "[UNK]"]        # ids 0..3
VOCAB = len(SPECIAL) + len(WORDS)


def write_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer.json (whitespace words, '<s>' prepended) for the toy vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = folder / "tokenizer.json"
    tok.save(str(path))
    from transformers import PreTrainedTokenizerFast   # tokenizer_config.json too, for AutoTokenizer

    PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(str(folder))
    return path


def llama_config(**kw):
    """A 2-layer Llama with grouped KV heads and tied embeddings (the shape of small real LLMs)."""
    from transformers import LlamaConfig

    base = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, use_cache=False)
    base.update(kw)
    return LlamaConfig(**base)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():    # no bit-identical tensors (norm ones) for exporters to merge
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_folder(folder: Path, kind: str = "causal-lm", seed: int = 0, **kw) -> Path:
    """save_pretrained of a seeded tiny Llama (causal-lm, or seq-cls with num_labels) plus tokenizer.json."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cls = LlamaForCausalLM if kind == "causal-lm" else LlamaForSequenceClassification
    model = _perturb(cls(llama_config(**kw)), seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder


def cycle_text(n: int, seed: int = 0, length: int = 12) -> list[str]:
    """Lines of consecutive words on a cycle (w7 w8 w9 ...): the next word follows from the current one."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        start, m = int(rng.integers(len(WORDS))), int(rng.integers(length // 2, length + 1))
        lines.append(" ".join(WORDS[(start + j) % len(WORDS)] for j in range(m)))
    return lines


def cls_records(n: int, seed: int = 0, classes: int = 3) -> list[dict]:
    """seq-cls records: the label is the first word's index modulo `classes`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ws = rng.integers(len(WORDS), size=int(rng.integers(3, 8)))
        out.append({"text": " ".join(WORDS[i] for i in ws), "label": int(ws[0]) % classes})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def export_onnx(folder: Path, path: Path, kind: str = "causal-lm", dynamo: bool = False) -> Path:
    """torch.onnx.export of the folder's model (TorchScript exporter, or dynamo): inputs input_ids, attention_mask."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()

    class Export(type(model)):   # two inputs, logits out; parameter names stay those of the model
        def forward(self, input_ids, attention_mask):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    model.__class__ = Export
    ids = torch.randint(4, VOCAB, (2, 8))
    am = torch.ones(2, 8, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    kw: dict = {"dynamic_axes": axes}
    if dynamo:
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)
        kw = {"dynamic_shapes": ({0: batch, 1: seq}, {0: batch, 1: seq})}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, am), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamo=dynamo, **kw)
    return path


def tokenize_npz(folder: Path, texts: list[str], path: Path, width: int = 16) -> Path:
    """input_ids/attention_mask arrays (right-padded to width) for `select`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = np.zeros((len(texts), width), dtype=np.int64)
    am = np.zeros_like(ids)
    for r, e in enumerate(tok.encode_batch(texts)):
        x = e.ids[:width]
        ids[r, :len(x)] = x
        am[r, :len(x)] = 1
    np.savez(path, input_ids=ids, attention_mask=am)
    return path


def select_masks(onnx_path: Path, npz: Path, out: Path, k: int = 2, **kw) -> Path:
    """fps-graph select with k per neuron."""
    from fps_graph.selection.pipeline import SelectOptions, run_select, write_result

    write_result(run_select(onnx_path, str(npz), SelectOptions(k=k, **kw)), out, force=True)
    return out


def make_qwen_folder(folder: Path, seed: int = 0) -> Path:
    """save_pretrained of a seeded tiny Qwen2 causal LM with untied embeddings (q/k/v biases) plus tokenizer.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    model = _perturb(Qwen2ForCausalLM(cfg), seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder


BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert_folder(folder: Path, kind: str = "seq-cls", seed: int = 0, num_labels: int = 3,
                     tokenizer_json: bool = True) -> Path:
    """save_pretrained of a seeded tiny BERT (BertForSequenceClassification, or the plain BertModel for kind
    'base') with a WordPiece vocab.txt tokenizer (tokenizer.json removed when tokenizer_json is false)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(BERT_SPECIAL) + len(WORDS), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64, num_labels=num_labels,
                     type_vocab_size=2)
    model = _perturb((BertForSequenceClassification if kind == "seq-cls" else BertModel)(cfg), seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    (folder / "vocab.txt").write_text("\n".join(BERT_SPECIAL + WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=64).save_pretrained(str(folder))
    if not tokenizer_json:
        (folder / "tokenizer.json").unlink()
    return folder
