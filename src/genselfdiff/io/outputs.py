"""Where a segmentation's files go: the one place that names them, and where the objects pass reads and writes.

For an image ``NAME`` segmented into ``OUT/``:

- ``OUT/NAME.ome.zarr``: the class labels (NGFF 0.5 label image), with its pyramid;
- ``OUT/NAME.ome.zarr/instances``: the object ids (``segment --instances``);
- ``OUT/NAME.png``: the class labels as a PNG (``--png``);
- ``OUT/NAME_instances.png``: the object ids renumbered 1..n (``--png --instances``);
- ``OUT/NAME_objects.csv``: objects per class and per mm² of tissue.

The CLI, the napari worker, reader and writer all name these files through here.

The objects pass (:mod:`genselfdiff.objects.output`) goes to the disk here, in two calls:
:func:`open_objects_pass` opens what it reads (the finished class labels, the class probabilities
or the geometry map, the record of an earlier pass) and starts the instances image, which it
fills chunk by chunk (:meth:`ObjectsPass.write`); :func:`write_objects_files` writes the rest (the
PNG, the CSV, and last the instances image's metadata).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .omezarr import GEOMETRY_GROUP, INSTANCES_GROUP

_ZARR_SUFFIXES = (".ome.zarr", ".zarr")


def zarr_path(out_dir, name: str) -> Path:
    """``OUT``, ``NAME`` -> ``OUT/NAME.ome.zarr``."""
    return Path(out_dir) / f"{name}.ome.zarr"


def as_zarr_path(path) -> Path:
    """A path given for a label image: kept when it names a ``.zarr``, else with ``.ome.zarr`` added."""
    path = Path(path)
    return path if path.name.lower().endswith(_ZARR_SUFFIXES) else path.with_name(path.name + ".ome.zarr")


def output_stem(out) -> str:
    """``OUT/NAME.ome.zarr`` -> ``NAME``."""
    name = Path(out).name
    for suffix in _ZARR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sibling(out, suffix: str) -> Path:
    """``OUT/NAME.ome.zarr`` -> ``OUT/NAME{suffix}``."""
    out = Path(out)
    return out.with_name(output_stem(out) + suffix)


def png_path(out) -> Path:
    """``OUT/NAME.ome.zarr`` -> ``OUT/NAME.png``."""
    return sibling(out, ".png")


def instances_png_path(out) -> Path:
    """``OUT/NAME.ome.zarr`` -> ``OUT/NAME_instances.png``."""
    return sibling(out, "_instances.png")


def objects_csv_path(out) -> Path:
    """``OUT/NAME.ome.zarr`` -> ``OUT/NAME_objects.csv``."""
    return sibling(out, "_objects.csv")


def instances_path(out) -> Path:
    """``OUT/NAME.ome.zarr`` -> ``OUT/NAME.ome.zarr/instances``."""
    return Path(out) / INSTANCES_GROUP


# --- the objects pass's files ---------------------------------------------------------------

@dataclass
class ObjectsPass:
    """A finished segmentation output opened for its objects pass (:func:`open_objects_pass`)."""

    path: Path  # OUT/NAME.ome.zarr
    shape: tuple  # level-0 (H, W)
    chunk: int  # level-0 chunk side of the class labels, and of the instances image
    run: dict  # what the objects depend on: the request and the class labels' run
    record: Optional[dict] = None  # {counts, cut_clumps, ...} of a finished pass made by the same run, else None
    labels: object = None  # level-0 class labels (zarr), when the pass is to be made
    probabilities: object = None  # class probabilities (c, H, W), or the geometry map (3, H, W), or None
    group: object = None  # the instances image being written (zarr group), its levels and its NGFF metadata
    levels: list = field(default_factory=list)
    ome: Optional[dict] = None

    @property
    def instances(self) -> Path:
        return instances_path(self.path)

    @property
    def png(self) -> Path:
        return instances_png_path(self.path)

    @property
    def csv(self) -> Path:
        return objects_csv_path(self.path)

    def write(self, core: tuple, ids) -> None:
        """The level-0 ids of one output chunk (``core``: y0, x0, y1, x1) into every level; a chunk
        without objects writes nothing (a missing chunk reads as 0)."""
        if not ids.any():
            return
        y0, x0 = core[0], core[1]
        for k, arr in enumerate(self.levels):
            f = 2**k
            part = ids[::f, ::f]
            arr[y0 // f: y0 // f + part.shape[0], x0 // f: x0 // f + part.shape[1]] = part

    def ids(self):
        """The level-0 object ids as written (a dask array)."""
        import dask.array as da
        import zarr

        return da.from_zarr(zarr.open_array(self.instances / "0", mode="r"))


def open_objects_pass(out, request: dict, *, name: str, mpp: Optional[float], geometry: bool = False,
                      max_pixels: int) -> ObjectsPass:
    """Open the finished segmentation output ``out`` for the objects pass described by ``request``.

    A finished instances image made by the same run is kept (``record`` says what it found);
    otherwise it is started afresh: its uint32 levels are made, empty and without metadata, so
    that an interrupted pass leaves nothing finished-looking; the metadata it gets when finished
    (``name``, ``mpp`` µm per level-0 pixel) is ``ome``. ``geometry``: the pass splits by the
    geometry map, which the output must hold. An unfinished output, one with ``max_pixels``
    level-0 pixels or more (more than its ids can number), or a missing geometry map is a
    :class:`UserError`.
    """
    import math

    import zarr

    from .labels import default_class_names
    from .omezarr import ome_metadata, read_attributes

    out = Path(out)
    attrs = read_attributes(out) or {}
    mine = attrs.get("genselfdiff") or {}
    layout = mine.get("layout")
    if not layout or "ome" not in attrs:
        raise UserError(f"{out} is not a finished segmentation output; run segment on it first.")
    H, W = layout["shape"]
    if H * W >= max_pixels:
        raise UserError(f"{out} has {H} x {W} level-0 pixels, more than uint32 object ids can number; "
                        "segment a smaller region or a lower-resolution scan.")
    chunk, n_levels = int(layout["chunk"]), int(layout["levels"])
    found = ObjectsPass(out, (H, W), chunk, {"request": request, "labels": mine.get("run")})
    previous = (read_attributes(found.instances) or {}).get("genselfdiff") or {}
    if previous.get("run") == json.loads(json.dumps(found.run)) and previous.get("complete"):
        found.record = previous
        return found
    if found.instances.exists():
        shutil.rmtree(found.instances)
    found.labels = zarr.open_array(out / "0", mode="r")
    if layout.get("probabilities"):
        found.probabilities = zarr.open_array(out / "probabilities" / "0", mode="r")
    if geometry:
        if not layout.get("geometry"):
            raise UserError(f"{out} holds no geometry map; segment it again with --instances to split by it.")
        found.probabilities = zarr.open_array(out / GEOMETRY_GROUP / "0", mode="r")  # foreground, then the maps
    found.group = zarr.open_group(found.instances, mode="w", zarr_format=3)
    found.levels = [found.group.create_array(
        str(k), shape=(math.ceil(H / 2**k), math.ceil(W / 2**k)), chunks=(chunk // 2**k, chunk // 2**k),
        dtype="uint32", fill_value=0, dimension_names=("y", "x")) for k in range(n_levels)]
    found.ome = ome_metadata(f"{name} objects", n_levels, float(mpp) if mpp else None, default_class_names(1),
                             [(0, 0, 0)], unit="micrometer" if mpp else None)
    return found


def write_objects_files(found: ObjectsPass, *, counts: dict, cut_clumps: int, png, csv: str) -> tuple:
    """Write what the objects pass of ``found`` made besides the ids: ``OUT/NAME_instances.png``
    (``png``: the ids 1..n as uint16; None: no PNG), ``OUT/NAME_objects.csv`` (``csv``: its text)
    and, last, for a pass just made, the instances image's metadata with the ``counts`` per class
    and ``cut_clumps``: only now does it look finished. Returns the PNG's path (or None) and the CSV's.
    """
    from skimage.io import imsave

    from .atomic import atomic_path, write_text

    if png is not None:
        with atomic_path(found.png) as tmp:
            imsave(tmp, png, check_contrast=False)
    write_text(found.csv, csv)
    if found.record is None:
        found.group.attrs.put({"ome": found.ome, "genselfdiff": {"run": found.run, "counts": counts,
                                                                 "cut_clumps": cut_clumps, "complete": True}})
    return (found.png if png is not None else None), found.csv
