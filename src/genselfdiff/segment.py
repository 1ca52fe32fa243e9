"""Whole-slide segmentation: lazy, tiled, streamed to OME-Zarr, resumable, optionally on a dask cluster.

The slide is read at the level the model was trained at (:meth:`Slide.level_for`), cut
into work units (one per level-0 output chunk) and tiles with a halo (:mod:`tiling`).
Three stages run at once so that reading and writing hide behind the network:

    reader thread    decodes the next unit's window once, cuts tiles, skips glass,
                     stacks batches (in pinned memory on CUDA)
    this thread      runs the network (bf16 autocast where it pays: model.amp_enabled),
                     optionally over the four flips of each tile (``tta``), keeps each tile's core
    writer thread    upsamples a finished unit to level 0 and writes its chunks (:mod:`omezarr`)

Memory stays flat: at most a few units are alive at once, whatever the slide size. With
``scheduler`` the units run on a dask.distributed cluster instead: each task opens the
slide and loads the model itself and writes its own chunks.

The public API: :func:`segment_tiles` (a generator of finished tiles, for live views),
:func:`segment` (one image, optionally to OME-Zarr), :func:`segment_batch` (many images,
errors per image) and :func:`load_labels` (read an output back).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from . import tiling
from .errors import UserError
from .labels import load_labels  # noqa: F401  (re-exported: the public way to read an output back)
from .omezarr import LabelImage
from .progress import Progress, resolve
from .slides import as_slide  # noqa: F401  (re-exported: images of every kind become Slides)

PNG_MAX_PIXELS = 100_000_000  # --png is skipped above this many level-0 pixels
MPP_TOLERANCE = 1.5  # a level more than this factor off the model's µm/px is a mismatch
STAGE = "segment"
# Reads happen in this process, never on a dask.distributed Client that happens to be the
# default: a slide's tifffile store cannot be pickled, and the data is needed here anyway.
LOCAL = {"scheduler": "threads"}


@dataclass
class TileResult:
    """One finished tile: class ids of its core, in processing-level pixels."""

    y: int  # top-left of the core, processing level
    x: int
    labels: np.ndarray  # uint8 (h, w) class ids of the core
    level: int  # pyramid level the model ran on
    downsample: float  # processing level -> level 0
    done: int  # tiles finished so far in this run
    total: int  # tiles this run will compute
    probabilities: Optional[np.ndarray] = None  # float32 (classes, h, w) when asked for
    skipped: bool = False  # no tissue: labels are background without running the network
    chunk: tuple = ()  # level-0 output chunk (row, col) the tile belongs to
    chunk_done: bool = False  # the last tile of its chunk


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
    objects: object = None  # objects.ObjectResult when asked for instances


# --- planning ------------------------------------------------------------------------------

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


def _input_slide(model, image, pixel_size, override: bool):
    """The image as a Slide at its pixel size; the user hears when that size is unknown to a
    model that knows its own."""
    from .pixelsize import tell, unknown_note

    slide = as_slide(image, pixel_size, override)
    for note in slide.notes:
        tell(note)
    if slide.mpp is None and model.resolution.mpp is not None:
        tell(unknown_note([str(slide.path)]))
    return slide


def make_plan(model, slide, *, tile=None, overlap=None, skip_background=True, chunk=None) -> Plan:
    """Check the model against the image and choose level, tiles and output chunks."""
    from .tissue import TissueMap

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


# --- the pipeline: read ahead, predict, hand finished units on -------------------------------

@dataclass
class _Unit:
    index: tuple
    rect0: tuple
    rect: tuple
    tiles: list
    pending: int = 0


_END = object()


def _crop(region: np.ndarray, origin: tuple, window: tuple, shape: tuple) -> np.ndarray:
    """The window out of a read region, reflect-padded where it leaves an image smaller than a tile."""
    h, w = shape
    y0, x0, y1, x1 = window
    part = region[y0 - origin[0] : min(y1, h) - origin[0], x0 - origin[1] : min(x1, w) - origin[1]]
    pad_y, pad_x = y1 - min(y1, h), x1 - min(x1, w)
    if pad_y or pad_x:
        mode = "reflect" if min(part.shape[:2]) > 1 else "edge"
        part = np.pad(part, ((0, pad_y), (0, pad_x), (0, 0)), mode=mode)
    return part


class _Reader(threading.Thread):
    """Reads units ahead of the network: ("unit", _Unit) then ("batch", [(unit, tile)], array) items."""

    def __init__(self, plan: Plan, units: list, region, batch: int, pin: bool, depth: int = 3):
        super().__init__(daemon=True, name="genselfdiff-reader")
        self.plan, self.units, self.region, self.batch, self.pin = plan, units, region, batch, pin
        self.queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run(self):
        try:
            self._run()
        except BaseException as e:  # handed to the consuming thread, which raises it
            self.put(("error", e))
        else:
            self.put(_END)

    def _run(self):
        plan, pending = self.plan, []
        for index, rect0, rect in self.units:
            tiles = plan.tiles(rect, self.region)
            if not tiles:
                continue
            unit = _Unit(index, rect0, rect, tiles, len(tiles))
            flags = [plan.has_tissue(t) for t in tiles]
            live = [t for t, f in zip(tiles, flags) if f]
            if not self.put(("unit", unit, [t for t, f in zip(tiles, flags) if not f])):
                return
            if not live:
                continue
            # One read per unit: the union of its windows (inside the image).
            h, w = plan.shape
            y0, x0 = min(t.window[0] for t in live), min(t.window[1] for t in live)
            y1, x1 = min(max(t.window[2] for t in live), h), min(max(t.window[3] for t in live), w)
            region = self._read(y0, x0, y1, x1)
            for t in live:
                pending.append((unit, t, _crop(region, (y0, x0), t.window, plan.shape)))
                if len(pending) == self.batch:
                    if not self.put(self._pack(pending)):
                        return
                    pending = []
        if pending:
            self.put(self._pack(pending))

    def _read(self, y0, x0, y1, x1) -> np.ndarray:
        with reading(self.plan.slide, f"level {self.plan.level} near pixel ({y0}, {x0})"):
            return np.asarray(self.plan.array[y0:y1, x0:x1].compute(**LOCAL))

    def _pack(self, items):
        import torch

        x = torch.from_numpy(np.stack([a for _, _, a in items]))
        if self.pin:
            x = x.pin_memory()
        return ("batch", [(u, t) for u, t, _ in items], x)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if item[0] == "error":
                raise item[1]
            yield item

    def close(self):
        self.stop.set()
        while True:  # unblock a reader waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.join(timeout=10)


class _Predictor:
    """Runs batches on the model's device; on CUDA one batch stays in flight while the last is unpacked."""

    def __init__(self, model, probabilities: bool, tta: bool = False):
        import torch

        self.torch = torch
        self.net = model.require_segmentation()
        self.device = model.device
        self.normalization = getattr(model, "normalization", "[-1, 1]")
        self.amp = model.amp
        self.probabilities = probabilities
        self.tta = tta
        self.cuda = self.device.type == "cuda"

    def launch(self, x):
        from .model import class_probabilities, to_input

        torch = self.torch
        with torch.inference_mode():
            # to_input is the one normalisation; .numpy() of a pinned tensor keeps its pinned memory.
            inp = to_input(x.numpy(), self.device, self.normalization)
            probs = class_probabilities(self.net, inp, amp=self.amp, tta=self.tta)
            labels = probs.argmax(1).to(torch.uint8)
            probs = probs if self.probabilities else None
            if self.cuda:
                labels = labels.to("cpu", non_blocking=True)
                probs = probs.to("cpu", non_blocking=True) if probs is not None else None
                event = torch.cuda.Event()
                event.record()
                # ``x`` travels with the result: its pinned memory must outlive the async copy.
                return labels, probs, event, x
        return labels.cpu(), (probs.cpu() if probs is not None else None), None, x  # CPU: no-ops; MPS: copies

    @staticmethod
    def collect(launched):
        labels, probs, event, _ = launched
        if event is not None:
            event.synchronize()
        return labels.numpy(), (probs.numpy() if probs is not None else None)


