"""The score registry: each --score is one function in one file with declared properties; the pipeline and the CLI
read those properties (never the score's name), and a score registered from outside runs end to end."""
from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import numpy as np
import pytest

import fps_graph.selection.scores as scores_pkg
from fps_graph import OptionError
from fps_graph.selection.pipeline import SelectOptions, run_select
from fps_graph.selection.scores import SCORES, _registry, get_score, register, registered, score_names
from fps_graph_cli.select_cmd import select as select_cmd

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"

# name: (stat, own_stat, anchor, sample, cover, seeded)
EXPECTED = {
    "fps": ("mean-abs", False, False, False, False, False),
    "wanda": ("l2", True, False, False, False, False),
    "magnitude": (None, False, False, False, False, False),
    "random": (None, False, False, False, False, True),
    "gd-fps": ("mean-abs", False, True, False, False, False),
    "fps-cover": ("mean-abs", False, False, False, True, False),
    "fps-sample": ("mean-abs", False, False, True, False, True),
    "act-sample": ("l2", False, False, True, False, True),
    "gd-diff": ("mean-abs", False, True, False, False, False),
}


def test_registered_scores_and_their_properties():
    assert SCORES == score_names() == tuple(EXPECTED)        # the CLI's order: fps first, variants last
    for s in registered():
        assert (s.stat, s.own_stat, s.anchor, s.sample, s.cover, s.seeded) == EXPECTED[s.name], s.name
        assert s.needs_stats == (s.stat is not None) and s.help


def test_one_score_per_file():
    """Every public module of selection/scores/ registers exactly one score, defined in that module."""
    files = [m.name for m in pkgutil.iter_modules(scores_pkg.__path__) if not m.name.startswith("_")]
    owners = {s.fn.__module__.rsplit(".", 1)[1]: s.name for s in registered()}
    assert sorted(owners) == sorted(files) and len(owners) == len(registered())
    for module, name in owners.items():
        assert module == name.replace("-", "_")


def test_no_score_names_outside_the_registry():
    """The library reads a score's properties, never its name: no registered name (but the default, fps) appears
    as a string literal outside selection/scores/, and nothing tests a name's suffix."""
    names = set(SCORES) - {"fps"}
    # fps-graph compare's methods are scores by name: random is its baseline by definition (the strong baseline it
    # exists to compare against), magnitude the statistics-free selection LoRA's counts are read from
    allowed = {"compare": {"random", "magnitude"}}
    found = []
    for path in (ROOT / "fps_graph").rglob("*.py"):
        if "scores" in path.relative_to(ROOT / "fps_graph").parts[:2]:
            continue
        ok = allowed.get(path.relative_to(ROOT / "fps_graph").parts[0], set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value in names - ok or node.value in ("-sample", "-cover", "gd-")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_cli_choices_and_help_come_from_the_registry():
    opt = next(p for p in select_cmd.params if p.name == "score")
    assert tuple(opt.type.choices) == SCORES
    for s in registered():
        assert f"{s.name}: {s.help}" in opt.help
    seed = next(p for p in select_cmd.params if p.name == "seed")
    assert "random, fps-sample, act-sample" in seed.help
    anchor = next(p for p in select_cmd.params if p.name == "anchor")
    assert anchor.help.startswith("gd-fps, gd-diff:")


def test_unknown_score_lists_the_registry():
    with pytest.raises(OptionError, match=r"unknown --score 'fsp' \(use fps, wanda, magnitude, random, gd-fps"):
        get_score("fsp")
    with pytest.raises(OptionError, match="unknown --score"):
        run_select(SAMPLE, str(IMAGES), SelectOptions(score="fsp", k=1, provider="cpu"))


def test_register_refuses_what_it_cannot_honour(monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    with pytest.raises(OptionError, match="unknown statistic"):
        register("x", stat="median", help="?")
    with pytest.raises(OptionError, match="needs a stat"):
        register("x", anchor=True, help="?")
    with pytest.raises(OptionError, match="registered twice"):
        register("fps", stat="mean-abs", help="another fps")(lambda ctx: ctx.weight_times(None))


@pytest.fixture
def squared(monkeypatch):
    """A score added from outside: |W|^2 * E|x|, and a sampled twin of it (registry restored afterwards)."""
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    register("sq-fps", stat="mean-abs", help="|W|^2 * E|x|")(lambda ctx: ctx.abs_weight() ** 2 * ctx.act())
    register("sq-sample", stat="mean-abs", sample=True, help="drawn by |W|^2 * E|x|")(
        lambda ctx: ctx.abs_weight() ** 2 * ctx.act())


def test_a_new_score_runs_end_to_end(squared):
    """The new score selects the top-K of |W|^2 * E|x| per neuron (reference: NumPy on the canonical weight and the
    pooled statistic, ties to the lower column as in the library's ranking)."""
    from fps_graph.graph.plan import make_plan
    from fps_graph.selection.positions import canonical_to_key
    from fps_graph.selection.scores import ScoreContext, pooled_mean

    opts = dict(k=3, batch_size=16, max_samples=32, provider="cpu", seed=4)
    new = run_select(SAMPLE, str(IMAGES), SelectOptions(score="sq-fps", **opts), stats_out=True)
    assert new.metadata["score"] == "sq-fps" and new.metadata["stat"] == "mean-abs"
    plan = make_plan(SAMPLE)
    for group in plan.groups:
        info = plan.names[group.weight]
        w = ScoreContext(get_score("sq-fps"), group, plan.model, None, None, None, 0, 0.0).canonical_weight()
        ref = np.abs(w.astype(np.float64)) ** 2 * pooled_mean(group, new.stats, "mean-abs")
        top = np.sort(np.argsort(-ref, axis=1, kind="stable")[:, :3], axis=1)
        want = (top + np.arange(ref.shape[0])[:, None] * ref.shape[1]).reshape(-1)
        assert np.array_equal(new.indices[info.key], canonical_to_key(group.primary, want, info.perm)), info.key

    # a sampled score is seeded: same seed, same draw; another seed, another draw
    a = run_select(SAMPLE, str(IMAGES), SelectOptions(score="sq-sample", **opts))
    b = run_select(SAMPLE, str(IMAGES), SelectOptions(score="sq-sample", **opts))
    c = run_select(SAMPLE, str(IMAGES), SelectOptions(score="sq-sample", **{**opts, "seed": 5}))
    assert all(np.array_equal(a.indices[k], b.indices[k]) for k in a.indices)
    assert any(not np.array_equal(a.indices[k], c.indices[k]) for k in a.indices)
