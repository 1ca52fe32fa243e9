"""napari writers for Labels layers: OME-Zarr (NGFF 0.5) labels and QuPath GeoJSON.

Both take the layer's finest labels (a multiscale layer's first level, read a chunk at a
time) and the class names, colours and placement the plugin keeps in the layer's
metadata; the engine's own writers do the rest.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ._layers import META


def _labels_and_info(data, meta: dict):
    labels = data[0] if meta.get("multiscale") or isinstance(data, (list, tuple)) else data
    info = dict((meta.get("metadata") or {}).get(META) or {})
    if not info.get("label_names"):
        top = int(np.asarray(labels).max()) if labels.size else 0
        info["label_names"] = ["background"] + [f"class {v}" for v in range(1, top + 1)]
    return labels, info


def write_labels_zarr(path: str, data, meta: dict) -> list:
    """An NGFF 0.5 label image at the layer's own pixel grid, in µm when the layer knows its scale."""
    from genselfdiff import tiling
    from genselfdiff.errors import UserError
    from genselfdiff.model import default_colors
    from genselfdiff.omezarr import LabelImage

    labels, info = _labels_and_info(data, meta)
    path = Path(path)
    if not path.name.lower().endswith(".zarr"):
        path = path.with_name(path.name + ".ome.zarr")
    names = info["label_names"]
    colors = info.get("label_colors") or default_colors(len(names))
    shape = tuple(int(s) for s in labels.shape[-2:])
    chunk = tiling.TARGET_CHUNK
    # A new "run" each time: saving again replaces an earlier save instead of resuming it.
    run = {"napari_layer": meta.get("name") or path.name, "saved": time.time()}
    image = LabelImage.create(path, shape=shape, chunk=chunk, levels=tiling.pyramid_levels(shape, chunk), run=run)
    for i, j in image.units():
        block = np.asarray(labels[i * chunk : (i + 1) * chunk, j * chunk : (j + 1) * chunk])
        if block.size and block.max() > 255:
            raise UserError(f"{meta.get('name', 'The layer')} has label values above 255; OME-Zarr class labels "
                            "are 8-bit here (0-255).")
        image.write((i, j), block.astype(np.uint8), empty=not block.any())
    # A layer made on pyramid level d covers level-0 pixels [offset + d*i, ... + d); the centre of
    # its first pixel is the translation (in µm when the scale is known, else in level-0 pixels),
    # so reading it back lays it over its slide. The placement itself is kept too, for GeoJSON.
    d = float(info.get("downsample", 1.0))
    offset = [float(o) for o in info.get("offset", (0.0, 0.0))]
    centre = [o + (d - 1) / 2 for o in offset]
    mpp, kept = info.get("mpp"), {"placement": {"downsample": d, "offset": offset}}
    if mpp:
        image.finish(meta.get("name") or path.name, names, colors, mpp, kept, translation=[c * mpp / d for c in centre])
    else:
        image.finish(meta.get("name") or path.name, names, colors, d, kept, translation=centre, unit=None)
    return [str(path)]


def write_labels_geojson(path: str, data, meta: dict) -> list:
    """Polygons in level-0 pixel coordinates, as QuPath expects, wherever the labels were made."""
    from genselfdiff.geojson import export_geojson

    labels, info = _labels_and_info(data, meta)
    export_geojson(labels, path, class_names=info["label_names"], colors=info.get("label_colors"),
                   scale=float(info.get("downsample", 1.0)), offset=tuple(info.get("offset", (0, 0))))
    return [str(path)]
