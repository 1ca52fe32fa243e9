"""Geometry between napari layers and pyramid levels, and the Labels layers the widgets make.

A Labels layer made for level ``l`` of an image has ``scale = image.scale * d`` (``d`` the
level's downsample) and is shifted by ``(d - 1) / 2`` level-0 pixels, so its pixels sit
exactly over the level-0 pixels they stand for. The same rule, inverted, tells which level
and window of an image a Labels layer covers, so painted labels and the pixels under them
are read together. Labels that fill in while a model runs are the engine's display pyramid
(:class:`genselfdiff.infer.merge.PyramidMerger`), not built here.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

META = "genselfdiff"  # key of our entry in layer.metadata
SPARSE_BACKGROUND = (0, 160, 255)  # colour of painted "background" strokes (label 1)


# --- images and their levels -------------------------------------------------------------

def image_levels(layer) -> list:
    return list(layer.data) if layer.multiscale else [layer.data]


def downsamples(levels) -> list:
    return [levels[0].shape[1] / lv.shape[1] for lv in levels]


def layer_mpp(layer) -> Optional[float]:
    return (layer.metadata.get(META) or {}).get("mpp")


def layer_pixel_size(layer) -> Optional[float]:
    """The level-0 µm/px of an image layer: the file's (the reader keeps it), else the layer's
    scale when it is a physical one (napari's default scale 1 means unknown)."""
    mpp = layer_mpp(layer)
    if mpp:
        return float(mpp)
    sy, sx = (float(v) for v in layer.scale[-2:])
    return sx if sx == sy and sx != 1 else None


def level_transform(image_layer, level: int, origin=(0, 0)):
    """``(scale, translate)`` for a 2-D array at ``level`` of ``image_layer`` whose first pixel
    is ``origin`` (in that level's pixels)."""
    d = downsamples(image_levels(image_layer))[level]
    scale = np.asarray(image_layer.scale[-2:], float)
    base = np.asarray(image_layer.translate[-2:], float)
    translate = base + (np.asarray(origin, float) * d + (d - 1) / 2) * scale
    return tuple(scale * d), tuple(translate)


def placement(image_layer, level: int, origin=(0, 0)) -> dict:
    """Where a level-``level`` array starting at ``origin`` lies in level-0 pixels (kept in the
    layer's metadata, so a writer can put the labels back on the slide: QuPath wants level 0)."""
    d = downsamples(image_levels(image_layer))[level]
    mpp = layer_mpp(image_layer)
    return {"downsample": d, "offset": [float(origin[0] * d), float(origin[1] * d)], "mpp": mpp * d if mpp else None}


def covered_window(image_layer, labels_layer):
    """``(level, y0, x0)``: the pyramid level and first pixel of ``image_layer`` under
    ``labels_layer`` (found from their scales and offsets)."""
    ds = downsamples(image_levels(image_layer))
    scale = np.asarray(image_layer.scale[-2:], float)
    ratio = float(np.mean(np.asarray(labels_layer.scale[-2:], float) / scale))
    level = int(np.argmin([abs(math.log(ratio / d)) for d in ds]))
    if abs(math.log(ratio / ds[level])) > 0.05:
        raise ValueError("scale")
    d = ds[level]
    offset = (np.asarray(labels_layer.translate[-2:], float) - np.asarray(image_layer.translate[-2:], float)) / scale
    y0, x0 = np.round((offset - (d - 1) / 2) / d).astype(int)
    return level, int(y0), int(x0)


def visible_box(viewer, image_layer, level: int = 0):
    """The part of ``image_layer`` on screen, ``(y0, x0, y1, x1)`` in pixels of ``level``,
    clipped to the image; None when the image is not in view."""
    size = np.asarray(getattr(getattr(viewer, "canvas", None), "size", None) or viewer._canvas_size, float)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 / older
    center = np.asarray(camera.center[-2:], float)
    half = size / camera.zoom / 2
    d = downsamples(image_levels(image_layer))[level]
    scale = np.asarray(image_layer.scale[-2:], float) * d
    base = np.asarray(image_layer.translate[-2:], float)
    lo = np.floor((center - half - base) / scale).astype(int)
    hi = np.ceil((center + half - base) / scale).astype(int)
    shape = image_levels(image_layer)[level].shape[:2]
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None
    return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])


