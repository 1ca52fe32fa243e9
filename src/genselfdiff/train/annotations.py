"""Labelled patches for fine-tuning: drawn around annotated pixels, with context.

A pathologist may paint three strokes on a 100 000-pixel-wide slide, or hand over a
folder of dense masks. Both become a list of :class:`LabelledImage`: an image (read
lazily, a window at a time, through a small cache) and its labels at the same pixel
grid. One pass over the labels, block by block, counts the label values, counts the
annotated pixels per tile and keeps a uniform sample of annotated positions per value
(at most ``max_points``), so a huge, mostly empty label layer is never held twice.

Training patches are centred near an annotated position (anywhere but the outer eighth
of the patch), so every patch carries labels and the network sees the surrounding
tissue. Labels become class targets: dense masks 0 = background = class 0, value k =
class k; sparse scribbles 0 = unlabelled (``IGNORE``), value k = class k - 1. Pixels
outside the image are ``IGNORE`` too.

Validation holds out whole tiles (one patch side square) rather than whole images, so
one annotated image still gets a validation set; held-out tiles are ignored in every
training patch (their pixels may appear as context, never as targets).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from ..io.labels import default_class_names
from ..io.slides import LabelledLevel, open_labelled_image
from . import priors
from .losses import IGNORE

# --- reading ----------------------------------------------------------------------------

class WindowReader:
    """``read(y, x, h, w)`` of a 2-D or 3-D array, padded with ``fill`` outside it.

    Small arrays are loaded once; large lazy ones (dask, zarr, a slide level) are read in
    ``cell``-sized blocks kept in a least-recently-used cache, because patches around a
    few strokes hit the same few blocks again and again.
    """

    def __init__(self, array, fill, cell: int = 1024, max_bytes: int = 512 * 2**20, load_below: int = 256 * 2**20):
        self.shape = tuple(int(s) for s in array.shape)
        self.fill = fill
        self.cell = cell
        nbytes = int(np.prod(self.shape)) * np.dtype(array.dtype).itemsize
        self.array = np.asarray(array) if isinstance(array, np.ndarray) or nbytes <= load_below else array
        self.dtype = self.array.dtype
        self.cache: OrderedDict = OrderedDict()
        self.transform = None  # what map() set for a lazy array, applied to each cell as it is read
        self.lock = threading.Lock()  # patches may be read from several threads
        self.max_cells = max(4, max_bytes // max(1, cell * cell * (self.shape[2] if len(self.shape) == 3 else 1)
                                                 * np.dtype(self.dtype).itemsize))

    def map(self, fn) -> None:
        """From now on read ``fn(pixels)``; ``fn`` works pixel by pixel (a stain normalization)."""
        with self.lock:
            if isinstance(self.array, np.ndarray):
                self.array = fn(self.array)
            else:
                self.transform = fn
                self.cache.clear()

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        H, W = self.shape[:2]
        out = np.full((h, w) + self.shape[2:], self.fill, self.dtype)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        if y1 <= y0 or x1 <= x0:
            return out
        if isinstance(self.array, np.ndarray):
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.array[y0:y1, x0:x1]
            return out
        c = self.cell
        for cy in range(y0 // c, (y1 - 1) // c + 1):
            for cx in range(x0 // c, (x1 - 1) // c + 1):
                block = self._cell(cy, cx)
                by0, bx0 = max(y0, cy * c), max(x0, cx * c)
                by1, bx1 = min(y1, cy * c + block.shape[0]), min(x1, cx * c + block.shape[1])
                out[by0 - y : by1 - y, bx0 - x : bx1 - x] = block[by0 - cy * c : by1 - cy * c, bx0 - cx * c : bx1 - cx * c]
        return out

    def _cell(self, cy: int, cx: int) -> np.ndarray:
        key = (cy, cx)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        c = self.cell
        block = np.asarray(self.array[cy * c : (cy + 1) * c, cx * c : (cx + 1) * c])
        if self.transform is not None:
            block = self.transform(block)
        with self.lock:
            self.cache[key] = block
            while len(self.cache) > self.max_cells:
                self.cache.popitem(last=False)
        return block


# --- the annotated images -------------------------------------------------------------

@dataclass
class LabelledImage:
    """One image and its labels on the same pixel grid (the training resolution)."""

    name: str
    image: WindowReader  # uint8 (H, W, 3), padded white
    labels: WindowReader  # integer label values (H, W), padded 0
    level: int = 0
    downsample: float = 1.0
    mpp: Optional[float] = None
    image_source: Optional[str] = None  # the image file, when there is one
    label_source: str = "the labels"  # the mask file, or a description, for messages
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # pixels per label value
    points: dict = field(default_factory=dict)  # label value -> (n, 2) int32 (y, x), a uniform sample
    tile_counts: Optional[np.ndarray] = None  # annotated pixels per tile (ny, nx)
    val_tiles: Optional[np.ndarray] = None  # bool (ny, nx)
    ids: Optional[WindowReader] = None  # instance ids on the same grid (for the geometry head), or None

    @property
    def shape(self) -> tuple:
        return self.image.shape[:2]


def labelled_image(level: LabelledLevel) -> LabelledImage:
    """An opened image and its labels (:func:`genselfdiff.io.slides.open_labelled_image`), read
    through window caches."""
    return LabelledImage(name=level.name, image=WindowReader(level.image, 255), labels=WindowReader(level.labels, 0),
                         level=level.level, downsample=level.downsample, mpp=level.mpp,
                         image_source=level.image_source, label_source=level.label_source)


def normalize_stains(items: list) -> None:
    """Each item's image read stain-normalised from now on (:mod:`genselfdiff.nn.stain`), fitted on
    the image at the training resolution as segmentation fits it (the same windows, whatever the
    run's seed); an image without two stains (too little tissue, or not H&E) is left as it is."""
    from ..nn.stain import fit_image

    for it in items:
        stain = fit_image(it.image.read, it.shape)
        if stain is not None:
            it.image.map(stain.apply)


def open_labelled(image, labels, resolution, *, index: int = 0, label_name: Optional[str] = None,
                  sparse: bool = False) -> LabelledImage:
    """:func:`labelled_image` of :func:`~genselfdiff.io.slides.open_labelled_image` (without a pixel size)."""
    return labelled_image(open_labelled_image(image, labels, resolution, index=index, label_name=label_name,
                                              sparse=sparse))


def scan(item: LabelledImage, *, sparse: bool, tile: int, max_points: int = 200_000, seed: int = 0,
         block: int = 2048) -> None:
    """One pass over the labels: value counts, annotated pixels per tile, and position samples."""
    rng = np.random.default_rng(seed)
    H, W = item.shape
    arr = item.labels.array
    block = tile * max(1, block // tile)  # whole tiles per block
    counts = np.zeros(1, np.int64)
    tiles = np.zeros((-(-H // tile), -(-W // tile)), np.int64)
    keep: dict = {}  # value -> (coords (n, 2), random keys (n,))
    for y0 in range(0, H, block):
        for x0 in range(0, W, block):
            blk = np.asarray(arr[y0 : y0 + block, x0 : x0 + block])
            if blk.dtype.kind == "i" and blk.size and blk.min() < 0:
                raise UserError(f"{item.label_source} holds negative values; class numbers start at 0.")
            annotated = blk > 0 if sparse else np.ones(blk.shape, bool)
            if not annotated.any():
                continue
            bc = np.bincount(blk.ravel().astype(np.int64))
            counts = np.pad(counts, (0, max(0, len(bc) - len(counts))))
            counts[: len(bc)] += bc
            bh, bw = blk.shape
            padded = np.zeros((-(-bh // tile) * tile, -(-bw // tile) * tile), np.int64)
            padded[:bh, :bw] = annotated
            t = padded.reshape(padded.shape[0] // tile, tile, padded.shape[1] // tile, tile).sum((1, 3))
            tiles[y0 // tile : y0 // tile + t.shape[0], x0 // tile : x0 // tile + t.shape[1]] += t
            for v in np.nonzero(bc)[0]:
                if sparse and v == 0:
                    continue
                ys, xs = np.nonzero(blk == v)
                coords = np.stack([ys + y0, xs + x0], 1).astype(np.int32)
                keys = rng.random(len(coords))
                if v in keep:
                    coords = np.concatenate([keep[v][0], coords])
                    keys = np.concatenate([keep[v][1], keys])
                if len(keys) > max_points:  # the max_points smallest random keys: a uniform sample
                    top = np.argpartition(keys, max_points)[:max_points]
                    coords, keys = coords[top], keys[top]
                keep[int(v)] = (coords, keys)
    item.counts = counts
    item.points = {v: c for v, (c, _) in keep.items()}
    item.tile_counts = tiles
    item.val_tiles = np.zeros(tiles.shape, bool)


def split_tiles(items: list, val_fraction: float, seed: int = 0) -> bool:
    """Mark a fraction of the annotated tiles, over all images, for validation.

    Returns False when there are too few annotated tiles to split (validation then
    scores the training tiles).
    """
    annotated = [(i, ty, tx) for i, it in enumerate(items) for ty, tx in zip(*np.nonzero(it.tile_counts))]
    for it in items:
        it.val_tiles[:] = False
    if val_fraction <= 0 or len(annotated) < 2:
        return False
    rng = np.random.default_rng(seed)
    n_val = min(len(annotated) - 1, max(1, int(round(val_fraction * len(annotated)))))
    for k in rng.choice(len(annotated), n_val, replace=False):
        i, ty, tx = annotated[k]
        items[i].val_tiles[ty, tx] = True
    return True


def to_targets(values: np.ndarray, sparse: bool) -> np.ndarray:
    """Label values -> int64 class targets with ``IGNORE`` for unlabelled pixels (sparse)."""
    t = values.astype(np.int64)
    return np.where(t > 0, t - 1, IGNORE) if sparse else t


def attach_instances(item: LabelledImage, source, mask, index: int = 0) -> None:
    """Give ``item`` the instance ids of ``source`` (a path or an integer array of the mask's size, which
    is ``mask``'s), on its training grid and fitted to its classes (:func:`~genselfdiff.nn.geometry.fit_instances`)."""
    from ..io.labels import as_label_array, read_mask, require_integers, resize_labels
    from ..nn.geometry import fit_instances

    name = str(source) if isinstance(source, (str, Path)) else f"the instance ids of image #{index + 1}"
    ids = read_mask(source) if isinstance(source, (str, Path)) else require_integers(as_label_array(source, name), name)
    shape = tuple((read_mask(mask) if isinstance(mask, (str, Path)) else np.asarray(mask)).shape[:2])
    if tuple(ids.shape[:2]) != shape:
        raise UserError(f"{name} is {ids.shape[1]}x{ids.shape[0]} pixels but its mask {item.label_source} is "
                        f"{shape[1]}x{shape[0]}; give one id image of the mask's size.")
    ids = np.asarray(resize_labels(ids, item.shape))  # the mask's own rule, so both pick the same pixels
    item.ids = WindowReader(fit_instances(ids, np.asarray(item.labels.array), name, mpp=item.mpp), 0)


def check_classes(items: list, cfg, start) -> list:
    """Class names (index 0 = background), after checking every label file against them and against
    the model a run starts from (``start``: its ``kind``, ``classes`` and ``provenance``).
    ``cfg``: a :class:`~genselfdiff.train.config.FinetuneConfig` (``sparse``, ``class_names``, ``classes``)."""
    sparse = cfg.sparse
    offset = 1 if sparse else 0  # label value = class index + offset
    for it in items:
        annotated = it.counts[1:].sum() if sparse else it.counts.sum()
        if sparse and annotated == 0:
            raise UserError(f"{it.label_source} has no annotated pixel (all 0 = unlabelled); paint at least a few "
                            "strokes, or leave this image out.")
    present = sorted({int(v) for it in items for v in np.nonzero(it.counts)[0] if v >= offset})
    if not sparse and present == [0]:
        where = items[0].label_source if len(items) == 1 else "every mask"
        raise UserError(f"{where} contains only background (0): there is nothing to learn; "
                        "label the objects with 1, 2, ...")
    if cfg.class_names:
        names = [str(n) for n in cfg.class_names]
        if cfg.classes is not None and cfg.classes != len(names):
            raise UserError(f"{cfg.classes} classes requested but {len(names)} class names given.")
    elif cfg.classes is not None:
        names = default_class_names(cfg.classes)
    else:
        inferred = max(2, present[-1] + 1 - offset)
        # A segmentation model is continued only if the labels use exactly its classes
        # (give the number of classes to continue with a subset of them annotated).
        names = list(start.classes) if start.classes and inferred == len(start.classes) else default_class_names(inferred)
    k = len(names)
    if start.kind == "segmentation" and len(start.classes) != k:
        raise UserError(f"{start.provenance['path']} segments {len(start.classes)} classes ({', '.join(start.classes)}) "
                        f"but the annotations have {k}; fine-tune from its pretrained model instead, or use matching classes.")
    if start.kind == "segmentation" and list(start.classes) != names:
        raise UserError(f"{start.provenance['path']} segments {', '.join(start.classes)} but the annotations name "
                        f"{', '.join(names)}; continue it with its class names, or fine-tune from its pretrained model.")
    if k < 2:
        raise UserError("A segmentation model needs at least two classes (background and one object class).")
    for it in items:
        top = int(np.nonzero(it.counts)[0].max())
        if top - offset >= k:
            convention = (f"sparse labels: 1 = {names[0]} ... {k} = {names[-1]}, 0 = unlabelled" if sparse
                          else f"dense labels: 0 = {names[0]} ... {k - 1} = {names[-1]}")
            hint = " (a 0/255 mask? divide it by 255)" if top == 255 else ""
            raise UserError(f"{it.label_source} contains label {top}, beyond the {k} classes ({convention}){hint}; "
                            "set the number of classes or fix the mask.")
    if len(present) < 2:
        label = names[present[0] - offset] if present else "?"
        raise UserError(f"The annotations contain only the class {label!r}; annotate at least one more class "
                        f"(e.g. background{' = 1' if sparse else ' = 0'}).")
    return names


# --- sampling ----------------------------------------------------------------------------

class PatchSampler:
    """Draws (image, target) training patches around annotated positions of training tiles."""

    def __init__(self, items: list, patch: int, tile: int, sparse: bool, balance: float = 0.0,
                 prior: Optional[list] = None, anchors: Optional[list] = None):
        self.items, self.patch, self.tile, self.sparse, self.balance = items, patch, tile, sparse, balance
        self.prior = prior  # per image: the haematoxylin threshold of priors.fit, or None
        self.anchors = anchors  # per image: the previous model's priors.AnchorMap, or None
        # Per (image, value): training positions and the number of real pixels they stand for.
        self.pools = []
        for i, it in enumerate(items):
            for v, pts in it.points.items():
                train = pts[~it.val_tiles[pts[:, 0] // tile, pts[:, 1] // tile]] if len(pts) else pts
                if len(train):
                    weight = it.counts[v] * len(train) / len(pts)
                    self.pools.append((i, int(v), train, float(weight)))
        if not self.pools:
            raise UserError("No annotated pixel is left for training after setting validation tiles aside; "
                            "annotate more, or lower the validation fraction.")
        self.weights = np.array([w for *_, w in self.pools])
        values = sorted({v for _, v, _, _ in self.pools})
        self.by_value = {v: [k for k, p in enumerate(self.pools) if p[1] == v] for v in values}

    def _pick(self, rng: np.random.Generator) -> tuple:
        if rng.random() < self.balance:  # class-balanced: every painted class equally often
            ks = self.by_value[list(self.by_value)[rng.integers(len(self.by_value))]]
            w = self.weights[ks]
            k = ks[rng.choice(len(ks), p=w / w.sum())]
        else:  # every annotated pixel equally likely
            k = rng.choice(len(self.pools), p=self.weights / self.weights.sum())
        i, _, pts, _ = self.pools[k]
        return i, pts[rng.integers(len(pts))]

    def sample(self, rng: np.random.Generator) -> tuple:
        """One patch: uint8 (P, P, 3) image and int64 (P, P) targets; (P, P, 2) targets and instance
        ids where the images have ids (they then move together through augmentation)."""
        P, edge = self.patch, max(1, self.patch // 8)
        i, (py, px) = self._pick(rng)
        it = self.items[i]
        H, W = it.shape
        y0 = int(py) - int(rng.integers(edge, P - edge + 1))
        x0 = int(px) - int(rng.integers(edge, P - edge + 1))
        if H >= P:
            y0 = min(max(y0, 0), H - P)
        if W >= P:
            x0 = min(max(x0, 0), W - P)
        image = it.image.read(y0, x0, P, P)
        target = to_targets(it.labels.read(y0, x0, P, P), self.sparse)
        if self.anchors is not None:  # before the stain: the model the person has seen wins
            target = priors.apply_anchor(target, self.anchors[i].read(y0, x0, P, P))
        if self.prior is not None:
            target = priors.apply(image, target, self.prior[i])
        target[self._outside_or_val(it, y0, x0, P)] = IGNORE
        if it.ids is not None:
            target = np.stack([target, it.ids.read(y0, x0, P, P).astype(np.int64)], -1)
        return image, target

    def _outside_or_val(self, it: LabelledImage, y0: int, x0: int, P: int) -> np.ndarray:
        ys, xs = np.arange(y0, y0 + P), np.arange(x0, x0 + P)
        H, W = it.shape
        iny, inx = (ys >= 0) & (ys < H), (xs >= 0) & (xs < W)
        ty = np.clip(ys // self.tile, 0, it.val_tiles.shape[0] - 1)
        tx = np.clip(xs // self.tile, 0, it.val_tiles.shape[1] - 1)
        return it.val_tiles[np.ix_(ty, tx)] | ~(iny[:, None] & inx[None, :])


@dataclass
class ValidationSet:
    """Windows (tile + context) with targets; Dice is scored on each window's central tile."""

    images: np.ndarray  # uint8 (n, S, S, 3)
    targets: np.ndarray  # int64 (n, S, S), IGNORE outside the central tile
    on_train: bool = False


def validation_set(items: list, tile: int, margin: int, sparse: bool, on_train: bool,
                   max_tiles: int = 64, seed: int = 0) -> ValidationSet:
    """The held-out tiles (or, when nothing could be held out, the annotated tiles), at most ``max_tiles``."""
    chosen = [(i, ty, tx) for i, it in enumerate(items)
              for ty, tx in zip(*np.nonzero(it.tile_counts > 0 if on_train else it.val_tiles))]
    if len(chosen) > max_tiles:
        rng = np.random.default_rng(seed)
        chosen = [chosen[k] for k in sorted(rng.choice(len(chosen), max_tiles, replace=False))]
    S = tile + 2 * margin
    images = np.empty((len(chosen), S, S, 3), np.uint8)
    targets = np.full((len(chosen), S, S), IGNORE, np.int64)
    for n, (i, ty, tx) in enumerate(chosen):
        it = items[i]
        y, x = ty * tile - margin, tx * tile - margin
        images[n] = it.image.read(y, x, S, S)
        t = to_targets(it.labels.read(ty * tile, tx * tile, tile, tile), sparse)
        H, W = it.shape
        t[max(0, H - ty * tile):, :] = IGNORE  # the last row/column of tiles may pass the edge
        t[:, max(0, W - tx * tile):] = IGNORE
        targets[n, margin : margin + tile, margin : margin + tile] = t
    return ValidationSet(images, targets, on_train)
