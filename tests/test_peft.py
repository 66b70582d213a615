"""The trained delta as a PEFT SHiRA adapter: PeftModel.from_pretrained gives the fine-tuned outputs exactly
where SHiRA can hold the selection, and a one-line error names the tensor where it cannot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import hf_helpers as H  # noqa: E402

from fps_graph import FpsGraphError  # noqa: E402
from fps_graph.formats.masks import load_indices  # noqa: E402
from fps_graph.integrations.peft import shira_plan, write_shira  # noqa: E402
from fps_graph.training.sparse import attach  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10], [1, 20, 21, 22, 23, 0, 0]])
AM = (IDS != 0).long()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama, its export, masks with the tied LM head (as select writes them) and without it."""
    root = tmp_path_factory.mktemp("peft")
    folder = H.make_folder(root / "lm")
    onnx_path = H.export_onnx(folder, root / "lm.onnx")
    texts = H.cycle_text(32)
    (root / "train.txt").write_text("\n".join(texts) + "\n")
    npz = H.tokenize_npz(folder, texts[:16], root / "calib.npz")
    tied = H.select_masks(onnx_path, npz, root / "masks.safetensors", k=2)
    untied = H.select_masks(onnx_path, npz, root / "masks_no_head.safetensors", k=2, exclude=["lm_head*"])
    return {"root": root, "folder": folder, "tied": tied, "masks": untied, "onnx": onnx_path, "npz": npz}


def _model(folder: Path, kind: str = "causal-lm", **kw):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()


def _randomise(handle, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in handle.deltas.values():
            d.delta.copy_(0.1 * torch.randn(d.delta.shape, generator=g))
        for p in handle.full.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=AM).logits


def test_shira_adapter_loads_with_identical_outputs(lm, tmp_path):
    model = _model(lm["folder"])
    handle = attach(model, lm["masks"])
    _randomise(handle)
    want = _logits(model)
    plan = write_shira(handle, tmp_path / "adapter", base_model=str(lm["folder"]), task="causal-lm")

    # K=2 per row: q/o 16x16 -> 32 = 1*(16+16); k/v 8x16 -> 16 of 24; gate/up 32x16 -> 64 > 48, so r = 2
    assert plan.r == 2
    idx = load_indices(lm["masks"])
    for key, mod in plan.targets.items():
        n_in, n_out = model.get_submodule(mod).in_features, model.get_submodule(mod).out_features
        assert plan.padding[key] == 2 * (n_in + n_out) - idx[key].size
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA" and cfg["r"] == 2 and cfg["task_type"] == "CAUSAL_LM"
    assert sorted(cfg["target_modules"]) == sorted(k.rsplit(".", 1)[0] for k in idx)

    loaded = peft.PeftModel.from_pretrained(_model(lm["folder"]), str(tmp_path / "adapter")).eval()
    assert torch.equal(_logits(loaded), want)                       # bit for bit
    # the stored entries: the selection with its deltas, then zero padding
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    key = "model.layers.0.mlp.gate_proj.weight"
    rows, cols = sd[f"base_model.model.{key[:-7]}.shira_indices"].long()
    values = sd[f"base_model.model.{key[:-7]}.shira_weight"]
    flat = (rows * 16 + cols).numpy()
    assert np.isin(idx[key], flat).all() and len(np.unique(flat)) == flat.size == 96
    d = handle.deltas[key]
    pos = {int(f): i for i, f in enumerate(flat)}
    assert torch.equal(values[[pos[int(f)] for f in d.index]], d.effective().detach())   # step * delta
    assert int((values != 0).sum()) == d.delta.numel()
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged), want, rtol=1e-6, atol=1e-6)


def test_exact_fit_needs_no_padding(lm, tmp_path):
    """Square layers with K = 2r per row hold exactly r*(in+out) entries: nothing padded."""
    idx = {k: v for k, v in load_indices(lm["masks"]).items() if k.endswith(("q_proj.weight", "o_proj.weight"))}
    model = _model(lm["folder"])
    handle = attach(model, idx)
    plan = shira_plan(handle)
    assert plan.r == 1 and not any(plan.padding.values())


def test_seq_cls_head_goes_to_modules_to_save(tmp_path):
    folder = H.make_folder(tmp_path / "cls", kind="seq-cls", num_labels=3)
    model = _model(folder, "seq-cls")
    rng = np.random.default_rng(0)
    masks = {f"model.layers.{i}.self_attn.q_proj.weight": np.sort(rng.choice(256, 32, replace=False))
             for i in range(2)}
    handle = attach(model, masks)
    assert set(handle.full) == {"score.weight"}
    _randomise(handle)
    want = _logits(model)
    plan = write_shira(handle, tmp_path / "adapter", task="seq-cls")
    assert plan.modules_to_save == ["score"]
    loaded = peft.PeftModel.from_pretrained(_model(folder, "seq-cls"), str(tmp_path / "adapter")).eval()
    assert torch.equal(_logits(loaded), want)


