"""napari writers for Labels layers: OME-Zarr (NGFF 0.5) labels and QuPath GeoJSON.

Both take the layer's level-0 labels (a multiscale layer's first level, read chunk by
chunk by the engine) and the class names and colours the plugin keeps in the layer's
metadata; the engine does the writing.
"""

from __future__ import annotations

from pathlib import Path

from ._layers import META


def _labels_and_classes(data, meta: dict):
    labels = data[0] if meta.get("multiscale") or isinstance(data, (list, tuple)) else data
    info = (meta.get("metadata") or {}).get(META) or {}
    names = info.get("label_names")
    colors = info.get("label_colors")
    if not names:
        import numpy as np

        top = int(np.asarray(labels).max()) if labels.size else 0
        names = ["background"] + [f"class {v}" for v in range(1, top + 1)]
    return labels, list(names), colors


def write_labels_zarr(path: str, data, meta: dict) -> list:
    from genselfdiff.omezarr import write_labels

    labels, names, colors = _labels_and_classes(data, meta)
    path = Path(path)
    if not path.name.lower().endswith(".zarr"):
        path = path.with_name(path.name + ".ome.zarr")
    scale = tuple(meta.get("scale") or (1.0, 1.0))[-2:]
    write_labels(path, labels, class_names=names, colors=colors, scale=scale)
    return [str(path)]


def write_labels_geojson(path: str, data, meta: dict) -> list:
    """Polygons in level-0 pixel coordinates, as QuPath expects, wherever the labels were made."""
    from genselfdiff.geojson import export_geojson

    labels, names, colors = _labels_and_classes(data, meta)
    info = (meta.get("metadata") or {}).get(META) or {}
    export_geojson(labels, path, class_names=names, colors=colors, scale=float(info.get("downsample", 1.0)),
                   offset=tuple(info.get("offset", (0, 0))))
    return [str(path)]
