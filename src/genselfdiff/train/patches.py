"""Unlabelled tissue patches streamed from a folder of slides, for diffusion pretraining.

Nothing is read up front beyond what is needed to start: :func:`plan_data` lists the
files, opens training files one by one until it finds a usable one (so bad input fails
fast, and a folder of 1,000 slides costs a directory walk) and reads the fixed
validation patches from a handful of held-out files. :class:`PatchStream` then opens
slides lazily inside each DataLoader worker, keeping a few open at a time with their
tissue maps.

The stream is position-addressable: batch ``i`` is a pure function of (seed, rank, i),
whatever the number of workers, so ``--resume`` restarts the data exactly where it was,
and each DDP rank draws its own patches. Batches are drawn in chunks of
``chunk`` batches from a pool of ``pool`` slides, so a worker opens a few slides per
chunk rather than one per patch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from ..io.files import find_images, fingerprint
from ..io.pixelsize import PixelSizeConflict, Resolution
from ..io.slides import open_slide, read_region

MIN_TISSUE = 0.5  # a patch must be at least this much tissue (by the coarse mask)
VAL_FILES_READ = 8  # validation patches come from at most this many held-out files


@dataclass(frozen=True)
class Window:
    """A square window of one file: ``size`` pixels at pyramid ``level``, resized to the patch."""

    file: int
    level: int
    y: int
    x: int
    size: int

    def overlaps(self, other: "Window") -> bool:
        return (self.file == other.file and self.level == other.level
                and abs(self.y - other.y) < max(self.size, other.size)
                and abs(self.x - other.x) < max(self.size, other.size))


class Unusable(Exception):
    """A file that cannot give patches; the message says why (shown to the user)."""


class OpenSlide:
    """A slide opened for patch reading: the level and window size that give the target resolution."""

    def __init__(self, path: Path, patch: int, resolution: Resolution, max_tissue_side: int = 2048,
                 opening: Optional[dict] = None):
        from ..io.tissue import TissueMap

        try:
            self.slide = open_slide(path, **(opening or {}))  # opening: the user's pixel size, if any
        except UserError as e:  # the message starts with the path, which the report already names
            msg = str(e)[len(str(path)):].strip() if str(e).startswith(str(path)) else str(e)
            msg = _one_line(msg)
            if isinstance(e, PixelSizeConflict) or msg.startswith("could not be read"):
                raise Unusable(msg) from None
            raise Unusable(f"could not be read: {msg}") from None
        self.level, self.read = _read_plan(self.slide, patch, resolution)
        self.height, self.width = self.slide.levels[self.level].shape[:2]
        if min(self.height, self.width) < self.read:
            raise Unusable(f"is smaller than the {patch}-px patch ({self.width}x{self.height} px at level "
                           f"{self.level}, needs {self.read} px)")
        try:
            with _single_threaded():
                self.tissue = TissueMap(self.slide, max_tissue_side)
        except Exception as e:  # a corrupt tile further into the file
            raise Unusable(_one_line(f"could not be read: {type(e).__name__}: {e}")) from None
        # Flat indices of tissue pixels in the coarse mask, int32 to keep a few slides cheap to cache.
        self.tissue_pixels = np.flatnonzero(self.tissue.mask).astype(np.int32)
        if len(self.tissue_pixels) == 0:
            raise Unusable("has no tissue (only glass or background)")
        self.patch = patch

    def random_window(self, file: int, rng: np.random.Generator, exclude=(), tries: int = 32) -> Optional[Window]:
        """A window centred on tissue, mostly tissue, and overlapping none of ``exclude``."""
        mask_w = self.tissue.mask.shape[1]
        f = self.tissue.scale / self.slide.downsample(self.level)  # level pixels per mask pixel
        fallback = None
        for attempt in range(tries):
            flat = self.tissue_pixels[rng.integers(len(self.tissue_pixels))]
            cy, cx = (np.array(divmod(int(flat), mask_w)) + rng.random(2)) * f
            y = int(np.clip(cy - self.read / 2, 0, self.height - self.read))
            x = int(np.clip(cx - self.read / 2, 0, self.width - self.read))
            w = Window(file, self.level, y, x, self.read)
            if any(w.overlaps(e) for e in exclude):
                continue
            if self.tissue.coverage(self.level, y, x, self.read, self.read) >= MIN_TISSUE:
                return w
            fallback = fallback or w
        return fallback

    def read_window(self, w: Window) -> np.ndarray:
        with _single_threaded():
            rgb = read_region(self.slide, w.level, w.y, w.x, w.size, w.size)
        if w.size != self.patch:
            from skimage.transform import resize

            rgb = resize(rgb, (self.patch, self.patch), order=1, anti_aliasing=w.size > self.patch,
                         preserve_range=True).round().astype(np.uint8)
        return rgb


def _one_line(text: str, limit: int = 240) -> str:
    """Decoder messages can span lines; a skipped-file report is one line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _single_threaded():
    """Dask computes in the calling thread: small reads gain nothing from a pool, and a pool
    created before DataLoader workers fork would deadlock them."""
    import dask

    return dask.config.set(scheduler="synchronous")


