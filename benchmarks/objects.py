"""Objects (touching nuclei split apart) on MoNuSeg's images with nucleus ids, scored against the true ids.

Two modes:

``split``: the engine's split alone (:func:`genselfdiff.objects.split.split_objects`, the step
behind ``segment --instances``) on MoNuSeg's *true* masks. Each mask is reduced to the model's
working resolution (``--factor 2``: 0.505 µm/px; a pixel is foreground when half its block is),
split, and the objects enlarged back (nearest neighbour); AJI, PQ and the count error against
the true ids, beside connected components of the same masks. ``--h-um``, ``--min-area-um2``,
``--smooth-um`` set the split's parameters (:class:`~genselfdiff.objects.split.SplitParameters`),
``--blur-um`` hands it a probability (the mask blurred) as well. ``--tiled-core N`` instead checks,
on every mask, that splitting core by core (cores of N pixels, the default halo) gives exactly
the objects of splitting the whole image.

``model``: objects from a fine-tuned model as users get them: ``segment(model, image,
instances=True)`` on every image with ids that the model did not train on (the pool after the
first ``--trained`` images, then the held-out ones: 12 of MoNuSeg's 13), each image a two-level
pyramid stating 0.2527 µm/px so the model reads its own level; the objects are enlarged to full
resolution (nearest neighbour). Beside them: connected components of the same class labels (the
baseline). ``--oracle`` adds two bounds that know the truth: a perfect split of the same
predicted pixels (each true nucleus's pixels in the mask seed a watershed of the mask) and the
true centroids as the markers of the distance watershed. ``--model`` scores a checkpoint (e.g.
``label_efficiency.py``'s ``WORK/ft_random_3_s0.pt``); without it the mode first fine-tunes one
from random weights on the first ``--trained`` pool images (their masks), ``--steps`` steps at the
engine's working resolution (kept in ``--work``).

    python -m benchmarks.objects split [--quick] [--data DIR] [--h-um H] [--min-area-um2 A] [--smooth-um S]
                                       [--blur-um B] [--factor F] [--tiled-core N]
    python -m benchmarks.objects model [--quick] [--data DIR] [--work DIR] [--model MODEL.pt] [--seed S]
                                       [--steps N] [--patch P] [--oracle] [--tta]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .common import (
    MPP,
    add_data_argument,
    data_folder,
    data_name,
    enlarge,
    header,
    pyramid,
    read_instances,
    read_mask,
    split,
    ticker,
)

QUICK_IMAGES = 2  # --quick: images scored (split: masks split)
QUICK_STEPS = 10  # --quick: fine-tuning steps of the model it makes


# --- split: the split alone on the true masks -------------------------------------------------

def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Area-weighted: a low-resolution pixel is foreground when at least half its block is."""
    if factor == 1:
        return mask
    h, w = (s // factor * factor for s in mask.shape)
    blocks = mask[:h, :w].reshape(h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(1, 3)) >= 0.5


def upsample(ids: np.ndarray, factor: int, shape) -> np.ndarray:
    up = np.repeat(np.repeat(ids, factor, 0), factor, 1)
    out = np.zeros(shape, up.dtype)
    h, w = min(shape[0], up.shape[0]), min(shape[1], up.shape[1])
    out[:h, :w] = up[:h, :w]
    return out


def split_mode(args, data: Path) -> int:
    from genselfdiff.eval.metrics import aji, instances_from_mask, panoptic_quality
    from genselfdiff.objects.split import SplitParameters, split_objects

    params = SplitParameters(h_um=args.h_um, min_area_um2=args.min_area_um2, smooth_um=args.smooth_um)
    mpp = MPP * args.factor
    if args.tiled_core:
        return tiled_check(args, data, params, mpp)
    images = [p for p in sorted((data / "images").glob("*.png")) if (data / "instances" / p.name).exists()]
    images = images[:QUICK_IMAGES] if args.quick else images
    rows = []
    t0 = time.perf_counter()
    for p in images:
        truth, mask = read_instances(data, p), read_mask(data, p)
        low = downsample_mask(mask, args.factor)
        prob = ndi.gaussian_filter(low.astype(float), args.blur_um / mpp) if args.blur_um > 0 else None
        objects = upsample(split_objects(prob, low, mpp=mpp, params=params), args.factor, mask.shape)
        cc_full = instances_from_mask(mask)
        cc_low = upsample(instances_from_mask(low), args.factor, mask.shape)
        n_true, n_split = len(np.unique(truth)) - 1, len(np.unique(objects)) - 1
        rows.append([aji(cc_full, truth), aji(cc_low, truth), aji(objects, truth),
                     panoptic_quality(cc_low, truth)["pq"], panoptic_quality(objects, truth)["pq"],
                     abs(n_split - n_true) / n_true, abs(cc_low.max() - n_true) / n_true])
        print(f"{p.stem}: AJI cc {rows[-1][0]:.3f} cc@low {rows[-1][1]:.3f} split {rows[-1][2]:.3f}; "
              f"objects true {n_true} split {n_split}", flush=True)
    m = np.mean(rows, axis=0)
    print(f"summary: objects split, {data_name(data)} true masks, {len(rows)} images at {mpp:.3f} µm/px, {params}, "
          f"blur {args.blur_um} µm, {time.perf_counter() - t0:.0f} s: AJI connected components {m[0]:.3f} (full res) "
          f"{m[1]:.3f} (low res), split {m[2]:.3f}; PQ cc {m[3]:.3f} split {m[4]:.3f}; "
          f"count error cc {m[6]:.1%} split {m[5]:.1%}")
    return 0


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two id maps cut the image into the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], 1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