def read_window(array, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """``array[y0:y0+h, x0:x0+w]`` as numpy; the caller keeps the window inside the array."""
    return np.asarray(array[y0 : y0 + h, x0 : x0 + w])


# --- colours ------------------------------------------------------------------------------

def label_colormap(colors: dict):
    """A napari colour map: label value -> RGB 0-255; 0 and unknown values transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    color_dict = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for value, rgb in colors.items():
        if int(value) != 0:
            color_dict[int(value)] = tuple(np.asarray(rgb[:3], float) / 255) + (1.0,)
    return DirectLabelColormap(color_dict=color_dict)


def class_labels(classes: list, colors: list, sparse: bool) -> tuple:
    """Names and colours per label value for class lists (index 0 = background).

    Dense: value k = class k. Sparse (painted scribbles): 0 = unlabelled, value k = class k-1.
    """
    if not sparse:
        return list(classes), [list(c) for c in colors]
    colors = [list(SPARSE_BACKGROUND)] + [list(c) for c in colors[1:]]
    return ["unlabelled"] + list(classes), [[0, 0, 0]] + colors


def labels_metadata(names: list, colors: list, **extra) -> dict:
    return {META: {"label_names": list(names), "label_colors": [list(c) for c in colors], **extra}}


def labels_kwargs(names: list, colors: list, **extra) -> dict:
    """Layer keyword arguments for labels whose value v is called ``names[v]``: its colour, and
    a features table (row v = value v) so that napari's status bar names the class under the cursor."""
    return {
        "colormap": label_colormap(dict(enumerate(colors))),
        "metadata": labels_metadata(names, colors, **extra),
        "features": {"class": list(names)},
    }


def class_colors(layer) -> dict:
    """Class name -> RGB of a Labels layer the plugin made (strokes or classes); {} for others."""
    meta = (layer.metadata.get(META) or {}) if layer is not None else {}
    return dict(zip(meta.get("label_names") or [], meta.get("label_colors") or []))


def same_colors(names: list, colors: list, like) -> list:
    """``colors`` with the colour the Labels layer ``like`` gives a class of the same name, so a
    class keeps one colour across strokes, preview and result."""
    known = class_colors(like)
    return [list(known.get(name, color)) for name, color in zip(names, colors)]


# --- annotation layers --------------------------------------------------------------------

# A whole-image annotation layer is one uint8 array in memory (napari cannot paint a lazy or
# multiscale one): up to this size it covers the whole image, beyond it the region in view.
ANNOTATION_MAX_BYTES = 256 * 2**20


def new_annotation_layer(viewer, image_layer, level: int, classes: list, colors: list):
    """``(layer, note)``: an empty, paintable Labels layer at pyramid ``level`` of ``image_layer``,
    coloured for scribbles (1 = background, 2 = first class ...). It covers the whole image when
    that is at most ``ANNOTATION_MAX_BYTES``; otherwise the region in view, whose extent is drawn
    as a rectangle and ``note`` says so in one line (None when the whole image is covered)."""
    shape = image_levels(image_layer)[level].shape[:2]
    box, note = (0, 0, shape[0], shape[1]), None
    if shape[0] * shape[1] > ANNOTATION_MAX_BYTES:
        box = visible_box(viewer, image_layer, level)
        if box is None:
            raise ValueError(f"{image_layer.name} is not in view; pan to the region to annotate.")
        if (box[2] - box[0]) * (box[3] - box[1]) > ANNOTATION_MAX_BYTES:
            raise ValueError(f"{image_layer.name} at level {level} is too large to annotate whole; zoom in, or "
                             "choose a coarser level under 'Annotate at'.")
        note = (f"{image_layer.name} at level {level} is too large to annotate whole ({_mib(shape)} MiB); the "
                "annotation layer covers the region in view, outlined in yellow: paint inside it.")
    h, w = box[2] - box[0], box[3] - box[1]
    scale, translate = level_transform(image_layer, level, box[:2])
    names, cols = class_labels(classes, colors, sparse=True)
    name = f"{image_layer.name} annotation"
    if note:
        _draw_extent(viewer, image_layer, level, box, f"{name} extent")
    layer = viewer.add_labels(np.zeros((h, w), np.uint8), name=name, scale=scale,
                              translate=translate, **labels_kwargs(names, cols, annotates=image_layer.name,
                                                                   **placement(image_layer, level, box[:2])))
    layer.selected_label = 2
    layer.brush_size = 10
    layer.mode = "paint"
    return layer, note


def _mib(shape) -> int:
    return int(round(shape[0] * shape[1] / 2**20))


def _draw_extent(viewer, image_layer, level: int, box, name: str):
    """A yellow rectangle around the level-``level`` pixels ``box`` (where painting counts)."""
    d = downsamples(image_levels(image_layer))[level]
    scale = np.asarray(image_layer.scale[-2:], float)
    base = np.asarray(image_layer.translate[-2:], float)
    y0, x0 = base + (np.asarray(box[:2], float) * d - 0.5) * scale
    y1, x1 = base + (np.asarray(box[2:], float) * d - 0.5) * scale
    if name in viewer.layers:
        viewer.layers.remove(name)
    return viewer.add_shapes([[[y0, x0], [y0, x1], [y1, x1], [y1, x0]]], shape_type="rectangle", name=name,
                             edge_color="yellow", face_color="transparent", edge_width=float(3 * scale[0] * d))


def annotation_of(viewer, image_layer):
    """The Labels layer painted over ``image_layer``: the newest one made for it by 'New annotation
    layer' (its metadata says so), else one named '<image> annotation'; None when there is none."""
    layers = [lay for lay in viewer.layers if type(lay).__name__ == "Labels"]
    made = [lay for lay in layers if (lay.metadata.get(META) or {}).get("annotates") == image_layer.name]
    named = [lay for lay in layers if lay.name == f"{image_layer.name} annotation"]
    return (made or named or [None])[-1]


def annotation_classes(layer) -> Optional[list]:
    """The class names a stroke layer made by the plugin paints (background first), else None."""
    names = (layer.metadata.get(META) or {}).get("label_names") if layer is not None else None
    return list(names[1:]) if names and names[0] == "unlabelled" else None


def annotation_arrays(image_layer, labels_layer):
    """``(rgb, labels, level)``: the painted labels and the image pixels under them, read at the
    pyramid level the labels were drawn at (parts outside the image are dropped)."""
    try:
        level, y0, x0 = covered_window(image_layer, labels_layer)
    except ValueError:
        raise ValueError(f"{labels_layer.name} does not lie on a pyramid level of {image_layer.name}; "
                         "make it with 'New annotation layer'.") from None
    labels = labels_layer.data[0] if labels_layer.multiscale else labels_layer.data
    image = image_levels(image_layer)[level]
    H, W = image.shape[:2]
    h, w = labels.shape[-2:]
    ty, tx = max(y0, 0), max(x0, 0)
    by, bx = min(y0 + h, H), min(x0 + w, W)
    if by <= ty or bx <= tx:
        raise ValueError(f"{labels_layer.name} does not overlap {image_layer.name}.")
    rgb = read_window(image, ty, tx, by - ty, bx - tx)
    lab = np.asarray(labels[ty - y0 : by - y0, tx - x0 : bx - x0])
    return rgb, lab, level


def painted_box(image_layer, labels_layer):
    """``(y0, x0, y1, x1)``: the bounding box of the painted pixels of ``labels_layer`` in pixels
    of the image level it lies on, clipped to the image; None when nothing is painted there."""
    level, y0, x0 = covered_window(image_layer, labels_layer)
    labels = labels_layer.data[0] if labels_layer.multiscale else labels_layer.data
    H, W = image_levels(image_layer)[level].shape[:2]
    inside = np.asarray(labels[max(-y0, 0) : max(H - y0, 0), max(-x0, 0) : max(W - x0, 0)])
    rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
    if not len(rows):
        return None
    ty, tx = max(y0, 0), max(x0, 0)
    return ty + int(rows[0]), tx + int(cols[0]), ty + int(rows[-1]) + 1, tx + int(cols[-1]) + 1


def preview_box(view, painted, max_side: int):
    """The region to show a model's prediction on while it trains: the view when it is at most
    ``max_side`` a side, else (zoomed far out, or the image out of view) the painted pixels'
    bounding box; cut to ``max_side`` around its centre. Boxes are ``(y0, x0, y1, x1)``."""
    fits = view is not None and max(view[2] - view[0], view[3] - view[1]) <= max_side
    box = view if fits or painted is None else painted
    if box is None:
        return None
    y0, x0, y1, x1 = box
    cy, cx = max(0, (y0 + y1 - max_side) // 2), max(0, (x0 + x1 - max_side) // 2)
    if y1 - y0 > max_side:
        y0, y1 = cy, cy + max_side
    if x1 - x0 > max_side:
        x0, x1 = cx, cx + max_side
    return int(y0), int(x0), int(y1), int(x1)


PREVIEW_CONTOUR = 2  # the preview is drawn as outlines this many pixels wide: strokes stay visible inside


def show_preview(viewer, image_layer, level: int, payload: dict, below=None):
    """Put a model's prediction (a fine-tuning preview payload: ``labels``, ``origin`` in pixels of
    ``level``, ``classes``, ``colors``) into the one Labels layer ``"<image> preview"``, drawn as
    outlines in the classes' colours on ``below`` (the annotation layer), and made on first use
    just under it, so the painted strokes stay visible inside the outlines."""
    name = f"{image_layer.name} preview"
    scale, translate = level_transform(image_layer, level, payload["origin"])
    colors = same_colors(payload["classes"], payload["colors"], below)
    kwargs = labels_kwargs(payload["classes"], colors, preview_of=image_layer.name,
                           step=payload["step"], **placement(image_layer, level, payload["origin"]))
    if name in viewer.layers:
        layer = viewer.layers[name]
        layer.data = payload["labels"]
        layer.scale, layer.translate = scale, translate
        layer.colormap, layer.metadata, layer.features = kwargs["colormap"], kwargs["metadata"], kwargs["features"]
        return layer
    active = viewer.layers.selection.active  # the brush stays on the layer being painted
    layer = viewer.add_labels(payload["labels"], name=name, scale=scale, translate=translate, opacity=0.9, **kwargs)
    layer.contour = PREVIEW_CONTOUR
    if below is not None and below in viewer.layers:
        viewer.layers.move(viewer.layers.index(layer), viewer.layers.index(below))
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer
