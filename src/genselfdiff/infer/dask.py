"""Segmentation on a dask.distributed cluster: one task per missing output chunk.

Each task opens the slide and loads the model itself (a worker keeps the last few of
each, bounded, so a long-lived worker serving many runs does not grow), runs the chunk
through :func:`pipeline.run_units` and writes it with an :class:`~.merge.OmeZarrMerger`;
zarr 3 has no locks, and one writer per chunk is what makes that safe. The client keeps a bounded window of tasks in flight,
so stopping cancels little.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..errors import UserError
from ..io.omezarr import LabelImage
from ..progress import Progress, drain, resolve
from .config import SegmentConfig
from .merge import OmeZarrMerger
from .pipeline import STAGE, run_units
from .plan import Plan, make_plan

MODELS_KEPT = 2  # models a worker keeps loaded (a GPU holds a few, not one per run ever seen)
PLANS_KEPT = 8  # opened slides with their tissue maps
COUNTS = ("done", "skipped", "pixels", "written")


class _Recent:
    """A small least-recently-used cache, safe across a worker's threads."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            value = self.items[key] = make()
            while len(self.items) > self.size:
                self.items.popitem(last=False)
            return value


_MODELS = _Recent(MODELS_KEPT)
_PLANS = _Recent(PLANS_KEPT)


def model_payload(model) -> dict:
    """An in-memory model (one without a checkpoint file) as a checkpoint's dict, which a worker
    loads as it would the file (:func:`~genselfdiff.nn.model.load_model`): the weights and
    everything that decides how it is run, its input scaling included."""
    return {"kind": "segmentation", "net": model.net_config.to_dict(),
            "state_dict": {k: v.cpu() for k, v in model.net.state_dict().items()},
            "classes": list(model.classes), "colors": list(model.colors), "resolution": model.resolution.to_dict(),
            "config": {"patch": model.patch}, "normalization": model.normalization, "stain": model.stain}


def worker_device(device: str, worker=None) -> str:
    """The device a dask worker runs the network on.

    ``device`` as given, except ``"auto"`` on a worker that sees several CUDA GPUs: there each
    worker takes its own, ``cuda:(i % count)`` with ``i`` the worker's number (LocalCluster and
    ``dask worker --nworkers`` name workers 0, 1, ...; other names are hashed), instead of all
    landing on ``cuda:0``. A worker started with one visible GPU (dask-cuda) keeps "auto".
    """
    import zlib

    import torch

    if (device or "auto").lower() != "auto" or not torch.cuda.is_available():
        return device
    count = torch.cuda.device_count()
    if count <= 1:
        return device
    if worker is None:
        from distributed import get_worker

        worker = get_worker()
    name = getattr(worker, "name", None)
    tail = "" if name is None else str(name).rsplit("-", 1)[-1]  # name 0 is a number, not "no name"
    index = int(tail) if tail.isdigit() else zlib.crc32(str(getattr(worker, "address", name)).encode())
    return f"cuda:{index % count}"


def _source_key(source):
    return source if isinstance(source, str) else id(source)


def worker_model(source, device: str, amp: bool = True):
    """The model of a checkpoint path or a payload, loaded once per worker while it is recent."""
    from ..nn.model import load_model

    model = _MODELS.get((_source_key(source), device), lambda: load_model(source, device))
    model.amp = amp
    return model


def worker_plan(spec: dict, model, model_key) -> Plan:
    """Open the slide on the worker (tifffile's zarr store cannot be pickled) and plan it once;
    ``spec["mpp"]``: the level-0 µm/px the client settled on."""

    def make():
        return make_plan(model, spec["image"], pixel_size=spec.get("mpp"), override_pixel_size=True, tile=spec["tile"],
                         overlap=spec["overlap"], skip_background=spec["skip_background"], chunk=spec["chunk"])

    key = (spec["image"], model_key, spec["tile"], spec["overlap"], spec["skip_background"], spec["chunk"],
           spec.get("mpp"))
    return _PLANS.get(key, make)


def segment_chunk(spec: dict, index: tuple, model_source) -> dict:
    """A dask task: compute and write one output chunk. Runs on a worker; returns counts."""
    device = worker_device(spec["device"])
    model = worker_model(model_source, device, spec["amp"])
    plan = worker_plan(spec, model, (_source_key(model_source), device))
    units = [u for u in plan.units if u.index == tuple(index)]
    merger = OmeZarrMerger(LabelImage.open(spec["out"]), spec["probabilities"])
    tiles = run_units(model, plan, units, [merger], batch=spec["batch"], probabilities=spec["probabilities"],
                      tta=spec["tta"], geometry=spec.get("geometry", False))
    state = drain(tiles)
    return {k: state.get(k, 0) for k in COUNTS}


def _client(scheduler):
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        return Client(scheduler, timeout="20s"), True
    except (OSError, TimeoutError) as e:
        raise UserError(f"Cannot reach the dask scheduler at {scheduler} ({e}); start it or check the address.") from None


def run_on_cluster(model, plan: Plan, image: LabelImage, todo: list, scheduler, config: SegmentConfig, *,
                   progress=None, should_stop=None) -> dict:
    """Run the missing chunks ``todo`` as tasks on a dask cluster; returns the run's counts.

    The workers run the network on ``config.device`` (see :func:`worker_device`). Progress is
    reported per chunk (no tiles come back to the client)."""
    from distributed import as_completed

    progress, should_stop = resolve(progress, should_stop)
    slide = plan.slide
    if not slide.path.exists():
        raise UserError("Segmenting on a dask cluster needs an image file that the workers can open.")
    client, own = _client(scheduler)
    state = dict(done=0, skipped=0, pixels=0, written=0, stopped=False)
    total = sum(len(u.tiles) for u in todo)
    state["total"] = total
    t0 = time.perf_counter()
    try:
        if model.path is not None and Path(model.path).is_file():
            source = str(Path(model.path).resolve())
        else:
            [source] = client.scatter([model_payload(model)], broadcast=True)
        amp = model.amp if config.amp is None else bool(config.amp)
        spec = {"image": str(slide.path.resolve()), "out": str(image.path.resolve()), "tile": plan.tile,
                "overlap": plan.overlap, "chunk": plan.chunk, "skip_background": config.skip_background,
                "batch": config.batch, "probabilities": config.probabilities, "tta": config.tta, "amp": amp,
                "device": config.device, "mpp": slide.mpp, "geometry": bool(image.geometry)}
        window = max(2, 2 * len(client.scheduler_info().get("workers", {})))
        pending = iter(todo)
        ac = as_completed()
        for u in _take(pending, window):
            ac.add(client.submit(segment_chunk, spec, u.index, source, pure=False))
        for fut in ac:
            counts = fut.result()
            for k in COUNTS:
                state[k] += counts[k]
            progress(Progress(STAGE, state["done"], total,
                              {"Mpx/s": state["pixels"] / max(time.perf_counter() - t0, 1e-9) / 1e6}))
            if should_stop():
                state["stopped"] = True
                for other in list(ac.futures):
                    other.cancel()
                break
            for u in _take(pending, 1):
                ac.add(client.submit(segment_chunk, spec, u.index, source, pure=False))
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
