"""Per-entry input scales in the masks file (selection/step_scale.py, formats/masks.py v2): each selected entry's
input statistic, checked against PyTorch forward hooks on the same data; and the step factors c = min(1, ref / s)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_helpers as H  # noqa: E402

from fps_graph.formats.masks import load_indices, load_input_scales, load_masks, read_metadata  # noqa: E402
from fps_graph.selection.step_scale import step_factors  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_scale")
    folder = H.make_folder(root / "m")
    onnx_path = H.export_onnx(folder, root / "m.onnx")
    texts = H.cycle_text(24, seed=3)
    npz = H.tokenize_npz(folder, texts, root / "c.npz")
    return {"root": root, "folder": folder, "onnx": onnx_path, "npz": npz}


def _hook_stats(folder: Path, npz: Path) -> dict[str, dict[str, np.ndarray]]:
    """E|x| and rms of every block Linear's input over all positions of the (padded) arrays, as select sees them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    d = np.load(npz)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].detach()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(d["input_ids"]), attention_mask=torch.from_numpy(d["attention_mask"]))
    for h in hooks:
        h.remove()
    out = {}
    for n, xs in seen.items():
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in xs]).double()
        out[n + ".weight"] = {"mean-abs": x.abs().mean(0).numpy(), "l2": x.pow(2).mean(0).sqrt().numpy()}
    return out


@pytest.mark.parametrize("score,stat", [("fps", "mean-abs"), ("act-sample", "l2"), ("wanda", "l2")])
def test_masks_carry_each_entrys_input_statistic(lm, score, stat):
    masks = H.select_masks(lm["onnx"], lm["npz"], lm["root"] / f"{score}.safetensors", k=3,
                           exclude=("lm_head*",), score=score)
    ref = _hook_stats(lm["folder"], lm["npz"])
    idx, scales, meta = load_indices(masks), load_input_scales(masks), read_metadata(masks)
    assert meta["input_scale"] == stat and str(meta["format_version"]) == "2"
    assert set(scales) == set(idx) == set(ref)
    for key, i in idx.items():
        x = ref[key][stat]
        fan_in = x.size
        assert scales[key].dtype == np.float32 and scales[key].shape == i.shape
        np.testing.assert_allclose(scales[key], x[i % fan_in], rtol=2e-5, atol=1e-7)   # the entry's own column
        assert meta["tensors"][key]["input_scale_ref"] == pytest.approx(float(np.median(x)), rel=2e-5)


