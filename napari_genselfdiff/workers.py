"""Running engine work without blocking napari, and showing its progress.

Training runs in a spawned process (:class:`JobRunner`): GPU memory comes back when it
ends, a crash cannot take napari down, and Stop sets a ``multiprocessing.Event`` that the
engine's ``should_stop`` reads, so it saves a valid checkpoint and returns. Updates come
back through a queue that a Qt timer drains. ``GENSELFDIFF_NAPARI_WORKER=thread`` runs
the same jobs in a thread instead (for environments where spawning fails).

Segmentation runs in napari's thread worker (:func:`segment_worker`): the engine pastes each
finished tile into a display pyramid, and the widget shows that pyramid as a Labels layer.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue as queue_module
import threading

from qtpy.QtCore import QObject, QTimer, Signal

from ._jobs import run_job

log = logging.getLogger(__name__)
POLL_MS = 100
_LIVE = {}  # id -> (worker, stop event) of every job started and not yet finished


class JobRunner(QObject):
    """One job at a time in a child process (or thread), reporting through Qt signals."""

    progressed = Signal(object)  # genselfdiff.progress.Progress
    finished = Signal(object)  # the job's result
    failed = Signal(str, bool)  # message, whether it is the user's to fix
    noted = Signal(str)  # a message from the engine for the user (e.g. the pixel size is unknown)

    def __init__(self, parent=None, mode=None):
        super().__init__(parent)
        self.mode = mode or os.environ.get("GENSELFDIFF_NAPARI_WORKER", "process")
        self._worker = self._queue = self._stop = None
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, name: str, spec: dict) -> None:
        if self.running:
            raise RuntimeError("a job is already running")
        if self.mode == "thread":
            self._queue, self._stop = queue_module.Queue(), threading.Event()
            worker = threading.Thread(target=run_job, args=(name, spec, self._queue, self._stop),
                                      name=f"genselfdiff-{name}", daemon=True)
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            self._queue, self._stop = ctx.Queue(), ctx.Event()
            # Not a daemon: the engine may start data-loader processes of its own.
            worker = ctx.Process(target=run_job, args=(name, spec, self._queue, self._stop),
                                 name=f"genselfdiff-{name}")
        worker.start()
        self._worker = worker
        _LIVE[id(worker)] = (worker, self._stop)
        self._timer.start()

    def stop(self) -> None:
        """Ask the job to stop; it saves what it has and finishes normally."""
        if self._stop is not None:
            self._stop.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop and wait; a process that does not end in ``timeout`` seconds is killed."""
        if self.running:
            _end(self._worker, self._stop, timeout)
            self._finish()

    def _poll(self) -> None:
        alive = self._worker.is_alive()  # read before draining: a message put before exit is queued
        while True:
            try:
                message = self._queue.get_nowait()
            except queue_module.Empty:
                break
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "progress":
                self.progressed.emit(message[1])
            elif kind == "note":
                self.noted.emit(message[1])
            elif kind == "done":
                self._finish()
                self.finished.emit(message[1])
                return
            elif kind == "error":
                _, text, is_user, trace = message
                if trace:
                    log.error("genselfdiff job failed:\n%s", trace)
                self._finish()
                self.failed.emit(text, is_user)
                return
        if not alive:
            code = getattr(self._worker, "exitcode", None)
            self._finish()
            self.failed.emit(f"The worker process ended unexpectedly (exit code {code}); "
                             "it may have run out of memory.", False)

    def _finish(self) -> None:
        self._timer.stop()
        if self._worker is not None:
            _LIVE.pop(id(self._worker), None)
            if self.mode != "thread":
                self._worker.join(5)
        self._worker = None


def _end(worker, stop, timeout: float) -> None:
    """Ask a job to stop and wait; a process still running after ``timeout`` seconds is killed."""
    stop.set()
    worker.join(timeout)
    if hasattr(worker, "terminate") and worker.is_alive():
        worker.terminate()
        worker.join(5)


