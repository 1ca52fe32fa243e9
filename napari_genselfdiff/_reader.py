"""napari readers: slides and images as lazy multiscale Image layers, genselfdiff label
outputs (OME-Zarr) as multiscale Labels layers, QuPath GeoJSON as Labels.

Pixels come from :func:`genselfdiff.io.slides.open_slide` (the engine's own reader), so napari
shows exactly the arrays the engine segments: one dask array per pyramid level, nothing
decoded until napari draws it, ``scale`` in µm when the file states its pixel size.
"""

from __future__ import annotations

from pathlib import Path

from ._layers import META, labels_kwargs

GEOJSON_MAX_SIDE = 8192
SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".zarr", ".png", ".jpg", ".jpeg")


def get_reader(path):
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        is_zarr = name.endswith(".zarr") or (p / "zarr.json").exists() or (p / ".zattrs").exists()
        return read if is_zarr else None
    return read if name.endswith(SUFFIXES) else None


def read(path) -> list:
    from genselfdiff.io.omezarr import ome_attributes
    from genselfdiff.io.outputs import instances_path

    if isinstance(path, (list, tuple)):
        path = path[0]
    path = Path(path)
    attrs = ome_attributes(path) if path.is_dir() else None
    if attrs is not None and ("image-label" in attrs or "genselfdiff" in attrs):
        layers = [read_label_image(path)]
        if "multiscales" in (ome_attributes(instances_path(path)) or {}):  # segment --instances
            layers.append(read_objects(instances_path(path), layers[0][1]["name"]))
        return layers
    layers = [read_image(path)]
    if attrs is not None and (path / "labels").is_dir():  # NGFF: labels stored beside the image
        for name in _label_names(path / "labels"):
            sub = path / "labels" / name
            if "image-label" in (ome_attributes(sub) or {}):
                layers.append(read_label_image(sub))
    return layers


def read_image(path) -> tuple:
    from genselfdiff.io.slides import open_slide

    slide = open_slide(path)
    mpp = slide.mpp
    meta = {
        "name": slide.name,
        "rgb": True,
        "multiscale": len(slide.levels) > 1,
        "scale": (mpp, mpp) if mpp else (1.0, 1.0),
        "metadata": {META: {"path": str(path), "mpp": mpp}},
        "contrast_limits": (0, 255),
    }
    data = slide.levels if len(slide.levels) > 1 else slide.levels[0]
    return data, meta, "image"


def read_label_image(path) -> tuple:
    """An NGFF label image (a genselfdiff output or any NGFF label image) as a (multiscale)
    Labels layer with its class names and colours."""
    from genselfdiff.io.labels import default_class_names, default_colors, open_label_image
    from genselfdiff.io.outputs import output_stem

    source = open_label_image(path)  # says in plain words when an output is unfinished
    levels = source.levels
    names = source.class_names or default_class_names(1)
    colors = source.colors or default_colors(len(names))
    # Where labels written from a napari layer lie on their slide (level-0 pixels), for GeoJSON export.
    placement = source.genselfdiff.get("placement") or {}
    path = Path(path)
    stem = output_stem(path) if path.name.lower().endswith(".zarr") else path.stem
    meta = {
        "name": stem,
        "multiscale": len(levels) > 1,
        "scale": list(source.scale),
        "translate": list(source.translation),
        **labels_kwargs(names, colors, path=str(path), mpp=source.scale[-1] if source.unit == "micrometer" else None,
                        **placement),
    }
    return (levels if len(levels) > 1 else levels[0]), meta, "labels"


def read_objects(path, name: str) -> tuple:
    """The object ids of a segmentation output as a Labels layer (napari's own colours: one per id)."""
    from genselfdiff.io.labels import open_label_image

    source = open_label_image(path)
    levels = source.levels
    meta = {"name": f"{name} objects", "multiscale": len(levels) > 1, "scale": list(source.scale),
            "translate": list(source.translation), "opacity": 0.5}
    return (levels if len(levels) > 1 else levels[0]), meta, "labels"


def _label_names(labels_dir: Path) -> list:
    from genselfdiff.io.omezarr import ome_attributes

    attrs = ome_attributes(labels_dir) or {}
    return list(attrs.get("labels", [])) or sorted(p.name for p in labels_dir.iterdir() if p.is_dir())


# --- QuPath GeoJSON ---------------------------------------------------------------------

def get_geojson_reader(path):
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return read_geojson if str(path).lower().endswith(".geojson") else None


def read_geojson(path) -> list:
    """QuPath GeoJSON (level-0 pixel coordinates) as a Labels layer.

    The label image needs a size: the slide beside the file with the same name
    (``slide.geojson`` next to ``slide.svs``) gives it, with its µm/px, so the labels overlay
    the slide; otherwise the objects' bounding box from (0, 0) does, in pixel units. Large
    slides are rasterised at the finest pyramid level of at most ``GEOJSON_MAX_SIDE`` pixels.
    """
    import math
    import warnings

    from genselfdiff.io.labels import default_colors
    from genselfdiff.io.qupath import read_geojson as parse
    from genselfdiff.io.rasterize import read_geojson_labels

    if isinstance(path, (list, tuple)):
        path = path[0]
    path = Path(path)
    objects, _ = parse(path)
    slide = _sibling_slide(path)
    if slide is not None:
        level = next((i for i, lv in enumerate(slide.levels) if max(lv.shape[:2]) <= GEOJSON_MAX_SIDE),
                     len(slide.levels) - 1)
        shape, ds, mpp = slide.levels[level].shape[:2], slide.downsample(level), slide.mpp or 1.0
    else:
        rings = [ring for obj in objects for poly in obj.polygons for ring in poly]
        if not rings:
            from genselfdiff.errors import UserError

            raise UserError(f"{path} holds no area objects to turn into labels.")
        extent = (math.ceil(max(float(r[:, 1].max()) for r in rings)), math.ceil(max(float(r[:, 0].max()) for r in rings)))
        ds = float(2 ** max(0, math.ceil(math.log2(max(extent) / GEOJSON_MAX_SIDE))))
        shape, mpp = (math.ceil(extent[0] / ds), math.ceil(extent[1] / ds)), 1.0
    labels, names, warns = read_geojson_labels(path, shape, downsample=ds)
    for text in warns[:5]:
        warnings.warn(text)
    colors = default_colors(len(names))
    for obj in objects:
        if obj.color is not None and obj.name in names:
            colors[names.index(obj.name)] = obj.color
    meta = {"name": path.stem, "scale": (mpp * ds, mpp * ds), "translate": ((ds - 1) / 2 * mpp,) * 2,
            **labels_kwargs(names, colors, path=str(path), downsample=ds, offset=[0, 0])}
    return [(labels, meta, "labels")]


def _sibling_slide(path: Path):
    from genselfdiff.errors import UserError
    from genselfdiff.io.files import IMAGE_SUFFIXES, image_stem
    from genselfdiff.io.slides import open_slide

    for candidate in sorted(path.parent.iterdir()):
        if candidate != path and candidate.name.lower().endswith(IMAGE_SUFFIXES) and image_stem(candidate) == path.stem:
            try:
                return open_slide(candidate)
            except UserError:
                continue
    return None