def _stream(model, plan: Plan, units: list, *, batch: int, probabilities: bool, tta: bool = False, region=None,
            progress=None, should_stop=None, state=None) -> Iterator[TileResult]:
    """Every tile of ``units`` as a :class:`TileResult`, in an order where each unit's last tile says so."""
    progress, should_stop = resolve(progress, should_stop)
    state = state if state is not None else {}
    total = sum(len(plan.tiles(rect, region)) for _, _, rect in units)
    state.update(done=0, skipped=0, pixels=0, stopped=False, total=total)
    predictor = _Predictor(model, probabilities, tta)
    reader = _Reader(plan, units, region, batch, pin=predictor.cuda)
    n_classes = predictor.net.classes
    t0 = time.perf_counter()
    level, ds = plan.level, plan.downsample

    def result(unit, t, labels, probs, skipped):
        unit.pending -= 1
        state["done"] += 1
        state["skipped"] += skipped
        state["pixels"] += labels.size
        elapsed = max(time.perf_counter() - t0, 1e-9)
        r = TileResult(t.core[0], t.core[1], labels, level, ds, state["done"], total, probs, skipped,
                       unit.index, unit.pending == 0)
        progress(Progress(STAGE, state["done"], total, {"Mpx/s": state["pixels"] / elapsed / 1e6}, r))
        return r

    def background(t):
        h, w = t.core[2] - t.core[0], t.core[3] - t.core[1]
        probs = None
        if probabilities:
            probs = np.zeros((n_classes, h, w), np.float32)
            probs[0] = 1.0
        return np.zeros((h, w), np.uint8), probs

    def unpack(launched, members):
        labels, probs = predictor.collect(launched)
        for b, (unit, t) in enumerate(members):
            oy, ox = t.offset
            h, w = t.core[2] - t.core[0], t.core[3] - t.core[1]
            p = probs[b, :, oy : oy + h, ox : ox + w] if probs is not None else None
            yield result(unit, t, labels[b, oy : oy + h, ox : ox + w], p, False)

    reader.start()
    in_flight = None
    try:
        for item in reader:
            if should_stop():
                state["stopped"] = True
                return
            if item[0] == "unit":
                _, unit, skipped = item
                for t in skipped:
                    labels, probs = background(t)
                    yield result(unit, t, labels, probs, True)
                continue
            _, members, x = item
            launched = (predictor.launch(x), members)
            if in_flight is not None:
                yield from unpack(*in_flight)
            in_flight = launched
        if in_flight is not None:
            yield from unpack(*in_flight)
            in_flight = None
        if should_stop() and state["done"] < total:
            state["stopped"] = True
    finally:
        reader.close()
        state["seconds"] = time.perf_counter() - t0


