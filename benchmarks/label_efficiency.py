"""Label efficiency on MoNuSeg: diffusion-pretrained vs random init vs classical anchors.

Data: the 30 official MoNuSeg training images (``--data``, default ../shared/data/monuseg/train;
1000 x 1000, 0.2527 µm/px, binary nucleus masks); ``--quick`` without them runs on synthetic
tissue (benchmarks.common.write_synthetic_set). Held out for evaluation: every fifth image by sorted
name (positions 4, 9, ..., 29: six images over several organs); never seen by any method,
not even by pretraining. The other 24 are pretrained on without labels; the labelled
sets are nested prefixes (1 of 3 of 10) of a fixed permutation of those 24
(``numpy.random.default_rng(2024)``).

Methods, all scored by pixel Dice of the nucleus class, mean over the held-out images:
- pretrained: diffusion pretraining for --pretrain-minutes, then fine-tuning for
  --finetune-minutes (or --finetune-steps) at --lr (the genselfdiff pipeline, segmented
  with ``genselfdiff.infer.segment``);
- random (init), same fine-tuning compute: the same network from random weights, trained
  for the same number of fine-tuning steps as the pretrained run took, at --random-lr (each
  start at the learning rate that served it best in our sweeps: a pretrained network loses
  what it learnt at 1e-3, a random one learns faster there);
- total: random init at the same total compute, given as many steps more as pretraining
  took (converted by pixels per step), so pretraining is not given free compute;
- Otsu on the haematoxylin channel (skimage.color.rgb2hed), per image, no training;
- a random forest (scikit-learn) on skimage's multiscale_basic_features, trained on the
  same labelled images (left out, with a note, where scikit-learn is not installed:
  ``pip install -e '.[bench]'``).

With ``--scale 2`` the networks work at half resolution (0.51 µm/px): the images are
written as two-level OME-TIFF pyramids in the work folder and both phases use level 1;
``segment`` upsamples the labels back to full resolution for scoring.

Every network run is repeated for each of --seeds (patch sampling, augmentation, head
initialisation); the table gives the mean over held-out images and seeds and the standard
deviation between seeds, since one seed can move the mean Dice by a few hundredths. Runs of
one seed see the same patches whatever the start, so the table ends with the difference
pretrained - random paired by seed, which the data stream does not blur. --runs picks the
network runs; --jobs N runs N (labelled images, seed) units side by side, one process each.

Run: python -m benchmarks.label_efficiency [--quick] [options]; it prints the command, the
machine, a table and one summary line, and writes results.json to --work. ``--quick`` is a
smoke test: 10 pretraining and 10 fine-tuning steps, 1 and 3 labelled images, 10 trees.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from genselfdiff.io.atomic import atomic_path, write_text

from .common import (
    add_data_argument,
    data_folder,
    data_name,
    dice,
    enlarge,
    header,
    pyramid,
    read_mask,
    read_rgb,
    simulate_corrections,
    simulate_strokes,
    split,
    ticker,
)

QUICK_STEPS = 10  # --quick: pretraining and fine-tuning steps (steps, unlike minutes, do not depend on the load)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke test: {QUICK_STEPS} pretraining and fine-tuning steps, 1 and 3 labelled images")
    add_data_argument(p)
    p.add_argument("--work", type=Path, default=Path("/tmp/genselfdiff-label-efficiency"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--patch", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--scale", type=int, choices=[1, 2], default=2, help="2 = work at half resolution (default)")
    p.add_argument("--pretrain-minutes", type=float, default=10.0)
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="end pretraining after this many steps instead (whichever of the two comes first; "
                        "steps do not depend on how busy the machine is)")
    p.add_argument("--finetune-minutes", type=float, default=5.0)
    p.add_argument("--lr", type=float, help="fine-tuning learning rate from the pretrained start (default: the engine's)")
    p.add_argument("--random-lr", type=float,
                   help="fine-tuning learning rate from random initialisation (default: the engine's)")
    p.add_argument("--annotation", default="dense", choices=["dense", "strokes"],
                   help="what the labelled images carry: full masks, or simulated brush strokes "
                        "(benchmarks.common.simulate_strokes: 40 nucleus and 20 background strokes per image, "
                        "under 1 %% of the pixels) used as sparse labels")
    p.add_argument("--corrections", type=int, default=0, metavar="N",
                   help="with strokes: N rounds of corrective strokes, as a pathologist adds them after seeing the "
                        "preview and clicks Continue, with the same painting effort: the first strokes are half as many "
                        "(20 nucleus, 10 background per image); the fine-tuning steps are split evenly into N + 1 rounds; "
                        "after each round but the last the model segments its labelled images, "
                        "benchmarks.common.simulate_corrections paints up to 20 background and 10 nucleus strokes into "
                        "the largest regions it got wrong (never past 1 %% of the pixels painted in all), and the next "
                        "round goes on from the round's model")
    p.add_argument("--augment", default="", metavar="K=V,...",
                   help="override fine-tuning augmentation fields (genselfdiff.train.augment.Augment), e.g. hed=0.5,hed_sigma=0.2")
    p.add_argument("--set", default="", metavar="K=V,...",
                   help="override FinetuneConfig number fields, e.g. affinity=1,balance=0.5")
    p.add_argument("--pretrain-set", default="", metavar="K=V,...",
                   help="other PretrainConfig fields for the pretraining run, e.g. max_timestep=300,p2_gamma=0")
    p.add_argument("--tta", action="store_true",
                   help="score with the engine's test-time flips (segment(tta=True): mean softmax of 4 flips per tile)")
    p.add_argument("--loss", help="fine-tuning loss (default: the engine's)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="fine-tuning schedule (default: the engine's, cosine for strokes and constant for masks)")
    p.add_argument("--pretrain-lr", type=float, default=5e-4,
                   help="pretraining learning rate (the paper's 1e-4 learns slowly in a few minutes)")
    p.add_argument("--pretrain-ema", type=float, default=0.995,
                   help="EMA decay in pretraining (the bias-corrected ramp reaches 0.995 after 1800 steps)")
    p.add_argument("--labelled", default="1,3,10", help="numbers of labelled images")
    p.add_argument("--runs", default="pretrained,random,forest",
                   help="runs per labelled-image count and seed: pretrained, random (the same fine-tuning steps), "
                        "total (random init given pretraining's compute as extra steps), forest")
    p.add_argument("--finetune-steps", type=int,
                   help="fine-tuning budget in steps for every run (default: --finetune-minutes for the pretrained "
                        "run, its step count for the others); needed when the pretrained run is left out")
    p.add_argument("--pretrained", type=Path, help="use this pretrained checkpoint instead of pretraining")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two spinning OpenMP threads "
                        "were 10-30x slower than one)")
    p.add_argument("--jobs", type=int, default=1,
                   help="network runs side by side, one process each with --threads threads (e.g. 2 on 2 cores)")
    p.add_argument("--rf-trees", type=int, default=100)
    p.add_argument("--seeds", default="0", help="fine-tuning (and random-forest) seeds, e.g. 0,1: every "
                   "network run is repeated per seed")
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of the pretraining run")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps = args.pretrain_steps or QUICK_STEPS
        args.finetune_steps = args.finetune_steps or QUICK_STEPS
        args.labelled, args.rf_trees = "1,3", 10
    args.labelled = [int(n) for n in args.labelled.split(",")]
    args.seeds = [int(n) for n in args.seeds.split(",")]
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    args.augment = dict(kv.split("=", 1) for kv in args.augment.split(",") if kv)
    args.set = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.set.split(",") if kv)}
    args.pretrain_set = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.pretrain_set.split(",") if kv)}
    if set(args.runs) - {"pretrained", "random", "total", "forest"}:
        p.error("--runs takes pretrained, random, total and forest")
    if args.corrections and (args.annotation != "strokes" or args.finetune_steps is None):
        p.error("--corrections needs --annotation strokes and --finetune-steps")
    if {"random", "total"} & set(args.runs) and "pretrained" not in args.runs and args.finetune_steps is None:
        p.error("random-init runs without the pretrained run need the fine-tuning budget as --finetune-steps")
    return args


def _value(text: str):
    """A number (or true/false/null) as JSON reads it, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def prepare(args, pool, held):
    """Training inputs at the working scale: (image sources, mask sources, Resolution).

    At half scale the held-out images are written as pyramids here too, once, before any
    parallel run reads them.
    """
    from genselfdiff.io.pixelsize import Resolution

    if args.scale == 1:
        if args.annotation != "dense":
            sys.exit("--annotation strokes needs --scale 2")
        return {p.stem: p for p in pool}, {p.stem: args.data / "masks" / p.name for p in pool}, Resolution()
    from skimage.io import imsave

    folder = args.work / "half"
    folder.mkdir(parents=True, exist_ok=True)
    images, masks = {}, {}
    for i, p in enumerate(pool):
        tif = source_of(args, p)
        kind = "mask" if args.annotation == "dense" else "strokes_first_half" if args.corrections else "strokes"
        png = folder / f"{p.stem}_{kind}.png"
        pyramid(p, folder)
        if not png.exists():
            half = half_mask(args, p)
            # strokes are drawn once per image (fixed seed): every run and seed sees the same ones
            # with corrections, half the strokes come first and the rest where the model errs
            effort = dict(nuclei=20, background=10) if args.corrections else {}
            labels = half if args.annotation == "dense" else simulate_strokes(half, np.random.default_rng([7, i]), **effort)
            with atomic_path(png) as tmp:
                imsave(tmp, labels.astype(np.uint8), check_contrast=False)
        images[p.stem], masks[p.stem] = tif, png
    for p in held:
        pyramid(p, folder)
    return images, masks, Resolution(level=1)


