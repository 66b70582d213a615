"""The LM study's one training run (bench/quality_lm/harness.run) on a tiny Llama made in code: ``splits`` says which
of validation and test are scored, and the scores are the product's own evaluation of the same trained model."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_helpers as H  # noqa: E402

from bench.quality_lm.harness import Spec, Task, run  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlm")
    folder = H.make_folder(root / "m", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2)
    files = {s: H.write_jsonl(root / f"{s}.jsonl", [{"text": t} for t in H.cycle_text(8, seed=i)])
             for i, s in enumerate(("train", "val", "test"))}
    task = Task("tiny", "causal-lm", str(files["train"]), str(files["val"]), str(files["test"]), max_length=16,
                epochs=1, batch_size=4)
    return folder, task


def test_splits_choose_what_is_scored(tiny):
    folder, task = tiny
    spec = Spec("none", "none", lr=0.0)
    both = run(folder, task, spec, threads=1)["metrics"]
    assert set(both) == {"val", "test"}
    only = run(folder, task, spec, threads=1, splits=("test",))["metrics"]
    assert set(only) == {"test"} and only["test"]["loss"] == pytest.approx(both["test"]["loss"], rel=1e-6)
    assert both["val"]["loss"] != pytest.approx(both["test"]["loss"], rel=1e-3)     # other texts, other loss
    assert not run(folder, task, Spec("full", "full", lr=1e-3), threads=1, splits=()).get("metrics")
    with pytest.raises(ValueError, match="unknown splits"):
        run(folder, task, spec, splits=("train",))
