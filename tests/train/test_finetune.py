"""Fine-tuning: annotations, augmentation, the training run, its checkpoint and the CLI."""

import json

import numpy as np
import pytest
import torch
from skimage.io import imsave

from genselfdiff.app.cli import main
from genselfdiff.errors import UserError
from genselfdiff.io.checkpoint import save_checkpoint
from genselfdiff.io.files import match_by_stem
from genselfdiff.io.pixelsize import Resolution
from genselfdiff.nn.config import NetConfig, get_preset
from genselfdiff.nn.model import load_model
from genselfdiff.nn.unet import UNet
from genselfdiff.train.annotations import (
    PatchSampler,
    WindowReader,
    open_labelled,
    scan,
    split_tiles,
    to_targets,
)
from genselfdiff.train.augment import Augment, augment, hed_jitter
from genselfdiff.train.config import FinetuneConfig
from genselfdiff.train.finetune import finetune
from genselfdiff.train.losses import IGNORE
from genselfdiff.train.run import last_path

TINY = NetConfig.from_dict(get_preset("tiny").net.to_dict())


def _cfg(**kw):
    base = dict(patch=64, batch=4, steps=16, steps_per_epoch=8, lr=3e-4, seed=0)
    return FinetuneConfig.from_preset("tiny", **{**base, **kw})


def _dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def _pretrained(path, seed=123, ema=False):
    torch.manual_seed(seed)
    unet = UNet(TINY)
    payload = {"kind": "pretrained", "net": TINY.to_dict(), "state_dict": unet.state_dict(),
               "config": {"preset": "tiny", "patch": 64}, "data": {"files": ["somewhere.svs"]}, "step": 7}
    if ema:
        torch.manual_seed(seed + 1)
        payload["ema_state_dict"] = UNet(TINY).state_dict()
    save_checkpoint(path, payload)
    return payload


# --- annotations and augmentation --------------------------------------------------------

def test_geometry_moves_image_and_labels_together(rng):
    lab = np.zeros((64, 64), np.int64)
    lab[10:30, 5:25] = 1
    lab[40:60, 30:50] = IGNORE
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0] = np.where(lab == 1, 200, 0)
    img[..., 1] = np.where(lab == IGNORE, 200, 0)
    cfg = Augment(blur=0, color=0, hed=0, elastic=1.0, elastic_px=2.0)
    for _ in range(10):
        a, b = augment(img, lab, rng, cfg)
        assert a.shape == img.shape and a.dtype == np.uint8 and b.dtype == lab.dtype
        assert set(np.unique(b)) <= {IGNORE, 0, 1}
        agree = ((a[..., 0] > 100) == (b == 1)).mean(), ((a[..., 1] > 100) == (b == IGNORE)).mean()
        assert min(agree) > 0.97  # only interpolated edge pixels may differ
    flips = Augment(blur=0, color=0, hed=0, elastic=0)
    for _ in range(10):
        a, b = augment(img, lab, rng, flips)
        assert np.array_equal(a[..., 0] > 100, b == 1)  # flips and 90-degree turns are exact


def test_photometric_changes_leave_labels_alone(rng, synthetic_pair):
    img, lab = synthetic_pair
    a, b = augment(img, lab.astype(np.int64), rng, Augment(flips=False, rotate90=False, blur=1, color=1, elastic=0))
    assert np.array_equal(b, lab) and not np.array_equal(a, img)


def test_hed_jitter_changes_stain_amounts_and_nothing_else(rng, synthetic_pair):
    img, _ = synthetic_pair
    assert np.array_equal(hed_jitter(img, rng, 0.0), img)  # no perturbation: the image back exactly
    out = hed_jitter(img, rng, 0.2)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    # Only the stain amounts move: pixels of one colour stay of one colour.
    flat = np.full((4, 4, 3), (180, 90, 160), np.uint8)
    assert len(np.unique(hed_jitter(flat, rng, 0.2).reshape(-1, 3), axis=0)) == 1
    a, b = augment(img, np.zeros(img.shape[:2], np.int64), rng, Augment(
        flips=False, rotate90=False, blur=0, color=0, elastic=0, hed=1.0, hed_sigma=0.2))
    assert not np.array_equal(a, img) and not b.any()


