"""Objects from class masks: touching nuclei (or glands) split into one id each.

One class at a time. The class mask is cut into *clumps* (its 4-connected components); each
clump is split by a marker-controlled watershed on its distance transform: a marker is a
maximum of the distance map at least ``h_um`` higher than the saddle that joins it to any
other maximum (h-maxima), so a waist between two round nuclei splits them while the ripples
of one ragged outline do not. Where a class probability is given, the distance is multiplied
by it, so a valley of lower probability between two nuclei also separates them. Fragments
smaller than ``min_area_um2`` join the neighbour they share most border with; isolated ones
are dropped.

Parameters are in micrometres, so they mean the same at any resolution; without a pixel size
the model's usual working resolution (``DEFAULT_MPP``) is assumed.

Seamless tiles. The split of a clump depends only on that clump and on pixels within the
smoothing's reach of it, so a tile whose window (core plus ``halo``) holds a clump whole,
with that margin, splits it exactly as the whole image would. An
object's id is derived from the object alone: one plus the raster index, in the whole
image, of its first pixel (top row, then leftmost). Any tile that sees the object whole
gives it the same id, so each tile can write the ids of its own core without talking to its
neighbours, and an object cut by a core or chunk border keeps one id. Only clumps wider than
the halo (they come near the window's cut edge) can come out differently; :func:`objects_in_core`
counts them so that the caller can warn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
from scipy import ndimage as ndi

DEFAULT_MPP = 0.5  # µm per pixel the parameters are read at when the image has no pixel size
_CROSS = ndi.generate_binary_structure(2, 1)
_SQUARE = ndi.generate_binary_structure(2, 2)
MAX_ID = 2**32 - 1  # ids are uint32 (NGFF label images, QuPath)


@dataclass(frozen=True)
class SplitParameters:
    """How objects are cut out of a class mask; lengths in µm, areas in µm²."""

    h_um: float = 0.2  # a distance maximum this much above its saddle is a separate object
    min_area_um2: float = 6.0  # smaller fragments join a neighbour (or vanish if alone)
    smooth_um: float = 0.5  # Gaussian smoothing of the distance map before finding maxima

    def check(self) -> None:
        if self.h_um <= 0 or self.min_area_um2 < 0 or self.smooth_um < 0:
            raise ValueError(f"split parameters must be positive: {self}")

    def describe(self) -> dict:
        return {"h_um": self.h_um, "min_area_um2": self.min_area_um2, "smooth_um": self.smooth_um}

    def reach_px(self, mpp: Optional[float]) -> int:
        """How far (px) the split of a clump looks beyond it: the reach of the Gaussian smoothing."""
        px = float(mpp) if mpp else DEFAULT_MPP
        return int(math.ceil(4.0 * self.smooth_um / px)) + 1  # scipy's Gaussian truncates at 4 sigma

    def split(self, prob, mask, *, mpp: Optional[float] = None, maps=None) -> np.ndarray:
        """:func:`split_objects` (``maps``, a geometry map, is not used by the distance split)."""
        return split_objects(prob, mask, mpp=mpp, params=self)


def split_objects(prob: Optional[np.ndarray], mask: np.ndarray, *, mpp: Optional[float] = None,
                  params: SplitParameters = SplitParameters()) -> np.ndarray:
    """Object ids (uint32, 0 = not this class) for one class mask, numbered 1..n in raster order
    of each object's first pixel.

    ``prob`` is the class probability in [0, 1] (same shape; None = the mask alone) and
    ``mpp`` the pixel size in µm (None = :data:`DEFAULT_MPP`).
    """
    mask = np.asarray(mask, bool)
    params.check()
    if prob is not None and np.shape(prob) != mask.shape:
        raise ValueError(f"probability {np.shape(prob)} and mask {mask.shape} differ in shape")
    px = float(mpp) if mpp else DEFAULT_MPP
    ids = np.zeros(mask.shape, np.int64)
    if not mask.any():
        return ids.astype(np.uint32)
    dist = ndi.distance_transform_edt(mask) * px  # µm to the nearest background pixel
    if prob is not None:
        dist = dist * np.clip(np.asarray(prob, np.float64), 0.0, 1.0)
    if params.smooth_um > 0:
        # Smoothing (after the product, so pixel noise in the probability cannot make peaks)
        # blurs across the clump edge too; re-masked below, so only the inside matters.
        dist = ndi.gaussian_filter(dist, params.smooth_um / px)
    dist = np.where(mask, dist, 0.0)
    markers = _h_maxima(dist, params.h_um, mask)
    from skimage.segmentation import watershed

    ids = watershed(-dist, markers, mask=mask, connectivity=1)
    # Clumps without a marker (only flat or tiny ones) become one object each.
    orphans, n_orphans = ndi.label(mask & (ids == 0), _CROSS)
    if n_orphans:
        ids = np.where(orphans > 0, orphans + ids.max(), ids)
    ids = _absorb_small(ids, params.min_area_um2 / (px * px))
    return first_pixel_order(ids).astype(np.uint32)


def _h_maxima(dist: np.ndarray, h: float, mask: np.ndarray) -> np.ndarray:
    """Labelled markers: regional maxima of ``dist`` with a dynamic of at least ``h``."""
    from skimage.morphology import reconstruction

    # Reconstruction by dilation of (dist - h) under dist flattens every peak lower than h.
    seed = np.maximum(dist - h, 0.0)
    flattened = reconstruction(seed, dist, method="dilation")
    peaks = (dist - flattened >= h * (1 - 1e-9)) & mask
    return ndi.label(peaks, _SQUARE)[0]


def _absorb_small(ids: np.ndarray, min_area_px: float) -> np.ndarray:
    """Fragments below ``min_area_px`` join the neighbour with the longest shared border.

    A fragment with no neighbouring object is removed. One pass, smallest first: merging
    only ever makes objects larger, so the result does not depend on tile or image size.
    """
    n = int(ids.max())
    if n == 0 or min_area_px <= 0:
        return ids
    area = np.bincount(ids.ravel(), minlength=n + 1)
    small = np.flatnonzero(area[1:] < min_area_px) + 1
    if small.size == 0:
        return ids
    # Shared border lengths between 4-neighbouring pixels of different objects.
    pairs = []
    for a, b in ((ids[:, :-1], ids[:, 1:]), (ids[:-1, :], ids[1:, :])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([a[touch], b[touch]], 1))
        pairs.append(np.stack([b[touch], a[touch]], 1))
    pairs = np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64)
    target = np.arange(n + 1)

    def root(k):
        while target[k] != k:
            k = target[k]
        return k

    border: dict = {}
    if pairs.size:
        keys, counts = np.unique(pairs, axis=0, return_counts=True)
        for (a, b), c in zip(keys.tolist(), counts.tolist()):
            border.setdefault(a, {})[b] = c
    # Smallest first, ties by id, so the order is a property of the objects themselves.
    for k in sorted(small.tolist(), key=lambda k: (area[k], k)):
        if area[root(k)] >= min_area_px:
            continue
        neighbours: dict = {}
        for b, c in border.get(k, {}).items():
            rb = root(b)
            if rb != root(k):
                neighbours[rb] = neighbours.get(rb, 0) + c
        if not neighbours:
            target[k] = 0  # alone and too small: not an object
            continue
        best = max(neighbours, key=lambda b: (neighbours[b], -b))
        target[k] = best
        area[best] += area[k]
    final = np.array([root(k) for k in range(n + 1)])
    return final[ids]


def first_pixel_order(ids: np.ndarray) -> np.ndarray:
    """Renumber objects 1..n in raster order of their first pixel (0 stays 0; sparse ids welcome)."""
    ids = np.asarray(ids)
    keys, first, inverse = np.unique(ids.ravel(), return_index=True, return_inverse=True)
    rank = np.empty(keys.size, np.int64)
    objects = np.flatnonzero(keys != 0)
    rank[objects[np.argsort(first[objects], kind="stable")]] = np.arange(1, objects.size + 1)
    rank[keys == 0] = 0
    return rank[inverse].reshape(ids.shape)


def first_pixels(ids: np.ndarray) -> np.ndarray:
    """Raster index (in ``ids``) of the first pixel of objects 1..n of a first-pixel-ordered map."""
    flat = np.asarray(ids).ravel()
    keys, first = np.unique(flat, return_index=True)
    return first[keys != 0]


# --- tiles ---------------------------------------------------------------------------------

HALO_UM = 64.0  # default halo: wider than a clump of several touching nuclei

Window = tuple  # (y0, x0, y1, x1), half-open, in pixels of the image being split


@dataclass(frozen=True)
class ObjectTile:
    """The object ids of one core, and how many clumps there were cut by the window's edge."""

    core: Window
    ids: np.ndarray  # uint32, the core's shape; id = 1 + raster index of the object's first pixel
    cut_clumps: int  # clumps wider than the halo: their objects may differ from an untiled split


