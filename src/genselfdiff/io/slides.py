"""Opening slides and images as lazy multiscale dask arrays.

Every format becomes a :class:`Slide`: a list of dask arrays, one per pyramid level,
each ``(Y, X, 3)`` uint8, level 0 first, plus the level-0 pixel size in µm when the file
states it or the user gives it (:mod:`genselfdiff.io.pixelsize` decides which wins). Pyramidal TIFF/SVS/OME-TIFF/NDPI are read through tifffile's zarr store, so
only the chunks a computation touches are decoded; OME-Zarr is read with zarr; PNG and
JPEG are small by nature and read whole. The napari reader and the engine share this.
:func:`open_labelled_image` opens an image at a training resolution together with its labels
(a mask file, an array or a label pyramid) on the same grid: labels of the whole image follow
the image to a coarser level, masks by nearest neighbour, strokes so that no painted pixel is lost.
Which paths are images, and finding them in folders, is :mod:`genselfdiff.io.files`.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import dask.array as da
import numpy as np

from ..errors import UserError
from .files import PLAIN_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, image_stem
from .labels import as_label_array, read_mask, require_integers, resize_labels, shrink_strokes
from .pixelsize import Resolution


@dataclass
class Slide:
    path: Path
    levels: list  # dask arrays (Y, X, 3) uint8, level 0 first
    mpp: Optional[float] = None  # µm per pixel at level 0, when known
    metadata: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # one-line messages for the user (e.g. a pixel size overridden)
    _derived: dict = field(default_factory=dict, repr=False)  # (base, factor) -> index of a derived level

    @property
    def name(self) -> str:
        return image_stem(self.path)

    @property
    def shape(self) -> tuple:
        return tuple(self.levels[0].shape)

    def downsample(self, level: int) -> float:
        return self.levels[0].shape[1] / self.levels[level].shape[1]

    def mpp_at(self, level: int) -> Optional[float]:
        return None if self.mpp is None else self.mpp * self.downsample(level)

    def level_for(self, resolution: Resolution, tolerance: float = 1.25) -> int:
        """The pyramid level at the requested µm/px (or the requested level).

        When no level is within ``tolerance`` of the µm/px but a finer one is, a level is
        derived from the finer one lazily by averaging f x f pixel blocks (f a whole number),
        as a scanner builds its pyramid: a model trained at 0.5 µm/px then reads a 0.25 µm/px
        PNG. The nearest level is returned when that is impossible; callers judge it.
        """
        if resolution.mpp is not None and self.mpp is not None:
            want = resolution.mpp
            errors = [abs(np.log(self.mpp_at(i) / want)) for i in range(len(self.levels))]
            best = int(np.argmin(errors))
            finer = [i for i in range(len(self.levels)) if self.mpp_at(i) <= want * tolerance]
            if errors[best] > np.log(tolerance) and finer:
                base = finer[-1]  # the coarsest level that is still fine enough
                factor = round(want / self.mpp_at(base))
                if factor >= 2 and abs(np.log(self.mpp_at(base) * factor / want)) < errors[best]:
                    return self._derived_level(base, factor)
            return best
        if resolution.level >= len(self.levels):
            known = "" if self.mpp is None else f" at {self.mpp:g} µm/px"
            raise UserError(f"{self.path} has {len(self.levels)} pyramid level(s){known}, but the model works at level "
                            f"{resolution.level} without a known µm/px; give the image as a pyramid "
                            "(e.g. OME-TIFF) with that level.")
        return resolution.level

    def _derived_level(self, base: int, factor: int) -> int:
        """Append ``levels[base]`` averaged over ``factor`` x ``factor`` blocks (once); its index."""
        if (base, factor) not in self._derived:
            coarse = da.coarsen(np.mean, self.levels[base], {0: factor, 1: factor}, trim_excess=True)
            self.levels.append(coarse.round().astype(np.uint8))
            self._derived[base, factor] = len(self.levels) - 1
        return self._derived[base, factor]

    def thumbnail_level(self, max_side: int = 2048) -> int:
        """The finest level whose longer side is at most ``max_side`` (else the coarsest)."""
        for i, lv in enumerate(self.levels):
            if max(lv.shape[:2]) <= max_side:
                return i
        return len(self.levels) - 1


def open_slide(path, pixel_size=None, override_pixel_size: bool = False) -> Slide:
    """Open any supported image lazily. Raises :class:`UserError` naming the file.

    ``pixel_size``: the µm/px of level 0 as the user gives it, for files that state none
    (PNG, JPEG, plain TIFF) or to correct one; see :func:`genselfdiff.io.pixelsize.resolve_pixel_size`
    for which wins and when ``override_pixel_size`` is needed.
    """
    from .pixelsize import check_pixel_size, resolve_pixel_size

    path = Path(path)
    given = check_pixel_size(pixel_size, path)  # a bad value is the user's mistake even when the file is too
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    lower = path.name.lower()
    try:
        if lower.endswith(ZARR_SUFFIXES) or (path.is_dir() and (path / "zarr.json").exists()):
            slide = _open_zarr(path)
        elif lower.endswith(TIFF_SUFFIXES):
            slide = _open_tiff(path)
        elif lower.endswith(PLAIN_SUFFIXES):
            slide = _open_plain(path)
        else:
            raise UserError(f"{path} is not a supported image (use TIFF/SVS/OME-TIFF, OME-Zarr, PNG or JPEG).")
    except UserError:
        raise
    except Exception as e:  # corrupt or truncated files raise all kinds of errors in the decoders
        raise UserError(f"{path} could not be read ({type(e).__name__}: {e}); it may be corrupt or truncated.") from None
    slide.levels = [_as_rgb_uint8(lv, path) for lv in slide.levels]
    mpp, note = resolve_pixel_size(path, slide.mpp, given, override_pixel_size)
    if mpp != slide.mpp:  # the slide is new: set its pixel size in place
        slide.metadata["stated_mpp"], slide.mpp = slide.mpp, mpp
        slide.notes += [note] if note else []
    return slide


def with_pixel_size(slide: Slide, pixel_size=None, override: bool = False) -> Slide:
    """``slide`` with the given level-0 pixel size applied (a copy when it changes; a note when the
    file stated another)."""
    from .pixelsize import resolve_pixel_size

    mpp, note = resolve_pixel_size(slide.path, slide.mpp, pixel_size, override)
    if mpp == slide.mpp:
        return slide
    return replace(slide, mpp=mpp, levels=list(slide.levels), _derived=dict(slide._derived),
                   notes=list(slide.notes) + ([note] if note else []), metadata={**slide.metadata, "stated_mpp": slide.mpp})


def as_slide(image, pixel_size=None, override_pixel_size: bool = False, name: str = "image") -> Slide:
    """A path, :class:`Slide`, array (H, W[, C]) or list of arrays (a pyramid) as a Slide, with the
    given level-0 pixel size applied (see :func:`open_slide`); ``name`` names an array in messages."""
    if isinstance(image, (str, Path)):
        return open_slide(image, pixel_size, override_pixel_size)
    slide = image if isinstance(image, Slide) else Slide(Path(name), _levels_of(image), None)
    return with_pixel_size(slide, pixel_size, override_pixel_size)


def _levels_of(image) -> list:
    """An array (H, W[, C]) or list of arrays (a pyramid) as RGB uint8 dask levels."""
    out = []
    for lv in list(image) if isinstance(image, (list, tuple)) else [image]:
        if not hasattr(lv, "shape") or not hasattr(lv, "dtype"):
            raise UserError(f"Cannot use a {type(lv).__name__} as an image; pass an image path or an (H, W, 3) array.")
        arr = lv if isinstance(lv, da.Array) else da.from_array(np.asarray(lv), chunks=(2048, 2048) + (-1,) * (lv.ndim - 2))
        if arr.ndim == 2:
            arr = arr[..., None]
        out.append(_as_rgb_uint8(arr, "The image"))
    return out


def read_region(slide: Slide, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """A window of one level as uint8 (h, w, 3), zero-padded (white) where it leaves the image."""
    arr = slide.levels[level]
    H, W = arr.shape[:2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    out = np.full((h, w, 3), 255, np.uint8)
    if y1 > y0 and x1 > x0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = np.asarray(arr[y0:y1, x0:x1])
    return out


# --- an image with its labels ------------------------------------------------------------

@dataclass
class LabelledLevel:
    """One image level (uint8 (H, W, 3), lazy where the file allows) and its integer labels (H, W)."""

    name: str
    image: object
    labels: object
    level: int = 0
    downsample: float = 1.0
    mpp: Optional[float] = None  # µm/px of this level, when known
    image_source: Optional[str] = None  # the image file, when there is one
    label_source: str = "the labels"  # the mask file, or a description, for messages
    notes: list = field(default_factory=list)  # what the user should know (a pixel size overridden)


def open_labelled_image(image, labels, resolution, *, pixel_size=None, override_pixel_size: bool = False,
                        index: int = 0, label_name: Optional[str] = None, sparse: bool = False) -> LabelledLevel:
    """Image ``index`` (counted from 0, for messages) and its labels at ``resolution``, checking their sizes.

    A path or :class:`Slide` (and any image when ``pixel_size`` is given) is opened as a slide
    (:func:`as_slide`); an array or a list of arrays (a pyramid, as napari
    holds one) must be 8-bit RGB.
    """
    what = f"image #{index + 1}"
    if pixel_size is not None or isinstance(image, (str, Path, Slide)):
        image = as_slide(image, pixel_size, override_pixel_size, name=what)
    elif isinstance(image, (list, tuple)):
        image = Slide(Path(what), [_as_rgb(lv, what) for lv in image], None)
    if isinstance(labels, (list, tuple)) and not isinstance(image, Slide):
        raise UserError(f"The labels of {what} are a pyramid but the image is not; give one label array.")
    if isinstance(image, Slide):
        level = image.level_for(resolution)
        arr, name, source = image.levels[level], image.name, str(image.path)
        downsample, mpp, notes = image.downsample(level), image.mpp_at(level), list(image.notes)
    else:
        arr, name, source, level, downsample, mpp, notes = _as_rgb(image, what), what, None, 0, 1.0, None, []
    if isinstance(labels, (list, tuple)):  # a label pyramid: the level of the same size as the image's
        labels = next((lv for lv in labels if tuple(lv.shape[:2]) == tuple(arr.shape[:2])), labels[0])
    if isinstance(labels, (str, Path)):
        label_name = label_name or str(labels)
        lab = read_mask(labels)
    else:
        label_name = label_name or f"the labels of {source or name}"
        lab = require_integers(as_label_array(labels, label_name), label_name)
    if isinstance(image, Slide) and level and tuple(lab.shape) == tuple(image.shape[:2]):
        # a mask of the whole image, read at a coarser working scale
        lab = shrink_strokes(lab, arr.shape[:2]) if sparse else resize_labels(lab, arr.shape[:2])
    if tuple(lab.shape) != tuple(arr.shape[:2]):
        where = f" at pyramid level {level}" if level else ""
        raise UserError(f"{label_name} is {lab.shape[0]}x{lab.shape[1]} pixels but {source or name} is "
                        f"{arr.shape[0]}x{arr.shape[1]}{where}; a mask must have the size of its image at the training resolution.")
    return LabelledLevel(name, arr, lab, level, downsample, mpp, source, label_name, notes)


def _as_rgb(arr, name: str):
    """An 8-bit array (H, W[, 1|3|4]) as RGB (H, W, 3); other pixel types are refused."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise UserError(f"{name} has shape {tuple(arr.shape)}; expected an RGB image (H, W, 3).")
    if np.dtype(arr.dtype) != np.uint8:
        raise UserError(f"{name} holds {arr.dtype} pixels; expected 8-bit RGB (uint8).")
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.shape[2] == 1:
        arr = np.repeat(np.asarray(arr), 3, axis=2)
    return arr


