"""The end-to-end demo: the whole mission on procedurally generated tissue, no download.

1. write a synthetic H&E-like slide pyramid (OME-TIFF) and a second unannotated one;
2. pretrain the tiny diffusion U-Net on them without labels;
3. fine-tune it from a sample annotation: a few painted regions of one corner, in the
   sparse convention napari users paint (0 unlabelled, 1 background, 2 nucleus);
4. segment the whole slide lazily, tile by tile, into OME-Zarr;
5. score the result against the known ground truth and write an overlay, a loss plot
   and a metrics table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..io.atomic import atomic_path, write_text
from ..progress import Progress, resolve

SLIDE_SIDE = 2048
ANNOTATED = 512  # side of the annotated corner, in pixels


@dataclass
class DemoResult:
    out: Path
    files: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def sample_annotation(truth: np.ndarray, side: int = ANNOTATED, seed: int = 0) -> np.ndarray:
    """Sparse labels as a pathologist paints them: parts of nuclei and of the background
    in one corner, leaving object borders and the rest of the slide unlabelled."""
    rng = np.random.default_rng(seed)
    sparse = np.zeros(truth.shape, np.uint8)
    roi = truth[:side, :side].astype(bool)
    inside = ndi.binary_erosion(roi, iterations=1)
    outside = ~ndi.binary_dilation(roi, iterations=3)
    # Strokes: keep a random half of the nuclei and horizontal bands of the background.
    lab, n = ndi.label(inside)
    keep = np.zeros(n + 1, bool)
    keep[1:] = rng.random(n) < 0.5
    bands = (np.arange(side) // 12) % 3 == 0
    sparse[:side, :side][keep[lab]] = 2
    sparse[:side, :side][outside & bands[:, None]] = 1
    return sparse


def run_demo(out, *, pretrain_steps: int = 300, finetune_steps: int = 300, device: str = "auto",
             seed: int = 0, progress=None, should_stop=None) -> DemoResult:
    from ..eval.evaluate import evaluate
    from ..infer.segment import segment
    from ..nn.model import load_model
    from ..train.config import PretrainConfig
    from ..train.finetune import FinetuneConfig, finetune
    from ..train.pretrain import pretrain
    from .synthetic import synthetic_tissue, write_pyramidal_tiff

    progress, should_stop = resolve(progress, should_stop)
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        result.seconds[name] = round(now - clock, 1)
        clock = now

    progress(Progress("demo: making a synthetic slide", 0, 1))
    rgb, truth = synthetic_tissue((SLIDE_SIDE, SLIDE_SIDE), seed=seed)
    slide_path = write_pyramidal_tiff(out / "data" / "slide.ome.tif", rgb, mpp=0.5)
    other, _ = synthetic_tissue((SLIDE_SIDE // 2, SLIDE_SIDE // 2), seed=seed + 1)
    other_path = write_pyramidal_tiff(out / "data" / "unlabelled.ome.tif", other, mpp=0.5)
    _save_png(out / "data" / "truth.png", truth)
    annotation = sample_annotation(truth, seed=seed)
    _save_png(out / "data" / "annotation.png", annotation)
    lap("data")

    pre_cfg = PretrainConfig.from_preset("tiny", steps=pretrain_steps, seed=seed, val_every=100)
    pre = pretrain([slide_path, other_path], out / "pretrained.pt", pre_cfg, device=device,
                   progress=progress, should_stop=should_stop)
    result.files["pretrained"] = pre.path
    lap("pretrain")

    ft_cfg = FinetuneConfig.from_preset("tiny", sparse=True, class_names=["background", "nucleus"],
                                        steps=finetune_steps, seed=seed)
    ft = finetune([rgb], [annotation], out / "segmenter.pt", ft_cfg, pretrained=pre.path,
                  device=device, progress=progress, should_stop=should_stop)
    result.files["model"] = ft.path
    lap("finetune")

    model = load_model(ft.path, device)
    seg = segment(model, slide_path, out / "slide.ome.zarr", progress=progress, should_stop=should_stop)
    result.files["segmentation"] = seg.path
    lap("segment")

    pred = np.asarray(seg.labels)
    report = evaluate(seg.path, out / "data" / "truth.png", scale_um=0.5)
    report.to_csv(out / "metrics.csv")
    report.to_json(out / "metrics.json")
    result.metrics = dict(report.mean)
    # Held-out part: everything outside the annotated corner.
    held = np.ones(truth.shape, bool)
    held[:ANNOTATED, :ANNOTATED] = False
    result.metrics["dice_outside_annotation"] = _dice(pred[held] == 1, truth[held] == 1)
    write_text(out / "metrics.md", _metrics_table(result.metrics, result.seconds))
    _overlay(out / "overlay.png", rgb, pred, truth)
    _loss_plot(out / "loss.png", pre.history, ft.history)
    result.files.update(overlay=out / "overlay.png", loss_plot=out / "loss.png", metrics=out / "metrics.md")
    lap("evaluate")
    write_text(out / "summary.json", json.dumps(
        {"files": {k: str(v) for k, v in result.files.items()}, "metrics": result.metrics,
         "seconds": result.seconds}, indent=2, default=float))
    return result


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def _save_png(path: Path, labels: np.ndarray) -> None:
    from skimage.io import imsave

    with atomic_path(path) as tmp:
        imsave(tmp, labels.astype(np.uint8), check_contrast=False)


def _overlay(path: Path, rgb: np.ndarray, pred: np.ndarray, truth: np.ndarray, side: int = 768) -> None:
    """Left: the slide's top-left corner with predicted nucleus outlines (green) and
    the truth (yellow); the annotated corner is framed in blue."""
    from skimage.io import imsave
    from skimage.segmentation import find_boundaries

    view = rgb[:side, :side].copy()
    view[find_boundaries(truth[:side, :side] == 1, mode="inner")] = (255, 220, 0)
    view[find_boundaries(pred[:side, :side] == 1, mode="inner")] = (0, 200, 60)
    a = min(ANNOTATED, side) - 1
    view[[0, a], : a + 1] = (40, 90, 255)
    view[: a + 1, [0, a]] = (40, 90, 255)
    with atomic_path(path) as tmp:
        imsave(tmp, view, check_contrast=False)


def _loss_plot(path: Path, pre_history: list, ft_history: list) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), dpi=100)
    for ax, hist, title in ((fig.add_subplot(1, 2, 1), pre_history, "pretraining (P2-weighted noise loss)"),
                            (fig.add_subplot(1, 2, 2), ft_history, "fine-tuning (SS + focal loss)")):
        steps = [h["step"] for h in hist if "loss" in h]
        ax.plot(steps, [h["loss"] for h in hist if "loss" in h], lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)


def _metrics_table(metrics: dict, seconds: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in seconds.items()]
    return "\n".join(lines) + "\n"
