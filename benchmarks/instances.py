"""Nuclei from 3 labelled images with ids: today's distance split against the learnt geometry map, over folds.

MoNuSeg's images with nucleus ids (13 of the 30) are put in a fixed order (``default_rng(2024)``);
fold k trains on images 3k..3k+2 of it (masks, and for the geometry arm also their ids) and scores
every other image with ids. Each model is fine-tuned from random weights with the engine's defaults,
as ``genselfdiff finetune --pixel-size 0.2527`` runs it (``--instances DIR`` for the geometry arm), and
each held-out image is segmented as ``genselfdiff segment --instances`` does; the objects, enlarged to
full resolution (nearest neighbour), are scored against the true ids: AJI, PQ and the count error.

Arms, per fold:

- ``masks``: a model trained on the masks; objects by the distance split (what users get today);
- ``ids``: a model trained on masks and ids (with the geometry head); objects by its geometry map
  (what users get with it: the distance split on a surface the learnt borders cut into), and, on
  the same labels, by the distance split alone (a paired comparison) and with the foreground
  probability (weight 0: what the maps add beyond it); ``--weights`` also scores other depths of
  those cuts and ``--borders`` HoVer-Net's own markers at these thresholds, on the
  same maps (chosen on these images: optimistic).

Also, without a network: the geometry split of the *true* maps on the true masks at 0.5 µm/px (a
bound on what the split itself loses), and the inference cost of the head (a forward pass with the
maps over one without, on one 256-px batch of 8 tiles, median of ``--repeats``).

results.json in ``--work`` is rewritten after every unit (one fold and arm), so an interrupted run keeps
what it has and a rerun skips the units already there (and reuses their models); ``--rescore``
scores the units already there again from their models (after a change to the objects pass).

    python -m benchmarks.instances [--quick] [--data DIR] [--work DIR] [--folds 0,1,2] [--arms ids,masks]
                                   [--weights 0,1,4] [--borders 0.1,0.2,0.4] [--threads 1] [--rescore]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .common import MPP, add_data_argument, data_folder, data_name, enlarge, header, read_instances, ticker

LABELLED = 3
QUICK_STEPS = 10


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gsd-instances"), help="models and results.json")
    add_data_argument(p)
    p.add_argument("--folds", default="0,1,2", help="which folds to run (of 13 images with ids: 0..3)")
    p.add_argument("--arms", default="ids,masks", help="ids (geometry head), masks (today's), or both")
    p.add_argument("--weights", default="0,1,4",
                   help="other depths of the learnt borders' cuts to score (0: the distance split with the "
                        "foreground probability alone, no maps)")
    p.add_argument("--borders", default="0.1,0.2,0.4", help="HoVer-Net's markers at these border thresholds, scored")
    p.add_argument("--rescore", action="store_true", help="score the units in results.json again from their models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes for the head's cost")
    p.add_argument("--quick", action="store_true", help=f"one fold, {QUICK_STEPS} steps, 2 images scored")
    return p.parse_args(argv)


def images_with_ids(data: Path) -> list:
    images = sorted(p for p in (data / "images").glob("*.png") if (data / "instances" / p.name).exists())
    order = np.random.default_rng(2024).permutation(len(images))
    return [images[i] for i in order]


def fold(images: list, k: int) -> tuple:
    """(labelled, held out) of fold ``k``."""
    labelled = images[LABELLED * k: LABELLED * (k + 1)]
    return labelled, [p for p in images if p not in labelled]


def scores(ids: np.ndarray, truth: np.ndarray) -> dict:
    from genselfdiff.eval.metrics import aji, panoptic_quality

    n, n_true = len(np.unique(ids)) - 1, len(np.unique(truth)) - 1
    return {"aji": aji(ids, truth), "pq": panoptic_quality(ids, truth)["pq"], "count_error": abs(n - n_true) / n_true,
            "signed_count_error": (n - n_true) / n_true, "objects": n, "true_objects": n_true}


def train(args, data: Path, labelled: list, k: int, arm: str) -> tuple:
    from genselfdiff import FinetuneConfig, finetune

    out = args.work / f"fold{k}_{arm}.pt"
    if out.exists():
        return out, None
    overrides = dict(class_names=["background", "nucleus"])
    if args.quick:
        overrides["steps"] = QUICK_STEPS
    cfg = FinetuneConfig.from_preset("auto", **overrides)
    instances = [str(data / "instances" / p.name) for p in labelled] if arm == "ids" else None
    t0 = time.perf_counter()
    r = finetune([str(p) for p in labelled], [str(data / "masks" / p.name) for p in labelled], out, cfg,
                 device=args.device, pixel_size=MPP, instances=instances, progress=ticker(out.stem, 500))
    return out, {"steps": r.steps, "seconds": round(time.perf_counter() - t0, 1), "val_dice": r.best_dice}


def segment_with_geometry(model, path: Path):
    """``segment --instances`` in memory, keeping the geometry maps the objects pass used (or None)."""
    from genselfdiff.infer.merge import ArrayMerger
    from genselfdiff.infer.segment import segment_tiles

    merger = ArrayMerger()
    run = segment_tiles(model, str(path), merger=merger, pixel_size=MPP, instances=True)
    while True:
        try:
            next(run)
        except StopIteration as end:
            return end.value, merger


def evaluate(args, data: Path, model_path: Path, held: list, arm: str) -> dict:
    from genselfdiff import load_model
    from genselfdiff.objects.hv_split import HVParameters
    from genselfdiff.objects.output import objects_in_memory
    from genselfdiff.objects.request import object_request
    from genselfdiff.objects.split import SplitParameters

    model = load_model(model_path, args.device)
    ways = {}
    for p in held:
        truth = read_instances(data, p)
        r, merger = segment_with_geometry(model, p)
        labels = np.asarray(merger.labels)
        found = {"segment --instances": np.asarray(r.objects.ids)}
        if model.has_geometry:
            split = objects_in_memory(labels, object_request(model, params=SplitParameters()), mpp=r.mpp)
            found["distance split, same labels"] = split.ids
            variants = {(f"geometry, weight {w:g}" if w else "distance split with the probability, same labels"):
                        HVParameters(weight=w) for w in args.weights if w != HVParameters.weight}
            variants.update({f"geometry, HoVer-Net markers, border {b:g}": HVParameters(markers="energy", border=b)
                             for b in args.borders})
            for name, params in variants.items():
                req = object_request(model, params=params)
                found[name] = objects_in_memory(labels, req, mpp=r.mpp, geometry=merger.geometry).ids
        for way, ids in found.items():
            ways.setdefault(way, []).append(scores(enlarge(np.asarray(ids).astype(np.int64), truth.shape), truth))
        line = " | ".join(f"{w} AJI {v[-1]['aji']:.3f} n {v[-1]['objects']}/{v[-1]['true_objects']}"
                          for w, v in ways.items() if not w.startswith("geometry, "))
        print(f"  {arm} {p.stem[:12]}: {line}", flush=True)
    return {w: {"images": [p.stem for p in held], "scores": v, **mean_scores(v)} for w, v in ways.items()}


def mean_scores(rows: list) -> dict:
    return {m: float(np.mean([r[m] for r in rows])) for m in ("aji", "pq", "count_error", "signed_count_error")}


def true_map_bound(data: Path, images: list) -> dict:
    """The geometry split of the true maps on the true masks, at 0.5 µm/px (2x2 blocks, nearest)."""
    from genselfdiff.nn.geometry import hv_maps
    from genselfdiff.objects.hv_split import hv_split

    rows = []
    for p in images:
        truth = read_instances(data, p)
        low = truth[::2, ::2]
        ids = hv_split(None, low > 0, hv_maps(low), mpp=2 * MPP)
        rows.append(scores(enlarge(ids.astype(np.int64), truth.shape), truth))
    return mean_scores(rows)


def head_cost(model_path: Path, args) -> dict:
    """Seconds of a forward pass with and without the maps, batch 8 of 256-px tiles (median)."""
    import torch

    from genselfdiff import load_model

    model = load_model(model_path, args.device)
    x = torch.rand(8, 3, 256, 256, device=model.device) * 2 - 1
    times = {"plain": [], "with maps": []}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first of each is a warm-up
            for name, geometry in (("plain", False), ("with maps", True)):
                t0 = time.perf_counter()
                model.net(x, geometry=True) if geometry else model.net(x)
                times[name].append(time.perf_counter() - t0)
    plain, maps = (float(np.median(times[n][1:])) for n in ("plain", "with maps"))
    return {"plain_s": plain, "with_maps_s": maps, "ratio": maps / plain}


def main(argv=None) -> int:
    import torch

    from genselfdiff.io.atomic import write_text

    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.borders = [float(b) for b in args.borders.split(",") if b.strip()]
    args.weights = [float(w) for w in args.weights.split(",") if w.strip()]
    header(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    data = data_folder(args, args.work)
    images = images_with_ids(data)
    wanted = [0] if args.quick else [int(k) for k in args.folds.split(",")]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    path = args.work / "results.json"
    done = json.loads(path.read_text()) if path.exists() and not args.quick else {"units": []}
    if "true_maps" not in done:
        done["true_maps"] = true_map_bound(data, images[:2] if args.quick else images)
        write_text(path, json.dumps(done, indent=1))
    if args.rescore:
        done["true_maps"] = true_map_bound(data, images[:2] if args.quick else images)
        for unit in done["units"]:
            model_path = args.work / f"fold{unit['fold']}_{unit['arm']}.pt"
            held = fold(images, unit["fold"])[1]
            unit["ways"] = evaluate(args, data, model_path, held[:2] if args.quick else held, unit["arm"])
            write_text(path, json.dumps(done, indent=1))
    have = {(u["fold"], u["arm"]) for u in done["units"]}
    for arm in arms:  # every fold of one arm first: a short run still gives one whole row
        for k in wanted:
            if (k, arm) in have:
                continue
            labelled, held = fold(images, k)
            held = held[:2] if args.quick else held
            model_path, training = train(args, data, labelled, k, arm)
            unit = {"fold": k, "arm": arm, "labelled": [p.stem for p in labelled], "training": training,
                    "ways": evaluate(args, data, model_path, held, arm)}
            if arm == "ids" and "head_cost" not in done:
                done["head_cost"] = head_cost(model_path, args)
            done["units"].append(unit)
            write_text(path, json.dumps(done, indent=1))
            print(f"fold {k} {arm}: " + "; ".join(f"{w} AJI {v['aji']:.3f} PQ {v['pq']:.3f} count error "
                                                  f"{v['count_error']:.3f}" for w, v in unit["ways"].items()
                                                  if not w.startswith("geometry, ")), flush=True)
    print_table(done)
    cost = done.get("head_cost")
    rows = fold_means(done)
    main_rows = [r for r in rows if r[0] in (("masks", "segment --instances"), ("ids", "segment --instances"))]
    print(f"summary: instances, {data_name(data)}, {len(images)} images with ids, folds of {LABELLED} labelled: "
          + " | ".join(f"{'geometry map' if arm == 'ids' else 'distance split'} AJI {m['aji']:.3f} PQ {m['pq']:.3f} "
                       f"count error {m['count_error']:.3f} over {n} folds" for (arm, _), m, n in main_rows)
          + f" | true maps AJI {done['true_maps']['aji']:.3f}"
          + (f" | head cost {cost['ratio']:.2f}x the plain forward" if cost else ""), flush=True)
    return 0


def fold_means(done: dict) -> list:
    """((arm, way), means over folds of the per-fold means, number of folds)."""
    by = {}
    for u in done["units"]:
        for way, v in u["ways"].items():
            by.setdefault((u["arm"], way), []).append(v)
    return [(key, {m: float(np.mean([v[m] for v in vs])) for m in ("aji", "pq", "count_error", "signed_count_error")},
             len(vs)) for key, vs in sorted(by.items())]


def print_table(done: dict) -> None:
    print("\n| model | objects by | AJI | PQ | count error (signed) | folds |")
    print("|---|---|---|---|---|---|")
    for (arm, way), m, n in fold_means(done):
        print(f"| {arm} | {way} | {m['aji']:.3f} | {m['pq']:.3f} | {m['count_error']:.3f} "
              f"({m['signed_count_error']:+.3f}) | {n} |")
    t = done["true_maps"]
    print(f"| none | geometry split of the true maps, true masks | {t['aji']:.3f} | {t['pq']:.3f} | "
          f"{t['count_error']:.3f} ({t['signed_count_error']:+.3f}) | - |")


if __name__ == "__main__":
    sys.exit(main())