# --- formats -----------------------------------------------------------------------------

# tifffile logs, rather than raises, tags it cannot read; these ones mean pixels are missing
# (the offsets or byte counts of strips/tiles), and the file would read as blank.
_MISSING_PIXELS = re.compile(r"missing (data offset|data ByteCounts|ByteCounts)|TiffTag (273|279|324|325)\b")


@contextmanager
def _tifffile_problems():
    """Collect tifffile's log records (a list of messages) instead of letting them print
    ahead of our own one-sentence message."""
    import logging
    import threading

    problems, me = [], threading.get_ident()

    class Keep(logging.Handler):
        def emit(self, record):
            if record.thread == me:  # another thread's file is not this one's problem
                problems.append(record.getMessage())

    log, handler = logging.getLogger("tifffile"), Keep(logging.WARNING)
    log.addHandler(handler)
    try:
        yield problems
    finally:
        log.removeHandler(handler)


def _open_tiff(path: Path) -> Slide:
    import tifffile
    import zarr

    with _tifffile_problems() as problems:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise UserError(f"{path} holds no image.")
            series = tif.series[0]
            axes = series.axes
            mpp = _tiff_mpp(tif)
            nlevels = len(series.levels)
        store = tifffile.imread(path, aszarr=True, series=0)
    damage = [m for m in problems if _MISSING_PIXELS.search(m)]
    if damage:
        store.close()
        raise UserError(f"{path} is damaged: the positions of its pixel data cannot be read "
                        f"(tifffile: {damage[0]}); it may be corrupt or truncated.")
    group = zarr.open(store, mode="r")
    if nlevels > 1 or hasattr(group, "keys") and not hasattr(group, "shape"):
        arrays = [group[str(i)] for i in range(nlevels)]
    else:
        arrays = [group]
    levels = [_to_yxc(da.from_zarr(a), axes, path) for a in arrays]
    return Slide(path, levels, mpp, {"axes": axes})


