"""Files that are either the old version or the complete new one, never half written.

Every file the project writes (checkpoints, GeoJSON, CSV, PNG, plots, TIFF, JSON) goes
through :func:`atomic_path`: the writer fills a temporary file in the target's own folder
(a rename is atomic only within one file system), the data is flushed to disk with
``fsync`` (else a crash soon after the rename can leave an empty file under the new name),
the temporary file is renamed over the target, and on any failure, Ctrl-C included, it is
deleted and the old file is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``.

    The temporary name keeps ``path``'s ending, so writers that choose the format from the
    name (skimage, tifffile, matplotlib) write the right one. Missing folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed its own handle: sync through ours
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """``open(path, mode)`` through :func:`atomic_path`: ``mode`` is ``"w"`` or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not 'w' or 'wb'")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) atomically."""
    with atomic_open(path, "w", newline="") as f:
        f.write(text)
    return Path(path)


def write_bytes(path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable; not possible everywhere (Windows), and not needed to be."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
