"""Where finished tiles go: one protocol for an in-memory array, an OME-Zarr output and a display pyramid.

As MONAI's inferers hand patches to a merger, :func:`pipeline.run_units` hands every finished
tile (a :class:`~genselfdiff.infer.pipeline.TileResult`: class ids of its core at the processing
level) to each :class:`Merger` it is given::

    merger.start(plan)    once, before the first tile (the shapes, the output chunks)
    merger.paste(tile)    every finished tile, in the order they finish
    merger.close()        always, also after an error or a stop (background work ends here)
    merger.finish()       the merged result, for whoever made the merger

:class:`ArrayMerger` fills a numpy array (``segment()`` without an output), :class:`OmeZarrMerger`
writes a resumable OME-Zarr label image unit by unit (with an output, also on dask workers), and
:class:`PyramidMerger` keeps the processing level and its 2x halvings for display (napari shows
its ``levels``; the number of levels is :func:`~genselfdiff.io.omezarr.pyramid_levels`, as for
a written output). Nothing here imports torch.
"""

from __future__ import annotations

import queue
import threading
from typing import Optional

import numpy as np

from ..io.omezarr import LabelImage, pyramid_levels
from . import tiling

IN_MEMORY_LIMIT = 2**28  # display pixels per level kept in numpy; larger levels are compressed in-memory zarr
DISPLAY_CHUNK = 2048  # chunk side of such a zarr level
DISPLAY_MIN_SIDE = 512  # halve while a level is larger than this (as a written output does)


class Merger:
    """Receives finished tiles; see the module docstring for the order of calls."""

    def start(self, plan) -> None:
        """Learn the shapes from the :class:`~genselfdiff.infer.plan.Plan` before the first tile."""

    def paste(self, tile) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """End background work; called once the tiles stop coming, whatever the reason."""

    def finish(self):
        """The merged result."""
        return None


def _paste(array, y: int, x: int, labels: np.ndarray) -> None:
    h, w = labels.shape
    array[y : y + h, x : x + w] = labels


class ArrayMerger(Merger):
    """The class ids of the whole processing level in one numpy array (small images, tests); with
    tiles that carry a geometry map, that too (:attr:`geometry`, float32 (3, H, W))."""

    labels: Optional[np.ndarray] = None  # declared on the class: segment_tiles asks the class whether it keeps labels

    def __init__(self, shape: Optional[tuple] = None):
        self.labels = np.zeros(tuple(shape)[:2], np.uint8) if shape is not None else None
        self.geometry = None

    def start(self, plan) -> None:
        if self.labels is None or self.labels.shape != tuple(plan.shape):
            self.labels = np.zeros(plan.shape, np.uint8)
        self.geometry = None

    def paste(self, tile) -> None:
        _paste(self.labels, tile.y, tile.x, tile.labels)
        if getattr(tile, "geometry", None) is not None:
            if self.geometry is None:
                self.geometry = np.zeros((tile.geometry.shape[0],) + self.labels.shape, np.float32)
            h, w = tile.labels.shape
            self.geometry[:, tile.y : tile.y + h, tile.x : tile.x + w] = tile.geometry

    def finish(self) -> np.ndarray:
        return self.labels


