"""Fine-tuning with instance ids: the maps move with the augmentation, the head is trained and
saved, and ids that do not fit their mask (or are missing) are one sentence."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.io import imsave

from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.train.augment import Augment, augment


def test_augment_moves_ids_with_targets_through_every_geometric_change():
    _, truth = synthetic_tissue((64, 64), seed=4)
    ids = ndi.label(truth > 0)[0]
    labels = np.stack([(truth > 0).astype(np.int64), ids], -1)
    before = {tuple(p) for p in labels.reshape(-1, 2)}
    cfg = Augment(blur=0, color=0, hed=0, elastic=1.0, elastic_px=4.0)
    for seed in range(6):
        img, lab = augment(np.zeros((64, 64, 3), np.uint8), labels, np.random.default_rng(seed), cfg)
        assert lab.shape == (64, 64, 2) and lab.dtype == np.int64
        assert {tuple(p) for p in lab.reshape(-1, 2)} <= before  # every (class, id) pair is one of the original
        assert not np.array_equal(lab, labels)


def write_set(folder, n=2, side=96, bad=None):
    """n synthetic images with masks/ and ids/ (uint16) under ``folder``; ``bad``: break the ids of image 0."""
    for sub in ("images", "masks", "ids"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, truth = synthetic_tissue((side, side), seed=20 + i)
        mask = (truth > 0).astype(np.uint8)
        ids = ndi.label(mask)[0].astype(np.uint16)
        biggest = np.bincount(ids.ravel())[1:].argmax() + 1
        if i == 0 and bad == "lost":
            mask[ids == biggest] = 0  # an id wholly on the background
        if i == 0 and bad == "missing":
            ids[ids == biggest] = 0  # an object the ids forgot
        imsave(folder / "images" / f"im{i}.png", rgb, check_contrast=False)
        imsave(folder / "masks" / f"im{i}.png", mask, check_contrast=False)
        imsave(folder / "ids" / f"im{i}.png", ids, check_contrast=False)
    return folder


def cli_args(folder, out):
    return ["finetune", "--images", str(folder / "images"), "--masks", str(folder / "masks"), "--instances",
            str(folder / "ids"), "--out", str(out), "--preset", "tiny", "--steps", "4", "--device", "cpu",
            "--class-names", "background,nucleus", "--seed", "0"]


def test_finetune_with_ids_trains_and_saves_the_geometry_head(tmp_path):
    import torch

    from genselfdiff import load_model
    from genselfdiff.app.cli import main
    from genselfdiff.infer.segment import segment
    from genselfdiff.objects.hv_split import HVParameters

    folder = write_set(tmp_path)
    out = tmp_path / "hv.pt"
    assert main(cli_args(folder, out)) == 0
    model = load_model(out, "cpu")
    assert model.has_geometry and isinstance(model.meta.get("geometry"), dict)
    # The head learnt: its weights moved from a fresh head's drawn with the same seed.
    from genselfdiff.nn.unet import GeometryHead

    torch.manual_seed(0)
    assert any(not torch.equal(v, model.net.geometry.state_dict()[k]) for k, v in GeometryHead(16).state_dict().items())
    rgb, _ = synthetic_tissue((96, 96), seed=30)
    r = segment(model, rgb, skip_background=False, instances=True)
    assert r.objects is not None and r.objects.ids.shape == (96, 96)
    # Without ids the same command makes a model without the head (as before).
    plain = [a for a in cli_args(folder, tmp_path / "plain.pt") if a not in ("--instances", str(folder / "ids"))]
    assert main(plain) == 0 and not load_model(tmp_path / "plain.pt", "cpu").has_geometry
    from genselfdiff.objects.request import object_request

    assert isinstance(object_request(model).params, HVParameters)


@pytest.mark.parametrize("bad, said", [
    ("lost", r"im0.png: id \d+ lies wholly on the mask's background"),
    ("missing", r"im0.png gives no id to pixel \(\d+, \d+\) of class 1, in a region of \d+ pixels"),
])
def test_ids_that_do_not_fit_the_mask_are_one_sentence_and_exit_2(tmp_path, capsys, bad, said):
    from genselfdiff.app.cli import main

    folder = write_set(tmp_path, bad=bad)
    assert main(cli_args(folder, tmp_path / "m.pt")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in err if "im0.png" in e]) == 1
    assert any(__import__("re").search(said, e) for e in err), err
    assert not (tmp_path / "m.pt").exists()


def test_an_image_without_ids_is_named(tmp_path, capsys):
    from genselfdiff.app.cli import main

    folder = write_set(tmp_path)
    (folder / "ids" / "im1.png").unlink()
    assert main(cli_args(folder, tmp_path / "m.pt")) == 2
    err = capsys.readouterr().err
    assert "No image of ids in" in err and "matches im1.png" in err and "Traceback" not in err