def half_mask(args, image: Path) -> np.ndarray:
    """The true nucleus mask at half scale (a pixel is nucleus where most of its four are)."""
    m = read_mask(args.data, image).astype(np.float32)
    return (m[0::2, 0::2] + m[1::2, 0::2] + m[0::2, 1::2] + m[1::2, 1::2]) / 4 >= 0.5


def source_of(args, image: Path) -> Path:
    """The pyramid an image is read from at half scale."""
    return args.work / "half" / f"{image.stem}.ome.tif"


def score_model(path, held, args) -> list:
    """Pixel Dice of the nucleus class on each held-out image, segmented as users do (``--tta``: the
    engine's test-time flips); in memory segment returns the processing level, enlarged here."""
    from genselfdiff import load_model, segment

    model = load_model(path, args.device)
    scores = []
    for p in held:
        source = source_of(args, p) if args.scale == 2 else read_rgb(p)
        labels = np.asarray(segment(model, source, skip_background=False, tta=args.tta).labels)
        truth = read_mask(args.data, p)
        scores.append(dice(enlarge(labels, truth.shape) == 1, truth))
    return scores


def otsu_scores(held, args) -> list:
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    out = []
    for p in held:
        h = rgb2hed(read_rgb(p))[..., 0]
        out.append(dice(h > threshold_otsu(h), read_mask(args.data, p)))
    return out


