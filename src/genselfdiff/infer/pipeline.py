"""The segmentation pipeline: three stages at once, so that reading and writing hide behind the network.

    reader thread    decodes the next unit's window once, cuts tiles, skips glass,
                     stacks batches (in pinned memory on CUDA)
    this thread      runs the network (bf16 autocast where it pays: model.amp_enabled),
                     optionally over the four flips of each tile (``tta``), keeps each tile's core
    mergers          each finished tile goes to the mergers (:mod:`merge`): an array, a display
                     pyramid, or an OME-Zarr output whose writer thread upsamples a finished unit
                     to level 0 and writes its chunks

A *unit* is one level-0 output chunk and the tiles that cover it (:class:`~.tiling.Unit`, listed by
the :class:`~.plan.Plan`). Memory
stays flat: at most a few units are alive at once, whatever the slide size. Batches never
span units: which tiles share a forward pass depends only on the output chunk, so a resumed
run computes every chunk exactly as an uninterrupted one (bf16 and some CPU kernels round
differently with the batch's size). :func:`run_units` is the one entry: a generator of
finished tiles.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from ..progress import Progress, resolve
from .plan import LOCAL, Plan, reading

STAGE = "segment"


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
    geometry: Optional[np.ndarray] = None  # float32 (3, h, w): foreground probability, horizontal, vertical map


_END = object()


def crop(region: np.ndarray, origin: tuple, window: tuple, shape: tuple) -> np.ndarray:
    """The window out of a read region, reflect-padded where it leaves an image smaller than a tile."""
    h, w = shape
    y0, x0, y1, x1 = window
    part = region[y0 - origin[0] : min(y1, h) - origin[0], x0 - origin[1] : min(x1, w) - origin[1]]
    pad_y, pad_x = y1 - min(y1, h), x1 - min(x1, w)
    if pad_y or pad_x:
        mode = "reflect" if min(part.shape[:2]) > 1 else "edge"
        part = np.pad(part, ((0, pad_y), (0, pad_x), (0, 0)), mode=mode)
    return part


class Reader(threading.Thread):
    """Reads units ahead of the network: ("unit", Unit, glass tiles) then ("batch", [(unit, tile)], array) items."""

    def __init__(self, plan: Plan, units: list, batch: int, pin: bool, depth: int = 3):
        super().__init__(daemon=True, name="genselfdiff-reader")
        self.plan, self.units, self.batch, self.pin = plan, units, batch, pin
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
        plan, pending = self.plan, []  # (unit, tile, pixels) of the batch being filled
        for unit in self.units:
            tiles = unit.tiles
            if not tiles:
                continue
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
                pending.append((unit, t, crop(region, (y0, x0), t.window, plan.shape)))
                if len(pending) == self.batch:
                    if not self.put(self._pack(pending)):
                        return
                    pending = []
            if pending:  # a batch ends with its unit (see the module docstring)
                if not self.put(self._pack(pending)):
                    return
                pending = []

    def _read(self, y0, x0, y1, x1) -> np.ndarray:
        with reading(self.plan.slide, f"level {self.plan.level} near pixel ({y0}, {x0})"):
            pixels = np.asarray(self.plan.array[y0:y1, x0:x1].compute(**LOCAL))
        return pixels if self.plan.stain is None else self.plan.stain.apply(pixels)

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


class Predictor:
    """Runs batches on the model's device; on CUDA one batch stays in flight while the last is unpacked."""

    def __init__(self, model, probabilities: bool, tta: bool = False, amp: Optional[bool] = None,
                 geometry: bool = False):
        import torch

        self.torch = torch
        self.net = model.require_segmentation()
        self.device = model.device
        self.normalization = getattr(model, "normalization", "[-1, 1]")
        self.amp = model.amp if amp is None else bool(amp)
        self.probabilities = probabilities
        self.tta = tta
        self.geometry = geometry  # also the foreground probability and the maps of a geometry head
        self.cuda = self.device.type == "cuda"

    def launch(self, x):
        from ..nn.model import autocast, class_probabilities, class_probabilities_and_geometry, to_input

        torch = self.torch
        geometry = None
        with torch.inference_mode():
            # to_input is the one normalisation; .numpy() of a pinned tensor keeps its pinned memory.
            inp = to_input(x.numpy(), self.device, self.normalization)
            if self.geometry:
                probs, maps = class_probabilities_and_geometry(self.net, inp, amp=self.amp, tta=self.tta)
                labels = probs.argmax(1).to(torch.uint8)
                geometry = torch.cat([1.0 - probs[:, :1], maps], 1)
                probs = probs if self.probabilities else None
            elif self.probabilities or self.tta:
                probs = class_probabilities(self.net, inp, amp=self.amp, tta=self.tta)
                labels = probs.argmax(1).to(torch.uint8)
                probs = probs if self.probabilities else None
            else:  # the softmax is monotonic: the argmax of the logits is the same labels, without it
                with autocast(inp.device, self.amp):
                    logits = self.net(inp)
                labels, probs = self.labels_of(logits), None
            if self.cuda:
                labels = labels.to("cpu", non_blocking=True)
                probs = probs.to("cpu", non_blocking=True) if probs is not None else None
                geometry = geometry.to("cpu", non_blocking=True) if geometry is not None else None
                event = torch.cuda.Event()
                event.record()
                # ``x`` travels with the result: its pinned memory must outlive the async copy.
                return labels, probs, event, x, geometry
        return (labels.cpu(), (probs.cpu() if probs is not None else None), None, x,  # CPU: no-ops; MPS: copies
                geometry.cpu() if geometry is not None else None)

    def labels_of(self, logits):
        """uint8 class ids (N, H, W) of the logits, compared in fp32 (as the softmax would be)."""
        return logits.float().argmax(1).to(self.torch.uint8)

    @staticmethod
    def collect(launched):
        """(labels, probabilities or None, geometry or None) as numpy arrays."""
        labels, probs, event, _, geometry = launched
        if event is not None:
            event.synchronize()
        return (labels.numpy(), (probs.numpy() if probs is not None else None),
                geometry.numpy() if geometry is not None else None)


