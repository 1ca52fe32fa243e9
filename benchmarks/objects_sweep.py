"""How objects are cut from a fine-tuned model's output: the split's parameters, with and without
the class probability, scored on every MoNuSeg image with nucleus ids that the model did not
train on (label_efficiency.py trains on the first images of the pool).

Usage: .venv/bin/python benchmarks/objects_sweep.py WORK MODEL.pt [MODEL.pt ...] [--grid default|split|wide|full] [--tta] [--oracle]

WORK is a benchmarks/label_efficiency.py work folder (its ``half/`` pyramids). The network runs once
per model and image; its nucleus probability is cached in ``WORK/objects_sweep/`` so that the sweep
itself (watershed only) is cheap to repeat. Ids are enlarged to full resolution (nearest neighbour)
and scored against the true ids: AJI, PQ, and the count error (|objects - nuclei| / nuclei),
beside the baseline of plain connected components of the same mask. ``--oracle`` adds two bounds
that use the truth: how far a perfect split of the same predicted pixels would go, and how far
the distance watershed goes from perfect markers (one per true nucleus).
"""

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
from _common import DATA, MPP, split
from scipy import ndimage as ndi
from skimage.io import imread
from skimage.segmentation import watershed

from genselfdiff.app.synthetic import write_pyramidal_tiff
from genselfdiff.eval.metrics import aji, panoptic_quality
from genselfdiff.infer.segment import segment_tiles
from genselfdiff.nn.model import load_model
from genselfdiff.objects.split import SplitParameters, split_objects

GRIDS = {
    # (probability threshold of the mask, h_um, min_area_um2, smooth_um, use the probability, where
    #  to split: "proc" at the processing level, ids enlarged; "nearest" at full resolution, the
    #  probability enlarged by nearest neighbour (as segment writes level 0); "bilinear" the same,
    #  enlarged bilinearly)
    "default": [(0.5, 0.2, 6.0, 0.5, False, "proc"), (0.5, 0.2, 6.0, 0.5, True, "proc")],
    # the mask as segment writes it (threshold 0.5, no probability): the watershed's own parameters
    "split": [(0.5, h, a, s, False, "proc") for h in (0.05, 0.1, 0.2) for a in (6.0, 12.0) for s in (0.25, 0.5)],
    "wide": [(t, h, a, s, p, "proc") for t in (0.5, 0.7) for h in (0.1, 0.2, 0.4) for a in (6.0, 12.0)
             for s in (0.5, 1.0) for p in (False, True)],
    # where to split, with and without the probability
    "full": [(0.5, h, 6.0, 0.5, p, f) for f in ("proc", "nearest", "bilinear") for p in (False, True) for h in (0.2, 0.4)],
}


def enlarge(prob: np.ndarray, shape) -> np.ndarray:
    """``prob`` resampled bilinearly to ``shape``, pixel centres aligned (as segment's labels)."""
    ys = (np.arange(shape[0]) + 0.5) * prob.shape[0] / shape[0] - 0.5
    xs = (np.arange(shape[1]) + 0.5) * prob.shape[1] / shape[1] - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return ndi.map_coordinates(prob, [yy, xx], order=1, mode="nearest")


def oracle_splits(mask: np.ndarray, truth: np.ndarray) -> tuple:
    """Two splits of a predicted ``mask`` that know the true nucleus ids ``truth`` (same shape).

    - *partition*: every true nucleus's pixels inside the mask seed a watershed of the mask's
      distance transform, so the mask is cut along the true borders and only its pixel errors
      (missed, extra and merged-in background pixels) remain: what a perfect split could reach.
    - *centroids*: one marker per true nucleus, at its centroid where the mask has it, and the
      same watershed as the default split: perfect markers, borders found by the distance alone.
    Pixels of the mask that no marker reaches become objects of their own (connected components).
    """
    dist = ndi.distance_transform_edt(mask)
    seeds = np.where(mask, truth, 0)
    ids = np.arange(1, int(truth.max()) + 1)
    centre = np.zeros_like(truth)
    for k, (y, x) in zip(ids, ndi.center_of_mass(truth > 0, truth, ids)):
        if np.isfinite(y) and mask[int(y), int(x)]:
            centre[int(y), int(x)] = k
    out = []
    for markers in (seeds, centre):
        ws = watershed(-dist, markers, mask=mask)
        rest = ndi.label(mask & (ws == 0))[0]
        out.append(np.where(rest > 0, rest + truth.max(), ws))
    return tuple(out)


