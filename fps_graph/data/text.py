"""Text calibration data: .txt / .jsonl files tokenized with the model's own `tokenizer.json`, fed without padding.

* ``.txt``: one sample per non-empty line (a line of only whitespace is empty); ``.jsonl``: one JSON object per
  non-empty line, its text under ``text`` (or another field). A folder: every .txt/.jsonl under it, in path order.
* The tokenizer is the `tokenizers` library's (Rust; no torch, no transformers): ``tokenizer.json`` beside the model
  (the layout of Hugging Face / Optimum export folders) or a path given by the user. Its own padding and truncation
  settings are replaced: samples are truncated to ``max_length`` tokens (special tokens included) and never padded.
* **Padding never counts.** Batches hold sequences of one length only (length bucketing: the samples to use are
  sorted by token count, ties kept in input order, and each run of equal lengths is cut into batches), so every
  statistic is the one each sequence gives alone and no graph change is needed. Inputs the tokenizer does not give
  are filled by the transformers/Optimum conventions (``hf_inputs``).
* **Packing** (``TextOptions.pack = L``): the documents, each tokenized whole with its special tokens, are joined
  with the tokenizer's separator (its end-of-sequence token, or BERT's [SEP]) into one token stream, cut into rows of
  exactly L tokens; the last partial row is dropped (counted in ``notes`` and the record). Every batch is full, at
  the price of windows that start mid-document and attend across document boundaries (docs/text.md).

Public helpers for other stages (training reads and tokenizes its text with them): ``TextTokenizer``,
``load_tokenizer``, ``find_tokenizer``, ``read_texts`` (with extra .jsonl fields such as a label),
``tokenize``, ``default_max_length``, ``resolve_model_path``.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fps_graph.data.hf_inputs import InputPlan, plan_inputs, read_genai_config, read_hf_config
from fps_graph.data.sources import InputSpec, Source, list_files
from fps_graph.errors import DataError, ModelError, OptionError, RuntimeFailure

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

__all__ = ["TEXT_EXTS", "MODEL_FILES", "Packed", "TextOptions", "TextSample", "TextSource", "TextTokenizer",
           "Tokenized", "default_max_length", "find_separator", "find_tokenizer", "is_text_path", "load_tokenizer",
           "pack", "read_texts", "resolve_model_path", "tokenize"]

TEXT_EXTS = {".txt", ".jsonl"}
# Which ONNX file a model folder means, first found wins. decoder_model.onnx comes before the merged decoder: it
# holds the same weights (one outer initializer each) without the If that wraps every layer of the merged file.
MODEL_FILES = ("model.onnx", "decoder_model.onnx", "decoder_model_merged.onnx")
DEFAULT_MAX_LENGTH = 512
_HF_UNSET = 10 ** 9   # transformers writes int(1e30) as model_max_length when a tokenizer has no limit
# Separator tokens looked up in the vocabulary when no config names one, in this order.
SEPARATOR_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")


@dataclass
class TextOptions:
    """How text becomes token ids.

    Args:
        tokenizer: a ``tokenizer.json`` or a folder holding one; None = the one beside the model.
        text_field: the field of each .jsonl record that holds the text.
        max_length: tokens per sample (special tokens included); None = the model's limit (see default_max_length).
        truncate: cut longer samples to max_length (counted in a warning); False = refuse them.
        pack: tokens per row when packing: documents joined with the tokenizer's separator and cut into rows of
            exactly this many tokens, the last partial row dropped; None = one sample per document, exact.
    """

    tokenizer: str | None = None
    text_field: str = "text"
    max_length: int | None = None
    truncate: bool = True
    pack: int | None = None

    def __post_init__(self) -> None:
        if self.pack is not None:
            if isinstance(self.pack, bool) or not isinstance(self.pack, (int, np.integer)) or self.pack < 1:
                raise OptionError(f"pack length must be a positive number of tokens (got {self.pack!r})")
            if self.max_length is not None:
                raise OptionError("give a pack length or a max length, not both: packed rows are exactly the pack "
                                    "length and no document is truncated")
            if not self.truncate:
                raise OptionError("packing truncates nothing (documents run on into the next row); drop the "
                                    "refusal of long samples")


@dataclass(frozen=True)
class TextSample:
    """One sample's text, where it came from (file, 1-based line), and the other fields asked for (raw values)."""

    text: str
    file: Path
    line: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Tokenized:
    """Token ids of many samples in one flat array (``ids[offsets[i]:offsets[i + 1]]`` is sample i)."""

    ids: np.ndarray        # int64, all samples concatenated
    offsets: np.ndarray    # int64, len(samples) + 1
    truncated: list[int]   # indices of the samples cut to max_length

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each sample."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> np.ndarray:
        """The token ids of sample i."""
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def is_text_path(path: str | os.PathLike) -> bool:
    """True for a .txt/.jsonl file, or a folder whose data files are .txt/.jsonl."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() in TEXT_EXTS
    return p.is_dir() and bool(list_files(p, TEXT_EXTS))


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The ONNX file a MODEL argument means: the file itself, or in a folder the first of MODEL_FILES found
    (the folder, then its ``onnx/`` subfolder), else its only .onnx file; in an ONNX Runtime GenAI folder the file
    its genai_config.json names."""
    p = Path(path)
    if not p.is_dir():
        return p
    genai = read_genai_config(p)              # an ONNX Runtime GenAI folder names its decoder file
    if genai is not None:
        if not (p / genai.filename).is_file():
            raise ModelError(f"{p}: genai_config.json names the model file {genai.filename!r}, which is missing")
        return p / genai.filename
    for folder in (p, p / "onnx"):
        for name in MODEL_FILES:
            if (folder / name).is_file():
                return folder / name
    found = sorted(q.name for q in p.glob("*.onnx"))
    if len(found) == 1:
        return p / found[0]
    if found:
        raise ModelError(f"model folder {p} holds several .onnx files ({', '.join(found)}) and none of "
                            f"{', '.join(MODEL_FILES)}; pass the file to use")
    raise ModelError(f"model folder {p} holds no .onnx file (looked for {', '.join(MODEL_FILES)})")


