"""The screenshots of the paint / fine-tune / correct loop across two images in docs/napari.md.

    GENSELFDIFF_NAPARI_WORKER=thread xvfb-run -a -s "-screen 0 1400x900x24" \
        .venv/bin/python docs/make_loop_screenshots.py --steps 100 [--out DIR]

Runs the Fine-tune widget as a user would on two synthetic samples side by side (the second one
restained: paler haematoxylin, more eosin): a whole-image annotation layer on each, strokes on
both, both ticked under 'Train on', a short fine-tune from scratch with previews. It saves
``loop-strokes.png`` (strokes on the two images) and ``loop-preview.png`` (zoomed in: the
preview's outlines with the strokes visible inside). Settings and the model go to a
temporary folder. About 3 minutes on a busy 2-core CPU for 100 steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_screenshots import PLUGIN, screenshot, wait  # noqa: E402

OUT = Path(__file__).resolve().parent / "images"


def restain(rgb: np.ndarray, h: float, e: float) -> np.ndarray:
    """Scale the haematoxylin and eosin of colour deconvolution: another lab's staining."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed[..., 0] *= h
    hed[..., 1] *= e
    return (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)


def strokes(truth: np.ndarray, rng) -> np.ndarray:
    """Dabs on some nuclei (2) and short lines across stroma (1)."""
    from scipy import ndimage as ndi

    paint = np.zeros(truth.shape, np.uint8)
    lab, n = ndi.label(truth > 0)
    for i in rng.choice(n, size=min(n, 40), replace=False) + 1:
        paint[ndi.binary_erosion(lab == i, iterations=1)] = 2
    far = ~ndi.binary_dilation(truth > 0, iterations=4)
    rows = np.zeros(truth.shape, bool)
    for r in rng.choice(truth.shape[0] - 3, size=10, replace=False):
        c = rng.integers(0, truth.shape[1] - 120)
        rows[r : r + 3, c : c + 120] = True
    paint[rows & far] = 1
    return paint


def small(path: Path) -> None:
    """The screenshot as a 256-colour PNG (a third of the size; the docs stay small)."""
    from PIL import Image

    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps (default 150)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for the screenshots (default {OUT})")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="genselfdiff-loop-"))
    os.environ["GENSELFDIFF_NAPARI_CONFIG_DIR"] = str(tmp / "config")
    args.out.mkdir(exist_ok=True)

    import napari

    from genselfdiff.app.synthetic import synthetic_tissue

    print(" ".join([sys.executable, *sys.argv]))
    viewer = napari.Viewer(title="napari-genselfdiff")
    viewer.window._qt_window.resize(1400, 850)
    rng = np.random.default_rng(0)
    truths = {}
    for i, (name, h, e) in enumerate((("slide A", 1.0, 1.0), ("slide B", 0.5, 2.5))):
        rgb, truth = synthetic_tissue((512, 512), seed=21 + i, glass=0.1)
        viewer.add_image(restain(rgb, h, e), name=name, rgb=True, scale=(0.5, 0.5), translate=(0, 270.0 * i),
                         metadata={"genselfdiff": {"mpp": 0.5}})
        truths[name] = truth
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.preset.setCurrentText("tiny")
    widget.base.setText("")
    widget.budget.amount.setValue(args.steps)
    widget.preview_every.setValue(max(args.steps // 3, 1))
    widget.out.setText(str(tmp / "segmenter.pt"))
    for name in truths:
        widget.image.setCurrentText(name)
        widget.new_annotation_layer()
        viewer.layers[f"{name} annotation"].data = strokes(truths[name], rng)
    screenshot(viewer, args.out / "loop-strokes.png")
    small(args.out / "loop-strokes.png")

    viewer.scene.camera.center = (0, 128.0, 270.0 + 128.0)  # µm: the middle of slide B
    viewer.scene.camera.zoom = 3.0
    wait(lambda: True)
    widget.start()
    wait(lambda: not widget.runner.running)
    viewer.layers.selection.active = viewer.layers["slide B annotation"]
    screenshot(viewer, args.out / "loop-preview.png", fit=False)
    small(args.out / "loop-preview.png")
    print(f"wrote {args.out}/loop-strokes.png, loop-preview.png after {widget.result.steps} steps")
    print(widget.figures.text(), "|", widget.warning.text())
    viewer.close()


if __name__ == "__main__":
    main()