def _read_plan(slide, patch: int, resolution: Resolution) -> tuple:
    """(level, window side at that level) giving ``patch`` pixels at the requested resolution.

    With a target µm/px and a file that states its scale, the finest level no coarser than
    the target is read and downsampled (never upsampled by more than 5 %); otherwise the
    requested pyramid level is read as is.
    """
    if resolution.mpp is not None and slide.mpp is not None:
        finer = [i for i in range(len(slide.levels)) if slide.mpp_at(i) <= resolution.mpp * 1.05]
        level = max(finer) if finer else 0
        read = int(round(patch * resolution.mpp / slide.mpp_at(level)))
        return level, patch if abs(read - patch) <= 0.05 * patch else read
    if resolution.level >= len(slide.levels):
        raise Unusable(f"has {len(slide.levels)} pyramid level(s); level {resolution.level} does not exist")
    return resolution.level, patch


class SlideCache:
    """A few open slides (least recently used dropped first) and the reasons others were unusable."""

    def __init__(self, files: list, patch: int, resolution: Resolution, size: int = 6, bad: Optional[dict] = None,
                 opening: Optional[dict] = None):
        self.files, self.patch, self.resolution, self.size = files, patch, resolution, size
        self.opening = opening
        self.pixel_sizes: dict = {}  # file index -> level-0 µm/px (None: unknown), of the files opened
        self.notes: list = []  # the opened slides' notes for the user
        self.open: OrderedDict = OrderedDict()
        self.bad: dict = dict(bad or {})  # file index -> reason
        self.new_bad: list = []  # (path, reason) found since last collected
        self.opened = 0  # how many times a file was opened (for the laziness test)

    def get(self, i: int) -> Optional[OpenSlide]:
        if i in self.bad:
            return None
        if i in self.open:
            self.open.move_to_end(i)
            return self.open[i]
        self.opened += 1
        try:
            s = OpenSlide(self.files[i], self.patch, self.resolution, opening=self.opening)
        except Unusable as e:
            self.bad[i] = str(e)
            self.new_bad.append((str(self.files[i]), str(e)))
            return None
        self.open[i] = s
        self.pixel_sizes[i] = s.slide.mpp
        self.notes += s.slide.notes
        while len(self.open) > self.size:
            self.open.popitem(last=False)
        return s

    def mark_bad(self, i: int, reason: str) -> None:
        self.open.pop(i, None)
        self.bad[i] = reason
        self.new_bad.append((str(self.files[i]), reason))

    def collect_bad(self) -> list:
        out, self.new_bad = self.new_bad, []
        return out


@dataclass
class DataPlan:
    """Which files train, the fixed validation patches, and what was skipped and why."""

    files: list  # every image path found, sorted
    train: list  # indices into files
    val_patches: np.ndarray  # uint8 (N, P, P, 3)
    val_windows: list  # Window, fixed
    exclude: dict  # file index -> windows held out for validation (never trained on)
    bad: dict  # file index -> reason, found while planning
    validation: str  # "held-out files", "held-out regions" or "in-sample"
    opened: int = 0
    pixel_sizes: dict = field(default_factory=dict)  # file index -> level-0 µm/px (None: unknown), files opened
    notes: list = field(default_factory=list)  # for the user, from the files opened

    @property
    def skipped(self) -> list:
        return [(str(self.files[i]), r) for i, r in sorted(self.bad.items())]

    def provenance(self, sources) -> dict:
        val_files = sorted({w.file for w in self.val_windows})
        return {"sources": [str(s) for s in sources], "files": [str(f) for f in self.files],
                "fingerprint": fingerprint(self.files),
                "train_files": len(self.train), "val_files": [str(self.files[i]) for i in val_files],
                "validation": self.validation, "val_patches": len(self.val_windows),
                "skipped": [list(s) for s in self.skipped]}


