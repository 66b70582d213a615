"""The one training loop (fps_graph.training.loop.fit) with every adapter (sparse deltas, head only, LoRA, full
fine-tuning) and task; the honest trainable summary; the configs (validated once, help beside the field, the CLI
reads both); timing and memory in the one metrics schema."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest_train import SPEC_TOKEN, token_net, token_run_inputs  # noqa: E402

from fps_graph.errors import OptionError  # noqa: E402
from fps_graph.training import (DataConfig, DataContext, FullAdapter, LoraAdapter, OptimConfig, RunConfig,  # noqa: E402
                                SparseAdapter, TrainsConfig, fit, get_task)
from fps_graph.training.config import ModelConfig, help_of  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    run = token_run_inputs(tmp_path_factory.mktemp("loop"), 64, calib=32)
    x, y = run["x"], run["y"]
    np.savez(run["root"] / "two.npz", x=x[y < 2], y=y[y < 2])
    return {**run, "two": str(run["root"] / "two.npz")}


def _image_fit(token, adapter, out=None, **optim):
    from fps_graph.training.models import build_model

    model = build_model(SPEC_TOKEN, token["weights"])
    task = get_task("image-cls")
    cfg = DataConfig(data=token["train"])
    data = task.read(cfg.data, DataContext(model, cfg))
    o = dict(epochs=2, batch_size=16, lr=1e-2)
    o.update(optim)
    return model, fit(model, adapter, task, data, None, OptimConfig(**o), RunConfig(output=out, threads=1, plot=False))


def _unique_numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _check_counts(res) -> dict:
    """The summary adds up, and equals what the optimiser really holds."""
    t = res.metrics["trainable"]
    assert t["trainable"] == t["adapter_values"] + t["full_tensors"] == \
        t["adapter_values"] + sum(t["full_by_reason"].values())
    assert t["trainable"] == _unique_numel(res.handle.trainable_parameters())
    assert t["full_tensor_count"] == len(t["trained_in_full"])
    assert math.isclose(t["fraction"], t["trainable"] / t["full_finetune"])
    return t


def test_sparse_fit_writes_nothing_without_output_and_measures_steps(token, tmp_path):
    model, res = _image_fit(token, SparseAdapter(token["masks"]))
    assert res.files == {} and list(tmp_path.iterdir()) == []
    t = _check_counts(res)
    assert t["kind"] == "sparse" and t["head_trains"] == "full" and t["full_by_reason"]["head"] == 4 * 16 + 4
    tm = res.metrics["time"]
    assert tm["steps"] == 2 * math.ceil(64 / 16) and tm["seconds_per_step"] > 0 and tm["seconds_per_step_median"] > 0
    assert res.metrics["memory"]["peak_rss_mb"] > 0 and len(res.metrics["machine"]["loadavg"]) == 3
    assert res.metrics["settings"]["optim"]["lr"] == 1e-2 and res.metrics["settings"]["trains"]["train_head"]


def test_head_only_adapter_trains_head_and_nothing_else(token):
    base = token_net()
    from safetensors.torch import load_file

    base.load_state_dict(load_file(token["weights"]))
    model, res = _image_fit(token, SparseAdapter(None, TrainsConfig(train_full=("*.bias",))), lr=5e-2)
    t = _check_counts(res)
    assert t["adapter_values"] == 0 and t["full_by_reason"] == {"head": 68, "train-full": 16 + 16 + 32 + 16 + 16}
    after = model.state_dict()
    for k, v in base.state_dict().items():
        changed = not torch.equal(v, after[k])
        assert changed == (k.startswith("head.") or k.endswith(".bias")), k


def test_full_adapter_trains_every_parameter(token):
    base = token_net()
    model, res = _image_fit(token, FullAdapter())
    t = _check_counts(res)
    assert t["kind"] == "full" and t["trainable"] == t["full_finetune"] == sum(p.numel() for p in base.parameters())
    assert t["full_by_reason"] == {"all": t["trainable"]}


def test_lora_rank_matches_its_count_and_only_lora_and_head_move(token, tmp_path):
    """LoRA through PEFT in the same loop: trainable values = sum r * (in + out) over the adapted Linears (+ the head
    as modules_to_save, + biases of adapted layers), an independent count; the frozen weights stay bit for bit."""
    adapter = LoraAdapter(rank={"fc1": 2, "fc2": 3}, target_modules=("fc1", "fc2"), trains=TrainsConfig())
    model, res = _image_fit(token, adapter, tmp_path / "run", lr=5e-2)
    t = _check_counts(res)
    lora = 2 * (16 + 32) + 3 * (32 + 16)
    assert t["kind"] == "lora" and t["adapter_values"] == lora and t["adapter_tensors"] == 2
    assert t["full_by_reason"] == {"head": 16 * 4 + 4, "bias": 32 + 16}
    assert res.metrics["epochs"][-1]["train_loss"] < res.metrics["epochs"][0]["train_loss"]
    base = token_net()
    from safetensors.torch import load_file

    base.load_state_dict(load_file(token["weights"]))
    sd = dict(model.named_parameters())
    for k, v in base.state_dict().items():
        if k.startswith(("fc1.", "fc2.", "head.")):
            continue
        assert torch.equal(v, sd[k]), k
    assert torch.equal(base.fc1.weight, sd["fc1.base_layer.weight"])
    assert set(res.files) >= {"lora", "lora_config", "metrics", "run_config"}
    from safetensors.numpy import load_file as np_load

    saved = np_load(res.files["lora"])
    assert sum(v.size for k, v in saved.items() if "lora_" in k) == lora


def test_lora_on_a_causal_lm_and_seq_cls_head(tmp_path):
    """LoRA on a tiny Llama's attention for seq-cls: the new 3-class head trains in full (PEFT modules_to_save),
    the count is r * (in + out) per adapted projection, the base weights do not move."""
    pytest.importorskip("transformers")
    import hf_helpers as H

    folder = H.make_folder(tmp_path / "cls", kind="seq-cls", num_labels=2)
    H.write_jsonl(tmp_path / "train.jsonl", H.cls_records(24))
    from fps_graph.training.models import load_hf_model

    task = get_task("seq-cls")
    model = load_hf_model(folder, task.hf_class)
    cfg = DataConfig(data=str(tmp_path / "train.jsonl"))
    data = task.read(cfg.data, DataContext(model, cfg, folder))
    res = fit(model, LoraAdapter(rank=2, target_modules=("q_proj", "v_proj")), task, data, None,
              OptimConfig(epochs=1, batch_size=8, lr=1e-2), RunConfig(threads=1))
    t = _check_counts(res)
    # q_proj: 16 -> 16, v_proj: 16 -> 8 (one KV head of 8), 2 layers
    assert t["adapter_values"] == 2 * 2 * ((16 + 16) + (16 + 8))
    assert t["full_by_reason"] == {"head": 3 * 16} and t["head_trains"] == "full"
    assert res.metrics["head"]["replaced"] and res.metrics["head"]["num_classes"] == 3


def test_configs_validate_once_and_carry_their_help():
    for cls in (ModelConfig, TrainsConfig, OptimConfig, DataConfig, RunConfig):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        for f in dataclasses.fields(cls):
            if f.name != "text":
                assert len(help_of(cls, f.name)) > 15, (cls.__name__, f.name)
    bad = [(OptimConfig, {"lr": 0}, "--lr must be positive"), (OptimConfig, {"optimizer": "lion"}, "--optimizer"),
           (OptimConfig, {"min_lr": 1.0, "lr": 0.1}, "--min-lr must not exceed --lr"),
           (OptimConfig, {"grad_clip": 0.0}, "--grad-clip must be positive"),
           (OptimConfig, {"label_smoothing": 1.0}, "--label-smoothing"),
           (OptimConfig, {"weight_decay": -1.0}, "--weight-decay must not be negative"),
           (DataConfig, {"data": "d", "crop_pct": 1.5}, "--crop-pct"),
           (DataConfig, {"data": "d", "completion_field": "c"}, "--completion-field needs --prompt-field"),
           (RunConfig, {"device": "tpu"}, "--device"),
           (TrainsConfig, {"num_classes": 3, "train_head": False}, "drop --no-train-head")]
    for cls, kw, msg in bad:
        with pytest.raises(OptionError, match=msg):
            cls(**kw)
    o = OptimConfig(optimizer="sgd")
    assert o.optimizer.value == "sgd"
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.lr = 1.0


def test_cli_help_and_defaults_come_from_the_config_fields():
    """Every `train` option whose name is a config field shows that field's help and default (no drift)."""
    from fps_graph.data.text import TextOptions
    from fps_graph_cli.train_cmd import train

    owners = {}
    for cls in (ModelConfig, TrainsConfig, OptimConfig, DataConfig, RunConfig):
        for f in dataclasses.fields(cls):
            owners[f.name] = cls
    checked = 0
    for p in train.params:
        if p.name in ("model", "masks", "peft", "quiet", "help", "no_plot", "step_scale") or \
                p.name in TextOptions.__annotations__:
            continue
        cls = owners[p.name]
        assert p.help == help_of(cls, p.name), p.name
        default = next(f for f in dataclasses.fields(cls) if f.name == p.name).default
        default = getattr(default, "value", default)
        if default is not dataclasses.MISSING and not p.multiple and not p.is_flag:
            assert p.default == default, p.name
        checked += 1
    assert checked >= 35
    data = next(p for p in train.params if p.name == "data").help
    assert "images" in data and ".npz" in data and ".txt" in data and ".jsonl" in data   # images, arrays, text


