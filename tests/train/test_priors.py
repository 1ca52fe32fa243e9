"""The haematoxylin prior for strokes: its threshold, when it applies, and the targets it codes."""

import numpy as np

from genselfdiff.io.pixelsize import Resolution
from genselfdiff.objects.measure import haematoxylin_od
from genselfdiff.train import priors
from genselfdiff.train.annotations import PatchSampler, open_labelled, scan, to_targets
from genselfdiff.train.losses import ANCHOR, IGNORE, PRIOR


def _item(img, sparse):
    item = open_labelled(img, sparse, Resolution())
    scan(item, sparse=True, tile=64)
    return item


def test_the_threshold_separates_nuclei_from_stroma(synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    (t,) = priors.fit([_item(img, paint_strokes(truth))], 64)
    dark = haematoxylin_od(img) > t
    nuclei = truth == 1
    assert dark[nuclei].mean() > 0.8 and (~dark[~nuclei]).mean() > 0.8


def test_strokes_that_disagree_with_the_stain_switch_it_off(synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    nuclei = paint_strokes(truth)
    swapped = np.where(nuclei > 0, 3 - nuclei, 0).astype(np.uint8)  # "background" painted on the nuclei
    assert priors.fit([_item(img, swapped)], 64) is None


def test_only_unlabelled_pixels_get_prior_codes(synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    sparse = paint_strokes(truth)
    target = to_targets(sparse, sparse=True)
    coded = priors.apply(img, target, 0.3)
    painted = sparse > 0
    assert np.array_equal(coded[painted], target[painted])  # strokes win
    assert set(np.unique(coded[~painted])) <= {PRIOR, PRIOR - 1} and IGNORE not in coded
    dark = haematoxylin_od(img) > 0.3
    assert np.array_equal(coded[~painted] == PRIOR - 1, dark[~painted])


def test_the_sampler_codes_the_prior_but_never_in_held_out_tiles(synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    item = _item(img, paint_strokes(truth))
    item.val_tiles[0, 0] = True
    sampler = PatchSampler([item], 256, 64, sparse=True, balance=1.0, prior=[0.3])
    _, target = sampler.sample(np.random.default_rng(0))  # the patch is the whole image
    assert (target <= PRIOR).any()
    assert (target[:64, :64] == IGNORE).all()


# --- the anchor: a correction round keeps the previous model's confident answers -------------

def test_the_anchor_codes_only_unpainted_pixels_where_the_previous_model_was_sure():
    target = np.array([[IGNORE, IGNORE, 0], [1, IGNORE, IGNORE]], np.int64)
    classes = np.array([[1, priors.UNSURE, 1], [0, 0, 1]], np.uint8)
    coded = priors.apply_anchor(target, classes)
    assert coded.tolist() == [[ANCHOR - 1, IGNORE, 0], [1, ANCHOR, ANCHOR - 1]]  # strokes win


def test_an_anchor_map_reads_windows_across_tiles_and_outside_them():
    tiles = {(0, 0): np.full((4, 4), 1, np.uint8), (1, 1): np.full((4, 4), 0, np.uint8)}
    m = priors.AnchorMap(tiles, 4)
    win = m.read(-2, 2, 8, 4)  # rows -2..5, columns 2..5
    assert (win[:2] == priors.UNSURE).all()  # above the image
    assert (win[2:6, :2] == 1).all() and (win[2:6, 2:] == priors.UNSURE).all()  # tile (0, 1) not predicted
    assert (win[6:, 2:] == 0).all() and (win[6:, :2] == priors.UNSURE).all()


def test_anchor_and_prior_losses_read_their_own_codes():
    import torch

    from genselfdiff.train.losses import anchor_loss, prior_loss

    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1] = 5.0  # sure of class 1 everywhere
    prior_says_0 = torch.tensor([[[PRIOR, IGNORE, IGNORE]]])
    anchor_says_1 = torch.tensor([[[ANCHOR - 1, IGNORE, IGNORE]]])
    assert float(prior_loss(logits, prior_says_0)) > 4 and float(anchor_loss(logits, prior_says_0)) == 0
    assert float(anchor_loss(logits, anchor_says_1)) < 0.01 and float(prior_loss(logits, anchor_says_1)) == 0


def test_anchor_maps_cover_the_annotated_tiles_and_their_neighbours(synthetic_pair, trained_unet):
    import torch

    from genselfdiff.nn.model import Model

    img, truth = synthetic_pair
    strokes = np.zeros_like(truth, dtype=np.uint8)
    strokes[70:73, 70:120] = 2  # the anchor map does not look at what was painted, only where
    strokes[5:8, 5:30] = 1
    item = _item(img, strokes)
    model = Model(net=trained_unet, kind="segmentation", net_config=trained_unet.unet.cfg, device=torch.device("cpu"),
                  classes=["background", "nucleus"], patch=64, amp=False)
    (m,) = priors.anchor_maps([item], model, 64, 16)
    annotated = set(map(tuple, np.argwhere(item.tile_counts > 0)))
    assert annotated and annotated <= set(m.tiles)
    assert (3, 3) not in m.tiles  # far from every stroke: never predicted
    sure = m.read(0, 0, 128, 128)
    probs = model.predict(img[None, :128, :128])[0]  # the same network on a larger window: same confident answers
    agree = (sure != priors.UNSURE) & (probs.max(0) >= 0.95)
    assert agree.sum() > 1000 and (sure[agree] == probs.argmax(0)[agree]).mean() > 0.99


def test_the_training_step_weighs_the_anchor_by_the_config(trained_unet):
    import torch

    from genselfdiff.train.config import FinetuneConfig
    from genselfdiff.train.finetune_run import SegmentationStep

    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1] = 3.0  # sure of nucleus
    target = torch.full((1, 4, 4), IGNORE)
    target[0, 0, 0] = 0  # one painted background pixel
    target[0, 1:] = ANCHOR  # the previous model said background here
    losses = []
    for weight in (0.0, 1.0):
        cfg = FinetuneConfig(lr=1e-3, loss="ce", affinity=0.0, prior=0.0, anchor=weight)
        step = SegmentationStep.from_config(cfg, trained_unet, "cpu")
        losses.append(float(step.loss_fn(logits, target)))
    assert losses[1] > losses[0] + 2  # the anchored pixels disagree with the logits, and count
