"""Every `apply` input that `train hf:DIR` produces, through the README's chain (`export hf:DIR` -> `select` ->
`train` -> `apply`): each task, a kept / replaced / new head, PEFT or not. Each either patches exactly (ONNX
Runtime == the fine-tuned PyTorch model, relative 1e-4, at other batch sizes and lengths) or refuses in one line
that says what to do. (Factory models with a kept or replaced head: tests/test_apply.py; the Hugging Face Trainer
recipe: tests/test_hf_trainer.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

import hf_helpers as H  # noqa: E402

from fps_graph.formats.delta import read_delta  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402

REL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("combos")
    (r / "lm.txt").write_text("\n".join(H.cycle_text(32)) + "\n")
    H.write_jsonl(r / "cls3.jsonl", H.cls_records(32, classes=3))
    H.write_jsonl(r / "cls2.jsonl", H.cls_records(32, classes=2))
    return r


def _run(args, capsys=None):
    code = entry([str(a) for a in args])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def chain(root: Path, folder: Path, name: str, task: str, data: str, export_task: str | None = None,
          train_args=(), calib: str | None = None):
    """export hf:DIR -> select (text) -> train hf:DIR --task -> returns (onnx folder, run folder)."""
    onnx = root / f"{name}_onnx"
    if not onnx.exists():
        task_args = ["--task", export_task] if export_task else []
        assert entry(["export", f"hf:{folder}", "-o", str(onnx), *task_args]) == 0
    masks = root / f"{name}_masks.safetensors"
    if not masks.exists():
        assert entry(["select", str(onnx), str(root / (calib or data)), "--k", "2", "-o", str(masks)]) == 0
    run = root / f"{name}_{task}_run{len(list(root.glob(f'{name}_{task}_run*')))}"
    assert entry(["train", f"hf:{folder}", "--masks", str(masks), "--task", task, "--data", str(root / data),
                  "--epochs", "2", "--lr", "3e-2", "--batch-size", "8", "--threads", "1", "-q", "--no-plot",
                  "-o", str(run), *train_args]) == 0
    return onnx, run


def tuned_model(folder: Path, task: str, delta: Path):
    """The fine-tuned PyTorch model: the base folder's model plus load_delta (exact, tested elsewhere)."""
    import transformers

    from fps_graph.training.sparse import load_delta

    cls = {"causal-lm": transformers.AutoModelForCausalLM,
           "seq-cls": transformers.AutoModelForSequenceClassification}[task]
    model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    load_delta(model, delta)
    return model.eval()


def assert_exact(onnx_model: Path, model, token_types: bool = False):
    sess = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    g = torch.Generator().manual_seed(5)
    for b, t in ((1, 6), (3, 9)):
        ids = torch.randint(5, 44, (b, t), generator=g)
        x = {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.int64)}
        if "token_type_ids" in names:
            x["token_type_ids"] = torch.zeros_like(ids)
        got = sess.run(None, {n: x[n].numpy() for n in names})[0]
        with torch.no_grad():
            want = model(**x).logits.numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() / np.abs(want).max() < REL


def apply(onnx: Path, run: Path, out: Path, capsys=None):
    if capsys is not None:
        capsys.readouterr()
    return _run(["apply", onnx / "model.onnx", run / "delta.safetensors", "-o", out], capsys)


def test_causal_lm_tied(root, tmp_path):
    folder = H.make_folder(root / "llama")
    onnx, run = chain(root, folder, "llama", "causal-lm", "lm.txt")
    df = read_delta(run / "delta.safetensors")
    assert df.tensors["model.embed_tokens.weight"]["aliases"] == ["lm_head.weight"]
    assert apply(onnx, run, tmp_path / "t.onnx")[0] == 0
    assert_exact(tmp_path / "t.onnx", tuned_model(folder, "causal-lm", run / "delta.safetensors"))