def plan_data(sources, patch: int, resolution: Resolution, *, seed: int = 0, val_fraction: float = 0.1,
              val_patches: int = 32, opening: Optional[dict] = None) -> DataPlan:
    """List the images, split off validation, and check that training can start.

    Raises :class:`UserError` for an empty folder, or when no file gives a single patch
    (unreadable, no tissue, or smaller than the patch), with the reasons counted.
    """
    files = find_images(sources)
    if not files:
        names = ", ".join(str(s) for s in sources) or "(nothing given)"
        raise UserError(f"No images found in {names}; give slide files (.svs, .tif, .ome.tif, .png, ...) "
                        "or folders that contain them.")
    if opening and opening.get("pixel_size") is not None:  # a bad value fails once, not per file
        from ..io.pixelsize import check_pixel_size

        check_pixel_size(opening["pixel_size"], files[0] if len(files) == 1 else f"the {len(files)} images found")
    cache = SlideCache(files, patch, resolution, size=VAL_FILES_READ + 2, opening=opening)
    order = [int(i) for i in np.random.default_rng([seed, 7]).permutation(len(files))]
    n_val = max(1, round(len(files) * val_fraction)) if val_fraction > 0 and len(files) > 1 else 0
    val_files, train = order[:n_val], order[n_val:]

    first = next((i for i in train if cache.get(i) is not None), None)
    if first is None:  # no training file works: try the held-out ones before giving up
        usable = [i for i in val_files if cache.get(i) is not None]
        if not usable:
            raise _nothing_usable(files, cache.bad, patch)
        train, val_files, first = usable, [], usable[0]
    train = sorted(train)

    rng = np.random.default_rng([seed, 11])
    exclude: dict = {}
    windows: list = []
    validation = "held-out files"
    readable_val = []
    for i in val_files[: 4 * VAL_FILES_READ]:  # a few held-out files are enough for 32 fixed patches
        if len(readable_val) == VAL_FILES_READ:
            break
        if cache.get(i) is not None:
            readable_val.append(i)
    if readable_val:
        for k in range(val_patches):
            i = readable_val[k % len(readable_val)]
            windows.append(cache.get(i).random_window(i, rng))
    elif val_fraction > 0:
        windows = _held_out_cells(cache.get(first), first, rng, val_fraction, val_patches)
        exclude = {first: list(windows)}
        validation = "held-out regions"
    if not windows:  # too little data to hold anything out: score fixed training patches
        windows = [cache.get(first).random_window(first, rng) for _ in range(val_patches)]
        validation = "in-sample"
    patches = np.stack([cache.get(w.file).read_window(w) for w in windows])
    return DataPlan(files, train, patches, windows, exclude, dict(cache.bad), validation, cache.opened,
                    dict(cache.pixel_sizes), list(dict.fromkeys(cache.notes)))


