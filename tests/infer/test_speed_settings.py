"""The CPU speed settings: the labels of the fast path agree with the softmax path, --threads is checked
and restored, and the share of glass tiles is reported."""

import numpy as np
import pytest
import torch

from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.errors import UserError
from genselfdiff.infer.config import SegmentConfig
from genselfdiff.infer.pipeline import Predictor
from genselfdiff.infer.segment import segment
from genselfdiff.io.labels import default_colors
from genselfdiff.nn.config import get_preset
from genselfdiff.nn.model import Model, class_probabilities, to_input

TINY = get_preset("tiny").net


@pytest.fixture(scope="module")
def trained_model(trained_unet):
    """The tiny U-Net trained for a few seconds on synthetic nuclei (conftest), in fp32 (any CPU runs it alike)."""
    net = trained_unet
    return Model(net=net.eval(), kind="segmentation", net_config=net.unet.cfg, device=torch.device("cpu"),
                 classes=["background", "nucleus"], colors=default_colors(2), patch=64, amp=False)


def softmax_labels(model, rgb, kw):
    """Today's labels: argmax of the fp32 softmax (class_probabilities), tile by tile as segment cuts them."""
    original = Predictor.launch

    def launch(self, x):
        with torch.inference_mode():
            probs = class_probabilities(self.net, to_input(x.numpy(), self.device, self.normalization), amp=self.amp)
            return probs.argmax(1).to(torch.uint8), None, None, x, None  # no geometry map

    Predictor.launch = launch
    try:
        return segment(model, rgb, **kw).labels
    finally:
        Predictor.launch = original


def test_logit_argmax_agrees_with_softmax_labels(trained_model):
    """Without probabilities the engine takes the argmax of the logits: the same network's labels."""
    rgb, truth = synthetic_tissue((256, 256), seed=5, glass=0.1)
    kw = dict(tile=128, overlap=32, chunk=128, skip_background=False, batch=3)
    before = softmax_labels(trained_model, rgb, kw)
    now = segment(trained_model, rgb, **kw).labels
    assert (before == truth).mean() > 0.95  # a network whose labels mean something
    assert (now == before).mean() >= 0.99


def test_probabilities_path_gives_the_same_labels(trained_model, tmp_path):
    """Asking for the probabilities (softmax path) does not change the labels."""
    rgb, _ = synthetic_tissue((192, 192), seed=6, glass=0.1)
    kw = dict(tile=128, overlap=32, chunk=192, skip_background=False)
    plain = segment(trained_model, rgb, **kw).labels
    with_probs = segment(trained_model, rgb, tmp_path / "p.ome.zarr", probabilities=True, **kw).labels
    assert (np.asarray(with_probs) == plain).mean() >= 0.99


def test_threads_set_for_the_run_and_restored(trained_model, monkeypatch):
    seen = []
    original = Predictor.launch

    def launch(self, x):
        seen.append(torch.get_num_threads())
        return original(self, x)

    monkeypatch.setattr(Predictor, "launch", launch)
    before = torch.get_num_threads()
    rgb, _ = synthetic_tissue((128, 128), seed=7)
    segment(trained_model, rgb, tile=128, overlap=32, skip_background=False, threads=1)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [0, -2])
def test_threads_below_one_is_one_sentence(threads):
    with pytest.raises(UserError, match="at least 1 CPU thread"):
        SegmentConfig(threads=threads)


def test_cli_threads_zero_exits_2(tmp_path, capsys):
    from genselfdiff.app.cli import main

    rc = main(["segment", str(tmp_path / "model.pt"), str(tmp_path), "--out", str(tmp_path / "out"), "--threads", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "--threads" in err[0]


def test_skipped_share_is_reported(trained_model):
    rgb, _ = synthetic_tissue((256, 256), seed=3)
    rgb[:, 128:] = 245  # the right half is glass
    r = segment(trained_model, rgb, tile=128, overlap=32, chunk=128)
    assert r.skipped_tiles > 0 and r.skipped_share == r.skipped_tiles / r.tiles
    assert 0.25 <= r.skipped_share <= 0.75
