"""Friction on the language-model user's path (issue 20): patterns that match nothing, the bare `fps-graph` call,
statistics reused with --stats-in keeping their data record, tokenizers in the base install."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fps_graph.formats.masks import read_metadata
from fps_graph_cli.main import entry

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"


@pytest.mark.parametrize("flag,pattern,hint", [
    ("--exclude", "lm_head", None),                    # matches nothing, near nothing
    ("--include", "fc", "'*fc*'"),                     # a whole-name glob: '*fc*' would match
    ("--exclude", "blocks.0.fc1.weigth", "'blocks.0.fc1.weight'"),
])
def test_pattern_matching_nothing_is_an_error(tmp_path, capsys, flag, pattern, hint):
    out = tmp_path / "m.safetensors"
    assert entry(["inspect", str(SAMPLE)]) == 0
    names = capsys.readouterr().out
    if hint:
        assert hint.strip("'*") in names
    code = entry(["select", str(SAMPLE), str(IMAGES), "-o", str(out), flag, pattern, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert f"{flag} '{pattern}' matches no scored layer" in err and "whole name" in err
    if hint:
        assert f"did you mean {hint}" in err, err


def test_pattern_that_matches_still_works(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert entry(["select", str(SAMPLE), str(IMAGES), "-o", str(out), "--exclude", "*fc*", "-q"]) == 0
    assert not any("fc" in k for k in read_metadata(out)["tensors"])


def test_no_arguments_prints_usage():
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main"], capture_output=True, text=True)
    assert p.returncode == 2                  # click's convention for a group called without a command
    assert p.stderr.startswith("Usage: fps-graph [OPTIONS] COMMAND [ARGS]...")
    assert "error:" not in p.stderr and "\nCommands:\n" in p.stderr and "  select " in p.stderr


def test_stats_in_keeps_the_data_record(tmp_path, capsys):
    """Masks from --stats-in carry the data record of the run that collected the statistics (train follows it),
    and the summary says where the statistics came from instead of '... samples on none at 0.0 samples/s'."""
    stats, direct, reused = tmp_path / "s.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert entry(["select", str(SAMPLE), str(IMAGES), "-o", str(direct), "--stats-out", str(stats),
                  "--max-samples", "16"]) == 0
    capsys.readouterr()
    assert entry(["select", str(SAMPLE), "--stats-in", str(stats), "-o", str(reused)]) == 0
    err = capsys.readouterr().err
    assert "statistics of 16 samples read from --stats-in" in err
    assert "on none" not in err and "0.0 samples/s" not in err
    a, b = read_metadata(direct), read_metadata(reused)
    assert a["data"]["kind"] == "image" and b["data"] == a["data"]
    from safetensors import safe_open

    with safe_open(str(stats), framework="numpy") as f:
        assert json.loads(f.metadata()["data"]) == a["data"]


def test_tokenizers_is_a_base_dependency():
    """The README's text examples need tokenizers after `pip install .`: it is in the base dependencies."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("tokenizers") for d in deps)