def object_ids_fit(shape) -> bool:
    """Whether every first-pixel id of an image of ``shape`` fits in uint32."""
    return int(shape[0]) * int(shape[1]) < MAX_ID


def halo_pixels(halo_um: float, mpp: Optional[float]) -> int:
    return int(math.ceil(halo_um / (float(mpp) if mpp else DEFAULT_MPP)))


def objects_in_core(read: Callable[[Window], tuple], core: Window, shape, *, halo: int,
                    mpp: Optional[float] = None, params=SplitParameters()) -> ObjectTile:
    """Split the objects of one core from a window ``halo`` pixels wider on every side.

    ``read(window)`` returns ``(prob, mask)`` of the window (``prob`` may be None), or
    ``(prob, mask, maps)`` with the geometry maps (2, h, w) that
    :class:`~genselfdiff.objects.hv_split.HVParameters` split by. ``params`` says how
    (:class:`SplitParameters`: the distance split). Only one window is in memory. Ids are
    global (see the module docstring), so neighbouring cores agree about the objects they share.
    """
    H, W = int(shape[0]), int(shape[1])
    if not object_ids_fit((H, W)):
        raise ValueError(f"an image of {H} x {W} pixels has more pixels than uint32 object ids")
    y0, x0, y1, x1 = core
    win = (max(y0 - halo, 0), max(x0 - halo, 0), min(y1 + halo, H), min(x1 + halo, W))
    prob, mask, *maps = read(win)
    mask = np.asarray(mask, bool)
    local = params.split(prob, mask, mpp=mpp, maps=maps[0] if maps else None)
    first = first_pixels(local)
    rows, cols = np.divmod(first, mask.shape[1])
    global_ids = np.zeros(first.size + 1, np.uint32)
    global_ids[1:] = ((rows + win[0]).astype(np.uint64) * W + (cols + win[1]) + 1).astype(np.uint32)
    cy, cx = y0 - win[0], x0 - win[1]
    ids = global_ids[local[cy:cy + (y1 - y0), cx:cx + (x1 - x0)]]
    return ObjectTile(core, ids, _cut_clumps(mask, win, (H, W), (cy, cx, cy + y1 - y0, cx + x1 - x0),
                                             params.reach_px(mpp)))


