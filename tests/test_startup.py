"""CLI start-up: `fps-graph --help` imports none of the heavy modules (the subcommands load when used), and each
subcommand still loads, lists its options and runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("onnx", "onnxruntime", "numpy", "torch", "transformers", "tokenizers", "safetensors", "ray", "PIL")

PROBE = """
import json, sys
from fps_graph_cli.main import entry
code = entry(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted({m.split('.')[0] for m in sys.modules})}))
"""


def probe(*args: str) -> tuple[int, set[str], str]:
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=str(ROOT))
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    return rec["code"], set(rec["modules"]), p.stdout


def test_help_imports_no_heavy_module():
    code, modules, out = probe("--help")
    assert code == 0
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    for name in ("inspect", "select", "train", "apply", "export"):     # every command listed, with its line
        assert f"  {name} " in out, name


def test_version_imports_no_heavy_module():
    code, modules, out = probe("--version")
    assert code == 0 and "fps-graph" in out
    assert not modules & set(HEAVY)


@pytest.mark.parametrize("command", ["inspect", "select", "apply"])
def test_a_command_loads_what_it_needs(command):
    code, modules, out = probe(command, "--help")
    assert code == 0 and "Usage: fps-graph " + command in out
    assert "onnx" in modules   # its own imports, at its module's top


def test_every_command_loads():
    from fps_graph_cli.main import COMMANDS, all_commands

    cmds = all_commands()
    assert list(cmds) == list(COMMANDS)
    for name, cmd in cmds.items():
        assert cmd is not None and cmd.name == name, name


def test_unknown_command_is_one_line():
    code, _, _ = probe("nosuch")
    assert code == 2