def find_tokenizer(model_path: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None) -> Path:
    """The tokenizer.json to use: the one given (a file or a folder holding one), else the one beside the model."""
    if tokenizer is not None:
        t = Path(tokenizer)
        if t.is_dir():
            t = t / "tokenizer.json"
        if not t.is_file():
            raise DataError(f"tokenizer not found: {t} (give a tokenizer.json or a folder holding one)")
        return t
    if model_path is not None:
        m = Path(model_path)
        folder = m if m.is_dir() else m.parent
        for cand in (folder / "tokenizer.json", folder.parent / "tokenizer.json" if folder.name == "onnx" else None):
            if cand is not None and cand.is_file():
                return cand
        raise DataError(f"text data needs the model's tokenizer: no tokenizer.json beside {m}; "
                            "pass --tokenizer PATH (a tokenizer.json or a Hugging Face model folder)")
    raise DataError("text data needs a tokenizer; pass --tokenizer PATH")


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer":
    """A `tokenizers.Tokenizer` from a tokenizer.json (or a folder holding one), its padding and truncation off."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise RuntimeFailure("text data needs the tokenizers package: pip install 'fps-graph[text]' "
                            "(or pip install tokenizers)") from exc

    p = find_tokenizer(None, path)
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load tokenizer {p}: {first}") from exc
    tok.no_padding()
    tok.no_truncation()
    return tok


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, line without its newline) of every line that is not blank."""
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return [(i + 1, line) for i, line in enumerate(lines) if line.strip()]


def _read_file(path: Path, text_field: str, extra: dict[str, str] | None = None) -> list[TextSample]:
    """The samples of one .txt or .jsonl file; extra: {field: option naming it} read raw from .jsonl records."""
    rows = _read_lines(path)
    if not rows:
        raise DataError(f"{path}: empty text file (no non-empty line); remove it or add samples")
    if path.suffix.lower() != ".jsonl":
        if extra:
            name, option = next(iter(extra.items()))
            raise DataError(f"{path}: {option} ({name!r}) needs .jsonl records; a .txt file holds plain lines")
        return [TextSample(text, path, n) for n, text in rows]
    out = []
    for n, line in rows:
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{n}: not a JSON object ({exc.args[0] if exc.args else exc})") from exc
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, found {type(rec).__name__}")
        for name, option in [(text_field, "--text-field"), *(extra or {}).items()]:
            if name not in rec:
                keys = ", ".join(sorted(rec)[:8])
                raise DataError(f"{path}:{n}: no field {name!r} (fields: {keys}); choose one with {option}")
        text = rec[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{n}: field {text_field!r} holds {type(text).__name__}, not a string")
        if not text.strip():
            raise DataError(f"{path}:{n}: field {text_field!r} is empty")
        out.append(TextSample(text, path, n, {k: rec[k] for k in (extra or {})}))
    return out


def read_texts(path: str | os.PathLike, field: str = "text", extra: dict[str, str] | None = None) -> list[TextSample]:
    """Every sample of a .txt/.jsonl file or of a folder of them (path order, then line order).

    extra: other .jsonl fields to keep per sample ({field: the option that names it, for messages})."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    if p.is_file():
        if p.suffix.lower() not in TEXT_EXTS:
            raise DataError(f"{p}: not a text file (expected .txt or .jsonl)")
        files = [p]
    else:
        files = list_files(p, TEXT_EXTS)
        if not files:
            raise DataError(f"no .txt or .jsonl files found in {p}")
    samples: list[TextSample] = []
    for f in files:
        samples.extend(_read_file(f, field, extra))
    return samples


def tokenize(tokenizer: "Tokenizer", texts: Sequence[str], max_length: int | None, *, truncate: bool = True,
             where: Sequence[str] | None = None) -> Tokenized:
    """Token ids (special tokens added) of each text, cut to max_length (None: whole); with truncate=False a longer
    text is an error naming ``where[i]``."""
    if max_length is not None and max_length < 1:
        raise OptionError(f"max_length must be at least 1, got {max_length}")
    tokenizer.no_padding()
    if max_length is not None:
        tokenizer.enable_truncation(max_length)   # special tokens are kept; the rest is cut from the right
    try:
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
    finally:
        tokenizer.no_truncation()
    truncated = [i for i, e in enumerate(encodings) if e.overflowing]
    if truncated and not truncate:
        i = truncated[0]
        place = where[i] if where is not None else f"sample {i}"
        raise DataError(f"{place}: longer than max_length {max_length} tokens ({len(truncated)} such samples); "
                            "raise --max-length, shorten the text, or allow truncation")
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        place = where[int(empty[0])] if where is not None else f"sample {int(empty[0])}"
        raise DataError(f"{place}: the tokenizer gives no tokens for this text")
    offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for e in encodings for t in e.ids), dtype=np.int64, count=int(offsets[-1]))
    return Tokenized(ids, offsets, truncated)


class TextTokenizer:
    """The model's tokenizer as `select` and `train` use it: a ``tokenizer.json`` loaded with `tokenizers`
    (``load_tokenizer``), ``tokenize`` for samples, and the end-of-sequence / padding ids from a config.json.

    Args:
        path: a tokenizer.json or a folder holding one.
        config: the model's config.json (eos_token_id, pad_token_id); pad falls back to eos, then 0.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any] | None = None):
        self.path = find_tokenizer(None, path)
        self.tok = load_tokenizer(self.path)
        config = config or {}
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        self.eos_id: int | None = eos if isinstance(eos, int) and not isinstance(eos, bool) else None
        pad = config.get("pad_token_id")
        self.pad_id: int = pad if isinstance(pad, int) and not isinstance(pad, bool) else \
            (self.eos_id if self.eos_id is not None else 0)

    def tokenize(self, texts: Sequence[str], max_length: int, *, truncate: bool = True,
                 where: Sequence[str] | None = None) -> Tokenized:
        """``tokenize`` with this tokenizer (special tokens added; longer texts cut, or refused)."""
        return tokenize(self.tok, texts, max_length, truncate=truncate, where=where)

    def encode(self, texts: Sequence[str], special: bool = True) -> list[np.ndarray]:
        """Token ids per text (int64), uncut, with the tokenizer's special tokens when special is true."""
        self.tok.no_padding()
        self.tok.no_truncation()
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(list(texts),
                                                                                 add_special_tokens=special)]


@dataclass(frozen=True)
class Packed:
    """Packed rows of one token stream and what packing left out."""

    rows: np.ndarray       # int64 [rows, length]
    documents: int         # documents joined
    stream_tokens: int     # tokens in the joined stream (separators included)
    dropped_tokens: int    # the last partial row's tokens, not used


def pack(docs: Tokenized, separator: int, length: int) -> Packed:
    """Join the documents' tokens with ``separator`` between two documents (not where a document already ends with
    it) and cut the stream into rows of exactly ``length`` tokens; the last partial row is dropped."""
    if length < 1:
        raise OptionError(f"pack length must be at least 1, got {length}")
    parts: list[np.ndarray] = []
    sep = np.array([separator], dtype=np.int64)
    for i in range(len(docs)):
        ids = docs.sample(i)
        if parts and parts[-1][-1] != separator:
            parts.append(sep)
        parts.append(ids)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = stream.size // length
    return Packed(stream[:n * length].reshape(n, length), len(docs), int(stream.size), int(stream.size - n * length))


