"""QuPath GeoJSON in and out: label images become polygons, polygons become label images.

Coordinates follow QuPath: x to the right, y down, in level-0 pixels, with the pixel
``(row r, col c)`` covering the square ``[c, c+1) x [r, r+1)``; a pixel belongs to a polygon
when its centre ``(c + 0.5, r + 0.5)`` lies inside.

Export traces the exact pixel-edge ("crack") boundary of every 4-connected region of a class,
places the vertices at the midpoints of the unit edges (the marching-squares contour, which
sits on the boundary without bias), and simplifies with Douglas-Peucker. If simplifying
would change a region's area by more than 1 %, a finer tolerance is used, and for tiny
regions the exact pixel-edge polygon. Slides are processed tile by tile: regions that touch an inner tile
border are kept as edge lists and joined at the end by cancelling the edges that two pieces
share, so the result equals an untiled export while only one tile of labels is in memory.

Import reads QuPath exports (FeatureCollection, a plain array of features or one feature;
Polygon, MultiPolygon and GeometryCollection; holes; ``classification`` as ``{name, color}``,
``{names, color}``, a plain string or the pre-0.4 ``{name, colorRGB}``) and rasterises them.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zipfile
import warnings as _warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from .errors import UserError
from .progress import Progress, resolve

# Unit steps for the four edge directions: 0 +x (right), 1 +y (down), 2 -x, 3 -y.
_DX = np.array([1, 0, -1, 0], np.int64)
_DY = np.array([0, 1, 0, -1], np.int64)
_UUID_NAMESPACE = uuid.UUID("5b0b7f0e-0d2c-4d51-9e36-7d2b8c6a9f10")
AREA_TOLERANCE = 0.01  # relative area change allowed by simplification
UNCLASSIFIED = "Unclassified"  # QuPath's name for objects without a classification


# --- tracing -----------------------------------------------------------------------------

def _crack_edges(mask: np.ndarray, oy: int = 0, ox: int = 0):
    """Directed unit edges between True and False pixels, the True side on the right.

    Returns ``x, y, d, r, c``: start vertex (global pixel-corner coordinates), direction,
    and the (local) row/column of the True pixel each edge belongs to.
    """
    p = np.pad(mask, 1)
    m = p[1:-1, 1:-1]
    parts = []
    # (direction, neighbour across the edge, start-vertex offset (dx, dy) from the pixel corner)
    for d, nb, (sx, sy) in ((0, p[:-2, 1:-1], (0, 0)), (1, p[1:-1, 2:], (1, 0)),
                            (2, p[2:, 1:-1], (1, 1)), (3, p[1:-1, :-2], (0, 1))):
        r, c = np.nonzero(m & ~nb)
        parts.append((c + (sx + ox), r + (sy + oy), np.full(r.size, d, np.int64), r, c))
    x, y, d, r, c = (np.concatenate([p_[i] for p_ in parts]).astype(np.int64) for i in range(5))
    return x, y, d, r, c


def _trace(x: np.ndarray, y: np.ndarray, d: np.ndarray) -> list:
    """Link unit edges into closed rings (lists of edge indices, in walking order).

    At a vertex where two regions touch diagonally the walk turns right, towards its own
    pixel, so diagonal neighbours stay separate (4-connectivity) and rings never cross.
    """
    n = x.size
    if n == 0:
        return []
    x0, y0 = x.min() - 1, y.min() - 1
    width = int(x.max() - x0 + 2)
    key = ((y - y0) * width + (x - x0)) * 4 + d
    order = np.argsort(key, kind="stable")
    skey = key[order]
    ex, ey = x + _DX[d] - x0, y + _DY[d] - y0
    nxt = np.full(n, -1, np.int64)
    for turn in (1, 0, 3):  # right, straight on, left
        cand = (ey * width + ex) * 4 + (d + turn) % 4
        pos = np.minimum(np.searchsorted(skey, cand), n - 1)
        hit = (skey[pos] == cand) & (nxt < 0)
        nxt[hit] = order[pos[hit]]
    if (nxt < 0).any():  # cannot happen for edges of a raster mask
        raise RuntimeError("open boundary while tracing label edges")
    nxt_l = nxt.tolist()
    seen = bytearray(n)
    rings = []
    for s in range(n):
        if seen[s]:
            continue
        ring, e = [], s
        while not seen[e]:
            seen[e] = 1
            ring.append(e)
            e = nxt_l[e]
        rings.append(ring)
    return rings


def _shoelace(pts: np.ndarray) -> float:
    """Signed area of a ring given as (N, 2) x, y (closing point optional); shells > 0 here."""
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]) + x[-1] * y[0] - y[-1] * x[0])


def _canonical(pts: np.ndarray) -> np.ndarray:
    """Rotate a ring to start at its smallest (y, x) vertex, so tiling does not change the result."""
    i = np.lexsort((pts[:, 0], pts[:, 1]))[0]
    return np.concatenate([pts[i:], pts[:i]]) if i else pts


def _ring_geometry(idx: np.ndarray, x, y, d):
    """Exact corner polygon and midpoint polygon of one traced ring (both open, canonical)."""
    dd = d[idx]
    prev_d = np.concatenate([dd[-1:], dd[:-1]])
    next_d = np.concatenate([dd[1:], dd[:1]])
    corner = dd != prev_d
    exact = np.stack([x[idx][corner], y[idx][corner]], 1).astype(np.float64)
    keep = corner | (dd != next_d)
    mid = np.stack([x[idx][keep] + 0.5 * _DX[dd[keep]], y[idx][keep] + 0.5 * _DY[dd[keep]]], 1)
    # Midpoints along a diagonal staircase are collinear: dropping them changes no shape.
    prev, nxt = np.concatenate([mid[-1:], mid[:-1]]), np.concatenate([mid[1:], mid[:1]])
    cross = (mid[:, 0] - prev[:, 0]) * (nxt[:, 1] - mid[:, 1]) - (mid[:, 1] - prev[:, 1]) * (nxt[:, 0] - mid[:, 0])
    if np.count_nonzero(cross) >= 3:
        mid = mid[cross != 0]
    return _canonical(exact), _canonical(mid.astype(np.float64))


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Closed Douglas-Peucker simplification of an open ring (returns the ring closed)."""
    closed = np.vstack([ring, ring[:1]])
    if tolerance <= 0:
        return closed
    if len(closed) > 4000:  # long outlines (tissue regions): numpy per segment pays off
        from skimage.measure import approximate_polygon

        out = approximate_polygon(closed, tolerance)
    else:
        out = closed[_douglas_peucker(closed.tolist(), tolerance)]
    return out if len(out) >= 4 else closed


