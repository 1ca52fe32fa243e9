"""Procedural H&E-like tissue with known ground truth, and a pyramidal OME-TIFF writer.

Used by the demo, the napari sample data, tests and benchmarks: no download and no
patient data. Stroma is eosin pink with fibre texture, nuclei are haematoxylin-purple
ellipses (the ground-truth class 1), and irregular glass regions stay white.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import ellipse

from ..io.atomic import atomic_path

STROMA = np.array([236, 168, 208], np.float32)
FIBRE = np.array([205, 110, 170], np.float32)
NUCLEUS = np.array([88, 52, 140], np.float32)
GLASS = np.array([246, 244, 247], np.float32)


def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (n - n.mean()) / (n.std() + 1e-8)


def synthetic_tissue(shape=(1024, 1024), seed: int = 0, nuclei_per_mpx: float = 900.0,
                     glass: float = 0.2) -> tuple:
    """Return ``(rgb, labels)``: uint8 (H, W, 3) H&E-like image and uint8 (H, W) with 1 = nucleus."""
    rng = np.random.default_rng(seed)
    h, w = shape
    # Glass regions: thresholded low-frequency noise, made at 1/16 scale (cheap) and enlarged.
    coarse = _smooth_noise((h // 16 + 2, w // 16 + 2), max(h, w) / 192, rng)
    coarse = ndi.zoom(coarse, 16, order=1)[:h, :w]
    tissue = coarse > np.quantile(coarse, glass) if glass > 0 else np.ones(shape, bool)
    fibres = np.clip(_smooth_noise(shape, 2.0, rng) * 0.5 + _smooth_noise(shape, 8, rng) * 0.5, -2, 2)
    t = (fibres[..., None] + 2) / 4
    img = STROMA * (1 - t) + FIBRE * t

    labels = np.zeros(shape, np.uint8)
    n = int(nuclei_per_mpx * h * w / 1e6)
    cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
    for y, x in zip(cy, cx):
        if not tissue[y, x]:
            continue
        r1, r2 = rng.uniform(3.5, 8.5), rng.uniform(3.0, 6.5)
        rr, cc = ellipse(y, x, r1, r2, shape=shape, rotation=rng.uniform(0, np.pi))
        labels[rr, cc] = 1
    chromatin = 1 + 0.12 * _smooth_noise(shape, 1.0, rng)
    nuc = labels.astype(bool)
    img[nuc] = NUCLEUS * chromatin[nuc, None]
    img = np.where(tissue[..., None], img, GLASS)
    labels[~tissue] = 0
    img = ndi.gaussian_filter(img, (0.8, 0.8, 0))
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), labels


def downsample2(img: np.ndarray) -> np.ndarray:
    """Halve each side by 2x2 averaging (odd edges dropped)."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    v = img[:h, :w].astype(np.float32)
    v = (v[0::2, 0::2] + v[1::2, 0::2] + v[0::2, 1::2] + v[1::2, 1::2]) / 4
    return np.round(v).astype(img.dtype)


def write_pyramidal_tiff(path, rgb: np.ndarray, mpp: Optional[float] = 0.5, min_side: int = 256,
                         tile: int = 256, compression: str = "zlib") -> Path:
    """Write an OME-TIFF pyramid (SubIFDs, tiled, halving down to ``min_side``)."""
    import tifffile

    path = Path(path)
    levels = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        levels.append(downsample2(levels[-1]))
    meta = {"axes": "YXS"}
    if mpp:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    opts = dict(photometric="rgb", tile=(tile, tile), compression=compression)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, metadata=None, **opts)
    return path
