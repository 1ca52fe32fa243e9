"""The long jobs the widgets start, as plain functions of a picklable ``spec``.

They run in a spawned process (or a thread, see :mod:`napari_genselfdiff.workers`) and
report through a queue, so this module imports neither Qt nor napari: a spawned child
loads only the engine. Every job is ``job(spec, progress, should_stop) -> result``.
"""

from __future__ import annotations

import dataclasses
import traceback

import numpy as np

PAYLOAD_LIMIT = 16 * 2**20  # bytes; larger progress payloads are not sent to the UI
PLAIN = (str, int, float, bool, type(None), np.generic)


def _budget(spec) -> dict:
    return {spec["budget_unit"]: spec["budget"]} if spec.get("budget") else {}


def pretrain_job(spec, progress, should_stop):
    from genselfdiff.train.config import PretrainConfig
    from genselfdiff.train.pretrain import pretrain

    config = PretrainConfig.from_preset(spec["preset"], **_budget(spec))
    return pretrain(spec["sources"], spec["out"], config, device=spec["device"],
                    resume=spec.get("resume", False), progress=progress, should_stop=should_stop,
                    pixel_size=spec.get("pixel_size"))


def finetune_job(spec, progress, should_stop):
    from genselfdiff import FinetuneConfig
    from genselfdiff.io.pixelsize import Resolution
    from genselfdiff.train.finetune import Preview, finetune

    config = FinetuneConfig.from_preset(spec["preset"], sparse=spec["sparse"], class_names=spec["classes"],
                                        resolution=Resolution(**spec["resolution"]) if spec.get("resolution") else None,
                                        **spec.get("overrides", {}), **_budget(spec))
    preview = Preview(**spec["preview"]) if spec.get("preview") else None
    return finetune(spec["images"], spec["labels"], spec["out"], config, pretrained=spec.get("pretrained"),
                    device=spec["device"], progress=progress, should_stop=should_stop,
                    pixel_size=spec.get("pixel_size"), preview=preview)


def sample_job(spec, progress, should_stop):
    """Images drawn from a pretrained model, as one grid (previews on the way, too)."""
    from genselfdiff.nn.sampling import image_grid, sample_images

    def report(p):
        progress(type(p)(p.stage, p.done, p.total, p.metrics, image_grid(p.payload) if p.payload is not None else None))

    images = sample_images(spec["model"], spec["n"], device=spec["device"], seed=spec.get("seed", 0),
                           timesteps=spec.get("timesteps"), progress=report, should_stop=should_stop)
    return image_grid(images)


JOBS = {"pretrain": pretrain_job, "finetune": finetune_job, "sample": sample_job}


def run_job(name: str, spec: dict, queue, stop_event) -> None:
    """Run one job, putting ``("progress", Progress)`` and ``("note", text)`` (the engine's
    messages for the user), then ``("done", result)`` or ``("error", message, is_user_error,
    traceback)`` on ``queue``."""
    import warnings

    from genselfdiff.errors import UserError
    from genselfdiff.io.pixelsize import PixelSizeWarning

    def progress(p):
        queue.put(("progress", type(p)(p.stage, p.done, p.total, dict(p.metrics), _sendable(p.payload))))

    def relay(message, category, *args, show=warnings.showwarning):
        if issubclass(category, PixelSizeWarning):
            queue.put(("note", str(message)))
        else:
            show(message, category, *args)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = relay
            result = JOBS[name](spec, progress, stop_event.is_set)
    except UserError as e:
        queue.put(("error", str(e), True, ""))
    except BaseException as e:  # a bug: the UI shows it in plain words and logs the traceback
        queue.put(("error", f"{type(e).__name__}: {e}", False, traceback.format_exc()))
    else:
        queue.put(("done", _without_networks(result)))


def _sendable(payload):
    """The payload if it is small plain data (arrays, numbers, strings, and lists and dicts
    of them, arrays at most PAYLOAD_LIMIT bytes in all), else None: the queue must stay
    quick, and a child's objects need not unpickle in napari."""
    size = 0

    def plain(x):
        nonlocal size
        if isinstance(x, np.ndarray):
            size += x.nbytes
            return x.dtype != object and size <= PAYLOAD_LIMIT
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        return isinstance(x, PLAIN)

    return payload if plain(payload) else None


def _without_networks(result):
    """Results may carry the trained network; the UI needs the file, not a copy of the weights."""
    if dataclasses.is_dataclass(result):
        heavy = {f.name: None for f in dataclasses.fields(result) if hasattr(getattr(result, f.name), "state_dict")}
        return dataclasses.replace(result, **heavy) if heavy else result
    return result
