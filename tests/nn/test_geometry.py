"""The geometry head: HoVer-Net targets on toy ids, the loss, the head in checkpoints, bad ids."""

import numpy as np
import pytest
import torch

from genselfdiff.errors import UserError
from genselfdiff.nn.geometry import (
    BACKGROUND,
    IGNORED,
    NUCLEUS,
    fit_instances,
    hv_loss,
    hv_maps,
    hv_targets,
)


def toy_ids():
    ids = np.zeros((8, 10), np.int64)
    ids[1:4, 1:6] = 3  # 3 x 5: centre (2, 3)
    ids[4:7, 6:9] = 7  # 3 x 3 touching it diagonally: centre (5, 7)
    return ids


def test_hv_maps_of_a_toy_instance_image():
    m = hv_maps(toy_ids())
    assert m.shape == (2, 8, 10) and m.dtype == np.float32
    np.testing.assert_allclose(m[0, 2, 1:6], [-1, -0.5, 0, 0.5, 1])  # horizontal offset, each side scaled
    np.testing.assert_allclose(m[1, 1:4, 3], [-1, 0, 1])  # vertical offset
    np.testing.assert_allclose(m[0, 5, 6:9], [-1, 0, 1])
    assert (m[:, toy_ids() == 0] == 0).all()
    for k in (3, 7):  # every nucleus spans [-1, 1] on both maps
        assert m[0][toy_ids() == k].min() == -1 and m[0][toy_ids() == k].max() == 1
    # Asymmetric: offsets left of the centre scaled by the left extreme, right by the right one.
    ids = np.zeros((1, 6), np.int64)
    ids[0, :4] = 1  # centre of mass 1.5 -> pixel 2: offsets -2, -1, 0, 1
    np.testing.assert_allclose(hv_maps(ids)[0, 0, :4], [-1, -0.5, 0, 1])


def test_hv_targets_codes_and_loss():
    ids = toy_ids()
    valid = np.ones(ids.shape, bool)
    valid[:, -1] = False
    t = hv_targets(ids, valid)
    assert t.shape == (3, 8, 10)
    assert t[2, 2, 2] == NUCLEUS and t[2, 0, 0] == BACKGROUND and t[2, 0, -1] == IGNORED
    target = torch.from_numpy(t)[None]
    exact = target[:, :2].clone()
    assert float(hv_loss(exact, target)) == 0.0
    wrong = exact.clone()
    wrong[:, :, 2, 2] += 0.5
    assert float(hv_loss(wrong, target)) > 0
    ignored = exact.clone()
    ignored[:, :, :, -1] = 5.0  # ignored pixels: no loss (and so no gradient)
    assert float(hv_loss(ignored, target)) == 0.0
    # The gradient term: a flat prediction is worse than the MSE alone says.
    flat = torch.zeros_like(exact)
    mse = float(((flat - exact) ** 2)[:, :, :, :-1].mean())
    assert float(hv_loss(flat, target)) > mse + 0.1


def _tiny_checkpoint(path, geometry: bool):
    from genselfdiff.io.checkpoint import save_checkpoint
    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.unet import segmentation_net

    tiny = get_preset("tiny").net
    torch.manual_seed(0)
    net = segmentation_net(tiny, 2, geometry=geometry)
    save_checkpoint(path, {"kind": "segmentation", "net": {**tiny.to_dict(), "out_channels": 2},
                           "state_dict": net.state_dict(), "classes": ["background", "nucleus"],
                           "config": {"patch": 64}, "resolution": {"level": 0, "mpp": None}})
    return net.eval()


