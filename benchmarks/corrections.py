"""Paint, look, correct: Dice over rounds of simulated corrections, on folds grouped by organ.

The pathologist's loop in napari is: paint strokes, fine-tune, look at the prediction, paint
corrections where it is wrong, Continue. Here a simulated annotator does that on the 3 labelled
images of each fold of :mod:`benchmarks.folds` (same folds, same labelled images, same round-0
strokes). Round 0 is the strokes model of ``benchmarks.folds --annotations strokes`` (read from
``--round0 DIR`` when it is there, else trained here with the same defaults). Each later round:

* segments the labelled images with the current model, as ``genselfdiff segment`` does;
* paints at most ``--strokes`` correction strokes per image where the prediction is wrong
  (:func:`benchmarks.common.simulate_corrections`, never against the truth, never over earlier
  strokes, at most 2 % of each image painted in all). The ``proportional`` annotator shares
  its strokes between missed nuclei and false nuclei by their areas; the ``lopsided`` one paints
  up to 20 background strokes and 10 nucleus strokes, largest errors first (the eye's choice);
* continues fine-tuning from the current model with every stroke so far, as the Fine-tune
  widget's Continue and ``genselfdiff finetune --sparse --model PREVIOUS.pt`` do, with the
  engine's defaults and ``--anchor W`` (the weight of the previous model's confident predictions
  on unpainted pixels; 0 switches it off). Each weight in ``--anchors`` is one arm;
* scores each image of the held-out fold by pixel Dice of the nucleus class.

results.json in --work is rewritten after every round, and a rerun skips what is there.

Run: python -m benchmarks.corrections --work DIR [--round0 DIR] [--annotator proportional|lopsided]
     [--anchors 0,1] [--rounds 3] [--folds 0,1,2,3,4] [--quick]
``--quick``: one fold, one round, 10 steps, on synthetic tissue when there is no MoNuSeg (seconds).
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
    simulate_corrections,
    simulate_strokes,
)
from benchmarks.folds import folds_of, labelled_for

NAMES = ["background", "nucleus"]
MAX_PAINTED = 0.02  # of each image, all rounds together


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gsd-corrections"), help="models and results.json")
    p.add_argument("--round0", type=Path, default=None, metavar="DIR",
                   help="benchmarks.folds' --work holding fold<k>_strokes.pt (else round 0 is trained here)")
    add_data_argument(p)
    p.add_argument("--annotator", choices=("proportional", "lopsided"), default="proportional")
    p.add_argument("--anchors", default="0,1", help="anchor weights, one arm each (comma-separated)")
    p.add_argument("--strokes", type=int, default=20, help="correction strokes per image and round, at most")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="one fold, one round, 10 steps")
    return p.parse_args(argv)


def predict(model, image: Path, shape) -> np.ndarray:
    from genselfdiff import segment

    return enlarge(np.asarray(segment(model, str(image), pixel_size=MPP).labels), shape) == 1


def annotate(args, strokes, truth, predicted, rng):
    if args.annotator == "lopsided":
        return simulate_corrections(strokes, truth, predicted, rng, max_painted=MAX_PAINTED)
    false_nuclei, missed = int((predicted & ~truth).sum()), int((truth & ~predicted).sum())
    share = false_nuclei / max(1, false_nuclei + missed)
    background = int(round(args.strokes * share))
    return simulate_corrections(strokes, truth, predicted, rng, background=background,
                                nuclei=args.strokes - background, max_painted=MAX_PAINTED)


def round0(args, labelled: list, strokes: list, k: int) -> Path:
    from genselfdiff import FinetuneConfig, finetune

    if args.round0 is not None and (args.round0 / f"fold{k}_strokes.pt").exists() and not args.quick:
        return args.round0 / f"fold{k}_strokes.pt"
    out = args.work / f"fold{k}_round0.pt"
    if not out.exists():
        cfg = FinetuneConfig.from_preset("auto", sparse=True, class_names=NAMES, steps=10 if args.quick else None)
        finetune([str(p) for p in labelled], strokes, out, cfg, device=args.device, pixel_size=MPP)
    return out


def run_arm(args, data: Path, folds: list, k: int, anchor: float, done: dict, save) -> None:
    from genselfdiff import FinetuneConfig, finetune, load_model

    labelled, held = labelled_for(folds, k), sorted(folds[k])
    truths = [read_mask(data, p).astype(bool) for p in labelled]
    held_truths = [read_mask(data, p).astype(bool) for p in held]
    strokes = [simulate_strokes(t, np.random.default_rng([7, k, i])) for i, t in enumerate(truths)]
    model_path = round0(args, labelled, strokes, k)
    key = f"{args.annotator} anchor {anchor:g}"
    runs = done.setdefault(key, {}).setdefault(str(k), [])
    score = lambda m: [dice(predict(m, p, t.shape), t) for p, t in zip(held, held_truths)]  # noqa: E731
    model = load_model(model_path, args.device)
    if not runs:
        runs.append(dict(round=0, dice=score(model), painted=float(np.mean([(s > 0).mean() for s in strokes]))))
        save()
    for r in range(1, args.rounds + 1):
        out = args.work / f"fold{k}_{args.annotator}_anchor{anchor:g}_round{r}.pt"
        rng = np.random.default_rng([11, k, r])
        predicted = [predict(model, p, t.shape) for p, t in zip(labelled, truths)]
        strokes = [annotate(args, s, t, q, rng) for s, t, q in zip(strokes, truths, predicted)]
        if len(runs) > r:  # done before: its strokes are rebuilt above, its model read back
            model_path, model = out, load_model(out, args.device)
            continue
        cfg = FinetuneConfig.from_preset("auto", sparse=True, class_names=NAMES, anchor=anchor,
                                         steps=10 if args.quick else None)
        t0 = time.perf_counter()
        res = finetune([str(p) for p in labelled], strokes, out, cfg, pretrained=model_path, device=args.device,
                       pixel_size=MPP)
        seconds = time.perf_counter() - t0
        model_path, model = out, load_model(out, args.device)
        runs.append(dict(round=r, dice=score(model), seconds=round(seconds, 1), steps=res.steps,
                         painted=float(np.mean([(s > 0).mean() for s in strokes])),
                         train_dice=float(np.mean([dice(predict(model, p, t.shape), t) for p, t in zip(labelled, truths)]))))
        save()
        print(f"fold {k} {key} round {r}: Dice {np.mean(runs[-1]['dice']):.3f} (round 0 {np.mean(runs[0]['dice']):.3f}), "
              f"{res.steps} steps in {seconds:.0f} s, {runs[-1]['painted']:.2%} painted", flush=True)


def main(argv=None) -> int:
    from genselfdiff.io.atomic import write_text

    args = parse(argv)
    if args.quick:
        args.rounds = 1
    header(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    data = data_folder(args, args.work)
    folds = folds_of(sorted((data / "images").glob("*.png")))
    wanted = [0] if args.quick else [int(k) for k in args.folds.split(",")]
    results = args.work / "results.json"
    done = json.loads(results.read_text()) if results.exists() and not args.quick else {}
    save = lambda: write_text(results, json.dumps(done, indent=1))  # noqa: E731
    for k in wanted:  # every arm of a fold before the next fold: a short run still compares the arms
        for anchor in (float(a) for a in args.anchors.split(",")):
            run_arm(args, data, folds, k, anchor, done, save)
    print_table(done)
    return 0


def round_means(runs_by_fold: dict) -> list:
    """Per round: (mean over folds of the fold means, sd over folds, folds)."""
    rounds = {}
    for runs in runs_by_fold.values():
        for r in runs:
            rounds.setdefault(r["round"], []).append(float(np.mean(r["dice"])))
    return [(r, float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for r, v in sorted(rounds.items())]


def print_table(done: dict) -> None:
    print("\n| arm | " + " | ".join(f"round {r}" for r in range(4)) + " | painted after the last round | seconds a round |")
    print("|---" * 7 + "|")
    for key, by_fold in sorted(done.items()):
        means = round_means(by_fold)
        cells = [f"{m:.3f} ± {sd:.3f} ({n})" for _, m, sd, n in means] + [""] * (4 - len(means))
        last = [runs[-1]["painted"] for runs in by_fold.values()]
        secs = [r["seconds"] for runs in by_fold.values() for r in runs if "seconds" in r]
        print(f"| {key} | " + " | ".join(cells[:4]) + f" | {np.mean(last):.2%} | {np.mean(secs) if secs else 0:.0f} |")
    summary = []
    for key, by_fold in sorted(done.items()):
        means = round_means(by_fold)
        summary.append(f"{key}: " + " → ".join(f"{m:.3f}" for _, m, _, _ in means))
    print("summary: " + " | ".join(summary), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
