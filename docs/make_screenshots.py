"""Regenerate the napari screenshots in docs/images/: pretrain.png, finetune.png, segment.png.

    xvfb-run -a -s "-screen 0 1600x1100x24" .venv/bin/python docs/make_screenshots.py [--quick] [--out DIR]

Runs the real widgets, as a user would, on the synthetic sample (no download): a short
pretraining on two unannotated slides (caught halfway, loss curve and all), a fine-tune
from strokes painted over the current view starting from it (loss and Dice plot, the
model's prediction over the view in the preview layer), and segmentation of the whole
sample. Settings and models go to a temporary folder. About 10-30 minutes on a busy 2-core
CPU; ``--quick`` trains for a few steps only (layout checks).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "images"
PLUGIN = "napari-genselfdiff"


def wait(condition, timeout=1800):
    from qtpy.QtWidgets import QApplication

    t0 = time.monotonic()
    while not condition():
        QApplication.processEvents()
        time.sleep(0.05)
        if time.monotonic() - t0 > timeout:
            sys.exit("timed out")
    for _ in range(20):  # let the last updates paint
        QApplication.processEvents()
        time.sleep(0.02)


def screenshot(viewer, path: Path, fit: bool = True):
    """The whole window, the data fitted to the canvas, without notification toasts over it."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    wait(lambda: True)  # docks added or removed change the canvas size first
    if fit:
        viewer.reset_view()
        wait(lambda: True)
    from genselfdiff.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        viewer.screenshot(str(tmp), canvas_only=False)


def strokes_over(truth: np.ndarray, box, rng) -> np.ndarray:
    """Brush strokes a pathologist might paint in ``box``: dabs on nuclei, lines across stroma."""
    from scipy import ndimage as ndi
    from skimage.draw import line

    y0, x0, y1, x1 = box
    sub = truth[y0:y1, x0:x1] > 0
    paint = np.zeros(sub.shape, np.uint8)
    lab, n = ndi.label(sub)
    centres = ndi.center_of_mass(sub, lab, range(1, n + 1))
    for cy, cx in [centres[i] for i in rng.choice(n, size=min(n, 30), replace=False)]:
        yy, xx = np.ogrid[: sub.shape[0], : sub.shape[1]]
        paint[((yy - cy) ** 2 + (xx - cx) ** 2 <= 9) & sub] = 2
    far = ~ndi.binary_dilation(sub, iterations=4)
    lines = np.zeros(sub.shape, bool)
    for _ in range(8):
        r0, c0 = rng.integers(0, sub.shape[0]), rng.integers(0, sub.shape[1])
        r1, c1 = np.clip([r0 + rng.integers(-60, 60), c0 + rng.integers(-90, 90)], 0, np.array(sub.shape) - 1)
        rr, cc = line(r0, c0, r1, c1)
        lines[rr, cc] = True
    paint[ndi.binary_dilation(lines, iterations=2) & far] = 1
    return paint


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few training steps only")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for the screenshots (default {OUT})")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="genselfdiff-shots-"))
    os.environ["GENSELFDIFF_NAPARI_CONFIG_DIR"] = str(tmp / "config")
    out = args.out
    out.mkdir(exist_ok=True)
    pretrain_steps, finetune_steps = (10, 10) if args.quick else (400, 300)

    import napari

    from genselfdiff.app.synthetic import synthetic_tissue, write_pyramidal_tiff
    from napari_genselfdiff._sample_data import make_sample

    print(" ".join([sys.executable, *sys.argv]))
    viewer = napari.Viewer(title="napari-genselfdiff")
    viewer.window._qt_window.resize(1600, 950)

    # 1. Pretrain on a folder of unannotated slides (one of them open), caught mid-run.
    slides = tmp / "slides"
    slides.mkdir()
    for seed in (11, 12):
        write_pyramidal_tiff(slides / f"slide{seed}.ome.tif", synthetic_tissue((1024, 1024), seed=seed)[0], mpp=0.5)
    viewer.open(str(slides / "slide11.ome.tif"), plugin=PLUGIN)
    dock, pretrain = viewer.window.add_plugin_dock_widget(PLUGIN, "Pretrain")
    pretrain.folder.setText(str(slides))
    pretrain.out.setText(str(tmp / "pretrained.pt"))
    pretrain.preset.setCurrentText("tiny")
    pretrain.budget.amount.setValue(pretrain_steps)
    pretrain.start()
    wait(lambda: len(pretrain.plot.steps) >= pretrain_steps // 2)
    pretrain.plot.redraw()
    screenshot(viewer, out / "pretrain.png")
    wait(lambda: not pretrain.runner.running)
    viewer.window.remove_dock_widget(dock)
    viewer.layers.clear()

    # 2. Paint strokes over the current view of the sample and fine-tune.
    for data, meta, kind in make_sample():
        getattr(viewer, f"add_{kind}")(data, **meta)
    image, truth = viewer.layers["synthetic tissue"], viewer.layers["ground truth"]
    truth.visible = False
    dock, finetune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    viewer.scene.camera.center = (0, 170.0, 190.0)  # µm
    viewer.scene.camera.zoom = 3.0
    wait(lambda: True)
    finetune.image.setCurrentText(image.name)
    finetune.new_annotation_layer()
    annotation = viewer.layers[-1]
    from napari_genselfdiff._layers import covered_window

    _, y0, x0 = covered_window(image, annotation)
    h, w = annotation.data.shape
    annotation.data = strokes_over(truth.data, (y0, x0, y0 + h, x0 + w), np.random.default_rng(0))
    finetune.budget.amount.setValue(finetune_steps)
    finetune.out.setText(str(tmp / "segmenter.pt"))
    finetune.start()
    wait(lambda: not finetune.runner.running)
    viewer.layers.selection.active = annotation
    screenshot(viewer, out / "finetune.png", fit=False)

    # 3. Segment the whole sample with the new model.
    dock2, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    viewer.window.remove_dock_widget(dock)
    annotation.visible = False
    viewer.layers.selection.active = image
    segment.start()
    wait(lambda: segment.worker is None)
    viewer.layers.selection.active = viewer.layers[f"{image.name} labels"]
    screenshot(viewer, out / "segment.png")
    print(f"wrote {out}/pretrain.png, finetune.png, segment.png; validation Dice {finetune.result.best_dice:.3f}")
    viewer.close()


if __name__ == "__main__":
    main()