def test_masks_are_matched_by_stem(tmp_path):
    for name in ("a.png", "a_mask.png", "b.png", "c.ome.tif"):
        (tmp_path / name).touch()
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "c_labels.png").touch()
    (masks / "zzz.png").touch()
    images = sorted(tmp_path.glob("*.*"))
    pairs, unmatched, unused = match_by_stem(images, [tmp_path / "a_mask.png", masks])
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a_mask.png"), ("c.ome.tif", "c_labels.png")]
    assert [p.name for p in unmatched] == ["b.png"]  # a_mask.png is a mask, not an unmatched image
    assert [p.name for p in unused] == ["zzz.png"]


def test_strokes_on_a_lazy_slide_sample_only_near_the_strokes(synthetic_slide):
    path, rgb, truth = synthetic_slide
    import dask.array as da

    sparse = np.zeros(truth.shape, np.uint8)
    sparse[900:903, 700:760] = 1
    sparse[905:908, 700:760] = 2
    item = open_labelled(path, da.from_array(sparse, chunks=256), Resolution())
    item.image = WindowReader(item.image.array, 255, cell=128, load_below=0)  # force lazy, cached reads
    scan(item, sparse=True, tile=64, block=256)
    assert item.counts[1] == 180 and item.counts[2] == 180 and set(item.points) == {1, 2}
    assert split_tiles([item], 0.5, seed=0)
    sampler = PatchSampler([item], 64, 64, sparse=True, balance=1.0)
    for k in range(30):
        img, target = sampler.sample(np.random.default_rng(k))
        assert img.shape == (64, 64, 3) and target.shape == (64, 64)
        assert set(np.unique(target)) <= {IGNORE, 0, 1}
        assert (target != IGNORE).any()
    # Only the cells around the strokes were ever decoded.
    assert all(cy * 128 >= 700 and cx * 128 >= 576 for cy, cx in item.image.cache)
    assert np.array_equal(to_targets(np.array([0, 1, 2]), sparse=True), [IGNORE, 0, 1])
    assert np.array_equal(to_targets(np.array([0, 1, 2]), sparse=False), [0, 1, 2])