def test_setup_warnings_come_before_training(token, tmp_path, capsys):
    """`train` says what the run will do, and its warnings, before the first epoch (issue 20)."""
    capsys.readouterr()
    assert entry(["train", SPEC_TOKEN, "--weights", token["weights"], "--masks", token["masks"], "--data",
                  token["two"], "-o", str(tmp_path / "run"), "--epochs", "2", "--threads", "1", "--no-plot"]) == 0
    err = capsys.readouterr().err
    warn = err.index("warning: ") if "warning: " in err else -1
    assert "has 2 classes, the model predicts 4" in err[warn:].split("\n")[0]
    assert 0 <= warn < err.index("trainable: ") < err.index("epoch   1/2") < err.index("memory: ")
    assert err.count("has 2 classes, the model predicts 4") == 1          # said once, not again at the end


def test_seq_cls_summary_is_honest(tmp_path, capsys):
    """A default seq-cls run: the head trains in full and the summary says so, without naming a flag that was not
    given; the counts add up (issue 17/20)."""
    pytest.importorskip("transformers")
    import hf_helpers as H

    folder = H.make_folder(tmp_path / "cls", kind="seq-cls", num_labels=2)
    onnx_path = H.export_onnx(folder, tmp_path / "cls.onnx", kind="seq-cls")
    recs = H.cls_records(24)
    H.write_jsonl(tmp_path / "train.jsonl", recs)
    npz = H.tokenize_npz(folder, [r["text"] for r in recs[:8]], tmp_path / "calib.npz")
    masks = H.select_masks(onnx_path, npz, tmp_path / "masks.safetensors", k=2)
    capsys.readouterr()
    assert entry(["train", f"hf:{folder}", "--masks", str(masks), "--data", str(tmp_path / "train.jsonl"), "-o",
                  str(tmp_path / "run"), "--epochs", "1", "--threads", "1", "--no-plot"]) == 0
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    t = m["trainable"]
    head_line = next(line for line in err.splitlines() if line.startswith("head: "))
    assert head_line == (f"head: score (new, 3 classes, detected) trains in full: {3 * 16:,} values (a new head always "
                         "trains)")
    assert "--no-train-head" not in err and "(none)" not in err
    assert t["full_by_reason"] == {"head": 48} and t["head_trains"] == "full"
    assert f"trainable: {t['trainable']:,} values = {t['adapter_values']:,} selected entries" in err
    assert f"+ {t['full_tensors']:,} trained in full in 1 tensors (head 48)" in err
    assert t["trainable"] == t["adapter_values"] + 48 and t["masks_selected"] == t["adapter_values"] + \
        sum(t["selected_in_full"].values())


def test_divergence_fails_or_stops_as_asked(token):
    """A non-finite loss is an error naming the fix; with stop_on_divergence (learning-rate sweeps) the run stops,
    says where, and the model is still returned for evaluation."""
    from fps_graph.errors import RuntimeFailure
    from fps_graph.training.models import build_model

    task = get_task("image-cls")
    cfg = DataConfig(data=token["train"])
    for stop in (False, True):
        model = build_model(SPEC_TOKEN, token["weights"])
        data = task.read(cfg.data, DataContext(model, cfg))
        args = (model, SparseAdapter(token["masks"]), task, data, None,
                OptimConfig(optimizer="sgd", lr=1e30, epochs=2, batch_size=16, warmup_epochs=0),
                RunConfig(threads=1, stop_on_divergence=stop))
        if not stop:
            with pytest.raises(RuntimeFailure, match="the loss became nan in epoch 1; lower --lr"):
                fit(*args)
            continue
        res = fit(*args)
        assert res.metrics["diverged"] == {"epoch": 1, "step": 2, "loss": "nan"} and res.metrics["epochs"] == []
        assert res.metrics["time"]["steps"] == 1 and res.handle.model is model
