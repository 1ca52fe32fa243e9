"""Whole-slide segmentation: the public API.

The slide is read at the level the model was trained at and cut into work units (one
per level-0 output chunk) and tiles with a halo (:mod:`plan`, :mod:`tiling`); the tiles
run through a read-ahead / predict / write pipeline (:mod:`pipeline`) or, with
``scheduler``, as chunk tasks on a dask.distributed cluster (:mod:`dask`).

A segmentation has one shape: :func:`segment_tiles` is a generator that yields each
finished tile (for live views and progress) and returns the :class:`SegmentResult`;
:func:`segment` drains it. How to segment is a :class:`~genselfdiff.infer.config.SegmentConfig`;
where the tiles go is a :class:`~genselfdiff.infer.merge.Merger`. :func:`segment_batch` segments many images (errors per image)
and :func:`load_labels` reads an output back.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generator, Optional

from ..errors import UserError
from ..io.labels import default_class_names, load_labels
from ..io.omezarr import LabelImage, pyramid_levels
from ..io.outputs import png_path, zarr_path
from ..progress import drain, resolve
from .config import SegmentConfig, segment_config
from .merge import ArrayMerger, Merger, OmeZarrMerger
from .pipeline import STAGE, TileResult, run_units
from .plan import LOCAL, Plan, check_model, make_plan

PNG_MAX_PIXELS = 100_000_000  # --png is skipped above this many level-0 pixels


@dataclass
class SegmentResult:
    """What :func:`segment` produced.

    ``labels`` is, with ``out``, a dask array over the written level-0 class ids (the
    source's level-0 shape); without ``out``, a numpy array at the processing level
    (the whole image in memory, for small images and tests).
    """

    labels: object
    path: Optional[Path]
    shape: tuple  # shape of ``labels``
    tiles: int  # tiles computed in this run (network or skipped)
    skipped_tiles: int  # of which without tissue
    seconds: float
    mpx_per_s: float  # processing-level megapixels finished per second in this run
    stopped: bool = False
    chunks_computed: int = 0  # output chunks written in this run
    chunks_resumed: int = 0  # output chunks found finished by an earlier run
    level: int = 0
    downsample: float = 1.0
    png: Optional[Path] = None
    notes: list = field(default_factory=list)
    mpp: Optional[float] = None  # µm/px at the processing level, when known
    objects: object = None  # objects.ObjectResult when asked for instances

    @property
    def skipped_share(self) -> float:
        """The share of this run's tiles found to be glass, which the network never saw."""
        return self.skipped_tiles / self.tiles if self.tiles else 0.0


def segment_tiles(model, image, out=None, config: Optional[SegmentConfig] = None, *, region=None, region0=None,
                  merger: Optional[Merger] = None, scheduler=None, pixel_size=None, override_pixel_size: bool = False,
                  progress=None, should_stop=None, **overrides) -> Generator[TileResult, None, SegmentResult]:
    """Segment one image at the model's resolution, yielding each tile as it finishes; returns a :class:`SegmentResult`.

    ``config`` (:class:`~genselfdiff.infer.config.SegmentConfig`; default: the engine's defaults)
    says how; keyword arguments named after its fields (``tile=``, ``tta=``, ...) override them.
    With ``out`` (a ``.ome.zarr`` path) the tiles are merged into an NGFF 0.5 label image of the
    source's level-0 shape (:class:`~genselfdiff.infer.merge.OmeZarrMerger`); rerunning the same
    call after an interruption computes (and yields) only the missing chunks. ``config.png``
    also writes ``out`` with ``.png`` (level-0 class ids) when the image has at most
    ``PNG_MAX_PIXELS``. Without ``out`` the tiles are the result (the returned ``labels`` is
    None); ``region`` (y0, x0, y1, x1) in processing-level pixels, or ``region0`` in level-0
    pixels, then limits the work to the tiles whose cores meet it (e.g. the part of the slide on
    screen). ``merger`` (a :class:`~genselfdiff.infer.merge.Merger`, e.g. a display pyramid) also
    receives every finished tile. ``scheduler`` (an address or a ``distributed.Client``) runs the
    chunks on a dask cluster, which yields no tiles (progress comes per chunk); it needs ``out``
    and an image path. ``config.tta`` averages each tile's class probabilities over its four
    flips (:data:`~genselfdiff.nn.model.FLIPS`; 4x the compute); ``config.probabilities`` also
    keeps them (in each tile, and with ``out`` in the output). Tiles come unit by unit, row by
    row. Stops cleanly, keeping finished chunks, when ``should_stop()`` is True. ``pixel_size``:
    the level-0 µm/px of the image (see :func:`genselfdiff.io.slides.open_slide`); an image whose
    size differs from the model's is resampled to it, and the labels still have the image's own
    level-0 shape. With ``out``, ``config.instances`` (or ``instances_of``, class names) also
    splits the classes into objects once the labels are written (:mod:`genselfdiff.objects.output`):
    ``result.objects``; without ``out``, from the labels of a ``merger`` that keeps them (an
    :class:`~genselfdiff.infer.merge.ArrayMerger` or a display pyramid).
    """
    from ..objects.output import add_objects

    cfg = segment_config(config, **overrides)
    _refuse_combinations(out, cfg, scheduler, region, region0, merger)
    t0 = time.perf_counter()
    plan = make_plan(model, image, cfg, region=region, region0=region0, pixel_size=pixel_size,
                     override_pixel_size=override_pixel_size)
    # A model with a geometry head hands its maps to the objects pass; without objects they are not computed.
    geometry = plan.objects is not None and plan.objects.uses_geometry
    mergers = [merger] if merger is not None else []
    units, label_image, done = plan.units, None, set()
    if out is not None:  # only the chunks that an earlier run left missing
        out = Path(out)
        label_image = _open_output(out, model, plan, cfg, geometry)
        done = label_image.done()
        units = [u for u in units if u.index not in done]
        mergers.insert(0, OmeZarrMerger(label_image, cfg.probabilities))
    if scheduler is None:
        state = yield from run_units(model, plan, units, mergers, batch=cfg.batch, probabilities=cfg.probabilities,
                                     tta=cfg.tta, amp=cfg.amp, threads=cfg.threads, progress=progress,
                                     should_stop=should_stop, geometry=geometry)
    else:
        from .dask import run_on_cluster

        state = run_on_cluster(model, plan, label_image, units, scheduler, cfg, progress=progress,
                               should_stop=should_stop)
    written = _finish_output(out, label_image, done, model, plan, cfg, state) if out is not None else {}
    result = _result(state, t0, plan, **written)
    labels = merger.labels if out is None and plan.objects is not None and not result.stopped else None
    maps = getattr(merger, "geometry", None) if labels is not None else None
    return add_objects(result, plan.objects, plan.slide, labels=labels, geometry=maps, tissue_mm2=plan.tissue_mm2,
                       png=cfg.png, png_max_pixels=PNG_MAX_PIXELS, progress=progress, should_stop=should_stop)


def _open_output(out: Path, model, plan: Plan, cfg: SegmentConfig, geometry: bool) -> LabelImage:
    """The OME-Zarr output ``out``, started, or reopened with its finished chunks when an earlier run
    made it with the same :func:`_run_description`."""
    run = _run_description(model, plan, cfg)
    n_classes = model.require_segmentation().classes
    return LabelImage.create(out, shape=plan.shape0, chunk=plan.chunk, levels=pyramid_levels(plan.shape0, plan.chunk),
                             run=run, probabilities=n_classes if cfg.probabilities else 0,
                             geometry=3 if geometry else 0)


def _finish_output(out: Path, label_image: LabelImage, done: set, model, plan: Plan, cfg: SegmentConfig,
                   state: dict) -> dict:
    """Once every chunk is written, the output's metadata and then its PNG; returns what
    :class:`SegmentResult` says about the output. ``done``: the chunks an earlier run had finished."""
    notes = []
    stopped = state.get("stopped", False) or len(label_image.done()) < len(plan.units)
    png_file = None
    if not stopped:
        slide = plan.slide
        names = model.classes or default_class_names(model.require_segmentation().classes)
        label_image.finish(slide.name, names, model.colors, slide.mpp,
                           info={"source": str(slide.path), "model": str(model.path)})
        if cfg.png:
            png_file, note = _write_png(out)
            notes += [note] if note else []
    labels = load_labels(out)[0] if not stopped else None
    return dict(labels=labels, path=out, chunks_computed=state.get("written", 0), chunks_resumed=len(done),
                png=png_file, notes=notes, stopped=stopped)


def _refuse_combinations(out, cfg: SegmentConfig, scheduler, region, region0, merger) -> None:
    """Options that need an output folder, or that make no sense with one, are refused, never ignored."""
    if out is None:
        if cfg.wants_objects and not hasattr(type(merger), "labels"):  # the class: an unstarted merger has none yet
            raise UserError("Objects are split from the whole image, so instances=True needs an output path "
                            "(out=...) or a merger that keeps the labels; segment() also splits them in memory.")
        if cfg.png:
            raise UserError("A PNG is written next to the OME-Zarr output, so png=True needs an output path (out=...).")
        if scheduler is not None:
            raise UserError("Segmenting on a dask cluster needs an output folder (out=...).")
    elif region is not None or region0 is not None:
        raise UserError(f"A region is a quick look that writes nothing; segment the whole image into {out} "
                        "or leave out the output path.")
    if scheduler is not None and merger is not None:
        raise UserError("Tiles computed on a dask cluster stay there; a merger needs a local run (no scheduler).")


def segment(model, image, out=None, config: Optional[SegmentConfig] = None, *, scheduler=None, pixel_size=None,
            override_pixel_size: bool = False, progress=None, should_stop=None, **overrides) -> SegmentResult:
    """Segment one image at the model's resolution: :func:`segment_tiles`, run to its end.

    ``config`` and keyword overrides as for :func:`segment_tiles`. Without ``out`` the tiles go
    to an :class:`~genselfdiff.infer.merge.ArrayMerger` and the labels come back as a numpy
    array at the processing level (the whole image in memory, for small images and tests);
    class probabilities are kept only in an output, so ``probabilities`` then needs ``out``.
    ``instances`` (or ``instances_of``, class names) also splits the classes into objects
    (:mod:`genselfdiff.objects.output`): ``result.objects``.
    """
    cfg = segment_config(config, **overrides)
    if out is None and cfg.probabilities:
        raise UserError("Class probabilities are stored in the OME-Zarr output, so probabilities=True needs an "
                        "output path (out=...).")
    merger = ArrayMerger() if out is None else None  # the cores partition the image: no bigger than the array
    result = drain(segment_tiles(model, image, out, cfg, merger=merger, scheduler=scheduler, pixel_size=pixel_size,
                                 override_pixel_size=override_pixel_size, progress=progress, should_stop=should_stop))
    if merger is not None:
        result.labels = merger.finish()
    return result


def _result(state: dict, t0: float, plan: Plan, labels=None, **kw) -> SegmentResult:
    seconds = time.perf_counter() - t0
    shape = tuple(labels.shape) if labels is not None else plan.shape
    return SegmentResult(labels=labels, shape=shape, tiles=state.get("done", 0), skipped_tiles=state.get("skipped", 0),
                         seconds=seconds, mpx_per_s=state.get("pixels", 0) / max(seconds, 1e-9) / 1e6,
                         level=plan.level, downsample=plan.downsample, mpp=plan.slide.mpp_at(plan.level),
                         **{"path": None, "stopped": state.get("stopped", False), **kw})


def _write_png(out: Path):
    """The finished output's level-0 class ids as ``OUT/NAME.png``, for images of at most ``PNG_MAX_PIXELS``."""
    from skimage.io import imsave

    from ..io.atomic import atomic_path

    path = png_path(out)
    labels = load_labels(out)[0]
    if labels.shape[0] * labels.shape[1] > PNG_MAX_PIXELS:
        return None, f"{path.name} not written: the image has more than {PNG_MAX_PIXELS // 10**6} Mpx."
    labels = labels.compute(**LOCAL)
    with atomic_path(path) as tmp:
        imsave(tmp, labels, check_contrast=False)
    return path, None


def model_fingerprint(model) -> str:
    """Identifies the weights (so a rerun with another model does not resume an old output)."""
    import torch

    h = hashlib.sha1()
    for k, v in sorted(model.net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run_description(model, plan: Plan, cfg: SegmentConfig) -> dict:
    """Everything that decides an output's pixels: a rerun that differs in any of them starts afresh."""
    return {"model": model_fingerprint(model), "classes": list(model.classes), "tile": plan.tile,
            "overlap": plan.overlap, "skip_background": bool(cfg.skip_background),
            "probabilities": bool(cfg.probabilities), "tta": bool(cfg.tta),
            "level": plan.level, "source_shape": list(plan.shape0), "processing_shape": list(plan.shape)}


# --- many images -------------------------------------------------------------------------------

def segment_batch(model, images, out_dir, config: Optional[SegmentConfig] = None, *, progress=None,
                  should_stop=None, **kw) -> list:
    """Segment each image into ``out_dir/NAME.ome.zarr``; a bad image is reported and the rest go on.

    ``model`` is a :class:`~genselfdiff.nn.model.Model` or a checkpoint path (loaded on
    ``config.device``). ``config`` and keyword overrides as for :func:`segment_tiles`, which also
    takes ``scheduler``, ``pixel_size`` and ``override_pixel_size`` here. Returns
    ``[(image, SegmentResult or error message)]``; stops before the next image when asked.
    """
    from ..io.files import image_stem
    from ..nn.model import Model, load_model

    run_kw = {k: kw.pop(k) for k in ("scheduler", "pixel_size", "override_pixel_size") if k in kw}
    cfg = segment_config(config, **kw)
    if not isinstance(model, Model):
        model = load_model(model, cfg.device)
    check_model(model, cfg)  # a problem of every image stops here, before any is opened
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress, stop = resolve(progress, should_stop)
    results = []
    for image in images:
        if stop():
            break
        name = image_stem(image) if isinstance(image, (str, Path)) else getattr(image, "name", "image")

        def named(p, name=name):  # one progress stage per image
            progress(replace(p, stage=f"{STAGE} {name}"))

        try:
            r = segment(model, image, zarr_path(out_dir, name), cfg, progress=named, should_stop=stop, **run_kw)
        except UserError as e:
            results.append((image, str(e)))
            continue
        results.append((image, r))
        if r.stopped:
            break
    return results
