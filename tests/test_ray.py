"""`select --ray` on a local Ray (2 CPUs, started once): byte-identical to the local run, faults, resume, errors."""
from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import fps_graph.runtime.ray as fray  # noqa: E402
from fps_graph.runtime.shards import ClusterOptions  # noqa: E402
from fps_graph.selection.pipeline import SelectOptions, run_select, write_result, write_stats  # noqa: E402
from fps_graph_cli.main import entry  # noqa: E402
from ray_faults import faulty  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"          # 64 images: with batches of 8 and shards of 16, 4 shards
SHARDING = ["--batch-size", "8", "--shard-size", "16"]
# Host reduction sums many float32 values per batch in float64, so the grouping of the sums shows in their last
# bits (checked in test_grouping_shows_in_the_bytes): comparing the statistics files checks the shard order.
HOST = ["--reduce", "host", "--stats-out"]


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray for the whole session (2 CPUs, a small object store), stopped at the end."""
    ctx = ray.init(num_cpus=2, object_store_memory=80 << 20, include_dashboard=False, log_to_driver=False,
                   logging_level=logging.ERROR)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def select(tmp: Path, name: str, *args: str) -> tuple[int, Path, Path]:
    """Run `fps-graph select SAMPLE IMAGES` in this process; (exit code, masks path, stats path)."""
    out, stats = tmp / f"{name}.safetensors", tmp / f"{name}.stats.safetensors"
    code = entry(["select", str(SAMPLE), str(IMAGES), "-o", str(out), *SHARDING, *HOST, str(stats), "-q", *args])
    return code, out, stats


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> tuple[bytes, bytes]:
    """Masks and statistics bytes of the single-process run."""
    tmp = tmp_path_factory.mktemp("local")
    code, out, stats = select(tmp, "local")
    assert code == 0
    return out.read_bytes(), stats.read_bytes()


def test_grouping_shows_in_the_bytes(tmp_path, local):
    """Another shard size gives other statistics bytes here, so the comparisons below can fail."""
    code, _, stats = entry(["select", str(SAMPLE), str(IMAGES), "-o", str(tmp_path / "m.safetensors"),
                            "--batch-size", "8", "--shard-size", "64", *HOST, str(tmp_path / "s.safetensors"),
                            "-q"]), None, tmp_path / "s.safetensors"
    assert code == 0 and stats.read_bytes() != local[1]


def _run(opts: SelectOptions, tmp: Path) -> tuple[dict, bytes, bytes]:
    """run_select on the sample, written out; (Ray report, masks bytes, stats bytes)."""
    res = run_select(SAMPLE, str(IMAGES), opts, stats_out=True)
    write_result(res, tmp / "m.safetensors")
    write_stats(res.stats, tmp / "s.safetensors")
    return res.summary["cluster"], (tmp / "m.safetensors").read_bytes(), (tmp / "s.safetensors").read_bytes()


@pytest.mark.parametrize("workers,fault", [(1, None), (2, "late shard 0"), (3, "worker dies in shard 1")])
def test_byte_identical_for_any_worker_count(ray_address, tmp_path, local, monkeypatch, workers, fault):
    """1, 2 and 3 workers; with 2, shard 0 finishes last; with 3, the worker running shard 1 exits mid-shard."""
    flag = tmp_path / "crash-once"
    if fault == "late shard 0":
        monkeypatch.setattr(fray, "ShardWorker", faulty(delay={0: 2.0}))
    elif fault:
        flag.touch()
        monkeypatch.setattr(fray, "ShardWorker", faulty(crash={"shard": 1, "batch": 0, "flag": str(flag)}))
    opts = SelectOptions(k=1, batch_size=8, shard_size=16, reduce="host", cluster=ClusterOptions(workers=workers))
    report, masks, stats = _run(opts, tmp_path)
    assert masks == local[0] and stats == local[1]
    assert report["workers"] == workers and sorted(report["completion_order"]) == [0, 1, 2, 3]
    if fault == "late shard 0":
        assert report["completion_order"][0] != 0, report
    if fault == "worker dies in shard 1":
        assert not flag.exists()                     # the worker did exit after shard 1's first batch
        assert report["rerun"] == [1], report
    else:
        assert report["rerun"] == []


def _shard_files(workdir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (workdir / "calibration").glob("shard-*")}


def test_resume_after_driver_kill(ray_address, tmp_path, local):
    workdir, out = tmp_path / "work", tmp_path / "killed.safetensors"
    child = ("import sys; sys.path.insert(0, sys.argv.pop(1))\n"
             "import ray_faults; ray_faults.install(delay_each=1.0)\n"
             "from fps_graph_cli.main import entry\n"
             "sys.exit(entry(sys.argv[1:]))")
    cmd = [sys.executable, "-c", child, str(Path(__file__).parent), "select", str(SAMPLE), str(IMAGES), "-o", str(out), *SHARDING,
           *HOST, str(tmp_path / "killed.stats.safetensors"), "-q", f"--ray={ray_address}", "--workers", "1",
           "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_shard_files(workdir)) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"driver ended or stalled before saving 2 shards: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    before = _shard_files(workdir)
    assert 2 <= len(before) < 4

    code, masks, stats = select(tmp_path, "resumed", "--ray", "local", "--resume", str(workdir))
    assert code == 0
    assert masks.read_bytes() == local[0] and stats.read_bytes() == local[1]
    after = _shard_files(workdir)
    assert len(after) == 4 and all(after[name] == before[name] for name in before)   # finished shards not re-run

    # everything saved: a second resume needs no worker and gives the same bytes
    code, masks, stats = select(tmp_path, "again", "--ray", "local", "--resume", str(workdir), "--workers", "3")
    assert code == 0 and masks.read_bytes() == local[0] and stats.read_bytes() == local[1]
    assert _shard_files(workdir) == after


def test_resume_refuses_another_job(ray_address, tmp_path, capsys):
    workdir = tmp_path / "work"
    assert select(tmp_path, "a", "--ray", "local", "--workdir", str(workdir), "--max-samples", "16")[0] == 0
    capsys.readouterr()
    cases = [
        (["--ray", "local", "--resume", str(workdir), "--max-samples", "24"], "the saved shards were made with batches_sha256"),
        (["--ray", "local", "--workdir", str(workdir), "--max-samples", "16"], f"work folder {workdir} already holds shards"),
        (["--ray", "local", "--resume", str(tmp_path / "empty")], f"nothing to resume in {tmp_path / 'empty'}"),
        (["--ray", "local", "--workdir", str(workdir), "--resume", str(workdir)], "give either --workdir"),
        (["--workers", "2"], "--workers only apply with --ray"),
    ]
    for args, message in cases:
        code, out, _ = select(tmp_path, "b", *args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
        assert not out.exists()


def test_bad_shard_fails_the_job(ray_address, tmp_path):
    """In a fresh process (so Ray's own logging would show on stderr too): one line naming the file, exit 2."""
    data = tmp_path / "images"
    shutil.copytree(IMAGES, data)
    bad = sorted(data.rglob("*.png"))[40]                  # one image of shard 2 (or 3): found by a worker
    bad.write_bytes(b"not a png")
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "select", str(SAMPLE), str(data), "-o", str(out),
                        *SHARDING, f"--ray={ray_address}", "--workers", "2"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"error: cannot decode image {bad}"), p.stderr
    assert list(out.parent.iterdir()) == []


