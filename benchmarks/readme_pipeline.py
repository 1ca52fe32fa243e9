"""The README's command-line pipeline on MoNuSeg, every option at its default but the pixel size.

The PNGs state no pixel size, so each command gets ``--pixel-size 0.25``; nothing else is set.
In a work folder: ``genselfdiff pretrain`` for 10 minutes on the 24 images outside the held-out
split (no labels), ``genselfdiff finetune`` on the first 3 labelled images of
:func:`benchmarks.common.split` from that model, ``genselfdiff segment --png`` on the 6 held-out
images and ``genselfdiff evaluate`` against their masks; Otsu on haematoxylin on the same images
for reference. Each command runs as a user runs it (``python -m genselfdiff ...``, one torch
thread as OMP_NUM_THREADS=1), and its time is reported. ``--quick``: 10 pretraining and 10
fine-tuning steps instead of the budgets.

    python -m benchmarks.readme_pipeline [--quick] [--data DIR] [--work DIR] [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import add_data_argument, data_folder, data_name, dice, header, read_mask, read_rgb, split

QUICK_STEPS = 10
PIXEL_SIZE = "0.25"


def prepare(data: Path, work: Path) -> tuple:
    """The folders a user would have: unlabelled tiles, 3 labelled ones with 0/1 masks, the held-out
    images and their masks. Returns (held-out images, labelled images)."""
    from skimage.io import imsave

    held, pool = split(data)
    for sub in ("unlabelled", "tiles", "masks", "held", "truth"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    for p in pool:
        shutil.copy(p, work / "unlabelled" / p.name)
    for p in pool[:3]:
        shutil.copy(p, work / "tiles" / p.name)
    for p in pool[:3] + held:  # masks as a user would give them: 0 background, 1 nucleus
        imsave(work / ("masks" if p in pool else "truth") / p.name, read_mask(data, p).astype(np.uint8),
               check_contrast=False)
    for p in held:
        shutil.copy(p, work / "held" / p.name)
    return held, pool[:3]


def otsu(data: Path, held: list) -> float:
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    scores = []
    for p in held:
        h = rgb2hed(read_rgb(p))[..., 0]
        scores.append(dice(h > threshold_otsu(h), read_mask(data, p)))
    return float(np.mean(scores))


def cli(*args) -> float:
    """Run ``genselfdiff ARGS`` as a user would; its seconds. Its output passes through."""
    cmd = [sys.executable, "-m", "genselfdiff", *map(str, args)]
    print("$ genselfdiff " + " ".join(map(str, args)), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke test: {QUICK_STEPS} pretraining and fine-tuning steps")
    add_data_argument(p)
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining budget (default %(default)s)")
    args = p.parse_args(argv)
    header("cpu")
    W = args.work or Path(tempfile.mkdtemp(prefix="genselfdiff-readme-pipeline-"))
    W.mkdir(parents=True, exist_ok=True)
    data = data_folder(args, W)
    held, labelled = prepare(data, W)
    otsu_dice = otsu(data, held)
    budget = ["--steps", QUICK_STEPS] if args.quick else ["--minutes", args.minutes]
    seconds = {
        "pretrain": cli("pretrain", W / "unlabelled", "--out", W / "pretrained.pt", "--pixel-size", PIXEL_SIZE,
                        *budget, "--quiet"),
        "finetune": cli("finetune", "--images", W / "tiles", "--masks", W / "masks", "--model", W / "pretrained.pt",
                        "--out", W / "seg.pt", "--pixel-size", PIXEL_SIZE, "--class-names", "background,nucleus",
                        *(["--steps", QUICK_STEPS] if args.quick else [])),
        "segment": cli("segment", W / "seg.pt", W / "held", "--out", W / "results", "--pixel-size", PIXEL_SIZE,
                       "--png"),
    }
    cli("evaluate", "--pred", W / "results", "--truth", W / "truth", "--pixel-size", PIXEL_SIZE,
        "--json", W / "metrics.json")
    report = json.loads((W / "metrics.json").read_text())
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
    print(f"summary: README pipeline, {data_name(data)}, {len(labelled)} labelled images, {len(held)} held out: "
          f"Dice {report['mean']['dice']:.4f} against Otsu on haematoxylin {otsu_dice:.4f} ({times})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