def find_separator(tokenizer: "Tokenizer", folders: Sequence[str | os.PathLike]) -> tuple[int, str]:
    """(token id, token) that joins documents when packing: the first found of tokenizer_config.json ``eos_token``,
    config.json ``eos_token_id``, tokenizer_config.json ``sep_token`` (folders in order), else the first of
    SEPARATOR_TOKENS in the vocabulary."""
    def content(v: Any) -> str | None:
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) and v else None

    candidates: list[tuple[str, Any]] = []
    for fname, fld in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id"),
                       ("tokenizer_config.json", "sep_token")):
        for folder in folders:
            v = _read_json(Path(folder) / fname).get(fld)
            if fld.endswith("_id"):
                v = v[0] if isinstance(v, list) and v else v
                if isinstance(v, int) and not isinstance(v, bool) and tokenizer.id_to_token(v) is not None:
                    return v, tokenizer.id_to_token(v)
            elif content(v) is not None:
                candidates.append((content(v), f"{Path(folder) / fname} {fld}"))
                tid = tokenizer.token_to_id(content(v))
                if tid is not None:
                    return tid, content(v)
    for token in SEPARATOR_TOKENS:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return tid, token
    named = f" ({', '.join(f'{t!r} from {w}' for t, w in candidates)} not in the vocabulary)" if candidates else ""
    raise DataError("packing joins documents with the tokenizer's end-of-sequence token, and none was found"
                        f"{named}: set eos_token in tokenizer_config.json beside the tokenizer, or calibrate without "
                        "packing")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def default_max_length(folders: Sequence[str | os.PathLike]) -> tuple[int, str]:
    """(tokens per sample, where that came from): the first of sentence_bert_config.json max_seq_length,
    tokenizer_config.json model_max_length, config.json max_position_embeddings / n_positions found in the
    folders (in order), else 512."""
    rules = (("sentence_bert_config.json", ("max_seq_length",)),
             ("tokenizer_config.json", ("model_max_length",)),
             ("config.json", ("max_position_embeddings", "n_positions", "max_sequence_length")))
    for fname, fields in rules:
        for folder in folders:
            data = _read_json(Path(folder) / fname)
            for fld in fields:
                v = data.get(fld)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < _HF_UNSET:
                    return int(v), f"{Path(folder) / fname} {fld}"
    return DEFAULT_MAX_LENGTH, "default"


