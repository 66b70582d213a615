"""`fps-graph compare` on a tiny Llama made in code (seq-cls and causal-lm): selections of equal counts, LoRA's
count matched (checked against PEFT's own count and an independent one from the module shapes), learning rates
chosen on validation, the tables' numbers recomputed with NumPy from the runs' own records, the untrained
reference against transformers' own loss, bad input refused in one line with nothing left behind, and each flag's
effect. The shared pieces: the paired statistics (fps_graph.compare.stats) against NumPy, the report's tables
(fps_graph.compare.report) recomputed from made-up records, one run (fps_graph.compare.runs) against PEFT's count
and transformers' loss."""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

import hf_helpers as H  # noqa: E402

from fps_graph.compare.stats import format_paired, paired, paired_seeds  # noqa: E402
from fps_graph.formats.masks import load_indices, read_metadata  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTER = 32, 64
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = entry(["compare", *args])
    return code, err.getvalue()


def _runs(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    folder = H.make_folder(root / "m", kind="causal-lm", hidden_size=HIDDEN, intermediate_size=INTER,
                           num_attention_heads=4, num_key_value_heads=2)

    def cls(n, seed):     # other field names than the defaults: --text-field q --label-field y
        return [{"q": r["text"], "y": r["label"]} for r in H.cls_records(n, seed=seed)]

    a = {"root": root, "folder": folder,
         "train": H.write_jsonl(root / "train.jsonl", cls(48, 0)), "val": H.write_jsonl(root / "val.jsonl", cls(24, 1)),
         "test": H.write_jsonl(root / "test.jsonl", cls(24, 2)),
         "lm_train": H.write_jsonl(root / "lm_train.jsonl", [{"text": t} for t in H.cycle_text(40, seed=0)]),
         "lm_val": H.write_jsonl(root / "lm_val.jsonl", [{"text": t} for t in H.cycle_text(16, seed=1)])}
    return a


@pytest.fixture(scope="module")
def cls_run(assets):
    out = assets["root"] / "cls_out"
    code, err = _cli([f"hf:{assets['folder']}", "--train", str(assets["train"]), "--val", str(assets["val"]),
                      "--test", str(assets["test"]), "--task", "seq-cls", "--methods", "fps,random,lora,head",
                      "--budget", "10%", "--lrs", "1e-3,3e-2", "--seeds", "2", "--epochs", "1", "--batch-size", "8",
                      "--max-length", "16", "--text-field", "q", "--label-field", "y", "--threads", "1",
                      "-o", str(out)])
    assert code == 0, err
    return {"out": out, "err": err, "runs": _runs(out), "doc": json.loads((out / "compare.json").read_text())}


@pytest.fixture(scope="module")
def lm_run(assets):
    out = assets["root"] / "lm_out"
    code, err = _cli([f"hf:{assets['folder']}", "--train", str(assets["lm_train"]), "--val", str(assets["lm_val"]),
                      "--task", "causal-lm", "--budget", "5%,20%", "--lrs", "1e-3,1e-2", "--seeds", "1",
                      "--epochs", "1", "--batch-size", "16", "--max-samples", "24", "--quiet", "-o", str(out)])
    assert code == 0, err
    return {"out": out, "err": err, "runs": _runs(out), "doc": json.loads((out / "compare.json").read_text())}


def _shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """[out, in] of every block Linear, read from the PyTorch model (independent of the masks' header)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder))
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


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


# --------------------------------------------------------------------------------------------- counts, LoRA


def test_selections_have_equal_counts_and_lora_matches_them(assets, cls_run):
    out, runs = cls_run["out"], cls_run["runs"]
    fps = load_indices(out / "masks" / "fps_10%_s0.safetensors")
    rnd = [load_indices(out / "masks" / f"random_10%_s{s}.safetensors") for s in (0, 1)]
    shapes = _shapes(assets["folder"])
    keys = {f"layers.{i}.{m}.weight" for i in range(2) for m in LINEARS}
    assert set(fps) == keys                          # the blocks' Linears only: no LM head, no embedding
    counts = {k: len(v) for k, v in fps.items()}
    sizes = {k: int(np.prod(shapes[k[:-len(".weight")]])) for k in counts}
    assert sum(counts.values()) == round(0.1 * sum(sizes.values()))   # --budget 10%, shared out by layer size
    assert all(abs(n - 0.1 * sizes[k]) < 1 for k, n in counts.items())
    assert all({k: len(v) for k, v in r.items()} == counts for r in rnd)
    assert not np.array_equal(rnd[0]["layers.0.self_attn.q_proj.weight"], rnd[1]["layers.0.self_attn.q_proj.weight"])
    head = 3 * HIDDEN                                # the new seq-cls head: 3 classes, no bias; trains in full
    by = {m: {r["trainable"] for r in runs if r["method"] == m} for m in ("fps", "random", "lora", "head")}
    assert by["fps"] == by["random"] == {sum(counts.values()) + head} and by["head"] == {head}
    # LoRA: PEFT's own count (the trainable values fit reports) against r * (in + out) from the module shapes
    expect = 0
    for k, n in counts.items():
        out_f, in_f = shapes[k[:-len(".weight")]]
        expect += max(1, round(n / (in_f + out_f))) * (in_f + out_f)
    lora = [r for r in runs if r["method"] == "lora"]
    assert {r["selected"] for r in lora} == {expect} and {r["trainable"] for r in lora} == {expect + head}
    slack = sum((o + i) / 2 for o, i in (shapes[k[:-len(".weight")]] for k in counts))
    assert abs(expect - sum(counts.values())) <= slack          # within LoRA's rounding
    assert lora[0]["lora"]["lora_total"] == expect and lora[0]["lora"]["sparse_total"] == sum(counts.values())


def test_fps_masks_are_what_select_writes(assets, cls_run, tmp_path):
    """The run's masks come from the public select path: the same file as `fps-graph select` on the export."""
    out = cls_run["out"]
    own = tmp_path / "fps.safetensors"
    assert entry(["select", str(out / "onnx"), str(assets["train"]), "--score", "fps", "--budget", "10%",
                  "--granularity", "layer", "--text-field", "q", "--max-length", "16", "-o", str(own), "-q"]) == 0
    a, b = load_indices(own), load_indices(out / "masks" / "fps_10%_s0.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert read_metadata(out / "masks" / "fps_10%_s0.safetensors")["data"]["max_length"] == 16


# ------------------------------------------------------------------------------------ sweep, seeds, tables


def _best(runs: list[dict], method: str) -> float:
    sweep = {r["lr"]: r["metrics"]["val"]["acc"] for r in runs if r["method"] == method and r["seed"] == 0}
    return max(sweep, key=lambda lr: (sweep[lr], -lr))


def test_learning_rates_are_chosen_on_validation_then_seeds_run_there(cls_run):
    runs, doc = cls_run["runs"], cls_run["doc"]
    chosen = doc["plan"]["lrs"]["m/seq-cls"]
    assert len(runs) == 4 * 2 + 4                    # sweep: 4 methods x 2 rates; then seed 1 at the chosen rate
    for m in ("fps", "random", "lora", "head"):
        assert {r["lr"] for r in runs if r["method"] == m and r["seed"] == 0} == {1e-3, 3e-2}
        assert chosen[m] == _best(runs, m)
        assert [r["lr"] for r in runs if r["method"] == m and r["seed"] == 1] == [chosen[m]]
    assert all(r["extra"]["budget"] == ("-" if r["method"] == "head" else "10%") for r in runs)


def test_tables_hold_the_runs_own_numbers(cls_run):
    runs, doc, out = cls_run["runs"], cls_run["doc"], cls_run["out"]
    sec = doc["experiments"]["m/seq-cls"]
    chosen = sec["lrs"]
    assert sec["split"] == "test"                    # --test given: reported on test
    at = {(r["method"], r["seed"]): r for r in runs if r["lr"] == chosen[r["method"]]}
    acc = {k: 100 * r["metrics"]["test"]["acc"] for k, r in at.items()}
    md = (out / "compare.md").read_text()
    for m in ("fps", "random", "lora"):
        v = [acc[(m, 0)], acc[(m, 1)]]
        assert sec["cells"][f"{m}@10%"]["values"] == pytest.approx(v)
        assert f"| {m} | {np.mean(v):.1f} ± {np.std(v, ddof=1):.1f} |" in md
    assert sec["cells"]["head"]["values"] == pytest.approx([acc[("head", 0)], acc[("head", 1)]])
    for m, base in (("fps", "random"), ("lora", "random"), ("lora", "fps")):
        d = np.array([acc[(m, s)] - acc[(base, s)] for s in (0, 1)])
        got = sec["paired"][m][base]
        assert got["n"] == 2 and got["mean_pp"] == pytest.approx(d.mean())
        assert got["sem_pp"] == pytest.approx(d.std(ddof=1) / math.sqrt(2))
    assert f"| fps | {format_paired(sec['paired']['fps']['random'])} |" in md
    sweep = {(r["method"], r["lr"]): 100 * r["metrics"]["val"]["acc"] for r in runs if r["seed"] == 0}
    assert sec["sweep"]["lora"] == pytest.approx({"0.001": sweep[("lora", 1e-3)], "0.03": sweep[("lora", 3e-2)]})
    assert f"| random | {sweep[('random', 1e-3)]:.1f} | {sweep[('random', 3e-2)]:.1f} |" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["seconds_per_step"] > 0 and r["memory"]["peak_rss_mb"] > 0 for r in runs)


def test_results_record_commit_machine_load_and_threads(cls_run):
    meta = cls_run["doc"]["meta"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert meta["git"]["commit"] == head
    assert len(meta["load_before"]) == 3 and len(meta["load_after"]) == 3
    assert meta["threads"]["requested"] == 1 and meta["machine"]["cpu_count"] >= 1
    assert meta["versions"]["torch"] == torch.__version__ and "peft" in meta["versions"]
    assert all(r["machine"]["torch_threads"] == 1 for r in cls_run["runs"])        # --threads


def test_causal_lm_reports_perplexity_on_validation(assets, lm_run):
    runs, doc = lm_run["runs"], lm_run["doc"]
    sec = doc["experiments"]["m/causal-lm"]
    assert sec["split"] == "val" and all("ppl" in r["metrics"]["val"] for r in runs)   # no --test
    assert doc["plan"]["budgets"] == [0.05, 0.2] and doc["plan"]["sweep_budget"] == 0.2   # the middle budget
    sweep = [r for r in runs if r["extra"]["budget"] == "20%"]
    assert {(r["method"], r["lr"]) for r in sweep} == {(m, lr) for m in ("fps", "random", "lora")
                                                        for lr in (1e-3, 1e-2)}
    chosen = sec["lrs"]
    for m in ("fps", "random", "lora"):            # lowest validation loss per token
        cand = {r["lr"]: r["metrics"]["val"]["loss"] for r in sweep if r["method"] == m}
        assert chosen[m] == min(cand, key=lambda lr: (cand[lr], lr))
        small = [r for r in runs if r["method"] == m and r["extra"]["budget"] == "5%"]
        assert [r["lr"] for r in small] == [chosen[m]]
        assert sec["cells"][f"{m}@5%"]["values"] == pytest.approx([small[0]["metrics"]["val"]["ppl"]])
    none = [r for r in runs if r["method"] == "none"]       # --methods head on causal-lm: the untrained model
    assert len(none) == 1 and none[0]["trainable"] == 0 and none[0]["lr"] is None
    assert sec["cells"]["none"]["values"] == pytest.approx([none[0]["metrics"]["val"]["ppl"]])
    assert "none" not in sec["paired"]


def test_untrained_reference_equals_transformers_loss(assets, lm_run):
    """The 'none' run's validation loss per token is transformers' own causal-LM loss over the same texts."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(assets["folder"])).eval()
    tok = Tokenizer.from_file(str(assets["folder"] / "tokenizer.json"))
    total, count = 0.0, 0
    with torch.no_grad():
        for line in assets["lm_val"].read_text().splitlines():
            ids = torch.tensor([tok.encode(json.loads(line)["text"]).ids])
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    none = next(r for r in lm_run["runs"] if r["method"] == "none")
    assert none["metrics"]["val"]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert none["metrics"]["val"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


# ------------------------------------------------------------------------------------------------- flags


def test_epochs_batch_size_and_max_samples_set_the_steps(cls_run, lm_run):
    assert {r["steps"] for r in cls_run["runs"] if r.get("steps")} == {math.ceil(48 / 8)}   # 1 epoch, batch 8
    assert {r["steps"] for r in lm_run["runs"] if r.get("steps")} == {math.ceil(24 / 16)}   # 24 of 40 samples
    stats = read_metadata(lm_run["out"] / "masks" / "fps_5%_s0.safetensors")
    assert stats["num_samples"] in (24, "24")        # --max-samples: calibration too


def test_quiet_prints_only_the_summary(cls_run, lm_run):
    assert "learning-rate sweep" in cls_run["err"] and "fps lr 0.001 seed 0 budget 10%: " in cls_run["err"]
    assert "learning-rate sweep" not in lm_run["err"] and "seed 0" not in lm_run["err"]
    for err in (cls_run["err"], lm_run["err"]):
        assert "random: lr" in err and "wrote " in err


def test_force_replaces_a_run_folder(assets, cls_run, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = [f"hf:{assets['folder']}", "--train", str(assets["lm_train"]), "--val", str(assets["lm_val"]),
            "--task", "causal-lm", "--methods", "random", "--lrs", "1e-2", "--seeds", "1", "--epochs", "1",
            "-q", "-o", str(out)]
    code, err = _cli(args)
    assert code == 2 and "--force" in err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code, err = _cli(args + ["--force"])
    assert code == 0, err
    assert [r["method"] for r in _runs(out)] == ["random"] and (out / "compare.md").is_file()


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["no-train", "no-val", "no-model", "text-field", "label-field", "budget-zero",
                                  "budget-full", "budget-count", "lrs", "no-random", "unknown-method", "seeds",
                                  "too-long", "unseen-label", "task"])
def test_bad_input_is_one_line_and_leaves_nothing(assets, tmp_path, case):
    out = tmp_path / "out"
    a = {"model": f"hf:{assets['folder']}", "--train": str(assets["train"]), "--val": str(assets["val"]),
         "--text-field": "q", "--label-field": "y", "--task": "seq-cls"}
    want = {"no-train": "--train", "no-val": "--val", "no-model": "not found", "text-field": "--text-field",
            "label-field": "--label-field", "budget-zero": "--budget", "budget-full": "--budget",
            "budget-count": "--budget", "lrs": "--lrs", "no-random": "random", "unknown-method": "--methods",
            "seeds": "--seeds", "too-long": "max_length 4", "unseen-label": "outside", "task": "--task"}[case]
    extra: list[str] = []
    if case == "no-train":
        a["--train"] = str(tmp_path / "missing.jsonl")
    elif case == "no-val":
        a["--val"] = str(tmp_path / "missing.jsonl")
    elif case == "no-model":
        a["model"] = f"hf:{tmp_path / 'nothing'}"
    elif case == "text-field":
        a["--text-field"] = "text"
    elif case == "label-field":
        a["--label-field"] = "label"
    elif case == "budget-zero":
        extra = ["--budget", "0%"]
    elif case == "budget-full":
        extra = ["--budget", "100%"]
    elif case == "budget-count":
        extra = ["--budget", "1000"]
    elif case == "lrs":
        extra = ["--lrs", "1e-3,fast"]
    elif case == "no-random":
        extra = ["--methods", "fps,lora"]
    elif case == "unknown-method":
        extra = ["--methods", "fps,random,bogus"]
    elif case == "seeds":
        extra = ["--seeds", "0"]
    elif case == "too-long":
        extra = ["--max-length", "4"]
    elif case == "unseen-label":
        bad = tmp_path / "val.jsonl"
        bad.write_text(json.dumps({"q": "w1 w2", "y": 7}) + "\n")
        a["--val"] = str(bad)
    elif case == "task":
        a["--task"] = "image-cls"
    args = [a.pop("model")] + [x for kv in a.items() for x in kv] + extra + ["-o", str(out)]
    code, err = _cli(args)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], err
    assert "Traceback" not in err and not out.exists()
