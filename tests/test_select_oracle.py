"""fps-graph selection against PyTorch forward hooks (F.unfold for convs), for both exporters and every score."""
from __future__ import annotations

import numpy as np
import pytest

from fps_graph.selection.pipeline import SelectOptions, run_select, write_result, write_stats
from fps_graph.formats.masks import load_masks
from fps_graph.selection.ranking import Budget, parse_budget
from fps_graph.selection.stats import Stats

from oracle import hook_stats, network_oracle, topk_oracle, torch_scores

CASES = [(m, e) for m in ("mlp", "cnn", "transformer") for e in ("dynamo", "legacy")] + [("widecnn", "legacy")]


def dense(result) -> dict[str, np.ndarray]:
    """Selection of a run as bool masks in each key's shape."""
    out = {}
    for key, idx in result.indices.items():
        m = np.zeros(int(np.prod(result.tensors[key]["shape"])), dtype=bool)
        m[idx] = True
        out[key] = m.reshape(result.tensors[key]["shape"])
    return out


def run(path, data, **kw):
    opts = SelectOptions(**{"batch_size": 8, "provider": "cpu", **kw})
    if "budget" in kw or "k" in kw:
        pass
    else:
        opts.k = 1
    return run_select(path, str(data), opts)


@pytest.mark.parametrize("name,exporter", CASES)
def test_statistics_match_hooks(exported, name, exporter):
    model, path, dpath, data = exported(name, exporter)
    res = run(path, dpath, stat=None, score="fps")
    ref, _ = hook_stats(model, data)
    st = res.stats
    seen = set()
    for key, rec in res.tensors.items():
        assert rec["torch"] == key and key.endswith(".weight"), rec   # every weight got its PyTorch name
        mod = key[: -len(".weight")]
        node = rec["nodes"][0]
        a, s, cnt = ref[mod]
        np.testing.assert_allclose(st.counts[node], cnt)
        np.testing.assert_allclose(st.sums[node]["abs"], a, rtol=2e-5, atol=1e-6)
        seen.add(mod)
    assert seen == set(ref), f"layers not scored: {set(ref) - seen}"


@pytest.mark.parametrize("name,exporter", CASES)
@pytest.mark.parametrize("score", ["fps", "wanda", "magnitude"])
def test_topk_masks_match_oracle(exported, name, exporter, score):
    model, path, dpath, data = exported(name, exporter)
    ref_stats, _ = hook_stats(model, data)
    ref_scores = torch_scores(model, ref_stats, score)
    for k in (1, 3):
        masks = dense(run(path, dpath, score=score, k=k))
        assert set(masks) == set(ref_scores)
        for key, sc in ref_scores.items():
            want = topk_oracle(sc, k).reshape(masks[key].shape)
            assert np.array_equal(masks[key], want), (key, k)


