"""QuPath objects become label images: class numbering and rasterising.

A pixel belongs to a polygon when its centre ``(c + 0.5, r + 0.5)`` lies inside (QuPath's
convention; coordinates in level-0 pixels). :func:`read_geojson_labels` turns one GeoJSON
file into a label image; :func:`training_labels` turns the files of a fine-tuning run into
label images at the training level with one class numbering shared by all of them
(:func:`training_classes`), reading each file once, so the Python API and the command line
train on the same labels.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import UserError
from .labels import default_colors
from .qupath import UNCLASSIFIED, FeatureWarning, read_geojson


def _polygon_pixels(poly: list, shape, downsample: float):
    """The pixels of one [shell, *holes] polygon: (local bool mask, (row0, col0)) or None if none."""
    from skimage.draw import polygon as fill

    shell = poly[0] / downsample
    r0 = max(int(math.floor(shell[:, 1].min())), 0)
    c0 = max(int(math.floor(shell[:, 0].min())), 0)
    r1 = min(int(math.ceil(shell[:, 1].max())) + 1, shape[0])
    c1 = min(int(math.ceil(shell[:, 0].max())) + 1, shape[1])
    if r1 <= r0 or c1 <= c0:
        return None
    local = np.zeros((r1 - r0, c1 - c0), bool)
    for j, ring in enumerate(poly):
        rr, cc = fill(ring[:, 1] / downsample - 0.5 - r0, ring[:, 0] / downsample - 0.5 - c0, local.shape)
        local[rr, cc] = j == 0
    return local, (r0, c0)


def rasterize(polygons: list, shape, downsample: float = 1.0, *, into: Optional[np.ndarray] = None,
              value=True) -> np.ndarray:
    """Paint the pixels whose centres fall inside the polygons (holes left out).

    ``polygons`` are [shell, *holes] arrays of level-0 (x, y); the image has ``shape`` at
    ``downsample`` level-0 pixels per pixel. Paints ``value`` into ``into`` when given (later
    polygons over earlier ones), else returns a new boolean mask.
    """
    out = np.zeros(shape, bool) if into is None else into
    for poly in polygons:
        got = _polygon_pixels(poly, shape, downsample)
        if got is not None:
            local, (r0, c0) = got
            out[r0:r0 + local.shape[0], c0:c0 + local.shape[1]][local] = value
    return out


def read_geojson_labels(path, shape, *, downsample=1.0, class_names=None) -> tuple:
    """Rasterise a QuPath GeoJSON export into a label image of ``shape``.

    Coordinates are level-0 pixels; the label image is at ``downsample`` (level-0 pixels per
    label pixel). Class ids: the index of the object's class in ``class_names`` when given
    (matched exactly, then ignoring case; a class matching ``class_names[0]`` paints 0),
    otherwise 1, 2, ... in order of first appearance, with 0 for pixels no object covers
    (and for objects classified "background", in any case).
    Objects without a classification count as the class ``"Unclassified"``; with
    ``class_names`` they are imported only if that list names it. Later objects are drawn
    over earlier ones, as in QuPath's labelled-image export.

    Returns ``(labels, class_names, warnings)``: labels uint8 (uint16 past 255 classes),
    the names by id (index 0 ``"background"`` unless ``class_names`` says otherwise), and
    one sentence per object skipped or clipped.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) <= 0:
        raise UserError(f"The label image shape must be two positive sizes; got {shape}.")
    if not downsample or downsample <= 0:
        raise UserError(f"The downsample must be positive; got {downsample}.")
    objects, warns = read_geojson(path)
    return _paint(objects, list(warns), shape, downsample, class_names)


