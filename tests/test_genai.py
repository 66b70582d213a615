"""ONNX Runtime GenAI folders (genai_config.json + model + tokenizer) as MODEL for inspect, select and apply.

The folders are built in the test by onnxruntime-genai's model builder (fp32 and int4, CPU) from a tiny Llama made
here with its own byte-level BPE tokenizer; the references feed the plain ONNX model through ONNX Runtime one text
at a time (its MatMul inputs exposed as outputs) and dequantize MatMulNBits blocks by hand. Skipped cleanly without
onnxruntime-genai (`pip install --no-deps onnxruntime-genai`: its requirement `onnxruntime` would clash with
onnxruntime-gpu's module folder).
"""
from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper as h

from fps_graph.data.hf_inputs import plan_inputs, read_genai_config
from fps_graph.data.sources import InputSpec
from fps_graph.errors import FpsGraphError
from fps_graph.formats.delta import SparseEntry, write_delta
from fps_graph.graph.apply import apply_delta
from fps_graph.selection.pipeline import SelectOptions, describe, make_plan, run_select

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny llama",
         "select weights from one forward pass", "hello world again", "a fox and a dog",
         "the lazy dog sleeps all day long in the sun"]


def test_sequence_length_inputs_follow_the_gqa_conventions():
    """past_seq_len = total - 1 per row ([B, 1]), total_seq_len a scalar (Olive / model builder)."""
    i32, i64, f32 = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32)
    specs = [InputSpec("input_ids", ("B", "S"), i64), InputSpec("past_seq_len", ("B", 1), i32),
             InputSpec("total_seq_len", (), i32), InputSpec("past_key_values.0.key", ("B", 2, "P", 4), f32)]
    feeds = plan_inputs(specs, {}, "m.onnx").build(np.array([[5, 6, 7], [8, 9, 10]]))
    assert feeds["past_seq_len"].tolist() == [[2], [2]] and feeds["past_seq_len"].dtype == np.int32
    assert feeds["total_seq_len"].shape == () and int(feeds["total_seq_len"]) == 3
    assert feeds["past_key_values.0.key"].shape == (2, 2, 0, 4)
    with pytest.raises(FpsGraphError, match="sequence length"):
        plan_inputs([specs[0], InputSpec("total_seq_len", ("B", "S", 2), i32)], {}, "m.onnx")


def test_genai_config_roles_rename_inputs(tmp_path):
    """A genai_config.json that names its inputs differently: the roles decide, not the names."""
    cfg = {"model": {"context_length": 64, "decoder": {
        "filename": "decoder.onnx", "head_size": 8, "num_key_value_heads": 2, "num_attention_heads": 4,
        "hidden_size": 32, "num_hidden_layers": 1,
        "inputs": {"input_ids": "tokens", "attention_mask": "mask", "past_key_names": "cache_k_%d",
                   "past_value_names": "cache_v_%d", "past_sequence_length": "seqlens",
                   "total_sequence_length": "total"}}}}
    (tmp_path / "genai_config.json").write_text(json.dumps(cfg))
    g = read_genai_config(tmp_path)
    assert g.filename == "decoder.onnx" and g.config["head_dim"] == 8 and g.config["max_position_embeddings"] == 64
    i32, i64, f32 = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32)
    specs = [InputSpec("tokens", ("B", "S"), i64), InputSpec("mask", ("B", "T"), i64),
             InputSpec("cache_k_0", ("B", 2, "P", "D"), f32), InputSpec("cache_v_0", ("B", 2, "P", "D"), f32),
             InputSpec("seqlens", ("B",), i32), InputSpec("total", (), i32)]
    plan = plan_inputs(specs, g.config, tmp_path, g.roles([s.name for s in specs]))
    feeds = plan.build(np.array([[1, 2, 3, 4]]))
    assert feeds["tokens"].tolist() == [[1, 2, 3, 4]] and feeds["mask"].tolist() == [[1, 1, 1, 1]]
    assert feeds["cache_k_0"].shape == (1, 2, 0, 8) and feeds["seqlens"].tolist() == [3] and int(feeds["total"]) == 4