def test_refusals_name_the_tensor(lm, tmp_path):
    # the tied LM head / input embedding is one tensor in two modules
    # (keyed by the embedding's name, as every stage keys a tied tensor); the advice names the key `select` wrote,
    # and select with that --exclude drops exactly the tied tensor, giving a selection SHiRA holds
    import re

    handle = attach(_model(lm["folder"]), lm["tied"])
    with pytest.raises(FpsGraphError, match=r"SHiRA cannot hold the delta on model\.embed_tokens\.weight: it is "
                                            r"tied \(model\.embed_tokens\.weight, lm_head\.weight\) .*--exclude 'lm_head\.weight'"
                       ) as err:
        shira_plan(handle)
    pattern = re.search(r"--exclude '([^']+)'", str(err.value)).group(1)
    again = H.select_masks(lm["onnx"], lm["npz"], tmp_path / "m.safetensors", k=2, exclude=[pattern])
    assert set(load_indices(again)) == set(load_indices(lm["tied"])) - {"lm_head.weight"}
    shira_plan(attach(_model(lm["folder"]), again))
    # a layer too small for the common r: gate_proj full rows force r = 8 > what k_proj (8x16) can hold
    idx = {"model.layers.0.mlp.gate_proj.weight": np.arange(32 * 12),
           "model.layers.0.self_attn.k_proj.weight": np.arange(4)}
    with pytest.raises(FpsGraphError, match=r"one r for all layers, r = 8 .* needs 192 entries in "
                                            r"model\.layers\.0\.self_attn\.k_proj\.weight, which has 128"):
        shira_plan(attach(_model(lm["folder"]), idx))
    # convolutions, and biases trained in full inside an adapted Linear
    from conftest_train import conv_net, token_net

    with pytest.raises(FpsGraphError, match=r"conv1\.weight: it adapts nn\.Linear weights only, this is Conv2d"):
        shira_plan(attach(conv_net(), {"conv1.weight": np.arange(8)}, head=None))
    with pytest.raises(FpsGraphError, match=r"fc1\.bias, trained in full .* --no-train-bias"):
        shira_plan(attach(token_net(), {"fc1.weight": np.arange(32)}, head=None))
    plan = shira_plan(attach(token_net(), {"fc1.weight": np.arange(32)}, head=None, train_bias=False))
    assert plan.r == 1 and plan.padding == {"fc1.weight": 16}


def test_cli_peft_run_loads_in_peft_and_refuses_tied_heads_before_training(lm, tmp_path, capsys):
    from fps_graph.training.sparse import load_delta

    run = tmp_path / "run"
    common = ["--data", str(lm["root"] / "train.txt"), "--epochs", "1", "--threads", "1", "--peft", "-q"]
    assert entry(["train", f"hf:{lm['folder']}", "--masks", str(lm["masks"]), "-o", str(run), *common]) == 0
    assert {p.name for p in run.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               "delta.safetensors", "run_config.json"}
    ref = _model(lm["folder"])
    load_delta(ref, run / "delta.safetensors")
    loaded = peft.PeftModel.from_pretrained(_model(lm["folder"]), str(run)).eval()
    assert torch.equal(_logits(loaded), _logits(ref))

    capsys.readouterr()
    bad = tmp_path / "bad"
    assert entry(["train", f"hf:{lm['folder']}", "--masks", str(lm["tied"]), "-o", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHiRA cannot hold" in err and not bad.exists()


def test_factory_run_with_peft_loads_in_peft(tmp_path):
    """`train FACTORY --peft` on a plain nn.Module: the head goes to modules_to_save, PEFT reproduces the run."""
    from conftest_train import SPEC_TOKEN, TOKEN_SHAPE, export, save_weights, select_masks, token_data, token_net

    from fps_graph.integrations.peft import ShiraExport
    from fps_graph.training.job import run_train, train_job
    from fps_graph.training.sparse import load_delta

    model = token_net()
    weights = save_weights(model, tmp_path / "w.safetensors")
    onnx_path = export(model, TOKEN_SHAPE, tmp_path / "m.onnx", dynamo=False)
    x, y = token_data(48)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    masks = select_masks(onnx_path, x[:16], tmp_path / "masks.safetensors", k=2)
    run_train(train_job(SPEC_TOKEN, masks, str(tmp_path / "train.npz"), str(tmp_path / "run"), weights=str(weights),
                        epochs=2, lr=2e-2, batch_size=16, train_bias=False, threads=1, plot=False), [ShiraExport()])
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA" and cfg["modules_to_save"] == ["head"]
    ref = token_net()
    load_delta(ref, tmp_path / "run" / "delta.safetensors")
    loaded = peft.PeftModel.from_pretrained(token_net(), str(tmp_path / "run")).eval()
    xt = torch.from_numpy(x[:8])
    with torch.no_grad():
        assert torch.equal(loaded(xt), ref(xt))
