"""What the benchmarks share: the header they print, the MoNuSeg folder (or synthetic stand-in),
its split, reading and scoring, simulated annotations, and progress callbacks.

Every benchmark prints ``command:`` (:func:`command`), ``machine:`` (:func:`machine`) and ends
with one ``summary:`` line of figures. One that reads MoNuSeg takes ``--data``
(:func:`add_data_argument`, :func:`data_folder`): the official training folder with ``images/``,
``masks/`` and ``instances/`` PNGs, by default ``../shared/data/monuseg/train`` from the
repository root. Without it a ``--quick`` run uses synthetic tissue in the same layout
(:func:`write_synthetic_set`) and a full run stops with one sentence (exit status 2).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "monuseg" / "train"
MPP = 0.2527  # MoNuSeg's µm per pixel (the PNGs state none)
SYNTHETIC_IMAGES, SYNTHETIC_SIDE = 10, 512  # the quick forms' stand-in: held out 2, pool 8


# --- what every benchmark prints ----------------------------------------------------------------

def command() -> str:
    """The command line as typed: ``python -m benchmarks.NAME ...`` (the interpreter's name only)."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return " ".join([Path(argv[0]).name, *argv[1:]])


def machine(device="cpu") -> str:
    """CPU model, cores, load, torch version and threads, and the device (with the GPU's name)."""
    import torch

    device = torch.device(device)
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f" (load {os.getloadavg()[0]:.1f})" if hasattr(os, "getloadavg") else ""
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} cores{load}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {device}{gpu}")


def header(device="cpu") -> None:
    """The first two lines of every benchmark's output."""
    print("command:", command())
    print("machine:", machine(device), flush=True)


# --- the data ---------------------------------------------------------------------------------

def add_data_argument(parser) -> None:
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="the MoNuSeg training folder (images/, masks/, instances/ as PNGs); default "
                             "../shared/data/monuseg/train from the repository root, synthetic tissue with --quick "
                             "when that is absent")


def data_folder(args, work: Path) -> Path:
    """The folder ``args.data`` names, else the default one, else (``args.quick``) synthetic tissue
    written to ``work/synthetic``. A folder without images ends the run with one sentence, exit 2."""
    if args.data is not None:
        if not any(Path(args.data, "images").glob("*.png")):
            fail(f"No images in {Path(args.data) / 'images'}: --data takes the MoNuSeg training folder "
                 f"(images/, masks/, instances/ as PNGs).")
        return Path(args.data)
    if any((DEFAULT_DATA / "images").glob("*.png")):
        return DEFAULT_DATA
    if getattr(args, "quick", False):
        folder = write_synthetic_set(Path(work) / "synthetic")
        print(f"data: synthetic tissue, {SYNTHETIC_IMAGES} images of {SYNTHETIC_SIDE}^2 in {folder} "
              f"(no MoNuSeg at {DEFAULT_DATA}; --data names it)", flush=True)
        return folder
    fail(f"The MoNuSeg training data is not at {DEFAULT_DATA}: give its folder (images/, masks/, instances/) "
         f"with --data DIR, or run with --quick on synthetic tissue.")


def data_name(folder: Path) -> str:
    """What a data folder holds, for summary lines: "synthetic" (:func:`write_synthetic_set`) or "MoNuSeg"."""
    return "synthetic" if any(Path(folder).glob(".complete_*")) else "MoNuSeg"


def fail(sentence: str):
    """End the run with one sentence on stderr and exit status 2 (a usage error, not a traceback)."""
    print(sentence, file=sys.stderr, flush=True)
    raise SystemExit(2)


