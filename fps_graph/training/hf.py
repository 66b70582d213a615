"""Hugging Face models and text tasks in `fps-graph train`: causal language modelling and sequence classification.

``fps-graph train hf:DIR`` (or a folder holding ``config.json``) builds the model with transformers' Auto classes
from that local folder (weights from its safetensors, nothing downloaded): ``AutoModelForCausalLM`` for
``--task causal-lm``, ``AutoModelForSequenceClassification`` for ``--task seq-cls``. Weights load in float32
(the deltas train in float32 either way). Mask keys are parameter names (``model.layers.0.self_attn.q_proj.weight``),
which is what `select` resolves on the model's ONNX export by Optimum or ``torch.onnx.export``; a tied
``lm_head.weight`` / ``model.embed_tokens.weight`` pair is one tensor and takes one mask entry.

Text: ``.txt`` (one sample per non-empty line) or ``.jsonl`` (one JSON object per line). causal-lm learns every
token after the first (``--text-field``, default ``text``) or, with ``--prompt-field``/``--completion-field``,
only the completion's tokens; padding never counts. seq-cls reads ``text`` and ``label`` (integers, or strings
mapped through the model's ``label2id`` when it names them all, else sorted); a label count different from the
model's gives a fresh, seeded head. A text longer than ``--max-length`` tokens is an error (naming file and line),
never cut silently. What trains in full by default: causal-lm, the biases of masked layers only (the LM head is
usually tied to the input embedding, and is the largest tensor); seq-cls, also the classification head.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from fps_graph.errors import FpsGraphError

if TYPE_CHECKING:
    import torch

TASKS = ("image-cls", "causal-lm", "seq-cls")
TEXT_TASKS = ("causal-lm", "seq-cls")
DEFAULT_MAX_LENGTH = 512


@dataclass
class TextOptions:
    """How text becomes model inputs for the text tasks."""

    max_length: int | None = None          # None: the masks file's data record, else the model's limit
    tokenizer: str | None = None           # tokenizer.json or a folder; None: masks record, else the model folder
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str | None = None
    completion_field: str | None = None


# ---------------------------------------------------------------------------------------------- the model


def hf_folder(spec: str) -> Path | None:
    """The model folder of 'hf:DIR' or of a directory holding config.json; None for a factory spec."""
    if spec.startswith("hf:"):
        path = Path(spec[3:])
    elif Path(spec).is_dir():
        path = Path(spec)
    else:
        return None
    if not path.is_dir():
        raise FpsGraphError(f"Hugging Face model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise FpsGraphError(f"{path} holds no config.json; `fps-graph train hf:DIR` needs a folder written by "
                            "save_pretrained (config.json and *.safetensors)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FpsGraphError(f"{path} holds no weights (*.safetensors); save the model with save_pretrained")
    return path


def default_task(folder: Path) -> str:
    """causal-lm or seq-cls, from the architectures that config.json names."""
    archs = _config_json(folder).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "seq-cls"
    return "causal-lm"


def _config_json(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FpsGraphError(f"cannot read {folder / 'config.json'}: {exc}") from exc


def load_hf_model(folder: Path, task: str) -> Any:
    """The transformers model of a local folder for a task (float32, eval mode); no download is attempted."""
    try:
        import transformers
    except ImportError as exc:
        raise FpsGraphError("Hugging Face models need transformers: pip install transformers") from exc
    import torch

    cls = {"causal-lm": transformers.AutoModelForCausalLM,
           "seq-cls": transformers.AutoModelForSequenceClassification}[task]
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()      # the library prints nothing; missing weights are reported below
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True)
    except Exception as exc:
        raise FpsGraphError(f"cannot build a {task} model from {folder} with transformers ({cls.__name__}): "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.fps_missing_keys = sorted(info.get("missing_keys") or [])   # new (randomly initialised) tensors
    return model.eval()


def canonical_masks(model: Any, masks: Any) -> Any:
    """The masks with tied tensors under one key (a model's first name for it; indices united)."""
    from fps_graph.training.sparse import load_mask_set

    ms = load_mask_set(masks)
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
        alias[name] = first[id(p)]
    keys = {}
    for key in ms.indices:
        keys.setdefault(alias.get(key, key), []).append(key)
    if all(len(v) == 1 and v[0] == k for k, v in keys.items()):
        return ms
    indices, shapes, info = {}, {}, {}
    for canon, group in keys.items():
        indices[canon] = np.unique(np.concatenate([ms.indices[k] for k in group]))
        shapes[canon] = next((ms.shapes[k] for k in group if ms.shapes.get(k) is not None), None)
        # keep the ONNX record of the key `select` wrote (apply finds the stored copy through it)
        info[canon] = ms.info.get(group[0], {}) if len(group) == 1 else \
            next((ms.info[k] for k in group if ms.info.get(k)), {})
    ms.indices, ms.shapes, ms.info = indices, shapes, info
    return ms


def auto_head(model: Any) -> str | None:
    """attach()'s head for a transformers model: none when it has an LM head (output embeddings: the vocabulary
    projection, usually tied to the input embedding), else the last nn.Linear with config.num_labels outputs."""
    from torch import nn

    if model.get_output_embeddings() is not None:
        return None
    n = int(getattr(model.config, "num_labels", 0) or 0)
    cands = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n]
    return cands[-1] if cands else None