def _cut_clumps(mask: np.ndarray, win: Window, shape, core_in_win: Window, margin: int) -> int:
    """Clumps meeting the core that come within ``margin`` of an edge where the window cuts the image."""
    clumps, n = ndi.label(mask, _CROSS)
    if n == 0:
        return 0
    h, w = mask.shape
    cut = np.zeros(mask.shape, bool)
    if win[0] > 0:
        cut[:margin] = True
    if win[2] < shape[0]:
        cut[h - margin:] = True
    if win[1] > 0:
        cut[:, :margin] = True
    if win[3] < shape[1]:
        cut[:, w - margin:] = True
    a, b, c, d = core_in_win
    in_core = np.unique(clumps[a:c, b:d])
    at_edge = np.unique(clumps[cut])
    return int(np.intersect1d(in_core[in_core > 0], at_edge[at_edge > 0]).size)


def owned_by_core(ids: np.ndarray, core: Window, width: int) -> np.ndarray:
    """Which of the global ``ids`` start (have their first pixel) inside ``core``.

    Each object starts in exactly one core, so measuring or exporting an object from the
    window of the core it starts in handles every object once, and whole.
    """
    first = np.asarray(ids, np.int64) - 1
    y, x = np.divmod(first, int(width))
    return (first >= 0) & (y >= core[0]) & (y < core[2]) & (x >= core[1]) & (x < core[3])


