"""ONNX Runtime sessions: provider choice that trusts what a created session reports, not what is listed."""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
from onnx import helper

from fps_graph.errors import ModelError, OptionError, RuntimeFailure
from fps_graph.graph.versions import ort_errors

OPT_LEVELS = ("disable", "basic", "extended", "all")
SPILL_BYTES = 64 << 20   # embedded weights above this are handed to ONNX Runtime as a file (see create_session)


@dataclass
class Session:
    """An inference session and the provider it really runs on ('cuda' or 'cpu')."""

    session: "object"
    provider: str
    _tmpdir: str | None = None
    regrouped: bool = False     # built from ONNX Runtime's optimized graph with its nodes reordered (regroup)
    _more_tmp: tuple[str, ...] = ()

    def close(self) -> None:
        """Release the session and any temporary files it was loaded from."""
        self.session = None
        for tmp in (self._tmpdir, *self._more_tmp):
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        self._tmpdir, self._more_tmp = None, ()


def _options(opt_level: str, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    so.log_severity_level = 4   # fatal only: a failing node also raises, and the CLI says that in one line
    # Run nodes in graph order (lowest index first among the ready ones). The default order (a reverse DFS from
    # the graph's leaves) runs the in-graph reducers, which are all leaves, late, so every observed activation
    # stays alive until the end of the pass: +1.7 GB per batch of 32 on ViT-B/16 (bench/README.md).
    if hasattr(ort, "ExecutionOrder"):
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # The memory pattern allocates one planned block after the first run, on top of the arena chunks that run
    # left: +77 MB on ViT-B/16 b32, +360 MB on ResNet-50 b32, with no measured speed gain (bench/README.md).
    so.enable_mem_pattern = False
    if threads:
        so.intra_op_num_threads = threads
    return so


def _external_folder(so, base_dir: Path | None, external: bool) -> None:
    """Let a model given as bytes read its external data from the original model's folder (no copies)."""
    if external and base_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir.resolve()))


def _embedded_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers held in the proto, from their shapes (ByteSize() would serialize)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except KeyError:   # a type NumPy has no dtype for: not counted
            continue
        n = 1
        for d in t.dims:
            n *= int(d)
        total += n * item
    return total


