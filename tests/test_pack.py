"""Packed text (``--pack LENGTH``): documents joined with the tokenizer's separator, cut into rows of exactly LENGTH.

The reference builds the same token stream here by its own rules (each document tokenized whole with its special
tokens, the separator between two documents unless the first already ends with it, the tail that fills no row
dropped), cuts it with NumPy and runs every window through the PyTorch model with forward hooks (tests/oracle.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fps_graph.data.text import TextOptions, load_tokenizer  # noqa: E402
from fps_graph.errors import FpsGraphError  # noqa: E402
from fps_graph.formats.masks import load_masks, read_metadata  # noqa: E402

from oracle import hook_stats  # noqa: E402
from test_text import (CORPUS, _Forward, bert, bert_forward, check_against_oracle, dense, llama,  # noqa: E402,F401
                       llama_forward, oracle_masks, per_sequence_oracle, run_cli, select)

# documents of 5 to 40 words, so that rows start mid-document and span document boundaries
DOCS = [" ".join(CORPUS[i % len(CORPUS)] for i in range(j, j + n)) for j, n in
        enumerate([1, 3, 2, 5, 1, 4, 2, 1, 3])]


def window_oracle(model, tokenizer_path, docs, sep_token: str, length: int, forward) -> tuple[dict, int, int]:
    """{module: (abs, sq, count)} over the packed windows, the number of windows, and the dropped tokens."""
    tok = load_tokenizer(tokenizer_path)
    sep = tok.token_to_id(sep_token)
    stream: list[int] = []
    for doc in docs:
        ids = tok.encode(doc).ids
        if stream and stream[-1] != sep:
            stream.append(sep)
        stream.extend(ids)
    n = len(stream) // length
    windows = np.array(stream[:n * length], dtype=np.int64).reshape(n, length)
    ref, _ = hook_stats(_Forward(model, forward), windows, batch_size=3)
    return {k.split(".", 1)[1]: v for k, v in ref.items()}, n, len(stream) - n * length


@pytest.fixture()
def docs_file(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("\n".join(DOCS) + "\n")
    return p


@pytest.mark.parametrize("length", [6, 16])
def test_packed_llama_matches_window_oracle(llama, docs_file, length):
    lm, root = llama
    res = select(root, docs_file, pack=length, batch_size=3)
    ref, rows, dropped = window_oracle(lm, root / "tokenizer.json", DOCS, "</s>", length, llama_forward)
    assert rows > 3 and dropped > 0
    check_against_oracle(res, ref)
    assert res.stats.num_samples == rows
    for counts in res.stats.counts.values():
        assert counts == rows * length
    masks = dense(res)
    for key, want in oracle_masks(lm, ref, 1).items():
        assert np.array_equal(masks[key], want), key
    note = [w for w in res.warnings if w.startswith("packed ")]
    assert note and f"into {rows} rows of {length} tokens; the last {dropped} tokens" in note[0]
    rec = res.metadata["data"]["packing"]
    assert rec == {"length": length, "separator": "</s>", "documents": len(DOCS), "rows": rows,
                   "stream_tokens": rows * length + dropped, "dropped_tokens": dropped}


def test_packed_bert_uses_its_sep_and_differs_from_per_document(bert, docs_file):
    model, root = bert
    res = select(root / "model.onnx", docs_file, pack=9)
    ref, rows, _ = window_oracle(model, root / "tokenizer.json", DOCS, "[SEP]", 9, bert_forward)
    check_against_oracle(res, ref)
    assert res.metadata["data"]["packing"]["separator"] == "[SEP]"
    # the oracle can tell packing from exact per-document statistics
    exact = per_sequence_oracle(model, root / "tokenizer.json", DOCS, 48, bert_forward)
    with pytest.raises(AssertionError):
        check_against_oracle(res, exact)


def test_pack_batch_size_and_rerun_give_the_same_masks(llama, docs_file):
    _, root = llama
    a = select(root, docs_file, pack=8, batch_size=1)
    b = select(root, docs_file, pack=8, batch_size=5)
    c = select(root, docs_file, pack=8, batch_size=5)
    assert all(np.array_equal(a.indices[k], b.indices[k]) for k in a.indices)
    assert all(b.indices[k].tobytes() == c.indices[k].tobytes() for k in b.indices)


def test_pack_flag_writes_packed_rows(llama, docs_file, tmp_path, capsys):
    _, root = llama
    out = tmp_path / "m.safetensors"
    code, err = run_cli(capsys, "select", root, docs_file, "--pack", "8", "-o", out, "--provider", "cpu")
    assert code == 0, err
    meta = read_metadata(out)
    rows, dropped = _rows(root, 8)
    assert meta["data"]["packing"]["rows"] == rows and int(meta["num_samples"]) == rows
    assert meta["data"]["max_length"] == 8 and meta["data"]["padding"] == "none (packed rows)"
    assert f"the last {dropped} tokens (a partial row) are not used" in err
    assert load_masks(out)


def _rows(root, length: int) -> tuple[int, int]:
    tok = load_tokenizer(root / "tokenizer.json")
    sep = tok.token_to_id("</s>")
    total, last = 0, None
    for doc in DOCS:
        ids = tok.encode(doc).ids
        if last is not None and last != sep:
            total += 1
        total += len(ids)
        last = ids[-1]
    return total // length, total % length


def test_separator_from_the_configs_first(llama, docs_file, tmp_path):
    """tokenizer_config.json's eos_token wins over config.json's eos_token_id and the vocabulary."""
    _, root = llama
    folder = tmp_path / "m"
    folder.mkdir()
    for f in root.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    res = select(folder, docs_file, pack=8)
    assert res.metadata["data"]["packing"]["separator"] == "<unk>"


def test_pack_bad_inputs_one_line_exit_2(bert, llama, docs_file, tmp_path, capsys):
    _, broot = bert
    _, lroot = llama
    nosep = tmp_path / "nosep"
    nosep.mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for line in CORPUS for w in line.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(nosep / "tokenizer.json"))
    (nosep / "model.onnx").write_bytes((broot / "model.onnx").read_bytes())
    (nosep / "config.json").write_text((broot / "config.json").read_text())
    arr = tmp_path / "x.npz"
    np.savez(arr, input_ids=np.ones((2, 5), np.int64), attention_mask=np.ones((2, 5), np.int64),
             token_type_ids=np.zeros((2, 5), np.int64))
    cases = [
        ([lroot, docs_file, "--pack", "8", "--max-length", "8"], "give --pack LENGTH or --max-length, not both"),
        ([lroot, docs_file, "--pack", "8", "--no-truncate"], "--no-truncate does not apply with --pack"),
        ([lroot, docs_file, "--pack", "100000"], "exceeds the model's 64 positions"),
        ([nosep, docs_file, "--pack", "8"], "end-of-sequence token, and none was found"),
        ([broot / "model.onnx", arr, "--pack", "8"], "packing applies to text data"),
    ]
    for args, msg in cases:
        before = sorted(tmp_path.rglob("*"))
        out = tmp_path / "out.safetensors"
        code, err = run_cli(capsys, "select", *args, "-o", out, "-q", "--provider", "cpu")
        assert code == 2, (args, err)
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, err)
        assert sorted(tmp_path.rglob("*")) == before, args


def test_too_little_text_for_one_row(llama, tmp_path):
    _, root = llama
    data = tmp_path / "short.txt"
    data.write_text("the cat\n")
    with pytest.raises(FpsGraphError, match="fewer than one packed row of 40"):
        select(root, data, pack=40)


def test_text_options_refuse_bad_pack():
    with pytest.raises(FpsGraphError, match="positive number of tokens"):
        TextOptions(pack=0)
    with pytest.raises(FpsGraphError, match="not both"):
        TextOptions(pack=8, max_length=8)
    with pytest.raises(FpsGraphError, match="truncates nothing"):
        TextOptions(pack=8, truncate=False)
