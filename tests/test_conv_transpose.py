"""ConvTranspose layers against PyTorch: statistics per (input channel, tap), masks, names, train and apply.

The reference takes the (input position, tap) pairs that contribute to a kept output from PyTorch itself, by
autograd: for y = conv_transpose(|x|, W), d(sum y)/dW[c, o, tap] is the sum of |x[c, p]| over exactly the input
positions p whose product with that tap lands in the output; with x = 1 it is their number. Nothing of
fps-graph's own window arithmetic is used.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fps_graph.formats.masks import load_masks, read_metadata  # noqa: E402
from fps_graph.selection.pipeline import SelectOptions, describe, make_plan, run_select, write_result  # noqa: E402

from oracle import topk_oracle  # noqa: E402

FUNCS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class Up1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.b = nn.ConvTranspose1d(4, 6, 4, stride=3, padding=2, dilation=2, groups=2, output_padding=2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(-1)


class Up2d(nn.Module):
    """Grouped, dilated, cropped and output-padded; a depthwise one; a Conv reading the same map as a ConvTranspose."""

    def __init__(self):
        super().__init__()
        self.a = nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2),
                                    dilation=(1, 2), groups=2)
        self.b = nn.ConvTranspose2d(6, 6, 3, stride=1, padding=2, groups=6)
        self.side = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.head(h.mean((2, 3)) + self.side(x).mean((2, 3)))


class Up3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ConvTranspose3d(2, 4, (2, 3, 2), stride=(1, 2, 2), padding=(0, 1, 1), output_padding=(0, 1, 0))

    def forward(self, x):
        return self.a(x).mean((2, 3, 4))


MODELS = {"1d": (Up1d, (3, 9)), "2d": (Up2d, (4, 5, 6)), "3d": (Up3d, (2, 3, 4, 3))}
N, B = 13, 4


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_data(name: str, seed: int = 1) -> np.ndarray:
    """Inputs whose magnitude grows along every spatial axis, so a wrong crop changes the statistics."""
    shape = MODELS[name][1]
    rng = np.random.default_rng(seed)
    ramp = np.ones(shape[1:])
    for axis, size in enumerate(shape[1:]):
        r = np.linspace(0.2, 2.0, size).reshape([-1 if i == axis else 1 for i in range(len(shape) - 1)])
        ramp = ramp * r
    return (rng.standard_normal((N, *shape)) * ramp + 0.1).astype(np.float32)


def export(model: nn.Module, name: str, path: Path, dynamo: bool) -> Path:
    x = torch.randn(B, *MODELS[name][1])
    kw: dict = {"input_names": ["input"], "output_names": ["output"], "dynamo": dynamo}
    if dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    else:
        kw["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kw)
    return path


def reference(model: nn.Module, data: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module name: (sum |x| per [in, *kernel], number of contributing positions per [in, *kernel])} of every
    ConvTranspose, from forward pre-hooks and autograd through F.conv_transpose*d with the module's settings."""
    names = {m: n for n, m in model.named_modules()}
    acc: dict[str, list[np.ndarray]] = {}

    def pair_sums(mod: nn.Module, x: torch.Tensor) -> np.ndarray:
        w = torch.zeros_like(mod.weight, dtype=torch.float64, requires_grad=True)
        fn = FUNCS[x.dim() - 2]
        y = fn(x, w, None, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)
        y.sum().backward()
        g = w.grad.numpy()                 # [in, out/g, *k]: the same for every output channel of a group
        assert np.allclose(g, g[:, :1])
        return g[:, 0]

    def hook(mod, inputs):
        x = inputs[0].detach().double()
        a = pair_sums(mod, x.abs())
        n = pair_sums(mod, torch.ones_like(x))
        name = names[mod]
        if name in acc:
            acc[name][0] += a
            acc[name][1] += n
        else:
            acc[name] = [a, n]

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, CT)]
    try:
        with torch.no_grad():
            for i in range(0, len(data), B):
                with torch.enable_grad():
                    model(torch.from_numpy(data[i:i + B]))
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0], v[1]) for k, v in acc.items()}