def head_module(model: Any, task: str) -> str | None:
    """seq-cls: the last nn.Linear with config.num_labels outputs (score, classifier, classifier.out_proj)."""
    from torch import nn

    if task != "seq-cls":
        return None
    n = int(getattr(model.config, "num_labels", 0) or 0)
    cands = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n]
    if not cands:
        raise FpsGraphError(f"cannot find the classification head (an nn.Linear with {n} outputs); name it with "
                            "--head")
    return cands[-1]


# --------------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """The `tokenizers` tokenizer `select` uses (fps_graph.data.text), with the ids training needs (eos/pad)."""

    def __init__(self, path: Path, config: dict[str, Any]):
        from fps_graph.data.text import find_tokenizer, load_tokenizer

        try:
            import tokenizers  # noqa: F401
        except ImportError as exc:
            raise FpsGraphError("text data needs the tokenizers package: pip install tokenizers") from exc
        file = find_tokenizer(None, path)
        self.tok = load_tokenizer(file)
        self.path = str(file)
        pad = config.get("pad_token_id")
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        self.eos_id = eos if isinstance(eos, int) else None
        self.pad_id = int(pad) if isinstance(pad, int) else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, texts: list[str], special: bool = True) -> list[np.ndarray]:
        """Token ids per text (int64), with the tokenizer's special tokens when special is true."""
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts, add_special_tokens=special)]


# ------------------------------------------------------------------------------------------------- data


@dataclass
class TextData:
    """Tokenised samples: ids per sample, the position where the loss starts, and labels (seq-cls)."""

    ids: list[np.ndarray]
    loss_from: np.ndarray
    labels: np.ndarray | None
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def _records(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) for each non-empty line: a JSON object (.jsonl) or the line's text (.txt)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise FpsGraphError(f"cannot read text data {path}: {exc}") from exc
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise FpsGraphError(f"{path}:{i}: not a JSON object ({exc})") from exc
            if not isinstance(rec, dict):
                raise FpsGraphError(f"{path}:{i}: expected a JSON object per line, found {type(rec).__name__}")
            out.append((i, rec))
        else:
            out.append((i, line))
    return out


def _files(path: str) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise FpsGraphError(f"data path not found: {p}")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix.lower() in (".txt", ".jsonl"))
    bad = [f for f in files if f.suffix.lower() not in (".txt", ".jsonl")]
    if bad:
        raise FpsGraphError(f"{bad[0]}: text data must be .txt (one sample per line) or .jsonl")
    if not files:
        raise FpsGraphError(f"no .txt or .jsonl files in {p}")
    return files