def probability(model, src: Path, cache: Path, tta: bool) -> np.ndarray:
    """The nucleus probability (float16, processing level) of one image, cached."""
    if cache.exists():
        return np.load(cache)["p"].astype(np.float32)
    gen = segment_tiles(model, src, skip_background=False, probabilities=True, tta=tta)
    tiles = []
    try:
        while True:
            tiles.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    prob = np.zeros(result.shape, np.float32)
    for t in tiles:
        h, w = t.labels.shape
        prob[t.y : t.y + h, t.x : t.x + w] = t.probabilities[1]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, p=prob.astype(np.float16))
    return prob


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--grid", default="default", choices=sorted(GRIDS))
    ap.add_argument("--tta", action="store_true", help="test-time flips (the mean probability of 4 flips)")
    ap.add_argument("--oracle", action="store_true",
                    help="add the two splits that know the truth (oracle_splits): bounds, not methods")
    ap.add_argument("--trained", type=int, default=3, help="the first N pool images are the model's training set")
    args = ap.parse_args()
    held, pool = split(DATA)
    images = [p for p in list(pool[args.trained:]) + list(held) if (DATA / "instances" / p.name).exists()]
    for ck in args.models:
        model = load_model(args.work / ck, "cpu")
        scores = {g: [] for g in GRIDS[args.grid]}
        components, oracles = [], []
        for p in images:
            src = args.work / "half" / f"{p.stem}.ome.tif"
            if not src.exists():
                write_pyramidal_tiff(src, imread(p)[..., :3], mpp=MPP, min_side=400)
            name = f"{Path(ck).stem}{'_tta' if args.tta else ''}_{p.stem}.npz"
            prob = probability(model, src, args.work / "objects_sweep" / name, args.tta)
            truth = imread(DATA / "instances" / p.name).astype(np.int64)
            H, W = truth.shape
            fy, fx = H / prob.shape[0], W / prob.shape[1]
            rows = (np.arange(H) / fy).astype(int).clip(0, prob.shape[0] - 1)
            cols = (np.arange(W) / fx).astype(int).clip(0, prob.shape[1] - 1)
            mpp = MPP * (fy + fx) / 2
            n_true = len(np.unique(truth)) - 1
            cc = ndi.label(prob > 0.5)[0].astype(np.int64)[rows][:, cols]
            components.append((aji(cc, truth), panoptic_quality(cc, truth)["pq"], abs(int(cc.max()) - n_true) / n_true,
                               (int(cc.max()) - n_true) / n_true))
            line = [f"{p.stem[:12]} {'held' if p in held else 'pool'} nuclei {n_true} components AJI {components[-1][0]:.3f}"]
            if args.oracle:
                oracles.append([aji(ids, truth) for ids in oracle_splits(prob[rows][:, cols] > 0.5, truth)])
                line.append("oracle partition AJI {:.3f} centroids {:.3f}".format(*oracles[-1]))
            enlarged = {"nearest": lambda: prob[rows][:, cols], "bilinear": lambda: enlarge(prob, truth.shape)}
            big = {f: enlarged[f]() for f in {g[5] for g in scores} - {"proc"}}  # only what the grid splits
            for g in scores:
                t, h, a, s, use_p, full = g
                params = replace(SplitParameters(), h_um=h, min_area_um2=a, smooth_um=s)
                if full != "proc":
                    q = big[full]
                    ids = split_objects(q if use_p else None, q > t, mpp=MPP, params=params).astype(np.int64)
                else:
                    ids = split_objects(prob if use_p else None, prob > t, mpp=mpp, params=params)
                    ids = ids.astype(np.int64)[rows][:, cols]
                n = int(ids.max())
                pq = panoptic_quality(ids, truth)
                scores[g].append((aji(ids, truth), pq["pq"], abs(n - n_true) / n_true, (n - n_true) / n_true))
                line.append(f"AJI {scores[g][-1][0]:.3f} n {n}")
            print(" | ".join(line), flush=True)
        print(f"{ck}{' (tta)' if args.tta else ''}: mean over {len(images)} images")
        m = np.mean(components, axis=0)
        print(f"  connected components of the mask (threshold 0.5): AJI {m[0]:.3f} PQ {m[1]:.3f} "
              f"count error {m[2]:.3f} (signed {m[3]:+.3f})")
        if oracles:
            m = np.mean(oracles, axis=0)
            print(f"  oracle (knows the true nuclei): a perfect split of this mask AJI {m[0]:.3f}; "
                  f"true centroids as markers of the distance watershed AJI {m[1]:.3f}")
        for g, v in scores.items():
            m = np.mean(v, axis=0)
            print(f"  threshold {g[0]} h {g[1]} min_area {g[2]} smooth {g[3]} prob {g[4]} at {g[5]}: AJI {m[0]:.3f} PQ {m[1]:.3f} "
                  f"count error {m[2]:.3f} (signed {m[3]:+.3f})", flush=True)


if __name__ == "__main__":
    main()