def reference_mask(weight: np.ndarray, stat: np.ndarray, groups: int, k: int) -> np.ndarray:
    """Top-k input connections (input channel of its group, tap) of every output channel, by |W| * stat, as a
    bool mask of the [in, out/groups, *kernel] weight; built by loops over the definition."""
    cin, mg = weight.shape[:2]
    taps = int(np.prod(weight.shape[2:]))
    w = weight.reshape(cin, mg, taps)
    st = stat.reshape(cin, taps)
    per = cin // groups
    scores = np.zeros((groups * mg, per * taps))
    for o in range(groups * mg):
        g, ol = divmod(o, mg)
        for cl in range(per):
            for t in range(taps):
                c = g * per + cl
                scores[o, cl * taps + t] = abs(w[c, ol, t]) * st[c, t]
    top = topk_oracle(scores, k)
    mask = np.zeros((cin, mg, taps), dtype=bool)
    for o, col in zip(*np.nonzero(top)):
        g, ol = divmod(o, mg)
        cl, t = divmod(col, taps)
        mask[g * per + cl, ol, t] = True
    return mask.reshape(weight.shape)


CASES = [(m, e) for m in MODELS for e in ("dynamo", "legacy")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    cache: dict = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            model = build(name)
            path = export(model, name, root / f"{name}_{exporter}.onnx", exporter == "dynamo")
            data = make_data(name)
            dpath = root / f"{name}.npy"
            np.save(dpath, data)
            cache[(name, exporter)] = (model, path, dpath, data)
        return cache[(name, exporter)]

    return get


def select(path, dpath, **kw):
    return run_select(path, str(dpath), SelectOptions(**{"batch_size": B, "provider": "cpu", "k": 1, **kw}))


@pytest.mark.parametrize("name,exporter", CASES)
def test_statistics_match_pytorch_autograd(exported, name, exporter):
    model, path, dpath, data = exported(name, exporter)
    res = select(path, dpath, stat="l2", score="wanda")
    ref = reference(model, data)
    got = {}
    for key, rec in res.tensors.items():
        if rec["op"] != "ConvTranspose":
            continue
        assert rec["torch"] == key and key.endswith(".weight"), rec
        assert rec["shape"] == list(dict(model.named_parameters())[key].shape)     # PyTorch's [in, out/g, *k]
        got[key[: -len(".weight")]] = rec["nodes"][0]
    assert set(got) == set(ref)
    fps = select(path, dpath)
    for mod, node in got.items():
        a, n = ref[mod]
        np.testing.assert_allclose(fps.stats.sums[node]["abs"], a, rtol=1e-5, atol=1e-6, err_msg=mod)
        np.testing.assert_array_equal(fps.stats.counts[node], n)
        assert len(np.unique(n)) > 1 or mod == "b"     # crops make the taps' counts differ


@pytest.mark.parametrize("name,exporter", CASES)
def test_masks_match_oracle(exported, name, exporter):
    model, path, dpath, data = exported(name, exporter)
    ref = reference(model, data)
    params = dict(model.named_modules())
    for k in (1, 3):
        masks = {key: np.zeros(int(np.prod(rec["shape"])), bool) for key, rec in select(path, dpath, k=k).tensors.items()}
        res = select(path, dpath, k=k)
        for key, idx in res.indices.items():
            masks[key][idx] = True
        for mod, (a, n) in ref.items():
            m = params[mod]
            want = reference_mask(m.weight.detach().double().numpy(), a / n, m.groups, k)
            assert np.array_equal(masks[f"{mod}.weight"].reshape(want.shape), want), (mod, k)


def test_inspect_shows_layout(exported):
    _, path, _, _ = exported("2d", "legacy")
    view = describe(make_plan(path))
    rows = {l["name"]: l for l in view["layers"]}
    a = rows["a.weight"]
    assert a["op"] == "ConvTranspose" and a["weight_shape"] == [4, 3, 3, 2] and a["canonical"] == [6, 2 * 3 * 2]
    assert "[in, out/2, *kernel]" in a["input_axis"]
    assert not any("ConvTranspose" in s["reason"] for s in view["skipped"])


def _hand_model(path: Path, attrs: dict, x_shape: tuple, w: np.ndarray) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", **attrs)
    g = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


HAND = {
    "same_upper": dict(auto_pad="SAME_UPPER", strides=[2, 3]),
    "same_lower": dict(auto_pad="SAME_LOWER", strides=[3, 2], dilations=[2, 1]),
    "valid": dict(auto_pad="VALID", strides=[2, 2], output_padding=[1, 0]),
    "output_shape": dict(output_shape=[9, 13], strides=[2, 3], pads=[5, 5, 5, 5]),     # pads ignored
    "output_shape_grouped": dict(output_shape=[10, 4], strides=[2, 1], group=2, auto_pad="SAME_UPPER"),
    "asymmetric": dict(pads=[0, 2, 3, 1], strides=[2, 2], dilations=[1, 2]),
}


@pytest.mark.parametrize("case", list(HAND))
def test_hand_built_auto_pad_and_output_shape_match_runtime(tmp_path, case):
    """auto_pad, output_shape and asymmetric pads (which PyTorch cannot export): the crop is found by comparing
    ONNX Runtime's output with PyTorch's uncropped conv_transpose at every offset, then the pair sums come from
    autograd over that crop."""
    import onnxruntime as ort

    attrs = HAND[case]
    g = attrs.get("group", 1)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 6 // g, 3, 2)).astype(np.float32)
    x = (rng.standard_normal((N, 4, 5, 4)) * np.linspace(0.3, 2, 4) + 0.2).astype(np.float32)
    path = tmp_path / "m.onnx"
    _hand_model(path, attrs, x.shape, w)
    np.save(tmp_path / "x.npy", x)
    res = select(path, tmp_path / "x.npy", k=2)
    stride = attrs.get("strides", [1, 1])
    dil = attrs.get("dilations", [1, 1])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_y = sess.run(None, {"x": x[:B]})[0]
    full = F.conv_transpose2d(torch.from_numpy(x[:B]).double(), torch.from_numpy(w).double(), None, stride, 0, 0,
                              g, dil).numpy()                   # every product kept: no pads, no crop
    # find the (head_h, head_w) that reproduces ONNX Runtime's output
    oh, ow = ort_y.shape[2:]
    pad_full = np.pad(full, [(0, 0), (0, 0), (0, oh), (0, ow)])
    crops = [(hh, hw) for hh in range(full.shape[2] + 1) for hw in range(full.shape[3] + 1)
             if np.allclose(pad_full[:, :, hh:hh + oh, hw:hw + ow], ort_y, atol=1e-4)]
    assert len(crops) == 1, crops
    hh, hw = crops[0]

    def pair_sums(inp: np.ndarray) -> np.ndarray:
        wt = torch.zeros(w.shape, dtype=torch.float64, requires_grad=True)
        y = F.conv_transpose2d(torch.from_numpy(inp), wt, None, stride, 0, 0, g, dil)
        y = F.pad(y, (0, ow, 0, oh))[:, :, hh:hh + oh, hw:hw + ow]
        y.sum().backward()
        return wt.grad.numpy()[:, 0]

    a = pair_sums(np.abs(x.astype(np.float64)))
    n = pair_sums(np.ones_like(x, dtype=np.float64))
    np.testing.assert_allclose(res.stats.sums["up"]["abs"], a, rtol=1e-6)
    np.testing.assert_array_equal(res.stats.counts["up"], n)
    want = reference_mask(w.astype(np.float64), np.divide(a, n, out=np.zeros_like(a), where=n > 0), g, 2)
    got = np.zeros(w.size, dtype=bool)
    got[res.indices["W"]] = True
    assert np.array_equal(got.reshape(w.shape), want)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_train_through_attach_then_apply(exported, exporter, tmp_path):
    """Masks from select feed attach on the PyTorch model; only selected ConvTranspose entries train; apply
    writes the delta back so that the ONNX model's output equals the fine-tuned PyTorch model's."""
    import onnxruntime as ort

    from fps_graph.graph.apply import apply_delta
    from fps_graph.training.sparse import attach, save_delta

    _, path, dpath, data = exported("2d", exporter)
    masks = tmp_path / "masks.safetensors"
    write_result(select(path, dpath, k=2), masks)
    tuned = build("2d")
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    handle = attach(tuned, str(masks), head=None)
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.5)
    x = torch.from_numpy(data[:B])
    for _ in range(3):
        opt.zero_grad()
        tuned(x).square().sum().backward()
        opt.step()
    selected = load_masks(masks)
    with torch.no_grad():
        for key in ("a.weight", "b.weight"):
            changed = getattr(tuned, key.split(".")[0]).weight != before[key]     # effective W + delta
            assert changed.any() and not (changed & ~torch.from_numpy(selected[key])).any(), key
    delta = tmp_path / "delta.safetensors"
    save_delta(handle, delta)
    out = tmp_path / "tuned.onnx"
    apply_delta(path, delta, out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = tuned(x).numpy()
        base = build("2d")(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: data[:B]})[0]
    assert np.abs(want - base).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert read_metadata(masks)["tensors"]["a.weight"]["op"] == "ConvTranspose"