def _spill(model: onnx.ModelProto) -> tuple[str, str]:
    """Write the model to a temporary folder with its weights in a side file (moved out of the proto)."""
    tmp = tempfile.mkdtemp(prefix="fpsg_session_")
    path = os.path.join(tmp, "model.onnx")
    try:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path, tmp


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's whole error text on one line (its later lines name the input and dimension at fault)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def create_session(model: onnx.ModelProto, provider: str = "auto", base_dir: Path | None = None,
                   external: bool = False, opt_level: str = "all", threads: int | None = None,
                   consume: bool = False, disabled_optimizers: tuple[str, ...] = (),
                   regroup: Callable[[onnx.GraphProto], None] | None = None,
                   regroup_fallback: tuple[str, ...] = ()) -> Session:
    """A session on CUDA when asked (or available, for auto) and really usable, else on CPU.

    consume=True lets a model whose weights are embedded (over SPILL_BYTES) be written to a temporary folder with
    its weights in a side file, which ONNX Runtime then maps and pre-packs itself: the weights are held once by
    the runtime, not also as serialized bytes (which ORT's Python session keeps for its lifetime) and as ORT's
    own parsed copy: 1.9 GB -> 1.1 GB peak on ViT-B/16 (bench/README.md). The model's tensors are moved out.

    regroup (CPU, opt level "all"): ONNX Runtime optimizes the model once and saves its optimized graph (weights
    in a side file, never read into Python); ``regroup`` reorders that graph's nodes in place, and the session
    runs the result as it is (optimizations off: they were applied). Observed conv graphs use it to keep ORT's
    NCHWc layout with each reducer right after its activation (``graph.observe.reducers_first``). Should ORT fail
    to load its own optimized graph (it writes nested Loop bodies it cannot read back), the session is made the
    ordinary way with ``regroup_fallback`` optimizers disabled as well.
    """
    import onnxruntime as ort

    if provider not in ("auto", "cuda", "cpu"):
        raise OptionError(f"unknown provider {provider!r} (use auto, cuda or cpu)")
    tmp = None
    if consume and not external and _embedded_bytes(model) > SPILL_BYTES:
        source, tmp = _spill(model)
    else:
        source = model.SerializeToString()
    if consume:
        del model   # the caller's last reference, when it passed the model without keeping it
    try:
        so = _options(opt_level, threads)
        _external_folder(so, base_dir, external)
        want_cuda = provider == "cuda" or (
            provider == "auto" and "CUDAExecutionProvider" in ort.get_available_providers())
        # onnxruntime-gpu lists CUDA on machines without a GPU; a session for the model asked for CUDA then falls
        # back to CPU only after loading the whole model once (half of session creation on a 1.1B decoder, issue
        # 12): ask the one-node probe first, and build a CUDA session for the model only where it succeeded.
        if want_cuda and not cuda_usable():
            if provider == "cuda":
                raise RuntimeFailure("CUDA provider requested but not usable here (no GPU, driver or CUDA libraries);"
                                    " use --provider cpu")
            want_cuda = False
        if want_cuda:
            sess = _try_cuda(source, so, disabled_optimizers)
            if sess is not None:
                return Session(sess, "cuda", tmp)
            if provider == "cuda":
                raise RuntimeFailure("CUDA provider requested but not usable here (no GPU, driver or CUDA libraries);"
                                    " use --provider cpu")
        try:
            if regroup is not None and opt_level == "all":
                try:
                    sess, more = _regrouped(source, regroup, threads, base_dir, external, disabled_optimizers)
                    return Session(sess, "cpu", tmp, regrouped=True, _more_tmp=(more,))
                except ort_errors():   # ORT cannot read back what it wrote: the ordinary session below
                    disabled_optimizers = (*disabled_optimizers, *regroup_fallback)
            sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=list(disabled_optimizers))
        except ort_errors() as exc:
            raise ModelError(f"ONNX Runtime cannot load the model: {ort_message(exc)}") from exc
        return Session(sess, "cpu", tmp)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _regrouped(source: str | bytes, regroup: Callable[[onnx.GraphProto], None], threads: int | None,
               base_dir: Path | None, external: bool, disabled_optimizers: tuple[str, ...]) -> tuple[object, str]:
    """A CPU session on ONNX Runtime's optimized graph of the model with its nodes reordered by ``regroup``; and
    the temporary folder that holds that graph (its weights in a side file), to delete with the session."""
    import onnxruntime as ort

    tmp = tempfile.mkdtemp(prefix="fpsg_optimized_")
    try:
        optimized = os.path.join(tmp, "optimized.onnx")
        so = _options("all", threads)
        _external_folder(so, base_dir, external)
        so.optimized_model_filepath = optimized
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.add_session_config_entry("session.disable_prepacking", "1")   # this session only writes the graph
        ort.InferenceSession(source, so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled_optimizers))
        graph = onnx.load(optimized, load_external_data=False)
        regroup(graph.graph)
        path = os.path.join(tmp, "regrouped.onnx")
        onnx.save(graph, path)
        del graph
        sess = ort.InferenceSession(path, _options("disable", threads), providers=["CPUExecutionProvider"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sess, tmp


def _try_cuda(source: str | bytes, so, disabled_optimizers: tuple[str, ...] = ()) -> object | None:
    """A CUDA session, or None when ORT silently fell back to CPU or failed to create one."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    ort.set_default_logger_severity(4)   # the fallback logs an error we report our own way
    try:
        sess = ort.InferenceSession(source, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers))
    except ort_errors():   # no usable CUDA here: the caller falls back to CPU or says so
        return None
    finally:
        ort.set_default_logger_severity(2)
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return None
    return sess


@functools.lru_cache(maxsize=None)
def cuda_usable() -> bool:
    """True when a CUDA session can really be created (a one-node probe model; asked once per process)."""

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    import onnxruntime as ort

    return _try_cuda(m.SerializeToString(), _options("basic", None)) is not None
