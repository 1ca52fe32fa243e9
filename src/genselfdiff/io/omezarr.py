"""Label images as OME-Zarr (NGFF 0.5 on zarr 3), written chunk by chunk and resumable.

Layout of ``NAME.ome.zarr`` (the root group is the label image itself)::

    zarr.json            attributes: ome {version 0.5, multiscales, image-label}, genselfdiff {run, layout}
    0/ 1/ ...            uint8 class ids (y, x); level k = level 0 [::2**k, ::2**k]
    probabilities/0      optional float32 (c, y, x) class probabilities at level-0 shape
    geometry/0           optional float32 (3, y, x): foreground probability and the horizontal and
                         vertical maps of a model with a geometry head (for the objects pass)
    .genselfdiff-progress/   one empty file per finished output chunk (removed when complete)

Why it is safe to write in parallel and to kill at any moment:

- Work is cut into *units*, one per level-0 chunk. Level k uses chunks of side
  ``chunk / 2**k``, so a unit owns exactly one chunk in every array: no two writers
  ever touch one chunk (zarr 3 has no locks; misaligned parallel writes lose data).
- zarr writes each chunk file atomically; a unit's progress file is created after all its
  chunks are written, so a unit without one is simply computed again on a rerun.
- The ``ome`` metadata is written last, when every unit is done: an unfinished output has
  no ``multiscales`` and no viewer mistakes it for a result.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError

NGFF_VERSION = "0.5"
# The groups a segmentation output holds beside its class labels (io.outputs names them for readers).
INSTANCES_GROUP = "instances"  # the object ids
GEOMETRY_GROUP = "geometry"  # foreground probability and geometry maps, for the objects pass
PROGRESS = ".genselfdiff-progress"


# Level-0 output chunks aim at this side.
TARGET_CHUNK = 2048


def pyramid_levels(shape0: tuple, chunk: int, min_side: int = 512, min_chunk: int = 32) -> int:
    """How many 2x levels the label image gets (1 = level 0 only).

    Halve while the level is larger than ``min_side`` and the halved chunk stays a whole
    number of at least ``min_chunk`` pixels, so every level keeps one chunk per unit.
    """
    n, side, c = 1, max(shape0[:2]), chunk
    while side > min_side and c % 2 == 0 and c // 2 >= min_chunk:
        n, side, c = n + 1, math.ceil(side / 2), c // 2
    return n

def ome_metadata(name: str, levels: int, scale: Optional[float], classes: list, colors: list,
                 translation: Optional[tuple] = None, unit: Optional[str] = "micrometer") -> dict:
    """The ``ome`` attribute of a label image: multiscales (nearest 2x levels) and image-label.

    ``scale``: the size of a level-0 pixel in ``unit`` (None: 1, unitless). ``translation``:
    where the centre of the first pixel lies, in the same unit; level k starts at the same
    place because it is level 0 [::2**k, ::2**k].
    """
    unit = {"unit": unit} if scale and unit else {}
    axes = [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]
    base = scale or 1.0
    shift = [{"type": "translation", "translation": [float(v) for v in translation]}] if translation and any(translation) else []
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [base * 2**k] * 2}, *shift]}
                for k in range(levels)]
    image_label = {
        "colors": [{"label-value": i, "rgba": [int(c) for c in colors[i][:3]] + [0 if i == 0 else 255]}
                   for i in range(len(classes))],
        "properties": [{"label-value": i, "class": str(n)} for i, n in enumerate(classes)],
    }
    return {
        "version": NGFF_VERSION,
        "multiscales": [{"name": name, "axes": axes, "datasets": datasets, "type": "nearest",
                         "metadata": {"description": "level k = level 0 [::2**k, ::2**k] (nearest neighbour)"}}],
        "image-label": image_label,
    }


def probability_metadata(name: str, scale: Optional[float], classes: list) -> dict:
    unit = {"unit": "micrometer"} if scale else {}
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
            {"name": "x", "type": "space", **unit}]
    return {
        "version": NGFF_VERSION,
        "multiscales": [{"name": f"{name} probabilities", "axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, scale or 1.0, scale or 1.0]}]}]}],
        "omero": {"channels": [{"label": str(n), "active": i > 0} for i, n in enumerate(classes)]},
    }


class LabelImage:
    """An OME-Zarr label image being written unit by unit (see the module docstring)."""

    def __init__(self, path, layout: dict):
        self.path = Path(path)
        self.layout = layout
        self.shape = tuple(layout["shape"])
        self.chunk = int(layout["chunk"])
        self.levels = int(layout["levels"])
        self.classes = int(layout["probabilities"])  # 0 when no probabilities are stored
        self.geometry = int(layout.get("geometry", 0))  # channels of the geometry map; 0 when none
        self._arrays = None

    # --- creating and opening --------------------------------------------------------

    @classmethod
    def create(cls, path, *, shape: tuple, chunk: int, levels: int, run: dict, probabilities: int = 0,
               geometry: int = 0) -> "LabelImage":
        """Start a new output, or reopen an unfinished (or finished) one made by the same run.

        ``probabilities``: classes whose probabilities are stored (0: none); ``geometry``: channels
        of a geometry map stored beside them (0: none).

        ``run`` describes everything that determines the result (model, tiling, source);
        an existing output made by a different run is replaced, and a folder that is not a
        genselfdiff output is never touched.
        """
        import zarr

        path = Path(path)
        run = json.loads(json.dumps(run))
        layout = {"shape": [int(s) for s in shape[:2]], "chunk": int(chunk), "levels": int(levels),
                  "probabilities": int(probabilities)}
        if geometry:
            layout["geometry"] = int(geometry)
        if path.exists():
            previous = read_attributes(path)
            mine = previous.get("genselfdiff") if previous is not None else None
            if mine is None:
                raise UserError(f"{path} already exists and is not a genselfdiff output; choose another output folder.")
            if mine.get("run") == run and mine.get("layout") == layout and not mine.get("creating"):
                return cls(path, layout)
            shutil.rmtree(path)
        # Marked ours from its first file on: a run killed before its arrays exist is started afresh.
        mark = {"run": run, "layout": layout, "complete": False}
        root = zarr.open_group(path, mode="w", zarr_format=3, attributes={"genselfdiff": {**mark, "creating": True}})
        H, W = layout["shape"]
        for k in range(levels):
            side = chunk // 2**k
            root.create_array(str(k), shape=(math.ceil(H / 2**k), math.ceil(W / 2**k)), chunks=(side, side),
                              dtype="uint8", fill_value=0, dimension_names=("y", "x"))
        if probabilities:
            probs = root.create_group("probabilities")
            probs.create_array("0", shape=(probabilities, H, W), chunks=(probabilities, chunk, chunk),
                               dtype="float32", fill_value=0.0, dimension_names=("c", "y", "x"))
        if geometry:
            root.create_group(GEOMETRY_GROUP).create_array(
                "0", shape=(geometry, H, W), chunks=(geometry, chunk, chunk), dtype="float32", fill_value=0.0,
                dimension_names=("c", "y", "x"))
        root.attrs.put({"genselfdiff": mark})  # every array made
        return cls(path, layout)

    @classmethod
    def open(cls, path) -> "LabelImage":
        """Reopen for writing (a dask worker does this instead of receiving the object)."""
        attrs = read_attributes(path)
        if not attrs or "genselfdiff" not in attrs:
            raise UserError(f"{path} is not a genselfdiff output.")
        return cls(path, attrs["genselfdiff"]["layout"])

    def __getstate__(self):
        return {"path": self.path, "layout": self.layout}

    def __setstate__(self, state):
        self.__init__(state["path"], state["layout"])

    # --- writing -------------------------------------------------------------------------

    def _open_arrays(self):
        import zarr

        if self._arrays is None:
            arrays = [zarr.open_array(self.path / str(k), mode="r+") for k in range(self.levels)]
            probs = zarr.open_array(self.path / "probabilities" / "0", mode="r+") if self.classes else None
            geometry = zarr.open_array(self.path / GEOMETRY_GROUP / "0", mode="r+") if self.geometry else None
            self._arrays = (arrays, probs, geometry)
        return self._arrays

    def units(self) -> list:
        """Level-0 chunk indices (row, col) of every unit."""
        H, W = self.shape
        return [(i, j) for i in range(math.ceil(H / self.chunk)) for j in range(math.ceil(W / self.chunk))]

    def done(self) -> set:
        """Units already written completely (by this or an earlier, interrupted run)."""
        folder = self.path / PROGRESS
        if self.complete:
            return set(self.units())
        if not folder.is_dir():
            return set()
        out = set()
        for f in folder.iterdir():
            parts = f.name.split("_")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                out.add((int(parts[0]), int(parts[1])))
        return out

    def write(self, index: tuple, labels: np.ndarray, probabilities: Optional[np.ndarray] = None,
              empty: bool = False, geometry: Optional[np.ndarray] = None) -> None:
        """Write one unit: its level-0 chunk of class ids, every pyramid level, then its progress file.

        ``empty`` units (all background, no probabilities) write no chunk at all: a missing
        chunk reads as the fill value 0.
        """
        i, j = index
        arrays, probs, geom = self._open_arrays()
        y0, x0 = i * self.chunk, j * self.chunk
        if not empty:
            for k, arr in enumerate(arrays):
                f = 2**k
                part = labels[::f, ::f]
                arr[y0 // f : y0 // f + part.shape[0], x0 // f : x0 // f + part.shape[1]] = part
        if probs is not None and probabilities is not None:
            probs[:, y0 : y0 + labels.shape[0], x0 : x0 + labels.shape[1]] = probabilities
        if geom is not None and geometry is not None:
            geom[:, y0 : y0 + labels.shape[0], x0 : x0 + labels.shape[1]] = geometry
        folder = self.path / PROGRESS
        folder.mkdir(exist_ok=True)
        (folder / f"{i}_{j}").touch()

    # --- finishing -----------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        attrs = read_attributes(self.path) or {}
        return bool(attrs.get("genselfdiff", {}).get("complete")) and "ome" in attrs

    def finish(self, name: str, classes: list, colors: list, scale: Optional[float], info: Optional[dict] = None,
               *, translation: Optional[tuple] = None, unit: Optional[str] = "micrometer") -> None:
        """Write the OME metadata (the last step: only now does the output look finished).

        ``scale``, ``translation`` and ``unit`` as for :func:`ome_metadata`."""
        import zarr

        if self.complete:
            return
        missing = set(self.units()) - self.done()
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} chunk(s) are not written yet")
        root = zarr.open_group(self.path, mode="r+")
        if self.classes:
            zarr.open_group(self.path / "probabilities", mode="r+").attrs.put(
                {"ome": probability_metadata(name, scale, classes)})
        mine = dict(root.attrs["genselfdiff"], complete=True, **(info or {}))
        root.attrs.put({"ome": ome_metadata(name, self.levels, scale, classes, colors, translation, unit),
                        "genselfdiff": mine})
        shutil.rmtree(self.path / PROGRESS, ignore_errors=True)


def read_attributes(path) -> Optional[dict]:
    """The root group's attributes (zarr 3 ``zarr.json``, or zarr 2 ``.zattrs``), or None when
    ``path`` is no zarr group."""
    path = Path(path)
    try:
        if (path / "zarr.json").exists():
            data = json.loads((path / "zarr.json").read_text())
            return data.get("attributes", {}) if data.get("node_type") == "group" else None
        data = json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ome_attributes(path) -> Optional[dict]:
    """The NGFF metadata of a zarr group: the ``ome`` attribute (NGFF 0.5), or the attributes
    themselves (NGFF 0.4 and older keep ``multiscales`` at the top); None when no group."""
    attrs = read_attributes(path)
    return None if attrs is None else attrs.get("ome", attrs)


def placed_transform(downsample: float, offset, mpp: Optional[float]) -> dict:
    """``scale``, ``translation`` and ``unit`` for :meth:`LabelImage.finish` of labels made on a
    coarser level or a crop of a slide.

    Such labels cover level-0 pixels ``[offset + downsample * i, ... + downsample)``, so the
    centre of their first pixel lies at ``offset + (downsample - 1) / 2`` level-0 pixels: in µm
    when the pixel size ``mpp`` (µm per label pixel) is known, else in level-0 pixels. Read
    back, the labels then lie over their slide.
    """
    d = float(downsample)
    centre = [float(o) + (d - 1) / 2 for o in offset]
    if mpp:
        return {"scale": float(mpp), "translation": [c * mpp / d for c in centre], "unit": "micrometer"}
    return {"scale": d, "translation": centre, "unit": None}


def write_label_array(path, labels, *, name: str, classes: list, colors: list, run: dict, downsample: float = 1.0,
                      offset=(0.0, 0.0), mpp: Optional[float] = None) -> Path:
    """Write a whole 2-D label array (numpy, dask or zarr; read a chunk at a time) as a finished
    label image; ``downsample``, ``offset`` and ``mpp`` place it over its slide
    (:func:`placed_transform`) and are kept in the attributes for GeoJSON export."""

    path = Path(path)
    shape = tuple(int(s) for s in labels.shape[-2:])
    image = LabelImage.create(path, shape=shape, chunk=TARGET_CHUNK, levels=pyramid_levels(shape, TARGET_CHUNK), run=run)
    c = TARGET_CHUNK
    for i, j in image.units():
        block = np.asarray(labels[i * c : (i + 1) * c, j * c : (j + 1) * c])
        if block.size and block.max() > 255:
            raise UserError(f"{name} has label values above 255; OME-Zarr class labels are 8-bit here (0-255), "
                            f"so {path} was not written.")
        image.write((i, j), block.astype(np.uint8), empty=not block.any())
    placement = {"downsample": float(downsample), "offset": [float(o) for o in offset]}
    image.finish(name, classes, colors, info={"placement": placement}, **placed_transform(downsample, offset, mpp))
    return path
