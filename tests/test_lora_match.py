"""LoRA rank matching (fps_graph.integrations.lora_match): PEFT's own trainable count per module equals
r * (in + out), and agrees with the selection's count within half of (in + out)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from hf_helpers import llama_config  # noqa: E402

from fps_graph.integrations.lora_match import match_lora  # noqa: E402


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(hidden_size=32, intermediate_size=88, num_attention_heads=4,
                                         num_key_value_heads=2))


def test_peft_counts_equal_the_matched_counts():
    model = _model()
    rng = np.random.default_rng(0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()
              if n.endswith("proj.weight") and "layers" in n}
    # a selection of 1.0-3.4x (in + out) entries per module, different in every module
    counts = {n: int(rng.uniform(1.0, 3.4) * sum(s)) for n, s in shapes.items()}
    m = match_lora(counts, shapes)
    assert not m.unmatched
    pm = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **m.peft_kwargs()))
    got: dict[str, int] = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert "lora_" in name, name
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            got[module] = got.get(module, 0) + p.numel()
    assert got == m.lora_counts                     # PEFT's count, module by module
    for module, n in m.sparse_counts.items():
        out_f, in_f = shapes[module + ".weight"]
        assert abs(got[module] - n) <= (in_f + out_f) / 2, module   # within LoRA's rounding
        assert got[module] == round(n / (in_f + out_f)) * (in_f + out_f)
    # alpha / r is the same in every module (alpha_pattern)
    scales = {float(mod.scaling["default"]) for mod in pm.modules() if isinstance(getattr(mod, "scaling", None), dict)
              and "default" in mod.scaling}
    assert scales == {2.0}


def test_small_selections_are_reported_unmatched():
    shapes = {"a.weight": (8, 24), "b.weight": (8, 24)}
    m = match_lora({"a.weight": 15, "b.weight": 16}, shapes)     # (in + out) / 2 = 16
    assert m.unmatched == ("a",)
    assert m.ranks == {"a": 1, "b": 1}
    assert m.lora_total == 64 and m.sparse_total == 31
    with pytest.raises(ValueError, match="2-D"):
        match_lora({"c.weight": 3}, {"c.weight": (2, 2, 2)})
