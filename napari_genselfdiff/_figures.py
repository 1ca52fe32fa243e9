"""The figures the widgets show about strokes and predictions, as plain functions of arrays.

Only what can be read honestly off the layers: the share of the image painted per class, the
share of a prediction per class, how many painted pixels changed class between two rounds, and
a warning when a prediction is implausible. No Qt, no napari: the tests call these directly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# Nuclei cover well under half of H&E tissue, and a slide has glass besides. A prediction that
# calls more than this share of the image one object class most likely has not learnt what
# background looks like there yet. A warning, not a verdict: one tissue class may fill an image.
IMPLAUSIBLE_SHARE = 0.6


def class_counts(values, n: int) -> np.ndarray:
    """Pixels per value 0..n-1 of an integer array (larger values are not counted)."""
    counts = np.bincount(np.asarray(values).ravel(), minlength=n)
    return counts[:n].astype(np.int64)


def _percent(share: float) -> str:
    """Two significant digits below 1 % (strokes cover little), one decimal above."""
    p = 100 * share
    return f"{p:.1f} %" if p >= 1 else f"{p:.2g} %"


def painted_line(counts, names: list, images: int) -> str:
    """``counts``: pixels per stroke value (0 = unpainted, k = class k-1) summed over the
    annotation layers of ``images`` images: 'painted: background 0.4 %, nucleus 0.3 % of 2 images'."""
    counts = np.asarray(counts, float)
    total = counts.sum() or 1.0
    shares = ", ".join(f"{name} {_percent(counts[k + 1] / total)}" for k, name in enumerate(names) if k + 1 < len(counts))
    return f"painted: {shares} of {images} image{'s' if images != 1 else ''}"


def area_line(counts, names: list, objects: Optional[dict] = None) -> str:
    """``counts``: pixels per class id of a result: 'background 80.1 %, nucleus 19.9 % of the
    area; 140 nucleus objects' (the objects per class name when they were asked for)."""
    counts = np.asarray(counts, float)
    total = counts.sum() or 1.0
    text = ", ".join(f"{name} {_percent(counts[k] / total)}" for k, name in enumerate(names) if k < len(counts))
    text += " of the area"
    if objects:
        text += "; " + ", ".join(f"{n} {name} object{'s' if n != 1 else ''}" for name, n in objects.items())
    return text


def implausible(counts, names: list, where: str) -> Optional[str]:
    """One line when a prediction (``counts`` per class id) calls most of ``where`` one object
    class, or nothing at all; None when it looks plausible (or there is nothing to judge)."""
    counts = np.asarray(counts, float)
    total = counts.sum()
    if total == 0 or len(counts) < 2:
        return None
    objects = counts[1:]
    if objects.sum() == 0:
        return (f"The model finds no {' or '.join(names[1:])} in {where}: paint {names[1]} strokes on some there, "
                "then Continue.")
    k = int(np.argmax(objects))
    share = objects[k] / total
    if share > IMPLAUSIBLE_SHARE:
        return (f"The model calls {100 * share:.0f} % of {where} {names[k + 1]}, which is implausible: "
                f"paint {names[0]} strokes where it is wrong, then Continue.")
    return None


def stroke_snapshot(labels) -> tuple:
    """The painted pixels of a stroke array, kept small: ``(shape, flat indices, values)``."""
    labels = np.asarray(labels)
    flat = np.flatnonzero(labels)
    return labels.shape, flat, labels.ravel()[flat].copy()


def changed_strokes(snapshot, labels) -> int:
    """Pixels painted both in ``snapshot`` and in ``labels`` with another class now (the newest
    stroke wins in the layer; this counts how many an earlier round learnt otherwise)."""
    shape, flat, values = snapshot
    labels = np.asarray(labels)
    if labels.shape != shape:
        return 0
    now = labels.ravel()[flat]
    return int(np.count_nonzero((now != 0) & (now != values)))