def _field(path: Path, line: int, rec: Any, name: str, option: str) -> Any:
    if isinstance(rec, str):
        raise FpsGraphError(f"{path}: {option} needs .jsonl records; a .txt file holds plain lines")
    if name not in rec:
        raise FpsGraphError(f"{path}:{line}: no field {name!r} (fields: {sorted(rec)}); name it with {option}")
    return rec[name]


def read_text_data(path: str, task: str, tok: Tokenizer, opts: TextOptions, max_length: int,
                   classes: list[str] | None = None, label2id: dict[str, int] | None = None) -> TextData:
    """Tokenised samples of a text file or folder for a task; every text must fit max_length tokens."""
    ids: list[np.ndarray] = []
    loss_from: list[int] = []
    labels: list[Any] = []
    where: list[tuple[Path, int]] = []
    for f in _files(path):
        if task == "causal-lm" and opts.prompt_field:
            recs = _records(f)
            prompts = [str(_field(f, i, r, opts.prompt_field, "--prompt-field")) for i, r in recs]
            comps = [str(_field(f, i, r, opts.completion_field or "completion", "--completion-field"))
                     for i, r in recs]
            tail = np.asarray([tok.eos_id] if tok.eos_id is not None else [], dtype=np.int64)
            for p, c in zip(tok.encode(prompts, special=True), tok.encode(comps, special=False)):
                ids.append(np.concatenate([p, c, tail]))      # the completion ends with end-of-sequence
                loss_from.append(len(p))
            where.extend((f, i) for i, _ in recs)
            continue
        from fps_graph.data.text import read_texts, tokenize

        samples = read_texts(f, opts.text_field)             # the same reading and tokenizing as `select`
        toks = tokenize(tok.tok, [s.text for s in samples], max_length, truncate=False,
                        where=[f"{s.file}:{s.line}" for s in samples])
        ids.extend(toks.sample(i) for i in range(len(toks)))
        loss_from.extend([0] * len(samples))
        where.extend((f, s.line) for s in samples)
        if task == "seq-cls":
            recs = dict(_records(f))
            labels.extend(_field(f, s.line, recs[s.line], opts.label_field, "--label-field") for s in samples)
    for (f, line), x in zip(where, ids):
        if len(x) > max_length:
            raise FpsGraphError(f"{f}:{line}: {len(x)} tokens, more than the maximum length {max_length}; raise "
                                "--max-length or shorten the text (texts are never cut silently)")
        if len(x) < 2 and task == "causal-lm":
            raise FpsGraphError(f"{f}:{line}: {len(x)} token(s); causal-lm needs at least 2 to predict one")
        if len(x) == 0:
            raise FpsGraphError(f"{f}:{line}: empty text")
    y, names = (_labels(path, labels, where, classes, label2id) if task == "seq-cls" else (None, []))
    return TextData(ids, np.asarray(loss_from, dtype=np.int64), y, names, path)


