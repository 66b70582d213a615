"""bench/headline.py: README's headline rows come from the results files' own numbers (checked here on a made-up
LM-study report: means over seeds, the paired difference as recorded, the floor verdict), and a partial report
leaves the row alone."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import headline  # noqa: E402


def _report(partial: bool = False) -> dict:
    cells = {"fps@0.3%": {"values": [80.0, 82.0, 78.0]}, "random@0.3%": {"values": [81.0, 80.0, 79.0]},
             "lora@0.3%": {"values": [70.0, 72.0, 71.0]}, "head": {"values": [60.0, 62.0, 61.0]},
             "full": {"values": [85.0, 86.0, 87.0]}, "fps@0.05%": {"values": [50.0, 51.0, 52.0]},
             "fps@1.2%": {"values": [90.0, 91.0, 95.0]}}
    lm = {"fps@0.3%": {"values": [30.0, 31.0, 32.0]}, "random@0.3%": {"values": [33.0, 33.0, 33.0]},
          "none": {"values": [45.0, 45.0, 45.0]}}
    return {"partial": {"main_runs_done": 1} if partial else False,
            "plan": {"budgets": [0.0005, 0.003, 0.012], "seeds": 3},
            "experiments": {
                "smollm2-135m/trec": {"cells": cells, "paired": {"fps": {"random": {"n": 3, "mean_pp": 0.25,
                                                                                    "sem_pp": 0.5}}},
                                      "never_below_floor": {"worst": [1, "0.3%", 18.0]}},
                "smollm2-135m/shakespeare": {"cells": lm, "paired": {"fps": {"random": {"n": 3, "mean_pp": 4.0,
                                                                                        "sem_pp": 1.0}}},
                                             "never_below_floor": {"worst": [0, "0.3%", 1.5]}}}}


def test_quality_row_quotes_the_reports_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(headline, "RESULTS", tmp_path)
    (tmp_path / "quality_lm.json").write_text(json.dumps(_report()))
    what, text, where = headline.quality_lm_row()
    assert what == "quality, same trainable count" and where == "[quality](docs/quality.md)"
    assert "(0.05/0.3/1.2% per layer)" in text
    assert "fps 51.0/80.0/92.0, random -/80.0/-, LoRA -/71.0/-, full 86.0, head only 61.0" in text
    assert "fps minus random +0.2 ± 0.5 pp over 3 seeds (mean of the budgets); default never below the floor" in text
    assert "fps -/31.0/-, random -/33.0/-, pretrained 45.0" in text
    assert "default recipe **below** the floor once" in text      # perplexity 1.5 above the pretrained model's


def test_partial_report_keeps_the_row(tmp_path, monkeypatch):
    monkeypatch.setattr(headline, "RESULTS", tmp_path)
    (tmp_path / "quality_lm.json").write_text(json.dumps(_report(partial=True)))
    assert headline.quality_lm_row() is None
    rows = ["| what | measured | where |", "| --- | --- | --- |", "| quality, same trainable count | old | x |"]
    lines, missing = headline.table(rows)
    assert "| quality, same trainable count | old | x |" in lines and "quality_lm_row" in missing
