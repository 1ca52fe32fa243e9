"""Checkpoints: written atomically, read without executing anything from the file.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with
``torch.save`` through :func:`genselfdiff.io.atomic.atomic_open`, so a crash never leaves a
half-written file. It is read back with ``weights_only=True``:
models travel between labs, and a pickle could run arbitrary code.

Keys (``kind`` is "pretrained" or "segmentation"):
format, format_version, package_version, kind, net (NetConfig dict), state_dict,
ema_state_dict (optional), config (the run's config dict), schedule (dict),
step, optimizer, rng (resume state), data (where the training data came from),
classes / colors (segmentation), pretrained_from, normalization, resolution, history.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._version import __version__
from ..errors import UserError
from .atomic import atomic_open

FORMAT = "genselfdiff"
FORMAT_VERSION = 1


def save_checkpoint(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__, **payload}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncation, foreign objects refused by weights_only
        raise UserError(f"{path} is not a readable genselfdiff model ({type(e).__name__}); "
                        "it may be truncated or come from another program.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a genselfdiff model file.")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer napari-genselfdiff "
                        f"({ckpt.get('package_version')}); upgrade to read it.")
    return ckpt


def capture_rng() -> dict:
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one per visible GPU
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available():
        _restore_cuda_rng(state["cuda"])


def _restore_cuda_rng(states: list) -> None:
    """Put back the saved state of each GPU that is still visible, by index.

    A run saved with 8 GPUs visible may resume with 1 (or the other way round): the states
    beyond the visible GPUs, or the GPUs beyond the saved states, are left alone. (The
    training steps draw from generators seeded by seed, rank and step, not from these.)
    """
    for index, cuda_state in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, index)


def _numpy_state() -> list:
    import numpy as np

    _, keys, pos, has_gauss, cached = np.random.get_state()
    return [keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _to_tuple(x):
    return tuple(_to_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x
