"""bench/meta.py: the record every results JSON keeps (commit, dirty flag, machine, versions, load at start and end,
threads, time), and every benchmark that writes a results file records it."""
from __future__ import annotations

import ast
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.meta import RunMeta, git_commit, load_now, machine, run_meta  # noqa: E402


def test_block_records_code_machine_load_threads_and_time(monkeypatch):
    loads = iter([(1.5, 1.0, 0.5), (3.0, 2.0, 1.0)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    meta = RunMeta(threads=2, command="python -m bench.x", model="tiny")
    block = meta.finish()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert block["git"]["commit"] == head and head.startswith(block["git"]["short"])
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "fps_graph", "cli", "bench"],
                           capture_output=True, text=True, cwd=ROOT).stdout
    assert block["git"]["dirty"] == bool(dirty.strip())
    assert block["load_start"] == [1.5, 1.0, 0.5] and block["load_end"] == [3.0, 2.0, 1.0]
    cores = len(os.sched_getaffinity(0))
    assert block["under_load"] == (3.0 > 0.5 * cores)
    assert block["threads"] == 2 and block["command"] == "python -m bench.x" and block["extra"] == {"model": "tiny"}
    assert block["machine"]["cores"] == os.cpu_count() and block["machine"]["python"]
    assert block["versions"]["numpy"] and block["seconds"] >= 0
    assert dt.datetime.fromisoformat(block["created"]) <= dt.datetime.fromisoformat(block["finished"])
    monkeypatch.undo()
    assert set(run_meta(1)) <= set(block)                 # the two spellings record the same fields


def test_dirty_lists_the_changed_files(tmp_path, monkeypatch):
    """In a scratch repository: a changed tracked file under the code paths makes the record dirty, naming it."""
    import bench.meta as bm

    (tmp_path / "fps_graph").mkdir()
    (tmp_path / "fps_graph" / "x.py").write_text("a = 1\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    monkeypatch.setattr(bm, "ROOT", tmp_path)
    assert git_commit()["dirty"] is False
    (tmp_path / "fps_graph" / "x.py").write_text("a = 2\n")
    state = git_commit()
    assert state["dirty"] is True and [f.split()[-1] for f in state["dirty_files"]] == ["fps_graph/x.py"]


def test_helpers_answer_on_this_machine():
    assert len(load_now()) == 3 and machine()["cores"] >= 1


# writers being moved onto bench/meta.py by their owners; the test fails once one uses it (then delete its line)
PENDING: dict[str, str] = {}
# writers that keep the record through a helper of theirs: the helper's name, which must be called
THROUGH: dict[str, str] = {}


def test_every_benchmark_writing_results_records_the_block():
    """Each bench script that writes a JSON file records RunMeta(...).finish() (quality writes through write_json)."""
    writers = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        writes_json = "json.dumps" in text and ".json" in text and "write_text" in text
        if not writes_json or path.name in ("meta.py", "models.py", "worker.py", "report.py"):
            continue       # models: a cache file; worker: one run's record for its parent; report: re-renders
        writers.append(path.relative_to(ROOT).as_posix())
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        uses_meta = ("RunMeta" in names and "finish" in calls) or "run_meta" in names or "write_json" in names
        rel = path.relative_to(ROOT).as_posix()
        if rel in THROUGH:
            uses_meta = any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == THROUGH[rel] for n in ast.walk(tree))
        if rel in PENDING:
            assert not uses_meta, f"{rel} uses bench.meta now: remove it from PENDING"
            continue
        assert uses_meta, f"{rel} writes results without bench.meta"
    assert "bench/selection.py" in writers and "bench/llm.py" in writers and len(writers) >= 7


def test_every_results_file_names_its_commit():
    """Every results JSON in bench/results records the git commit it ran at (bench/meta.py's block, or a writer's own
    git_commit), or, for files written before that existed, a provenance block naming the commit that holds them."""
    import json

    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        text = json.dumps(doc)
        prov = doc.get("provenance") or {}
        assert '"commit"' in text or '"git_commit": "' in text or len(prov.get("committed_in") or "") == 40, \
            f"{path.name}: no git commit recorded"
