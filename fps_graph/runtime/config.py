"""How ONNX Runtime runs the observed graph: one frozen config, validated once, passed whole down to every session.

``RuntimeConfig`` travels from the caller (the CLI, ``fps_graph.select``) through ``selection.pipeline`` to
``collect_stats``/``BatchStats`` and, pickled, to every Ray worker; none of the layers re-validates or re-spells its
fields. The help text of each field lives in its metadata, and the CLI reads it from there (with the choices of the
``Literal`` modes), so the two cannot drift.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, get_args

from fps_graph.errors import OptionError
from fps_graph.runtime.micro import check_micro

__all__ = ["RuntimeConfig", "Reduce", "Provider", "OptLevel", "REDUCE_MODES", "PROVIDERS", "OPT_LEVELS",
           "runtime_of"]

Reduce = Literal["graph", "host"]
Provider = Literal["auto", "cuda", "cpu"]
OptLevel = Literal["disable", "basic", "extended", "all"]
REDUCE_MODES: tuple[str, ...] = get_args(Reduce)
PROVIDERS: tuple[str, ...] = get_args(Provider)
OPT_LEVELS: tuple[str, ...] = get_args(OptLevel)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class RuntimeConfig:
    """The ONNX Runtime knobs of a calibration run (none of them changes the statistics' meaning).

    Args:
        reduce (`str`, defaults to ``"graph"``): where activations are reduced to sums.
        provider (`str`, defaults to ``"auto"``): the execution provider.
        opt_level (`str`, defaults to ``"all"``): ONNX Runtime's graph optimisation level.
        threads (`int`, *optional*): intra-op threads (None: ONNX Runtime's default).
        micro_batch (`int`, *optional*): run each batch in slices of this many samples.
        max_memory_mb (`float` or ``"auto"``, *optional*): or in slices sized to keep peak memory near this many
            MB ("auto": near the floor); None: sliced only where the observed graph would need more than plain
            inference.

    Example:
        >>> from fps_graph import RuntimeConfig
        >>> RuntimeConfig(provider="cpu", max_memory_mb=600).provider
        'cpu'
    """

    reduce: Reduce = field(default="graph", metadata=_help(
        "graph: reduce activations inside ONNX Runtime; host: return them raw and reduce in NumPy."))
    provider: Provider = field(default="auto", metadata=_help(
        "ONNX Runtime execution provider: auto (CUDA where usable, else CPU), cuda (refuse without a usable GPU), cpu."))
    opt_level: OptLevel = field(default="all", metadata=_help("ONNX Runtime graph optimisation level."))
    threads: int | None = field(default=None, metadata=_help("ONNX Runtime intra-op threads [default: ONNX Runtime's]."))
    micro_batch: int | None = field(default=None, metadata=_help(
        "Run each batch in micro-batches of this many samples (same statistics, summed)."))
    max_memory_mb: float | str | None = field(default=None, metadata=_help(
        "Keep peak memory near MB: each batch runs in micro-batches sized from the model's activation bytes per "
        "sample (same statistics, summed). auto: close to the floor (weights + runtime + one micro-batch whose "
        "activations stay under a quarter of the weights). Default: micro-batches only where the observed graph "
        "would need more than plain inference of the same batch."))

    def __post_init__(self) -> None:
        if self.reduce not in REDUCE_MODES:
            raise OptionError(f"unknown reduce mode {self.reduce!r} (use {' or '.join(REDUCE_MODES)})")
        if self.provider not in PROVIDERS:
            raise OptionError(f"unknown provider {self.provider!r} (use {', '.join(PROVIDERS)})")
        if self.opt_level not in OPT_LEVELS:
            raise OptionError(f"unknown optimisation level {self.opt_level!r} (use {', '.join(OPT_LEVELS)})")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 0):
            raise OptionError(f"threads must be a non-negative integer (got {self.threads!r})")
        if self.threads == 0:
            object.__setattr__(self, "threads", None)      # 0 means ONNX Runtime's default, as in ORT itself
        check_micro(self.micro_batch, self.max_memory_mb)

    @staticmethod
    def help(name: str) -> str:
        """The help text of a field (the CLI's option help)."""
        return next(f.metadata["help"] for f in dataclasses.fields(RuntimeConfig) if f.name == name)

    def replace(self, **changes: Any) -> "RuntimeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (job files, run records)."""
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(RuntimeConfig))


def runtime_of(runtime: RuntimeConfig | None, loose: Mapping[str, Any], where: str) -> RuntimeConfig:
    """The config of a call that may still pass the knobs one by one (``reduce="host"``): the old spelling keeps
    working for one release, with a DeprecationWarning."""
    unknown = sorted(set(loose) - set(FIELDS))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s): {', '.join(unknown)}")
    if not loose:
        return runtime if runtime is not None else RuntimeConfig()
    if runtime is not None:
        raise TypeError(f"{where}(): give runtime=RuntimeConfig(...) or the loose knobs ({', '.join(loose)}), not both")
    warnings.warn(f"{where}(..., {'=..., '.join(loose)}=...) is deprecated: pass runtime=RuntimeConfig(...)",
                  DeprecationWarning, stacklevel=3)
    return RuntimeConfig(**loose)
