"""Weak targets for the pixels strokes leave unpainted: the stain's, and the previous model's.

Strokes say what the cores of objects and the middle of the background are; most pixels of a
training patch stay unpainted. Two weak sources speak for them, each with a small weight beside
the strokes' own loss (``losses.prior_loss``, ``losses.anchor_loss``); strokes always win.

**The haematoxylin prior** (:func:`fit`, :func:`apply`). Strokes along nucleus cores and
through the stroma say nothing about where a nucleus ends, and a network trained on them alone
also calls a ring of one to three pixels around every nucleus "nucleus" (38 % of the pixels
called nucleus where 28 % are). Otsu's threshold on haematoxylin has the opposite fault: tight
at the boundary, but it misses pale nuclei. Each unlabelled pixel gets a weak target from that
threshold, so the boundary follows the stain where no stroke says otherwise. The threshold is
Otsu's, per image, over the annotated tiles (where the painter looked), so it follows each
image's staining and never reads a whole slide. It is only a fair prior when the strokes agree
with it (nucleus strokes above it, background strokes below), which :func:`fit` checks:
strokes of glands, tumour regions or anything else that haematoxylin alone does not separate
switch it off.

**The anchor** (:func:`anchor_maps`, :func:`apply_anchor`). A correction round continues from
the model the person has just looked at, with a few new strokes where it was wrong. Trained on
the strokes alone, twenty background strokes between packed nuclei can teach it to drop whole
clusters it had right. So the unpainted pixels where the previous model was confident keep its
answer as a weak target: new strokes move the model where they are, and little elsewhere.
Confident pixels win over the stain prior (the person has seen and accepted that prediction).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..objects.measure import haematoxylin_od
from .losses import ANCHOR, IGNORE, PRIOR

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


# --- the anchor: the previous model's confident predictions ---------------------------------

# Pixels whose top class probability is at least this keep the previous model's answer; the
# uncertain rest (boundaries, the errors the person corrects) is left to the strokes.
ANCHOR_CONFIDENCE = 0.9
UNSURE = 255  # an anchor map's value where the previous model was not confident


class AnchorMap:
    """The previous model's confident classes around an image's annotated tiles: ``read(y, x, h, w)``
    gives uint8 class ids, :data:`UNSURE` where it was not confident or did not predict."""

    def __init__(self, tiles: dict, tile: int):
        self.tiles, self.tile = tiles, tile

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w), UNSURE, np.uint8)
        t = self.tile
        for ty in range(y0 // t, (y0 + h - 1) // t + 1):
            for tx in range(x0 // t, (x0 + w - 1) // t + 1):
                block = self.tiles.get((ty, tx))
                if block is None:
                    continue
                ys, xs = max(ty * t, y0), max(tx * t, x0)
                ye, xe = min((ty + 1) * t, y0 + h), min((tx + 1) * t, x0 + w)
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = block[ys - ty * t : ye - ty * t, xs - tx * t : xe - tx * t]
        return out


def anchor_maps(items: list, model, tile: int, margin: int, *, batch: int = 8, progress=None) -> list:
    """One :class:`AnchorMap` per item: ``model`` (a :class:`genselfdiff.nn.model.Model`) predicted
    over the annotated tiles and their neighbours (where training patches are drawn), each tile
    with ``margin`` pixels of context, as the network sees a slide."""
    from scipy import ndimage as ndi

    maps = []
    S = tile + 2 * margin
    for n, it in enumerate(items):
        near = ndi.binary_dilation(it.tile_counts > 0, np.ones((3, 3), bool))
        where = [tuple(map(int, t)) for t in np.argwhere(near)]
        tiles = {}
        for k in range(0, len(where), batch):
            chunk = where[k : k + batch]
            windows = np.stack([it.image.read(ty * tile - margin, tx * tile - margin, S, S) for ty, tx in chunk])
            probs = model.predict(windows)[:, :, margin : margin + tile, margin : margin + tile]
            sure = probs.max(1) >= ANCHOR_CONFIDENCE
            for (ty, tx), cls, ok in zip(chunk, probs.argmax(1).astype(np.uint8), sure):
                tiles[(ty, tx)] = np.where(ok, cls, UNSURE).astype(np.uint8)
        maps.append(AnchorMap(tiles, tile))
        if progress is not None:
            progress(n + 1, len(items))
    return maps


def apply_anchor(target: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``target`` with its unlabelled pixels coded ``ANCHOR - c`` where the anchor map ``classes``
    says class c (``UNSURE`` leaves them unlabelled)."""
    out = target.copy()
    use = (out == IGNORE) & (classes != UNSURE)
    out[use] = ANCHOR - classes[use].astype(out.dtype)
    return out
