"""Bad input fails clearly (exit 2, one stderr line, nothing written); real-world graph shapes work."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from fps_graph.graph.layers import find_layers
from fps_graph.graph.model import load_model
from fps_graph.selection.pipeline import SelectOptions, run_select
from fps_graph.selection.stats import Stats

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"
RNG = np.random.default_rng(0)


def cli(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def mlp_graph(dtype=TensorProto.FLOAT, npdt=np.float32, log=False, name="mlp"):
    """x[N,T,12] -> mm1 -> (Log) -> Relu -> mm2, weights in the given float type."""
    w1 = RNG.standard_normal((12, 24)).astype(npdt)
    w2 = RNG.standard_normal((24, 5)).astype(npdt)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1")]
    nodes.append(helper.make_node("Log" if log else "Relu", ["h"], ["r"]))
    nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"))
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", dtype, ["N", "T", 12])],
                          [helper.make_tensor_value_info("y", dtype, None)],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "not_onnx.onnx").write_text("this is not a model")
    (d / "truncated.onnx").write_bytes(SAMPLE.read_bytes()[:4000])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), d / "no_layers.onnx")
    onnx.save(mlp_graph(log=True), d / "nan.onnx")
    (d / "empty").mkdir()
    (d / "junk").mkdir()
    (d / "junk" / "README.txt").write_text("no data here")
    (d / "corrupt").mkdir()
    (d / "corrupt" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "truncimg").mkdir()
    (d / "truncimg" / "t.png").write_bytes((IMAGES / "disc" / "disc_000.png").read_bytes()[:300])
    np.save(d / "wrong_shape.npy", np.zeros((4, 3, 16, 16), np.float32))
    np.save(d / "wrong_dtype.npy", np.zeros((4, 3, 32, 32), np.complex64))
    np.savez(d / "missing.npz", other=np.zeros((4, 3, 32, 32), np.float32), more=np.zeros((4, 1), np.float32))
    np.save(d / "mlp_data.npy", RNG.standard_normal((6, 3, 12)).astype(np.float32))
    st = Stats(model_sha256="0" * 64, num_samples=1)
    st.save(d / "other.stats.safetensors")
    # external data pointing outside the model's folder
    ext = d / "ext"
    ext.mkdir()
    m = mlp_graph()
    onnx.save(m, ext / "model.onnx", save_as_external_data=True, location="model.data", size_threshold=0)
    m2 = onnx.load(ext / "model.onnx", load_external_data=False)
    for t in m2.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../outside.data"
    onnx.save(m2, ext / "evil.onnx")
    return d


BAD = [
    ("missing model", ["select", "{d}/nope.onnx", IMAGES], "model file not found"),
    ("model is a folder", ["select", "{d}/empty", IMAGES], "holds no .onnx file"),
    ("not onnx", ["select", "{d}/not_onnx.onnx", IMAGES], "not_onnx.onnx is not a valid ONNX model"),
    ("truncated onnx", ["select", "{d}/truncated.onnx", IMAGES], "truncated.onnx is not a valid ONNX model"),
    ("no selectable layer", ["select", "{d}/no_layers.onnx", IMAGES], "no selectable layer"),
    ("empty data folder", ["select", SAMPLE, "{d}/empty"], "data folder is empty"),
    ("only non-data files", ["select", SAMPLE, "{d}/junk"], "no data files"),
    ("corrupt image", ["select", SAMPLE, "{d}/corrupt"], "cannot decode image"),
    ("truncated image", ["select", SAMPLE, "{d}/truncimg"], "t.png"),
    ("wrong array shape", ["select", SAMPLE, "{d}/wrong_shape.npy"],
     "input 'input' expects shape [?, 3, 32, 32], found [4, 3, 16, 16]"),
    ("wrong array dtype", ["select", SAMPLE, "{d}/wrong_dtype.npy"], "expects float32, found complex64"),
    ("npz missing input", ["select", SAMPLE, "{d}/missing.npz"], "missing model input 'input'"),
    ("nan activations", ["select", "{d}/nan.onnx", "{d}/mlp_data.npy"], "NaN or Inf) reach layer mm2"),
    ("k zero", ["select", SAMPLE, IMAGES, "--k", "0"], "--k must be at least 1"),
    ("budget zero", ["select", SAMPLE, IMAGES, "--budget", "0"], "a count must be positive"),
    ("budget negative", ["select", SAMPLE, IMAGES, "--budget", "-0.1"], "a fraction must be in (0, 1]"),
    ("budget over 100%", ["select", SAMPLE, IMAGES, "--budget", "150%"], "a percentage must be in (0, 100]"),
    ("budget over total", ["select", SAMPLE, IMAGES, "--budget", "100000"], "more than the 18048 scored weights"),
    ("output folder missing", ["select", SAMPLE, IMAGES, "-o", "{d}/no/such/dir/m.safetensors"],
     "output folder does not exist"),
    ("stats from another model", ["select", SAMPLE, "--stats-in", "{d}/other.stats.safetensors"],
     "statistics were collected on another model"),
    ("external data outside folder", ["select", "{d}/ext/evil.onnx", "{d}/mlp_data.npy"],
     "points outside the model's folder"),
    ("unknown option", ["select", SAMPLE, IMAGES, "--kk", "3"], "No such option '--kk'"),
]


@pytest.mark.parametrize("label,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(files, tmp_path, label, args, message):
    out = tmp_path / "masks.safetensors"
    argv = [str(a).replace("{d}", str(files)) for a in args]
    if "-o" not in argv:
        argv += ["-o", str(out)]
    code, stdout, err = cli(*argv, "-q")
    assert code == 2, (code, err)
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []          # no output, no temp file


def test_cuda_requested_without_gpu_is_refused(tmp_path):
    from fps_graph.runtime.session import cuda_usable

    if cuda_usable():
        pytest.skip("a GPU is present")
    code, _, err = cli("select", SAMPLE, IMAGES, "--provider", "cuda", "-o", tmp_path / "m.safetensors", "-q")
    assert code == 2 and err.count("\n") == 1 and "CUDA provider requested but not usable" in err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_force(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    code, _, err = cli("select", SAMPLE, IMAGES, "-o", out, "-q")
    assert code == 2 and "output file exists" in err and "--force" in err
    assert out.read_bytes() == b"precious"


def _default_sigint() -> None:
    """In the child: SIGINT handled and unblocked, whatever the test process inherited or set (Ray, torch threads)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_ctrl_c_during_calibration_leaves_nothing(tmp_path):
    data = tmp_path / "many.npy"
    # a sparse file of zeros: far more samples than the run can get through before the signal
    np.lib.format.open_memmap(data, mode="w+", dtype=np.float32, shape=(400000, 3, 32, 32)).flush()
    out = tmp_path / "m.safetensors"
    p = subprocess.Popen([sys.executable, "-m", "fps_graph_cli.main", "select", str(SAMPLE), str(data), "-o", str(out),
                          "--batch-size", "1"], stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    seen = bytearray()

    def read() -> None:   # stderr in the background, so the progress bar shows when calibration is under way
        while chunk := p.stderr.read1(4096):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        maps = Path(f"/proc/{p.pid}/maps")

        def reading() -> bool:   # the data file is mapped once the run reads samples (imports are slow under load)
            try:
                return str(data) in maps.read_text()
            except OSError:
                return False

        deadline = time.monotonic() + 120
        while not reading() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        if p.poll() is not None:
            raise AssertionError(f"the run ended before it could be interrupted: {p.returncode} {seen.decode()}")
        status = Path(f"/proc/{p.pid}/status").read_text()
        sig = [line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn"))]
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 60 s after SIGINT; child signal state {sig}") from None
    finally:
        if p.poll() is None:                       # never leave the child running (CI checks for leftovers)
            p.kill()
            p.wait()
    reader.join(timeout=10)
    err = seen.decode().replace("\r", "\n")
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted; no output written"
    assert "Traceback" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["many.npy"]


# --- real-world graph shapes -------------------------------------------------------------------------------------


def test_fp16_model_stats_in_float32(tmp_path):
    onnx.save(mlp_graph(TensorProto.FLOAT16, np.float16), tmp_path / "h.onnx")
    x = (RNG.standard_normal((9, 5, 12)) * 30).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    res = run_select(tmp_path / "h.onnx", str(tmp_path / "x.npy"), SelectOptions(k=2, batch_size=4, provider="cpu"))
    want = np.abs(x.astype(np.float64)).reshape(-1, 12).sum(0)
    np.testing.assert_allclose(res.stats.sums["mm1"]["abs"], want, rtol=1e-5)
    host = run_select(tmp_path / "h.onnx", str(tmp_path / "x.npy"),
                      SelectOptions(k=2, batch_size=4, provider="cpu", reduce="host"))
    assert {k: v.tolist() for k, v in res.indices.items()} == {k: v.tolist() for k, v in host.indices.items()}


def test_bf16_weights_score_and_cpu_limit(tmp_path):
    import ml_dtypes

    onnx.save(mlp_graph(TensorProto.BFLOAT16, ml_dtypes.bfloat16), tmp_path / "b.onnx")
    model = load_model(tmp_path / "b.onnx")
    w1 = model.tensor("w1").astype(np.float64)
    res = run_select(tmp_path / "b.onnx", None, SelectOptions(k=1, score="magnitude"))
    assert res.indices["w1"].tolist() == sorted(int(np.argmax(np.abs(w1[:, o]))) * 24 + o for o in range(24))
    np.save(tmp_path / "x.npy", RNG.standard_normal((4, 3, 12)).astype(np.float32))
    code, _, err = cli("select", tmp_path / "b.onnx", tmp_path / "x.npy", "-o", tmp_path / "m.safetensors", "-q",
                       "--provider", "cpu")
    if code != 0:   # ONNX Runtime's CPU provider has no bfloat16 MatMul: said in one line
        assert code == 2 and err.count("\n") == 1 and "mm1" in err


def test_qdq_quantized_model(tmp_path, exported):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    _, path, dpath, data = exported("mlp", "legacy")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": data[i:i + 4]} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.it, None)

    q = tmp_path / "q.onnx"
    quantize_static(str(path), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    model = load_model(q)
    layers, _ = find_layers(model)
    assert layers and all(l.chain and l.chain[-1]["op"] == "DequantizeLinear" for l in layers)
    assert all(model.tensor_dtype(l.weight) == np.int8 for l in layers)
    res = run_select(q, str(dpath), SelectOptions(k=2, batch_size=8, provider="cpu"))
    host = run_select(q, str(dpath), SelectOptions(k=2, batch_size=8, provider="cpu", reduce="host"))
    assert {k: v.tolist() for k, v in res.indices.items()} == {k: v.tolist() for k, v in host.indices.items()}
    for key, rec in res.tensors.items():
        if rec["torch"] is None:
            assert rec["shape"] == rec["onnx_shape"]                 # masks index the stored int8 tensor
        else:
            assert rec["layout"] == {"transpose": [1, 0]}            # ... or the PyTorch [out, in] weight
        layer = next(l for l in layers if l.weight == rec["onnx"])
        w = np.abs(layer.canonical_weight(model))                     # dequantized
        score = w * res.stats.mean(layer.node, "mean-abs")[None, :]
        top = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :2] + np.arange(score.shape[0])[:, None] * score.shape[1], axis=None)
        stored = np.sort(layer.canonical_index().reshape(-1)[top])
        assert res.indices[key].tolist() == (top if rec["torch"] else stored).tolist()


def test_subgraph_layers_found_and_runtime_weights_listed_as_skipped(tmp_path):
    inner = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["z"], name="inner_mm")], "then", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z2"])], "else", [],
                              [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="outer_mm"),
             helper.make_node("MatMul", ["x", "x2"], ["s"], name="dyn_mm"),
             helper.make_node("If", ["cond"], ["b"], name="branch", then_branch=inner, else_branch=other)]
    g = helper.make_graph(nodes, "ctrl", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                          helper.make_tensor_value_info("x2", TensorProto.FLOAT, [4, 4]),
                                          helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(RNG.standard_normal((4, 4)).astype(np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "c.onnx")
    layers, skipped = find_layers(load_model(tmp_path / "c.onnx"))
    assert [l.node for l in layers] == ["outer_mm", "branch/then_branch/inner_mm"]   # If bodies: docs/control_flow.md
    reasons = {s.node: s.reason for s in skipped}
    assert reasons["dyn_mm"] == "weight input 'x2' is computed at run time, not a constant"
    code, out, _ = cli("inspect", tmp_path / "c.onnx")
    assert code == 0 and "branch/then_branch/inner_mm" in out and "computed at run time" in out


def test_external_data_model_stays_external(tmp_path, exported):
    _, path, dpath, _ = exported("transformer", "legacy")
    m = onnx.load(path)
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(m, ext / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    model = load_model(ext / "model.onnx")
    assert model.has_external_data()
    assert all(not t.raw_data for t in model.graph.initializer if t.name.startswith("onnx::"))   # not loaded
    a = run_select(ext / "model.onnx", str(dpath), SelectOptions(k=2, batch_size=8, provider="cpu"))
    b = run_select(path, str(dpath), SelectOptions(k=2, batch_size=8, provider="cpu"))
    assert {k: v.tolist() for k, v in a.indices.items()} == {k: v.tolist() for k, v in b.indices.items()}
    assert sorted(p.name for p in ext.iterdir()) == ["model.onnx", "weights.bin"]     # nothing written beside it


def test_tied_weight_pools_all_consumers(tmp_path):
    import torch
    from torch import nn

    from oracle import hook_stats, topk_oracle

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.fc(torch.tanh(self.fc(x))))    # fc used twice: one weight, two consumers

    torch.manual_seed(0)
    model = Tied().eval()
    x = RNG.standard_normal((10, 4, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    from conftest import export_model

    for dynamo in (True, False):
        p = export_model(model, (2, 4, 8), tmp_path / f"tied_{dynamo}.onnx", dynamo)
        res = run_select(p, str(tmp_path / "x.npy"), SelectOptions(k=2, batch_size=5, provider="cpu"))
        assert res.tensors["fc.weight"]["nodes"].__len__() == 2
        ref, _ = hook_stats(model, x)                 # the hook sees both calls of fc
        a, _, c = ref["fc"]
        want = topk_oracle(np.abs(model.fc.weight.detach().double().numpy()) * (a / c)[None, :], 2)
        assert res.indices["fc.weight"].tolist() == np.flatnonzero(want).tolist()


def test_text_encoder_with_two_inputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from conftest import export_model  # noqa: F401

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for prm in bert.parameters():
            prm.add_(0.02 * torch.randn_like(prm))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.int64)
    path = tmp_path / "bert.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrap(), (ids, mask), str(path), dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["out"], dynamic_axes={"input_ids": {0: "b", 1: "t"},
                                                              "attention_mask": {0: "b", 1: "t"}})
    data_ids = RNG.integers(0, 100, (12, 11)).astype(np.int64)
    data_mask = np.ones((12, 11), dtype=np.int64)
    data_mask[:, 9:] = 0
    np.savez(tmp_path / "text.npz", input_ids=data_ids, attention_mask=data_mask)
    out = tmp_path / "m.safetensors"
    code, _, err = cli("select", path, tmp_path / "text.npz", "-o", out, "--batch-size", "5", "-q")
    assert code == 0, err
    from fps_graph.formats.masks import read_metadata

    from oracle import hook_stats

    tensors = read_metadata(out)["tensors"]
    linear_names = {f"{n}.weight" for n, mm in Wrap().named_modules()
                    if isinstance(mm, torch.nn.Linear) and "pooler" not in n}     # the pooler output is not exported
    assert linear_names <= set(tensors), linear_names - set(tensors)
    # the statistics equal forward hooks on the same inputs (the hook model takes the two arrays)
    res = run_select(path, str(tmp_path / "text.npz"), SelectOptions(k=1, batch_size=5, provider="cpu"))
    names = {m: n for n, m in Wrap().named_modules()}
    acc = {}

    def hook(mod, inp):
        x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
        s = acc.setdefault(names[mod], [0, 0])
        s[0] = s[0] + x.abs().sum(0).numpy()
        s[1] += x.shape[0]

    w = Wrap().eval()   # the export may leave the module in training mode (dropout on)
    names = {m: n for n, m in w.named_modules()}
    hs = [m.register_forward_pre_hook(hook) for m in w.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i in range(0, 12, 5):
            w(torch.from_numpy(data_ids[i:i + 5]), torch.from_numpy(data_mask[i:i + 5]))
    for h in hs:
        h.remove()
    for key, rec in res.tensors.items():
        mod = key[: -len(".weight")]
        if mod in acc:
            np.testing.assert_allclose(res.stats.sums[rec["nodes"][0]]["abs"], acc[mod][0], rtol=1e-4, atol=1e-5)
            assert res.stats.counts[rec["nodes"][0]] == acc[mod][1]
