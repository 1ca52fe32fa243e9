"""The defaults, cross-validated: Dice of fine-tuning from 3 labelled images, over folds grouped by organ.

A default chosen on the images it is scored on gives an optimistic figure. Here the 30 MoNuSeg
training images are cut into 5 folds of 6, grouped by the TCGA tissue source site (the two
characters after ``TCGA-``), which keeps the images of one organ and one lab together:

    A7 AR E2 (breast) | B0 HE (kidney) | CH G9 (prostate) | 18 21 38 49 50 | AY DK G2 KB NH RD

For each fold, 3 labelled images are drawn from the other 24 (``default_rng([2024, fold])``) and a
model is fine-tuned with the engine's defaults, as a user runs ``genselfdiff finetune`` with
``--pixel-size 0.2527`` and no other option: from dense masks, and (``--annotation strokes``)
from simulated brush strokes (benchmarks.common.simulate_strokes, under 1 % of the pixels). Each
image of the held-out fold is segmented as ``genselfdiff segment`` does and scored by pixel Dice
of the nucleus class; the Otsu threshold on haematoxylin is the baseline. The table gives each
fold's mean over its 6 images and, at the end, the mean and standard deviation over folds.

results.json in --work is rewritten after every fold, so an interrupted run keeps what it has and
a rerun skips the folds already there.

Run: python -m benchmarks.folds --work DIR [--annotations masks,strokes] [--folds 0,1,2,3,4] [--steps N]
[--no-stain-normalization] [--quick]
``--quick`` runs one fold with 20 steps on synthetic tissue (a smoke test, seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    MPP,
    add_data_argument,
    data_folder,
    dice,
    enlarge,
    header,
    read_mask,
    read_rgb,
    simulate_strokes,
)

GROUPS = (("A7", "AR", "E2"), ("B0", "HE"), ("CH", "G9"), ("18", "21", "38", "49", "50"),
          ("AY", "DK", "G2", "KB", "NH", "RD"))
LABELLED = 3


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gsd-folds"), help="models and results.json")
    add_data_argument(p)
    p.add_argument("--annotations", default="masks,strokes", help="masks, strokes or both (comma-separated)")
    p.add_argument("--folds", default="0,1,2,3,4", help="which folds to run")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, metavar="N", help="a training budget other than the engine's default")
    p.add_argument("--no-stain-normalization", dest="stain", action="store_false",
                   help="train (and so segment) on each image's own colours, as models before stain normalization")
    p.add_argument("--quick", action="store_true", help="one fold, 20 steps, synthetic tissue when no --data")
    return p.parse_args(argv)


def folds_of(images: list) -> list:
    """Five lists of images, by TCGA source site; images of other names are dealt round-robin."""
    folds = [[] for _ in GROUPS]
    other = []
    for p in images:
        site = p.name.split("-")[1] if p.name.startswith("TCGA-") else None
        k = next((i for i, g in enumerate(GROUPS) if site in g), None)
        (folds[k] if k is not None else other).append(p)
    for i, p in enumerate(other):
        folds[i % len(folds)].append(p)
    return folds


def labelled_for(folds: list, k: int) -> list:
    pool = sorted(p for i, f in enumerate(folds) if i != k for p in f)
    order = np.random.default_rng([2024, k]).permutation(len(pool))
    return [pool[i] for i in order[:LABELLED]]


def otsu_dice(data: Path, held: list) -> list:
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    out = []
    for p in held:
        h = rgb2hed(read_rgb(p))[..., 0]
        out.append(dice(h > threshold_otsu(h), read_mask(data, p)))
    return out


def run_fold(args, data: Path, folds: list, k: int, annotation: str) -> dict:
    from genselfdiff import FinetuneConfig, finetune, load_model, segment

    labelled, held = labelled_for(folds, k), sorted(folds[k])
    if annotation == "strokes":
        labels = [simulate_strokes(read_mask(data, p), np.random.default_rng([7, k, i])) for i, p in enumerate(labelled)]
    else:
        labels = [read_mask(data, p).astype(np.uint8) for p in labelled]
    overrides = dict(sparse=annotation == "strokes", class_names=["background", "nucleus"])
    if args.steps:
        overrides["steps"] = args.steps
    if not args.stain:
        overrides["stain"] = False
    if args.quick:
        overrides["steps"] = 20
    cfg = FinetuneConfig.from_preset("auto", **overrides)
    out = args.work / f"fold{k}_{annotation}.pt"
    t0 = time.perf_counter()
    res = finetune([str(p) for p in labelled], labels, out, cfg, device=args.device, pixel_size=MPP)
    seconds = time.perf_counter() - t0
    model = load_model(out, args.device)
    scores, called, true = [], [], []
    for p in held:
        truth = read_mask(data, p)
        nucleus = enlarge(np.asarray(segment(model, str(p), pixel_size=MPP).labels), truth.shape) == 1
        scores.append(dice(nucleus, truth))
        called.append(float(nucleus.mean()))  # over- or under-calling shows here, beside the Dice
        true.append(float(truth.mean()))
    painted = float(np.mean([(lab > 0).mean() for lab in labels])) if annotation == "strokes" else 1.0
    return dict(fold=k, annotation=annotation, labelled=[p.stem for p in labelled], held=[p.stem for p in held],
                dice=scores, mean=float(np.mean(scores)), called=called, true_share=true, steps=res.steps, seconds=round(seconds, 1),
                painted=painted)


def main(argv=None) -> int:
    from genselfdiff.io.atomic import write_text
    from genselfdiff.nn.model import pick_device

    args = parse(argv)
    args.device = str(pick_device(args.device))
    header(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    data = data_folder(args, args.work)
    images = sorted((data / "images").glob("*.png"))
    folds = folds_of(images)
    wanted = [0] if args.quick else [int(k) for k in args.folds.split(",")]
    annotations = [a.strip() for a in args.annotations.split(",") if a.strip()]
    results_path = args.work / "results.json"
    done = json.loads(results_path.read_text()) if results_path.exists() and not args.quick else {"runs": []}
    have = {(r["fold"], r["annotation"]) for r in done["runs"]}
    done.setdefault("otsu", {})
    for annotation in annotations:  # all folds of one kind first: a short run still gives one full row
        for k in wanted:
            if str(k) not in done["otsu"]:
                done["otsu"][str(k)] = float(np.mean(otsu_dice(data, sorted(folds[k]))))
            if (k, annotation) in have:
                continue
            r = run_fold(args, data, folds, k, annotation)
            done["runs"].append(r)
            write_text(results_path, json.dumps(done, indent=1))
            print(f"fold {k} {annotation}: Dice {r['mean']:.3f} (threshold {done['otsu'][str(k)]:.3f}), "
                  f"{r['steps']} steps in {r['seconds']:.0f} s, {r['painted']:.2%} painted", flush=True)
    print_table(done)
    print("summary: " + " | ".join(f"{name} {m:.3f} ± {sd:.3f} over {n} folds" for name, m, sd, n in fold_means(done)),
          flush=True)
    return 0


def fold_means(done: dict) -> list:
    """(name, mean, sd, folds) of each kind of labels and of the threshold."""
    by = {}
    for r in done["runs"]:
        by.setdefault(r["annotation"], []).append(r["mean"])
    by["threshold"] = list(done["otsu"].values())
    return [(name, float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
            for name, v in sorted(by.items())]


def print_table(done: dict) -> None:
    rows = {}
    for r in done["runs"]:
        rows.setdefault(r["annotation"], {})[r["fold"]] = r
    print("\n| labels | " + " | ".join(f"fold {k}" for k in range(len(GROUPS))) + " | mean ± sd over folds |")
    print("|---" * (len(GROUPS) + 2) + "|")
    for name, by_fold in sorted(rows.items()):
        means = [by_fold[k]["mean"] for k in sorted(by_fold)]
        cells = [f"{by_fold[k]['mean']:.3f}" if k in by_fold else "" for k in range(len(GROUPS))]
        print(f"| {name} | " + " | ".join(cells) + f" | {np.mean(means):.3f} ± {np.std(means, ddof=1) if len(means) > 1 else 0:.3f} ({len(means)} folds) |")
    otsu = {int(k): v for k, v in done["otsu"].items()}
    cells = [f"{otsu[k]:.3f}" if k in otsu else "" for k in range(len(GROUPS))]
    vals = list(otsu.values())
    print("| haematoxylin threshold | " + " | ".join(cells) +
          f" | {np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.3f} ({len(vals)} folds) |")


if __name__ == "__main__":
    raise SystemExit(main())
