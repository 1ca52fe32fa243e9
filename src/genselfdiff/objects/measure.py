"""Measurements of objects (nuclei, glands) and their export as QuPath detections.

Per object: area, perimeter, circularity 4πA/P² (1 for a disk), centroid, and the mean
haematoxylin optical density. Lengths are in µm where the pixel size is known, otherwise in
pixels, and the column names say which (QuPath's convention: "Area µm^2", "Area px^2").

Haematoxylin optical density: each pixel's optical density log10(255 / I) per RGB channel (I
at least 1, as in QuPath), projected on the haematoxylin axis of Ruifrok & Johnston's colour
deconvolution (scikit-image's ``hed_from_rgb``, the fixed H-E-DAB stain vectors). QuPath
estimates stain vectors per image by default, so its "Hematoxylin OD mean" can differ a little.

Perimeter is scikit-image's estimate along the 4-connected outline (diagonal steps count
√2); on a digital outline it can come out slightly shorter than a smooth curve's, so
circularity is capped at 1.

Per image: objects per class and, where the pixel size is known, their density per mm² of
tissue (tissue from :func:`genselfdiff.io.tissue.tissue_mask`, or an area the caller measured).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

OD_MAX = 255.0  # 8-bit white: optical density 0


def _units(mpp: Optional[float]) -> tuple:
    return ("µm", float(mpp)) if mpp else ("px", 1.0)


def haematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (log10 units) of every pixel of a uint8 RGB image."""
    from skimage.color import hed_from_rgb

    rgb = np.asarray(rgb)[..., :3].astype(np.float64)
    od = np.log10(OD_MAX / np.clip(rgb, 1.0, OD_MAX))
    return np.clip(od @ hed_from_rgb[:, 0], 0.0, None)


