"""What benchmarks share: the machine they ran on, and the MoNuSeg split, reading and scoring."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "monuseg" / "train"
MPP = 0.2527


def machine(device) -> str:
    """CPU model, cores, load, torch version and threads, and the device (with the GPU's name)."""
    import torch

    device = torch.device(device)
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f" (load {os.getloadavg()[0]:.1f})" if hasattr(os, "getloadavg") else ""
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} cores{load}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {device}{gpu}")


def split(data: Path):
    """(held out, pool): every fifth of the 30 images by sorted name is held out for scoring;
    the other 24 in a fixed order (``default_rng(2024)``), whose prefixes are the labelled sets."""
    images = sorted((data / "images").glob("*.png"))
    if len(images) != 30:
        sys.exit(f"expected the 30 MoNuSeg training images in {data / 'images'}, found {len(images)}")
    held = [p for i, p in enumerate(images) if i % 5 == 4]
    pool = [p for i, p in enumerate(images) if i % 5 != 4]
    order = np.random.default_rng(2024).permutation(len(pool))
    return held, [pool[i] for i in order]


def read_rgb(path) -> np.ndarray:
    from skimage.io import imread

    return np.asarray(imread(path))[..., :3]


def read_mask(data: Path, image: Path) -> np.ndarray:
    from skimage.io import imread

    return np.asarray(imread(data / "masks" / image.name)) > 0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = pred.sum() + truth.sum()
    return 1.0 if s == 0 else float(2 * (pred & truth).sum() / s)


def simulate_strokes(mask, rng, *, nuclei: int = 40, background: int = 20, width: int = 3,
                     length: tuple = (15, 35), clearance: float = 4.0):
    """Brush strokes a pathologist might paint on an image whose true mask is ``mask``.

    Returns sparse labels (0 unlabelled, 1 background, 2 object): ``nuclei`` strokes along
    the cores of randomly chosen objects (the skeleton of each object, thickened to the
    brush ``width`` and kept inside the object) and ``background`` smooth random strokes of
    ``length`` pixels kept at least ``clearance`` pixels away from every object. ``mask``
    is binary or an instance-id image (touching objects stay apart when ids are given).
    """
    import numpy as np
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    mask = np.asarray(mask)
    objects = mask if mask.dtype != bool and mask.max() > 1 else ndi.label(mask > 0)[0]
    out = np.zeros(mask.shape, np.uint8)
    brush = np.ones((width, width), bool)
    slices = ndi.find_objects(objects)
    ids = [i + 1 for i, s in enumerate(slices) if s is not None]
    for oid in rng.permutation(ids)[:nuclei]:
        sl = tuple(slice(max(s.start - width, 0), s.stop + width) for s in slices[oid - 1])
        obj = objects[sl] == oid
        core = ndi.binary_erosion(obj, iterations=1)
        line = skeletonize(core if core.any() else obj)
        stroke = ndi.binary_dilation(line, brush) & obj
        out[sl][stroke] = 2
    far = ndi.distance_transform_edt(objects == 0) >= clearance
    starts = np.argwhere(far)
    h, w = mask.shape
    for _ in range(background if len(starts) else 0):
        y, x = starts[rng.integers(len(starts))].astype(float)
        angle = rng.uniform(0, 2 * np.pi)
        path = []
        for _ in range(int(rng.integers(*length))):  # a smooth random walk, one pixel a step
            angle += rng.normal(0, 0.15)
            y, x = y + np.sin(angle), x + np.cos(angle)
            if not (0 <= y < h and 0 <= x < w) or not far[int(y), int(x)]:
                break
            path.append((int(y), int(x)))
        line = np.zeros(mask.shape, bool)
        if path:
            line[tuple(np.array(path).T)] = True
        out[ndi.binary_dilation(line, brush) & far & (out == 0)] = 1
    return out


def simulate_corrections(strokes, truth, predicted, rng, *, background: int = 20, nuclei: int = 10,
                         width: int = 3, reach: int = 12, max_painted: float = 0.01):
    """The strokes a pathologist adds after seeing the model's prediction (napari's preview,
    then Continue): ``strokes`` plus short strokes in the largest regions where ``predicted``
    (bool, the object class) is wrong, largest first whatever their kind (what the eye
    catches): up to ``background`` strokes in false-positive regions (labelled background)
    and up to ``nuclei`` in missed objects, one per region. Each is the region's skeleton
    within ``reach`` pixels of its most interior point, thickened to the brush ``width`` and
    kept inside the wrong region, so a correction never contradicts the truth. Regions already
    painted are skipped, and painting stops before more than ``max_painted`` of the image is
    painted in all; ``rng`` breaks ties between equal regions.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    out = np.array(strokes, np.uint8, copy=True)
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    brush = np.ones((width, width), bool)
    candidates = []  # (size, tie-break, value, region mask's label image, label)
    for wrong, value in ((predicted & ~truth, 1), (truth & ~predicted, 2)):
        regions, n = ndi.label(wrong)
        sizes = ndi.sum_labels(np.ones_like(regions), regions, np.arange(1, n + 1)) if n else []
        candidates += [(size, rng.random(), value, regions, r + 1) for r, size in enumerate(sizes)]
    left = {1: background, 2: nuclei}
    budget = int(max_painted * out.size) - int((out > 0).sum())
    yy, xx = np.ogrid[: out.shape[0], : out.shape[1]]
    for size, _, value, regions, label in sorted(candidates, key=lambda c: (-c[0], c[1])):
        if not any(left.values()):
            break
        region = regions == label
        if not left[value] or (out[region] != 0).any():
            continue
        depth = ndi.distance_transform_edt(region)
        cy, cx = np.unravel_index(np.argmax(depth), depth.shape)
        line = skeletonize(region) & ((yy - cy) ** 2 + (xx - cx) ** 2 <= reach**2)
        if not line.any():
            line[cy, cx] = True
        stroke = ndi.binary_dilation(line, brush) & region & (out == 0)
        if stroke.sum() > budget:
            break
        out[stroke] = value
        budget -= int(stroke.sum())
        left[value] -= 1
    return out