def rf_scores(labelled, held, args, seed: int, pixels_per_image: int = 40_000) -> list:
    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for p in labelled:
        f = multiscale_basic_features(read_rgb(p), channel_axis=-1)
        m = read_mask(args.data, p)
        idx = rng.choice(m.size, pixels_per_image, replace=False)
        xs.append(f.reshape(-1, f.shape[-1])[idx])
        ys.append(m.ravel()[idx])
    rf = RandomForestClassifier(n_estimators=args.rf_trees, min_samples_leaf=2, n_jobs=args.threads,
                                random_state=seed)
    rf.fit(np.concatenate(xs), np.concatenate(ys))
    out = []
    for p in held:
        f = multiscale_basic_features(read_rgb(p), channel_axis=-1)
        pred = rf.predict(f.reshape(-1, f.shape[-1])).reshape(f.shape[:2]).astype(bool)
        out.append(dice(pred, read_mask(args.data, p)))
    return out


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from genselfdiff import PretrainConfig, pretrain

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    header(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    args.data = data_folder(args, args.work)
    if "forest" in args.runs and importlib.util.find_spec("sklearn") is None:
        args.runs.remove("forest")
        print("forest left out: scikit-learn is not installed (pip install -e '.[bench]')")
    held, pool = split(args.data)
    print(f"held out: {', '.join(p.stem for p in held)}")
    images, masks, resolution = prepare(args, pool, held)
    patch = args.patch
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": {}}

    _add(results, "otsu", **_timed(otsu_scores, held, args))

    pre_path = args.pretrained or args.work / "pretrained.pt"
    pre_fields = dict(minutes=args.pretrain_minutes, steps=args.pretrain_steps, patch=patch, batch=args.batch,
                      resolution=resolution, seed=args.pretrain_seed, ema_decay=args.pretrain_ema, lr=args.pretrain_lr,
                      val_every=100 if args.quick else 200)
    pcfg = PretrainConfig.from_preset(args.preset, **{**pre_fields, **args.pretrain_set})
    if not {"pretrained", "total"} & set(args.runs):
        pre_steps, pre_seconds = 0, 0.0  # nothing here starts from a pretrained network
    elif args.pretrained is None:
        pre = pretrain(list(images.values()), pre_path, pcfg, device=args.device, progress=ticker("pretrain"))
        pre_steps, pre_seconds = pre.steps, pre.seconds
    else:
        ck = torch.load(pre_path, weights_only=True, map_location="cpu")
        budget = (ck.get("config") or {}).get("minutes")  # the checkpoint keeps its budget, not its time
        pre_steps, pre_seconds = int(ck.get("step", 0)), 60.0 * budget if budget else float("nan")
    results["pretrain"] = {"steps": pre_steps, "seconds": pre_seconds, "patch": pcfg.patch, "batch": pcfg.batch}
    print(f"pretrained {pre_steps} steps in {pre_seconds / 60:.1f} min ({pcfg.patch}-px patches, batch {pcfg.batch})")

    units = [(n, seed) for n in args.labelled for seed in args.seeds]
    per_step = (pcfg.batch * pcfg.patch**2) / (args.batch * (patch or pcfg.patch) ** 2)
    extra_steps = int(round(pre_steps * per_step))  # pretraining's compute, in fine-tuning steps
    job = partial(unit_runs, args, pool, held, images, masks, resolution, pre_path, extra_steps)

    def outcomes():  # in the order of the units, whatever finishes first
        if args.jobs <= 1:
            yield from map(job, units)
            return
        ctx = multiprocessing.get_context("spawn")  # one process per unit, side by side
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_threads, initargs=(args.threads,)) as ex:
            yield from ex.map(job, units)

    for outcome in outcomes():
        for name, values in outcome.items():
            _add(results, name, **values)
        write_text(args.work / "results.json", json.dumps(results, indent=1, default=float))  # kept if a run fails
    _table(results)
    parts = [f"{k} {np.mean(v['dice']):.3f}" for k, v in results["runs"].items()]
    print(f"summary: {data_name(args.data)} held-out Dice ({len(held)} images) | {args.preset} {pcfg.patch}px scale 1/{args.scale} | "
          f"pretrain {pre_seconds / 60:.1f} min ({pre_steps} steps) + fine-tune "
          f"{f'{args.finetune_steps} steps' if args.finetune_steps else f'{args.finetune_minutes:g} min'} | "
          + " | ".join(parts))
    return 0