def sha256_of(path: Path) -> str:
    """sha256 of a (small) file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TextSource(Source):
    """Tokenized text samples as model inputs, batched by equal length so no padding is ever fed.

    Tokenizes everything once in ``__init__`` (the lengths decide the batches; the Rust tokenizer is fast); keeps
    the ids in one flat int64 array. ``batches`` groups equal lengths; ``fetch`` builds every model input for one
    group (``hf_inputs``).

    Args:
        path: a .txt/.jsonl file or a folder of them.
        specs: the model inputs to feed.
        model_path: the ONNX file (its folder holds tokenizer.json and config.json in HF export layouts).
        opts: tokenizer, text field, max length, truncation.
    """

    def __init__(self, path: str | os.PathLike, specs: list[InputSpec], model_path: str | os.PathLike | None,
                 opts: TextOptions | None = None):
        opts = opts or TextOptions()
        self.opts = opts
        self.specs = specs
        model_dir = Path(model_path).parent if model_path is not None else None
        self.tokenizer_path = find_tokenizer(model_path, opts.tokenizer)
        folders = [self.tokenizer_path.parent] + ([model_dir] if model_dir is not None else [])
        config = {}
        for folder in reversed(folders):   # the model's config.json wins over one beside the tokenizer
            config = read_hf_config(folder) or config
        genai = read_genai_config(model_dir) if model_dir is not None else None   # input names by role
        roles = genai.roles([s.name for s in specs]) if genai is not None else None
        self.plan: InputPlan = plan_inputs(specs, config, model_path or "the model", roles)
        if opts.max_length is not None:
            self.max_length, self.max_length_from = int(opts.max_length), "--max-length"
        else:
            self.max_length, self.max_length_from = default_max_length(folders)
        limit = self.plan.max_positions
        if limit is not None and self.max_length > limit:
            if opts.max_length is not None:
                raise OptionError(f"--max-length {self.max_length} exceeds the model's {limit} positions "
                                    "(config.json max_position_embeddings)")
            self.max_length, self.max_length_from = limit, "config.json max_position_embeddings"
        fixed = self.plan.fixed_length
        self.packed: Packed | None = None
        self.separator: str | None = None
        if opts.pack is not None:
            self.max_length, self.max_length_from = int(opts.pack), "pack"
            if limit is not None and self.max_length > limit:
                raise OptionError(f"pack length {self.max_length} exceeds the model's {limit} positions "
                                    "(config.json max_position_embeddings)")
            if fixed is not None and fixed != self.max_length:
                raise ModelError(f"{model_path}: input {self.plan.ids_name!r} has a fixed sequence length of "
                                    f"{fixed}; pack rows of {fixed} tokens")
        elif fixed is not None:
            raise ModelError(f"{model_path}: input {self.plan.ids_name!r} has a fixed sequence length of {fixed}; "
                                "every sample would need padding, which would count in the statistics. Export the "
                                f"model with a dynamic sequence axis, or pack rows of {fixed} tokens")
        tok = TextTokenizer(self.tokenizer_path)
        samples = read_texts(path, opts.text_field)
        self.samples = samples
        where = [f"{s.file}:{s.line}" for s in samples]
        if opts.pack is None:
            self.tokens = tok.tokenize([s.text for s in samples], self.max_length, truncate=opts.truncate,
                                       where=where)
        else:   # whole documents (never truncated), joined and cut into rows of exactly the pack length
            sep_id, self.separator = find_separator(tok.tok, folders)
            self.packed = pack(tokenize(tok.tok, [s.text for s in samples], None, where=where), sep_id,
                               self.max_length)
            rows = self.packed.rows
            if rows.shape[0] == 0:
                raise DataError(f"{path}: {self.packed.stream_tokens} tokens in all, fewer than one packed row "
                                    f"of {self.max_length}; pack shorter rows or add text")
            self.tokens = Tokenized(rows.reshape(-1), np.arange(rows.shape[0] + 1, dtype=np.int64) * rows.shape[1],
                                    [])
        self.lengths = self.tokens.lengths
        self.path = Path(path)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def notes(self) -> list[str]:
        """Warnings for the user (truncated samples; the packed stream's dropped tail)."""
        if self.packed is not None:
            p = self.packed
            if not p.dropped_tokens:
                return []
            return [f"packed {p.documents} documents ({p.stream_tokens} tokens with {self.separator!r} between "
                    f"documents) into {p.rows.shape[0]} rows of {self.max_length} tokens; the last "
                    f"{p.dropped_tokens} tokens (a partial row) are not used"]
        n = len(self.tokens.truncated)
        if not n:
            return []
        first = self.samples[self.tokens.truncated[0]]
        limit = "" if self.max_length_from == "--max-length" else f"the limit is from {self.max_length_from}; "
        return [f"{n} of {len(self)} text samples were longer than {self.max_length} tokens and were truncated "
                f"(first: {first.file}:{first.line}; {limit}--max-length sets it, --no-truncate refuses long samples)"]

    def record(self) -> dict[str, Any]:
        """What the masks metadata keeps about this data (tokenizer, lengths, field)."""
        rec = {"kind": "text", "tokenizer": str(self.tokenizer_path.resolve()),
                "tokenizer_sha256": sha256_of(self.tokenizer_path),
                "max_length": self.max_length, "max_length_from": self.max_length_from,
                "text_field": self.opts.text_field, "truncate": self.opts.truncate,
                "truncated": len(self.tokens.truncated), "tokens": int(self.tokens.offsets[-1]),
                "padding": "none (equal-length batches)"}
        if self.packed is not None:
            rec.update({"padding": "none (packed rows)", "truncated": 0,
                        "packing": {"length": self.max_length, "separator": self.separator,
                                    "documents": self.packed.documents, "rows": int(self.packed.rows.shape[0]),
                                    "stream_tokens": self.packed.stream_tokens,
                                    "dropped_tokens": self.packed.dropped_tokens}})
        return rec

    def batches(self, order: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Batches of equal-length samples: ``order``'s samples sorted by length (ties in ``order``), each run of
        one length cut into batch_size pieces."""
        order = np.asarray(order, dtype=np.int64)
        if self.plan.fixed_batch is not None:
            batch_size = self.plan.fixed_batch
        lengths = self.lengths[order]
        ranked = order[np.lexsort((np.arange(order.size), lengths))]
        runs = np.flatnonzero(np.diff(self.lengths[ranked])) + 1
        out: list[np.ndarray] = []
        for group in np.split(ranked, runs):
            out.extend(group[i:i + batch_size] for i in range(0, group.size, batch_size))
        return [b for b in out if b.size]

    def fetch(self, indices: np.ndarray, pool: cf.Executor | None = None) -> dict[str, np.ndarray]:
        lengths = set(int(self.lengths[i]) for i in indices)
        if len(lengths) != 1:   # only batches() makes batches for this source
            raise RuntimeFailure("internal: a text batch mixes sequence lengths (padding would count)")
        ids = np.stack([self.tokens.sample(int(i)) for i in indices])
        return self.plan.build(ids)