def test_causal_lm_untied_with_peft(root, tmp_path):
    """--peft writes the SHiRA adapter beside the same delta: apply is exact, and PEFT gives the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = H.make_qwen_folder(root / "qwen")
    onnx, run = chain(root, folder, "qwen", "causal-lm", "lm.txt", train_args=["--peft", "--no-train-bias"])
    assert (run / "adapter_config.json").is_file()
    assert apply(onnx, run, tmp_path / "t.onnx")[0] == 0
    tuned = tuned_model(folder, "causal-lm", run / "delta.safetensors")
    assert_exact(tmp_path / "t.onnx", tuned)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32),
                                           str(run)).eval()
    assert_exact(tmp_path / "t.onnx", peft_model)


def test_seq_cls_kept_head(root, tmp_path):
    folder = H.make_bert_folder(root / "bert3", num_labels=3)
    onnx, run = chain(root, folder, "bert3", "seq-cls", "cls3.jsonl")
    head = read_delta(run / "delta.safetensors").head
    assert head["name"] == "classifier" and not head["replaced"]
    assert apply(onnx, run, tmp_path / "t.onnx")[0] == 0
    assert_exact(tmp_path / "t.onnx", tuned_model(folder, "seq-cls", run / "delta.safetensors"))


def test_seq_cls_replaced_head(root, tmp_path):
    """3-label checkpoint, 2-class data: a new 2-row head; apply changes the head's shape and the output's."""
    import onnx as onnx_lib

    folder = H.make_bert_folder(root / "bert3", num_labels=3) if not (root / "bert3").exists() else root / "bert3"
    onnx, run = chain(root, folder, "bert3", "seq-cls", "cls2.jsonl", calib="cls3.jsonl")
    head = read_delta(run / "delta.safetensors").head
    assert head["replaced"] and head["old_classes"] == 3 and head["num_classes"] == 2
    assert apply(onnx, run, tmp_path / "t.onnx")[0] == 0
    out = onnx_lib.load(str(tmp_path / "t.onnx")).graph.output[0]
    assert [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim] == ["batch_size", 2]
    assert_exact(tmp_path / "t.onnx", tuned_model(folder, "seq-cls", run / "delta.safetensors"))


def test_seq_cls_new_head_from_a_headless_checkpoint(root, tmp_path, capsys):
    """A BertModel checkpoint trained for seq-cls: the head is new (old_classes unknown). Applied to the
    feature-extraction export (no head): one line saying to export with --task seq-cls (was a TypeError); applied
    to that export: exact."""
    folder = H.make_bert_folder(root / "bert_base", kind="base")
    onnx, run = chain(root, folder, "bert_base", "seq-cls", "cls3.jsonl")
    head = read_delta(run / "delta.safetensors").head
    assert head["replaced"] and head["old_classes"] is None
    code, err = apply(onnx, run, tmp_path / "t.onnx", capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "has no classification head 'classifier'" in err and "--task seq-cls" in err
    assert not (tmp_path / "t.onnx").exists()
    assert entry(["export", f"hf:{folder}", "--task", "seq-cls", "-o", str(root / "bert_base_cls")]) == 0
    assert apply(root / "bert_base_cls", run, tmp_path / "t.onnx")[0] == 0
    assert_exact(tmp_path / "t.onnx", tuned_model(folder, "seq-cls", run / "delta.safetensors"))


def test_seq_cls_from_a_causal_lm_checkpoint(root, tmp_path, capsys):
    """Causal-LM masks on a seq-cls run: the LM head's masks left out (said), a new `score` head. The causal-LM
    export has no `score`: refused in one line; the seq-cls export of the same folder: exact."""
    folder = root / "llama" if (root / "llama").exists() else H.make_folder(root / "llama")
    onnx, run = chain(root, folder, "llama", "seq-cls", "cls3.jsonl", calib="lm.txt")
    df = read_delta(run / "delta.safetensors")
    assert "model.embed_tokens.weight" not in df.keys and "score.weight" in df.full
    code, err = apply(onnx, run, tmp_path / "t.onnx", capsys)
    assert code == 2 and "has no classification head 'score'" in err and err.count("\n") == 1
    assert entry(["export", f"hf:{folder}", "--task", "seq-cls", "-o", str(root / "llama_cls")]) == 0
    assert apply(root / "llama_cls", run, tmp_path / "t.onnx")[0] == 0
    assert_exact(tmp_path / "t.onnx", tuned_model(folder, "seq-cls", run / "delta.safetensors"))


def test_old_delta_keyed_by_the_lm_head_patches_every_copy(root, tmp_path):
    """The issue's silent damage: a delta written before tied keys were one (keyed lm_head.weight, no aliases, its
    masks record pointing at the LM head's transposed MatMul copy of a folding export) used to patch that copy only
    (logits 91% off). The embedding table holding the same values is found by value and patched too."""
    import onnx

    from fps_graph.formats.delta import write_delta
    from fps_graph.graph.apply import apply_delta

    folder = root / "llama" if (root / "llama").exists() else H.make_folder(root / "llama")
    onnx_dir, run = chain(root, folder, "llama", "causal-lm", "lm.txt")
    legacy = H.export_onnx(folder, tmp_path / "legacy.onnx")        # folds: embedding table + transposed copy
    inits = {t.name: list(t.dims) for t in onnx.load(str(legacy)).graph.initializer}
    copy = next(n for n, d in inits.items() if d == [16, H.VOCAB])
    df = read_delta(run / "delta.safetensors")
    key = "model.embed_tokens.weight"
    sparse = {("lm_head.weight" if k == key else k): v for k, v in df.sparse.items()}
    tensors = {}
    for k, v in df.tensors.items():
        rec = {kk: vv for kk, vv in v.items() if kk not in ("aliases", "onnx", "layout")}
        if k == key:
            rec.update(onnx=copy, layout={"transpose": [1, 0]})
        tensors["lm_head.weight" if k == key else k] = rec
    old = tmp_path / "old_delta.safetensors"
    write_delta(old, sparse, df.full, tensors, df.head or {},
                {k: v for k, v in df.metadata.items() if k not in ("tensors", "head", "format", "base_model_prefix")})
    report = apply_delta(legacy, old, tmp_path / "t.onnx")
    assert sorted(u["initializer"] for u in report["updated"]["lm_head.weight"]) == sorted([copy, key])
    assert_exact(tmp_path / "t.onnx", tuned_model(folder, "causal-lm", run / "delta.safetensors"))


def test_readme_llm_chain_verbatim(tmp_path, monkeypatch):
    """The README's LLM lines, as written (export hf:llama/ -> select llama_onnx/ calib.txt -> train hf:llama/ ->
    apply), on a tiny tied Llama saved as llama/: the patched ONNX gives the fine-tuned model's logits."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
             for ln in block.replace("\\\n", " ").splitlines()]
    wanted = ("fps-graph export hf:llama/", "fps-graph select llama_onnx/", "fps-graph train hf:llama/",
              "fps-graph apply llama_onnx/")
    chain_lines = [next(ln for ln in lines if ln.startswith(w)) for w in wanted]
    monkeypatch.chdir(tmp_path)
    H.make_folder(tmp_path / "llama")
    Path("calib.txt").write_text("\n".join(H.cycle_text(24, seed=4)) + "\n")
    H.write_jsonl(Path("train.jsonl"), [{"text": t} for t in H.cycle_text(24, seed=5)])
    H.write_jsonl(Path("val.jsonl"), [{"text": t} for t in H.cycle_text(8, seed=6)])
    for line in chain_lines:
        args = shlex.split(line)[1:]
        if args[0] == "train":
            args += ["--epochs", "2", "--lr", "3e-2", "--threads", "1", "-q", "--no-plot"]   # fast; same path
        assert entry(args) == 0, line
    tuned = tuned_model(tmp_path / "llama", "causal-lm", Path("llm_run/delta.safetensors"))
    assert_exact(tmp_path / "llama_tuned.onnx", tuned)