def unit_runs(args, pool, held, images, masks, resolution, pre_path, extra_steps, unit) -> dict:
    """The runs of one (labelled images, seed): fine-tuning from each start, and the forest."""
    from genselfdiff import FinetuneConfig

    n, seed = unit
    subset = pool[:n]
    imgs, msks = [images[p.stem] for p in subset], [masks[p.stem] for p in subset]
    base = dict(patch=args.patch, batch=args.batch, loss=args.loss, sparse=args.annotation == "strokes",
                lr_schedule=args.lr_schedule, patience=0,
                seed=seed, resolution=resolution, class_names=["background", "nucleus"])
    base.update(args.set)
    if args.augment:
        from genselfdiff.train.augment import Augment

        types = {k: type(v) for k, v in Augment().to_dict().items()}
        parse = {bool: lambda v: v.lower() in ("1", "true", "yes"), list: lambda v: [float(x) for x in v.split(":")]}
        base["augment"] = Augment.from_dict({k: parse.get(types[k], types[k])(v) for k, v in args.augment.items()})
    runs, steps = {}, args.finetune_steps
    if "pretrained" in args.runs:
        budget = dict(steps=steps) if steps else dict(minutes=args.finetune_minutes)
        cfg = FinetuneConfig.from_preset(args.preset, lr=args.lr, **budget, **base)
        out = args.work / f"ft_pretrained_{n}_s{seed}.pt"
        r = train(args, subset, imgs, msks, out, cfg, pre_path, seed)
        runs[f"pretrained_{n}"], steps = (out, r), r.steps
    budgets = {}  # random init: as many steps as the pretrained start; total: plus pretraining's compute
    if "random" in args.runs:
        budgets[f"random_{n}"] = steps
    if "total" in args.runs:
        budgets[f"total_{n}"] = steps + extra_steps
    for name, budget_steps in budgets.items():
        rcfg = FinetuneConfig.from_preset(args.preset, steps=budget_steps, lr=args.random_lr, **base)
        path = args.work / f"ft_{name}_s{seed}.pt"
        runs[name] = (path, train(args, subset, imgs, msks, path, rcfg, None, seed))
    scores = {name: dict(dice=score_model(path, held, args), steps=res.steps, seconds=res.seconds,
                         val_dice=res.best_dice, seed=seed, painted=getattr(res, "painted", None))
              for name, (path, res) in runs.items()}
    if "forest" in args.runs:
        scores[f"rf_{n}"] = dict(**_timed(rf_scores, subset, held, args, seed), seed=seed)
    return scores