def _to_yxc(arr: da.Array, axes: str, path: Path) -> da.Array:
    """Reorder a tifffile/NGFF array to (Y, X, C), taking the first index of T, Z, etc."""
    axes = axes.upper().replace("S", "C")
    if len(axes) != arr.ndim:
        raise UserError(f"{path} has axes {axes!r} that do not match its shape {arr.shape}.")
    index = tuple(slice(None) if a in "YXC" else 0 for a in axes)
    arr = arr[index]
    kept = [a for a in axes if a in "YXC"]
    if "C" not in kept:
        arr, kept = arr[..., None], kept + ["C"]
    return arr.transpose([kept.index(a) for a in "YXC"])


def _tiff_mpp(tif) -> Optional[float]:
    page = tif.pages[0]
    desc = page.description or ""
    if tif.is_svs:
        m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
        if m:
            return float(m.group(1))
    if tif.is_ome and tif.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if m:
            factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit.group(1) if unit else "µm", 1.0)
            return float(m.group(1)) * factor
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den and unit in (2, 3):  # pixels per inch / per cm
            per_um = (num / den) / (25400.0 if unit == 2 else 10000.0)
            mpp = 1.0 / per_um
            if 0.01 < mpp < 100:  # 72-dpi defaults and the like are not physical
                return mpp
    return None


