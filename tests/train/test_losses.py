"""The segmentation losses against hand-computed values, and the ignore mask."""

import math

import pytest
import torch

from genselfdiff.train.losses import (
    IGNORE,
    affinity_loss,
    ce_loss,
    dice_loss,
    focal_loss,
    make_loss,
    ss_loss,
    ss_loss_official,
)

# One image, two classes, 2 x 2 pixels. P1 is the probability of class 1 per pixel.
P1 = [[0.9, 0.2], [0.6, 0.5]]
TARGET = [[1, 0], [1, 0]]


def _logits(p1):
    p = torch.tensor(p1, dtype=torch.float64)
    return torch.stack([torch.log(1 - p), torch.log(p)])[None]  # softmax gives back (1 - p, p)


def _target(t):
    return torch.tensor(t)[None]


def _std(xs):
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def _hand_ss(p1, target, beta=0.1, c=0.01):
    """The official formula with per-pixel cross-entropy, in plain Python."""
    pix = [(i, j) for i in range(len(p1)) for j in range(len(p1[0]))]
    probs = {k: [1 - p1[i][j] if k == 0 else p1[i][j] for i, j in pix] for k in (0, 1)}
    ys = {k: [1.0 if target[i][j] == k else 0.0 for i, j in pix] for k in (0, 1)}
    ce = [-math.log(probs[target[i][j]][n]) for n, (i, j) in enumerate(pix)]
    num = den = 0.0
    for k in (0, 1):
        y, p = ys[k], probs[k]
        my, sy, mp, sp = sum(y) / len(y), _std(y), sum(p) / len(p), _std(p)
        e = [abs((a - my + c) / (sy + c) - (b - mp + c) / (sp + c)) for a, b in zip(y, p)]
        f = [1.0 if v > beta * max(e) else 0.0 for v in e]
        num += sum(v * g * h for v, g, h in zip(e, f, ce))
        den += sum(f)
    return num / den


def test_cross_entropy_and_focal_match_hand_values():
    q = [0.9, 0.8, 0.6, 0.5]  # probability of the true class at each pixel
    assert ce_loss(_logits(P1), _target(TARGET)).item() == pytest.approx(sum(-math.log(v) for v in q) / 4)
    focal = sum(-(1 - v) ** 2 * math.log(v) for v in q) / 4
    assert focal_loss(_logits(P1), _target(TARGET)).item() == pytest.approx(focal)
    assert focal == pytest.approx(0.06625, abs=1e-5)  # (0.01*0.1054 + 0.04*0.2231 + 0.16*0.5108 + 0.25*0.6931) / 4


def test_ss_loss_matches_the_official_formula_with_pixel_cross_entropy():
    got = ss_loss(_logits(P1), _target(TARGET)).item()
    assert got == pytest.approx(_hand_ss(P1, TARGET), rel=1e-5)
    assert got > 0


# A fixed batch of two images for the official form, whose cross-entropy is one batch mean.
P1_B = [[0.3, 0.7], [0.8, 0.1]]
TARGET_B = [[0, 1], [1, 1]]


def _hand_ss_official(images, beta=0.1, c=0.01):
    """The official ``SSLoss`` in plain Python: e * f times the batch-mean cross-entropy,
    summed over images, classes and pixels and divided by the number of flagged pixels."""
    ce_terms, terms = [], []
    for p1, target in images:
        pix = [(i, j) for i in range(len(p1)) for j in range(len(p1[0]))]
        probs = {k: [1 - p1[i][j] if k == 0 else p1[i][j] for i, j in pix] for k in (0, 1)}
        ce_terms += [-math.log(probs[target[i][j]][n]) for n, (i, j) in enumerate(pix)]
        for k in (0, 1):
            y = [1.0 if target[i][j] == k else 0.0 for i, j in pix]
            p = probs[k]
            my, sy, mp, sp = sum(y) / len(y), _std(y), sum(p) / len(p), _std(p)
            e = [abs((a - my + c) / (sy + c) - (b - mp + c) / (sp + c)) for a, b in zip(y, p)]
            terms += [(v, 1.0 if v > beta * max(e) else 0.0) for v in e]
    lce = sum(ce_terms) / len(ce_terms)
    return sum(v * g * lce for v, g in terms) / sum(g for _, g in terms)


def test_official_ss_loss_matches_hand_values_on_a_fixed_batch():
    logits = torch.cat([_logits(P1), _logits(P1_B)])
    target = torch.cat([_target(TARGET), _target(TARGET_B)])
    want = _hand_ss_official([(P1, TARGET), (P1_B, TARGET_B)])
    assert ss_loss_official(logits, target).item() == pytest.approx(want, rel=1e-5)
    # It is not the per-pixel form: one scalar cross-entropy instead of each pixel's own.
    assert abs(ss_loss(logits, target).item() - want) > 0.01 * want
    both = make_loss("official")(logits, target).item()
    assert both == pytest.approx(want + focal_loss(logits, target).item(), rel=1e-6)


