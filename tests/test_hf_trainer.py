"""The Hugging Face Trainer recipe of docs/train_apply.md, run verbatim on a tiny Llama: only the deltas train,
save/reload give the trained outputs exactly, gradient checkpointing and bf16 autocast work with the
parametrization."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_helpers as H  # noqa: E402

from fps_graph.formats.masks import load_indices  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "train_apply.md"


def recipe() -> str:
    """The python block after the <!-- trainer-recipe --> marker of docs/train_apply.md."""
    text = DOCS.read_text()
    m = re.search(r"<!-- trainer-recipe -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/train_apply.md lost its trainer recipe"
    return m.group(1)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_trainer")
    folder = H.make_folder(root / "lm")
    onnx_path = H.export_onnx(folder, root / "lm.onnx")
    texts = H.cycle_text(48)
    npz = H.tokenize_npz(folder, texts[:16], root / "calib.npz")
    masks = H.select_masks(onnx_path, npz, root / "masks.safetensors", k=2)
    return {"root": root, "folder": folder, "masks": masks, "texts": texts}


def test_trainer_recipe_verbatim(lm, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, Trainer

    from fps_graph.training.sparse import load_delta

    monkeypatch.chdir(tmp_path)
    (tmp_path / "masks.safetensors").write_bytes(Path(lm["masks"]).read_bytes())
    seen: dict = {}
    orig_train = Trainer.train

    def spy(self, *a, **kw):      # keep the Trainer to look at its optimiser and logs afterwards
        seen["trainer"] = self
        return orig_train(self, *a, **kw)

    monkeypatch.setattr(Trainer, "train", spy)
    torch.manual_seed(0)
    ns = {"MODEL_DIR": str(lm["folder"]), "texts": lm["texts"][:24]}
    exec(compile(recipe(), "train_apply.md:trainer-recipe", "exec"), ns)
    trainer, model, handle = seen["trainer"], ns["model"], ns["handle"]

    # the optimiser holds exactly the deltas (a Llama has no biases, its LM head is not trained in full)
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(d.delta) for d in handle.deltas.values()} and not handle.full
    assert all(d.delta.dtype == torch.float32 for d in handle.deltas.values())
    assert trainer.args.activation_checkpointing and model.is_gradient_checkpointing and trainer.args.bf16
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r] or \
        [trainer.state.log_history[-1]["train_loss"]]
    assert np.isfinite(losses).all()

    # only selected entries moved
    base = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32).eval()
    before, after = base.state_dict(), model.state_dict()
    idx = load_indices(lm["masks"])
    idx["model.embed_tokens.weight"] = idx["lm_head.weight"]          # tied: one tensor under both names
    moved = 0
    for k, v in after.items():
        diff = np.flatnonzero((v != before[k]).reshape(-1).numpy())
        assert np.isin(diff, idx.get(k, np.empty(0, dtype=np.int64))).all(), k
        moved += diff.size
    assert moved > 0.5 * sum(v.size for v in idx.values())

    # save/reload: the saved model holds the trained weights bit for bit, and base + delta gives its logits
    # exactly (the trained model's own forward still runs under accelerate's bf16 autocast wrapper)
    reloaded = AutoModelForCausalLM.from_pretrained("out/model", dtype=torch.float32).eval()
    trained = model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 20, 21, 22, 0, 0]])
    am = (ids != 0).long()
    load_delta(base, "out/delta.safetensors")
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=am).logits,
                           reloaded(input_ids=ids, attention_mask=am).logits)


def _delta_grads(lm, mode) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from fps_graph.training.sparse import attach

    model = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32)
    idx = {k: v for k, v in load_indices(lm["masks"]).items() if k != "lm_head.weight"}   # embeddings frozen
    handle = attach(model, idx)
    if mode is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode})
    model.train()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 20, 21, 22, 0, 0]])
    am = (ids != 0).long()
    model(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100)).loss.backward()
    return {k: d.delta.grad for k, d in handle.deltas.items()}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_delta_gradients(lm, reentrant):
    plain = _delta_grads(lm, None)
    ckpt = _delta_grads(lm, reentrant)
    assert all(g is not None and g.abs().sum() > 0 for g in plain.values())
    for k in plain:
        assert ckpt[k] is not None, k
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_keeps_float32_deltas_and_only_selected_move(lm):
    from transformers import AutoModelForCausalLM

    from fps_graph.training.sparse import attach

    model = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32)
    handle = attach(model, lm["masks"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]] * 4)
    model.train()
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16          # autocast reached the Linear layers
        opt.zero_grad()
        out.loss.backward()
        assert all(d.delta.grad.dtype == torch.float32 for d in handle.deltas.values())
        opt.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0]
    idx = load_indices(lm["masks"])
    idx["model.embed_tokens.weight"] = idx["lm_head.weight"]
    for k, v in model.state_dict().items():
        diff = np.flatnonzero((v != before[k]).reshape(-1).numpy())
        assert np.isin(diff, idx.get(k, np.empty(0, dtype=np.int64))).all(), k


@pytest.mark.parametrize("exporter", ["export-hf", "legacy-folded", "dynamo"])
def test_trainer_recipe_through_apply_tied(lm, tmp_path, monkeypatch, exporter):
    """The recipe on a Llama with tied embeddings, then `apply` on the model's ONNX export: ONNX Runtime gives the
    fine-tuned model's logits (relative 1e-4). The tied matrix is keyed by the embedding's name (its alias
    recorded) and every stored copy of it is patched: the Gather table and the LM head's (transposed) copy."""
    import onnx
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    from fps_graph.formats.delta import read_delta
    from fps_graph.graph.apply import apply_delta
    from fps_graph.integrations.hf_export import export_hf

    if exporter == "export-hf":
        export_hf(lm["folder"], tmp_path / "onnx")
        onnx_path = tmp_path / "onnx" / "model.onnx"
    else:
        onnx_path = H.export_onnx(lm["folder"], tmp_path / "lm.onnx", dynamo=exporter == "dynamo")
    npz = H.tokenize_npz(lm["folder"], lm["texts"][:16], tmp_path / "calib.npz")
    H.select_masks(onnx_path, npz, tmp_path / "masks.safetensors", k=2)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns = {"MODEL_DIR": str(lm["folder"]), "texts": lm["texts"][:24]}
    exec(compile(recipe(), "train_apply.md:trainer-recipe", "exec"), ns)
    df = read_delta("out/delta.safetensors")
    assert "lm_head.weight" not in df.keys and "model.embed_tokens.weight" in df.sparse
    assert df.tensors["model.embed_tokens.weight"]["aliases"] == ["lm_head.weight"]
    report = apply_delta(onnx_path, "out/delta.safetensors", "tuned.onnx")
    emb = report["updated"]["model.embed_tokens.weight"]
    proto = onnx.load(str(onnx_path))
    stored = [t.name for t in proto.graph.initializer if sorted(t.dims) == sorted([H.VOCAB, 16])]
    assert sorted(u["initializer"] for u in emb) == sorted(stored)      # every copy of the tied matrix
    tuned = AutoModelForCausalLM.from_pretrained("out/model", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(lm["folder"]), dtype=torch.float32).eval()
    sess = ort.InferenceSession("tuned.onnx", providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for ids in (torch.tensor([[1, 5, 6, 7, 8, 9]]), torch.tensor([[1, 20, 21, 22, 23, 24, 25, 26]] * 3)):
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, np.int64)}
        got = sess.run(None, {n: feeds[n] for n in names})[0]
        with torch.no_grad():
            want = tuned(input_ids=ids).logits.numpy()
            old = base(input_ids=ids).logits.numpy()
        assert np.abs(want - old).max() / np.abs(want).max() > 1e-3       # training changed the logits
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
