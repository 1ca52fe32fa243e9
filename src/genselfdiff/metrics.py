"""Segmentation metrics: Dice/F1, IoU, HD95 and the aggregated Jaccard index (AJI).

Conventions (also in docs/evaluate.md):

- Dice and IoU of two empty masks are 1 (nothing to find, nothing found); if only one is
  empty they are 0.
- HD95 is the larger of the two directed 95th-percentile distances between the boundary
  pixels of the masks (as in MONAI and medpy), in pixels times ``spacing``. Boundary pixels
  are mask pixels with a 4-neighbour outside the mask (the image border counts as outside).
  Two empty masks give 0; one empty mask gives NaN (undefined), which means skip.
- AJI (Kumar et al., IEEE TMI 2017): every ground-truth instance is paired with the predicted
  instance of highest IoU; the intersections of the pairs are summed over the sum of their
  unions plus the areas of predicted instances never paired. A predicted instance may pair
  with several truths, as in the original definition. No instances on either side gives 1.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

_CROSS = ndi.generate_binary_structure(2, 1)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice (= F1 over pixels) of two boolean masks."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & truth)) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two boolean masks."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    union = int(np.count_nonzero(pred | truth))
    return 1.0 if union == 0 else int(np.count_nonzero(pred & truth)) / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or outside the image)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndi.binary_erosion(mask, _CROSS, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: float = 1.0) -> float:
    """95th-percentile symmetric Hausdorff distance between mask boundaries."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    has_p, has_t = pred.any(), truth.any()
    if not has_p and not has_t:
        return 0.0
    if not has_p or not has_t:
        return math.nan
    # Crop to both masks' bounding box: every boundary pixel (and so every nearest one) is inside.
    rows = np.flatnonzero((pred | truth).any(1))
    cols = np.flatnonzero((pred | truth).any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    bp = boundary(pred)[r0:r1, c0:c1]
    bt = boundary(truth)[r0:r1, c0:c1]
    to_t = ndi.distance_transform_edt(~bt)[bp]
    to_p = ndi.distance_transform_edt(~bp)[bt]
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95))) * spacing


def _compact(instances: np.ndarray):
    """Relabel instance ids to 0..n (0 stays background); returns (labels, n)."""
    flat = np.asarray(instances).ravel()
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
        n = ids.size
    else:
        n = ids.size - 1
    return inverse.reshape(np.shape(instances)), n


def aji(pred_instances: np.ndarray, truth_instances: np.ndarray) -> float:
    """Aggregated Jaccard index of two instance maps (0 = background, other ids = objects)."""
    p, n_p = _compact(pred_instances)
    t, n_t = _compact(truth_instances)
    if n_t == 0 and n_p == 0:
        return 1.0
    area_p = np.bincount(p.ravel(), minlength=n_p + 1)
    area_t = np.bincount(t.ravel(), minlength=n_t + 1)
    both = (p > 0) & (t > 0)
    pairs, overlap = np.unique(t[both].astype(np.int64) * (n_p + 1) + p[both], return_counts=True)
    pt, pp = pairs // (n_p + 1), pairs % (n_p + 1)
    union = area_t[pt] + area_p[pp] - overlap
    pair_iou = overlap / union
    # For each truth, its best pair: sort by (truth, -IoU) and take each truth's first row.
    order = np.lexsort((-pair_iou, pt))
    first = np.ones(order.size, bool)
    first[1:] = pt[order][1:] != pt[order][:-1]
    best = order[first]
    inter = int(overlap[best].sum())
    uni = int(union[best].sum())
    matched_t = np.zeros(n_t + 1, bool)
    matched_t[pt[best]] = True
    uni += int(area_t[1:][~matched_t[1:]].sum())  # truths with no overlap: union is their area
    used_p = np.zeros(n_p + 1, bool)
    used_p[pp[best]] = True
    uni += int(area_p[1:][~used_p[1:]].sum())  # predictions never paired
    return inter / uni if uni else 1.0


def segmentation_scores(pred: np.ndarray, truth: np.ndarray, *, classes: Optional[Sequence[int]] = None,
                        spacing: Optional[float] = None) -> dict:
    """Per-class Dice, IoU and HD95 of two class maps, plus their mean over foreground classes.

    ``classes`` defaults to every label > 0 present in either map. Returns
    ``{"dice": .., "iou": .., "hd95_px": .., ["hd95_um": ..], "per_class": {k: {...}}}``;
    means skip NaN. With ``spacing`` (µm per pixel) HD95 is also given in µm.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    if classes is None:
        present = set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())
        classes = sorted(int(k) for k in present if k > 0)
    per_class = {}
    for k in classes:
        p, t = pred == k, truth == k
        row = {"dice": dice(p, t), "iou": iou(p, t), "hd95_px": hd95(p, t)}
        if spacing:
            row["hd95_um"] = row["hd95_px"] * spacing
        per_class[int(k)] = row
    if not per_class:  # no foreground anywhere: the two empty-mask conventions
        empty = {"dice": 1.0, "iou": 1.0, "hd95_px": 0.0}
        if spacing:
            empty["hd95_um"] = 0.0
        return {**empty, "per_class": {}}
    out = {}
    for key in next(iter(per_class.values())):
        vals = [r[key] for r in per_class.values() if not math.isnan(r[key])]
        out[key] = float(np.mean(vals)) if vals else math.nan
    out["per_class"] = per_class
    return out


def instances_from_mask(mask: np.ndarray) -> np.ndarray:
    """Instances as the 4-connected components of a foreground mask."""
    labels, _ = ndi.label(np.asarray(mask) > 0, _CROSS)
    return labels
