"""Where the tiles of a whole-slide prediction go: pure arithmetic, no I/O.

The slide is cut into *work units*, one per output chunk of the level-0 label image
(so one unit = one writer = one set of zarr chunks, which is what makes parallel writes
safe and resume possible). Each unit is covered by *cores* that partition it exactly;
each core is predicted from an input *window* of ``tile`` x ``tile`` pixels around it,
so every kept pixel lies at least ``overlap / 2`` (the halo) from a cut edge of its
window. Only the core of each prediction is kept ("centre crop"): for the convolutional
part of the network this makes tiled and whole-image predictions identical, and windows
are never cut at the image border but shifted inwards, so pixels there see the same
border as in a whole-image prediction. What remains is the global statistics of
GroupNorm and attention, which differ slightly between a tile and the whole image; a
smooth blending window would only spread that difference, not remove it, and would tie
every output chunk to its neighbours' tiles.

All coordinates are (y0, x0, y1, x1) half-open rectangles in pixels of the processing
level unless they say level 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..io.omezarr import TARGET_CHUNK

# Level-0 output chunks (TARGET_CHUNK) are a multiple of CHUNK_ALIGN so that
# 2x nearest-neighbour pyramid levels stay chunk-aligned for several levels.
CHUNK_ALIGN = 64


@dataclass(frozen=True)
class Tile:
    """One network input ``window`` and the ``core`` of its prediction that is kept."""

    core: tuple  # (y0, x0, y1, x1), inside the image
    window: tuple  # (y0, x0, y1, x1), tile-sized; leaves the image only when the image is smaller than a tile

    @property
    def offset(self) -> tuple:
        """Top-left of the core inside the window."""
        return self.core[0] - self.window[0], self.core[1] - self.window[1]


@dataclass(frozen=True)
class Unit:
    """One work unit: a level-0 output chunk, the processing-level rectangle its labels come from,
    and the tiles whose cores cover that rectangle."""

    index: tuple  # (row, col) of the chunk
    rect0: tuple  # the chunk, level 0
    rect: tuple  # processing level
    tiles: tuple  # Tile, row by row


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def check_tiling(tile: int, overlap: int, multiple: int) -> None:
    """Raise ValueError for a tile/overlap the network cannot use."""
    if tile <= 0 or tile % multiple:
        raise ValueError(f"tile must be a positive multiple of {multiple}, got {tile}")
    if overlap < 0 or overlap % 2 or overlap >= tile:
        raise ValueError(f"overlap must be even, >= 0 and smaller than the tile ({tile}), got {overlap}")


def tile_shape(shape: tuple, tile: int, multiple: int) -> tuple:
    """Input size per axis: ``tile``, or the image side rounded up to ``multiple`` when smaller."""
    return tuple(min(tile, round_up(n, multiple)) for n in shape[:2])


def split(start: int, stop: int, size: int, overlap: int) -> list:
    """Cut [start, stop) into cores for windows of ``size`` overlapping by about ``overlap``.

    Cores are as even as possible; they may exceed the nominal stride ``size - overlap``
    by up to a quarter of the overlap rather than add a whole extra row of tiles.
    """
    length = stop - start
    if length <= 0:
        return []
    stride = size - overlap
    slack = overlap // 4
    n = max(1, math.ceil(length / (stride + slack)), math.ceil(length / size))
    edges = [start + round(i * length / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def place(core: tuple, size: int, extent: int) -> int:
    """Start of a ``size`` window centred on ``core`` = (c0, c1), kept inside [0, extent)."""
    c0, c1 = core
    start = c0 - (size - (c1 - c0)) // 2
    if extent <= size:
        return 0
    return min(max(start, 0), extent - size)


def unit_tiles(unit: tuple, shape: tuple, tile: int, overlap: int, multiple: int) -> list:
    """The tiles of one work unit (a processing-level rectangle), row by row."""
    th, tw = tile_shape(shape, tile, multiple)
    h, w = shape[:2]
    y0, x0, y1, x1 = unit
    # A window smaller than ``tile`` covers the whole image along that axis: one core.
    rows = split(y0, y1, th, overlap) if th < h else [(y0, y1)]
    cols = split(x0, x1, tw, overlap) if tw < w else [(x0, x1)]
    tiles = []
    for r in rows:
        wy = place(r, th, h)
        for c in cols:
            wx = place(c, tw, w)
            tiles.append(Tile((r[0], c[0], r[1], c[1]), (wy, wx, wy + th, wx + tw)))
    return tiles


def chunk_side(tile: int, overlap: int, downsample: float, target: int = TARGET_CHUNK,
               align: int = CHUNK_ALIGN) -> int:
    """Level-0 side of an output chunk: a whole number of core strides near ``target``."""
    r = max(1, round(downsample))
    step = (tile - overlap) * r
    k = max(1, round(target / step))
    return max(align, round(k * step / align) * align)


def to_processing(start: int, stop: int, full: int, proc: int) -> tuple:
    """Processing-level rows [a, b) that level-0 rows [start, stop) take their labels from.

    Nearest neighbour: a level-0 pixel takes the processing pixel its centre falls in.
    """
    return nearest_index(start, full, proc), nearest_index(stop - 1, full, proc) + 1


def nearest_index(i, full: int, proc: int):
    """Processing-level index of level-0 index ``i`` (int or integer numpy array)."""
    j = ((2 * i + 1) * proc) // (2 * full)
    return min(j, proc - 1) if isinstance(j, int) else j.clip(0, proc - 1)


def chunk_grid(shape0: tuple, chunk: int) -> list:
    """Level-0 chunk rectangles, row by row, with their (row, col) index."""
    H, W = shape0[:2]
    return [((i, j), (i * chunk, j * chunk, min((i + 1) * chunk, H), min((j + 1) * chunk, W)))
            for i in range(math.ceil(H / chunk)) for j in range(math.ceil(W / chunk))]


def unit_region(rect0: tuple, shape0: tuple, shape: tuple) -> tuple:
    """Processing-level rectangle of a level-0 chunk rectangle."""
    y0, x0, y1, x1 = rect0
    a, b = to_processing(y0, y1, shape0[0], shape[0])
    c, d = to_processing(x0, x1, shape0[1], shape[1])
    return a, c, b, d


def work_units(shape0: tuple, shape: tuple, chunk: int, tile: int, overlap: int, multiple: int,
               region=None) -> list:
    """The :class:`Unit` of every level-0 chunk, row by row; with ``region`` (processing level) only
    the units, and in them the tiles, that meet it."""
    out = []
    for index, rect0 in chunk_grid(shape0, chunk):
        rect = unit_region(rect0, shape0, shape)
        if region is not None and not intersects(rect, region):
            continue
        tiles = unit_tiles(rect, shape, tile, overlap, multiple)
        if region is not None:
            tiles = [t for t in tiles if intersects(t.core, region)]
        out.append(Unit(index, rect0, rect, tuple(tiles)))
    return out


def intersects(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