def class_objects_in_core(labels, probs, core: Window, shape, *, classes, halo: int, mpp: Optional[float] = None,
                          params=SplitParameters(), geometry: bool = False) -> tuple:
    """The objects of each class in ``classes`` in one core of a class-label image, split from a window
    ``halo`` pixels wider: ``(ids, objects of each class that start in the core, clumps cut by the window)``.

    ``labels`` (H, W) and ``probs`` are sliced a window at a time (zarr, dask or numpy). ``probs``: the
    class probabilities (c, H, W) or None; with ``geometry``, the foreground probability and the two
    maps (3, H, W) that ``params`` split by. Classes never share a pixel, so their ids share one core.
    """
    H, W = shape
    y0, x0, y1, x1 = core
    win = (max(y0 - halo, 0), max(x0 - halo, 0), min(y1 + halo, H), min(x1 + halo, W))
    window = np.asarray(labels[win[0]:win[2], win[1]:win[3]])
    ids = np.zeros((y1 - y0, x1 - x0), np.uint32)
    counts, cut = [], 0
    for k in classes:
        core_mask = window[y0 - win[0]: y1 - win[0], x0 - win[1]: x1 - win[1]] == k
        if not core_mask.any():  # no pixel of this class in the core: none of its objects either
            counts.append(0)
            continue
        maps = None
        if geometry:
            found = np.asarray(probs[:, win[0]:win[2], win[1]:win[3]])
            prob, maps = found[0], found[1:]
        else:
            prob = None if probs is None else np.asarray(probs[k, win[0]:win[2], win[1]:win[3]])

        def read(w, k=k, prob=prob, maps=maps):
            a, b, c, d = (w[0] - win[0], w[1] - win[1], w[2] - win[0], w[3] - win[1])
            found = (None if prob is None else prob[a:c, b:d]), window[a:c, b:d] == k
            return found if maps is None else found + (maps[:, a:c, b:d],)

        tile = objects_in_core(read, core, shape, halo=halo, mpp=mpp, params=params)
        ids = np.where(tile.ids > 0, tile.ids, ids)
        present = np.unique(tile.ids[tile.ids > 0])
        counts.append(int(owned_by_core(present, core, W).sum()))
        cut += tile.cut_clumps
    return ids, counts, cut


def core_grid(shape, core: int) -> list:
    """Square cores of side ``core`` covering an image, row by row."""
    H, W = int(shape[0]), int(shape[1])
    return [(y, x, min(y + core, H), min(x + core, W)) for y in range(0, H, core) for x in range(0, W, core)]


def object_tiles(read: Callable[[Window], tuple], shape, *, core: int = 1024, halo_um: float = HALO_UM,
                 mpp: Optional[float] = None, params=SplitParameters()) -> Iterator[ObjectTile]:
    """Yield the object ids of an image core by core (row by row), one window in memory at a time."""
    halo = halo_pixels(halo_um, mpp)
    for rect in core_grid(shape, core):
        yield objects_in_core(read, rect, shape, halo=halo, mpp=mpp, params=params)


def array_reader(mask: np.ndarray, prob: Optional[np.ndarray] = None, maps=None) -> Callable[[Window], tuple]:
    """A ``read`` for :func:`objects_in_core` over in-memory (or lazily sliced) arrays; ``maps``
    (2, H, W): the geometry maps, for the geometry split."""

    def read(win: Window):
        y0, x0, y1, x1 = win
        p = None if prob is None else np.asarray(prob[y0:y1, x0:x1])
        if maps is None:
            return p, np.asarray(mask[y0:y1, x0:x1])
        return p, np.asarray(mask[y0:y1, x0:x1]), np.asarray(maps[:, y0:y1, x0:x1])

    return read
