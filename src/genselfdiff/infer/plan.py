"""Planning a segmentation: which pyramid level the model runs on, the tiles, the output chunks.

A :class:`Plan` is everything about one image that decides which tiles are computed and
where their labels go; :mod:`tiling` does the arithmetic, this module checks the model
against the image (channels, classes, µm/px) and makes the choices. Every face (the CLI,
napari, a dask worker) asks the plan, so none re-derives the level or a region.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError
from ..io.slides import as_slide
from . import tiling

MPP_TOLERANCE = 1.5  # a level more than this factor off the model's µm/px is a mismatch
# Reads happen in this process, never on a dask.distributed Client that happens to be the
# default: a slide's tifffile store cannot be pickled, and the data is needed here anyway.
LOCAL = {"scheduler": "threads"}


def default_tile(model) -> int:
    """The training patch or larger, capped so the bottleneck attention sees <= 64x64 tokens."""
    m = model.multiple
    return max(tiling.round_up(model.patch, m), min(512, 64 * m))


def default_overlap(tile: int) -> int:
    return max(2, tile // 8 // 2 * 2)


@dataclass
class Plan:
    """Everything about one image that decides which tiles are computed, and where they go."""

    slide: object
    level: int
    tile: int
    overlap: int
    multiple: int
    chunk: int  # level-0 output chunk side
    tissue: object = None  # TissueMap, or None to compute every tile

    @property
    def array(self):
        return self.slide.levels[self.level]

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape[:2])

    @property
    def shape0(self) -> tuple:
        return tuple(self.slide.levels[0].shape[:2])

    @property
    def downsample(self) -> float:
        return self.slide.downsample(self.level)

    def processing_region(self, region0: tuple) -> tuple:
        """A level-0 rectangle (y0, x0, y1, x1) as the smallest processing-level rectangle covering it."""
        d = self.downsample
        y0, x0, y1, x1 = region0
        return (int(y0 // d), int(x0 // d), int(-(-y1 // d)), int(-(-x1 // d)))

    def units(self, region: Optional[tuple] = None) -> list:
        """[(chunk index, level-0 rectangle, processing rectangle)], optionally only those meeting ``region``."""
        out = []
        for index, rect0 in tiling.chunk_grid(self.shape0, self.chunk):
            rect = tiling.unit_region(rect0, self.shape0, self.shape)
            if region is None or tiling.intersects(rect, region):
                out.append((index, rect0, rect))
        return out

    def tiles(self, rect: tuple, region: Optional[tuple] = None) -> list:
        tiles = tiling.unit_tiles(rect, self.shape, self.tile, self.overlap, self.multiple)
        return tiles if region is None else [t for t in tiles if tiling.intersects(t.core, region)]

    def has_tissue(self, t: tiling.Tile) -> bool:
        if self.tissue is None:
            return True
        y0, x0, y1, x1 = t.core
        return self.tissue.coverage(self.level, y0, x0, y1 - y0, x1 - x0) > 0


@contextmanager
def reading(slide, where: str):
    """Turn a decoder's error on a truncated or corrupt file into a UserError naming the file."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # decoders raise all kinds of errors
        raise UserError(f"{slide.path} could not be read ({where}: {type(e).__name__}: {e}); "
                        "it may be corrupt or truncated.") from None


def input_slide(model, image, pixel_size, override: bool):
    """The image as a Slide at its pixel size; the user hears when that size is unknown to a
    model that knows its own."""
    from ..io.pixelsize import tell, unknown_note

    slide = as_slide(image, pixel_size, override)
    for note in slide.notes:
        tell(note)
    if slide.mpp is None and model.resolution.mpp is not None:
        tell(unknown_note([str(slide.path)]))
    return slide


def make_plan(model, slide, *, tile=None, overlap=None, skip_background=True, chunk=None) -> Plan:
    """Check the model against the image and choose level, tiles and output chunks."""
    from ..io.tissue import TissueMap

    model.require_segmentation()
    if model.net_config.in_channels != 3:
        raise UserError(f"{model.path or 'The model'} expects {model.net_config.in_channels} input channels; "
                        "only RGB models can segment slides.")
    if len(model.classes) > 255 or model.net.classes > 255:
        raise UserError(f"{model.path or 'The model'} has more than 255 classes, which uint8 labels cannot hold.")
    level = slide.level_for(model.resolution)
    want, have = model.resolution.mpp, slide.mpp_at(level)
    if want and have and not (1 / MPP_TOLERANCE <= have / want <= MPP_TOLERANCE):
        raise UserError(f"{slide.path} has no pyramid level near {want:g} µm/px, the resolution "
                        f"{model.path or 'the model'} was trained at (nearest: {have:g} µm/px at level {level}); "
                        "use a slide scanned at that magnification or a model trained for this one.")
    m = model.multiple
    tile = int(tile or default_tile(model))
    overlap = default_overlap(tile) if overlap is None else int(overlap)
    try:
        tiling.check_tiling(tile, overlap, m)
    except ValueError as e:
        raise UserError(f"Invalid tiling: {e}.") from None
    if chunk is None:
        chunk = tiling.chunk_side(tile, overlap, slide.downsample(level))
    elif chunk <= 0 or chunk % 16:
        raise UserError(f"Invalid output chunk side {chunk}: use a positive multiple of 16.")
    tissue = None
    if skip_background:
        import dask

        with reading(slide, "its thumbnail"), dask.config.set(**LOCAL):
            tissue = TissueMap(slide)
    return Plan(slide, level, tile, overlap, m, chunk, tissue)