def _open_zarr(path: Path) -> Slide:
    import zarr

    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise UserError(f"{path} is a zarr store without OME-Zarr multiscales metadata.")
    ms = multiscales[0]
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])).upper()
    levels, mpp = [], None
    for i, ds in enumerate(ms["datasets"]):
        arr = da.from_zarr(group[ds["path"]])
        ax = axes or ("YXC"[-arr.ndim:] if arr.ndim <= 3 else "TCZYX"[-arr.ndim:])
        levels.append(_to_yxc(arr, ax, path))
        if i == 0:
            for t in ds.get("coordinateTransformations", []):
                if t.get("type") == "scale" and "X" in ax:
                    mpp = float(t["scale"][ax.index("X")])
    return Slide(path, levels, mpp, {"axes": axes})


def _open_plain(path: Path) -> Slide:
    from skimage import io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = np.asarray(io.imread(path))
    if img.ndim == 2:
        img = img[..., None]
    return Slide(path, [da.from_array(img, chunks=(1024, 1024, -1))], None)


def _as_rgb_uint8(arr: da.Array, path: Path) -> da.Array:
    if arr.ndim != 3:
        raise UserError(f"{path} has {arr.ndim} dimensions after selecting one plane; expected a 2-D colour image.")
    c = arr.shape[2]
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise UserError(f"{path} has pixel type {arr.dtype}; only 8- and 16-bit images are supported.")
    if c == 1:
        arr = da.concatenate([arr] * 3, axis=2)
    elif c == 4:
        arr = arr[..., :3]
    elif c != 3:
        raise UserError(f"{path} has {c} channels; expected an RGB (3) or grey (1) image.")
    return arr

