"""How well `instances.split_objects` separates touching nuclei, measured on MoNuSeg's *true* masks.

The true binary masks are split (at the model's working resolution, 0.5 µm/px, by default)
and scored against the true nucleus ids with AJI and PQ; the baseline is the connected
components of the same binary masks. This isolates the splitting step from the network.

    PYTHONPATH=src:. python benchmarks/objects_monuseg.py --data ../shared/data/monuseg/train

With ``--tiled-core N`` it instead checks, on every mask, that splitting core by core (cores of N
pixels, the default halo) gives exactly the objects of splitting the whole image.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from genselfdiff.eval.metrics import aji, instances_from_mask, panoptic_quality
from genselfdiff.objects.split import HALO_UM, SplitParameters, array_reader, object_tiles, split_objects

SOURCE_MPP = 0.2527  # MoNuSeg, per the annotations


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/monuseg/train"))
    ap.add_argument("--factor", type=int, default=2, help="downsampling of the 0.25 µm/px masks (2 = 0.5 µm/px)")
    ap.add_argument("--h-um", type=float, default=SplitParameters.h_um)
    ap.add_argument("--min-area-um2", type=float, default=SplitParameters.min_area_um2)
    ap.add_argument("--smooth-um", type=float, default=SplitParameters.smooth_um)
    ap.add_argument("--blur-um", type=float, default=0.0,
                    help="also pass a probability made by blurring the mask with this sigma (0 = mask only)")
    ap.add_argument("--tiled-core", type=int, default=0, help="check tiled == untiled with cores of this side")
    args = ap.parse_args(argv)
    print("command:", " ".join([Path(sys.executable).name] + sys.argv))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    params = SplitParameters(h_um=args.h_um, min_area_um2=args.min_area_um2, smooth_um=args.smooth_um)
    mpp = SOURCE_MPP * args.factor
    if args.tiled_core:
        return tiled_check(args, params, mpp)
    rows = []
    t0 = time.perf_counter()
    for path in sorted((args.data / "instances").glob("*.png")):
        truth = np.asarray(Image.open(path)).astype(np.int64)
        mask = np.asarray(Image.open(args.data / "masks" / path.name)) > 0
        low = downsample_mask(mask, args.factor)
        prob = ndi.gaussian_filter(low.astype(float), args.blur_um / mpp) if args.blur_um > 0 else None
        split = upsample(split_objects(prob, low, mpp=mpp, params=params), args.factor, mask.shape)
        cc_full = instances_from_mask(mask)
        cc_low = upsample(instances_from_mask(low), args.factor, mask.shape)
        n_true = len(np.unique(truth)) - 1
        n_split = len(np.unique(split)) - 1
        rows.append([aji(cc_full, truth), aji(cc_low, truth), aji(split, truth),
                     panoptic_quality(cc_low, truth)["pq"], panoptic_quality(split, truth)["pq"],
                     abs(n_split - n_true) / n_true, abs(cc_low.max() - n_true) / n_true])
        print(f"{path.stem}: AJI cc {rows[-1][0]:.3f} cc@low {rows[-1][1]:.3f} split {rows[-1][2]:.3f}; "
              f"objects true {n_true} split {n_split}", flush=True)
    m = np.mean(rows, axis=0)
    print(f"{len(rows)} images at {mpp:.3f} µm/px, {params}, blur {args.blur_um} µm, "
          f"{time.perf_counter() - t0:.0f} s: AJI connected components {m[0]:.3f} (full res) "
          f"{m[1]:.3f} (low res), split {m[2]:.3f}; PQ cc {m[3]:.3f} split {m[4]:.3f}; "
          f"count error cc {m[6]:.1%} split {m[5]:.1%}")
    return 0


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two id maps cut the image into the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], 1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


def tiled_check(args, params, mpp) -> int:
    paths = sorted((args.data / "masks").glob("*.png"))
    same = cut = widest = 0
    for path in paths:
        low = downsample_mask(np.asarray(Image.open(path)) > 0, args.factor)
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
    print(f"{len(paths)} masks at {mpp:.3f} µm/px, cores {args.tiled_core} px, halo {HALO_UM:g} µm: "
          f"tiled == untiled on {same}; clumps wider than the halo {cut}; widest clump {widest} px "
          f"({widest * mpp:.0f} µm)")
    return 0 if same == len(paths) else 1


if __name__ == "__main__":
    raise SystemExit(main())
