"""README's headline table, regenerated from the results files (never typed by hand).

    python -m bench.headline            # rewrite the table between <!-- headline --> and <!-- /headline --> in README.md
    python -m bench.headline --check    # exit 1 if README.md's table differs from what the results files give

Every figure comes from one results JSON under bench/results/, and every ratio divides two numbers of the *same*
run (methods measured side by side, in one command). A row whose results file is missing keeps its current text
and is named on stderr; rows no generator makes (the quality study, the end-to-end sample) are kept as they are.
The load average of each run is quoted with it: above the core count, wall times are not quiet-machine times.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START, END = "<!-- headline -->", "<!-- /headline -->"
HEAD = ["| what | measured | where |", "| --- | --- | --- |"]

# results files behind the rows (the commands that make them: bench/README.md, "Headline runs")
VIT = "vit-b16_b32_n64-headline-cpu"
LLM = "llama-1b_b4_n16x128-cpu"
CONV = "convnets_b1-cpu"
PACK = "text_pack-cpu"
PADDING = "text_padding-cpu"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _link(name: str) -> str:
    return f"[results](bench/results/{name}.md)"


def _load_note(loads: list[float], cores: int | None) -> str:
    hi = max(loads) if loads else 0.0
    if cores and hi > cores:
        span = f"{min(loads):.0f}" if round(min(loads)) == round(hi) else f"{min(loads):.0f}-{hi:.0f}"
        return f"load {span} on {cores} cores: busy, times to be rerun"
    return f"load {hi:.1f}"


def vit_row() -> tuple[str, str, str] | None:
    res = _load(VIT)
    if res is None:
        return None
    by = {s["method"]: s for s in res["summary"] if s.get("ok")}
    need = {"ours", "ours-lean", "plain", "gps"}
    if not need <= set(by):
        return None
    med = lambda m, k: by[m][k]["median"]   # noqa: E731
    loads = [r["load_before"] for r in res["runs"]]
    text = (f"default {med('ours', 'peak_rss_mb'):,.0f} MB = {med('ours', 'peak_rss_mb') / med('plain', 'peak_rss_mb'):.2f}x "
            f"plain ORT inference ({med('plain', 'peak_rss_mb'):,.0f} MB); `--max-memory auto` "
            f"{med('ours-lean', 'peak_rss_mb'):,.0f} MB, GPS-style {med('gps', 'peak_rss_mb'):,.0f} MB = "
            f"**{med('gps', 'peak_rss_mb') / med('ours-lean', 'peak_rss_mb'):.1f}x**; time vs plain: default "
            f"{med('ours', 'total_s') / med('plain', 'total_s'):.2f}x, auto "
            f"{med('ours-lean', 'total_s') / med('plain', 'total_s'):.2f}x "
            f"({_load_note(loads, res['machine'].get('cpu_count'))})")
    return "selection memory and time, ViT-B/16, batch 32", text, _link(VIT)


def llm_row() -> tuple[str, str, str] | None:
    res = _load(LLM)
    if res is None:
        return None
    runs = [r for r in res["runs"] if r["rc"] == 0]
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    if "ours" not in by or "plain" not in by:
        return None

    def med(m: str, k: str) -> float:
        v = sorted(r[k] for r in by[m])
        return v[len(v) // 2]

    gps = f"; GPS-style {med('gps', 'peak_rss_mb'):,.0f} MB ({med('gps', 'peak_rss_mb') / med('ours', 'peak_rss_mb'):.2f}x)" \
        if "gps" in by else ""
    loads = [r["load_before"] for r in runs]
    cores = None
    machine = res.get("machine")
    if isinstance(machine, dict):
        cores = machine.get("cores") or machine.get("cpu_count")
    elif isinstance(machine, str) and machine.split(" ")[0].isdigit():
        cores = int(machine.split(" ")[0])
    seqs, length = res["settings"]["sequences"], res["settings"]["length"]
    text = (f"select {med('ours', 'peak_rss_mb'):,.0f} MB = {med('ours', 'peak_rss_mb') / med('plain', 'peak_rss_mb'):.2f}x "
            f"plain ORT inference{gps}; time {med('ours', 'total_s') / med('plain', 'total_s'):.2f}x plain "
            f"(pass {med('ours', 'pass_s') / med('plain', 'pass_s'):.2f}x; {_load_note(loads, cores)})")
    return f"1.1B Llama decoder, {seqs} x {length} tokens", text, _link(LLM)


def conv_row() -> tuple[str, str, str] | None:
    res = _load(CONV)
    if res is None:
        return None
    parts = []
    for name, r in res["summary"].items():
        if r.get("ours") and r.get("plain"):
            parts.append(f"{name} {r['ours']['total_s']['median'] / r['plain']['total_s']['median']:.2f}x")
    if not parts:
        return None
    loads = [r["load_before"][0] for r in res["runs"]]
    return ("conv nets at batch 1, select time / plain inference",
            ", ".join(parts) + f"; {_load_note(loads, res['meta']['machine'].get('cores'))}", _link(CONV))


def pack_row() -> tuple[str, str, str] | None:
    res = _load(PACK)
    if res is None or not res["summary"].get("bucketed", {}).get("ok"):
        return None
    b = res["summary"]["bucketed"]
    parts = []
    for m, r in res["summary"].items():
        if m == "bucketed" or not r.get("ok"):
            continue
        c = res["vs_exact"].get(m, {})
        parts.append(f"`--pack {m.split('-', 1)[1]}` {r['tokens_per_s']['median'] / b['tokens_per_s']['median']:.1f}x"
                     + (f" ({100 * c['picks_differ'] / c['picks']:.0f}% of top-1 picks differ)" if c else ""))
    loads = [r["load_before"][0] for r in res["runs"]]
    return (f"long documents ({res['docs']} docs of {res['doc_tokens']['min']}-{res['doc_tokens']['max']} tokens)",
            "tokens/s against exact equal-length batches: " + ", ".join(parts)
            + f"; {_load_note(loads, res['meta']['machine'].get('cores'))}", _link(PACK))


def padding_row() -> tuple[str, str, str] | None:
    res = _load(PADDING)
    if res is None:
        return None
    m = res["models"]["all-MiniLM-L6-v2"]["methods"]
    p = m["padded"]["vs_exact"]
    return ("text padding", f"padded batches changed {100 * p['selected_differ'] / p['selected']:.0f}% of MiniLM's "
            f"top-1 picks; equal-length batches are exact and fastest ({m['bucketed']['pass_s_median']:.0f} s vs "
            f"{m['padded']['pass_s_median']:.0f} s padded, load {res['load_start']:.0f})", "[text](docs/text.md)")


QUALITY_LM = "quality_lm"
TASK_NAMES = {"trec": "TREC accuracy %", "shakespeare": "tiny-shakespeare perplexity", "sms": "SMS spam accuracy %"}
SHORT = {"fps": "fps", "random": "random", "lora": "LoRA", "full": "full", "head": "head only", "none": "pretrained"}


def quality_lm_row() -> tuple[str, str, str] | None:
    """The LM study (bench/quality_lm): per task, test scores at every budget (mean over seeds at each method's
    rate chosen on validation; "-" where a method did not run), fps minus random paired over seeds (mean of the
    budgets), and the default recipe against the floor. None while the study's report is partial."""
    res = _load(QUALITY_LM)
    if res is None or res.get("partial") or not res.get("experiments"):
        return None
    labels = [f"{b * 100:g}%" for b in res["plan"]["budgets"]]
    label = "/".join(x.rstrip("%") for x in labels) + "%"
    parts = []
    for name, sec in res["experiments"].items():
        model, task = name.split("/")
        cells = sec["cells"]
        mean = lambda key: sum(cells[key]["values"]) / len(cells[key]["values"])   # noqa: E731
        causal = task == "shakespeare"
        scores = [f"{SHORT[m]} " + "/".join(f"{mean(f'{m}@{b}'):.1f}" if cells.get(f"{m}@{b}", {}).get("values")
                                             else "-" for b in labels)
                  for m in ("fps", "random", "lora") if any(cells.get(f"{m}@{b}", {}).get("values") for b in labels)]
        scores += [f"{SHORT[m]} {mean(m):.1f}" for m in ("full", "head", "none") if cells.get(m, {}).get("values")]
        pr = sec["paired"].get("fps", {}).get("random", {})
        diff = ""
        if pr.get("n", 0) >= 2:
            unit = "(loss x100, + = better)" if causal else "pp"
            diff = (f"; fps minus random {pr['mean_pp']:+.1f} ± {pr['sem_pp']:.1f} {unit} over {pr['n']} seeds "
                    "(mean of the budgets)")
        floor = sec.get("never_below_floor") or {}
        worst = floor.get("worst")
        fl = ""
        if worst:
            below = worst[2] > 0 if causal else worst[2] < 0
            fl = "; default recipe **below** the floor once" if below else "; default never below the floor"
        parts.append(f"{TASK_NAMES.get(task, task)} ({label} per layer): " + ", ".join(scores) + diff + fl)
    seeds = res["plan"].get("seeds")
    text = (f"pretrained LM (SmolLM2-135M), test, {seeds} seeds, each method at its own best rate: "
            + "; ".join(parts) + ". Small models: FPS +1.5 / +1.0 pp over random on CREPE, -1.6 on a CNN")
    return "quality, same trainable count", text, "[quality](docs/quality.md)"