class PyramidMerger(Merger):
    """Class ids of the processing level plus nearest-neighbour 2x halvings, written tile by tile.

    Every paste goes to all levels, so a multiscale viewer layer over :attr:`levels` shows each
    finished tile at every zoom while the run goes on. Levels larger than ``IN_MEMORY_LIMIT``
    pixels are in-memory zarr arrays (compressed chunks: a whole slide of mostly background stays
    small). ``shape`` allocates at once; otherwise :meth:`start` does, from the plan.
    """

    def __init__(self, shape: Optional[tuple] = None, min_side: int = DISPLAY_MIN_SIDE):
        self.min_side = min_side
        self.levels = []
        if shape is not None:
            self.allocate(shape)

    def allocate(self, shape: tuple) -> None:
        h, w = int(shape[0]), int(shape[1])
        n = pyramid_levels((h, w), DISPLAY_CHUNK, min_side=self.min_side)
        self.levels = [_allocate((-(-h // 2**k), -(-w // 2**k))) for k in range(n)]

    @property
    def labels(self):
        """The finest level: the processing level."""
        return self.levels[0]

    @property
    def data(self):
        """What a viewer layer takes: one array, or the list of levels."""
        return self.levels[0] if len(self.levels) == 1 else self.levels

    def start(self, plan) -> None:
        if not self.levels or tuple(self.levels[0].shape) != tuple(plan.shape):
            self.allocate(plan.shape)

    def paste(self, tile) -> None:
        y, x, labels = tile.y, tile.x, tile.labels
        for k, level in enumerate(self.levels):
            s = 2**k
            oy, ox = (-y) % s, (-x) % s  # the first row and column of the tile on this level's grid
            sub = labels[oy::s, ox::s]
            if sub.size:
                Y, X = (y + oy) // s, (x + ox) // s
                _paste(level, Y, X, sub[: level.shape[0] - Y, : level.shape[1] - X])

    def finish(self) -> list:
        return self.levels


def _allocate(shape):
    if shape[0] * shape[1] <= IN_MEMORY_LIMIT:
        return np.zeros(shape, np.uint8)
    import zarr

    return zarr.create_array(zarr.storage.MemoryStore(), shape=shape, chunks=(DISPLAY_CHUNK, DISPLAY_CHUNK),
                             dtype="uint8", fill_value=0)


# --- OME-Zarr ---------------------------------------------------------------------------------

def level0(plan, rect0: tuple, rect: tuple, labels: np.ndarray, probs: Optional[np.ndarray],
           geometry: Optional[np.ndarray] = None):
    """A unit's processing-level buffers (covering ``rect``) -> its level-0 chunk ``rect0`` (nearest
    neighbour): labels, probabilities and geometry (None stays None)."""
    (H, W), (h, w) = plan.shape0, plan.shape
    y0, x0, y1, x1 = rect0
    if (H, W) == (h, w):
        return labels, probs, geometry
    rows = tiling.nearest_index(np.arange(y0, y1), H, h) - rect[0]
    cols = tiling.nearest_index(np.arange(x0, x1), W, w) - rect[1]
    lab = labels[rows][:, cols]
    return (lab, (probs[:, rows][:, :, cols] if probs is not None else None),
            geometry[:, rows][:, :, cols] if geometry is not None else None)


class Writer(threading.Thread):
    """Writes finished units to the label image in the background, in order."""

    def __init__(self, image: LabelImage, plan, depth: int = 2):
        super().__init__(daemon=True, name="genselfdiff-writer")
        self.image, self.plan = image, plan
        self.queue = queue.Queue(maxsize=depth)
        self.error = None
        self.written = 0

    def run(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is not None:
                continue
            try:
                index, rect0, rect, labels, probs, empty, geometry = job
                lab0, probs0, geometry0 = level0(self.plan, rect0, rect, labels, probs, geometry)
                self.image.write(index, lab0, probs0, empty=empty and probs is None and geometry is None,
                                 geometry=geometry0)
                self.written += 1
            except BaseException as e:
                self.error = e

    def submit(self, job):
        if self.error is not None:
            raise self.error
        self.queue.put(job)

    def finish(self):
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class OmeZarrMerger(Merger):
    """Tiles into a resumable OME-Zarr label image (:class:`~genselfdiff.io.omezarr.LabelImage`).

    Each unit (one level-0 output chunk) is buffered at the processing level until its last tile
    arrives; then a background thread enlarges it to level 0 and writes its chunks and its
    progress file, so an interrupted run keeps every finished unit. ``probabilities``: also
    write the tiles' class probabilities; tiles that carry a geometry map write it too.
    """

    def __init__(self, image: LabelImage, probabilities: bool = False):
        self.image, self.probabilities = image, probabilities
        self.writer, self.units, self.buffers = None, {}, {}

    @property
    def written(self) -> int:
        """Units written in this run."""
        return self.writer.written if self.writer is not None else 0

    def start(self, plan) -> None:
        self.units = {u.index: (u.rect0, u.rect) for u in plan.units}
        self.writer = Writer(self.image, plan)
        self.writer.start()

    def paste(self, tile) -> None:
        rect0, rect = self.units[tile.chunk]
        uy0, ux0, uy1, ux1 = rect
        if tile.chunk not in self.buffers:
            probs = (np.zeros((tile.probabilities.shape[0], uy1 - uy0, ux1 - ux0), np.float32)
                     if self.probabilities else None)
            geometry = (np.zeros((tile.geometry.shape[0], uy1 - uy0, ux1 - ux0), np.float32)
                        if tile.geometry is not None else None)
            self.buffers[tile.chunk] = [np.zeros((uy1 - uy0, ux1 - ux0), np.uint8), probs, True, geometry]
        buf = self.buffers[tile.chunk]
        oy, ox = tile.y - uy0, tile.x - ux0
        _paste(buf[0], oy, ox, tile.labels)
        h, w = tile.labels.shape
        if self.probabilities:
            buf[1][:, oy : oy + h, ox : ox + w] = tile.probabilities
        if buf[3] is not None:
            buf[3][:, oy : oy + h, ox : ox + w] = tile.geometry
        buf[2] = buf[2] and tile.skipped
        if tile.chunk_done:
            labels, probs, empty, geometry = self.buffers.pop(tile.chunk)
            self.writer.submit((tile.chunk, rect0, rect, labels, probs, empty, geometry))

    def close(self) -> None:
        if self.writer is not None and self.writer.is_alive():
            self.writer.finish()

    def finish(self) -> LabelImage:
        return self.image
