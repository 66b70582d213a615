"""The wheel holds every subpackage: pyproject.toml lists packages by hand (the CLI folder is renamed to
fps_graph_cli), so a new folder missing from that list installs fine in editable mode and breaks `pip install .`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def _config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _on_disk() -> set[str]:
    found = set()
    for init in (ROOT / "fps_graph").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for init in (ROOT / "cli").rglob("__init__.py"):
        found.add(".".join(("fps_graph_cli", *init.parent.relative_to(ROOT / "cli").parts)))
    return found


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(_config()["packages"])
    missing = sorted(_on_disk() - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml (else `pip install .` lacks them)"


def test_every_listed_package_exists():
    cfg = _config()
    dirs = {name: Path(path) for name, path in cfg["package-dir"].items()}
    for pkg in cfg["packages"]:
        top, *rest = pkg.split(".")
        assert (ROOT / dirs.get(top, Path(top)) / Path(*rest) / "__init__.py").is_file(), pkg


def test_every_extra_the_docs_install_exists():
    """`pip install 'fps-graph[X]'` in README, docs and messages names an extra pyproject defines (pip only warns about
    an unknown extra and installs without it)."""
    import re

    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = set(tomllib.load(f)["project"]["optional-dependencies"])
    named = set()
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "fps_graph").rglob("*.py"),
                 *(ROOT / "cli").rglob("*.py")]:
        for group in re.findall(r"fps-graph\[([a-z0-9_,-]+)\]", path.read_text()):
            named.update(group.split(","))
    assert named and "compare" in named
    assert named <= extras, f"extras named but not defined in pyproject.toml: {sorted(named - extras)}"
