"""genselfdiff: the headless engine of napari-genselfdiff.

GenSelfDiff-HIS (Purma et al., IEEE TMI 2024): pretrain a diffusion U-Net on unannotated
histopathology tiles, fine-tune it for segmentation from a few annotations, and segment
whole slides lazily, tile by tile. The public API::

    from genselfdiff import pretrain, finetune, segment, load_model, open_slide, evaluate

Long-running functions take ``progress`` (called with :class:`~genselfdiff.progress.Progress`)
and ``should_stop`` (returns True to stop cleanly) callbacks. Nothing here imports Qt or napari.
"""

from importlib import import_module

from ._version import __version__
from .errors import UserError
from .progress import Progress

# Heavy modules (torch, dask) load on first use, so ``import genselfdiff`` stays cheap.
_LAZY = {
    "load_model": ".nn.model",
    "Model": ".nn.model",
    "open_slide": ".io.slides",
    "Slide": ".io.slides",
    "PretrainConfig": ".train.config",
    "pretrain": ".train.pretrain",
    "sample_images": ".nn.sampling",
    "FinetuneConfig": ".train.config",
    "finetune": ".train.finetune",
    "SegmentConfig": ".infer.config",
    "segment": ".infer.segment",
    "segment_tiles": ".infer.segment",
    "evaluate": ".eval.evaluate",
}

__all__ = ["__version__", "UserError", "Progress", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'genselfdiff' has no attribute {name!r}")
