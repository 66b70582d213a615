"""Errors: one base class and a subclass per kind, causes kept, the library never exits, the CLI prints one line
(and the traceback with its causes only under --debug), and an import bug never makes a command vanish."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fps_graph
from fps_graph import DataError, FpsGraphError, ModelError, OptionError, RuntimeFailure
from fps_graph.formats.masks import load_masks
from fps_graph.graph.model import load_model
from fps_graph.selection.pipeline import SelectOptions, run_select
from fps_graph.selection.ranking import parse_budget
from fps_graph_cli.main import entry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fps_graph"
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"
KINDS = (OptionError, DataError, ModelError, RuntimeFailure)


def test_kinds_share_the_base_the_cli_catches():
    for kind in KINDS:
        assert issubclass(kind, FpsGraphError) and kind.__doc__
        assert getattr(fps_graph, kind.__name__) is kind and kind.__name__ in fps_graph.__all__
    assert len(set(KINDS)) == 4 and not any(issubclass(a, b) for a in KINDS for b in KINDS if a is not b)


def test_each_kind_is_raised_where_it_belongs(tmp_path):
    """One real failure per kind, with the cause of the underlying library kept."""
    with pytest.raises(OptionError) as info:
        parse_budget("half")
    assert isinstance(info.value.__cause__, ValueError)

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a valid ONNX model") as info:
        load_model(bad)
    assert info.value.__cause__ is not None and type(info.value.__cause__).__name__ == "DecodeError"

    masks = tmp_path / "m.safetensors"
    masks.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(DataError, match="cannot read masks file") as info:
        load_masks(masks)
    assert info.value.__cause__ is not None

    with pytest.raises(DataError, match="data path not found"):
        run_select(SAMPLE, str(tmp_path / "nothing"), SelectOptions(k=1, provider="cpu"))
    with pytest.raises(OptionError, match="needs --anchor"):
        run_select(SAMPLE, str(IMAGES), SelectOptions(k=1, score="gd-fps", provider="cpu"))


def test_onnx_runtime_failure_keeps_its_cause(tmp_path):
    """A batch ONNX Runtime refuses: RuntimeFailure, chained to ORT's own exception."""
    from fps_graph.graph.layers import find_layers
    from fps_graph.runtime.calibrate import BatchStats

    model = load_model(SAMPLE)
    layers, _ = find_layers(model)
    step = BatchStats(model, layers, provider="cpu")
    try:
        name = step.feed_names[0]
        with pytest.raises(RuntimeFailure, match="ONNX Runtime failed on a batch") as info:
            step({name: np.zeros((2, 3, 5), dtype=np.float32)})     # wrong rank
        assert type(info.value.__cause__).__module__.startswith("onnxruntime")
    finally:
        step.close()


# --- static guards over the library's source ------------------------------------------------------------------


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


# handlers that catch everything and do not re-raise: each must say why losing nothing is guaranteed
BROAD_HANDLERS_ALLOWED = {
    "plot_curves": "a training plot is optional: its failure becomes a warning in the run summary",
}


def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, str]:
    """Node -> name of the innermost function holding it (ast.walk is breadth-first: inner ones come later)."""
    owner: dict[ast.AST, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                owner[node] = fn.name
    return owner


def test_no_broad_except_hides_a_failure():
    """`except Exception` (or BaseException, or bare) in the library re-raises: a typed error `from` the caught one,
    or the same error after cleaning up. The narrow handlers name the exception types they expect."""
    found = []
    for path, tree in _sources():
        owner = _enclosing_functions(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ExceptHandler):
                continue
            names = [n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)] if node.type else ["<bare>"]
            if not {"Exception", "BaseException", "<bare>"} & set(names):
                continue
            if any(isinstance(n, ast.Raise) for stmt in node.body for n in ast.walk(stmt)):
                continue
            if owner.get(node) in BROAD_HANDLERS_ALLOWED:
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} (in {owner.get(node, 'module')})")
    assert not found, "broad except without a raise: " + ", ".join(found)


def test_causes_are_kept_and_the_library_never_exits():
    """No `raise ... from None` (it drops the cause); no sys.exit/os._exit/exit() in the library."""
    dropped, exits = [], []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None:
                dropped.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call):
                f = node.func
                name = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    else getattr(f, "id", "")
                if name in ("sys.exit", "os._exit", "exit", "quit", "os.abort"):
                    exits.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not dropped, "raise ... from None drops the cause: " + ", ".join(dropped)
    assert not exits, "the library must not exit: " + ", ".join(exits)


# --- the CLI: one line, --debug for the chain -------------------------------------------------------------------


def test_cli_one_line_and_debug_shows_the_cause(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert entry(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad} is not a valid ONNX model (cannot parse; truncated or not ONNX?)\n"

    assert entry(["--debug", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    first, rest = err.split("\n", 1)
    assert first == f"error: {bad} is not a valid ONNX model (cannot parse; truncated or not ONNX?)"
    assert "Traceback (most recent call last)" in rest and "DecodeError" in rest
    assert "The above exception was the direct cause of the following exception" in rest
    assert rest.rstrip().endswith(f"fps_graph.errors.ModelError: {bad} is not a valid ONNX model (cannot parse; "
                                  "truncated or not ONNX?)")


def test_debug_is_a_group_option_only(capsys):
    """--debug after the subcommand is the subcommand's (unknown) option: a usage error, not a silent switch."""
    assert entry(["inspect", str(SAMPLE), "--debug"]) == 2
    assert "No such option '--debug'" in capsys.readouterr().err


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def test_an_import_bug_in_a_command_surfaces():
    """A module of ours that fails to import is a bug: a traceback naming it when the command is used, never a
    command missing from --help (which lists the commands without importing them)."""
    p = _child("import sys; sys.modules['fps_graph_cli.train_cmd'] = None\n"
               "from fps_graph_cli.main import entry\n"
               "sys.exit(entry(['train', '--help']))")
    assert p.returncode == 1 and "Traceback" in p.stderr and "fps_graph_cli.train_cmd" in p.stderr, p.stderr
    assert "Usage:" not in p.stdout
    p = _child("import sys; sys.modules['fps_graph_cli.train_cmd'] = None\n"
               "from fps_graph_cli.main import entry\n"
               "sys.exit(entry(['--help']))")
    assert p.returncode == 0 and "  train " in p.stdout, p.stderr


def test_without_torch_train_is_listed_and_says_what_to_install():
    p = _child("import sys; sys.modules['torch'] = None\n"
               "from fps_graph_cli.main import entry\n"
               "sys.exit(entry(['--help']))")
    assert p.returncode == 0, p.stderr
    listed = {line.split()[0] for line in p.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == {"apply", "compare", "export", "inspect", "select", "train"}
