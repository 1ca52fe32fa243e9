"""Label images become polygons: exact pixel outlines, simplified, joined across tile borders.

Coordinates: x to the right, y down, with the pixel ``(row r, col c)`` covering the square
``[c, c+1) x [r, r+1)``; a pixel belongs to a polygon when its centre ``(c + 0.5, r + 0.5)``
lies inside (QuPath's convention).

Every 4-connected region of a label is traced along its exact pixel-edge ("crack")
boundary; the vertices are placed at the midpoints of the unit edges (the marching-squares
contour, which sits on the boundary without bias) and simplified with Douglas-Peucker. If
simplifying would change a region's area by more than 1 %, a finer tolerance is used, and
for tiny regions the exact pixel-edge polygon. Large images are traced tile by tile
(:class:`TileTracer`): regions that touch an inner tile border are kept as edge lists and
joined at the end by cancelling the edges that two pieces share, so the result equals an
untiled trace while only one tile of labels is in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ..errors import UserError

# Unit steps for the four edge directions: 0 +x (right), 1 +y (down), 2 -x, 3 -y.
_DX = np.array([1, 0, -1, 0], np.int64)
_DY = np.array([0, 1, 0, -1], np.int64)
AREA_TOLERANCE = 0.01  # relative area change allowed by simplification

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
class Region:
    """One 4-connected region of one label: its shells and holes as exact and midpoint rings
    (open, in global pixel-corner coordinates); :func:`region_polygons` simplifies them."""

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
        reg = regions.setdefault(rid, Region(label))
        if _shoelace(exact) > 0:
            reg.shells.append((exact, mid))
        else:
            reg.holes.append((exact, mid))
            reg.hole_points.append((c_abs[idx[0]] + 0.5, r_abs[idx[0]] + 0.5))
    return regions


def region_polygons(reg: Region, tolerance: float) -> list:
    """[shell, *holes] closed (N, 2) x, y rings (label-pixel units) for one region.

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



class TileTracer:
    """Turns label tiles into :class:`Region` s; regions cut by inner tile borders wait for
    :meth:`finish`. Feed every tile of an image of ``shape`` to :meth:`tile` (any order)."""

    def __init__(self, shape):
        self.H, self.W = shape
        self.pending: dict = {}  # label -> list of (x, y, d, piece, r_abs, c_abs)
        self.next_piece = 0

    def tile(self, block: np.ndarray, y0: int, x0: int) -> list:
        """The regions of one tile whose top-left pixel is (y0, x0) that lie wholly inside it."""
        block = np.asarray(block)
        if block.ndim != 2:
            raise UserError(f"Labels must be a 2-D image; got shape {block.shape}.")
        if block.dtype.kind == "f":
            block = block.astype(np.int64)
        elif block.dtype.kind == "b":
            block = block.astype(np.uint8)
        h, w = block.shape
        inner = (y0 > 0, y0 + h < self.H, x0 > 0, x0 + w < self.W)  # top, bottom, left, right
        found = []
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
                found += [regions[i] for i in sorted(regions)]
            if waiting.any():
                piece = cid[waiting] + self.next_piece
                self.next_piece += int(comp.max()) + 1
                self.pending.setdefault(label, []).append(
                    (x[waiting], y[waiting], d[waiting], piece, r[waiting] + oy, c[waiting] + ox))
        return found

    def finish(self) -> list:
        """Join the pieces of regions cut by tile borders and return them."""
        found = []
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
            found += [regions[i] for i in sorted(regions)]
        self.pending.clear()
        return found


def label_regions(labels) -> list:
    """Every 4-connected region of each label > 0 of a whole 2-D array."""
    arr = np.asarray(labels)
    tracer = TileTracer(arr.shape)
    return tracer.tile(arr, 0, 0) + tracer.finish()