def test_per_tap_counts_survive_stats_files_shards_and_host_reduce(exported, tmp_path):
    """Per-tap counts are arrays: saved, loaded and summed over shards exactly; host reduction agrees."""
    from fps_graph.selection.pipeline import write_stats

    _, path, _, data = exported("2d", "dynamo")
    parts = []
    for i, part in enumerate((data[:5], data[5:])):
        np.save(tmp_path / f"p{i}.npy", part)
        r = run_select(path, str(tmp_path / f"p{i}.npy"), SelectOptions(batch_size=B, provider="cpu", k=1),
                       stats_out=True)
        write_stats(r.stats, tmp_path / f"p{i}.st")
        parts.append(str(tmp_path / f"p{i}.st"))
    np.save(tmp_path / "all.npy", data)
    whole = select(path, tmp_path / "all.npy", k=2)
    host = select(path, tmp_path / "all.npy", k=2, reduce="host")
    merged = run_select(path, None, SelectOptions(k=2, stats_in=parts))
    nodes = [rec["nodes"][0] for rec in whole.tensors.values() if rec["op"] == "ConvTranspose"]
    assert len(nodes) == 2
    for node in nodes:
        assert np.ndim(whole.stats.counts[node]) == 3
        np.testing.assert_array_equal(merged.stats.counts[node], whole.stats.counts[node])
        np.testing.assert_array_equal(host.stats.counts[node], whole.stats.counts[node])
        np.testing.assert_allclose(merged.stats.sums[node]["abs"], whole.stats.sums[node]["abs"], rtol=1e-6)
    for other in (merged, host):
        assert {k: v.tolist() for k, v in other.indices.items()} == {k: v.tolist() for k, v in whole.indices.items()}