GENERATORS: list[Callable[[], tuple[str, str, str] | None]] = [vit_row, llm_row, conv_row, padding_row, pack_row,
                                                              quality_lm_row]
# the first cell of the row each generator replaces, when the README's wording was different
REPLACES = {"vit_row": ("selection memory, ViT-B/16, batch 32", "selection time, same runs",
                        "selection memory and time, ViT-B/16, batch 32"),
            "llm_row": ("1.1B Llama decoder",), "conv_row": ("conv nets at batch 1",),
            "padding_row": ("text padding",), "pack_row": ("long documents",),
            "quality_lm_row": ("quality, same trainable count",)}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table(current: list[str]) -> tuple[list[str], list[str]]:
    """The new table lines, and the generators that had no results (their rows kept)."""
    rows = [line for line in current if line.startswith("|") and not line.startswith("| ---")][1:]
    missing: list[str] = []
    made: dict[str, tuple[str, str, str]] = {}
    for gen in GENERATORS:
        row = gen()
        if row is None:
            missing.append(gen.__name__)
        else:
            made[gen.__name__] = row
    out: list[str] = []
    placed: set[str] = set()
    after = 0                       # new rows go after the last generated row already in the table
    for line in rows:
        first = _cells(line)[0]
        owner = next((g for g, firsts in REPLACES.items() if any(first.startswith(f) for f in firsts)), None)
        if owner in made:
            if owner not in placed:
                out.append("| " + " | ".join(made[owner]) + " |")
                placed.add(owner)
                after = len(out)
            continue
        out.append(line)
    new = ["| " + " | ".join(row) + " |" for g, row in made.items() if g not in placed]
    return HEAD + out[:after] + new + out[after:], missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    ap.add_argument("--readme", default=str(README))
    a = ap.parse_args(argv)
    path = Path(a.readme)
    text = path.read_text()
    if START not in text or END not in text:
        print(f"error: {path} has no {START} ... {END} markers around the headline table", file=sys.stderr)
        return 2
    before, rest = text.split(START, 1)
    current, after = rest.split(END, 1)
    lines, missing = table(current.strip("\n").splitlines())
    for name in missing:
        print(f"note: {name}: its results file is missing or incomplete; the row keeps its current text",
              file=sys.stderr)
    new = before + START + "\n" + "\n".join(lines) + "\n" + END + after
    if a.check:
        if new != text:
            print(f"{path}: the headline table differs from the results files (python -m bench.headline)",
                  file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    print(f"wrote the headline table of {path} ({len(lines) - 2} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
