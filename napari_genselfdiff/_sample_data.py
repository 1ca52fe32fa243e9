"""File > Open Sample: H&E-like synthetic tissue and its nucleus ground truth.

Generated on the fly by the engine (:func:`genselfdiff.app.synthetic.synthetic_tissue`), so
nothing is downloaded and no patient data ships with the package. Nuclei are 7-17 px
across, as at 0.5 µm/px, which is the scale the layers get.
"""

from __future__ import annotations

from ._layers import META, labels_kwargs

SAMPLE_SHAPE = (1024, 1024)
SAMPLE_MPP = 0.5
CLASSES = ["background", "nucleus"]


def make_sample(shape=SAMPLE_SHAPE, seed: int = 0) -> list:
    from genselfdiff.app.synthetic import synthetic_tissue
    from genselfdiff.io.labels import default_colors

    rgb, truth = synthetic_tissue(tuple(shape), seed=seed)
    scale = (SAMPLE_MPP, SAMPLE_MPP)
    image = (rgb, {"name": "synthetic tissue", "rgb": True, "scale": scale,
                   "metadata": {META: {"mpp": SAMPLE_MPP}}}, "image")
    labels = (truth, {"name": "ground truth", "scale": scale, "opacity": 0.5,
                      **labels_kwargs(CLASSES, default_colors(len(CLASSES)))}, "labels")
    return [image, labels]
