"""napari writers for Labels layers: OME-Zarr (NGFF 0.5) labels and QuPath GeoJSON.

Both take the layer's finest labels (a multiscale layer's first level, read a chunk at a
time) and the class names, colours and placement the plugin keeps in the layer's
metadata; the engine's own writers do the rest.
"""

from __future__ import annotations

import time

import numpy as np

from ._layers import META


def _labels_and_info(data, meta: dict):
    from genselfdiff.io.labels import default_class_names

    labels = data[0] if meta.get("multiscale") or isinstance(data, (list, tuple)) else data
    info = dict((meta.get("metadata") or {}).get(META) or {})
    if not info.get("label_names"):
        top = int(np.asarray(labels).max()) if labels.size else 0
        info["label_names"] = default_class_names(top + 1)
    return labels, info


def write_labels_zarr(path: str, data, meta: dict) -> list:
    """An NGFF 0.5 label image at the layer's own pixel grid, in µm when the layer knows its scale,
    placed where the layer lies on its slide."""
    from genselfdiff.io.labels import default_colors
    from genselfdiff.io.omezarr import write_label_array
    from genselfdiff.io.outputs import as_zarr_path

    labels, info = _labels_and_info(data, meta)
    path = as_zarr_path(path)
    names = info["label_names"]
    # A new "run" each time: saving again replaces an earlier save instead of resuming it.
    run = {"napari_layer": meta.get("name") or path.name, "saved": time.time()}
    write_label_array(path, labels, name=meta.get("name") or path.name, classes=names,
                      colors=info.get("label_colors") or default_colors(len(names)), run=run,
                      downsample=float(info.get("downsample", 1.0)), offset=info.get("offset", (0.0, 0.0)),
                      mpp=info.get("mpp"))
    return [str(path)]


def write_labels_geojson(path: str, data, meta: dict) -> list:
    """Polygons in level-0 pixel coordinates, as QuPath expects, wherever the labels were made."""
    from genselfdiff.io.qupath import export_geojson

    labels, info = _labels_and_info(data, meta)
    export_geojson(labels, path, class_names=info["label_names"], colors=info.get("label_colors"),
                   scale=float(info.get("downsample", 1.0)), offset=tuple(info.get("offset", (0, 0))))
    return [str(path)]
