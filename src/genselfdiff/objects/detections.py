"""QuPath detections of the objects of a segmentation output (``export-geojson --objects``).

The output's ``instances`` image (``segment --instances``) is read one ``tile`` x ``tile`` core
at a time, with a halo as wide as the objects pass used: each object is measured and traced
in the window of the core that holds its first pixel (:func:`genselfdiff.objects.split.owned_by_core`),
so it is exported once and whole. Its class is the class label under its first pixel. The
haematoxylin optical density is measured on the image the output was made from (its level 0,
which has the labels' shape); without that image the column is left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from ..io.atomic import atomic_open
from ..progress import Progress, resolve
from .split import HALO_UM, halo_pixels, owned_by_core


def export_objects(output, out, *, image=None, tile: int = 2048, simplify: float = 0.35, pretty: bool = False,
                   progress=None, should_stop=None) -> int:
    """Write one QuPath detection per object of ``output`` (an OME-Zarr segmentation output)
    to the GeoJSON file ``out``; returns the number written.

    ``image``: the slide or image the output was made from (default: the source the output
    names, when it still exists) for the haematoxylin measurement.
    """
    from ..io.labels import default_class_name, default_colors, open_label_image
    from ..io.outputs import instances_path
    from .measure import detection_features, measure_objects

    progress, should_stop = resolve(progress, should_stop)
    output = Path(output)
    if not instances_path(output).exists():
        raise UserError(f"{output} holds no objects; run segment --instances on it first.")
    classes = open_label_image(output)
    ids_src = open_label_image(instances_path(output))
    labels, ids = classes.array, ids_src.array
    names = classes.class_names or []
    colors = classes.colors or default_colors(len(names))
    mpp = float(ids_src.scale[-1]) if ids_src.unit == "micrometer" else None
    rgb = _source_image(image, classes.genselfdiff.get("source"), labels.shape)
    H, W = (int(s) for s in ids.shape)
    halo = halo_pixels(HALO_UM, mpp)
    cores = [(y, x, min(y + tile, H), min(x + tile, W)) for y in range(0, H, tile) for x in range(0, W, tile)]
    count = 0
    sep = "\n" if pretty else ""
    with atomic_open(out, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [' + sep)
        for i, core in enumerate(cores):
            if should_stop():
                break
            win = (max(core[0] - halo, 0), max(core[1] - halo, 0), min(core[2] + halo, H), min(core[3] + halo, W))
            window = np.asarray(ids[win[0]:win[2], win[1]:win[3]])
            mine = window * owned_by_core(window, core, W)  # only objects that start in this core
            if mine.any():
                cls = np.asarray(labels[win[0]:win[2], win[1]:win[3]])
                pixels = None if rgb is None else np.asarray(rgb[win[0]:win[2], win[1]:win[3]])
                for k in np.unique(cls[mine > 0]):
                    of_class = np.where(cls == k, mine, 0)
                    cols = measure_objects(of_class, pixels, mpp=mpp, offset=win[:2])
                    name = names[k] if k < len(names) else default_class_name(int(k))
                    for feat in detection_features(of_class, cols, class_name=name, color=colors[k][:3],
                                                   offset=win[:2], simplify=simplify):
                        f.write(("," + sep if count else "") + json.dumps(feat, separators=(",", ":")))
                        count += 1
            progress(Progress("export objects", i + 1, len(cores), {"detections": count}))
        f.write(sep + "]}\n")
    return count


def _source_image(image, recorded: Optional[str], shape):
    """Level 0 of the image the objects were found in, or None when it is not at hand."""
    from ..io.slides import open_slide

    path = image or (recorded if recorded and Path(recorded).exists() else None)
    if path is None:
        return None
    level0 = open_slide(path).levels[0]
    if tuple(level0.shape[:2]) != tuple(shape):
        raise UserError(f"{path} is {level0.shape[1]} x {level0.shape[0]} pixels but the objects are "
                        f"{shape[1]} x {shape[0]}; give the image they were segmented from.")
    return level0