def test_scores_without_statistics_carry_none_and_dense_layout_agrees(lm):
    from fps_graph.selection.pipeline import SelectOptions, run_select, write_result

    for score in ("random", "magnitude"):
        m = lm["root"] / f"{score}.safetensors"
        write_result(run_select(lm["onnx"], None, SelectOptions(k=2, exclude=("lm_head*",), score=score)), m,
                     force=True)
        assert load_input_scales(m) == {} and read_metadata(m)["input_scale"] == "none"
    res = run_select(lm["onnx"], str(lm["npz"]), SelectOptions(k=2, exclude=("lm_head*",)))
    write_result(res, lm["root"] / "sparse.safetensors", force=True)
    write_result(res, lm["root"] / "dense.safetensors", dense=True, force=True)
    a, b = load_input_scales(lm["root"] / "sparse.safetensors"), load_input_scales(lm["root"] / "dense.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    ia, dense = load_indices(lm["root"] / "sparse.safetensors"), load_masks(lm["root"] / "dense.safetensors")
    assert set(dense) == set(ia)                   # the scale tensors are no masks
    assert all(np.array_equal(np.flatnonzero(dense[k].reshape(-1)), ia[k]) for k in ia)


def test_step_factors():
    c = step_factors(np.array([0.5, 1.0, 4.0, 0.0, 100.0], dtype=np.float32), 1.0)
    np.testing.assert_array_equal(c, np.array([1.0, 1.0, 0.25, 1.0, 0.01], dtype=np.float32))
    assert c.dtype == np.float32


# ------------------------------------------------------------------------------------------------ training


def _lm_batch(folder: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = torch.tensor([e.ids[:10] for e in tok.encode_batch(H.cycle_text(4, seed=5, length=12))
                        if len(e.ids) >= 10][:3])
    return ids


def test_attach_scales_each_entrys_step_by_its_input(lm):
    """step = min(1, median/its statistic) from forward hooks; one AdamW step moves the effective delta by
    step * lr * sign(gradient) (Adam's first update is lr * g / |g|), and by lr without step scaling."""
    from transformers import AutoModelForCausalLM

    from fps_graph.training import attach

    masks = H.select_masks(lm["onnx"], lm["npz"], lm["root"] / "train_fps.safetensors", k=3, exclude=("lm_head*",))
    ref = _hook_stats(lm["folder"], lm["npz"])
    ids = _lm_batch(lm["folder"])
    moved = {}
    for mode in ("input", "none"):
        model = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32)
        handle = attach(model, masks, step_scale=mode)
        idx = load_indices(masks)
        for key, d in handle.deltas.items():
            if mode == "none":
                assert d.step is None
                continue
            x = ref[key]["mean-abs"]
            want = np.minimum(1.0, np.median(x) / x[idx[key] % x.size])
            np.testing.assert_allclose(d.step.numpy(), want, rtol=3e-5)
        assert mode == "none" or any(float(d.step.min()) < 0.5 for d in handle.deltas.values())
        opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {k: d.delta.grad.clone() for k, d in handle.deltas.items()}
        opt.step()
        moved[mode] = {k: (d.effective().detach().clone(), grads[k], d.step) for k, d in handle.deltas.items()}
    for mode, per in moved.items():
        for key, (eff, g, step) in per.items():
            big = g.abs() > 1e-5                          # Adam's eps (1e-8) is negligible there
            c = step if step is not None else torch.ones_like(eff)
            torch.testing.assert_close(eff[big], -(1e-2 * c * torch.sign(g))[big], rtol=2e-3, atol=1e-9)


def test_effective_delta_is_what_is_saved_merged_and_reloaded(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from fps_graph.formats.delta import read_delta
    from fps_graph.training import attach, load_delta

    masks = H.select_masks(lm["onnx"], lm["npz"], lm["root"] / "save_fps.safetensors", k=3, exclude=("lm_head*",))
    model = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32).eval()
    handle = attach(model, masks)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for d in handle.deltas.values():
            d.delta.copy_(torch.randn(d.delta.shape, generator=g) * 0.1)
    ids = _lm_batch(lm["folder"])
    with torch.no_grad():
        out = model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32).eval()
    params = dict(base.named_parameters())
    for key, d in handle.deltas.items():                  # the weight the forward uses: W + step * delta
        w = params[key].detach().reshape(-1).clone()
        w[d.index] += d.step * d.delta.detach()
        torch.testing.assert_close(getattr(handle._owners[key][0][0], handle._owners[key][0][1]).reshape(-1), w)
    handle.save(tmp_path / "delta.safetensors")
    df = read_delta(tmp_path / "delta.safetensors")
    for key, d in handle.deltas.items():
        np.testing.assert_array_equal(df.sparse[key].delta, d.effective().detach().numpy())
    fresh = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32).eval()
    loaded = load_delta(fresh, tmp_path / "delta.safetensors")
    assert all(d.step is None for d in loaded.deltas.values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, out, rtol=1e-5, atol=1e-6)
        handle.merge()
        torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=1e-5, atol=1e-6)


def test_cli_and_public_api_write_the_scales_the_pipeline_does(lm, tmp_path):
    """`fps-graph select` and `fps_graph.select(...).save` write the pipeline's bytes, input scales included (the
    public API once dropped them, so `train` silently took plain steps)."""
    import fps_graph
    from fps_graph_cli.main import entry

    ref = H.select_masks(lm["onnx"], lm["npz"], tmp_path / "ref.safetensors", k=3)
    code = entry(["select", str(lm["onnx"]), str(lm["npz"]), "--k", "3", "-o", str(tmp_path / "cli.safetensors"),
                  "-q"])
    fps_graph.select(lm["onnx"], lm["npz"], k=3).save(tmp_path / "api.safetensors")
    assert code == 0 and load_input_scales(tmp_path / "cli.safetensors")
    assert (tmp_path / "cli.safetensors").read_bytes() == ref.read_bytes()
    assert (tmp_path / "api.safetensors").read_bytes() == ref.read_bytes()


def test_attach_refuses_a_file_whose_scales_are_missing(lm, tmp_path):
    """A header that says input scales were recorded, with none in the file: training would silently take plain
    steps, so attach refuses (step_scale='none' still trains it)."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    from fps_graph.training import attach
    from fps_graph.errors import DataError

    masks = H.select_masks(lm["onnx"], lm["npz"], tmp_path / "m.safetensors", k=2, exclude=("lm_head*",))
    from safetensors import safe_open
    with safe_open(str(masks), "np") as f:
        header = f.metadata()
    kept = {k: v for k, v in load_file(str(masks)).items() if not k.endswith("::input_scale")}
    save_file(kept, str(tmp_path / "stripped.safetensors"), metadata=header)
    model = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32)
    with pytest.raises(DataError, match="input scale"):
        attach(model, tmp_path / "stripped.safetensors")
    assert attach(model, tmp_path / "stripped.safetensors", step_scale="none").deltas
