"""ONNX export of a Hugging Face decoder's body for `select` (until ``fps-graph export hf:DIR`` covers it).

The exported module is the transformer body (``model.model``: embeddings, blocks, final norm) behind a wrapper
whose attribute is called ``model``, so every weight keeps the parameter name it has in both
``*ForCausalLM`` and ``*ForSequenceClassification`` (``model.layers.0.self_attn.q_proj.weight``): one masks file
serves both tasks. The LM head (tied to the input embedding in both models of the study) is left out, so
selection covers exactly the blocks' Linear layers, the modules LoRA adapts. Inputs ``input_ids`` and
``attention_mask`` (dynamic batch and sequence), output ``last_hidden_state``; ``use_cache=False``; TorchScript
exporter, opset 17; weights as external data (one file) so a 0.5B model in fp32 stays under protobuf's 2 GB.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json")


def export_body(folder: Path, out_dir: Path, force: bool = False) -> Path:
    """out_dir/model.onnx (+ model.onnx.data) with the folder's tokenizer files beside it; returns out_dir."""
    import onnx
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "model.onnx").is_file() and not force:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    class Body(nn.Module):
        def __init__(self, body: nn.Module):
            super().__init__()
            self.model = body

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    body = Body(lm.model).eval()
    ids = torch.randint(10, 1000, (2, 8))
    am = torch.ones(2, 8, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}}
    raw = tmp / "raw"
    raw.mkdir()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(body, (ids, am), str(raw / "model.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamic_axes=axes, dynamo=False, opset_version=17,
                          do_constant_folding=False)
    del lm, body
    proto = onnx.load(str(raw / "model.onnx"))
    onnx.save(proto, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    del proto
    shutil.rmtree(raw)
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).is_file():
            shutil.copy2(Path(folder) / name, tmp / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