@atexit.register
def _stop_all_jobs():
    """Closing napari mid-training stops the job (which saves its checkpoint) instead of
    leaving multiprocessing to wait for the whole training budget. Runs before
    multiprocessing's own exit handler (registered earlier; atexit runs last-in first-out)."""
    for worker, stop in list(_LIVE.values()):
        _end(worker, stop, 30)


class ProgressView:
    """A job's progress in the widget's QProgressBar/QLabel and in napari's activity bar."""

    def __init__(self, bar, label):
        self.bar, self.label, self._napari = bar, label, None

    def start(self, description: str) -> None:
        from napari.utils import progress

        self.close()
        self._napari = progress(total=0, desc=description)
        self.bar.setRange(0, 0)  # busy until the first update says how much there is
        self.bar.setVisible(True)
        self.label.setText(description)

    def update(self, p, text: str = "") -> None:
        total = int(p.total or 0)
        self.bar.setRange(0, total)
        self.bar.setValue(min(int(p.done), total) if total else 0)
        self.label.setText(text or f"{p.stage}: {p.done}" + (f" / {total}" if total else ""))
        bar = self._napari  # a local: napari may process events (and close it) while updating
        if bar is not None:
            if total and bar.total != total:
                bar.total = total
            bar.set_description(p.stage)
            bar.update(int(p.done) - bar.n)

    def close(self, text: str = None) -> None:
        if self._napari is not None:
            self._napari.close()
            self._napari = None
        self.bar.setVisible(False)  # only a running job has a bar
        if text is not None:
            self.label.setText(text)


def segment_worker(model_path: str, items: list, config, out_dir=None):
    """A napari thread worker segmenting ``items`` one after the other, and its stop event.

    ``config`` is the run's :class:`~genselfdiff.infer.config.SegmentConfig` (the model is loaded
    on ``config.device``). ``items`` are dicts: ``key`` (a name), ``image`` (a Slide) and
    optionally ``region0`` (y0, x0, y1, x1 in level-0 pixels). Each image's tiles go to a display
    pyramid (:class:`~genselfdiff.infer.merge.PyramidMerger`) in the engine. The worker yields
    ``("model", Model)``, then per item ``("tile", key, TileResult, merger)`` as tiles finish
    (the merger holds them all) and ``("end", key, SegmentResult)``, or ``("failed", key,
    message)`` for an image the model cannot segment (the batch goes on). With ``out_dir`` each
    result is also written to ``out_dir/KEY.ome.zarr`` by the engine. With ``config.instances``
    the worker also yields ``("objects", key, ids, level)`` before ``"end"``: the object ids
    (level 0 with ``out_dir``, else the processing level ``level``).
    """
    from napari.qt.threading import thread_worker

    stop = threading.Event()

    @thread_worker(ignore_errors=True)  # the widget reports errors itself (errored signal)
    def work():
        from genselfdiff.errors import UserError
        from genselfdiff.infer.merge import PyramidMerger
        from genselfdiff.infer.segment import segment_tiles
        from genselfdiff.io.outputs import zarr_path
        from genselfdiff.nn.model import load_model

        model = load_model(model_path, config.device)
        model.require_segmentation()
        yield ("model", model)
        for item in items:
            if stop.is_set():
                return
            key, image = item["key"], item["image"]
            out = zarr_path(out_dir, key) if out_dir is not None else None
            merger = PyramidMerger()
            try:
                tiles = segment_tiles(model, image, out, config, merger=merger, region0=item.get("region0"),
                                      should_stop=stop.is_set)
                result = yield from _tagged(key, tiles, merger)
                if result.objects is not None and result.objects.ids is not None:  # level 0 when written, else the merger's
                    yield ("objects", key, result.objects.ids, 0 if result.objects.path is not None else result.level)
                yield ("end", key, result)
            except UserError as e:
                yield ("failed", key, str(e))

    return work(), stop


def _tagged(key, tiles, merger):
    """The engine's finished tiles as ``("tile", key, tile, merger)`` messages; returns the engine's result."""
    while True:
        try:
            tile = next(tiles)
        except StopIteration as end:
            return end.value
        yield ("tile", key, tile, merger)
