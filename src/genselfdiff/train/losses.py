"""Segmentation losses: the paper's structural-similarity + focal loss, cross-entropy and Dice.

Every loss takes raw ``logits`` (N, C, H, W) and integer class ``target`` (N, H, W), where
``IGNORE`` (-1) marks unannotated pixels (sparse scribbles, padding, validation tiles).
Ignored pixels contribute nothing, and receive exactly zero gradient: their prediction
enters no sum, mean or standard deviation. Probabilities come from ``softmax`` and
``log_softmax`` of the logits in float32, which is the official code's softmax output
and ``log p`` without its risk of ``log 0``.

Structural-similarity loss (Zhao et al. 2019, "Correlation maximized structural
similarity loss"), as in the GenSelfDiff-HIS code, per image n and channel c:

    e = |(y - mu_y + C) / (sigma_y + C) - (p - mu_p + C) / (sigma_p + C)|
    f = [e > beta * max e]            (the hardest structural errors)
    SS = sum(e * f * CE) / sum(f)

with unbiased standard deviations as ``torch.std``. The official code multiplies by one
scalar, the batch-mean cross-entropy; we use each pixel's own cross-entropy, as Zhao et
al. define it: then ``e * f`` really weights the pixels whose local structure is wrong,
instead of rescaling one global number (with a scalar CE the CE term's gradient is the
same for every pixel, whatever e says). :func:`ss_loss_official` is the official form,
for the official recipe (on random batches the two differ by a fifth or more). With an ignore mask the means and deviations
are taken over the annotated pixels of each image only, so scribbles are compared with
the prediction where they exist and nowhere else.

Focal loss as in the official ``FLoss``: ``-sum_c (1 - p_c)^gamma y_c log p_c``
averaged over (annotated) pixels; the sum over classes picks the true class's term.

For brush strokes, not in the paper: an affinity loss over *all* pixels, labelled or
not (the pairwise term of a dense CRF used as a loss, Tang et al. 2018 "On regularized
losses for weakly-supervised CNN segmentation"; Obukhov et al. 2019 "Gated CRF loss").
Strokes say what the cores of objects and the middle of the background are, not where
an object ends; this term asks neighbouring pixels of similar colour to get the same
class, so the boundary settles on the colour edge instead of anywhere between a
nucleus stroke and a background stroke.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -1
# Unlabelled pixels that carry a weak target (genselfdiff.train.priors): PRIOR - c for class c
# from the haematoxylin prior, ANCHOR - c from the previous model's confident prediction. Every
# loss but prior_loss and anchor_loss ignores them, as it ignores IGNORE.
PRIOR = -2
ANCHOR = -128  # below every PRIOR code (at most 126 classes)
LOSSES = ("paper", "official", "ce", "dice", "dice_ce")


def _prepare(logits: torch.Tensor, target: torch.Tensor):
    """float32 probabilities, log-probabilities, one-hot labels (0 where ignored) and the
    annotated-pixel mask (N, 1, H, W) as float."""
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    logits = logits.float()
    valid = target >= 0
    y = F.one_hot(target.clamp_min(0).long(), logits.shape[1]).permute(0, 3, 1, 2).float()
    m = valid[:, None].float()
    return logits.softmax(1), logits.log_softmax(1), y * m, m


def pixel_ce(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per pixel, (N, 1, H, W); zero where ``y`` is all zero (ignored)."""
    return -(y * logp).sum(1, keepdim=True)


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over annotated pixels."""
    _, logp, y, m = _prepare(logits, target)
    return pixel_ce(logp, y).sum() / m.sum().clamp_min(1.0)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """-mean over annotated pixels of sum_c (1 - p_c)^gamma y_c log p_c (official ``FLoss``)."""
    p, logp, y, m = _prepare(logits, target)
    return -((1 - p).pow(gamma) * y * logp).sum() / m.sum().clamp_min(1.0)


def _masked_stats(x: torch.Tensor, m: torch.Tensor):
    """Mean and unbiased std over the masked pixels of each image and channel (N, C, 1, 1)."""
    n = m.sum((2, 3), keepdim=True)
    mean = (x * m).sum((2, 3), keepdim=True) / n.clamp_min(1.0)
    var = ((x - mean) ** 2 * m).sum((2, 3), keepdim=True) / (n - 1).clamp_min(1.0)
    # sqrt has an infinite derivative at 0; a floor far below C keeps gradients finite.
    return mean, var.clamp_min(1e-12).sqrt()


def _structural_errors(p, y, m, beta: float, c: float):
    """``e`` and the mask ``f`` of its hardest values (see the module doc)."""
    mu_y, sd_y = _masked_stats(y, m)
    mu_p, sd_p = _masked_stats(p, m)
    e = ((y - mu_y + c) / (sd_y + c) - (p - mu_p + c) / (sd_p + c)).abs() * m
    e_max = e.flatten(2).amax(2)[..., None, None]
    return e, ((e > beta * e_max) & (m > 0)).float()


def ss_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 0.1, c: float = 0.01) -> torch.Tensor:
    """Structural-similarity loss (Zhao et al.), per-pixel cross-entropy; see the module doc."""
    p, logp, y, m = _prepare(logits, target)
    e, f = _structural_errors(p, y, m, beta, c)
    return (e * f * pixel_ce(logp, y)).sum() / f.sum().clamp_min(1.0)


def ss_loss_official(logits: torch.Tensor, target: torch.Tensor, beta: float = 0.1, c: float = 0.01) -> torch.Tensor:
    """The official ``SSLoss``: as :func:`ss_loss` but ``e * f`` multiplies one scalar, the
    batch-mean cross-entropy (over annotated pixels), instead of each pixel's own."""
    p, logp, y, m = _prepare(logits, target)
    e, f = _structural_errors(p, y, m, beta, c)
    batch_ce = pixel_ce(logp, y).sum() / m.sum().clamp_min(1.0)
    return (e * f * batch_ce).sum() / f.sum().clamp_min(1.0)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice averaged over classes, each class pooled over the batch's annotated pixels."""
    p, _, y, m = _prepare(logits, target)
    inter = (p * y).sum((0, 2, 3))
    total = (p * m).sum((0, 2, 3)) + y.sum((0, 2, 3))
    return 1 - ((2 * inter + smooth) / (total + smooth)).mean()