def measure_objects(ids: np.ndarray, rgb: Optional[np.ndarray] = None, *, mpp: Optional[float] = None,
                    offset=(0, 0)) -> dict:
    """Columns of measurements, one row per object id > 0 in ascending id order.

    ``offset`` is the ``(y, x)`` position of ``ids``' top-left corner in the whole image, so
    centroids come out in whole-image coordinates. Returns ``{"id": ..., "Area µm^2": ...}``
    (numpy arrays); the haematoxylin column only with ``rgb``.
    """
    from skimage.measure import regionprops_table

    ids = np.asarray(ids)
    unit, px = _units(mpp)
    if rgb is not None and np.shape(rgb)[:2] != ids.shape:
        raise ValueError(f"image {np.shape(rgb)[:2]} and objects {ids.shape} differ in shape")
    # Tiled ids are sparse (up to 2^32): measure compact labels 1..n, report the real ids.
    keys, inverse = np.unique(ids, return_inverse=True)
    labels = inverse.reshape(ids.shape) + (0 if keys.size and keys[0] == 0 else 1)
    object_keys = keys[keys != 0].astype(np.int64)
    props = regionprops_table(labels, properties=("label", "area", "perimeter", "centroid"))
    area = props["area"].astype(np.float64)
    perimeter = props["perimeter"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = np.where(perimeter > 0, np.minimum(4 * np.pi * area / perimeter**2, 1.0), 1.0)
    cols = {
        "id": object_keys[props["label"] - 1],
        f"Area {unit}^2": area * px * px,
        f"Perimeter {unit}": perimeter * px,
        "Circularity": circularity,
        f"Centroid X {unit}": (props["centroid-1"] + 0.5 + offset[1]) * px,  # pixel centres, QuPath's x
        f"Centroid Y {unit}": (props["centroid-0"] + 0.5 + offset[0]) * px,
    }
    if rgb is not None:
        h = haematoxylin_od(rgb)
        index = props["label"]
        cols["Hematoxylin OD mean"] = (np.asarray(ndi.mean(h, labels, index), np.float64) if index.size
                                       else np.zeros(0))
    return cols


def object_rows(columns: dict) -> list:
    """The columns of :func:`measure_objects` as one dict per object."""
    names = list(columns)
    return [{k: (int(v) if k == "id" else float(v)) for k, v in zip(names, values)}
            for values in zip(*(columns[k] for k in names))]


# --- the per-image summary -----------------------------------------------------------------

def tissue_area_mm2(rgb: np.ndarray, mpp: Optional[float]) -> Optional[float]:
    """Area of tissue in an RGB image in mm², or None without a pixel size."""
    if not mpp:
        return None
    from ..io.tissue import tissue_mask

    return float(tissue_mask(rgb).sum()) * (float(mpp) * 1e-3) ** 2


def object_summary(counts: Mapping[str, int], *, tissue_mm2: Optional[float] = None) -> list:
    """One row per class: ``{"class", "objects", "tissue_mm2", "objects_per_mm2"}``.

    Without a tissue area (no pixel size) the last two are None.
    """
    rows = []
    for name, n in counts.items():
        density = n / tissue_mm2 if tissue_mm2 else None
        rows.append({"class": str(name), "objects": int(n), "tissue_mm2": tissue_mm2, "objects_per_mm2": density})
    return rows


def summary_csv(image: str, rows: Sequence[dict]) -> str:
    """The summary rows of one image as CSV text (empty cells where a value is unknown)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "class", "objects", "tissue_mm2", "objects_per_mm2"])
    for r in rows:
        writer.writerow([image, r["class"], r["objects"]] + [
            "" if r[k] is None or (isinstance(r[k], float) and not math.isfinite(r[k])) else f"{r[k]:.6g}"
            for k in ("tissue_mm2", "objects_per_mm2")])
    return buf.getvalue()


# --- QuPath detections ----------------------------------------------------------------------

def detection_features(ids: np.ndarray, columns: dict, *, class_name: str, color, scale: float = 1.0,
                       offset=(0, 0), simplify: float = 0.35) -> list:
    """One QuPath detection (a GeoJSON Feature) per object, with its measurements.

    ``columns`` comes from :func:`measure_objects` on the same ``ids``. ``scale`` (level-0
    pixels per ``ids`` pixel) and ``offset`` (level-0 ``(y, x)`` of ``ids``' corner) place the
    outlines as in :func:`genselfdiff.io.qupath.labels_to_features`, which traces them.
    An object in several 4-connected pieces becomes one MultiPolygon.
    """
    from ..io.qupath import labels_to_features

    ids = np.asarray(ids)
    rows = object_rows(columns)
    slices = _object_slices(ids, [r["id"] for r in rows])
    features = []
    for row, sl in zip(rows, slices):
        if sl is None:
            continue
        crop = (ids[sl] == row["id"]).astype(np.uint8)
        corner = (offset[0] + sl[0].start * scale, offset[1] + sl[1].start * scale)
        pieces = labels_to_features(crop, class_names=["", class_name], colors=[(0, 0, 0), color],
                                    offset=corner, scale=scale, object_type="detection", simplify=simplify)
        if not pieces:
            continue
        feature = pieces[0]
        if len(pieces) > 1:
            polys = []
            for piece in pieces:
                g = piece["geometry"]
                polys += [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
            feature["geometry"] = {"type": "MultiPolygon", "coordinates": polys}
        feature["properties"]["measurements"] = {k: v for k, v in row.items() if k != "id"}
        # The id in the label image, as text: QuPath may keep measurements as 32-bit floats.
        feature["properties"]["metadata"] = {"object_id": str(row["id"])}
        features.append(feature)
    return features


def _object_slices(ids: np.ndarray, wanted: Sequence[int]) -> list:
    """Bounding-box slices of the objects ``wanted`` (sparse ids welcome: compacted first)."""
    keys, inverse = np.unique(ids, return_inverse=True)
    shift = 0 if keys[0] == 0 else 1  # label of keys[i] is i + shift; find_objects skips 0
    found = ndi.find_objects(inverse.reshape(ids.shape) + shift)
    where = {int(k): i + shift for i, k in enumerate(keys) if k != 0}
    return [found[where[int(k)] - 1] if int(k) in where else None for k in wanted]