def segment_tiles(model, image, *, tile=None, overlap=None, batch: int = 8, skip_background: bool = True,
                  region=None, probabilities: bool = False, tta: bool = False, chunk=None, progress=None,
                  should_stop=None, pixel_size=None, override_pixel_size: bool = False) -> Iterator[TileResult]:
    """Yield finished tiles of ``image`` as the network produces them (for live views).

    ``region`` = (y0, x0, y1, x1) in processing-level pixels limits the work to the tiles
    whose cores meet it (e.g. the part of the slide on screen). Tiles come unit by unit,
    row by row. ``tta`` averages each tile's class probabilities over its four flips.
    Stops quietly when ``should_stop()`` returns True. ``pixel_size``: as for :func:`segment`.
    """
    slide = _input_slide(model, image, pixel_size, override_pixel_size)
    plan = make_plan(model, slide, tile=tile, overlap=overlap, skip_background=skip_background, chunk=chunk)
    region = tuple(int(v) for v in region) if region is not None else None
    yield from _stream(model, plan, plan.units(region), batch=batch, probabilities=probabilities, tta=tta,
                       region=region, progress=progress, should_stop=should_stop)


# --- one image -------------------------------------------------------------------------------

def model_fingerprint(model) -> str:
    """Identifies the weights (so a rerun with another model does not resume an old output)."""
    import torch

    h = hashlib.sha1()
    for k, v in sorted(model.net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run_description(model, plan: Plan, skip_background: bool, probabilities: bool, tta: bool) -> dict:
    return {"model": model_fingerprint(model), "classes": list(model.classes), "tile": plan.tile,
            "overlap": plan.overlap, "skip_background": bool(skip_background), "probabilities": bool(probabilities),
            "tta": bool(tta),
            "level": plan.level, "source_shape": list(plan.shape0), "processing_shape": list(plan.shape)}


def _level0(plan: Plan, unit: _Unit, labels: np.ndarray, probs: Optional[np.ndarray]):
    """A unit's processing-level buffers -> its level-0 chunk (nearest neighbour)."""
    (H, W), (h, w) = plan.shape0, plan.shape
    y0, x0, y1, x1 = unit.rect0
    if (H, W) == (h, w):
        return labels, probs
    rows = tiling.nearest_index(np.arange(y0, y1), H, h) - unit.rect[0]
    cols = tiling.nearest_index(np.arange(x0, x1), W, w) - unit.rect[1]
    lab = labels[rows][:, cols]
    return lab, (probs[:, rows][:, :, cols] if probs is not None else None)


class _Writer(threading.Thread):
    """Writes finished units to the label image in the background, in order."""

    def __init__(self, image: LabelImage, plan: Plan, depth: int = 2):
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
                unit, labels, probs, empty = job
                lab0, probs0 = _level0(self.plan, unit, labels, probs)
                self.image.write(unit.index, lab0, probs0, empty=empty and probs is None)
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


def _compute_units(model, plan: Plan, units: list, image: Optional[LabelImage], *, batch, probabilities,
                   tta=False, progress=None, should_stop=None, full: Optional[np.ndarray] = None,
                   state=None) -> dict:
    """Run ``units`` through the pipeline into ``image`` (chunks) or ``full`` (a processing-level array)."""
    state = state if state is not None else {}
    writer = _Writer(image, plan) if image is not None else None
    by_index = {u[0]: u for u in units}
    buffers = {}
    if writer:
        writer.start()
    try:
        for r in _stream(model, plan, units, batch=batch, probabilities=probabilities, tta=tta, progress=progress,
                         should_stop=should_stop, state=state):
            h, w = r.labels.shape
            if full is not None:
                full[r.y : r.y + h, r.x : r.x + w] = r.labels
                continue
            unit = by_index[r.chunk]
            if r.chunk not in buffers:
                uy0, ux0, uy1, ux1 = unit[2]
                probs = np.zeros((r.probabilities.shape[0], uy1 - uy0, ux1 - ux0), np.float32) if probabilities else None
                buffers[r.chunk] = [np.zeros((uy1 - uy0, ux1 - ux0), np.uint8), probs, True]
            buf = buffers[r.chunk]
            oy, ox = r.y - unit[2][0], r.x - unit[2][1]
            buf[0][oy : oy + h, ox : ox + w] = r.labels
            if probabilities:
                buf[1][:, oy : oy + h, ox : ox + w] = r.probabilities
            buf[2] = buf[2] and r.skipped
            if r.chunk_done:
                labels, probs, empty = buffers.pop(r.chunk)
                writer.submit((_Unit(unit[0], unit[1], unit[2], []), labels, probs, empty))
    finally:
        if writer:
            writer.finish()
            state["written"] = writer.written
    return state


def segment(model, image, out=None, *, tile=None, overlap=None, batch: int = 8, skip_background: bool = True,
            probabilities: bool = False, tta: bool = False, png: bool = False, chunk=None, progress=None,
            should_stop=None, scheduler=None, worker_device: str = "auto", pixel_size=None,
            override_pixel_size: bool = False, instances: bool = False, instances_of=None) -> SegmentResult:
    """Segment one image at the model's resolution.

    With ``out`` (a ``.ome.zarr`` path) the result is written there as an NGFF 0.5 label
    image of the source's level-0 shape; rerunning the same call after an interruption
    computes only the missing chunks. ``png`` also writes ``out`` with ``.png`` (level-0
    class ids) when the image has at most ``PNG_MAX_PIXELS``. ``scheduler`` (an address or
    a ``distributed.Client``) runs the chunks on a dask cluster; it needs ``out`` and an
    image path. ``tta`` averages the class probabilities of each tile over its four flips
    (:data:`~genselfdiff.model.FLIPS`; 4x the compute). Stops cleanly, keeping finished
    chunks, when ``should_stop()`` is True. ``pixel_size``: the level-0 µm/px of the image
    (see :func:`genselfdiff.slides.open_slide`); an image whose size differs from the model's
    is resampled to it, and the labels still have the image's own level-0 shape. ``instances``
    (or ``instances_of``, class names) also splits the classes into objects afterwards
    (:mod:`genselfdiff.objects`): ``result.objects``.
    """
    from .objects import add_objects, object_request

    t0 = time.perf_counter()
    request = object_request(model, instances_of) if instances or instances_of else None
    slide = _input_slide(model, image, pixel_size, override_pixel_size)
    plan = make_plan(model, slide, tile=tile, overlap=overlap, skip_background=skip_background, chunk=chunk)
    units = plan.units()
    base = dict(level=plan.level, downsample=plan.downsample)
    with_objects = dict(png=png, png_max_pixels=PNG_MAX_PIXELS, progress=progress, should_stop=should_stop)
    if out is None:
        if scheduler is not None:
            raise UserError("Segmenting on a dask cluster needs an output folder (out=...).")
        full = np.zeros(plan.shape, np.uint8)
        state = _compute_units(model, plan, units, None, batch=batch, probabilities=False, tta=tta,
                               progress=progress, should_stop=should_stop, full=full)
        return add_objects(_result(full, None, state, t0, chunks_computed=0, **base), request, slide, **with_objects)

    out = Path(out)
    n_classes = model.require_segmentation().classes
    levels = tiling.pyramid_levels(plan.shape0, plan.chunk)
    run = _run_description(model, plan, skip_background, probabilities, tta)
    label_image = LabelImage.create(out, shape=plan.shape0, chunk=plan.chunk, levels=levels, run=run,
                                    probabilities=n_classes if probabilities else 0)
    done = label_image.done()
    todo = [u for u in units if u[0] not in done]
    if scheduler is not None:
        state = _distributed(model, slide, plan, label_image, todo, scheduler, batch=batch,
                             probabilities=probabilities, tta=tta, skip_background=skip_background,
                             progress=progress, should_stop=should_stop, device=worker_device)
    else:
        state = _compute_units(model, plan, todo, label_image, batch=batch, probabilities=probabilities, tta=tta,
                               progress=progress, should_stop=should_stop)
    notes = []
    stopped = state.get("stopped", False) or len(label_image.done()) < len(units)
    png_path = None
    if not stopped:
        label_image.finish(slide.name, model.classes or [str(i) for i in range(n_classes)],
                           model.colors, slide.mpp, info={"source": str(slide.path), "model": str(model.path)})
        if png:
            png_path, note = _write_png(out, plan.shape0)
            notes += [note] if note else []
    labels = load_labels(out)[0] if not stopped else None
    return add_objects(_result(labels, out, state, t0, chunks_computed=state.get("written", 0),
                               chunks_resumed=len(done), png=png_path, notes=notes, stopped=stopped, **base),
                       request, slide, **with_objects)


def _result(labels, path, state, t0, **kw) -> SegmentResult:
    seconds = time.perf_counter() - t0
    return SegmentResult(labels=labels, path=path, shape=tuple(labels.shape) if labels is not None else (),
                         tiles=state.get("done", 0), skipped_tiles=state.get("skipped", 0), seconds=seconds,
                         mpx_per_s=state.get("pixels", 0) / max(seconds, 1e-9) / 1e6,
                         **{"stopped": state.get("stopped", False), **kw})


def png_path(out) -> Path:
    """``OUT/NAME.ome.zarr`` -> ``OUT/NAME.png``."""
    out = Path(out)
    name = out.name
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(name + ".png")


def _write_png(out: Path, shape0: tuple):
    from skimage.io import imsave

    from .atomic import atomic_path

    path = png_path(out)
    if shape0[0] * shape0[1] > PNG_MAX_PIXELS:
        return None, f"{path.name} not written: the image has more than {PNG_MAX_PIXELS // 10**6} Mpx."
    labels = load_labels(out)[0].compute(**LOCAL)
    with atomic_path(path) as tmp:
        imsave(tmp, labels, check_contrast=False)
    return path, None


# --- dask.distributed -------------------------------------------------------------------------

_WORKER_CACHE: dict = {}
_WORKER_LOCK = threading.Lock()


def _model_payload(model) -> dict:
    """What a worker needs to rebuild an in-memory model (when it has no checkpoint file)."""
    return {"net": model.net_config.to_dict(), "state_dict": {k: v.cpu() for k, v in model.net.state_dict().items()},
            "classes": list(model.classes), "colors": list(model.colors), "resolution": model.resolution.to_dict(),
            "patch": model.patch}


def _worker_model(source, device: str, amp: bool = True):
    """Load (once per worker process) the model named by a checkpoint path or a payload."""
    from .model import Model, load_model, pick_device

    key = ("model", source if isinstance(source, str) else id(source), device, amp)
    with _WORKER_LOCK:
        if key not in _WORKER_CACHE:
            if isinstance(source, str):
                _WORKER_CACHE[key] = load_model(source, device)
            else:
                from .config import NetConfig, Resolution
                from .unet import UNet, to_segmentation

                cfg = NetConfig.from_dict(source["net"])
                net = to_segmentation(UNet(NetConfig.from_dict({**cfg.to_dict(), "out_channels": 3})), cfg.out_channels)
                net.load_state_dict(source["state_dict"])
                dev = pick_device(device)
                _WORKER_CACHE[key] = Model(net=net.to(dev).eval(), kind="segmentation", net_config=net.unet.cfg,
                                           device=dev, classes=source["classes"], colors=source["colors"],
                                           resolution=Resolution(**source["resolution"]), patch=source["patch"])
            _WORKER_CACHE[key].amp = amp
        return _WORKER_CACHE[key]


def _worker_plan(image: str, model, tile, overlap, skip_background, chunk, mpp=None) -> Plan:
    """Open the slide on the worker (tifffile's zarr store cannot be pickled) and plan it once;
    ``mpp``: the level-0 µm/px the client settled on."""
    from .slides import open_slide

    key = ("plan", image, id(model), tile, overlap, skip_background, chunk, mpp)
    with _WORKER_LOCK:
        if key not in _WORKER_CACHE:
            slide = open_slide(image)
            slide.mpp = mpp if mpp is not None else slide.mpp
            _WORKER_CACHE[key] = make_plan(model, slide, tile=tile, overlap=overlap,
                                           skip_background=skip_background, chunk=chunk)
        return _WORKER_CACHE[key]


def segment_chunk(spec: dict, index: tuple, model_source) -> dict:
    """A dask task: compute and write one output chunk. Runs on a worker; returns counts."""
    model = _worker_model(model_source, spec["device"], spec["amp"])
    plan = _worker_plan(spec["image"], model, spec["tile"], spec["overlap"], spec["skip_background"], spec["chunk"],
                        spec.get("mpp"))
    units = [u for u in plan.units() if u[0] == tuple(index)]
    image = LabelImage.open(spec["out"])
    state = _compute_units(model, plan, units, image, batch=spec["batch"], probabilities=spec["probabilities"],
                           tta=spec["tta"])
    return {k: state.get(k, 0) for k in ("done", "skipped", "pixels", "written")}


def _client(scheduler):
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        return Client(scheduler, timeout="20s"), True
    except (OSError, TimeoutError) as e:
        raise UserError(f"Cannot reach the dask scheduler at {scheduler} ({e}); start it or check the address.") from None


def _distributed(model, slide, plan: Plan, image: LabelImage, todo: list, scheduler, *, batch, probabilities,
                 tta, skip_background, progress=None, should_stop=None, device: str = "auto") -> dict:
    """Run the missing chunks as tasks on a dask cluster; each task writes its own chunks."""
    from distributed import as_completed

    progress, should_stop = resolve(progress, should_stop)
    if not slide.path.exists():
        raise UserError("Segmenting on a dask cluster needs an image file that the workers can open.")
    client, own = _client(scheduler)
    state = dict(done=0, skipped=0, pixels=0, written=0, stopped=False)
    total = sum(len(plan.tiles(rect)) for _, _, rect in todo)
    t0 = time.perf_counter()
    try:
        if model.path is not None and Path(model.path).is_file():
            source = str(Path(model.path).resolve())
        else:
            [source] = client.scatter([_model_payload(model)], broadcast=True)
        spec = {"image": str(slide.path.resolve()), "out": str(image.path.resolve()), "tile": plan.tile,
                "overlap": plan.overlap, "chunk": plan.chunk, "skip_background": skip_background, "batch": batch,
                "probabilities": probabilities, "tta": tta, "amp": model.amp, "device": device, "mpp": slide.mpp}
        # A bounded window of tasks in flight, so stopping cancels little and the client stays light.
        window = max(2, 2 * len(client.scheduler_info().get("workers", {})))
        pending = iter(todo)
        ac = as_completed()
        for u in _take(pending, window):
            ac.add(client.submit(segment_chunk, spec, u[0], source, pure=False))
        for fut in ac:
            counts = fut.result()
            for k in ("done", "skipped", "pixels", "written"):
                state[k] += counts[k]
            progress(Progress(STAGE, state["done"], total,
                              {"Mpx/s": state["pixels"] / max(time.perf_counter() - t0, 1e-9) / 1e6}))
            if should_stop():
                state["stopped"] = True
                for other in list(ac.futures):
                    other.cancel()
                break
            for u in _take(pending, 1):
                ac.add(client.submit(segment_chunk, spec, u[0], source, pure=False))
    finally:
        if own:
            client.close()
    return state


def _take(it, n):
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


# --- many images -------------------------------------------------------------------------------

def segment_batch(model, images, out_dir, *, device: str = "auto", progress=None, should_stop=None, **kw) -> list:
    """Segment each image into ``out_dir/NAME.ome.zarr``; a bad image is reported and the rest go on.

    ``model`` is a :class:`~genselfdiff.model.Model` or a checkpoint path. Returns
    ``[(image, SegmentResult or error message)]``; stops before the next image when asked.
    """
    from .model import Model, load_model
    from .slides import image_stem

    if not isinstance(model, Model):
        model = load_model(model, device)
    model.require_segmentation()
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
            r = segment(model, image, out_dir / f"{name}.ome.zarr", progress=named, should_stop=stop, **kw)
        except UserError as e:
            results.append((image, str(e)))
            continue
        results.append((image, r))
        if r.stopped:
            break
    return results
