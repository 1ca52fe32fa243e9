"""The objects pass of segmentation: finished class labels -> one id per object.

It runs after :func:`genselfdiff.infer.segment.segment` has written the class labels, so it does
not depend on how they were computed. For an OME-Zarr output (:func:`write_objects`) the pass
has three stretches:

1. :func:`genselfdiff.io.outputs.open_objects_pass` opens what it reads: the finished level-0
   class labels, the class probabilities or the geometry map when the output stores them, and the
   record of an earlier pass (a finished one made with the same request is kept). Otherwise it
   starts ``OUT/NAME.ome.zarr/instances``: an NGFF 0.5 label image (uint32, the class labels'
   shape, chunks and pyramid).
2. One output chunk at a time, plus a halo, :func:`genselfdiff.objects.split.class_objects_in_core`
   splits each chosen class and the ids go into the instances image. Ids are global (1 + the raster
   index of the object's first level-0 pixel), so an object cut by a chunk border keeps one id;
   memory is one window, as for the class labels. Each object is counted in the chunk that holds
   its first pixel (:func:`genselfdiff.objects.split.owned_by_core`), so it is counted once.
3. :func:`genselfdiff.io.outputs.write_objects_files` writes ``OUT/NAME_instances.png`` (with
   ``png``: the ids renumbered 1..n, 16-bit), ``OUT/NAME_objects.csv`` (objects per class and,
   with a pixel size, per mm² of tissue: :func:`genselfdiff.objects.measure.summary_csv`) and, last,
   the instances image's metadata: an interrupted pass leaves no finished-looking image and is
   simply redone on the next run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..io.outputs import open_objects_pass, write_objects_files
from ..progress import Progress, resolve
from .measure import object_summary, summary_csv
from .request import ObjectRequest
from .split import MAX_ID, SplitParameters, class_objects_in_core, core_grid, first_pixel_order, halo_pixels

STAGE = "objects"
PNG_MAX_OBJECTS = 2**16 - 1  # a 16-bit PNG holds this many ids


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


def _geometry_parts(request: ObjectRequest, geometry: Optional[np.ndarray]) -> tuple:
    """(foreground probability, maps) for a request by geometry; (None, None) for one by distance."""
    if not request.uses_geometry:
        return None, None
    if geometry is None:
        raise ValueError("a split by the geometry map needs the model's geometry (foreground, maps)")
    geometry = np.asarray(geometry)
    return geometry[0], geometry[1:]


# --- an OME-Zarr output -------------------------------------------------------------------

def write_objects(out, request: ObjectRequest, *, mpp: Optional[float], name: str = "image",
                  tissue_mm2: Optional[float] = None, png_max_pixels: Optional[int] = None, progress=None,
                  should_stop=None) -> ObjectResult:
    """Split the finished class labels of the output ``out`` into objects, chunk by chunk, and write
    the instances image, the summary CSV and, with ``png_max_pixels``, the PNG of images up to that size.

    ``mpp``: µm per level-0 pixel (None: :data:`~genselfdiff.objects.split.DEFAULT_MPP`);
    ``tissue_mm2``: the tissue area the densities are per. A finished instances image made with the
    same request is kept. Stops cleanly (nothing finished-looking written) when ``should_stop()`` is True.
    """
    progress, should_stop = resolve(progress, should_stop)
    found = open_objects_pass(out, request.describe(), name=name, mpp=mpp, geometry=request.uses_geometry,
                              max_pixels=MAX_ID)
    if found.record is None:  # split it, one output chunk (and a halo) in memory at a time
        halo = halo_pixels(request.halo_um, mpp)
        cores = core_grid(found.shape, found.chunk)
        counts, cut = {n: 0 for n in request.names}, 0
        for i, core in enumerate(cores):
            if should_stop():
                return ObjectResult(counts, path=None, notes=["objects: stopped; run again to finish them."])
            ids, core_counts, core_cut = class_objects_in_core(
                found.labels, found.probabilities, core, found.shape, classes=request.classes, halo=halo, mpp=mpp,
                params=request.params, geometry=request.uses_geometry)
            found.write(core, ids)
            for n, c in zip(request.names, core_counts):
                counts[n] += c
            cut += core_cut
            progress(Progress(STAGE, i + 1, len(cores), {"objects": sum(counts.values())}))
    else:
        counts, cut = dict(found.record["counts"]), found.record.get("cut_clumps", 0)
    ids, png, notes = found.ids(), None, []
    if cut:
        notes.append(f"objects: {cut} time(s) a clump was wider than the halo around a chunk; "
                     "those objects may be split differently from a whole-image split.")
    if png_max_pixels is not None:  # the ids renumbered 1..n, which 16 bits must hold
        if ids.shape[0] * ids.shape[1] > png_max_pixels:
            notes.append(f"{found.png.name} not written: the image has more than {png_max_pixels // 10**6} Mpx.")
        else:
            png = first_pixel_order(np.asarray(ids))
            n = int(png.max()) if png.size else 0
            if n > PNG_MAX_OBJECTS:
                png = None
                notes.append(f"{found.png.name} not written: {n} objects are more than a 16-bit PNG can number.")
            else:
                png = png.astype(np.uint16)
    csv = summary_csv(name, object_summary(counts, tissue_mm2=tissue_mm2))
    png_file, csv_file = write_objects_files(found, counts=counts, cut_clumps=cut, png=png, csv=csv)
    return ObjectResult(counts, ids, found.instances, png_file, csv_file, notes=notes)


# --- after a segmentation ----------------------------------------------------------------------

def add_objects(result, request: Optional[ObjectRequest], slide, *, labels=None, geometry=None,
                tissue_mm2: Optional[float] = None, png: bool = False, png_max_pixels: int, progress=None,
                should_stop=None):
    """``result`` (a finished :class:`~genselfdiff.infer.segment.SegmentResult`) with the objects of ``request``.

    With an output (``result.path``) they are written beside its class labels chunk by chunk
    (:func:`write_objects`, at the pixel size of ``slide``), with ``png`` also as a 16-bit PNG,
    and counted per class and per mm² of tissue (``tissue_mm2``) in the summary CSV. Without one,
    ``labels`` (the processing level, in memory) are split whole (:func:`objects_in_memory`), by
    ``geometry`` (foreground probability and maps, same level) when the request says so.
    """
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
    objects = write_objects(result.path, request, mpp=slide.mpp, name=slide.name, tissue_mm2=tissue_mm2,
                            png_max_pixels=png_max_pixels if png else None, progress=progress, should_stop=should_stop)
    return replace(result, objects=objects, stopped=objects.path is None, notes=result.notes + objects.notes)
