"""QuPath GeoJSON: label images out as polygons, polygons in as label images.

Coordinates follow QuPath: x to the right, y down, in level-0 pixels, with the pixel
``(row r, col c)`` covering the square ``[c, c+1) x [r, r+1)``; a pixel belongs to a polygon
when its centre ``(c + 0.5, r + 0.5)`` lies inside.

Export (:func:`export_geojson`, :func:`labels_to_features`) writes one feature per region
that :mod:`genselfdiff.io.vectorize` traces. Import (:func:`read_geojson`) reads QuPath exports
(FeatureCollection, a plain array of features or one feature; Polygon, MultiPolygon and
GeometryCollection; holes; ``classification`` as ``{name, color}``, ``{names, color}``, a
plain string or the pre-0.4 ``{name, colorRGB}``) into :class:`GeoObject` s;
:mod:`genselfdiff.io.rasterize` turns those into label images.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError
from ..progress import Progress, resolve
from .atomic import atomic_open
from .labels import default_class_name, default_colors, open_label_image
from .vectorize import Region, TileTracer, label_regions, region_polygons

_UUID_NAMESPACE = uuid.UUID("5b0b7f0e-0d2c-4d51-9e36-7d2b8c6a9f10")
UNCLASSIFIED = "Unclassified"  # QuPath's name for objects without a classification


# --- export ------------------------------------------------------------------------------

@dataclass
class _Style:
    class_names: Optional[Sequence[str]]
    colors: Optional[Sequence]
    object_type: str
    scale: float
    offset: tuple  # (y, x) in level-0 pixels
    simplify: float

    def name(self, label: int) -> str:
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return str(self.class_names[label])
        return default_class_name(label)

    def color(self, label: int) -> list:
        if self.colors is not None and 0 <= label < len(self.colors):
            return [int(v) for v in list(self.colors[label])[:3]]
        return default_colors(label + 1)[label]


def _feature(reg: Region, style: _Style) -> dict:
    polys = region_polygons(reg, style.simplify)
    oy, ox = style.offset
    coords = [[np.round(ring * style.scale + (ox, oy), 2).tolist() for ring in poly] for poly in polys]
    start = polys[0][0][0]
    ident = uuid.uuid5(_UUID_NAMESPACE, f"{reg.label}:{start[0] * style.scale + ox}:{start[1] * style.scale + oy}")
    geometry = ({"type": "Polygon", "coordinates": coords[0]} if len(coords) == 1
                else {"type": "MultiPolygon", "coordinates": coords})
    return {
        "type": "Feature",
        "id": str(ident),
        "geometry": geometry,
        "properties": {
            "objectType": style.object_type,
            "classification": {"name": style.name(reg.label), "color": style.color(reg.label)},
        },
    }



def labels_to_features(labels, *, class_names=None, colors=None, offset=(0, 0), scale=1.0,
                       object_type="annotation", simplify=0.35) -> list:
    """One GeoJSON Polygon feature (holes kept) per 4-connected region of each label > 0.

    ``class_names[k]`` and ``colors[k]`` name and colour label ``k`` (index 0 = background,
    the model's convention). ``scale`` is the size of one label pixel in level-0 pixels and
    ``offset`` the ``(y, x)`` level-0 position of the array's top-left corner, so
    coordinates come out in level-0 pixels. ``simplify`` is the Douglas-Peucker tolerance in
    label pixels (0 = the exact pixel outline).
    """
    arr = np.asarray(labels)
    style = _Style(class_names, colors, object_type, float(scale), tuple(offset), float(simplify))
    return [_feature(reg, style) for reg in label_regions(arr)]



def export_geojson(labels_source, out, *, class_names=None, colors=None, tile=2048, object_type="annotation",
                   simplify=0.35, scale=1.0, offset=(0, 0), pretty=False, progress=None, should_stop=None) -> int:
    """Write a QuPath-ready GeoJSON FeatureCollection of the regions of a label image.

    ``labels_source`` is a 2-D array (numpy, dask, zarr) or a path (PNG/TIFF, OME-Zarr label
    image). The image is read one ``tile`` x ``tile`` block at a time; regions crossing tile
    borders are joined, so the output does not depend on ``tile``. Names and colours come
    from the arguments, else from OME-Zarr ``image-label`` metadata, else defaults. The file
    is written to a temporary name and renamed. If ``should_stop`` turns true, the regions of
    the tiles done so far are written and the function returns normally. Returns the number
    of features written.
    """
    progress, should_stop = resolve(progress, should_stop)
    if isinstance(labels_source, (str, os.PathLike)):
        src = open_label_image(labels_source)
        arr = src.array
        class_names = class_names if class_names is not None else src.class_names
        colors = colors if colors is not None else src.colors
    else:
        arr = labels_source
    if len(arr.shape) != 2:
        raise UserError(f"Labels must be a 2-D image; got shape {tuple(arr.shape)}.")
    if tile < 16:
        raise UserError(f"The tile size must be at least 16 pixels (got {tile}).")
    style = _Style(class_names, colors, object_type, float(scale), tuple(offset), float(simplify))
    H, W = (int(s) for s in arr.shape)
    tracer = TileTracer((H, W))
    grid = [(y, x) for y in range(0, H, tile) for x in range(0, W, tile)]
    count = 0
    sep = "\n" if pretty else ""
    with atomic_open(out, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [' + sep)

        def write(regions):
            nonlocal count
            for reg in regions:
                f.write(("," + sep if count else "") + json.dumps(_feature(reg, style), separators=(",", ":")))
                count += 1

        for i, (y, x) in enumerate(grid):
            if should_stop():
                break
            block = np.asarray(arr[y:y + tile, x:x + tile])
            write(tracer.tile(block, y, x))
            progress(Progress("export GeoJSON", i + 1, len(grid), {"features": count}))
        write(tracer.finish())
        f.write(sep + "]}\n")
    return count


# --- import ------------------------------------------------------------------------------

@dataclass
class GeoObject:
    """One area object read from GeoJSON: polygons as [shell, *holes] arrays of (x, y)."""

    index: int  # position in the file, 0-based
    polygons: list
    name: Optional[str]  # classification name; None = unclassified
    color: Optional[list]
    object_type: str = "annotation"
    id: Optional[str] = None
    label: Optional[str] = None  # the object's own name in QuPath

    def describe(self) -> str:
        return describe_feature(self.index, self.id, self.label)


def describe_feature(index: int, ident=None, name=None) -> str:
    """'feature 3 (id ..., name '...')': how warnings name a feature (numbered from 1)."""
    extra = ", ".join(s for s in (f"id {ident}" if ident else "", f"name {name!r}" if name else "") if s)
    return f"feature {index + 1}" + (f" ({extra})" if extra else "")


def read_geojson(path) -> tuple:
    """Parse a QuPath GeoJSON file into :class:`GeoObject` s (areas only) and warnings.

    Invalid JSON or a file that holds no features raises :class:`UserError`; a feature that
    cannot be used (unknown or non-area geometry, broken coordinates) becomes a warning
    naming it, and the rest is read.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    try:
        data = json.loads(_geojson_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        "export it again from QuPath (File > Export objects as GeoJSON).") from None
    except (UnicodeDecodeError, OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} could not be read as GeoJSON text ({e}).") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        features = None
    if not isinstance(features, list):
        raise UserError(f"{path} is JSON but not GeoJSON objects (expected a FeatureCollection or a list of "
                        "features, as QuPath's File > Export objects as GeoJSON writes).")
    objects, warns = [], []
    for i, feat in enumerate(features):
        try:
            obj, warn = _parse_feature(i, feat)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            ident = feat.get("id") if isinstance(feat, dict) else None
            warns.append(FeatureWarning(i, f"{describe_feature(i, ident)}: broken feature ({type(e).__name__}: {e}); skipped."))
            continue
        if warn:
            warns.append(FeatureWarning(i, warn))
        if obj is not None:
            objects.append(obj)
    return objects, warns


def _geojson_text(path: Path) -> str:
    """The file's text; for QuPath's "Compress data (zip)" export, its first .geojson/.json member."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.lower().endswith((".geojson", ".json"))]
            if not names:
                raise UserError(f"{path} is a zip file without a .geojson or .json file inside.")
            return z.read(names[0]).decode("utf-8-sig")
    return path.read_text(encoding="utf-8-sig")


class FeatureWarning(str):
    """A warning sentence that remembers which feature (0-based index) it is about."""

    def __new__(cls, index: int, text: str):
        self = super().__new__(cls, text)
        self.index = index
        return self


def _parse_feature(i: int, feat):
    if not isinstance(feat, dict):
        return None, f"{describe_feature(i)}: not a GeoJSON feature object; skipped."
    props = feat.get("properties") or {}
    if not isinstance(props, dict):
        props = {}
    ident = feat.get("id")
    label = props.get("name") if isinstance(props.get("name"), str) else None
    desc = describe_feature(i, ident, label)
    object_type = str(props.get("objectType", props.get("object_type", props.get("type", "annotation"))))
    if object_type in ("tmaCore", "tma_core", "TMACoreObject", "root", "PathRootObject"):
        return None, f"{desc}: a QuPath {object_type} object, not an annotation; skipped."
    geom = feat.get("geometry")
    if not isinstance(geom, dict) or "type" not in geom:
        return None, f"{desc}: has no geometry; skipped."
    polygons, skipped = _polygons(geom)
    if skipped and not polygons:
        return None, f"{desc}: {skipped} geometry is not an area and cannot become labels; skipped."
    if not polygons:
        return None, f"{desc}: empty geometry; skipped."
    name, color = _classification(props.get("classification"))
    warn = f"{desc}: its {skipped} part is not an area and was ignored." if skipped else None
    return GeoObject(i, polygons, name, color, object_type, str(ident) if ident else None, label), warn


_AREA_TYPES = ("Polygon", "MultiPolygon", "GeometryCollection")
_OTHER_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")


def _polygons(geom: dict):
    """(list of [shell, *holes] float arrays, name of any non-area type met)."""
    kind = geom.get("type")
    if kind == "Polygon":
        return [_polygon(geom["coordinates"])], None
    if kind == "MultiPolygon":
        return [_polygon(p) for p in geom["coordinates"]], None
    if kind == "GeometryCollection":
        polys, skipped = [], None
        for g in geom.get("geometries", []):
            p, s = _polygons(g)
            polys += p
            skipped = skipped or s
        return polys, skipped
    if kind in _OTHER_TYPES:
        return [], kind
    raise ValueError(f"unknown geometry type {kind!r}")


def _polygon(rings) -> list:
    out = []
    for ring in rings:
        a = np.asarray(ring, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] < 2 or len(a) < 3:
            raise ValueError("a polygon ring needs at least 3 [x, y] positions")
        a = a[:, :2]
        if not np.isfinite(a).all():
            raise ValueError("coordinates that are not finite numbers")
        out.append(a)
    if not out:
        raise ValueError("a polygon without rings")
    return out


def _classification(c):
    """(name, [r, g, b]) from any of QuPath's classification encodings; (None, None) if unclassified."""
    if c is None:
        return None, None
    if isinstance(c, str):
        return c, None
    if not isinstance(c, dict):
        return None, None
    if "names" in c and isinstance(c["names"], list):
        name = ": ".join(str(n) for n in c["names"])  # QuPath's derived classes, e.g. "Tumor: Positive"
    elif "name" in c and c["name"] is not None:
        name = str(c["name"])
    else:
        return None, None
    color = None
    if isinstance(c.get("color"), list) and len(c["color"]) >= 3:
        color = [int(v) for v in c["color"][:3]]
    elif isinstance(c.get("colorRGB"), (int, float)):  # QuPath <= 0.3: packed (A)RGB integer
        v = int(c["colorRGB"]) & 0xFFFFFF
        color = [(v >> 16) & 255, (v >> 8) & 255, v & 255]
    return name, color
