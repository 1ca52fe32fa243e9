"""Where a segmentation's files go: the one place that names them.

For an image ``NAME`` segmented into ``OUT/``:

- ``OUT/NAME.ome.zarr``: the class labels (NGFF 0.5 label image), with its pyramid;
- ``OUT/NAME.ome.zarr/instances``: the object ids (``segment --instances``);
- ``OUT/NAME.png``: the class labels as a PNG (``--png``);
- ``OUT/NAME_instances.png``: the object ids renumbered 1..n (``--png --instances``);
- ``OUT/NAME_objects.csv``: objects per class and per mm² of tissue.

The CLI, the napari worker, reader and writer all name these files through here.
"""

from __future__ import annotations

from pathlib import Path

INSTANCES_GROUP = "instances"  # the object ids inside a segmentation output
GEOMETRY_GROUP = "geometry"  # foreground probability and geometry maps, for the objects pass
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