def test_dice_loss_hand_value():
    p = torch.tensor(P1)
    # class 1: inter 0.9+0.6, sums 2.2 (p) + 2 (y); class 0: inter 0.8+0.5, sums 1.8 + 2
    want = 1 - ((2 * 1.5 + 1) / (4.2 + 1) + (2 * 1.3 + 1) / (3.8 + 1)) / 2
    assert dice_loss(_logits(p.tolist()), _target(TARGET)).item() == pytest.approx(want, rel=1e-6)


def test_paper_loss_is_ss_plus_focal():
    lo, t = _logits(P1), _target(TARGET)
    assert make_loss("paper")(lo, t).item() == pytest.approx(ss_loss(lo, t).item() + focal_loss(lo, t).item())
    with pytest.raises(ValueError):
        make_loss("nope")


@pytest.mark.parametrize("name", ["paper", "official", "ce", "dice", "dice_ce"])
def test_ignored_pixels_get_zero_gradient_and_do_not_change_the_loss(name):
    torch.manual_seed(0)
    loss = make_loss(name)
    logits = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 6))
    sparse = target.clone()
    sparse[:, :, 3:] = IGNORE  # only the left half is annotated
    value = loss(logits, sparse)
    value.backward()
    g = logits.grad
    assert torch.all(g[:, :, :, 3:] == 0)
    assert g[:, :, :, :3].abs().sum() > 0
    # Same value as the annotated part alone: statistics are taken over annotated pixels only.
    crop = loss(logits.detach()[:, :, :, :3], target[:, :, :3])
    # float32 sums: the official batch-mean cross-entropy adds up a different run of zeros
    assert value.item() == pytest.approx(crop.item(), rel=1e-6 if name == "official" else 1e-9)


@pytest.mark.parametrize("name", ["paper", "official", "ce", "dice", "dice_ce"])
def test_nothing_annotated_gives_finite_loss_and_gradient(name):
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    value = make_loss(name)(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.all(logits.grad == 0)


def test_losses_fall_as_the_prediction_improves():
    t = _target(TARGET)
    worse = _logits([[0.6, 0.4], [0.55, 0.45]])
    better = _logits([[0.95, 0.05], [0.9, 0.1]])
    for name in ("paper", "official", "ce", "dice", "dice_ce"):
        assert make_loss(name)(better, t) < make_loss(name)(worse, t)


def test_affinity_loss_by_hand_and_its_pull_towards_colour_edges():
    # Two pixels side by side: one pair at distance 1, radius 1 leaves only (0, 1).
    image = torch.tensor([[[[0.0, 0.1]], [[0.0, 0.1]], [[0.0, 0.1]]]])  # (1, 3, 1, 2)
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    p = logits.softmax(1)[0, :, 0]
    w = torch.exp(torch.tensor(-3 * 0.1**2 / (2 * 0.15**2)))
    expected = w * (1 - (p[:, 0] * p[:, 1]).sum())
    assert affinity_loss(logits, image, radius=1).item() == pytest.approx(expected.item(), rel=1e-6)
    # A uniform prediction costs nothing; splitting a uniform region costs more than
    # splitting along a colour edge.
    flat = torch.zeros(1, 3, 8, 8)
    edge = flat.clone()
    edge[..., 4:] = 1.0
    split = torch.zeros(1, 2, 8, 8)
    split[:, 0, :, :4], split[:, 1, :, 4:] = 10.0, 10.0
    assert affinity_loss(torch.zeros(1, 2, 8, 8), flat).item() == pytest.approx(0.5, abs=1e-6)  # p = 1/2 everywhere
    assert affinity_loss(split, edge).item() < 0.1 * affinity_loss(split, flat).item()


def test_make_loss_adds_the_affinity_term_only_when_asked():
    logits, target = torch.randn(1, 2, 8, 8), torch.randint(0, 2, (1, 8, 8))
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    plain = make_loss("ce")(logits, target, image)
    assert plain.item() == pytest.approx(make_loss("ce")(logits, target).item())
    both = make_loss("ce", affinity=2.0)(logits, target, image)
    assert both.item() == pytest.approx(plain.item() + 2 * affinity_loss(logits, image).item(), rel=1e-6)


def test_the_prior_term_pulls_only_prior_coded_pixels():
    from genselfdiff.train.losses import PRIOR, prior_loss

    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, IGNORE], [PRIOR, PRIOR - 1]]])
    loss = prior_loss(logits, target)
    assert loss.item() == pytest.approx(math.log(2))  # p = 1/2 for both prior pixels
    loss.backward()
    g = logits.grad[0]
    assert g[:, 0, 0].abs().sum() == 0 and g[:, 0, 1].abs().sum() == 0  # labelled and ignored: untouched
    assert g[0, 1, 0] < 0 < g[1, 1, 0] and g[1, 1, 1] < 0 < g[0, 1, 1]  # towards background, towards class 1
    assert prior_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long)).item() == 0
    # the other losses ignore prior-coded pixels as they ignore IGNORE
    assert make_loss("dice_ce")(logits, target).item() == pytest.approx(
        make_loss("dice_ce")(logits, torch.where(target < 0, IGNORE, target)).item())
    both = make_loss("dice_ce", prior=0.5)(logits, target)
    assert both.item() == pytest.approx(make_loss("dice_ce")(logits, target).item() + 0.5 * math.log(2))
