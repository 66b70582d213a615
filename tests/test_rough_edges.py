"""The rough edges a new user hits (issue 12, section 3): each one fixed, checked here against a reference."""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fps_graph import FpsGraphError
from fps_graph.selection.floor import select_network_floor
from fps_graph.selection.ranking import Budget, select

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"


def cli(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    """The console script in a fresh process: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", *map(str, args)], capture_output=True, text=True,
                       env=env)
    return p.returncode, p.stdout, p.stderr


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], err


# --- --min-per-layer: a floor per tensor under a network-wide budget ----------------------------------------------


def _brute_floor(scores: list[np.ndarray], budget: int, minimum: int) -> list[list[int]]:
    """Exhaustive search: of all selections of `budget` entries with at least min(minimum, size) in every tensor,
    the one with the largest total score (unique for distinct scores)."""
    flat = [(float(v), i, j) for i, s in enumerate(scores) for j, v in enumerate(s.reshape(-1))]
    best, best_sum = None, -1.0
    for combo in itertools.combinations(range(len(flat)), budget):
        counts = np.bincount([flat[c][1] for c in combo], minlength=len(scores))
        if any(counts[i] < min(minimum, s.size) for i, s in enumerate(scores)):
            continue
        total = sum(flat[c][0] for c in combo)
        if total > best_sum:
            best, best_sum = combo, total
    return [sorted(flat[c][2] for c in best if flat[c][1] == i) for i in range(len(scores))]


@pytest.mark.parametrize("seed", range(6))
def test_min_per_layer_matches_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    shapes = [(2, 3), (1, 2), (3, 2)]
    # one tensor's scores far below the others': a plain network budget leaves it empty
    scores = [rng.random(s) * (1e-3 if i == 1 else 1.0) for i, s in enumerate(shapes)]
    minimum = 1 + seed % 2
    budget = 5 if minimum == 1 else 7
    got, _ = select(3, shapes, lambda i: scores[i], budget=Budget(count=budget), granularity="network",
                    min_per_layer=minimum)
    assert [g.tolist() for g in got] == _brute_floor(scores, budget, minimum)
    plain, _ = select(3, shapes, lambda i: scores[i], budget=Budget(count=budget), granularity="network")
    assert plain[1].size == 0                     # what the floor is for
    assert sum(g.size for g in got) == budget


def test_min_per_layer_ties_follow_the_network_order():
    """Equal scores everywhere: the floor takes each tensor's first positions, the rest go to earlier tensors."""
    scores = [np.ones((2, 2)), np.ones((1, 3)), np.ones((2, 1))]
    got = select_network_floor(3, [4, 3, 2], lambda i: scores[i], 6, 1)
    assert [g.tolist() for g in got] == [[0, 1, 2, 3], [0], [0]]
    got = select_network_floor(3, [4, 3, 2], lambda i: scores[i], 8, 3)   # the floor is capped at a tensor's size
    assert [g.tolist() for g in got] == [[0, 1, 2], [0, 1, 2], [0, 1]]
    with pytest.raises(FpsGraphError, match="needs 8 entries over 3 tensors, more than the budget of 6"):
        select_network_floor(3, [4, 3, 2], lambda i: scores[i], 6, 3)


def test_min_per_layer_is_for_network_budgets_only():
    with pytest.raises(FpsGraphError, match="network-wide budget only"):
        select(1, [(2, 2)], lambda i: np.ones((2, 2)), k=1, min_per_layer=1)
    with pytest.raises(FpsGraphError, match="network-wide budget only"):
        select(1, [(2, 2)], lambda i: np.ones((2, 2)), budget=Budget(count=2), granularity="layer", min_per_layer=1)


def test_network_budget_warns_and_counts_empty_tensors(tmp_path):
    from fps_graph.formats.masks import load_indices

    out = tmp_path / "m.safetensors"
    code, _, err = cli("select", SAMPLE, IMAGES, "-o", out, "--budget", "0.2%", "--granularity", "network")
    assert code == 0, err
    empty = [k for k, v in load_indices(out).items() if v.size == 0]
    assert empty, "the sample's network budget no longer leaves a tensor empty; pick a smaller budget"
    assert f"warning: {len(empty)} of 10 scored tensors got no selected entry" in err
    assert f"; {len(empty)} tensor(s) with nothing selected" in err
    floor = tmp_path / "f.safetensors"
    code, _, err = cli("select", SAMPLE, IMAGES, "-o", floor, "--budget", "0.2%", "--granularity", "network",
                       "--min-per-layer", "2")
    assert code == 0 and "nothing selected" not in err, err
    got = load_indices(floor)
    assert all(v.size >= 2 for v in got.values()) and sum(v.size for v in got.values()) == round(0.002 * 18048)


# --- --stats-in A B: never drop input -----------------------------------------------------------------------------


def test_stats_in_with_data_is_refused_and_repeated_flag_sums(tmp_path):
    from fps_graph.formats.masks import read_metadata

    a, b = tmp_path / "a.stats", tmp_path / "b.stats"
    half = tmp_path / "half"
    for cls in ("disc", "square"):
        (half / cls).mkdir(parents=True)
        for f in sorted((IMAGES / cls).iterdir()):
            (half / cls / f.name).write_bytes(f.read_bytes())
    rest = tmp_path / "rest"
    for cls in ("hstripes", "vstripes"):
        (rest / cls).mkdir(parents=True)
        for f in sorted((IMAGES / cls).iterdir()):
            (rest / cls / f.name).write_bytes(f.read_bytes())
    assert cli("select", SAMPLE, half, "-o", tmp_path / "x.safetensors", "--stats-out", a, "-q")[0] == 0
    assert cli("select", SAMPLE, rest, "-o", tmp_path / "y.safetensors", "--stats-out", b, "-q")[0] == 0
    out = tmp_path / "m.safetensors"
    code, _, err = cli("select", SAMPLE, "--stats-in", a, b, "-o", out)        # the README's old spelling
    assert code == 2 and not out.exists()
    one_error_line(err, f"DATA ({b}) and --stats-in both given", "--stats-in A --stats-in B")
    code, _, err = cli("select", SAMPLE, "--stats-in", a, "--stats-in", b, "-o", out, "-q")
    assert code == 0, err
    assert read_metadata(out)["num_samples"] == 64                           # both halves, all 64 images