def _douglas_peucker(pts: list, tol: float) -> list:
    """Indices kept by Douglas-Peucker, with skimage's distance rule.

    Long spans are measured with numpy, short ones in plain Python, where numpy's per-call
    overhead would dominate (rings here mostly have tens of vertices).
    """
    arr = None
    keep = [False] * len(pts)
    keep[0] = keep[-1] = True
    stack = [(0, len(pts) - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        (x0, y0), (x1, y1) = pts[a], pts[b]
        dx, dy = x1 - x0, y1 - y0
        norm = math.hypot(dx, dy)
        if b - a > 48:
            if arr is None:
                arr = np.asarray(pts)
            px, py = arr[a + 1:b, 0], arr[a + 1:b, 1]
            perp = ((px - x0) * dx + (py - y0) * dy > 0) & ((px - x1) * -dx + (py - y1) * -dy > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                dist = np.where(perp, np.abs((px - x0) * dy - (py - y0) * dx) / norm,
                                np.minimum(np.hypot(px - x0, py - y0), np.hypot(px - x1, py - y1)))
            j = int(np.argmax(dist))
            far = a + 1 + j if dist[j] > tol else -1
        else:
            best, far = tol, -1
            for i in range(a + 1, b):
                px, py = pts[i]
                if (px - x0) * dx + (py - y0) * dy > 0 and (px - x1) * -dx + (py - y1) * -dy > 0:
                    dist = abs((px - x0) * dy - (py - y0) * dx) / norm
                else:
                    dist = min(math.hypot(px - x0, py - y0), math.hypot(px - x1, py - y1))
                if dist > best:
                    best, far = dist, i
        if far >= 0:
            keep[far] = True
            stack.append((far, b))
            stack.append((a, far))
    return [i for i, k in enumerate(keep) if k]


@dataclass
class _Region:
    """One connected region: its shells and holes as exact and simplified rings."""

    label: int
    shells: list = field(default_factory=list)  # [(exact, mid)] open rings
    holes: list = field(default_factory=list)
    hole_points: list = field(default_factory=list)  # a pixel centre just inside each hole's region


def _regions_from_edges(x, y, d, region_id, r_abs, c_abs, label) -> dict:
    """Trace edges into rings and group them by region id."""
    regions: dict = {}
    for ring in _trace(x, y, d):
        idx = np.asarray(ring)
        exact, mid = _ring_geometry(idx, x, y, d)
        rid = int(region_id[idx[0]])
        reg = regions.setdefault(rid, _Region(label))
        if _shoelace(exact) > 0:
            reg.shells.append((exact, mid))
        else:
            reg.holes.append((exact, mid))
            reg.hole_points.append((c_abs[idx[0]] + 0.5, r_abs[idx[0]] + 0.5))
    return regions


def _region_polygons(reg: _Region, tolerance: float) -> list:
    """GeoJSON polygon coordinate lists (label-pixel units) for one region.

    Tries the requested tolerance, then smaller ones, and keeps the first whose area is
    within 1 % of the raster's; the exact pixel outline is the last resort (tiny regions).
    """
    # Ring order follows edge order, which depends on the tiling: sort by first vertex.
    first = lambda ring: (ring[0][0][1], ring[0][0][0])
    order = sorted(range(len(reg.holes)), key=lambda i: first(reg.holes[i]))
    reg.holes = [reg.holes[i] for i in order]
    reg.hole_points = [reg.hole_points[i] for i in order]
    reg.shells.sort(key=first)
    exact_area = sum(_shoelace(e) for e, _ in reg.shells + reg.holes)
    tries = [t for t in (tolerance, tolerance / 2) if t > 0] + [0.0]
    for t in tries:
        shells = [_simplify(m, t) for _, m in reg.shells]
        holes = [_simplify(m, t) for _, m in reg.holes]
        area = sum(_shoelace(r) for r in shells + holes)
        if abs(area - exact_area) <= AREA_TOLERANCE * exact_area:
            break
    else:
        shells = [_simplify(e, 0) for e, _ in reg.shells]
        holes = [_simplify(e, 0) for e, _ in reg.holes]
    if len(shells) == 1:
        return [[shells[0], *holes]]
    # Several shells (rare: diagonal pinches): give each hole to the shell around it.
    polys = [[s] for s in shells]
    for hole, (px, py) in zip(holes, reg.hole_points):
        for (exact, _), poly in zip(reg.shells, polys):
            if _inside(px, py, exact):
                poly.append(hole)
                break
    return polys


def _inside(px: float, py: float, ring: np.ndarray) -> bool:
    """Even-odd point-in-polygon test."""
    xs, ys = ring[:, 0], ring[:, 1]
    xn, yn = np.roll(xs, -1), np.roll(ys, -1)
    cross = (ys > py) != (yn > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = xs + (py - ys) * (xn - xs) / (yn - ys)
    return bool(np.count_nonzero(cross & (px < xi)) % 2)


# --- features ----------------------------------------------------------------------------

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
        return f"Class {label}"

    def color(self, label: int) -> list:
        if self.colors is not None and 0 <= label < len(self.colors):
            return [int(v) for v in list(self.colors[label])[:3]]
        from .model import default_colors  # imported late: it brings torch

        return default_colors(label + 1)[label]


def _feature(reg: _Region, style: _Style) -> dict:
    polys = _region_polygons(reg, style.simplify)
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


class _TileTracer:
    """Turns label tiles into features; regions cut by inner tile borders wait for :meth:`finish`."""

    def __init__(self, shape, style: _Style):
        self.H, self.W = shape
        self.style = style
        self.pending: dict = {}  # label -> list of (x, y, d, piece, r_abs, c_abs)
        self.next_piece = 0

    def tile(self, block: np.ndarray, y0: int, x0: int) -> list:
        block = np.asarray(block)
        if block.ndim != 2:
            raise UserError(f"Labels must be a 2-D image; got shape {block.shape}.")
        if block.dtype.kind == "f":
            block = block.astype(np.int64)
        elif block.dtype.kind == "b":
            block = block.astype(np.uint8)
        h, w = block.shape
        inner = (y0 > 0, y0 + h < self.H, x0 > 0, x0 + w < self.W)  # top, bottom, left, right
        features = []
        clipped = np.where(block > 0, block, 0)
        for k0, sl in enumerate(ndi.find_objects(clipped)):
            if sl is None:
                continue
            label = k0 + 1
            sy, sx = sl
            mask = block[sl] == label
            comp, _ = ndi.label(mask)
            oy, ox = y0 + sy.start, x0 + sx.start
            x, y, d, r, c = _crack_edges(mask, oy, ox)
            cid = comp[r, c]
            cut = set()
            if inner[0] and sy.start == 0:
                cut.update(np.unique(comp[0, :]).tolist())
            if inner[1] and sy.stop == h:
                cut.update(np.unique(comp[-1, :]).tolist())
            if inner[2] and sx.start == 0:
                cut.update(np.unique(comp[:, 0]).tolist())
            if inner[3] and sx.stop == w:
                cut.update(np.unique(comp[:, -1]).tolist())
            cut.discard(0)
            waiting = np.isin(cid, list(cut)) if cut else np.zeros(cid.size, bool)
            done = ~waiting
            if done.any():
                regions = _regions_from_edges(x[done], y[done], d[done], cid[done],
                                              r[done] + oy, c[done] + ox, label)
                features += [_feature(regions[i], self.style) for i in sorted(regions)]
            if waiting.any():
                piece = cid[waiting] + self.next_piece
                self.next_piece += int(comp.max()) + 1
                self.pending.setdefault(label, []).append(
                    (x[waiting], y[waiting], d[waiting], piece, r[waiting] + oy, c[waiting] + ox))
        return features

    def finish(self) -> list:
        """Join the pieces of regions cut by tile borders and return their features."""
        features = []
        for label in sorted(self.pending):
            x, y, d, piece, r, c = (np.concatenate(a) for a in zip(*self.pending[label]))
            # An edge and its reverse both present = two pieces of one region meet there.
            width = int(x.max() - x.min() + 3)
            x0, y0 = x.min() - 1, y.min() - 1
            key = ((y - y0) * width + (x - x0)) * 4 + d
            rkey = ((y + _DY[d] - y0) * width + (x + _DX[d] - x0)) * 4 + (d + 2) % 4
            order = np.argsort(key)
            skey = key[order]
            pos = np.minimum(np.searchsorted(skey, rkey), key.size - 1)
            matched = skey[pos] == rkey
            partner = order[pos]
            parent = {}

            def find(a):
                while parent.get(a, a) != a:
                    parent[a] = parent.get(parent[a], parent[a])
                    a = parent[a]
                return a

            for a, b in np.unique(np.stack([piece[matched], piece[partner[matched]]], 1), axis=0).tolist():
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            keep = ~matched
            pieces, inverse = np.unique(piece[keep], return_inverse=True)
            root = np.array([find(p) for p in pieces.tolist()], np.int64)[inverse]
            regions = _regions_from_edges(x[keep], y[keep], d[keep], root, r[keep], c[keep], label)
            features += [_feature(regions[i], self.style) for i in sorted(regions)]
        self.pending.clear()
        return features


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
    tracer = _TileTracer(arr.shape, style)
    return tracer.tile(arr, 0, 0) + tracer.finish()


# --- label sources -----------------------------------------------------------------------

@dataclass
class LabelImage:
    """A 2-D label array (numpy, dask or zarr; read lazily) with class names/colours if stored."""

    array: object
    class_names: Optional[list] = None
    colors: Optional[list] = None
    path: Optional[Path] = None


def open_label_image(path) -> LabelImage:
    """Open a label image (PNG/TIFF, or an OME-Zarr label image) without reading its pixels.

    For OME-Zarr, ``path`` may be the label image itself, an image with a ``labels`` group
    (its first label image is used), and class names/colours come from ``image-label``.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    name = path.name.lower()
    try:
        if name.endswith(".zarr") or (path.is_dir() and ((path / "zarr.json").exists() or (path / ".zattrs").exists())):
            return _open_zarr_labels(path)
        if name.endswith((".tif", ".tiff")):
            import tifffile
            import zarr

            store = tifffile.imread(path, aszarr=True)
            z = zarr.open(store, mode="r")
            arr = z if hasattr(z, "shape") else z["0"]
            return LabelImage(_as_2d(arr, path), path=path)
        if name.endswith((".png", ".bmp")):
            from skimage import io

            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                return LabelImage(_as_2d(np.asarray(io.imread(path)), path), path=path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} could not be read as a label image ({type(e).__name__}: {e}).") from None
    raise UserError(f"{path} is not a label image this tool reads (use PNG, TIFF or OME-Zarr).")


def _as_2d(arr, path):
    shape = tuple(arr.shape)
    if len(shape) == 3 and shape[-1] in (3, 4):
        a = np.asarray(arr)
        if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
            return a[..., 0]
        raise UserError(f"{path} is a colour image; save the labels as a single-channel PNG or TIFF of class ids.")
    while len(shape) > 2 and shape[0] == 1:
        arr = arr[0]
        shape = shape[1:]
    if len(shape) != 2:
        raise UserError(f"{path} has shape {tuple(arr.shape)}; expected a 2-D label image.")
    return arr


def _open_zarr_labels(path: Path) -> LabelImage:
    import zarr

    group = zarr.open_group(path, mode="r")
    ome = dict(group.attrs)
    ome = ome.get("ome", ome)
    if "image-label" not in ome and "labels" in group:  # an image with labels: use the first
        group = group["labels"]
        ome = dict(group.attrs)
        ome = ome.get("ome", ome)
    if "multiscales" not in ome:  # a "labels" group
        names = ome.get("labels")
        if not names:
            raise UserError(f"{path} is a zarr store without OME-Zarr multiscales or labels metadata.")
        group = group[names[0]]
        ome = dict(group.attrs)
        ome = ome.get("ome", ome)
    arr = group[ome["multiscales"][0]["datasets"][0]["path"]]
    import dask.array as da

    info = ome.get("image-label") or {}
    names, colors = _label_metadata(info)
    return LabelImage(_as_2d(da.from_zarr(arr), path), names, colors, path)


def _label_metadata(info: dict):
    """Class names and RGB colours indexed by label value, from NGFF ``image-label``."""
    props = {int(p["label-value"]): p for p in info.get("properties", []) if "label-value" in p}
    cols = {int(c["label-value"]): c.get("rgba") for c in info.get("colors", []) if "label-value" in c}
    if not props and not cols:
        return None, None
    n = max(list(props) + list(cols)) + 1
    names = [str(props.get(k, {}).get("name", props.get(k, {}).get("class", "background" if k == 0 else f"Class {k}")))
             for k in range(n)]
    if cols:
        from .model import default_colors

        fallback = default_colors(n)
        colors = [list(cols[k][:3]) if cols.get(k) else fallback[k] for k in range(n)]
    else:
        colors = None
    return names, colors


# --- export ------------------------------------------------------------------------------

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
    tracer = _TileTracer((H, W), style)
    grid = [(y, x) for y in range(0, H, tile) for x in range(0, W, tile)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same folder, so the rename is atomic
    count = 0
    sep = "\n" if pretty else ""
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [' + sep)

            def write(features):
                nonlocal count
                for feat in features:
                    f.write(("," + sep if count else "") + json.dumps(feat, separators=(",", ":")))
                    count += 1

            for i, (y, x) in enumerate(grid):
                if should_stop():
                    break
                block = np.asarray(arr[y:y + tile, x:x + tile])
                write(tracer.tile(block, y, x))
                progress(Progress("export GeoJSON", i + 1, len(grid), {"features": count}))
            write(tracer.finish())
            f.write(sep + "]}\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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


def rasterize(polygons: list, shape, downsample: float = 1.0) -> np.ndarray:
    """Boolean mask of the pixels whose centres fall inside the polygons (holes removed).

    ``polygons`` are [shell, *holes] arrays of level-0 (x, y); the mask has ``shape`` at
    ``downsample`` level-0 pixels per pixel.
    """
    mask = np.zeros(shape, bool)
    for poly in polygons:
        got = _polygon_pixels(poly, shape, downsample)
        if got is not None:
            local, (r0, c0) = got
            mask[r0:r0 + local.shape[0], c0:c0 + local.shape[1]] |= local
    return mask


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
        for poly in obj.polygons:
            got = _polygon_pixels(poly, shape, downsample)
            if got is not None:
                local, (r0, c0) = got
                labels[r0:r0 + local.shape[0], c0:c0 + local.shape[1]][local] = k
    if labels.dtype == np.uint16 and len(names) <= 256:
        labels = labels.astype(np.uint8)
    return labels, names, sorted(warns, key=lambda w: w.index)
