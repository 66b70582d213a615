"""The trained delta as a PEFT SHiRA adapter, so that ``peft.PeftModel.from_pretrained`` loads it.

PEFT's SHiRA (``peft.tuners.shira``, 0.21) keeps, per adapted ``nn.Linear``, a 1-D ``shira_weight`` over fixed
``shira_indices`` [2, N] (row, column) added to the frozen weight: the same thing as an fps-graph delta. Its
constraints, read in ``shira/layer.py`` and ``shira/model.py``: Linear layers only; one ``r`` for every adapted
layer (no per-layer ranks); exactly ``N = r * (in + out)`` entries in each layer and ``N <= in * out``.

A selection fits when, with ``r = max over layers of ceil(selected / (in + out))``, every layer can hold
``r * (in + out)`` entries. Layers with fewer selected entries are padded with zero-valued entries at the first
unselected positions (row-major): they change nothing, so the adapter's outputs equal the fine-tuned model's
bit for bit (trained further with PEFT, the padding would train too). K-per-neuron top-K on a layer with
``out`` rows selects ``out * K``; with ``in == out`` (square projections) that is ``r = ceil(K / 2)``.
Not representable (one-line error each): a delta on a Conv, Embedding or other non-Linear weight; a weight tied
to another module (a tied LM head/input embedding: exclude its mask key from the selection); a layer too small
for the common ``r``; a tensor trained in full whose module is also adapted sparsely (a bias: ``--no-train-bias``)
or that belongs to no submodule. Tensors trained in full go to ``modules_to_save`` (whole modules).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fps_graph.errors import ModelError, OptionError, RuntimeFailure
from fps_graph.formats.io import atomic_output
from fps_graph.training.loop import Callbacks

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class ShiraPlan:
    """How a trained handle maps onto SHiRA: r, the Linear modules adapted, and the modules saved in full."""

    r: int
    targets: dict[str, str]                      # delta key -> module name
    modules_to_save: list[str]
    padding: dict[str, int] = field(default_factory=dict)   # zero-valued entries added per key

    def to_json(self) -> dict[str, Any]:
        """A record for metrics and run files."""
        return {"r": self.r, "target_modules": sorted(self.targets.values()), "modules_to_save": self.modules_to_save,
                "padded_entries": int(sum(self.padding.values()))}


def shira_plan(handle: Any) -> ShiraPlan:
    """The SHiRA layout of a trained handle, or a ModelError saying which tensor SHiRA cannot hold and why."""
    from torch import nn

    names = {id(m): n for n, m in handle.model.named_modules()}
    targets: dict[str, str] = {}
    sizes: dict[str, tuple[int, int, int]] = {}
    for key, d in handle.deltas.items():
        owners = handle.owners(key)
        if len(owners) > 1:
            tied = ", ".join(f"{names[id(m)]}.{a}" for m, a in owners)
            masks = getattr(handle, "masks", None)
            selected_as = ((masks.info.get(key) or {}).get("mask_key") if masks is not None else None) or key
            raise ModelError(f"SHiRA cannot hold the delta on {key}: it is tied ({tied}) and SHiRA adapts one "
                                f"Linear module at a time; select without it (--exclude '{selected_as}')")
        module, attr = owners[0]
        if not isinstance(module, nn.Linear) or attr != "weight":
            raise ModelError(f"SHiRA cannot hold the delta on {key}: it adapts nn.Linear weights only, this is "
                                f"{type(module).__name__.removeprefix('Parametrized')}.{attr}")
        targets[key] = names[id(module)]
        sizes[key] = (int(d.index.numel()), module.in_features, module.out_features)
    if not targets:
        raise ModelError("SHiRA needs at least one sparsely trained Linear weight; this run has none")
    r = max(math.ceil(n / (i + o)) for n, i, o in sizes.values())
    for key, (n, i, o) in sizes.items():
        if r * (i + o) > i * o:
            worst = max(sizes, key=lambda k: math.ceil(sizes[k][0] / (sizes[k][1] + sizes[k][2])))
            raise ModelError(f"SHiRA cannot hold this selection: one r for all layers, r = {r} (from {worst}, "
                                f"{sizes[worst][0]} selected), needs {r * (i + o)} entries in {key}, which has "
                                f"{i * o}; select fewer entries per layer (a smaller --k or --budget)")
    sparse_modules = set(targets.values())
    to_save: set[str] = set()
    for key in handle.full:
        prefix = key.rpartition(".")[0]
        owners = [names[id(m)] for m in handle.model.modules() for q in m._parameters.values()
                  if q is handle.full[key]] or [prefix]
        for owner in owners:
            if owner in sparse_modules:
                raise ModelError(f"SHiRA cannot hold {key}, trained in full in a layer it adapts sparsely; train "
                                    "with --no-train-bias (or without that --train-full pattern)")
            if not owner:
                raise ModelError(f"SHiRA cannot hold {key}: a parameter of the model itself, not of a submodule")
            to_save.add(owner)
    padding = {k: r * (i + o) - n for k, (n, i, o) in sizes.items()}
    return ShiraPlan(r, targets, sorted(to_save), padding)


def shira_tensors(handle: Any, plan: ShiraPlan) -> dict[str, Any]:
    """adapter_model.safetensors' tensors: per target `shira_indices` [2, N] int32 and `shira_weight` [N] float32
    (selected deltas, then zero padding at the first unselected positions), plus modules_to_save state."""
    import torch

    out: dict[str, torch.Tensor] = {}
    modules = dict(handle.model.named_modules())
    for key, mod_name in plan.targets.items():
        d = handle.deltas[key]
        lin = modules[mod_name]
        n_in = lin.in_features
        sel = d.index.detach().cpu().numpy().astype(np.int64)
        pad = plan.padding[key]
        extra = np.empty(0, dtype=np.int64)
        if pad:
            free = np.ones(lin.in_features * lin.out_features, dtype=bool)
            free[sel] = False
            extra = np.flatnonzero(free)[:pad]
        flat = np.concatenate([sel, extra])
        values = np.concatenate([d.effective().detach().cpu().float().numpy(), np.zeros(pad, dtype=np.float32)])
        order = np.argsort(flat, kind="stable")          # row-major, as SHiRA's own masks come out
        flat, values = flat[order], values[order]
        base = f"base_model.model.{mod_name}"
        out[f"{base}.shira_indices"] = torch.from_numpy(np.stack([flat // n_in, flat % n_in]).astype(np.int32))
        out[f"{base}.shira_weight"] = torch.from_numpy(np.ascontiguousarray(values))
    for mod_name in plan.modules_to_save:
        for k, v in modules[mod_name].state_dict().items():
            out[f"base_model.model.{mod_name}.{k}"] = v.detach().cpu().contiguous().clone()
    return out


def write_shira(handle: Any, folder: str | os.PathLike, plan: ShiraPlan | None = None, *,
                base_model: str | None = None, task: str | None = None, force: bool = False) -> ShiraPlan:
    """Write adapter_config.json and adapter_model.safetensors (PEFT SHiRA) into folder, atomically each.

    Args:
        handle (`SparseFineTune`): a trained handle (``attach``/``load_delta``), deltas not merged.
        folder (`str`): where to write; created when missing.
        plan (`ShiraPlan`, *optional*): from ``shira_plan(handle)``; computed when omitted.
        base_model (`str`, *optional*): recorded as ``base_model_name_or_path``.
        task (`str`, *optional*): "causal-lm" or "seq-cls" set PEFT's ``task_type``.

    Example:
        ```py
        plan = write_shira(handle, "adapter/")
        peft_model = PeftModel.from_pretrained(base_model, "adapter/")   # same outputs as the trained model
        ```
    """
    try:
        from peft import ShiraConfig
    except ImportError as exc:
        raise RuntimeFailure("writing a PEFT adapter needs peft >= 0.16: pip install peft") from exc
    from safetensors.torch import save_file

    plan = plan or shira_plan(handle)
    if getattr(handle, "merged", False):
        raise OptionError("unmerge() the handle before writing a SHiRA adapter")
    cfg = ShiraConfig(r=plan.r, target_modules=sorted(plan.targets.values()),
                      modules_to_save=plan.modules_to_save or None, base_model_name_or_path=base_model,
                      task_type={"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}.get(task or ""),
                      inference_mode=True)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        cfg.save_pretrained(tmp)
        text = (Path(tmp) / ADAPTER_CONFIG).read_text()
    config = json.loads(text)
    with atomic_output(out / ADAPTER_WEIGHTS, force) as tmp_w:
        save_file(shira_tensors(handle, plan), str(tmp_w), metadata={"format": "pt"})
    with atomic_output(out / ADAPTER_CONFIG, force) as tmp_c:
        tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return plan


class ShiraExport(Callbacks):
    """`train --peft`: refuse before training when SHiRA cannot hold the selection, write the adapter after."""

    def __init__(self) -> None:
        self.plan: ShiraPlan | None = None

    def on_attach(self, handle: Any) -> None:
        if getattr(handle, "kind", None) != "sparse":
            raise OptionError("a SHiRA adapter holds sparse deltas; this run trains a "
                                f"{getattr(handle, 'kind', type(handle).__name__)} adapter")
        self.plan = shira_plan(handle)

    def on_end(self, handle: Any, folder: Path | None, metrics: dict[str, Any]) -> dict[str, str]:
        if folder is None or self.plan is None:
            return {}
        task = metrics.get("task")
        write_shira(handle, folder, self.plan, base_model=metrics.get("model", {}).get("base_model"),
                    task=task if task in ("causal-lm", "seq-cls") else None, force=True)
        metrics["peft"] = {"type": "SHIRA", **self.plan.to_json()}
        return {"adapter_config": str(folder / ADAPTER_CONFIG), "adapter_model": str(folder / ADAPTER_WEIGHTS)}


__all__ = ["ShiraPlan", "ShiraExport", "shira_plan", "shira_tensors", "write_shira"]
