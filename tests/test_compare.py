"""The paired statistics of every quality table (fps_graph.compare.stats) against NumPy, and the report's tables
(fps_graph.compare.report) recomputed with NumPy from the run records."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fps_graph.compare.stats import format_paired, paired, paired_seeds

# ------------------------------------------------------------------------------------------ paired statistics

VALS = {("a", "K=1"): [0.50, 0.60, 0.70], ("b", "K=1"): [0.40, 0.65, 0.60],
        ("a", "4%"): [0.80, 0.80, 0.90], ("b", "4%"): [0.70, 0.80, 0.95]}
RUNS = [{"method": m, "point": p, "seed": s, "metrics": {"rpa": v}} for (m, p), vs in VALS.items()
        for s, v in enumerate(vs)]


def test_paired_pools_every_point_and_seed():
    d = 100 * (np.array(VALS[("a", "K=1")] + VALS[("a", "4%")]) - np.array(VALS[("b", "K=1")] + VALS[("b", "4%")]))
    got = paired(RUNS, "a", "b", "rpa", ["K=1", "4%"])
    assert got["n"] == 6 and got["mean_pp"] == pytest.approx(d.mean())
    assert got["sem_pp"] == pytest.approx(d.std(ddof=1) / np.sqrt(6)) and got["share_ge"] == pytest.approx(4 / 6)
    assert paired(RUNS, "a", "b", "rpa", ["K=1"])["n"] == 3 and paired(RUNS, "a", "c", "rpa", ["K=1"]) == {"n": 0}


def test_paired_seeds_averages_points_within_a_seed():
    per_seed = 100 * ((np.array(VALS[("a", "K=1")]) - VALS[("b", "K=1")])
                      + (np.array(VALS[("a", "4%")]) - VALS[("b", "4%")])) / 2
    got = paired_seeds(RUNS, "a", "b", "rpa", ["K=1", "4%"])
    assert got["n"] == 3 and got["mean_pp"] == pytest.approx(per_seed.mean())
    assert got["sem_pp"] == pytest.approx(per_seed.std(ddof=1) / np.sqrt(3))
    assert got["share_ge"] == pytest.approx(np.mean(per_seed >= 0))
    assert paired_seeds(RUNS, "a", "c", "rpa", ["K=1"]) == {"n": 0}
    one = paired_seeds(RUNS[:1] + RUNS[3:4], "a", "b", "rpa", ["K=1"])       # one seed: no standard error
    assert one["n"] == 1 and math.isnan(one["sem_pp"]) and format_paired(one) == "+10.00 (n=1)"


def test_paired_cells_are_bold_only_two_standard_errors_from_zero():
    assert format_paired({"n": 3, "mean_pp": 1.0, "sem_pp": 0.5}) == "**+1.00 ± 0.50**"
    assert format_paired({"n": 3, "mean_pp": -0.9, "sem_pp": 0.5}) == "-0.90 ± 0.50"
    assert format_paired({"n": 2, "mean_pp": 0.0, "sem_pp": 0.0}) == "+0.00 ± 0.00"
    assert format_paired({"n": 0}) == ""


# ------------------------------------------------------------------------------------------------ the report


def _records() -> list[dict]:
    """Runs of a made-up study: fps/random/lora at two budgets and two seeds (seed 0 also swept at a second rate),
    the head reference; test and validation accuracies drawn from a seeded generator."""
    rng = np.random.default_rng(0)
    recs = []

    def rec(method, budget, seed, lr, trainable):
        a, v = rng.uniform(0.5, 0.9, 2)
        return {"model": "toy", "task": "seq-cls", "method": method, "lr": lr, "seed": seed,
                "extra": {"budget": budget}, "trainable": trainable, "seconds_per_step": float(rng.uniform(1, 2)),
                "memory": {"peak_rss_mb": float(rng.uniform(400, 500))}, "diverged": False,
                "metrics": {"val": {"loss": 1.0, "acc": float(v)}, "test": {"loss": 1.0, "acc": float(a)}}}

    for m, lr in (("fps", 1e-2), ("random", 1e-2), ("lora", 1e-3)):
        recs.append(rec(m, "1%", 0, 1e-3 if lr == 1e-2 else 1e-2, 999))      # the other rate of the sweep
        for seed in (0, 1):
            for b, n in (("0.1%", 100), ("1%", 1000)):
                recs.append(rec(m, b, seed, lr, n + (3 if m == "lora" else 0)))
    for seed in (0, 1):
        recs.append(rec("head", "-", seed, 1e-2, 10))
    return recs


def test_report_tables_equal_numpy_on_the_records(tmp_path):
    from fps_graph.compare.report import RunMeta, report

    runs = _records()
    lrs = {"fps": 1e-2, "random": 1e-2, "lora": 1e-3, "head": 1e-2}
    plan = {"lrs": {"toy/seq-cls": lrs}, "budgets": [0.001, 0.01], "sweep_budget": 0.01,
            "methods": ["fps", "random", "lora", "head"]}
    doc = report(runs, tmp_path / "r", plan, header=["# toy"], meta=RunMeta(threads=1).finish())
    sec = doc["experiments"]["toy/seq-cls"]
    md = (tmp_path / "r.md").read_text()
    at = {(r["method"], r["extra"]["budget"], r["seed"]): 100 * r["metrics"]["test"]["acc"] for r in runs
          if r["lr"] == lrs[r["method"]]}
    for m in ("fps", "random", "lora"):
        for b in ("0.1%", "1%"):
            v = [at[(m, b, 0)], at[(m, b, 1)]]
            assert sec["cells"][f"{m}@{b}"]["values"] == pytest.approx(v)
        row = " | ".join(f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}" for v in
                         ([at[(m, b, 0)], at[(m, b, 1)]] for b in ("0.1%", "1%")))
        assert f"| {m} | {row} |" in md
    # paired over seeds: each seed's mean difference over the two budgets is one sample
    for m, base in (("fps", "random"), ("lora", "random"), ("lora", "fps")):
        d = np.array([np.mean([at[(m, b, s)] - at[(base, b, s)] for b in ("0.1%", "1%")]) for s in (0, 1)])
        got = sec["paired"][m][base]
        assert got["n"] == 2 and got["mean_pp"] == pytest.approx(d.mean())
        assert got["sem_pp"] == pytest.approx(d.std(ddof=1) / math.sqrt(2))
        assert format_paired(got) in md
    head = [at[("head", "-", 0)], at[("head", "-", 1)]]
    assert f"| *head* (10 trainable) | {np.mean(head):.1f} ± {np.std(head, ddof=1):.1f} |" in md
    assert "head" not in sec["paired"]
    sweep = {r["lr"]: 100 * r["metrics"]["val"]["acc"] for r in runs
             if r["method"] == "lora" and r["seed"] == 0 and r["extra"]["budget"] == "1%"}
    assert sec["sweep"]["lora"] == pytest.approx({f"{lr:g}": v for lr, v in sweep.items()})
    assert f"| lora | {sweep[1e-3]:.1f} | {sweep[1e-2]:.1f} |" in md
    assert "fps 0.01, head 0.01, lora 0.001, random 0.01" in md
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["experiments"]["toy/seq-cls"]["paired"] == sec["paired"]
    meta = back["meta"]
    assert len(meta["load_before"]) == 3 and meta["threads"]["requested"] == 1 and meta["machine"]["cpu_count"]
    assert "git" in meta and "fps_graph" in meta["versions"]


def test_a_diverged_run_scores_worst():
    from fps_graph.compare.report import score

    ok = {"metrics": {"val": {"loss": 2.0, "acc": 0.5}}}
    lm = {"metrics": {"val": {"loss": 2.0, "acc": 0.1, "ppl": math.exp(2.0)}}}
    assert score(ok, "val") == 0.5 and score(dict(ok, diverged=True), "val") == 0.0
    assert score(lm, "val") == -2.0 and score(dict(lm, diverged=True), "val") == -math.inf


# ------------------------------------------------------------------------------------------------ one run


def test_train_run_counts_and_the_untrained_reference(tmp_path):
    """train_run on a tiny Llama: LoRA's count is r * (in + out) per module plus the new head; the sparse adapter's
    the selected entries plus the head; with no adapter the validation loss is transformers' own causal-LM loss."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import hf_helpers as H
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from fps_graph.compare.runs import train_run
    from fps_graph.data.text import TextOptions
    from fps_graph.training import (DataConfig, DataContext, LoraAdapter, OptimConfig, RunConfig, SparseAdapter,
                                    get_task)
    from fps_graph.training.models import load_hf_model

    folder = H.make_folder(tmp_path / "m", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2)
    cls = H.write_jsonl(tmp_path / "cls.jsonl", H.cls_records(24, seed=0))
    lm = H.write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in H.cycle_text(12, seed=1)])
    optim, run = OptimConfig(lr=1e-2, epochs=1, batch_size=8), RunConfig(seed=0, threads=1)

    def data(task_name, path):
        task = get_task(task_name)
        cfg = DataConfig(data=str(path), text=TextOptions(max_length=16))
        d = task.read(str(path), DataContext(load_hf_model(folder, task.hf_class), cfg, folder))
        return task, d, cfg

    task, d, cfg = data("seq-cls", cls)
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 1}
    rec = train_run(folder, task, d, {"val": d}, LoraAdapter(rank=ranks, target_modules=tuple(ranks)), optim, run,
                    data_config=cfg)
    head = 3 * 32
    assert rec["selected"] == 2 * (32 + 32) + 1 * (64 + 32) and rec["trainable"] == rec["selected"] + head
    assert rec["steps"] == 3 and rec["seconds_per_step"] > 0 and 0 <= rec["metrics"]["val"]["acc"] <= 1
    idx = np.array([0, 5, 77, 1000])
    rec = train_run(folder, task, d, {"val": d}, SparseAdapter({"model.layers.1.mlp.up_proj.weight": idx}), optim,
                    run, data_config=cfg)
    assert rec["selected"] == 4 and rec["trainable"] == 4 + head and rec["diverged"] is False

    task, d, cfg = data("causal-lm", lm)
    rec = train_run(folder, task, d, {"val": d}, None, optim, run, data_config=cfg)
    assert rec["trainable"] == 0 and "steps" not in rec
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    total, count = 0.0, 0
    with torch.no_grad():
        for line in lm.read_text().splitlines():
            ids = torch.tensor([tok.encode(json.loads(line)["text"]).ids])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert rec["metrics"]["val"]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert rec["metrics"]["val"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
