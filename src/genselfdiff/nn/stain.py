"""Stain normalization: every H&E image is mapped to one reference staining before the network sees it.

A model fine-tuned on three images has seen three stainings. On a fourth lab's slide, where the
haematoxylin is darker or bluer, it calls most of the tissue "nucleus". Stain augmentation
(``train.augment``) perturbs the training stains, but it cannot teach the model all of them.
So the input itself is normalised: Macenko et al. (ISBI 2009) estimate each image's two stain
colours (haematoxylin and eosin, as optical-density vectors) and how much of each stain the image
holds. Each pixel's stain amounts are rescaled to a reference and drawn in the reference colours.

One :class:`Stain` is fitted per image, from pixels at the resolution the model runs at
(:func:`fit_image`). It is then applied pixel by pixel, so tiles stay seamless and a resumed run
gives the same bytes. Training and segmentation fit the same way, so what the network learnt is
what it sees. A model records in its checkpoint whether it expects this (``Model.stain``).
Models without the record, and the official recipe, see the raw pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

METHOD = "macenko"
# The reference: the H and E optical-density vectors (columns, R G B) and the 99th-percentile
# stain amounts of the reference image in Macenko's paper, as most implementations use them.
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX = np.array([1.9705, 1.0308])
LIGHT = 240.0  # the intensity of unstained glass
STAINED_OD = 0.15  # pixels with less optical density in any channel are glass, left out of the fit
ANGLE_PERCENTILE = 1.0  # robust extremes of the stain angles (Macenko's alpha)
MAX_PERCENTILE = 99.0
MIN_STAINED = 500  # fewer stained pixels than this: no fit, the image is left as it is
FIT_TILES = 16  # at most this many windows of FIT_SIDE² pixels are read to fit a large image
FIT_SIDE = 256
MOSTLY_STAINED = 0.25  # a window with fewer stained pixels is mostly glass


@dataclass(frozen=True)
class Stain:
    """One image's stain colours (``stains``: 3×2 optical density, columns H then E) and its
    99th-percentile stain amounts (``max_amount``)."""

    stains: tuple
    max_amount: tuple

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB (..., 3) drawn with the reference stains and amounts."""
        rgb = np.asarray(rgb)
        od = -np.log((rgb.astype(np.float32) + 1.0) / np.float32(LIGHT))
        # amounts = pinv(stains) @ od, then rescaled to the reference; written out per channel so
        # each pixel's result does not depend on how many pixels are computed together.
        unmix = np.linalg.pinv(np.asarray(self.stains, np.float64))
        scale = REFERENCE_MAX / np.asarray(self.max_amount, np.float64)
        a = [sum(np.float32(unmix[s, c] * scale[s]) * od[..., c] for c in range(3)) for s in range(2)]
        out = np.empty(rgb.shape, np.uint8)
        for c in range(3):
            density = np.float32(REFERENCE_STAINS[c, 0]) * a[0] + np.float32(REFERENCE_STAINS[c, 1]) * a[1]
            out[..., c] = np.clip(np.rint(np.float32(LIGHT) * np.exp(-density)), 0, 255)
        return out


def fit(rgb: np.ndarray) -> Optional[Stain]:
    """The :class:`Stain` of uint8 RGB pixels (any shape ending in 3), or None when they hold too
    few stained pixels, or no two distinct stains (then the image is best left as it is)."""
    od = -np.log((np.asarray(rgb, np.float64).reshape(-1, 3) + 1.0) / LIGHT)
    od = od[(od > STAINED_OD).all(axis=1)]
    if len(od) < MIN_STAINED:
        return None
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, [2, 1]]  # the two main directions of the optical density
    plane *= np.where(plane[0] < 0, -1.0, 1.0)
    projected = od @ plane
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(angle, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2], 1) if v1[0] > v2[0] else np.stack([v2, v1], 1)  # H absorbs more red
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    if (stains < 0).any() or abs(float(stains[:, 0] @ stains[:, 1])) > 0.99:
        return None  # not two stains in positive amounts: not an H&E image as Macenko reads one
    amounts = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    max_amount = np.percentile(amounts, MAX_PERCENTILE, axis=1)
    if (max_amount <= 0).any():
        return None
    return Stain(tuple(map(tuple, stains.tolist())), tuple(max_amount.tolist()))


def fit_image(read: Callable, shape: tuple, *, seed: int = 0) -> Optional[Stain]:
    """The :class:`Stain` of an image of ``shape`` (H, W) that ``read(y, x, h, w)`` reads as uint8
    RGB: the whole image when it is small; else windows of :data:`FIT_SIDE`² in an order drawn
    from ``seed`` alone, keeping the first :data:`FIT_TILES` that are mostly stained (glass is
    skipped without a tissue map), so every run on the same image fits the same stain."""
    h, w = int(shape[0]), int(shape[1])
    grid = [(y, x) for y in range(0, h, FIT_SIDE) for x in range(0, w, FIT_SIDE)]
    if len(grid) <= FIT_TILES:
        return fit(np.asarray(read(0, 0, h, w)))
    kept = []
    for i in np.random.default_rng(seed).permutation(len(grid))[: 4 * FIT_TILES]:
        y, x = grid[i]
        pixels = np.asarray(read(y, x, min(FIT_SIDE, h - y), min(FIT_SIDE, w - x))).reshape(-1, 3)
        stained = (-np.log((pixels.astype(np.float32) + 1) / np.float32(LIGHT)) > STAINED_OD).all(axis=1)
        if stained.mean() >= MOSTLY_STAINED:
            kept.append(pixels)
            if len(kept) == FIT_TILES:
                break
    return fit(np.concatenate(kept)) if kept else None
