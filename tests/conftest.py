import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MONUSEG = ROOT.parent / "shared" / "data" / "monuseg" / "train"

# One thread per process: tests spawn workers (DDP ranks, dask workers, napari's training
# process) and OpenMP threads spinning on oversubscribed cores make torch 10-100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _paint_strokes(truth):
    """A few horizontal brush strokes, 3 px thick: 2 inside nuclei, 1 on clear background."""
    from scipy import ndimage as ndi

    inside = ndi.binary_erosion(truth == 1)
    outside = ~ndi.binary_dilation(truth == 1, iterations=3)
    sparse = np.zeros(truth.shape, np.uint8)
    for r in (40, 100, 160, 220):
        band = np.zeros(truth.shape, bool)
        band[r : r + 3] = True
        sparse[band & outside] = 1
        sparse[band & inside] = 2
    return sparse


@pytest.fixture
def paint_strokes():
    """``paint_strokes(truth)``: a few horizontal brush strokes (see :func:`_paint_strokes`)."""
    return _paint_strokes


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_pair():
    """A small H&E-like image with its nucleus mask (no download)."""
    from genselfdiff.app.synthetic import synthetic_tissue

    return synthetic_tissue((256, 256), seed=3, glass=0.15)


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory, synthetic_pair):
    """A pyramidal OME-TIFF of synthetic tissue, 1024 px wide, with its ground truth."""
    from genselfdiff.app.synthetic import synthetic_tissue, write_pyramidal_tiff

    rgb, labels = synthetic_tissue((1024, 1024), seed=7)
    path = tmp_path_factory.mktemp("slides") / "synthetic.ome.tif"
    write_pyramidal_tiff(path, rgb, mpp=0.5)
    return path, rgb, labels


@pytest.fixture
def rng():
    return np.random.default_rng(0)