@contextmanager
def cpu_threads(threads: Optional[int]):
    """torch's CPU thread count set to ``threads`` (None: left as it is) for the duration, then restored."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stream(model, plan: Plan, units: list, *, batch: int, probabilities: bool, tta: bool = False,
           amp: Optional[bool] = None, threads: Optional[int] = None, progress=None, should_stop=None, state=None,
           geometry: bool = False) -> Iterator[TileResult]:
    """Every tile of ``units`` as a :class:`TileResult`, in an order where each unit's last tile says so.

    ``threads``: torch's CPU threads while the network runs (None: torch's own setting).
    ``geometry``: each tile also carries its geometry (a model with a geometry head)."""
    with cpu_threads(threads):
        yield from _stream(model, plan, units, batch=batch, probabilities=probabilities, tta=tta, amp=amp,
                           progress=progress, should_stop=should_stop, state=state, geometry=geometry)


def _stream(model, plan: Plan, units: list, *, batch: int, probabilities: bool, tta: bool, amp: Optional[bool],
            progress, should_stop, state, geometry: bool = False) -> Iterator[TileResult]:
    progress, should_stop = resolve(progress, should_stop)
    state = state if state is not None else {}
    total = sum(len(u.tiles) for u in units)
    left = {u.index: len(u.tiles) for u in units}  # tiles not yet finished, per unit
    state.update(done=0, skipped=0, pixels=0, stopped=False, total=total)
    predictor = Predictor(model, probabilities, tta, amp, geometry)
    reader = Reader(plan, units, batch, pin=predictor.cuda)
    n_classes = predictor.net.classes
    t0 = time.perf_counter()
    level, ds = plan.level, plan.downsample

    def result(unit, t, labels, probs, skipped, geom=None):
        left[unit.index] -= 1
        state["done"] += 1
        state["skipped"] += skipped
        state["pixels"] += labels.size
        elapsed = max(time.perf_counter() - t0, 1e-9)
        r = TileResult(t.core[0], t.core[1], labels, level, ds, state["done"], total, probs, skipped,
                       unit.index, left[unit.index] == 0, geom)
        progress(Progress(STAGE, state["done"], total, {"Mpx/s": state["pixels"] / elapsed / 1e6}, r))
        return r

    def background(t):
        h, w = t.core[2] - t.core[0], t.core[3] - t.core[1]
        probs = None
        if probabilities:
            probs = np.zeros((n_classes, h, w), np.float32)
            probs[0] = 1.0
        return np.zeros((h, w), np.uint8), probs, (np.zeros((3, h, w), np.float32) if geometry else None)

    def unpack(launched, members):
        labels, probs, geom = predictor.collect(launched)
        for b, (unit, t) in enumerate(members):
            oy, ox = t.offset
            h, w = t.core[2] - t.core[0], t.core[3] - t.core[1]
            p = probs[b, :, oy : oy + h, ox : ox + w] if probs is not None else None
            g = geom[b, :, oy : oy + h, ox : ox + w] if geom is not None else None
            yield result(unit, t, labels[b, oy : oy + h, ox : ox + w], p, False, g)

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
                    labels, probs, geom = background(t)
                    yield result(unit, t, labels, probs, True, geom)
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


def run_units(model, plan: Plan, units: list, mergers=(), *, batch: int, probabilities: bool, tta: bool = False,
              amp: Optional[bool] = None, threads: Optional[int] = None, progress=None, should_stop=None,
              geometry: bool = False) -> Iterator[TileResult]:
    """Yield every finished tile of ``units`` (:class:`~.tiling.Unit`), pasting it into each of ``mergers`` first (:mod:`merge`).

    Returns (as a generator's value) the run's counts: ``done``, ``skipped``, ``pixels``,
    ``total``, ``written`` (output chunks the mergers wrote), ``stopped``, ``seconds``.
    """
    state = {"written": 0}
    for m in mergers:
        m.start(plan)
    try:
        for r in stream(model, plan, units, batch=batch, probabilities=probabilities, tta=tta, amp=amp,
                        threads=threads, progress=progress, should_stop=should_stop, state=state, geometry=geometry):
            for m in mergers:
                m.paste(r)
            yield r
    finally:
        for m in mergers:
            m.close()
        state["written"] = sum(getattr(m, "written", 0) for m in mergers)
    return state
