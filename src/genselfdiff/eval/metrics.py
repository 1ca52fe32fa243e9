"""Segmentation metrics: Dice/F1, IoU, HD95, and for objects AJI, PQ and the GlaS scores.

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
- PQ (Kirillov et al., CVPR 2019): a prediction and a truth match when their IoU exceeds 0.5
  (so matches are unique); DQ = TP / (TP + FP/2 + FN/2) (an F1 of detection), SQ = the mean IoU
  of the matches, PQ = DQ x SQ. No objects on either side gives 1 for all three; no match but
  some objects gives 0.
- GlaS (Sirinukunwattana et al., Medical Image Analysis 2017, and the challenge's Matlab code):
  an object's partner on the other side is the object it overlaps most (background excluded;
  ties go to the smaller id). Object F1: a predicted object is a true positive when it covers
  more than half of its partner's area; FN = truths - TP. Object Dice and object Hausdorff
  average the Dice (resp. Hausdorff distance) of every object with its partner, weighted by
  the object's share of its side's total area, over predictions and truths, and halve the sum.
  An object without overlap has Dice 0 and, for Hausdorff, the partner with the smallest
  Hausdorff distance. Hausdorff distances are between the objects' pixel sets (Euclidean, in
  pixels times ``spacing``). One side empty: F1 and Dice 0, Hausdorff NaN (undefined); both
  empty: F1 and Dice 1, Hausdorff 0.
- Count error: |predicted objects - true objects| / true objects (NaN without true objects).
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


def _contingency(pred_instances: np.ndarray, truth_instances: np.ndarray):
    """Compact both maps and list every (truth, prediction) pair that overlaps, with its size.

    Returns ``(t, p, n_t, n_p, area_t, area_p, pt, pp, overlap)``; ids are 1..n, 0 background.
    """
    t, n_t = _compact(truth_instances)
    p, n_p = _compact(pred_instances)
    if t.shape != p.shape:
        raise ValueError(f"shapes differ: {np.shape(pred_instances)} vs {np.shape(truth_instances)}")
    area_t = np.bincount(t.ravel(), minlength=n_t + 1)
    area_p = np.bincount(p.ravel(), minlength=n_p + 1)
    both = (p > 0) & (t > 0)
    pairs, overlap = np.unique(t[both].astype(np.int64) * (n_p + 1) + p[both], return_counts=True)
    return t, p, n_t, n_p, area_t, area_p, pairs // (n_p + 1), pairs % (n_p + 1), overlap


def panoptic_quality(pred_instances: np.ndarray, truth_instances: np.ndarray) -> dict:
    """``{"pq", "dq", "sq", "tp", "fp", "fn"}`` of two instance maps (IoU > 0.5 matching)."""
    _, _, n_t, n_p, area_t, area_p, pt, pp, overlap = _contingency(pred_instances, truth_instances)
    pair_iou = overlap / (area_t[pt] + area_p[pp] - overlap)
    matched = pair_iou > 0.5  # above one half two objects can share with only one partner
    tp = int(matched.sum())
    fp, fn = n_p - tp, n_t - tp
    if n_t == 0 and n_p == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(pair_iou[matched].mean()) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def _partners(first, second, overlap, n_first):
    """For each object 1..n of ``first``, the object of ``second`` it overlaps most (0 = none)."""
    partner = np.zeros(n_first + 1, np.int64)
    shared = np.zeros(n_first + 1, np.int64)
    if overlap.size:
        order = np.lexsort((second, -overlap, first))  # per object: largest overlap, then smallest id
        keep = np.ones(order.size, bool)
        keep[1:] = first[order][1:] != first[order][:-1]
        best = order[keep]
        partner[first[best]] = second[best]
        shared[first[best]] = overlap[best]
    return partner, shared


def object_f1(pred_instances: np.ndarray, truth_instances: np.ndarray) -> dict:
    """GlaS object-level ``{"f1", "precision", "recall", "tp", "fp", "fn"}``."""
    _, _, n_t, n_p, area_t, _, pt, pp, overlap = _contingency(pred_instances, truth_instances)
    if n_t == 0 and n_p == 0:
        return {"f1": 1.0, "precision": 1.0, "recall": 1.0, "tp": 0, "fp": 0, "fn": 0}
    partner, shared = _partners(pp, pt, overlap, n_p)
    hit = (partner[1:] > 0) & (shared[1:] > 0.5 * area_t[partner[1:]])
    tp = int(hit.sum())
    fp, fn = n_p - tp, n_t - tp
    precision = tp / n_p if n_p else 0.0
    recall = tp / n_t if n_t else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


def object_dice(pred_instances: np.ndarray, truth_instances: np.ndarray) -> float:
    """GlaS object-level Dice: area-weighted Dice of each object with its partner, both ways."""
    _, _, n_t, n_p, area_t, area_p, pt, pp, overlap = _contingency(pred_instances, truth_instances)
    if n_t == 0 and n_p == 0:
        return 1.0
    if n_t == 0 or n_p == 0:
        return 0.0

    def side(first, second, area_first, area_second, n_first):
        partner, shared = _partners(first, second, overlap, n_first)
        a = area_first[1:]
        d = np.where(partner[1:] > 0, 2.0 * shared[1:] / (a + area_second[partner[1:]]), 0.0)
        return float((a / a.sum() * d).sum())

    return 0.5 * (side(pp, pt, area_p, area_t, n_p) + side(pt, pp, area_t, area_p, n_t))


def object_hausdorff(pred_instances: np.ndarray, truth_instances: np.ndarray, spacing: float = 1.0) -> float:
    """GlaS object-level Hausdorff distance (pixels times ``spacing``)."""
    from scipy.spatial import cKDTree

    t, p, n_t, n_p, area_t, area_p, pt, pp, overlap = _contingency(pred_instances, truth_instances)
    if n_t == 0 and n_p == 0:
        return 0.0
    if n_t == 0 or n_p == 0:
        return math.nan
    points = {}
    for name, lab, n in (("t", t, n_t), ("p", p, n_p)):
        flat = lab.ravel()
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], np.arange(n + 2))
        coords = np.stack(np.unravel_index(order, lab.shape), 1).astype(np.float64)
        points[name] = [coords[starts[k]:starts[k + 1]] for k in range(n + 1)]
    trees: dict = {}

    def tree(name, k):
        if (name, k) not in trees:
            trees[name, k] = cKDTree(points[name][k])
        return trees[name, k]

    def hausdorff(a, i, b, j):
        return max(tree(b, j).query(points[a][i])[0].max(), tree(a, i).query(points[b][j])[0].max())

    def side(a, b, first, second, area_first, n_first, n_second):
        partner, _ = _partners(first, second, overlap, n_first)
        total = 0.0
        for i in range(1, n_first + 1):
            j = partner[i]
            h = (hausdorff(a, i, b, j) if j else
                 min(hausdorff(a, i, b, k) for k in range(1, n_second + 1)))
            total += area_first[i] / area_first[1:].sum() * h
        return total

    return 0.5 * (side("p", "t", pp, pt, area_p, n_p, n_t) + side("t", "p", pt, pp, area_t, n_t, n_p)) * spacing


def count_error(pred_instances: np.ndarray, truth_instances: np.ndarray) -> float:
    """|predicted objects - true objects| / true objects; NaN when there are no true objects."""
    n_p = _compact(pred_instances)[1]
    n_t = _compact(truth_instances)[1]
    return abs(n_p - n_t) / n_t if n_t else math.nan
