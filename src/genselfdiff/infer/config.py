"""The configuration of a segmentation run: what a user can choose, with the engine's defaults.

:class:`SegmentConfig` plays the part :class:`~genselfdiff.train.config.PretrainConfig` plays for
pretraining: the CLI and the napari Segment widget each build one from what the user chose and
hand it to :func:`~genselfdiff.infer.segment.segment` (or ``segment_tiles``, ``segment_batch``,
the dask path), so neither face keeps a default of its own. ``None`` means "the engine decides
from the model and the image" (the tile side, the overlap, the output chunk, bf16).

This module imports neither torch nor zarr: napari builds a config without loading either.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from ..errors import UserError

DEFAULT_BATCH = 8  # tiles per forward pass


@dataclass
class SegmentConfig:
    """Everything about a segmentation that is the user's choice (the image and output path are not)."""

    tile: Optional[int] = None  # network input side; None: plan.default_tile(model)
    overlap: Optional[int] = None  # pixels shared by neighbouring tiles (twice the halo); None: tile / 8
    batch: int = DEFAULT_BATCH  # tiles per forward pass
    chunk: Optional[int] = None  # level-0 output chunk side; None: a whole number of tiles near 2048
    skip_background: bool = True  # tiles without tissue are background without running the network
    tta: bool = False  # average each tile's class probabilities over its four flips (4x the compute)
    probabilities: bool = False  # keep the class probabilities (per tile; with an output, in it)
    png: bool = False  # also write OUT/NAME.png (needs an output)
    instances: bool = False  # also split every foreground class into objects
    instances_of: Optional[tuple] = None  # split only these classes (names); implies instances
    amp: Optional[bool] = None  # bf16 autocast where it pays; None: the model's own setting
    device: str = "auto"  # where the network runs: for a model loaded from a path, and on dask workers
    threads: Optional[int] = None  # CPU threads of the network in this process; None: torch's (one per core)

    def __post_init__(self):
        if self.instances_of is not None:
            self.instances_of = tuple(str(n) for n in self.instances_of) or None
        if int(self.batch) < 1:
            raise UserError(f"The batch must be at least 1 tile, not {self.batch}.")
        if self.tile is not None and int(self.tile) <= 0:
            raise UserError(f"The tile side must be a positive number of pixels, not {self.tile}.")
        if self.threads is not None and int(self.threads) < 1:
            raise UserError(f"The network needs at least 1 CPU thread, not {self.threads}; leave --threads out to "
                            "use one per core.")
        if self.overlap is not None and int(self.overlap) < 0:
            raise UserError(f"The overlap cannot be negative ({self.overlap}); leave it out to let the engine choose.")

    @property
    def wants_objects(self) -> bool:
        return bool(self.instances or self.instances_of)

    def with_overrides(self, **overrides) -> "SegmentConfig":
        """A copy with the fields in ``overrides`` changed; an unknown name is a TypeError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown segmentation option(s) {', '.join(unknown)}; "
                            f"SegmentConfig has {', '.join(sorted(known))}")
        return replace(self, **overrides) if overrides else self


def segment_config(config: Optional[SegmentConfig] = None, **overrides) -> SegmentConfig:
    """``config`` (default: the engine's defaults) with ``overrides`` applied."""
    if config is not None and not isinstance(config, SegmentConfig):
        raise TypeError(f"config must be a SegmentConfig, not {type(config).__name__}")
    return (config or SegmentConfig()).with_overrides(**overrides)


def chosen(**values) -> dict:
    """The values a face passes on: those the user set (``None`` leaves the engine's default)."""
    return {k: v for k, v in values.items() if v is not None}