def affinity_loss(logits: torch.Tensor, image: torch.Tensor, radius: int = 3, sigma_color: float = 0.15,
                  sigma_space: float = 2.0) -> torch.Tensor:
    """Mean over pixel pairs within ``radius`` of ``w_ij (1 - p_i . p_j)``.

    ``w_ij = exp(-|x_i - x_j|^2 / 2 sigma_color^2 - d_ij^2 / 2 sigma_space^2)``, with
    ``image`` the network input (N, 3, H, W) in [-1, 1]; 0 when every pair agrees.
    """
    p = logits.float().softmax(1)
    x = image.float()
    total = p.new_zeros(())
    weights = 0.0
    for dy in range(0, radius + 1):  # half the window: each unordered pair once
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx <= 0:
                continue
            h, w = x.shape[2] - dy, x.shape[3] - abs(dx)
            if h <= 0 or w <= 0:
                continue
            a, b = slice(0, w) if dx >= 0 else slice(-dx, None), slice(dx, dx + w) if dx >= 0 else slice(0, w)
            xi, xj = x[:, :, :h, a], x[:, :, dy:, b]
            wij = torch.exp(-((xi - xj) ** 2).sum(1) / (2 * sigma_color**2))
            agree = (p[:, :, :h, a] * p[:, :, dy:, b]).sum(1)
            space = float(torch.exp(torch.tensor(-(dy * dy + dx * dx) / (2 * sigma_space**2))))
            total = total + space * (wij * (1 - agree)).mean()
            weights += space
    return total / weights


def _weak_loss(logits: torch.Tensor, target: torch.Tensor, code: int) -> torch.Tensor:
    """Mean cross-entropy over the pixels coded ``code - c`` (c a class) toward c; 0 without any."""
    weak = (target <= code) & (target > code - logits.shape[1])
    if not bool(weak.any()):
        return logits.sum() * 0.0
    logp = logits.float().log_softmax(1)
    cls = (code - target).clamp(0, logits.shape[1] - 1)
    return -logp.gather(1, cls[:, None].long())[:, 0][weak].mean()


def prior_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pixels coded ``PRIOR - c`` toward their class c; 0 without any."""
    return _weak_loss(logits, target, PRIOR)


def anchor_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pixels coded ``ANCHOR - c`` toward their class c; 0 without any."""
    return _weak_loss(logits, target, ANCHOR)


def make_loss(name: str = "paper", *, ss_weight: float = 1.0, focal_weight: float = 1.0,
              beta: float = 0.1, c: float = 0.01, gamma: float = 2.0, affinity: float = 0.0,
              prior: float = 0.0, anchor: float = 0.0) -> Callable:
    """``loss(logits, target, image) -> scalar``: "paper" (SS + focal, 1:1 by default), "official"
    (the same with the official code's batch-mean cross-entropy in SS), "ce", "dice" or
    "dice_ce" (their sum), plus
    ``affinity`` times :func:`affinity_loss` on the input ``image`` when > 0 and ``prior``
    times :func:`prior_loss` when > 0, ``anchor`` times :func:`anchor_loss` when > 0."""
    if name == "paper":
        base = lambda lo, t: ss_weight * ss_loss(lo, t, beta, c) + focal_weight * focal_loss(lo, t, gamma)  # noqa: E731
    elif name == "official":
        base = lambda lo, t: ss_weight * ss_loss_official(lo, t, beta, c) + focal_weight * focal_loss(lo, t, gamma)  # noqa: E731
    elif name == "ce":
        base = ce_loss
    elif name == "dice":
        base = dice_loss
    elif name == "dice_ce":  # nnU-Net's default: Dice for overlap, cross-entropy for calibration
        base = lambda lo, t: dice_loss(lo, t) + ce_loss(lo, t)  # noqa: E731
    else:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")

    def loss(lo, t, image=None):
        total = base(lo, t)
        if affinity:
            total = total + affinity * affinity_loss(lo, image)
        if prior:
            total = total + prior * prior_loss(lo, t)
        if anchor:
            total = total + anchor * anchor_loss(lo, t)
        return total

    return loss
