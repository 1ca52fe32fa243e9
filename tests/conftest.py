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


@pytest.fixture(scope="session")
def local_model():
    """``local_model(level=0)``: a segmentation Model around a purely convolutional stand-in network
    (receptive radius 4, classes background/a/b): cheap, sharp class ids, and tiling must be exact
    for it. It runs in fp32 on every CPU, so tiled and whole-image results compare exactly."""
    import torch
    from torch import nn

    from genselfdiff.io.labels import default_colors
    from genselfdiff.io.pixelsize import Resolution
    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.model import Model

    class LocalNet(nn.Module):
        classes = 3

        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.body = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.Tanh(), nn.Conv2d(8, 3, 5, padding=2))

        def forward(self, x):
            return self.body(x) * 20  # sharp, so class ids change often

    def make(level: int = 0) -> Model:
        return Model(net=LocalNet().eval(), kind="segmentation", net_config=get_preset("tiny").net,
                     device=torch.device("cpu"), classes=["background", "a", "b"], colors=default_colors(3),
                     resolution=Resolution(level=level), patch=64, amp=False)

    return make


@pytest.fixture(scope="session")
def trained_unet():
    """The tiny U-Net (2 classes) trained for a few seconds on synthetic nuclei: a real network whose
    predictions follow the tissue (a random one is dominated by its global GroupNorm and attention
    statistics, which no tiling can reproduce). In eval mode."""
    import torch
    from torch import nn

    from genselfdiff.app.synthetic import synthetic_tissue
    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.unet import UNet, to_segmentation

    torch.manual_seed(0)
    net = to_segmentation(UNet(get_preset("tiny").net), 2)
    rgb, truth = synthetic_tissue((256, 256), seed=11, glass=0.1)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    y = torch.from_numpy(truth).long()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    rng = np.random.default_rng(0)
    for _ in range(25):
        ys, xs = rng.integers(0, 256 - 32, 8), rng.integers(0, 256 - 32, 8)
        xb = torch.stack([x[:, a:a + 32, b:b + 32] for a, b in zip(ys, xs)])
        yb = torch.stack([y[a:a + 32, b:b + 32] for a, b in zip(ys, xs)])
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
