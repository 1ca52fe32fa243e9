"""A haematoxylin prior for the pixels strokes leave unlabelled (nuclei from brush strokes).

Strokes along nucleus cores and through the stroma say nothing about where a nucleus ends,
and a network trained on them alone also calls a ring of one to three pixels around every
nucleus "nucleus" (docs/finetuning.md: 38 % of the pixels called nucleus where 28 % are).
Otsu's threshold on haematoxylin has the opposite fault: tight at the boundary, but it
misses pale nuclei. Here each unlabelled pixel of a training patch gets a weak target from
that threshold (``losses.prior_loss``, a small weight beside the strokes' own loss), so
the boundary follows the stain where no stroke says otherwise.

The threshold is Otsu's, per image, over the annotated tiles (where the painter looked),
so it follows each image's staining and never reads a whole slide. It is only a fair prior
when the strokes agree with it (nucleus strokes above it, background strokes below), which
is what :func:`fit` checks: strokes of glands, tumour regions or anything else that
haematoxylin alone does not separate switch it off.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..objects.measure import haematoxylin_od
from .losses import IGNORE, PRIOR

# The threshold must sort the painted pixels with at least this balanced accuracy (the mean of
# the shares of nucleus strokes above it and background strokes below it). Simulated strokes on
# three MoNuSeg images: 0.77 and 0.98, so 0.87; pale nuclei keep the first share low.
MIN_AGREEMENT = 0.75


def fit(items: list, tile: int, *, max_tiles: int = 64, seed: int = 0) -> Optional[list]:
    """Per-image haematoxylin thresholds for sparse two-class labels (1 = background,
    2 = the object class), or None when the strokes disagree with them (see the module doc)."""
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(seed)
    thresholds, above, below = [], [], []
    for it in items:
        tiles = np.argwhere(it.tile_counts > 0)
        if len(tiles) > max_tiles:
            tiles = tiles[rng.choice(len(tiles), max_tiles, replace=False)]
        od, lab = [], []
        for ty, tx in tiles:
            y, x = int(ty) * tile, int(tx) * tile
            od.append(haematoxylin_od(it.image.read(y, x, tile, tile)).ravel())
            lab.append(np.asarray(it.labels.read(y, x, tile, tile)).ravel())
        if not od:
            return None
        od, lab = np.concatenate(od), np.concatenate(lab)
        t = float(threshold_otsu(od))
        thresholds.append(t)
        above.append(od[lab == 2] > t)
        below.append(od[lab == 1] <= t)
    above, below = np.concatenate(above), np.concatenate(below)
    if not len(above) or not len(below) or (above.mean() + below.mean()) / 2 < MIN_AGREEMENT:
        return None
    return thresholds


def apply(image: np.ndarray, target: np.ndarray, threshold: float) -> np.ndarray:
    """``target`` with its unlabelled pixels coded ``PRIOR`` (background) or ``PRIOR - 1``
    (the object class) by the haematoxylin of ``image`` (uint8 RGB of the same size)."""
    out = target.copy()
    free = out == IGNORE
    dark = haematoxylin_od(image) > threshold
    out[free & ~dark] = PRIOR
    out[free & dark] = PRIOR - 1
    return out