def train(args, subset, imgs, msks, out, cfg, pretrained, seed):
    """Fine-tune once, or with --corrections in rounds, each going on from the last round's model
    with the strokes the pathologist added after seeing its prediction (see --corrections)."""
    from dataclasses import replace

    from skimage.io import imread

    from genselfdiff import finetune, load_model, segment

    rounds = args.corrections + 1
    labels = [np.asarray(imread(m)) for m in msks] if rounds > 1 else msks
    steps = seconds = 0
    for r in range(rounds):
        path = out if r == rounds - 1 else out.with_name(f"{out.stem}_round{r}{out.suffix}")
        budget = replace(cfg, steps=cfg.steps // rounds + (cfg.steps % rounds if r == rounds - 1 else 0)) \
            if rounds > 1 else cfg
        res = finetune(imgs, labels, path, budget, pretrained=pretrained, device=args.device, progress=ticker(path.stem))
        steps, seconds = steps + res.steps, seconds + res.seconds
        if r < rounds - 1:
            model = load_model(path, args.device)
            for i, (image, p) in enumerate(zip(imgs, subset)):
                predicted = np.asarray(segment(model, image, skip_background=False).labels) == 1
                labels[i] = simulate_corrections(labels[i], half_mask(args, p), predicted,
                                                 np.random.default_rng([11, seed, r, i]))
            pretrained = path  # as napari's Continue: from the model just saved
    res.steps, res.seconds = steps, seconds
    if args.annotation == "strokes":  # the share of pixels painted, corrections included
        res.painted = float(np.mean([(np.asarray(imread(m) if rounds == 1 else m) > 0).mean() for m in labels]))
    return res


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    warnings.filterwarnings("ignore", category=UserWarning)


def _timed(fn, *args) -> dict:
    t = time.perf_counter()
    return dict(dice=fn(*args), seconds=time.perf_counter() - t)


def _add(results: dict, name: str, **values) -> None:
    """Append one seed's values to a method's lists."""
    run = results["runs"].setdefault(name, {})
    for key, value in values.items():
        run.setdefault(key, []).append(value)


def _table(results: dict) -> None:
    """Dice: mean over held-out images and seeds; sd: between seeds; min/max: per image; then
    each seed's mean, in the order of --seeds.

    Then, per labelled-image count, pretrained minus random init paired by seed: both runs of
    a seed see the same patches and augmentations, so the pairing removes what the data
    stream does to both and leaves what the start does.
    """
    print(f"\n{'method':<22} {'Dice':>6} {'sd':>6} {'seeds':>5} {'min':>6} {'max':>6} {'steps':>7} {'minutes':>8}  per seed")
    runs = results["runs"]
    for name, r in runs.items():
        d = np.array(r["dice"], float)  # seeds x images
        sd = d.mean(1).std(ddof=1) if len(d) > 1 else float("nan")
        steps = int(np.mean(r["steps"])) if "steps" in r else ""
        per_seed = ", ".join(f"{x:.3f}" for x in d.mean(1)) if len(d) > 1 else ""
        print(f"{name:<22} {d.mean():6.3f} {sd:6.3f} {len(d):>5} {d.min():6.3f} {d.max():6.3f} {steps:>7} "
              f"{np.mean(r['seconds']) / 60:8.1f}  {per_seed}")
    for name in runs:
        other = name.replace("pretrained_", "random_")
        if name.startswith("pretrained_") and other in runs and runs[name].get("seed") == runs[other].get("seed"):
            diff = np.array(runs[name]["dice"], float).mean(1) - np.array(runs[other]["dice"], float).mean(1)
            sd = f" ± {diff.std(ddof=1):.3f}" if len(diff) > 1 else ""
            print(f"{name} - {other}, paired by seed: {diff.mean():+.3f}{sd} "
                  f"(pretrained better in {int((diff > 0).sum())} of {len(diff)} seeds)")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
