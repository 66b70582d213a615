"""RuntimeConfig: one frozen, validated config for the ONNX Runtime knobs, handed whole down to the sessions; the
statistics type below runtime/ and selection/; the old spellings keep working with a DeprecationWarning."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest

from fps_graph import OptionError
from fps_graph.data.sources import ImageOptions, Loader, open_source
from fps_graph.formats.stats import Stats
from fps_graph.graph.plan import make_plan
from fps_graph.runtime.calibrate import BatchStats, collect_stats
from fps_graph.runtime.config import OPT_LEVELS, PROVIDERS, REDUCE_MODES, RuntimeConfig
from fps_graph.selection.pipeline import SelectOptions, spec_list

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"


def test_defaults_modes_and_help():
    rc = RuntimeConfig()
    assert (rc.reduce, rc.provider, rc.opt_level, rc.threads, rc.micro_batch, rc.max_memory_mb) == \
        ("graph", "auto", "all", None, None, None)
    assert REDUCE_MODES == ("graph", "host") and PROVIDERS == ("auto", "cuda", "cpu")
    assert OPT_LEVELS == ("disable", "basic", "extended", "all")
    for f in dataclasses.fields(RuntimeConfig):
        assert RuntimeConfig.help(f.name) == f.metadata["help"] and len(f.metadata["help"]) > 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        rc.provider = "cpu"                                    # type: ignore[misc]
    assert RuntimeConfig(threads=0).threads is None          # 0: ONNX Runtime's default, as in ORT
    assert rc.replace(provider="cpu") == RuntimeConfig(provider="cpu") and rc.provider == "auto"
    assert RuntimeConfig(max_memory_mb=600).to_json()["max_memory_mb"] == 600


@pytest.mark.parametrize("kwargs,message", [
    ({"reduce": "device"}, "unknown reduce mode 'device' (use graph or host)"),
    ({"provider": "tpu"}, "unknown provider 'tpu' (use auto, cuda, cpu)"),
    ({"opt_level": "max"}, "unknown optimisation level 'max'"),
    ({"threads": -1}, "threads must be a non-negative integer"),
    ({"threads": 1.5}, "threads must be a non-negative integer"),
    ({"micro_batch": 0}, "micro-batch must be a positive number of samples"),
    ({"max_memory_mb": float("nan")}, "--max-memory must be a positive number"),
    ({"micro_batch": 4, "max_memory_mb": 600}, "give a micro-batch size or a memory budget, not both"),
])
def test_validated_once_at_construction(kwargs, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RuntimeConfig(**kwargs)


def test_select_options_hold_one_runtime_config():
    assert SelectOptions(provider="cpu", reduce="host").runtime == RuntimeConfig(provider="cpu", reduce="host")
    rc = RuntimeConfig(provider="cpu", threads=2)
    opts = SelectOptions(runtime=rc)
    assert opts.runtime is rc and not hasattr(opts, "provider")
    with pytest.raises(OptionError, match="not both"):
        SelectOptions(runtime=rc, reduce="host")
    with pytest.raises(OptionError, match="unknown provider"):
        SelectOptions(provider="gpu")


def _batches():
    plan = make_plan(SAMPLE)
    source = open_source(str(IMAGES), spec_list(plan.model), ImageOptions())
    return plan, list(Loader(source, batch_size=16, max_samples=32))


def test_loose_knobs_still_work_with_a_warning():
    """collect_stats(reduce=...) and BatchStats(provider=...): the same sums as runtime=..., plus a warning."""
    plan, batches = _batches()
    rc = RuntimeConfig(reduce="host", provider="cpu")
    new, _ = collect_stats(plan.model, plan.layers, batches, kinds=("abs", "sq"), runtime=rc)
    with pytest.warns(DeprecationWarning, match=r"collect_stats\(\.\.\., reduce=\.\.\., provider=\.\.\.\) is deprecated"):
        old, _ = collect_stats(plan.model, plan.layers, batches, kinds=("abs", "sq"), reduce="host", provider="cpu")
    for node in new.sums:
        for kind in ("abs", "sq"):
            assert np.array_equal(new.sums[node][kind], old.sums[node][kind])
    with pytest.warns(DeprecationWarning, match="BatchStats"):
        step = BatchStats(plan.model, plan.layers, provider="cpu", reduce="host")
    assert step.runtime == rc
    step.close()
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        BatchStats(plan.model, plan.layers, providr="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # the new spelling warns about nothing
        BatchStats(plan.model, plan.layers, runtime=rc).close()


def test_host_and_graph_reduce_agree_through_the_config():
    """The config reaches the session: host reduction (NumPy) and graph reduction (ORT) give the same sums."""
    plan, batches = _batches()
    graph, _ = collect_stats(plan.model, plan.layers, batches, runtime=RuntimeConfig(provider="cpu"))
    host, _ = collect_stats(plan.model, plan.layers, batches, runtime=RuntimeConfig(provider="cpu", reduce="host"))
    for node in graph.sums:
        np.testing.assert_allclose(graph.sums[node]["abs"], host.sums[node]["abs"], rtol=1e-5)


def test_micro_batches_come_from_the_config():
    plan, batches = _batches()
    st, info = collect_stats(plan.model, plan.layers, batches[:1], runtime=RuntimeConfig(provider="cpu", micro_batch=5))
    assert info.micro_batch == 5 and st.num_samples == 16


def test_stats_moved_below_runtime_and_selection():
    import fps_graph.selection.stats as old

    with pytest.warns(DeprecationWarning, match="fps_graph.selection.stats.Stats moved to fps_graph.formats.stats"):
        assert old.Stats is Stats
    from fps_graph.runtime.windows import conv_window_sums

    with pytest.warns(DeprecationWarning, match="moved to fps_graph.runtime.windows"):
        assert old.conv_window_sums is conv_window_sums
    with pytest.raises(AttributeError):
        old.nothing_here