def test_geometry_head_is_saved_and_loaded(tmp_path):
    from genselfdiff.nn.model import class_probabilities, class_probabilities_and_geometry, load_model

    net = _tiny_checkpoint(tmp_path / "hv.pt", geometry=True)
    assert any(k.startswith("geometry.") for k in net.state_dict())
    model = load_model(tmp_path / "hv.pt", "cpu")
    assert model.has_geometry
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        logits, maps = model.net(x, geometry=True)
        want_logits, want_maps = net(x, geometry=True)
        assert maps.shape == (1, 2, 64, 64)
        torch.testing.assert_close(maps, want_maps)
        torch.testing.assert_close(logits, model.net(x))  # the class head is the same with or without maps
        # The flips of test-time augmentation: a flipped input gives flipped maps, negated along the flip.
        p, m = class_probabilities_and_geometry(model.net, x, amp=False, tta=True)
        pf, mf = class_probabilities_and_geometry(model.net, x.flip(3), amp=False, tta=True)
        torch.testing.assert_close(pf, p.flip(3))
        torch.testing.assert_close(mf[:, 0], -m[:, 0].flip(2), atol=1e-6, rtol=0)
        torch.testing.assert_close(mf[:, 1], m[:, 1].flip(2), atol=1e-6, rtol=0)
        torch.testing.assert_close(p, class_probabilities(model.net, x, amp=False, tta=True))


def test_old_checkpoint_without_head_loads_and_segments_objects(tmp_path):
    from genselfdiff.app.synthetic import synthetic_tissue
    from genselfdiff.infer.segment import segment
    from genselfdiff.nn.model import load_model

    net = _tiny_checkpoint(tmp_path / "old.pt", geometry=False)
    assert not any(k.startswith("geometry.") for k in net.state_dict())
    model = load_model(tmp_path / "old.pt", "cpu")
    assert not model.has_geometry
    with pytest.raises(ValueError, match="no geometry head"):
        model.net(torch.zeros(1, 3, 64, 64), geometry=True)
    rgb, _ = synthetic_tissue((64, 64), seed=1)
    r = segment(model, rgb, skip_background=False, instances=True)
    assert r.objects is not None and r.objects.ids.shape == (64, 64)


def test_ids_are_fitted_to_their_mask_or_refused_in_one_sentence():
    ids = toy_ids()
    classes = (ids > 0).astype(np.uint8)
    assert np.array_equal(fit_instances(ids, classes, "ids.png"), ids)  # fits as it is
    # A rim where the two were rasterised apart is mended: a class pixel next to an id takes it,
    # an id pixel on the background is dropped.
    rim = classes.copy()
    rim[1, 6] = 1  # class, no id, next to id 3
    rim[6, 8] = 0  # id 7 on the background
    fitted = fit_instances(ids, rim, "ids.png", mpp=0.5)
    assert fitted[1, 6] == 3 and fitted[6, 8] == 0 and ((fitted > 0) == (rim > 0)).all()
    spans = classes.copy()
    spans[2, 2] = 2  # id 3 over class 1 and class 2
    with pytest.raises(UserError, match=r"^ids.png: id 3 covers pixels of class 1 and 2; an id must lie") as e:
        fit_instances(ids, spans, "ids.png")
    assert "\n" not in str(e.value)
    gone = classes.copy()
    gone[ids == 7] = 0  # id 7 wholly on the background
    with pytest.raises(UserError, match=r"^ids.png: id 7 lies wholly on the mask's background"):
        fit_instances(ids, gone, "ids.png")
    forgot = np.zeros((30, 30), np.uint8)
    forgot[2:5, 2:5] = 1
    forgot[15:25, 15:25] = 1  # an object-sized region (100 px = 25 µm² at 0.5 µm/px) without any id
    some = np.where(forgot[:, :] & (np.arange(30)[:, None] < 10), 4, 0)
    with pytest.raises(UserError, match=r"^ids.png gives no id to pixel \(15, 15\) of class 1, in a region of 100"):
        fit_instances(some, forgot, "ids.png", mpp=0.5)
    with pytest.raises(UserError, match="ids.png is 10x8 pixels but its class mask is 9x8"):
        fit_instances(ids, classes[:, :9], "ids.png")
