"""Label images read from disk, and the one naming and colouring of their classes.

Every part of the project that opens a label image (evaluation, fine-tuning masks, GeoJSON
export, the napari reader) goes through :func:`open_label_image`, so a file gets the same
class names and colours wherever it is opened. It reads PNG/BMP (whole), TIFF (lazily,
through tifffile's zarr store) and OME-Zarr label images (lazily, every pyramid level),
including an NGFF image whose ``labels`` group holds them (the first is used).

Classes are named from NGFF ``image-label`` metadata when a file has it. Where nothing
names a class, label 0 is ``"background"`` and label ``k`` is ``"class k"``
(:func:`default_class_name`); colours default to :data:`DEFAULT_COLORS` by label value.
This module imports neither torch nor napari, so opening a file stays cheap.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError

DEFAULT_COLORS = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
]
COLOUR_CHECK_SIDE = 1024  # lazy colour masks are checked on this corner only: reading all could take minutes


def default_colors(n: int) -> list:
    """RGB colours for labels 0 .. n-1 (label 0 black), repeating after ten."""
    return [list(DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i in range(n)]


def default_class_name(label: int) -> str:
    """The name of a class nothing else names: ``"background"`` for 0, ``"class k"`` otherwise."""
    return "background" if label == 0 else f"class {label}"


def default_class_names(n: int) -> list:
    return [default_class_name(k) for k in range(n)]


@dataclass
class LabelSource:
    """A label image opened for reading: its levels (finest first, read lazily where the format
    allows), class names and colours by label value when the file stores them, and placement."""

    levels: list
    path: Path
    class_names: Optional[list] = None
    colors: Optional[list] = None
    scale: tuple = (1.0, 1.0)  # size of a level-0 pixel (y, x), in ``unit`` (None: unitless)
    translation: tuple = (0.0, 0.0)  # where the centre of the first pixel lies, same unit
    unit: Optional[str] = None
    genselfdiff: dict = field(default_factory=dict)  # our own attributes of an OME-Zarr output

    @property
    def array(self):
        """The finest level: a 2-D array of label values."""
        return self.levels[0]


def open_label_image(path) -> LabelSource:
    """Open a label image (PNG/BMP, TIFF, or OME-Zarr) without reading more pixels than needed.

    A colour image is accepted only when its three channels are equal (a grey PNG saved as
    RGB); anything else that is not a 2-D image raises :class:`UserError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    name = path.name.lower()
    try:
        if name.endswith(".zarr") or (path.is_dir() and ((path / "zarr.json").exists() or (path / ".zattrs").exists())):
            return _open_zarr(path)
        if name.endswith((".tif", ".tiff")):
            import dask.array as da
            import tifffile
            import zarr

            store = tifffile.imread(path, aszarr=True, series=0, level=0)
            return LabelSource([as_label_array(da.from_zarr(zarr.open(store, mode="r")), str(path))], path)
        if name.endswith((".png", ".bmp")):
            from skimage import io

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # skimage warns about low-contrast images: labels are
                return LabelSource([as_label_array(np.asarray(io.imread(path)), str(path))], path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} could not be read as a label image ({type(e).__name__}: {e}).") from None
    raise UserError(f"{path} is not a label image this tool reads (use PNG, TIFF or OME-Zarr).")


def load_labels(path) -> list:
    """The levels of a label image (finest first); says in plain words when an output is unfinished."""
    return open_label_image(path).levels


def as_label_array(arr, name: str):
    """``arr`` as a 2-D label array: leading axes of size 1 dropped, a grey RGB(A) image reduced
    to one channel, booleans as 0/1. ``name`` says what it is in messages."""
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        probe = arr if isinstance(arr, np.ndarray) else np.asarray(arr[:COLOUR_CHECK_SIDE, :COLOUR_CHECK_SIDE])
        if not (np.array_equal(probe[..., 0], probe[..., 1]) and np.array_equal(probe[..., 0], probe[..., 2])):
            raise UserError(f"{name} is a colour image; a label image must hold one class number per pixel "
                            "(grey levels 0, 1, 2, ...).")
        arr = arr[..., 0]
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise UserError(f"{name} has shape {tuple(arr.shape)}; a label image must be 2-D.")
    if np.dtype(arr.dtype) == np.bool_:
        arr = arr.astype(np.uint8)
    return arr


def require_integers(arr, name: str):
    """``arr`` unchanged if it holds integers; a :class:`UserError` naming ``name`` otherwise."""
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "iu":
        raise UserError(f"{name} holds {dtype} values; a mask must hold integer class numbers.")
    return arr


def read_mask(path):
    """A mask file as a 2-D integer label array (lazy for TIFF and OME-Zarr, whole for PNG)."""
    return require_integers(open_label_image(path).array, f"Mask {path}")


# --- on another grid -----------------------------------------------------------------------

def resize_labels(labels, shape: tuple):
    """A label image (numpy or dask) on another grid of the same field of view, by nearest
    neighbour (the pixel under each new pixel's centre), lazily for dask."""
    H, W = labels.shape[:2]
    h, w = int(shape[0]), int(shape[1])
    if (H, W) == (h, w):
        return labels
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.intp), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.intp), W - 1)
    return labels[rows, :][:, cols]


def shrink_strokes(labels, shape: tuple) -> np.ndarray:
    """Sparse labels on a coarser grid: each new pixel takes the most painted class of the
    pixels it covers (0 = unlabelled only where none is painted), so a stroke thinner than
    the reduction survives; a non-integer ratio falls back to nearest neighbour."""
    lab = np.asarray(labels)
    (H, W), (h, w) = lab.shape[:2], (int(shape[0]), int(shape[1]))
    fy, fx = round(H / h), round(W / w)
    if fy < 1 or fx < 1 or abs(H / h - fy) > 0.05 * fy or abs(W / w - fx) > 0.05 * fx:
        return np.asarray(resize_labels(lab, shape))
    padded = np.zeros((h * fy, w * fx), lab.dtype)
    padded[: min(H, h * fy), : min(W, w * fx)] = lab[: h * fy, : w * fx]
    blocks = padded.reshape(h, fy, w, fx)
    out = np.zeros((h, w), lab.dtype)
    best = np.zeros((h, w), np.int32)
    for value in np.unique(lab):
        if value == 0:
            continue
        count = (blocks == value).sum((1, 3))
        win = count > best
        out[win], best[win] = value, count[win]
    return out


# --- NGFF ----------------------------------------------------------------------------------

def class_metadata(image_label: dict) -> tuple:
    """``(class names, RGB colours)`` by label value from NGFF ``image-label`` metadata.

    Both lists run from label 0 to the largest value the metadata mentions; what it leaves
    out gets the defaults. ``(None, None)`` when it names no label at all.
    """
    props = {int(p["label-value"]): p for p in image_label.get("properties", []) if "label-value" in p}
    cols = {int(c["label-value"]): c.get("rgba") for c in image_label.get("colors", []) if "label-value" in c}
    if not props and not cols:
        return None, None
    n = max(list(props) + list(cols)) + 1
    # NGFF leaves the property key free: we write "class"; "name" is common elsewhere.
    names = [str(props.get(k, {}).get("class") or props.get(k, {}).get("name") or default_class_name(k))
             for k in range(n)]
    fallback = default_colors(n)
    colors = [[int(v) for v in cols[k][:3]] if cols.get(k) else fallback[k] for k in range(n)]
    return names, colors


def _open_zarr(path: Path) -> LabelSource:
    import dask.array as da
    import zarr

    from .omezarr import ome_attributes, read_attributes

    where, ome = path, ome_attributes(path)
    if ome is None:
        raise UserError(f"{path} is not a zarr store.")
    if "image-label" not in ome and (path / "labels").is_dir():  # an image with labels: use the first
        where = path / "labels"
        ome = ome_attributes(where) or {}
    if "multiscales" not in ome and ome.get("labels"):  # a "labels" group: its first label image
        where = where / ome["labels"][0]
        ome = ome_attributes(where) or {}
    mine = (read_attributes(where) or {}).get("genselfdiff") or {}
    if not ome.get("multiscales"):
        if mine:
            raise UserError(f"{path} is unfinished; run the same segment command again to complete it.")
        raise UserError(f"{path} is a zarr store without OME-Zarr multiscales or labels metadata.")
    multiscale = ome["multiscales"][0]
    group = zarr.open_group(where, mode="r")
    levels = [as_label_array(da.from_zarr(group[d["path"]]), str(path)) for d in multiscale["datasets"]]
    scale, translation = (1.0, 1.0), (0.0, 0.0)
    for t in multiscale["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = tuple(float(v) for v in t["scale"][-2:])
        elif t.get("type") == "translation":
            translation = tuple(float(v) for v in t["translation"][-2:])
    axes = multiscale.get("axes") or [{}]
    unit = axes[-1].get("unit") if isinstance(axes[-1], dict) else None
    names, colors = class_metadata(ome.get("image-label") or {})
    return LabelSource(levels, path, names, colors, scale, translation, unit, mine)