def test_static_inputs_and_arrays_on_workers(ray_address, tmp_path):
    """An .npy source read by the workers plus static inputs fed with every batch: NumPy oracle, local bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"]), helper.make_node("Add", ["xs", "shift"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6]),
                           helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
                           helper.make_tensor_value_info("shift", TensorProto.FLOAT, [6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    x = (rng.standard_normal((11, 6)) + 0.2).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "scale.npy", np.array(1.7, dtype=np.float32))
    shift = rng.standard_normal(6).astype(np.float32)
    np.save(tmp_path / "shift.npy", shift)
    static = {"scale": str(tmp_path / "scale.npy"), "shift": str(tmp_path / "shift.npy")}
    runs = {}
    for name, cluster in (("local", None), ("ray", ClusterOptions(workers=2))):
        opts = SelectOptions(k=1, batch_size=2, shard_size=4, provider="cpu", reduce="host", static=static,
                             cluster=cluster)
        runs[name] = run_select(tmp_path / "m.onnx", str(tmp_path / "x.npy"), opts).stats
    assert runs["ray"].num_samples == 11 and runs["ray"].counts["mm"] == 11
    assert np.array_equal(runs["ray"].sums["mm"]["abs"], runs["local"].sums["mm"]["abs"])
    h = x.astype(np.float64) * np.float64(np.float32(1.7)) + shift.astype(np.float64)
    np.testing.assert_allclose(runs["ray"].sums["mm"]["abs"], np.abs(h).sum(0), rtol=1e-6)


def test_without_ray_one_line(tmp_path):
    out = tmp_path / "m.safetensors"
    code = ("import sys; sys.modules['ray'] = None\n"
            "from fps_graph_cli.main import entry\n"
            "sys.exit(entry(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "select", str(SAMPLE), str(IMAGES), "-o", str(out), "--ray", "local"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr == "error: Ray is not installed: pip install 'fps-graph[ray]'\n"
    assert not out.exists()


def test_failed_start_leaves_nothing_and_the_same_command_works_after(ray_address, tmp_path, local, monkeypatch,
                                                                      capsys):
    """`--ray auto` with no cluster: one line, no job.json or .lock left in the work folder (which did not exist
    before), so the same command with a cluster up runs (it used to refuse: 'already holds shards')."""
    def no_cluster(**kw):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    workdir = tmp_path / "work"
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: False)
        m.setattr(ray, "init", no_cluster)
        code, out, _ = select(tmp_path, "a", "--ray", "auto", "--workdir", str(workdir))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot start or join Ray at auto" in err, err
    assert not out.exists() and not workdir.exists()
    # a work folder that existed (empty) stays, empty
    workdir.mkdir()
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: False)
        m.setattr(ray, "init", no_cluster)
        assert select(tmp_path, "a", "--ray", "auto", "--workdir", str(workdir))[0] == 2
    assert workdir.is_dir() and not any(workdir.rglob("*"))
    code, out, stats = select(tmp_path, "a", "--ray", "auto", "--workdir", str(workdir))   # Ray is up now
    assert code == 0 and out.read_bytes() == local[0] and stats.read_bytes() == local[1]


def test_ray_before_model_is_not_swallowed(tmp_path, capsys):
    """--ray takes a value: `--ray MODEL DATA` names the mistake instead of taking MODEL as the address."""
    out = tmp_path / "m.safetensors"
    code = entry(["select", "--ray", str(SAMPLE), str(IMAGES), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a path, not a Ray address" in err and "--ray local" in err
    assert not out.exists()
    assert entry(["select", str(SAMPLE), str(IMAGES), "-o", str(out), "--ray"]) == 2
    assert "requires an argument" in capsys.readouterr().err