@pytest.mark.parametrize("name,exporter", [("cnn", "dynamo"), ("transformer", "legacy"), ("mlp", "dynamo")])
@pytest.mark.parametrize("granularity", ["neuron", "layer", "network"])
@pytest.mark.parametrize("score", ["fps", "wanda", "magnitude"])
def test_budget_masks_match_oracle(exported, name, exporter, granularity, score):
    model, path, dpath, data = exported(name, exporter)
    ref_stats, order = hook_stats(model, data)
    scores = torch_scores(model, ref_stats, score)
    total = sum(s.size for s in scores.values())
    res = run(path, dpath, budget=Budget(fraction=0.05), granularity=granularity, score=score)
    masks = dense(res)
    n = int(round(0.05 * total))
    assert sum(int(m.sum()) for m in masks.values()) == n
    keys = [f"{m}.weight" for m in order]
    if granularity == "network":
        want = network_oracle(scores, keys, n)
    else:
        sizes = [scores[k].size for k in keys]
        exact = [n * s / total for s in sizes]
        counts = [int(np.floor(e)) for e in exact]
        for j in sorted(range(len(keys)), key=lambda j: -(exact[j] - counts[j]))[: n - sum(counts)]:
            counts[j] += 1
        want = {}
        for key, c in zip(keys, counts):
            sc = scores[key]
            if granularity == "layer":
                flat = sorted(range(sc.size), key=lambda j: (-sc.reshape(-1)[j], j))[:c]
                m = np.zeros(sc.size, dtype=bool)
                m[flat] = True
                want[key] = m.reshape(sc.shape)
            else:
                rows = sc.shape[0]
                ks = [c // rows + (1 if r < c % rows else 0) for r in range(rows)]
                want[key] = np.stack([topk_oracle(sc[r:r + 1], ks[r])[0] for r in range(rows)])
    for key in keys:
        assert np.array_equal(masks[key].reshape(want[key].shape), want[key]), key


@pytest.mark.parametrize("name,exporter", [("cnn", "legacy"), ("transformer", "dynamo")])
def test_graph_reduction_equals_host(exported, name, exporter):
    _, path, dpath, _ = exported(name, exporter)
    a = run(path, dpath, stat="l2", score="fps", k=2, reduce="graph")
    b = run(path, dpath, stat="l2", score="fps", k=2, reduce="host")
    for node, slot in a.stats.sums.items():
        np.testing.assert_allclose(slot["sq"], b.stats.sums[node]["sq"], rtol=1e-5)
        assert a.stats.counts[node] == b.stats.counts[node]
    assert {k: v.tolist() for k, v in a.indices.items()} == {k: v.tolist() for k, v in b.indices.items()}


def test_shards_merge_exactly(exported, tmp_path):
    _, path, _, data = exported("cnn", "dynamo")
    np.save(tmp_path / "a.npy", data[:20])
    np.save(tmp_path / "b.npy", data[20:])
    np.save(tmp_path / "all.npy", data)
    parts = []
    for part in ("a", "b"):
        r = run(path, tmp_path / f"{part}.npy")
        write_stats(r.stats, tmp_path / f"{part}.stats.safetensors")
        parts.append(str(tmp_path / f"{part}.stats.safetensors"))
    whole = run(path, tmp_path / "all.npy")
    merged = run_select(path, None, SelectOptions(k=1, stats_in=parts))
    assert merged.stats.num_samples == len(data)
    for node, slot in whole.stats.sums.items():
        np.testing.assert_allclose(merged.stats.sums[node]["abs"], slot["abs"], rtol=1e-6)
        assert merged.stats.counts[node] == whole.stats.counts[node]
    assert {k: v.tolist() for k, v in merged.indices.items()} == {k: v.tolist() for k, v in whole.indices.items()}


def test_reruns_are_byte_identical(exported, tmp_path):
    _, path, dpath, _ = exported("transformer", "dynamo")
    outs = []
    for i in range(2):
        res = run(path, dpath, budget=parse_budget("3%"), granularity="network")
        out = tmp_path / f"m{i}.safetensors"
        write_result(res, out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_random_score_is_seeded(exported, tmp_path):
    _, path, dpath, _ = exported("mlp", "legacy")
    a = dense(run(path, dpath, score="random", k=2, seed=1))
    b = dense(run(path, dpath, score="random", k=2, seed=1))
    c = dense(run(path, dpath, score="random", k=2, seed=2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    for k, m in a.items():
        assert (m.reshape(m.shape[0], -1).sum(1) == 2).all()


def test_gd_fps_divides_by_anchor(exported, tmp_path):
    model, path, dpath, data = exported("mlp", "dynamo")
    anchor = (data * 0.5 + np.linspace(-1, 1, data.shape[-1], dtype=np.float32)).astype(np.float32)
    np.save(tmp_path / "anchor.npy", anchor)
    res = run(path, dpath, score="gd-fps", anchor=str(tmp_path / "anchor.npy"), k=2, eps=1e-6)
    s_data, _ = hook_stats(model, data)
    s_anchor, _ = hook_stats(model, anchor)
    masks = dense(res)
    for name, mod in model.named_modules():
        if name not in s_data:
            continue
        a, _, c = s_data[name]
        b, _, d = s_anchor[name]
        sc = np.abs(mod.weight.detach().double().numpy()) * (a / c) / (b / d + 1e-6)
        assert np.array_equal(masks[f"{name}.weight"], topk_oracle(sc, 2)), name