# ---- folders built by the model builder --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def genai_folders(tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("genai")
    hf = root / "hf"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(hf)
    fast.save_pretrained(hf)
    out = {}
    for precision in ("fp32", "int4"):
        dst = root / precision
        p = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "llama", "-i", str(hf),
                            "-o", str(dst), "-p", precision, "-e", "cpu", "-c", str(root / "cache")],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        out[precision] = dst
    (root / "calib.txt").write_text("\n".join(TEXTS) + "\n")
    out["calib"] = root / "calib.txt"
    return out


def _matmul_inputs(model_path: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Mean |x| per feature of every MatMul/MatMulNBits input, each text run alone through plain ONNX Runtime."""
    from tokenizers import Tokenizer

    m = onnx.load(str(model_path))
    acts: dict[str, list[str]] = {}
    for n in m.graph.node:
        if n.op_type in ("MatMul", "MatMulNBits"):
            if n.input[0] not in acts:
                m.graph.output.append(h.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
            acts.setdefault(n.input[0], []).append(n.name)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    tok = Tokenizer.from_file(str(model_path.parent / "tokenizer.json"))
    sums: dict[str, np.ndarray] = {}
    count = 0
    for text in texts:
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in sess.get_inputs():
            if i.name.startswith("past_key_values"):
                feeds[i.name] = np.zeros((1, 2, 0, 16), np.float32)
        res = dict(zip(names, sess.run(None, feeds)))
        for a in acts:
            x = np.abs(res[a].astype(np.float64)).reshape(-1, res[a].shape[-1])
            sums[a] = sums.get(a, 0) + x.sum(0)
        count += ids.shape[1]
    return {node: s / count for a, s in sums.items() for node in acts[a]}


def _dequantized(model_path: Path) -> dict[str, np.ndarray]:
    """Every MatMul weight as [K, N] float64: fp32 initializers as they are, MatMulNBits int4 blocks by hand."""
    m = onnx.load(str(model_path))
    inits = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(model_path.parent)) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            out[n.name] = inits[n.input[1]].astype(np.float64)
        elif n.op_type == "MatMulNBits":
            a = {x.name: h.get_attribute_value(x) for x in n.attribute}
            k, nn, bs = a["K"], a["N"], a["block_size"]
            b = inits[n.input[1]]
            q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(nn, -1).astype(np.float64)
            s = inits[n.input[2]].reshape(nn, -1).astype(np.float64)
            z = np.full_like(s, 8.0)
            if len(n.input) > 3 and n.input[3]:
                zp = inits[n.input[3]].reshape(nn, -1)
                z = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(nn, -1)[:, :s.shape[1]].astype(np.float64)
            w = (q.reshape(nn, s.shape[1], bs) - z[:, :, None]) * s[:, :, None]
            out[n.name] = w.reshape(nn, -1)[:, :k].T
    return out


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_folder_select_matches_plain_ort_reference(genai_folders, precision):
    folder = genai_folders[precision]
    model_path = folder / read_genai_config(folder).filename
    res = run_select(folder, str(genai_folders["calib"]), SelectOptions(k=2, batch_size=4))
    stats = _matmul_inputs(model_path, TEXTS)
    weights = _dequantized(model_path)
    plan = make_plan(model_path)
    assert len(plan.layers) == len(weights) == 11
    assert {l.node_op for l in plan.layers} == ({"com.microsoft.MatMulNBits"} if precision == "int4" else {""})
    for layer in plan.layers:
        key = plan.names[layer.weight].key
        w = weights[layer.node]                                           # [K, N]
        score = np.abs(w.T) * stats[layer.node]                            # [N, K]
        top = np.argsort(-score, axis=1, kind="stable")[:, :2]
        n_out = w.shape[1]
        want = sorted(int(i) * n_out + o for o in range(n_out) for i in top[o])
        assert res.indices[key].tolist() == want, key
        assert res.tensors[key]["shape"] == list(w.shape)
    assert res.summary["samples"] == len(TEXTS)
    # every weight of the folder is scored or named: embeddings (Gather) and the rotary caches are the rest
    inv = res.metadata["weights"]
    assert set(inv["unscored_by_kind"]) == {"Gather", "com.microsoft.GroupQueryAttention"}
    assert inv["unscored_by_kind"]["Gather"] == 300 * 64


def test_genai_int4_and_fp32_masks_share_keys_and_layouts(genai_folders):
    a = describe(make_plan(genai_folders["fp32"] / "model.onnx"))
    b = describe(make_plan(genai_folders["int4"] / "model.onnx"))
    assert [(l["name"], l["weight_shape"]) for l in a["layers"]] == [(l["name"], l["weight_shape"]) for l in b["layers"]]
    assert {l["stored_dtype"] for l in b["layers"]} == {"uint8"}


def _delta_for(folder: Path, masks_res, keys: list[str], path: Path) -> dict[str, np.ndarray]:
    """A delta file of random changes at the selected entries of some weights, base = the fp32 values."""
    rng = np.random.default_rng(0)
    m = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    sparse, tensors, tuned = {}, {}, {}
    for key in keys:
        w = onnx.numpy_helper.to_array(inits[key], base_dir=str(folder))
        idx = masks_res.indices[key]
        delta = rng.normal(size=idx.size).astype(np.float32) * 0.5
        entry = SparseEntry(idx, delta, w.reshape(-1)[idx], w.shape)
        sparse[key] = entry
        tensors[key] = {"kind": "sparse", "shape": list(w.shape), "dtype": "float32", **masks_res.tensors[key]}
        t = w.copy().reshape(-1)
        t[idx] = entry.values()
        tuned[key] = t.reshape(w.shape)
    write_delta(path, sparse, {}, tensors, {}, {})
    return tuned


def test_genai_apply_writes_a_folder_onnxruntime_genai_generates_with(genai_folders, tmp_path):
    import onnxruntime_genai as og

    folder = genai_folders["fp32"]
    res = run_select(folder, str(genai_folders["calib"]), SelectOptions(k=4, batch_size=4))
    keys = ["model.layers.0.mlp.down_proj.MatMul.weight", "lm_head.MatMul.weight"]
    tuned = _delta_for(folder, res, keys, tmp_path / "delta.safetensors")
    out = tmp_path / "tuned"
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "apply", str(folder),
                        str(tmp_path / "delta.safetensors"), "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    # same files; everything but the model byte-identical; the model keeps its inputs and outputs
    assert sorted(q.name for q in out.iterdir()) == sorted(q.name for q in folder.iterdir())
    for q in folder.iterdir():
        if not q.name.startswith("model.onnx"):
            assert filecmp.cmp(q, out / q.name, shallow=False), q.name
    a, b = onnx.load(str(folder / "model.onnx")), onnx.load(str(out / "model.onnx"))
    assert [(i.name, i.type) for i in a.graph.input] == [(i.name, i.type) for i in b.graph.input]
    assert [(o.name, o.type) for o in a.graph.output] == [(o.name, o.type) for o in b.graph.output]
    patched = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    for key in keys:
        np.testing.assert_array_equal(patched[key], tuned[key])
    # onnxruntime-genai loads the folder and generates; its prompt logits are the patched model's
    model = og.Model(str(out))
    ids = og.Tokenizer(model).encode(TEXTS[1])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 6, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    logits = np.array(gen.get_output("logits"))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    feeds.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in sess.get_inputs() if "past" in i.name})
    want = sess.run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    base = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    assert not np.allclose(base, want, atol=1e-3)            # the delta changed what the model computes
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == len(ids) + 6


def test_genai_apply_on_the_int4_folder_is_refused_and_leaves_nothing(genai_folders, tmp_path):
    res = run_select(genai_folders["int4"], str(genai_folders["calib"]), SelectOptions(k=1))
    key = "lm_head.MatMul.weight"
    _delta_for(genai_folders["fp32"], res, [key], tmp_path / "delta.safetensors")
    with pytest.raises(FpsGraphError, match="stored quantized"):
        apply_delta(genai_folders["int4"], tmp_path / "delta.safetensors", tmp_path / "out", check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]
    # the same delta applies to the fp32 folder (masks keyed and laid out like the float weight)
    report = apply_delta(genai_folders["fp32"], tmp_path / "delta.safetensors", tmp_path / "out")
    assert [u["initializer"] for u in report["updated"][key]] == [key]