def test_stats_file_with_one_count_for_a_conv_transpose_is_refused(exported, tmp_path):
    """A statistics file whose ConvTranspose layer holds one count instead of one per tap (not this version's)."""
    from fps_graph.errors import DataError
    from fps_graph.selection.pipeline import write_stats
    from fps_graph.selection.stats import Stats

    _, path, dpath, _ = exported("1d", "legacy")
    res = run_select(path, str(dpath), SelectOptions(batch_size=B, provider="cpu", k=1), stats_out=True)
    node = next(rec["nodes"][0] for rec in res.tensors.values() if rec["op"] == "ConvTranspose")
    res.stats.counts[node] = float(np.max(res.stats.counts[node]))
    write_stats(res.stats, tmp_path / "st.safetensors")
    assert isinstance(Stats.load(tmp_path / "st.safetensors").counts[node], float)
    with pytest.raises(DataError, match="value counts of layer"):
        run_select(path, None, SelectOptions(k=1, stats_in=[str(tmp_path / "st.safetensors")]))


def test_conv_transpose_in_an_if_branch_not_taken_in_one_shard(tmp_path):
    """Inside an If branch: a shard where the branch never runs adds zero sums and zero per-tap counts, so its
    statistics file merges with one where it ran (equal to that one alone) and passes the file checks."""
    from fps_graph.runtime.calibrate import collect_stats
    from fps_graph.selection.pipeline import write_stats

    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    vi = lambda n, s=None: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)     # noqa: E731
    then = helper.make_graph([helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="up", strides=[2, 2],
                                               pads=[1, 0, 0, 1], output_padding=[1, 0])], "then", [], [vi("t")],
                             [numpy_helper.from_array(w, "W")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [], [vi("e")])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="cf", then_branch=then, else_branch=other)], "g",
                          [vi("x", ["N", 3, 5, 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [vi("y")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "if.onnx"
    onnx.save(m, str(path))
    x = rng.standard_normal((8, 3, 5, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "c.npy", np.array(True))
    once = run_select(path, str(tmp_path / "x.npy"), SelectOptions(batch_size=4, provider="cpu", k=1,
                                                                   static={"c": str(tmp_path / "c.npy")}),
                      stats_out=True)
    write_stats(once.stats, tmp_path / "taken.st")
    plan = make_plan(path)
    node = plan.layers[0].node
    st, _ = collect_stats(plan.model, plan.layers, [{"x": x[:4], "c": np.array(False)}], kinds=("abs", "sq"),
                          provider="cpu")
    assert np.array_equal(st.counts[node], np.zeros((3, 3, 3))) and not st.sums[node]["abs"].any()
    write_stats(st, tmp_path / "not_taken.st")
    files = [str(tmp_path / "taken.st"), str(tmp_path / "not_taken.st")]
    merged = run_select(path, None, SelectOptions(k=1, stats_in=files))
    np.testing.assert_array_equal(merged.stats.counts[node], once.stats.counts[node])
    assert {k: v.tolist() for k, v in merged.indices.items()} == {k: v.tolist() for k, v in once.indices.items()}