def _labels(path: str, labels: list[Any], where: list[tuple[Path, int]], classes: list[str] | None,
            label2id: dict[str, int] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names (a validation set uses the training set's names)."""
    for (f, line), v in zip(where, labels):
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise FpsGraphError(f"{f}:{line}: label {v!r} is neither an integer nor a string")
    if all(isinstance(v, int) for v in labels):
        if any(v < 0 for v in labels):
            raise FpsGraphError(f"{path}: labels must be non-negative")
        names = classes or [str(i) for i in range(max(labels) + 1)]
        if max(labels) >= len(names):
            raise FpsGraphError(f"{path}: label {max(labels)} is outside the {len(names)} training classes")
        return np.asarray(labels, dtype=np.int64), list(names)
    if not all(isinstance(v, str) for v in labels):
        raise FpsGraphError(f"{path}: labels mix integers and strings")
    if classes is None:
        found = sorted(set(labels))
        if label2id and set(found) <= set(label2id) and sorted(label2id.values()) == list(range(len(label2id))):
            classes = sorted(label2id, key=label2id.__getitem__)
        else:
            classes = found
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise FpsGraphError(f"{path}: labels {unknown} are not among the training classes {classes}")
    return np.asarray([index[v] for v in labels], dtype=np.int64), list(classes)


def batches(data: TextData, batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0,
            max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Right-padded batches in a seeded order: input_ids, attention_mask, loss_mask (causal-lm) or labels."""
    n = len(data)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    if max_samples is not None:
        order = order[:max_samples]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(data.ids[i]) for i in idx)
        ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        am = np.zeros((len(idx), width), dtype=np.int64)
        lm = np.zeros((len(idx), width), dtype=bool)
        for r, i in enumerate(idx):
            x = data.ids[i]
            ids[r, :len(x)] = x
            am[r, :len(x)] = 1
            lm[r, max(1, int(data.loss_from[i])):len(x)] = True     # tokens predicted from what precedes them
        out = {"input_ids": ids, "attention_mask": am, "loss_mask": lm}
        if data.labels is not None:
            out["labels"] = data.labels[idx]
        yield out


# ------------------------------------------------------------------------------------------------ tasks


def step_loss(model: Any, batch: dict[str, np.ndarray], task: str, device: str) -> tuple["torch.Tensor", float, float]:
    """The batch's mean loss (a tensor to backpropagate), its summed loss and what it is summed over
    (predicted tokens or samples), and the correct predictions, as floats."""
    import torch
    import torch.nn.functional as F

    ids = torch.from_numpy(batch["input_ids"]).to(device)
    am = torch.from_numpy(batch["attention_mask"]).to(device)
    logits = model(input_ids=ids, attention_mask=am).logits
    if task == "causal-lm":
        w = torch.from_numpy(batch["loss_mask"][:, 1:]).to(device)
        pred = logits[:, :-1][w]                        # only the positions whose next token is learnt
        target = ids[:, 1:][w]
        tok_loss = F.cross_entropy(pred.float(), target, reduction="sum")
        n = int(target.numel())
        correct = int((pred.detach().argmax(-1) == target).sum())
    else:
        y = torch.from_numpy(batch["labels"]).to(device)
        tok_loss = F.cross_entropy(logits.float(), y, reduction="sum")
        n = int(y.numel())
        correct = int((logits.detach().argmax(-1) == y).sum())
    return tok_loss / max(n, 1), float(n), float(correct)


def evaluate_text(model: Any, data: TextData, task: str, batch_size: int, pad_id: int,
                  device: str) -> dict[str, float]:
    """Mean loss (per predicted token or per sample), accuracy and, for causal-lm, perplexity (eval mode)."""
    import torch

    was = model.training
    model.eval()
    loss_sum, n_sum, correct = 0.0, 0.0, 0.0
    with torch.no_grad():
        for b in batches(data, batch_size, pad_id):
            loss, n, c = step_loss(model, b, task, device)
            loss_sum += float(loss) * n
            n_sum += n
            correct += c
    model.train(was)
    return _summary(loss_sum, n_sum, correct, task)


def _summary(loss_sum: float, n: float, correct: float, task: str) -> dict[str, float]:
    loss = loss_sum / max(n, 1.0)
    out = {"loss": loss, "acc": correct / max(n, 1.0)}
    if task == "causal-lm":
        out["ppl"] = math.exp(min(loss, 700.0))
    return out


# ------------------------------------------------------------------------------------------------ the run


def _data_record(masks_path: str) -> dict[str, Any]:
    """How `select` prepared its data (the masks file's `data` record), or {}."""
    from fps_graph.formats.masks import read_metadata

    rec = read_metadata(masks_path).get("data")
    return rec if isinstance(rec, dict) else {}


def run_hf_train(opts: Any, progress: Callable | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """`fps-graph train` on a Hugging Face folder (or a factory) with a text task; writes the run folder."""
    import torch

    from fps_graph.training import train as tr

    tr._check_options(opts)
    folder = hf_folder(opts.factory)
    if folder is None:
        raise FpsGraphError(f"--task {opts.task} needs a Hugging Face model folder (hf:DIR), not a factory")
    task = opts.task or default_task(folder)
    if task not in TEXT_TASKS:
        raise FpsGraphError(f"--task {task} is not supported for Hugging Face models; use causal-lm or seq-cls")
    if opts.weights:
        raise FpsGraphError("--weights does not apply to hf:DIR (the weights come from the folder's safetensors)")
    device = tr._device(opts.device)
    rec = _data_record(opts.masks)
    if rec.get("kind") != "text":
        rec = {}
    text: TextOptions = opts.text
    from fps_graph.data.text import default_max_length

    # as select chose it: --max-length, else the masks file's record, else the model's limit (as select's default)
    max_length = int(text.max_length or rec.get("max_length") or default_max_length([folder])[0])
    tok_path = Path(text.tokenizer or rec.get("tokenizer") or folder)
    if not text.tokenizer and rec.get("tokenizer") and not tok_path.exists():
        tok_path = folder          # the record names select's path; the model folder holds the same tokenizer
    config = _config_json(folder)
    tok = Tokenizer(tok_path, config)
    label2id = config.get("label2id") if task == "seq-cls" else None
    t_start = time.perf_counter()
    train_data = read_text_data(opts.data, task, tok, text, max_length, label2id=label2id)
    if len(train_data) == 0:
        raise FpsGraphError(f"{opts.data}: no training samples")
    val_data = read_text_data(opts.val, task, tok, text, max_length, classes=train_data.classes or None) \
        if opts.val else None

    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            tr.deterministic(True, warn_only=device != "cpu")
            if opts.threads:
                torch.set_num_threads(opts.threads)
            model = load_hf_model(folder, task).to(device)
            handle = _attach(model, opts, task, train_data)
            peft_plan = None
            if getattr(opts, "peft", False):
                from fps_graph.integrations.peft import shira_plan

                peft_plan = shira_plan(handle)          # refuse before training when SHiRA cannot hold it
            if opts.gradient_checkpointing:
                if hasattr(model, "activation_checkpointing_enable"):     # transformers >= 5 name
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            out, made = tr._prepare_output(opts)       # only now: bad input above leaves nothing behind
            try:
                result = _loop(opts, task, model, handle, tok, train_data, val_data, out, device, progress,
                               on_epoch)
                meta = {"task": task, "base_model": str(folder), "tokenizer": tok.path, "max_length": max_length,
                        "masks_record": rec}
                _write_outputs(opts, handle, result, out, task, folder, train_data, meta, peft_plan)
                result.metrics["time"]["total_seconds"] = round(time.perf_counter() - t_start, 3)
                tr._write_json(out / tr.FILES["metrics"], result.metrics)
            except BaseException:
                if made is not None:
                    shutil.rmtree(made, ignore_errors=True)
                raise
    finally:
        tr.deterministic(prev_det)
        torch.set_num_threads(prev_threads)
    return result


def _attach(model: Any, opts: Any, task: str, data: TextData) -> Any:
    """attach() with the task's head: seq-cls trains it in full (new and seeded when the label count differs)."""
    from fps_graph.training.sparse import attach

    head = opts.head or head_module(model, task)
    n = len(data.classes) if task == "seq-cls" else None
    num_classes = opts.num_classes or n
    if task == "seq-cls" and n and num_classes < n:
        raise FpsGraphError(f"{opts.data} has {n} classes, more than --num-classes {num_classes}")
    masks = canonical_masks(model, opts.masks)
    # a head the checkpoint lacks (a causal-LM folder trained for seq-cls) is new: seeded like a replaced one
    fresh = head is not None and any(k.startswith(head + ".") for k in getattr(model, "fps_missing_keys", []))
    if fresh and opts.train_head:
        from fps_graph.training.sparse import replace_head

        replace_head(model, head, int(num_classes or model.get_submodule(head).out_features), opts.seed)
    handle = attach(model, masks, head=head, num_classes=num_classes, train_bias=opts.train_bias,
                    train_head=opts.train_head,
                    train_norms=opts.train_norms, train_embeddings=opts.train_embeddings,
                    train_full=opts.train_full, seed=opts.seed)
    if fresh and handle.head is not None and not handle.head.replaced:
        handle.head.replaced, handle.head.old_classes = True, None
        for name in [n for n in handle._base_full if n.startswith(head + ".")]:
            del handle._base_full[name]          # no start values to check on reload: the head is new
        handle.notes.append(f"head {head}: not in the checkpoint; a new seeded head (--seed {opts.seed})")
    if task == "seq-cls" and handle.head is not None and handle.head.replaced:
        model.config.num_labels = int(num_classes)
        model.num_labels = int(num_classes)
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = _pad_id(model.config)
    return handle


def _pad_id(config: Any) -> int:
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return int(eos) if isinstance(eos, int) else 0


def _loop(opts: Any, task: str, model: Any, handle: Any, tok: Tokenizer, train_data: TextData,
          val_data: TextData | None, out: Path, device: str, progress: Callable | None,
          on_epoch: Callable[[dict[str, Any]], None] | None) -> Any:
    """The epochs: seeded shuffled batches, AdamW/Adam/SGD with warm-up + cosine, metrics per epoch."""
    import torch

    from fps_graph.training import train as tr

    pad_id = int(model.config.pad_token_id) if getattr(model.config, "pad_token_id", None) is not None \
        else tok.pad_id
    optim, sched, steps_per_epoch = tr.make_optimizer(handle.trainable_parameters(), opts, len(train_data))
    n_train = min(len(train_data), opts.max_samples or len(train_data))
    initial = evaluate_text(model, val_data, task, opts.batch_size, pad_id, device) if val_data else None
    mem = tr.PeakMemory(device)
    mem.start()
    epochs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    seen = 0
    for epoch in range(1, opts.epochs + 1):
        te = time.perf_counter()
        cb = progress(n_train, f"epoch {epoch}/{opts.epochs}") if progress else None
        handle.train(True)
        loss_sum, n_sum, correct = 0.0, 0.0, 0.0
        for b in batches(train_data, opts.batch_size, pad_id, shuffle=True, seed=opts.seed * 100003 + epoch,
                         max_samples=opts.max_samples):
            loss, n, c = step_loss(model, b, task, device)
            if not torch.isfinite(loss):
                raise FpsGraphError(f"the loss became {float(loss)} in epoch {epoch}; lower --lr")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if opts.grad_clip:
                torch.nn.utils.clip_grad_norm_(handle.trainable_parameters(), opts.grad_clip)
            optim.step()
            sched.step()
            loss_sum += float(loss.detach()) * n
            n_sum += n
            correct += c
            if cb:
                cb(len(b["input_ids"]))
        seen += n_train
        handle.train(False)
        s = _summary(loss_sum, n_sum, correct, task)
        rec: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in s.items()},
                               "lr": optim.param_groups[0]["lr"]}
        if task == "causal-lm":
            rec["train_tokens"] = int(n_sum)              # tokens learnt (no padding, no prompt)
        if val_data is not None:
            v = evaluate_text(model, val_data, task, opts.batch_size, pad_id, device)
            rec.update({f"val_{k}": x for k, x in v.items()})
        rec["seconds"] = round(time.perf_counter() - te, 3)
        epochs.append(rec)
        if on_epoch:
            on_epoch(rec)
    train_seconds = time.perf_counter() - t0
    memory = mem.report()
    memory["train_state"] = tr.state_memory(handle, opts.optimizer)
    model.eval()
    metrics = {"task": task, "epochs": epochs,
               "initial": {f"val_{k}": v for k, v in initial.items()} if initial else None,
               "final": {k: v for k, v in epochs[-1].items() if k not in ("epoch", "seconds", "lr")},
               "memory": memory,
               "samples": {"train": n_train, "val": len(val_data) if val_data is not None else 0},
               "time": {"train_seconds": round(train_seconds, 3),
                        "samples_per_s": round(seen / train_seconds, 2) if train_seconds > 0 else 0.0}}
    return tr.TrainResult(metrics, {}, [], handle)


def _write_outputs(opts: Any, handle: Any, result: Any, out: Path, task: str, folder: Path, train_data: TextData,
                   meta: dict[str, Any], peft_plan: Any) -> None:
    """delta.safetensors, run_config.json, the PEFT adapter (--peft), merged weights, plot; metrics filled in."""
    from fps_graph.formats.io import sha256_file
    from fps_graph.training import train as tr
    from fps_graph.training.sparse import save_delta, save_state_dict

    settings = tr._settings(opts)
    files = {"delta": str(out / tr.FILES["delta"])}
    weights = sorted(str(p) for p in folder.glob("*.safetensors"))
    save_delta(handle, out / tr.FILES["delta"], {
        "training": settings, "base_model": str(folder), "classes": train_data.classes, "task": task,
        "text": meta, "weights_sha256": sha256_file(weights[0]) if len(weights) == 1 else ""}, force=True)
    if opts.save_merged:
        save_state_dict(handle.merged_state_dict(), out / tr.FILES["merged"], force=True,
                        metadata={"format": "pt", "fps_graph": "merged state dict"})
        files["merged"] = str(out / tr.FILES["merged"])
    if peft_plan is not None:
        from fps_graph.integrations.peft import write_shira

        write_shira(handle, out, peft_plan, base_model=str(folder), task=task, force=True)
        files["adapter_config"] = str(out / tr.FILES["adapter_config"])
        files["adapter_model"] = str(out / tr.FILES["adapter_model"])
        result.metrics["peft"] = {"type": "SHIRA", **peft_plan.to_json()}
    counts = handle.counts()
    counts.pop("full_tensor_names", None)
    m = result.metrics
    m.update(trainable=counts, trained_in_full={k: handle.full_reason.get(k, "") for k in handle.full},
             superseded=handle.superseded, notes=handle.notes,
             head=handle.head.to_json() if handle.head else None, classes=train_data.classes,
             settings=settings, text=meta, warnings=result.warnings, plot=None)
    cfg = tr.run_config(opts, handle, train_data.classes, handle.masks.sha256 if handle.masks else "", counts)
    cfg.update(task=task, base_model_name_or_path=str(folder), text=meta, image=None)
    tr._write_json(out / tr.FILES["run_config"], cfg)
    files["run_config"] = str(out / tr.FILES["run_config"])
    files["metrics"] = str(out / tr.FILES["metrics"])
    if opts.plot:
        err = tr.plot_curves(m["epochs"], out / tr.FILES["plot"], _initial_for_plot(m.get("initial")))
        if err:
            result.warnings.append(err)
            m["plot_warning"] = err
        else:
            m["plot"] = tr.FILES["plot"]
            files["plot"] = str(out / tr.FILES["plot"])
    result.files = files


def _initial_for_plot(initial: dict[str, Any] | None) -> dict[str, Any] | None:
    return {k[4:]: v for k, v in initial.items()} if initial else None


__all__ = ["TASKS", "TEXT_TASKS", "TextOptions", "TextData", "Tokenizer", "hf_folder", "default_task",
           "load_hf_model", "canonical_masks", "head_module", "read_text_data", "batches", "step_loss",
           "evaluate_text", "run_hf_train"]
