"""The objects pass of segmentation: finished class labels -> one id per object.

It runs after :func:`genselfdiff.infer.segment.segment` has written the class labels, so it does
not depend on how they were computed. For an OME-Zarr output it reads the finished level-0
class labels (and the class probabilities when the output stores them) one output chunk at a
time, plus a halo, splits each chosen class with :func:`genselfdiff.objects.split.objects_in_core`
and writes the ids into ``OUT/NAME.ome.zarr/instances``: an NGFF 0.5 label image (uint32,
the class labels' shape, chunks and pyramid). Ids are global (1 + the raster index of the
object's first level-0 pixel), so an object cut by a chunk border keeps one id; memory is one
window, as for the class labels. The group's metadata is written last: an interrupted pass
leaves no finished-looking image and is simply redone on the next run.

Counting: each object is counted in the chunk that holds its first pixel
(:func:`genselfdiff.objects.split.owned_by_core`), so every object is counted once. With a pixel
size the per-image summary (objects per class, per mm² of tissue) goes to ``OUT/NAME_objects.csv``;
with ``png``, ``OUT/NAME_instances.png`` holds the ids renumbered 1..n (16-bit).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError
from ..io.outputs import GEOMETRY_GROUP, INSTANCES_GROUP, instances_png_path, objects_csv_path
from ..progress import Progress, resolve
from .hv_split import HVParameters
from .split import (
    HALO_UM,
    SplitParameters,
    first_pixel_order,
    halo_pixels,
    object_ids_fit,
    objects_in_core,
    owned_by_core,
)

STAGE = "objects"
PNG_MAX_OBJECTS = 2**16 - 1  # a 16-bit PNG holds this many ids


@dataclass(frozen=True)
class ObjectRequest:
    """Which classes to split into objects, and how."""

    classes: tuple  # label values
    names: tuple  # their class names
    params: object = SplitParameters()  # SplitParameters (distance) or HVParameters (geometry map)
    halo_um: float = HALO_UM

    @property
    def uses_geometry(self) -> bool:
        return isinstance(self.params, HVParameters)

    def describe(self) -> dict:
        return {"classes": list(self.classes), "names": list(self.names), "halo_um": self.halo_um,
                "params": self.params.describe()}


@dataclass
class ObjectResult:
    """What the objects pass produced for one image."""

    counts: dict  # class name -> objects
    ids: object = None  # in memory: uint32 ids 1..n; with an output: a dask array over the written ids
    path: Optional[Path] = None  # OUT/NAME.ome.zarr/instances
    png: Optional[Path] = None
    summary: Optional[Path] = None  # OUT/NAME_objects.csv
    cut_clumps: int = 0  # clumps wider than the halo (may differ from an untiled split)
    notes: list = field(default_factory=list)


def object_request(model, instances_of: Optional[Sequence[str]] = None, **kw) -> ObjectRequest:
    """The classes of ``model`` to split: every foreground class, or those named in ``instances_of``;
    by its geometry map when the model has one (:mod:`.hv_split`), else by distance (:mod:`.split`).

    A name the model does not have, or a model without foreground classes, is a :class:`UserError`.
    """
    if "params" not in kw:
        kw["params"] = HVParameters() if getattr(model, "has_geometry", False) else SplitParameters()
    classes = list(model.classes)
    source = model.path or "The model"
    if len(classes) < 2:
        raise UserError(f"{source} has no foreground class to split into objects; segment without --instances.")
    if not instances_of:
        chosen = list(range(1, len(classes)))
    else:
        lookup = {str(n).lower(): k for k, n in enumerate(classes)}
        chosen = []
        for name in instances_of:
            k = lookup.get(str(name).strip().lower())
            if not k:  # unknown, or the background
                raise UserError(f"{source} has no foreground class {str(name).strip()!r} to split into objects; "
                                f"its classes are {', '.join(map(str, classes[1:]))}.")
            chosen += [k] if k not in chosen else []
    return ObjectRequest(tuple(chosen), tuple(str(classes[k]) for k in chosen), **kw)


# --- in memory ----------------------------------------------------------------------------

def objects_in_memory(labels: np.ndarray, request: ObjectRequest, *, mpp: Optional[float],
                      geometry: Optional[np.ndarray] = None) -> ObjectResult:
    """Objects of a whole class-label image: ids 1..n in raster order of their first pixel.

    ``geometry`` (3, H, W): the foreground probability and the two maps of a model with a
    geometry head, which a request by geometry needs."""
    labels = np.asarray(labels)
    ids = np.zeros(labels.shape, np.int64)
    counts = {}
    prob, maps = _geometry_parts(request, geometry)
    for k, name in zip(request.classes, request.names):
        local = request.params.split(prob, labels == k, mpp=mpp, maps=maps)
        counts[name] = int(local.max())
        ids = np.where(local > 0, local.astype(np.int64) + ids.max(), ids)  # classes never share a pixel
    return ObjectResult(counts, first_pixel_order(ids).astype(np.uint32))


# --- an OME-Zarr output -------------------------------------------------------------------

def write_instances(out, request: ObjectRequest, *, mpp: Optional[float], name: str = "image",
                    progress=None, should_stop=None) -> ObjectResult:
    """Split the finished class labels of the output ``out`` into objects, chunk by chunk.

    ``mpp``: µm per level-0 pixel (None: :data:`~genselfdiff.objects.split.DEFAULT_MPP`). A finished
    ``instances`` image made with the same request is kept. Returns the counts; stops cleanly
    (nothing finished-looking written) when ``should_stop()`` is True.
    """
    import zarr

    from ..io.labels import default_class_names
    from ..io.omezarr import ome_metadata, read_attributes

    progress, should_stop = resolve(progress, should_stop)
    out = Path(out)
    attrs = read_attributes(out) or {}
    mine = attrs.get("genselfdiff") or {}
    layout = mine.get("layout")
    if not layout or "ome" not in attrs:
        raise UserError(f"{out} is not a finished segmentation output; run segment on it first.")
    H, W = layout["shape"]
    if not object_ids_fit((H, W)):
        raise UserError(f"{out} has {H} x {W} level-0 pixels, more than uint32 object ids can number; "
                        "segment a smaller region or a lower-resolution scan.")
    chunk, levels = int(layout["chunk"]), int(layout["levels"])
    run = {"request": request.describe(), "labels": mine.get("run")}
    target = out / INSTANCES_GROUP
    previous = (read_attributes(target) or {}).get("genselfdiff") or {}
    if previous.get("run") == json.loads(json.dumps(run)) and previous.get("complete"):
        return _finished(target, previous)
    if target.exists():
        shutil.rmtree(target)

    labels = zarr.open_array(out / "0", mode="r")
    probs = zarr.open_array(out / "probabilities" / "0", mode="r") if layout.get("probabilities") else None
    if request.uses_geometry:
        if not layout.get("geometry"):
            raise UserError(f"{out} holds no geometry map; segment it again with --instances to split by it.")
        probs = zarr.open_array(out / GEOMETRY_GROUP / "0", mode="r")  # foreground probability, then the maps
    group = zarr.open_group(target, mode="w", zarr_format=3)
    arrays = [group.create_array(str(k), shape=(math.ceil(H / 2**k), math.ceil(W / 2**k)),
                                 chunks=(chunk // 2**k, chunk // 2**k), dtype="uint32", fill_value=0,
                                 dimension_names=("y", "x")) for k in range(levels)]
    halo = halo_pixels(request.halo_um, mpp)
    cores = [(y, x, min(y + chunk, H), min(x + chunk, W)) for y in range(0, H, chunk) for x in range(0, W, chunk)]
    counts = {n: 0 for n in request.names}
    cut = 0
    for i, core in enumerate(cores):
        if should_stop():
            return ObjectResult(counts, path=None, notes=["objects: stopped; run again to finish them."])
        ids, core_counts, core_cut = _core_objects(labels, probs, core, (H, W), halo, mpp, request)
        cut += core_cut
        for n, c in core_counts.items():
            counts[n] += c
        if ids.any():
            y0, x0 = core[0], core[1]
            for k, arr in enumerate(arrays):
                f = 2**k
                part = ids[::f, ::f]
                arr[y0 // f: y0 // f + part.shape[0], x0 // f: x0 // f + part.shape[1]] = part
        progress(Progress(STAGE, i + 1, len(cores), {"objects": sum(counts.values())}))
    scale = {"scale": float(mpp), "unit": "micrometer"} if mpp else {"scale": None, "unit": None}
    ome = ome_metadata(f"{name} objects", levels, scale["scale"], default_class_names(1), [(0, 0, 0)],
                       unit=scale["unit"])
    group.attrs.put({"ome": ome, "genselfdiff": {"run": run, "counts": counts, "cut_clumps": cut, "complete": True}})
    return _finished(target, {"counts": counts, "cut_clumps": cut})


def _core_objects(labels, probs, core, shape, halo, mpp, request):
    """Ids of one core (every chosen class), the objects each class starts there, clumps cut by the window."""
    H, W = shape
    y0, x0, y1, x1 = core
    win = (max(y0 - halo, 0), max(x0 - halo, 0), min(y1 + halo, H), min(x1 + halo, W))
    window = np.asarray(labels[win[0]:win[2], win[1]:win[3]])
    ids = np.zeros((y1 - y0, x1 - x0), np.uint32)
    counts, cut = {}, 0
    for k, name in zip(request.classes, request.names):
        core_mask = window[y0 - win[0]: y1 - win[0], x0 - win[1]: x1 - win[1]] == k
        if not core_mask.any():  # no pixel of this class in the core: none of its objects either
            counts[name] = 0
            continue
        maps = None
        if request.uses_geometry:
            geometry = np.asarray(probs[:, win[0]:win[2], win[1]:win[3]])
            prob, maps = geometry[0], geometry[1:]
        else:
            prob = None if probs is None else np.asarray(probs[k, win[0]:win[2], win[1]:win[3]])

        def read(w, k=k, prob=prob, maps=maps):
            a, b, c, d = (w[0] - win[0], w[1] - win[1], w[2] - win[0], w[3] - win[1])
            found = (None if prob is None else prob[a:c, b:d]), window[a:c, b:d] == k
            return found if maps is None else found + (maps[:, a:c, b:d],)

        tile = objects_in_core(read, core, shape, halo=halo, mpp=mpp, params=request.params)
        ids = np.where(tile.ids > 0, tile.ids, ids)
        present = np.unique(tile.ids[tile.ids > 0])
        counts[name] = int(owned_by_core(present, core, W).sum())
        cut += tile.cut_clumps
    return ids, counts, cut


def _geometry_parts(request: ObjectRequest, geometry: Optional[np.ndarray]) -> tuple:
    """(foreground probability, maps) for a request by geometry; (None, None) for one by distance."""
    if not request.uses_geometry:
        return None, None
    if geometry is None:
        raise ValueError("a split by the geometry map needs the model's geometry (foreground, maps)")
    geometry = np.asarray(geometry)
    return geometry[0], geometry[1:]


def _finished(target: Path, info: dict) -> ObjectResult:
    from ..io.labels import load_labels

    notes = []
    if info.get("cut_clumps"):
        notes.append(f"objects: {info['cut_clumps']} time(s) a clump was wider than the halo around a chunk; "
                     "those objects may be split differently from a whole-image split.")
    return ObjectResult(dict(info["counts"]), load_labels(target)[0], target, notes=notes)


def write_instances_png(out, ids, max_pixels: int) -> tuple:
    """``OUT/NAME_instances.png``: the ids renumbered 1..n (16-bit); (path or None, note or None)."""
    from skimage.io import imsave

    from ..io.atomic import atomic_path

    path = instances_png_path(out)
    if ids.shape[0] * ids.shape[1] > max_pixels:
        return None, f"{path.name} not written: the image has more than {max_pixels // 10**6} Mpx."
    renumbered = first_pixel_order(np.asarray(ids))
    n = int(renumbered.max()) if renumbered.size else 0
    if n > PNG_MAX_OBJECTS:
        return None, f"{path.name} not written: {n} objects are more than a 16-bit PNG can number."
    with atomic_path(path) as tmp:
        imsave(tmp, renumbered.astype(np.uint16), check_contrast=False)
    return path, None


def write_summary(out, image: str, counts: dict, tissue_area: Optional[float]) -> Path:
    """``OUT/NAME_objects.csv``: objects per class and per mm² of tissue (empty without a pixel size)."""
    from ..io.atomic import write_text
    from .measure import object_summary, summary_csv

    return write_text(objects_csv_path(out), summary_csv(image, object_summary(counts, tissue_mm2=tissue_area)))


# --- after a segmentation ----------------------------------------------------------------------

def add_objects(result, request: Optional[ObjectRequest], slide, *, labels=None, geometry=None,
                tissue_mm2: Optional[float] = None, png: bool = False, png_max_pixels: int, progress=None,
                should_stop=None):
    """``result`` (a finished :class:`~genselfdiff.infer.segment.SegmentResult`) with the objects of ``request``.

    With an output (``result.path``) they are written beside its class labels chunk by chunk
    (:func:`write_instances`, at the pixel size of ``slide``), with ``png`` also as a 16-bit PNG,
    and counted per class and per mm² of tissue (``tissue_mm2``) in the summary CSV. Without one,
    ``labels`` (the processing level, in memory) are split whole (:func:`objects_in_memory`), by
    ``geometry`` (foreground probability and maps, same level) when the request says so.
    """
    from dataclasses import replace

    if request is None or result.stopped:
        return result
    if result.path is None:
        notes = []
        if request.uses_geometry and geometry is None:  # a display pyramid keeps no maps (a slide's would be large)
            request = replace(request, params=SplitParameters())
            notes = ["objects: split by distance, since the display keeps no geometry map; segment into an "
                     "output (or in memory) to split by the model's learnt borders."]
        objects = objects_in_memory(labels, request, mpp=result.mpp, geometry=geometry)
        objects.notes += notes
        return replace(result, objects=objects, notes=result.notes + notes)
    objects = write_instances(result.path, request, mpp=slide.mpp, name=slide.name, progress=progress,
                              should_stop=should_stop)
    if objects.path is None:  # stopped
        return replace(result, objects=objects, stopped=True, notes=result.notes + objects.notes)
    if png:
        objects.png, note = write_instances_png(result.path, objects.ids, png_max_pixels)
        objects.notes += [note] if note else []
    objects.summary = write_summary(result.path, slide.name, objects.counts, tissue_mm2)
    return replace(result, objects=objects, notes=result.notes + objects.notes)