def write_synthetic_set(folder: Path, n: int = SYNTHETIC_IMAGES, side: int = SYNTHETIC_SIDE) -> Path:
    """``n`` synthetic H&E-like images (:func:`genselfdiff.app.synthetic.synthetic_tissue`) in
    MoNuSeg's layout: ``images/``, ``masks/`` (0/1) and ``instances/`` (connected components of
    the mask, uint16). The tissue is drawn for 0.5 µm/px and enlarged twice, so its nuclei have
    MoNuSeg's size in pixels at its 0.2527 µm/px (:data:`MPP`, which the benchmarks state for
    these images too). Written once; the same files for the same ``n`` and ``side``."""
    from scipy import ndimage as ndi
    from skimage.io import imsave

    from genselfdiff.app.synthetic import synthetic_tissue
    from genselfdiff.io.atomic import atomic_path

    folder = Path(folder)
    done = folder / f".complete_v2_{n}_{side}"
    if done.exists():
        return folder
    for sub in ("images", "masks", "instances"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, labels = synthetic_tissue((side // 2, side // 2), seed=100 + i, glass=0.1)
        rgb = np.clip(ndi.zoom(rgb, (2, 2, 1), order=1), 0, 255).astype(np.uint8)
        labels = np.repeat(np.repeat(labels, 2, 0), 2, 1)
        name = f"synthetic-{i:02d}.png"
        for sub, array in (("images", rgb), ("masks", (labels > 0).astype(np.uint8)),
                           ("instances", ndi.label(labels > 0)[0].astype(np.uint16))):
            with atomic_path(folder / sub / name) as tmp:
                imsave(tmp, array, check_contrast=False)
    done.touch()
    return folder


def split(data: Path):
    """(held out, pool): every fifth image by sorted name is held out for scoring (six of
    MoNuSeg's 30); the others in a fixed order (``default_rng(2024)``), whose prefixes are the
    labelled sets."""
    images = sorted((Path(data) / "images").glob("*.png"))
    if len(images) < 5:
        fail(f"Found {len(images)} images in {Path(data) / 'images'}; the split needs at least 5 "
             f"(--data takes the MoNuSeg training folder).")
    held = [p for i, p in enumerate(images) if i % 5 == 4]
    pool = [p for i, p in enumerate(images) if i % 5 != 4]
    order = np.random.default_rng(2024).permutation(len(pool))
    return held, [pool[i] for i in order]


def read_rgb(path) -> np.ndarray:
    from skimage.io import imread

    return np.asarray(imread(path))[..., :3]


def read_mask(data: Path, image: Path) -> np.ndarray:
    from skimage.io import imread

    return np.asarray(imread(Path(data) / "masks" / image.name)) > 0


def read_instances(data: Path, image: Path):
    """The true nucleus ids of ``image`` (int64), or None where the folder has none."""
    from skimage.io import imread

    path = Path(data) / "instances" / image.name
    return np.asarray(imread(path)).astype(np.int64) if path.exists() else None


def pyramid(image: Path, folder: Path, mpp: float = MPP) -> Path:
    """``image`` as a two-level OME-TIFF pyramid stating ``mpp`` (``folder/STEM.ome.tif``, written
    once), so a model picks its own working level as it does on a slide."""
    from genselfdiff.app.synthetic import write_pyramidal_tiff

    path = Path(folder) / f"{Path(image).stem}.ome.tif"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = read_rgb(image)
        write_pyramidal_tiff(path, rgb, mpp=mpp, min_side=min(400, min(rgb.shape[:2]) // 2))
    return path


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = pred.sum() + truth.sum()
    return 1.0 if s == 0 else float(2 * (pred & truth).sum() / s)


def enlarge(labels: np.ndarray, shape) -> np.ndarray:
    """``labels`` at ``shape`` by nearest neighbour (a processing-level result at level 0)."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.arange(shape[0]) * labels.shape[0] // shape[0]
    cols = np.arange(shape[1]) * labels.shape[1] // shape[1]
    return labels[rows[:, None], cols[None, :]]


# --- progress -----------------------------------------------------------------------------------

def ticker(name: str, every: int = 100):
    """A progress callback that prints a line to stderr every ``every`` training steps and per epoch."""
    def tick(p):
        if (p.done and p.done % every == 0 and p.stage in ("pretrain", "finetune")) or isinstance(p.payload, dict):
            m = " ".join(f"{k} {v:.4g}" for k, v in p.metrics.items() if isinstance(v, float))
            print(f"  [{time.strftime('%H:%M:%S')}] {name} step {p.done} {m}", file=sys.stderr, flush=True)
    return tick


# --- simulated annotation -----------------------------------------------------------------------

def simulate_strokes(mask, rng, *, nuclei: int = 40, background: int = 20, width: int = 3,
                     length: tuple = (15, 35), clearance: float = 4.0):
    """Brush strokes a pathologist might paint on an image whose true mask is ``mask``.

    Returns sparse labels (0 unlabelled, 1 background, 2 object): ``nuclei`` strokes along
    the cores of randomly chosen objects (the skeleton of each object, thickened to the
    brush ``width`` and kept inside the object) and ``background`` smooth random strokes of
    ``length`` pixels kept at least ``clearance`` pixels away from every object. ``mask``
    is binary or an instance-id image (touching objects stay apart when ids are given).
    """
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    mask = np.asarray(mask)
    objects = mask if mask.dtype != bool and mask.max() > 1 else ndi.label(mask > 0)[0]
    out = np.zeros(mask.shape, np.uint8)
    brush = np.ones((width, width), bool)
    slices = ndi.find_objects(objects)
    ids = [i + 1 for i, s in enumerate(slices) if s is not None]
    for oid in rng.permutation(ids)[:nuclei]:
        sl = tuple(slice(max(s.start - width, 0), s.stop + width) for s in slices[oid - 1])
        obj = objects[sl] == oid
        core = ndi.binary_erosion(obj, iterations=1)
        line = skeletonize(core if core.any() else obj)
        stroke = ndi.binary_dilation(line, brush) & obj
        out[sl][stroke] = 2
    far = ndi.distance_transform_edt(objects == 0) >= clearance
    starts = np.argwhere(far)
    h, w = mask.shape
    for _ in range(background if len(starts) else 0):
        y, x = starts[rng.integers(len(starts))].astype(float)
        angle = rng.uniform(0, 2 * np.pi)
        path = []
        for _ in range(int(rng.integers(*length))):  # a smooth random walk, one pixel a step
            angle += rng.normal(0, 0.15)
            y, x = y + np.sin(angle), x + np.cos(angle)
            if not (0 <= y < h and 0 <= x < w) or not far[int(y), int(x)]:
                break
            path.append((int(y), int(x)))
        line = np.zeros(mask.shape, bool)
        if path:
            line[tuple(np.array(path).T)] = True
        out[ndi.binary_dilation(line, brush) & far & (out == 0)] = 1
    return out


def simulate_corrections(strokes, truth, predicted, rng, *, background: int = 20, nuclei: int = 10,
                         width: int = 3, reach: int = 12, max_painted: float = 0.01):
    """The strokes a pathologist adds after seeing the model's prediction (napari's preview,
    then Continue): ``strokes`` plus short strokes in the largest regions where ``predicted``
    (bool, the object class) is wrong, largest first whatever their kind (what the eye
    catches): up to ``background`` strokes in false-positive regions (labelled background)
    and up to ``nuclei`` in missed objects, one per region. Each is the region's skeleton
    within ``reach`` pixels of its most interior point, thickened to the brush ``width`` and
    kept inside the wrong region, so a correction never contradicts the truth. Regions already
    painted are skipped, and painting stops before more than ``max_painted`` of the image is
    painted in all; ``rng`` breaks ties between equal regions.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    out = np.array(strokes, np.uint8, copy=True)
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    brush = np.ones((width, width), bool)
    candidates = []  # (size, tie-break, value, region mask's label image, label)
    for wrong, value in ((predicted & ~truth, 1), (truth & ~predicted, 2)):
        regions, n = ndi.label(wrong)
        sizes = ndi.sum_labels(np.ones_like(regions), regions, np.arange(1, n + 1)) if n else []
        candidates += [(size, rng.random(), value, regions, r + 1) for r, size in enumerate(sizes)]
    left = {1: background, 2: nuclei}
    budget = int(max_painted * out.size) - int((out > 0).sum())
    yy, xx = np.ogrid[: out.shape[0], : out.shape[1]]
    for size, _, value, regions, label in sorted(candidates, key=lambda c: (-c[0], c[1])):
        if not any(left.values()):
            break
        region = regions == label
        if not left[value] or (out[region] != 0).any():
            continue
        depth = ndi.distance_transform_edt(region)
        cy, cx = np.unravel_index(np.argmax(depth), depth.shape)
        line = skeletonize(region) & ((yy - cy) ** 2 + (xx - cx) ** 2 <= reach**2)
        if not line.any():
            line[cy, cx] = True
        stroke = ndi.binary_dilation(line, brush) & region & (out == 0)
        if stroke.sum() > budget:
            break
        out[stroke] = value
        budget -= int(stroke.sum())
        left[value] -= 1
    return out
