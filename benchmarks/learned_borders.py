"""Can the network learn the borders between touching nuclei for the split into objects? (issue 16)

The split (genselfdiff.objects.split) loses most of its AJI at the borders between touching nuclei:
on the same predicted pixels a perfect split scores 0.10-0.13 more (docs/objects.md, "Where AJI
is lost"). Here the training masks, made from the true nucleus ids, teach those borders:

- ``plain``: nucleus or background, as every other benchmark;
- ``border``: a third class, *touching border*: nucleus pixels within ``--border-um`` of a
  different nucleus (a nucleus's free outline stays nucleus). The foreground is nucleus + border;
  the border cuts it, as a valley in the split's distance map (weighted by the interior's share of
  the foreground probability) or by taking the interiors as markers;
- ``levels``: ``--levels`` classes instead of one nucleus class, the distance to the nucleus's own
  outline as a share of its largest, in equal steps. The expected level is a learned energy with
  one peak per nucleus, flooded from its h-maxima or used as the split's weight.

Every target is trained on the same images, seed and patches: the first ``--trained`` images with
nucleus ids in the pool's order (benchmarks/_common.split), at full resolution (0.25 µm/px) with
128-px patches, the tiny preset from random weights, 2500 steps (docs/objects.md, "Fine-tuning at
full resolution"). Scoring runs each model on every other image with ids (the probabilities are
cached in ``WORK/probabilities``) and prints AJI, PQ and the count error of each way of cutting
objects, beside the default split, connected components and a perfect split of the same
foreground (a bound that knows the truth).

Usage (one training per process; two fit side by side on 2 cores, 45 minutes each):
  learned_borders.py train WORK --target plain|border|levels [--seed S] [--border-um 1] [--levels 4]
  learned_borders.py score WORK MODEL.pt [MODEL.pt ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import DATA, MPP, dice, read_rgb, split
from scipy import ndimage as ndi
from skimage.io import imread, imsave
from skimage.morphology import disk
from skimage.segmentation import watershed


def id_images(trained: int):
    """(training images, scored images) among the images with nucleus ids, in the pool's order then
    the held-out ones: the first ``trained`` are trained on, the others scored."""
    held, pool = split(DATA)
    with_ids = [p for p in list(pool) + list(held) if (DATA / "instances" / p.name).exists()]
    return with_ids[:trained], with_ids[trained:]


def border_target(ids: np.ndarray, radius_px: float) -> np.ndarray:
    """Class ids: 0 background, 1 nucleus, 2 nucleus within ``radius_px`` of another nucleus."""
    foot = disk(max(1, int(round(radius_px))))
    big = np.iinfo(ids.dtype).max
    higher = ndi.maximum_filter(ids, footprint=foot) != ids  # a larger id nearby
    lower = ndi.minimum_filter(np.where(ids > 0, ids, big), footprint=foot) != ids  # a smaller one
    out = (ids > 0).astype(np.uint8)
    out[(ids > 0) & (higher | lower)] = 2
    return out


def level_target(ids: np.ndarray, levels: int) -> np.ndarray:
    """Class ids: 0 background, 1..``levels`` the distance to the nucleus's own outline, as a share of its
    largest distance, in equal steps (so every nucleus peaks at ``levels`` in its middle and falls to 1
    at its outline, touching neighbours included)."""
    out = np.zeros(ids.shape, np.uint8)
    for k, box in enumerate(ndi.find_objects(ids), start=1):
        if box is None:
            continue
        box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
        own = ids[box] == k
        d = ndi.distance_transform_edt(own)
        out[box][own] = np.ceil(levels * d[own] / d.max()).clip(1, levels)
    return out


def targets(args, ids: np.ndarray) -> tuple:
    """(label image, class names, run name) of a training target."""
    if args.target == "border":
        return (border_target(ids, args.border_um / MPP), ["background", "nucleus", "touching border"],
                f"border{args.border_um:g}")
    if args.target == "levels":
        names = ["background"] + [f"nucleus level {k}" for k in range(1, args.levels + 1)]
        return level_target(ids, args.levels), names, f"levels{args.levels}"
    return (ids > 0).astype(np.uint8), ["background", "nucleus"], "plain"


def energy(prob: np.ndarray) -> np.ndarray:
    """A levels model's expected level as a share of the top level (0 background, 1 a nucleus's middle)."""
    k = np.arange(len(prob), dtype=np.float32)[:, None, None]
    return (prob * k).sum(0) / (len(prob) - 1)


def train(args) -> None:
    import torch

    from genselfdiff.train.finetune import FinetuneConfig, finetune

    torch.set_num_threads(1)
    train_images, _ = id_images(args.trained)
    folder = args.work / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    masks = []
    for p in train_images:
        ids = imread(DATA / "instances" / p.name).astype(np.int64)
        target, names, run = targets(args, ids)
        path = folder / f"{p.stem}_{run}.png"
        imsave(path, target, check_contrast=False)
        masks.append(path)
        print(f"{p.stem}: share of pixels per class {np.bincount(target.ravel()) / target.size}", flush=True)
    cfg = FinetuneConfig.from_preset("tiny", steps=args.steps, patch=128, batch=8, patience=0, seed=args.seed,
                                     class_names=names)
    out = args.work / f"{run}_s{args.seed}.pt"

    def tick(p):
        if p.done and p.done % 100 == 0 and p.stage == "finetune":
            m = " ".join(f"{k} {v:.4g}" for k, v in p.metrics.items() if isinstance(v, float))
            print(f"[{time.strftime('%H:%M:%S')}] step {p.done} {m}", flush=True)

    res = finetune(train_images, masks, out, cfg, pretrained=None, device="cpu", progress=tick)
    print(f"{out.name}: {res.steps} steps in {res.seconds / 60:.1f} min, validation Dice {res.best_dice:.3f}")


def probabilities(model, p: Path, cache: Path) -> np.ndarray:
    """All class probabilities (float16, classes x H x W) of one image at full resolution, cached."""
    from genselfdiff.infer.segment import segment_tiles

    if cache.exists():
        return np.load(cache)["p"].astype(np.float32)
    gen = segment_tiles(model, read_rgb(p), skip_background=False, probabilities=True)
    tiles = []
    try:
        while True:
            tiles.append(next(gen))
    except StopIteration as stop:
        shape = stop.value.shape
    prob = np.zeros((len(model.classes), *shape), np.float32)
    for t in tiles:
        h, w = t.labels.shape
        prob[:, t.y : t.y + h, t.x : t.x + w] = t.probabilities
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, p=prob.astype(np.float16))
    return prob


def flood(surface: np.ndarray, seeds: np.ndarray, fg: np.ndarray, min_px: float = 0) -> np.ndarray:
    """Seeds (those of at least ``min_px`` pixels) grown over the foreground by a watershed of
    ``surface``; foreground they do not reach becomes objects of its own."""
    from genselfdiff.objects.split import SplitParameters, _absorb_small

    if min_px:
        area = np.bincount(seeds.ravel())
        seeds = np.where(area[seeds] < min_px, 0, seeds)
    ids = watershed(surface, seeds, mask=fg)
    rest = ndi.label(fg & (ids == 0))[0]
    ids = np.where(rest > 0, rest + ids.max(), ids)
    # as the default split: fragments below its minimum area join a neighbour or vanish
    return _absorb_small(ids, SplitParameters().min_area_um2 / MPP**2)


def interior_markers(interior: np.ndarray, fg: np.ndarray, min_px: float) -> np.ndarray:
    """The classic three-class split: interiors (without the border) seed a watershed of the foreground."""
    return flood(-ndi.distance_transform_edt(fg), ndi.label(interior)[0], fg, min_px)


def score(args) -> None:
    from objects_sweep import oracle_splits

    from genselfdiff.eval.metrics import aji, panoptic_quality
    from genselfdiff.nn.model import load_model
    from genselfdiff.objects.split import SplitParameters, _h_maxima, split_objects

    _, images = id_images(args.trained)
    print(f"scored on {len(images)} images: {', '.join(p.stem for p in images)}")
    min_px = SplitParameters().min_area_um2 / MPP**2
    for ck in args.models:
        model = load_model(args.work / ck, "cpu")
        rows = {}
        for p in images:
            prob = probabilities(model, p, args.work / "probabilities" / f"{Path(ck).stem}_{p.stem}.npz")
            truth = imread(DATA / "instances" / p.name).astype(np.int64)
            n_true = len(np.unique(truth)) - 1
            fg = prob[0] < 0.5  # nucleus + border
            ways = {"connected components": ndi.label(fg)[0],
                    "default split of the foreground": split_objects(None, fg, mpp=MPP),
                    "split weighted by the foreground probability": split_objects(1 - prob[0], fg, mpp=MPP)}
            if len(prob) > 3:  # distance levels
                e = energy(prob)
                ways["split weighted by the expected level"] = split_objects(e, fg, mpp=MPP)
                for h in (0.1, 0.2, 0.3):
                    # float64: in float32 a peak of exactly h falls either side of the test
                    markers = _h_maxima(ndi.gaussian_filter(e.astype(np.float64), 0.5 / MPP), h, fg)
                    ways[f"watershed of the expected level, h {h}"] = flood(-e, markers, fg)
                for top in (0.5, 0.7):
                    ways[f"levels above {top} as markers"] = flood(-e, ndi.label(fg & (e > top))[0], fg, min_px / 4)
            if len(prob) == 3:
                share = prob[1] / np.maximum(prob[1] + prob[2], 1e-6)  # the interior's share of the foreground
                ways["split weighted by the interior share"] = split_objects(share, fg, mpp=MPP)
                ways["split weighted by the interior probability"] = split_objects(prob[1], fg, mpp=MPP)
                for h in (0.1, 0.4):
                    ways[f"  the same, h {h}"] = split_objects(share, fg, mpp=MPP,
                                                             params=replace(SplitParameters(), h_um=h))
                ways["interiors as markers"] = interior_markers(fg & (prob[1] > prob[2]), fg, min_px)
            ways["oracle: perfect split of the foreground"] = oracle_splits(fg, truth)[0]
            line = [f"{p.stem[:12]} n {n_true} Dice {dice(fg, truth > 0):.3f}"]
            rows.setdefault("pixel Dice", []).append(dice(fg, truth > 0))
            for name, ids in ways.items():
                ids = ids.astype(np.int64)
                n = len(np.unique(ids)) - 1
                rows.setdefault(name, []).append((aji(ids, truth), panoptic_quality(ids, truth)["pq"],
                                                  (n - n_true) / n_true))
                line.append(f"{name.strip()[:12]} {rows[name][-1][0]:.3f}")
            print(" | ".join(line), flush=True)
        print(f"{ck}: mean over {len(images)} images (AJI, PQ, count error |signed|)")
        print(f"  pixel Dice of the foreground {np.mean(rows.pop('pixel Dice')):.3f}")
        for name, v in rows.items():
            v = np.array(v)
            print(f"  {name:<42} AJI {v[:, 0].mean():.3f} PQ {v[:, 1].mean():.3f} "
                  f"count error {np.abs(v[:, 2]).mean():.3f} ({v[:, 2].mean():+.3f})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("work", type=Path)
    t.add_argument("--target", choices=["border", "levels", "plain"], required=True)
    t.add_argument("--border-um", type=float, default=1.0, help="border: the band's reach into each nucleus")
    t.add_argument("--levels", type=int, default=4, help="levels: the number of distance levels")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=2500)
    s = sub.add_parser("score")
    s.add_argument("work", type=Path)
    s.add_argument("models", nargs="+")
    for q in (t, s):
        q.add_argument("--trained", type=int, default=3, help="the first N pool images with ids are trained on")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    train(args) if args.command == "train" else score(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