def test_training_patches_ignore_unlabelled_and_held_out_pixels(synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    sparse = paint_strokes(truth)
    item = open_labelled(img, sparse, Resolution())
    scan(item, sparse=True, tile=64)
    split_tiles([item], 0.25, seed=1)
    sampler = PatchSampler([item], 64, 64, sparse=True, balance=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        y0, x0 = int(rng.integers(0, 192)), int(rng.integers(0, 192))
        patch_labels = sparse[y0 : y0 + 64, x0 : x0 + 64]
        t = to_targets(patch_labels, True)
        t[sampler._outside_or_val(item, y0, x0, 64)] = IGNORE
        assert np.all(t[patch_labels == 0] == IGNORE)
        held = np.kron(item.val_tiles, np.ones((64, 64), bool))[y0 : y0 + 64, x0 : x0 + 64]
        assert np.all(t[held] == IGNORE)


# --- the training run -----------------------------------------------------------------------

def test_dense_finetuning_improves_dice_and_the_checkpoint_predicts(tmp_path, synthetic_pair):
    img, truth = synthetic_pair
    seen = []
    result = finetune([img], [truth], tmp_path / "seg.pt", _cfg(class_names=["background", "nucleus"]),
                      device="cpu", progress=seen.append)
    vals = [h["val_dice"] for h in result.history if "val_dice" in h]
    assert vals[0] < 0.5 and result.best_dice > vals[0] + 0.2
    assert result.steps == 16 and not result.stopped and len(result.per_class_dice) == 2
    assert any(p.stage == "finetune" and "loss" in p.metrics and "val_dice" in p.metrics for p in seen)
    model = load_model(result.path, "cpu")
    assert model.kind == "segmentation" and model.classes == ["background", "nucleus"]
    assert model.patch == 64 and len(model.colors) == 2
    probs = model.predict(img[None, :128, :96])
    assert probs.shape == (1, 2, 128, 96) and np.allclose(probs.sum(1), 1, atol=1e-4)
    ckpt = torch.load(result.path, weights_only=True)
    assert ckpt["net"]["out_channels"] == 2 and ckpt["pretrained_from"] is None
    assert ckpt["best_dice"] == pytest.approx(result.best_dice)
    assert FinetuneConfig.from_dict(ckpt["config"]).class_names == ["background", "nucleus"]
    assert "optimizer" not in ckpt and "rng" not in ckpt  # the model to share holds no training state
    last = torch.load(last_path(result.path), weights_only=True)  # the resume state sits beside it
    assert last["step"] == 16 and "optimizer" in last and last["train_state"]["finished"]


def test_sparse_scribbles_train_and_leave_unlabelled_pixels_alone(tmp_path, synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    sparse = paint_strokes(truth)
    assert (sparse > 0).mean() < 0.05  # a few strokes
    result = finetune([img], [sparse], tmp_path / "s.pt", _cfg(sparse=True, val_fraction=0.3, prior=0.0),
                      device="cpu")
    model = load_model(result.path, "cpu")
    pred = model.predict(img[None]).argmax(1)[0]
    # Unlabelled pixels were not learnt as background: nuclei away from the strokes are found.
    assert _dice(pred == 1, truth == 1) > 0.6
    assert model.classes == ["background", "class 1"]
    ckpt = torch.load(result.path, weights_only=True)
    assert ckpt["data"]["sparse"] and ckpt["data"]["annotated_pixels"] == [int((sparse == 1).sum()), int((sparse == 2).sum())]


def test_strokes_of_nuclei_get_the_haematoxylin_prior_and_others_do_not(tmp_path, synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    nuclei = paint_strokes(truth)
    cfg = _cfg(sparse=True, steps=2, steps_per_epoch=2)
    finetune([img], [nuclei], tmp_path / "n.pt", cfg, device="cpu")
    assert torch.load(tmp_path / "n.pt", weights_only=True)["config"]["prior"] == 0.5  # the default weight
    swapped = np.where(nuclei > 0, 3 - nuclei, 0).astype(np.uint8)  # class 1 painted on the stroma
    finetune([img], [swapped], tmp_path / "s.pt", cfg, device="cpu")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["config"]["prior"] == 0.0
    finetune([img], [truth], tmp_path / "d.pt", _cfg(steps=2, steps_per_epoch=2), device="cpu")  # masks need none
    assert torch.load(tmp_path / "d.pt", weights_only=True)["config"]["prior"] == 0.0


def test_pretrained_weights_are_loaded_except_the_head(tmp_path, synthetic_pair):
    img, truth = synthetic_pair
    pre = _pretrained(tmp_path / "pre.pt", ema=True)
    result = finetune([img], [truth], tmp_path / "seg.pt", _cfg(preset="paper", steps=0),
                      pretrained=tmp_path / "pre.pt", device="cpu")
    ckpt = torch.load(result.path, weights_only=True)
    state = ckpt["state_dict"]
    for name, value in pre["ema_state_dict"].items():  # the EMA weights are the ones used
        if not name.startswith("head."):
            assert torch.equal(state["unet." + name], value), name
    assert state["unet.head.weight"].shape[0] == 2
    assert ckpt["net"]["width"] == TINY.width  # the checkpoint's network, not the "paper" preset's
    assert ckpt["pretrained_from"]["kind"] == "pretrained" and ckpt["pretrained_from"]["data"] == {"files": ["somewhere.svs"]}


def test_stop_leaves_a_valid_checkpoint_and_resume_continues(tmp_path, synthetic_pair):
    img, truth = synthetic_pair
    out = tmp_path / "seg.pt"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 5

    first = finetune([img], [truth], out, _cfg(steps=8, workers=2), device="cpu", should_stop=stop)
    assert first.stopped and first.steps == 5
    assert load_model(out, "cpu").kind == "segmentation"
    again = finetune([img], [truth], out, _cfg(steps=8, workers=2), device="cpu", resume=True)
    assert again.steps == 8 and not again.stopped
    assert [h["step"] for h in again.history if "val_dice" in h][:2] == [0, 5]


def test_cosine_schedule_decays_the_learning_rate_over_the_budget(tmp_path, synthetic_pair):
    img, truth = synthetic_pair

    def last_lr(**kw):
        r = finetune([img], [truth], tmp_path / "seg.pt", _cfg(steps=8, **kw), device="cpu")
        return torch.load(last_path(r.path), weights_only=True)["optimizer"]["param_groups"][0]["lr"]

    assert last_lr() == pytest.approx(3e-4)
    # The 8th step runs at 7/8 of the budget: lr * (1 + cos(7 pi / 8)) / 2.
    assert last_lr(lr_schedule="cosine") == pytest.approx(3e-4 * (1 + np.cos(7 * np.pi / 8)) / 2)
    with pytest.raises(UserError, match="learning-rate schedule 'linear'"):
        finetune([img], [truth], tmp_path / "x.pt", _cfg(steps=8, lr_schedule="linear"), device="cpu")


def test_strokes_decay_the_learning_rate_by_default_and_masks_keep_it_constant(tmp_path, synthetic_pair, paint_strokes):
    img, truth = synthetic_pair

    def run(labels, name, **kw):
        r = finetune([img], [labels], tmp_path / name, _cfg(steps=8, **kw), device="cpu")
        return (torch.load(r.path, weights_only=True)["config"]["lr_schedule"],
                torch.load(last_path(r.path), weights_only=True)["optimizer"]["param_groups"][0]["lr"])

    assert run(paint_strokes(truth), "s.pt", sparse=True) == ("cosine", pytest.approx(3e-4 * (1 + np.cos(7 * np.pi / 8)) / 2))
    assert run(truth, "m.pt") == ("constant", pytest.approx(3e-4))
    assert run(paint_strokes(truth), "c.pt", sparse=True, lr_schedule="constant")[0] == "constant"  # a choice is kept
    assert FinetuneConfig.from_preset("tiny", recipe="official", sparse=True).lr_schedule == "constant"  # its own


def test_a_saturated_validation_keeps_the_later_network():
    """Validation Dice 1 on a few painted strokes: a tie keeps the network trained longer, and
    only a real improvement resets the patience."""
    from types import SimpleNamespace

    from genselfdiff.train.annotations import ValidationSet
    from genselfdiff.train.finetune_run import FinetuneRun

    class Perfect(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # class 1 where the image is dark, else 0
            dark = (x.mean(1, keepdim=True) < 0).float()
            return torch.cat([1 - dark, dark], 1) + self.w

    images = np.full((2, 8, 8, 3), 255, np.uint8)
    images[:, :4] = 0
    targets = np.zeros((2, 8, 8), np.int64)
    targets[:, :4] = 1
    run = object.__new__(FinetuneRun)
    run.val, run.net, run.names = ValidationSet(images, targets), Perfect(), ["background", "nucleus"]
    run.cfg, run.history, run.epoch = SimpleNamespace(batch=8, amp=False, sparse=False, recipe="default"), [], 0
    run.best, run.since_best = {"dice": -1.0, "score": -np.inf, "per_class": [], "step": 0, "state": None}, 0
    for step in (0, 10, 20):
        run.step = step
        dice, kept = run.validate(torch.device("cpu"))
        assert dice == 1.0 and kept
    assert run.best["step"] == 20 and run.since_best == 2


def test_strokes_keep_the_latest_network_and_still_report_their_loss():
    """Held-out strokes are too few to choose by: the latest network is kept, never stopped early,
    while the held-out cross-entropy is still measured for the plot."""
    from types import SimpleNamespace

    from genselfdiff.train.annotations import ValidationSet
    from genselfdiff.train.finetune_run import FinetuneRun

    class Scaled(torch.nn.Module):  # always right, more or less confident
        def __init__(self):
            super().__init__()
            self.scale = 1.0

        def forward(self, x):
            dark = (x.mean(1, keepdim=True) < 0).float()
            return self.scale * torch.cat([1 - dark, dark], 1)

    images = np.full((1, 8, 8, 3), 255, np.uint8)
    images[:, :4] = 0
    targets = np.full((1, 8, 8), IGNORE, np.int64)
    targets[:, 1], targets[:, 6] = 1, 0
    run = object.__new__(FinetuneRun)
    run.val, run.net, run.names = ValidationSet(images, targets), Scaled(), ["background", "nucleus"]
    run.cfg, run.history, run.epoch = SimpleNamespace(batch=8, amp=False, sparse=True, recipe="default"), [], 0
    run.best, run.since_best = {"dice": -1.0, "score": -np.inf, "per_class": [], "step": 0, "state": None}, 0
    for step, scale in ((0, 1.0), (10, 4.0), (20, 2.0)):
        run.step, run.net.scale = step, scale
        dice, kept = run.validate(torch.device("cpu"))
        assert dice == 1.0 and kept
        # the cross-entropy of a right answer given with margin `scale`
        assert run.history[-1]["val_loss"] == pytest.approx(float(np.log1p(np.exp(-scale))), rel=1e-5)
    # the loss was lowest at step 10, but the network of step 20 is kept
    assert run.best["step"] == 20 and run.since_best == 0


def test_continuing_from_a_segmentation_model(tmp_path, synthetic_pair):
    img, truth = synthetic_pair
    first = finetune([img], [truth], tmp_path / "a.pt", _cfg(steps=2), device="cpu")
    second = finetune([img], [truth], tmp_path / "b.pt", _cfg(steps=2), pretrained=first.path, device="cpu")
    assert torch.load(second.path, weights_only=True)["pretrained_from"]["kind"] == "segmentation"
    three = truth.copy()
    three[:8] = 2
    with pytest.raises(UserError, match="a.pt"):
        finetune([img], [three], tmp_path / "c.pt", _cfg(steps=2), pretrained=first.path, device="cpu")


def test_previews_arrive_every_few_steps_and_leave_training_unchanged(tmp_path, synthetic_pair):
    from genselfdiff.train.finetune import Preview

    img, truth = synthetic_pair
    region = Preview(img[40:140, 30:190], origin=(40, 30))
    seen = []
    with_preview = finetune([img], [truth], tmp_path / "a.pt", _cfg(steps=7, preview_every=3), device="cpu",
                            progress=seen.append, preview=region)
    previews = [p for p in seen if p.stage == "preview"]
    assert [p.payload["step"] for p in previews] == [3, 6, 7]  # every 3 steps, and the end
    for p in previews:
        assert p.payload["labels"].shape == (100, 160) and p.payload["labels"].dtype == np.uint8
        assert p.payload["origin"] == (40, 30) and p.payload["classes"] == with_preview.classes
        assert len(p.payload["colors"]) == 2 and p.done == p.payload["step"]
    assert set(np.unique(previews[-1].payload["labels"])) <= {0, 1}
    # The last preview is what the final network predicts there.
    ckpt = torch.load(last_path(with_preview.path), weights_only=True)
    last = load_model(tmp_path / "a.pt", "cpu")
    last.net.load_state_dict(ckpt["state_dict"])
    from genselfdiff.infer.segment import segment

    np.testing.assert_array_equal(segment(last, region.image, skip_background=False).labels,
                                  previews[-1].payload["labels"])

    # The same run without previews ends with the same weights and losses.
    without = finetune([img], [truth], tmp_path / "b.pt", _cfg(steps=7, preview_every=3), device="cpu")
    assert [h.get("loss") for h in without.history] == [h.get("loss") for h in with_preview.history]
    other = torch.load(last_path(without.path), weights_only=True)["state_dict"]
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in other.items())


def test_a_stopped_run_sends_no_last_preview_and_a_huge_region_is_refused(tmp_path, synthetic_pair):
    from genselfdiff.train.finetune import PREVIEW_MAX_SIDE, Preview

    img, truth = synthetic_pair
    seen = []
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 4

    finetune([img], [truth], tmp_path / "a.pt", _cfg(steps=8, preview_every=2), device="cpu", progress=seen.append,
             should_stop=stop, preview=Preview(img[:64, :64]))
    assert [p.done for p in seen if p.stage == "preview"] == [2, 4]
    huge = Preview(np.zeros((PREVIEW_MAX_SIDE + 1, 8, 3), np.uint8))
    with pytest.raises(UserError, match="preview region"):
        finetune([img], [truth], tmp_path / "c.pt", _cfg(steps=1), device="cpu", preview=huge)


# --- the command line and bad input ----------------------------------------------------------

@pytest.fixture
def folders(tmp_path, synthetic_pair):
    img, truth = synthetic_pair
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    imsave(images / "one.png", img, check_contrast=False)
    imsave(images / "lonely.png", img, check_contrast=False)
    imsave(masks / "one_mask.png", truth, check_contrast=False)
    return images, masks


TINY_ARGS = ["--preset", "tiny", "--patch", "64", "--batch", "4", "--device", "cpu"]


def test_cli_finetunes_and_reports_unmatched_images(tmp_path, folders, capsys):
    images, masks = folders
    out = tmp_path / "m.pt"
    rc = main(["finetune", "--images", str(images), "--masks", str(masks), "--out", str(out), "--steps", "6",
               "--steps-per-epoch", "3", "--class-names", "background,nucleus", *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "lonely.png" in err and "no mask" in err
    assert "epoch   1" in err and "nucleus" in err and "Best Dice on held-out tiles of the training images" in err
    assert load_model(out, "cpu").classes == ["background", "nucleus"]


def _bad(tmp_path, capsys, *args):
    rc = main(["finetune", "--out", str(tmp_path / "x.pt"), "--steps", "1", *TINY_ARGS, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("genselfdiff: error: "), err
    return last


def test_cli_bad_masks_exit_2_naming_the_file(tmp_path, folders, capsys, synthetic_pair):
    images, masks = folders
    img, truth = synthetic_pair
    one = images / "one.png"
    imsave(masks / "one_mask.png", truth[:128], check_contrast=False)
    assert "one_mask.png" in _bad(tmp_path, capsys, "--images", str(one), "--masks", str(masks))
    imsave(masks / "one_mask.png", (truth * 3).astype(np.uint8), check_contrast=False)
    err = _bad(tmp_path, capsys, "--images", str(one), "--masks", str(masks), "--classes", "2")
    assert "one_mask.png" in err and "label 3" in err
    imsave(masks / "one_mask.png", np.zeros_like(truth), check_contrast=False)
    assert "one_mask.png" in _bad(tmp_path, capsys, "--images", str(one), "--masks", str(masks), "--sparse")
    assert "only background" in _bad(tmp_path, capsys, "--images", str(one), "--masks", str(masks))
    assert "No mask matches" in _bad(tmp_path, capsys, "--images", str(images / "lonely.png"), "--masks", str(masks))


def test_cli_bad_models_exit_2_naming_the_file(tmp_path, folders, capsys):
    images, masks = folders
    args = ["--images", str(images / "one.png"), "--masks", str(masks), "--device", "cpu", "--steps", "1"]
    # weights of another architecture under a tiny description
    torch.manual_seed(0)
    other = UNet(NetConfig.from_dict({**TINY.to_dict(), "width": 24}))
    save_checkpoint(tmp_path / "other.pt", {"kind": "pretrained", "net": TINY.to_dict(), "state_dict": other.state_dict()})
    rc = main(["finetune", "--out", str(tmp_path / "x.pt"), "--model", str(tmp_path / "other.pt"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and "other.pt" in err and "architecture" in err
    # a segmentation model with other classes
    save_checkpoint(tmp_path / "seg3.pt", {"kind": "segmentation", "net": {**TINY.to_dict(), "out_channels": 3},
                                           "state_dict": _segmentation_state(3), "classes": ["bg", "a", "b"]})
    rc = main(["finetune", "--out", str(tmp_path / "x.pt"), "--model", str(tmp_path / "seg3.pt"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and "seg3.pt" in err and "3 classes" in err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    rc = main(["finetune", "--out", str(tmp_path / "x.pt"), "--model", str(tmp_path / "junk.pt"), *args])
    assert rc == 2 and "junk.pt" in capsys.readouterr().err


def _segmentation_state(k):
    from genselfdiff.nn.unet import to_segmentation

    return to_segmentation(UNet(TINY), k).state_dict()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch evil-was-here",))


def test_loading_a_model_never_runs_code_from_it(tmp_path, folders, capsys, monkeypatch):
    images, masks = folders
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "genselfdiff", "kind": "pretrained", "payload": _Evil()}, tmp_path / "evil.pt")
    rc = main(["finetune", "--images", str(images / "one.png"), "--masks", str(masks), "--out", str(tmp_path / "x.pt"),
               "--model", str(tmp_path / "evil.pt"), "--device", "cpu", "--steps", "1"])
    assert rc == 2 and "evil.pt" in capsys.readouterr().err
    assert not (tmp_path / "evil-was-here").exists()
    with pytest.raises(UserError):
        load_model(tmp_path / "evil.pt", "cpu")
    assert not (tmp_path / "evil-was-here").exists()


def test_cli_geojson_annotations(tmp_path, folders, capsys):
    images, _ = folders
    ann = tmp_path / "ann"
    ann.mkdir()

    def box(y0, x0, y1, x1, cls):
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": cls, "color": [255, 0, 0]}}}

    feats = [box(0, 0, 40, 256, "Background"), box(100, 100, 140, 160, "Tumor"), box(200, 0, 230, 100, "Background")]
    (ann / "one.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    out = tmp_path / "g.pt"
    rc = main(["finetune", "--images", str(images / "one.png"), "--annotations", str(ann), "--sparse",
               "--out", str(out), "--steps", "2", "--steps-per-epoch", "1", *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "held-out strokes loss" in err and "Dice" not in err.replace("Strokes give no honest Dice", "")
    model = load_model(out, "cpu")
    assert model.classes == ["Background", "Tumor"] and model.colors[1] == [255, 0, 0]
    assert model.meta["data"]["annotated_pixels"] == [40 * 256 + 30 * 100, 40 * 60]


def test_napari_style_inputs_pyramids_and_counts(synthetic_pair):
    from genselfdiff.app.synthetic import downsample2

    img, truth = synthetic_pair
    half = truth[::2, ::2]
    item = open_labelled([img, downsample2(img)], [truth, half], Resolution(level=1))
    assert item.shape == (128, 128) and item.level == 1 and item.downsample == 2
    full = open_labelled([img, downsample2(img)], truth, Resolution(level=1))  # a mask of level 0 follows the image
    np.testing.assert_array_equal(full.labels.read(0, 0, 128, 128), truth[1::2, 1::2])
    with pytest.raises(UserError, match="128x128"):
        open_labelled([img, downsample2(img)], truth[:200], Resolution(level=1))
    with pytest.raises(UserError, match="2 images but 1"):
        finetune([img, img], [truth], "unused.pt", _cfg(), device="cpu")


def test_strokes_survive_the_reduction_to_a_coarser_training_level():
    from genselfdiff.io.labels import shrink_strokes

    lab = np.zeros((8, 8), np.uint8)
    lab[1, :] = 2  # a 1-px stroke on an odd row: nearest neighbour would drop it
    lab[6, 2] = 1
    lab[4:6, 4:6] = 3
    lab[4, 4] = 2  # a block of three 3s and one 2 takes 3
    out = shrink_strokes(lab, (4, 4))
    assert out[0].tolist() == [2, 2, 2, 2]
    assert out[3, 1] == 1 and out[2, 2] == 3
    assert (out[1] == 0).all() and out.sum() == 2 * 4 + 1 + 3


def test_auto_preset_follows_the_base_model_else_the_device(tmp_path, synthetic_pair, monkeypatch):
    from genselfdiff.nn import config

    img, truth = synthetic_pair
    monkeypatch.setattr(config, "CPU_AUTO_PRESET", "paper")  # so that the base model's "tiny" must win
    _pretrained(tmp_path / "pre.pt")
    auto = FinetuneConfig.from_preset("auto", steps=0, batch=4, seed=0)
    result = finetune([img], [truth], tmp_path / "a.pt", auto, pretrained=tmp_path / "pre.pt", device="cpu")
    saved = torch.load(result.path, weights_only=True)["config"]
    assert saved["preset"] == "tiny" and saved["patch"] == get_preset("tiny").patch
    monkeypatch.setattr(config, "CPU_AUTO_PRESET", "tiny")
    result = finetune([img], [truth], tmp_path / "b.pt", auto, device="cpu")
    saved = torch.load(result.path, weights_only=True)
    assert saved["config"]["preset"] == "tiny" and saved["net"]["width"] == TINY.width


def test_early_stopping_waits_for_min_steps(tmp_path, synthetic_pair):
    """Patience ends a run only once min_steps have passed; a learning rate of 0 never improves."""
    img, truth = synthetic_pair
    frozen = dict(steps=None, epochs=40, steps_per_epoch=2, lr=0.0, patience=1)
    early = finetune([img], [truth], tmp_path / "a.pt", _cfg(**frozen, min_steps=0), device="cpu")
    assert early.early_stopped and early.steps == 2  # one epoch without improvement on the start
    held = finetune([img], [truth], tmp_path / "b.pt", _cfg(**frozen, min_steps=10), device="cpu")
    assert held.early_stopped and held.steps == 10


def test_a_correction_round_keeps_the_previous_models_confident_answers(tmp_path, synthetic_pair, paint_strokes):
    from genselfdiff.train.finetune import SPARSE_ANCHOR

    img, truth = synthetic_pair
    strokes = paint_strokes(truth)
    names = ["background", "nucleus"]
    first = finetune([img], [strokes], tmp_path / "a.pt", _cfg(sparse=True, steps=4, class_names=names), device="cpu")
    assert torch.load(first.path, weights_only=True)["config"]["anchor"] == 0.0  # nothing to keep from scratch
    more = strokes.copy()
    more[150:153, 10:60] = 1
    second = finetune([img], [more], tmp_path / "b.pt", _cfg(sparse=True, steps=2, class_names=names),
                      pretrained=first.path, device="cpu")
    assert torch.load(second.path, weights_only=True)["config"]["anchor"] == SPARSE_ANCHOR
    with pytest.raises(UserError, match="a.pt segments background, nucleus but the annotations name background, gland"):
        finetune([img], [more], tmp_path / "c.pt", _cfg(sparse=True, steps=2, class_names=["background", "gland"]),
                 pretrained=first.path, device="cpu")
    assert not (tmp_path / "c.pt").exists()


def test_the_default_budget_lasts_at_least_min_steps_and_strokes_a_fixed_number_of_steps():
    from genselfdiff.train.finetune import DEFAULT_EPOCHS, SPARSE_CONTINUE_STEPS, SPARSE_STEPS, _budget

    cfg = FinetuneConfig(min_steps=2500)
    assert _budget(cfg, 23).epoch_steps == 109 * 23  # 50 epochs of 23 steps would be 1150
    assert _budget(cfg, 250).epochs == DEFAULT_EPOCHS  # many tiles: the epochs are longer anyway
    assert _budget(FinetuneConfig(steps=100, min_steps=2500), 23).steps == 100  # a given budget is kept
    strokes = _budget(FinetuneConfig(sparse=True, min_steps=2500), 23)
    assert (strokes.steps, strokes.epochs) == (SPARSE_STEPS, None)  # longer scored no higher on strokes
    correction = _budget(FinetuneConfig(sparse=True), 23, continuing=True)
    assert correction.steps == SPARSE_CONTINUE_STEPS < SPARSE_STEPS  # a correction round is shorter
    assert _budget(FinetuneConfig(sparse=True, minutes=3.0), 23).minutes == 3.0