def _paint(objects: list, warns: list, shape: tuple, downsample: float, class_names) -> tuple:
    """:func:`read_geojson_labels` of objects already read (``warns``: the reader's)."""
    names = list(class_names) if class_names is not None else ["background"]
    lookup = {n: i for i, n in enumerate(names)}
    folded = {n.lower(): i for i, n in reversed(list(enumerate(names)))}
    labels = np.zeros(shape, np.uint16 if len(names) > 255 or class_names is None else np.uint8)
    H0, W0 = shape[0] * downsample, shape[1] * downsample
    eps = 1e-6 * max(H0, W0)
    for obj in objects:
        cls = obj.name if obj.name is not None else UNCLASSIFIED
        k = lookup.get(cls, folded.get(cls.lower()))
        if k is None:
            if class_names is not None:
                warns.append(FeatureWarning(obj.index, f"{obj.describe()}: class {cls!r} is not one of {list(class_names)}; skipped."))
                continue
            k = len(names)
            names.append(cls)
            lookup[cls] = k
        pts = np.concatenate([r for p in obj.polygons for r in p])
        lo, hi = pts.min(0), pts.max(0)
        if hi[0] <= 0 or hi[1] <= 0 or lo[0] >= W0 or lo[1] >= H0:
            warns.append(FeatureWarning(obj.index, f"{obj.describe()}: lies entirely outside the {W0:g} x {H0:g} (level-0) "
                                             "image; skipped."))
            continue
        if lo[0] < -eps or lo[1] < -eps or hi[0] > W0 + eps or hi[1] > H0 + eps:
            warns.append(FeatureWarning(obj.index, f"{obj.describe()}: has coordinates outside the {W0:g} x {H0:g} "
                                             "(level-0) image; the part inside was imported."))
        rasterize(obj.polygons, shape, downsample, into=labels, value=k)
    if labels.dtype == np.uint16 and len(names) <= 256:
        labels = labels.astype(np.uint8)
    return labels, names, sorted(warns, key=lambda w: w.index)


def training_classes(paths, *, sparse: bool) -> tuple:
    """One class numbering for the QuPath GeoJSON files of a fine-tuning run.

    The classes are those of the files in order of first appearance; unclassified objects
    are left out. Dense labels: class 0 is a QuPath class called "background" (any case),
    else a new "background" for the pixels no object covers. Sparse labels (scribbles): a
    "background" class becomes class 0 if there is one, else the first class does, with a
    warning. Returns ``(class names, RGB colours, warnings)``: QuPath's colours where the
    files give them.
    """
    return _classes([read_geojson(path)[0] for path in paths], paths[0], sparse)


def _classes(objects_per_file: list, first, sparse: bool) -> tuple:
    """:func:`training_classes` of the objects of each file, read already; ``first`` names the first file."""
    found, color_of = [], {}
    for objects in objects_per_file:
        for obj in objects:
            if obj.name is not None and obj.name not in found:
                found.append(obj.name)
                color_of[obj.name] = obj.color
    if not found:
        raise UserError(f"{first} holds no classified object to train on; set classes in QuPath.")
    bg = next((n for n in found if n.lower() == "background"), None)
    others = [n for n in found if n != bg]
    warns = []
    if sparse:
        names = [bg] + others if bg else others
        if bg is None:
            warns.append(f"no QuPath class is called 'background'; {names[0]!r} becomes class 0, which "
                         "segmentation shows as background. Pass --class-names to choose.")
    else:
        names = [bg or "background"] + others
    fallback = default_colors(len(names))
    colors = [list(color_of.get(n) or fallback[k]) if k else fallback[0] for k, n in enumerate(names)]
    return names, colors, warns


def training_labels(pairs, resolution, class_names=None, *, sparse: bool, pixel_size=None,
                    override_pixel_size: bool = False) -> tuple:
    """Label images for fine-tuning from ``(image, GeoJSON file)`` pairs, at the pyramid level
    of each image that ``resolution`` picks.

    Dense: 0 = no object = background. Sparse: 0 = unlabelled and class k is label k + 1.
    ``class_names`` fixes the numbering (objects of other classes are skipped, with a
    warning); without it :func:`training_classes` decides. Returns ``(labels, class names,
    colours or None, warnings)``; each warning names its file.
    """
    from .pixelsize import working_resolution
    from .slides import open_slide

    colors, warns = None, []
    parsed = [read_geojson(path) for _, path in pairs]  # each file read once, for classes and pixels
    if class_names is None:
        class_names, colors, warns = _classes([objects for objects, _ in parsed], pairs[0][1], sparse)
    wanted = ["unlabelled"] + list(class_names) if sparse else list(class_names)
    labels = []
    for (image, path), (objects, read_warns) in zip(pairs, parsed):
        slide = open_slide(image, pixel_size, override_pixel_size)  # the grid finetune() will read
        level = slide.level_for(working_resolution(resolution))
        lab, _, file_warns = _paint(objects, list(read_warns), tuple(int(s) for s in slide.levels[level].shape[:2]),
                                    slide.downsample(level), wanted)
        warns += [f"{path}: {w}" for w in file_warns]
        labels.append(lab)
    return labels, list(class_names), colors, warns
