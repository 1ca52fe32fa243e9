"""The haematoxylin prior for strokes: its threshold, when it applies, and the targets it codes."""

import numpy as np

from genselfdiff.io.pixelsize import Resolution
from genselfdiff.objects.measure import haematoxylin_od
from genselfdiff.train import stain_prior
from genselfdiff.train.annotations import PatchSampler, open_labelled, scan, to_targets
from genselfdiff.train.losses import IGNORE, PRIOR


def _item(img, sparse):
    item = open_labelled(img, sparse, Resolution())
    scan(item, sparse=True, tile=64)
    return item


def test_the_threshold_separates_nuclei_from_stroma(synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    (t,) = stain_prior.fit([_item(img, paint_strokes(truth))], 64)
    dark = haematoxylin_od(img) > t
    nuclei = truth == 1
    assert dark[nuclei].mean() > 0.8 and (~dark[~nuclei]).mean() > 0.8


def test_strokes_that_disagree_with_the_stain_switch_it_off(synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    nuclei = paint_strokes(truth)
    swapped = np.where(nuclei > 0, 3 - nuclei, 0).astype(np.uint8)  # "background" painted on the nuclei
    assert stain_prior.fit([_item(img, swapped)], 64) is None


def test_only_unlabelled_pixels_get_prior_codes(synthetic_pair, paint_strokes):
    img, truth = synthetic_pair
    sparse = paint_strokes(truth)
    target = to_targets(sparse, sparse=True)
    coded = stain_prior.apply(img, target, 0.3)
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
