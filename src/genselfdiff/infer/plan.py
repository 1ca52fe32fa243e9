"""Planning a segmentation: which pyramid level the model runs on, the tiles, the output chunks.

A :class:`Plan` is everything about one image that decides which tiles are computed, where
their labels go and which classes become objects; :mod:`tiling` does the arithmetic, and the
work units (one per level-0 output chunk, with their tiles) are computed once, here, for every
stage to read.
:func:`make_plan` is the one place that checks the model against the configuration and the
image (channels, classes, the classes to split, µm/px) and makes the choices, all before a
tile is read. Every face (the CLI, napari, a dask worker) asks the plan, so none re-derives
the level, the tile or a region.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import dask
import numpy as np

from ..errors import UserError
from ..io.slides import as_slide
from . import tiling
from .config import SegmentConfig, segment_config

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
    units: list  # the work: tiling.Unit (a chunk and its tiles), row by row; with a region only what meets it
    tissue: object = None  # TissueMap, or None to compute every tile
    region: Optional[tuple] = None  # processing-level rectangle the work is limited to; None: everything
    objects: object = None  # objects.request.ObjectRequest: the classes to split into objects, or None
    tissue_mm2: Optional[float] = None  # tissue area, for the objects' densities (with objects and a pixel size)
    stain: object = None  # nn.stain.Stain the tiles are normalised with, for a model that expects it; else None

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


def check_model(model, config: SegmentConfig):
    """The model checked against a configuration before any image is opened (a segmentation model
    of RGB input and uint8 classes, having the classes to split); returns the classes to split into
    objects (an :class:`~genselfdiff.objects.request.ObjectRequest`), or None without instances."""
    from ..objects.request import object_request

    net = model.require_segmentation()
    if model.net_config.in_channels != 3:
        raise UserError(f"{model.path or 'The model'} expects {model.net_config.in_channels} input channels; "
                        "only RGB models can segment slides.")
    if len(model.classes) > 255 or net.classes > 255:
        raise UserError(f"{model.path or 'The model'} has more than 255 classes, which uint8 labels cannot hold.")
    return object_request(model, config.instances_of) if config.wants_objects else None


def make_plan(model, image, config: Optional[SegmentConfig] = None, *, region=None, region0=None, pixel_size=None,
              override_pixel_size: bool = False, **overrides) -> Plan:
    """Check the model against the configuration and the image, and choose everything that decides the work.

    ``image`` is a path, Slide or array (:func:`~genselfdiff.io.slides.as_slide`) with its level-0
    ``pixel_size`` (µm/px); the user hears when that size is unknown to a model that knows its
    own. ``config`` (:class:`~genselfdiff.infer.config.SegmentConfig`) and keyword overrides say
    how: the tile (default :func:`default_tile`), overlap, output chunk, whether glass is skipped
    (a tissue map) and which classes become objects. ``region`` (y0, x0, y1, x1) in
    processing-level pixels, or ``region0`` in level-0 pixels, limits the work to the tiles whose
    cores meet it. A problem the user can fix is a :class:`UserError` raised before any tile is read.
    """
    from ..io.pixelsize import tell, unknown_note
    from ..io.tissue import TissueMap

    cfg = segment_config(config, **overrides)
    if region is not None and region0 is not None:
        raise UserError("Give a region in processing-level pixels (region) or in level-0 pixels (region0), not both.")
    m = model.multiple
    tile = int(cfg.tile or default_tile(model))
    overlap = default_overlap(tile) if cfg.overlap is None else int(cfg.overlap)
    objects = check_model(model, cfg)

    slide = as_slide(image, pixel_size, override_pixel_size)
    for note in slide.notes:
        tell(note)
    if slide.mpp is None and model.resolution.mpp is not None:
        tell(unknown_note([str(slide.path)]))
    level = slide.level_for(model.resolution)
    want, have = model.resolution.mpp, slide.mpp_at(level)
    if want and have and not (1 / MPP_TOLERANCE <= have / want <= MPP_TOLERANCE):
        raise UserError(f"{slide.path} has no pyramid level near {want:g} µm/px, the resolution "
                        f"{model.path or 'the model'} was trained at (nearest: {have:g} µm/px at level {level}); "
                        "use a slide scanned at that magnification or a model trained for this one.")
    try:
        tiling.check_tiling(tile, overlap, m)
    except ValueError as e:
        raise UserError(f"Invalid tiling: {e}.") from None
    d = slide.downsample(level)
    chunk = cfg.chunk
    if chunk is None:
        chunk = tiling.chunk_side(tile, overlap, d)
    elif chunk <= 0 or chunk % 16:
        raise UserError(f"Invalid output chunk side {chunk}: use a positive multiple of 16.")
    if region0 is not None:  # the smallest processing-level rectangle covering it
        y0, x0, y1, x1 = region0
        region = (y0 // d, x0 // d, -(-y1 // d), -(-x1 // d))
    region = tuple(int(v) for v in region) if region is not None else None
    units = tiling.work_units(slide.levels[0].shape[:2], slide.levels[level].shape[:2], chunk, tile, overlap, m, region)

    tissue = area = None
    if cfg.skip_background or (objects is not None and slide.mpp):
        with reading(slide, "its thumbnail"), dask.config.set(**LOCAL):
            tissue = TissueMap(slide)
        if objects is not None and slide.mpp:
            area = float(tissue.mask.sum()) * (tissue.scale * float(slide.mpp) * 1e-3) ** 2
    stain = None
    if model.stain:  # fitted at the level the network reads, as training fitted it (nn.stain)
        from ..nn.stain import fit_image

        array = slide.levels[level]
        with reading(slide, "its stain"), dask.config.set(**LOCAL):
            stain = fit_image(lambda y, x, h, w: np.asarray(array[y : y + h, x : x + w]), array.shape[:2])
    return Plan(slide, level, tile, overlap, m, chunk, units, tissue if cfg.skip_background else None, region, objects, area,
                stain)