def tiled_check(args, data: Path, params, mpp) -> int:
    from genselfdiff.objects.split import HALO_UM, array_reader, object_tiles, split_objects

    images = sorted((data / "images").glob("*.png"))
    images = images[:QUICK_IMAGES] if args.quick else images
    same = cut = widest = 0
    for p in images:
        low = downsample_mask(read_mask(data, p), args.factor)
        prob = ndi.gaussian_filter(low.astype(float), 1.0)  # a smooth stand-in for a network's probability
        whole = split_objects(prob, low, mpp=mpp, params=params)
        tiled = np.zeros(low.shape, np.uint32)
        for t in object_tiles(array_reader(low, prob), low.shape, core=args.tiled_core, mpp=mpp, params=params):
            y0, x0, y1, x1 = t.core
            tiled[y0:y1, x0:x1] = t.ids
            cut += t.cut_clumps
        same += same_partition(tiled, whole)
        widest = max([widest] + [max(s[0].stop - s[0].start, s[1].stop - s[1].start)
                                 for s in ndi.find_objects(ndi.label(low)[0])])
    print(f"summary: objects split --tiled-core, {data_name(data)}: {len(images)} masks at {mpp:.3f} µm/px, "
          f"cores {args.tiled_core} px, halo {HALO_UM:g} µm: tiled == untiled on {same}; clumps wider than the "
          f"halo {cut}; widest clump {widest} px ({widest * mpp:.0f} µm)")
    return 0 if same == len(images) else 1


# --- model: objects from a fine-tuned model ------------------------------------------------------

def oracle_splits(mask: np.ndarray, truth: np.ndarray) -> tuple:
    """Two splits of a predicted ``mask`` that know the true nucleus ids ``truth`` (same shape).

    - *partition*: every true nucleus's pixels inside the mask seed a watershed of the mask's
      distance transform, so the mask is cut along the true borders and only its pixel errors
      (missed, extra and merged-in background pixels) remain: what a perfect split could reach.
    - *centroids*: one marker per true nucleus, at its centroid where the mask has it, and the
      same watershed as the default split: perfect markers, borders found by the distance alone.
    Pixels of the mask that no marker reaches become objects of their own (connected components).
    """
    from skimage.segmentation import watershed

    dist = ndi.distance_transform_edt(mask)
    seeds = np.where(mask, truth, 0)
    ids = np.arange(1, int(truth.max()) + 1)
    centre = np.zeros_like(truth)
    with np.errstate(invalid="ignore", divide="ignore"):  # ids absent from truth have no centre
        centres = ndi.center_of_mass(truth > 0, truth, ids)
    for k, (y, x) in zip(ids, centres):
        if np.isfinite(y) and mask[int(y), int(x)]:
            centre[int(y), int(x)] = k
    out = []
    for markers in (seeds, centre):
        ws = watershed(-dist, markers, mask=mask)
        rest = ndi.label(mask & (ws == 0))[0]
        out.append(np.where(rest > 0, rest + truth.max(), ws))
    return tuple(out)


def trained_model(args, data: Path, pool: list) -> Path:
    """A model fine-tuned from random weights on the first ``--trained`` pool images (kept in ``--work``)."""
    from genselfdiff import FinetuneConfig, finetune

    patch = f"_p{args.patch}" if args.patch else ""
    name = f"objects_model_{data_name(data)}_{args.preset}{patch}_t{args.trained}_s{args.seed}_{args.steps}.pt"
    out = args.work / name
    if out.exists():
        print(f"model: {out} (fine-tuned before)")
        return out
    images = [pyramid(p, args.work / "pyramids") for p in pool[: args.trained]]
    masks = [data / "masks" / p.name for p in pool[: args.trained]]
    cfg = FinetuneConfig.from_preset(args.preset, steps=args.steps, patch=args.patch, patience=0, seed=args.seed,
                                     class_names=["background", "nucleus"])
    r = finetune(images, masks, out, cfg, device=args.device, progress=ticker(out.stem))
    print(f"model: {out.name}, {r.steps} steps from random weights on {args.trained} images in "
          f"{r.seconds / 60:.1f} min, validation Dice {r.best_dice:.3f}", flush=True)
    return out


