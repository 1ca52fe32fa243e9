"""What benchmarks share: the machine they ran on, and the MoNuSeg split, reading and scoring."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "monuseg" / "train"
MPP = 0.2527


def machine(device) -> str:
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


def split(data: Path):
    """(held out, pool): every fifth of the 30 images by sorted name is held out for scoring;
    the other 24 in a fixed order (``default_rng(2024)``), whose prefixes are the labelled sets."""
    images = sorted((data / "images").glob("*.png"))
    if len(images) != 30:
        sys.exit(f"expected the 30 MoNuSeg training images in {data / 'images'}, found {len(images)}")
    held = [p for i, p in enumerate(images) if i % 5 == 4]
    pool = [p for i, p in enumerate(images) if i % 5 != 4]
    order = np.random.default_rng(2024).permutation(len(pool))
    return held, [pool[i] for i in order]


def read_rgb(path) -> np.ndarray:
    from skimage.io import imread

    return np.asarray(imread(path))[..., :3]


def read_mask(data: Path, image: Path) -> np.ndarray:
    from skimage.io import imread

    return np.asarray(imread(data / "masks" / image.name)) > 0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = pred.sum() + truth.sum()
    return 1.0 if s == 0 else float(2 * (pred & truth).sum() / s)