def _held_out_cells(s: OpenSlide, file: int, rng, fraction: float, wanted: int) -> list:
    """Non-overlapping tissue cells of one slide held out for validation (its training patches avoid them)."""
    ny, nx = s.height // s.read, s.width // s.read
    budget = min(wanted, int(fraction * s.tissue.fraction * ny * nx))
    out = []
    for c in rng.permutation(ny * nx)[:20000]:
        if len(out) >= budget:
            break
        y, x = int(c // nx) * s.read, int(c % nx) * s.read
        if s.tissue.coverage(s.level, y, x, s.read, s.read) >= MIN_TISSUE:
            out.append(Window(file, s.level, y, x, s.read))
    return out


def _nothing_usable(files: list, bad: dict, patch: int) -> UserError:
    reasons = list(bad.values())
    small = sum("smaller than" in r for r in reasons)
    glass = sum("no tissue" in r for r in reasons)
    where = str(files[0]) if len(files) == 1 else f"the {len(files)} images found"
    if small == len(reasons):
        return UserError(f"The {patch}-px patch is larger than every image in {where}; "
                         "use a smaller --patch or a finer --level/--mpp.")
    if glass == len(reasons):
        return UserError(f"No tissue was found in {where}; check that these are H&E slides, not blank or "
                         "fluorescence images.")
    if small + glass == 0:
        i, why = next(iter(bad.items()))
        if len(files) == 1:
            return UserError(f"{files[0]} {why}" + ("" if why.endswith(".") else "."))
        return UserError(f"None of {where} could be read (e.g. {files[i]}: {why})")
    return UserError(f"No usable image in {where}: {len(reasons) - small - glass} unreadable, {glass} without "
                     f"tissue, {small} smaller than the {patch}-px patch.")


def _torch_iterable():
    from torch.utils.data import IterableDataset

    return IterableDataset


class PatchStream(_torch_iterable()):
    """Endless batches ``(uint8 array (B, P, P, 3), newly skipped [(path, reason)])`` for a DataLoader.

    Use with ``DataLoader(stream, batch_size=None, num_workers=W)``: worker ``w`` of ``W``
    makes batches ``start + w, start + w + W, ...``, and the loader hands them out in that
    order, so the sequence is the same for any ``W``.
    """

    def __init__(self, files: list, train: list, patch: int, batch: int, resolution: Resolution, *,
                 seed: int = 0, rank: int = 0, start: int = 0, exclude: Optional[dict] = None,
                 bad: Optional[dict] = None, flips: bool = True, pool: int = 4, chunk: int = 64,
                 opening: Optional[dict] = None):
        self.files, self.train = [Path(f) for f in files], list(train)
        self.patch, self.batch, self.resolution = patch, batch, resolution
        self.seed, self.rank, self.start = seed, rank, start
        self.exclude, self.bad = dict(exclude or {}), dict(bad or {})
        self.flips, self.pool, self.chunk = flips, pool, chunk
        self.opening = opening
        self._cache: Optional[SlideCache] = None
        self._pools: dict = {}

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start + w
        while True:
            yield self.batch_at(i)
            i += n

    def batch_at(self, i: int) -> tuple:
        """Batch number ``i`` of this rank's stream (deterministic)."""
        cache = self._get_cache()
        c = i // self.chunk
        rng = np.random.default_rng([self.seed, self.rank, i, 1])
        out = np.empty((self.batch, self.patch, self.patch, 3), np.uint8)
        k = 0
        while k < self.batch:
            pool = self._pool(c)
            f = pool[int(rng.integers(len(pool)))]
            s = cache.get(f)
            if s is None:  # found unusable since the pool was drawn: draw the pool again without it
                self._pools.pop(c, None)
                continue
            w = s.random_window(f, rng, self.exclude.get(f, ()))
            if w is None:  # everything near tissue is held out: take any free window
                w = s.random_window(f, rng, self.exclude.get(f, ()), tries=256)
            try:
                rgb = s.read_window(w)
            except Exception as e:  # a corrupt tile inside a slide that opened fine
                cache.mark_bad(f, _one_line(f"could not be read: {type(e).__name__}: {e}"))
                self._pools.pop(c, None)
                continue
            if self.flips:
                if rng.random() < 0.5:
                    rgb = rgb[:, ::-1]
                if rng.random() < 0.5:
                    rgb = rgb[::-1]
            out[k] = rgb
            k += 1
        return out, cache.collect_bad()

    def _get_cache(self) -> SlideCache:
        if self._cache is None:  # created in the worker process, so no file handle crosses a fork
            self._cache = SlideCache(self.files, self.patch, self.resolution, size=self.pool + 2, bad=self.bad,
                                     opening=self.opening)
        return self._cache

    def _pool(self, c: int) -> list:
        """The usable slides of chunk ``c``: the first ``pool`` in a permutation fixed by (seed, rank, c)."""
        if c not in self._pools:
            cache = self._get_cache()
            pool = []
            for j in np.random.default_rng([self.seed, self.rank, c, 0]).permutation(len(self.train)):
                f = self.train[int(j)]
                if cache.get(f) is not None:
                    pool.append(f)
                    if len(pool) == min(self.pool, len(self.train)):
                        break
            if not pool:
                raise UserError("None of the training images could be read any more; were the files moved?")
            self._pools = {c: pool}
        return self._pools[c]