def model_mode(args, data: Path) -> int:
    from genselfdiff import load_model, segment
    from genselfdiff.eval.metrics import aji, panoptic_quality

    held, pool = split(data)
    model_path = args.model or trained_model(args, data, pool)
    model = load_model(model_path, args.device)
    images = [p for p in pool[args.trained:] + held if (data / "instances" / p.name).exists()]
    images = images[:QUICK_IMAGES] if args.quick else images
    ways = ["objects", "connected components"] + (["oracle: perfect split", "oracle: true centroids"]
                                                  if args.oracle else [])
    scores = {w: [] for w in ways}  # (AJI, PQ, count error, signed count error) per image
    for p in images:
        truth = read_instances(data, p)
        r = segment(model, pyramid(p, args.work / "pyramids"), skip_background=False, instances=True, tta=args.tta)
        labels = np.asarray(r.labels)
        found = {"objects": enlarge(np.asarray(r.objects.ids).astype(np.int64), truth.shape),
                 "connected components": enlarge(ndi.label(labels == 1)[0], truth.shape)}
        if args.oracle:
            found.update(zip(ways[2:], oracle_splits(enlarge(labels == 1, truth.shape), truth)))
        n_true = len(np.unique(truth)) - 1
        line = [f"{p.stem[:12]} {'held' if p in held else 'pool'} nuclei {n_true}"]
        for way, ids in found.items():
            n = len(np.unique(ids)) - 1
            scores[way].append((aji(ids, truth), panoptic_quality(ids, truth)["pq"], abs(n - n_true) / n_true,
                                (n - n_true) / n_true))
            line.append(f"{way} AJI {scores[way][-1][0]:.3f} n {n}")
        print(" | ".join(line), flush=True)
    means = {w: np.mean(v, axis=0) for w, v in scores.items()}
    for w, m in means.items():
        print(f"  {w:<24} AJI {m[0]:.3f} PQ {m[1]:.3f} count error {m[2]:.3f} (signed {m[3]:+.3f})")
    o, c = means["objects"], means["connected components"]
    bound = f"; perfect split AJI {means['oracle: perfect split'][0]:.3f}" if args.oracle else ""
    print(f"summary: objects model {Path(model_path).name}{' tta' if args.tta else ''}, {data_name(data)}, "
          f"{len(images)} images: segment --instances AJI {o[0]:.3f} PQ {o[1]:.3f} count error {o[2]:.3f} "
          f"(signed {o[3]:+.3f}); connected components AJI {c[0]:.3f}{bound}")
    return 0


def main(argv=None) -> int:
    from genselfdiff.objects.split import SplitParameters

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("split", help="the split alone on the true masks")
    s.add_argument("--factor", type=int, default=2, help="downsampling of the 0.25 µm/px masks (2 = 0.5 µm/px)")
    s.add_argument("--h-um", type=float, default=SplitParameters.h_um)
    s.add_argument("--min-area-um2", type=float, default=SplitParameters.min_area_um2)
    s.add_argument("--smooth-um", type=float, default=SplitParameters.smooth_um)
    s.add_argument("--blur-um", type=float, default=0.0,
                   help="also pass a probability made by blurring the mask with this sigma (0 = mask only)")
    s.add_argument("--tiled-core", type=int, default=0, help="check tiled == untiled with cores of this side")
    m = sub.add_parser("model", help="objects of segment(instances=True) from a fine-tuned model")
    m.add_argument("--model", type=Path, help="a fine-tuned checkpoint (default: fine-tune one, see --steps)")
    m.add_argument("--trained", type=int, default=3, help="the first N pool images are the model's training set")
    m.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps of the model made without --model (default 2500, quick {QUICK_STEPS})")
    m.add_argument("--patch", type=int, default=None, help="its patch side (default: the preset's)")
    m.add_argument("--preset", default="tiny", help="its preset (default tiny)")
    m.add_argument("--seed", type=int, default=0, help="its seed")
    m.add_argument("--oracle", action="store_true", help="add the two splits that know the truth (bounds, not methods)")
    m.add_argument("--tta", action="store_true", help="segment with test-time flips (4x the network's time)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    for q in (s, m):
        q.add_argument("--quick", action="store_true", help=f"a smoke test: {QUICK_IMAGES} images"
                       + (f", a {QUICK_STEPS}-step model" if q is m else ""))
        add_data_argument(q)
        q.add_argument("--work", type=Path, default=None,
                       help="folder for pyramids and models (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.mode == "model":
        import torch

        torch.set_num_threads(args.threads)
        args.steps = args.steps or (QUICK_STEPS if args.quick else 2500)
    header(getattr(args, "device", "cpu"))
    args.work = args.work or Path(tempfile.mkdtemp(prefix="genselfdiff-objects-"))
    args.work.mkdir(parents=True, exist_ok=True)
    data = data_folder(args, args.work)
    return split_mode(args, data) if args.mode == "split" else model_mode(args, data)


if __name__ == "__main__":
    sys.exit(main())
