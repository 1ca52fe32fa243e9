"""The geometry map of touching nuclei: HoVer-Net's horizontal and vertical distance maps.

Graham et al. 2019 (HoVer-Net) teach a network, beside "is this a nucleus", where in its
nucleus each pixel lies: channel 0 holds the pixel's horizontal offset from its nucleus's
centre of mass, channel 1 the vertical one, each side of the centre normalised on its own
to [-1, 0] and [0, 1] (so every nucleus spans -1 to 1 whatever its size); background is 0.
Between two touching nuclei the horizontal map jumps from +1 to -1 (or the vertical one
does), which is where the objects pass (:mod:`genselfdiff.objects.hv_split`) cuts them.

Here the map is a small head on the segmentation network's last decoder features, beside
the class head (:class:`genselfdiff.nn.unet.GeometryHead`, with the network's other layers);
it learns from instance ids (:func:`hv_targets`,
computed per training patch after augmentation, so flips, rotations and elastic warps move
the maps exactly) with HoVer-Net's loss (:func:`hv_loss`): the mean squared error of the maps
plus the mean squared error of their Sobel gradients on nucleus pixels.

:func:`fit_instances` mends the rim where ids and their class mask were rasterised apart, and
says in one sentence naming the file when they contradict each other.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..errors import UserError

CHANNELS = 2  # horizontal, vertical
# Codes of the third target channel: which pixels the loss sees, and which carry a nucleus.
IGNORED, BACKGROUND, NUCLEUS = 0, 1, 2
SOBEL_SIZE = 5  # HoVer-Net's kernel of the gradient loss
GEOMETRY_WEIGHT = 1.0  # the maps' loss beside the class loss (HoVer-Net weighs its terms 1 : 1)


# --- targets -----------------------------------------------------------------------------------

def hv_maps(ids: np.ndarray) -> np.ndarray:
    """float32 (2, H, W): each id's pixels get their normalised (x, y) offset to its centre of mass.

    The centre is rounded to a pixel, as HoVer-Net does; negative and positive offsets are
    scaled by the id's own extreme on that side, so each nucleus spans [-1, 1]. 0 = no nucleus.
    """
    ids = np.asarray(ids)
    out = np.zeros((CHANNELS,) + ids.shape, np.float32)
    fg = ids > 0
    if not fg.any():
        return out
    _, inverse = np.unique(ids[fg], return_inverse=True)
    n = int(inverse.max()) + 1
    count = np.bincount(inverse, minlength=n).astype(np.float64)
    coords = np.nonzero(fg)  # (ys, xs)
    for channel, axis in ((0, 1), (1, 0)):  # horizontal: columns; vertical: rows
        pos = coords[axis].astype(np.float64)
        centre = np.floor(np.bincount(inverse, pos, minlength=n) / count + 0.5)
        d = pos - centre[inverse]
        low, high = np.zeros(n), np.zeros(n)
        np.minimum.at(low, inverse, d)
        np.maximum.at(high, inverse, d)
        with np.errstate(invalid="ignore", divide="ignore"):
            scaled = np.where(d < 0, d / -low[inverse], np.where(d > 0, d / high[inverse], 0.0))
        out[channel][fg] = scaled
    return out


def hv_targets(ids: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 (3, H, W) training target of one patch: the two maps of ``ids`` and a code per
    pixel (``NUCLEUS``, ``BACKGROUND``, or ``IGNORED`` where ``valid`` is False)."""
    ids = np.asarray(ids)
    code = np.where(ids > 0, NUCLEUS, BACKGROUND).astype(np.float32)
    if valid is not None:
        code[~np.asarray(valid, bool)] = IGNORED
    return np.concatenate([hv_maps(ids), code[None]])


# --- loss ---------------------------------------------------------------------------------------

def _sobel_kernels(size: int = SOBEL_SIZE, device=None) -> torch.Tensor:
    """(2, 1, size, size): d/dx and d/dy kernels, HoVer-Net's x / (x^2 + y^2)."""
    r = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    norm = x * x + y * y + 1e-15
    return torch.stack([x / norm, y / norm])[:, None]


def hv_gradients(maps: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W): d(horizontal)/dx and d(vertical)/dy, edges replicated."""
    k = _sobel_kernels(device=maps.device)
    pad = SOBEL_SIZE // 2
    padded = F.pad(maps.float(), (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, k, groups=CHANNELS)


def hv_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """HoVer-Net's HV loss: MSE over the pixels the loss sees + MSE of the Sobel gradients on nucleus
    pixels (those whose Sobel neighbourhood holds no ignored pixel).

    ``pred`` (N, 2, H, W) from the head; ``target`` (N, 3, H, W) from :func:`hv_targets`.
    """
    pred, maps, code = pred.float(), target[:, :CHANNELS].float(), target[:, CHANNELS]
    seen = (code != IGNORED).float()[:, None]
    # The gradient at a pixel reads its Sobel neighbourhood: leave out nucleus pixels that see an
    # ignored one, so that ignored pixels get no loss and no gradient at all.
    near_ignored = F.max_pool2d(1.0 - seen, SOBEL_SIZE, stride=1, padding=SOBEL_SIZE // 2)
    nucleus = (code == NUCLEUS).float()[:, None] * (1.0 - near_ignored)
    mse = ((pred - maps) ** 2 * seen).sum() / (CHANNELS * seen.sum()).clamp_min(1.0)
    msge = ((hv_gradients(pred) - hv_gradients(maps)) ** 2 * nucleus).sum() / (CHANNELS * nucleus.sum()).clamp_min(1.0)
    return mse + msge


# --- fitting the ids to the classes -------------------------------------------------------------

RIM_UM = 2.0  # a class pixel this close to an id of its class takes that id (outlines rasterised twice)
LOST_UM2 = 6.0  # a class region without id at least this large is a forgotten object, not a rim


def fit_instances(ids: np.ndarray, classes: np.ndarray, source: str, *, mpp: Optional[float] = None,
                  background: int = 0) -> np.ndarray:
    """Instance ``ids`` (H, W) made to fit the class image they come with, or a one-sentence
    :class:`UserError` naming ``source`` and the first offending id or pixel.

    Masks and ids drawn from the same outlines by two programs differ along the outlines (on
    MoNuSeg by about one pixel, 5-10 % of the nucleus pixels), so a rim is mended: id pixels on
    the background are dropped and a class pixel within ``RIM_UM`` of an id of its own class takes
    the nearest one; smaller leftovers keep no id (the maps' loss ignores them). Refused: an id over
    two classes, an id with no class pixel at all, and a class region of at least ``LOST_UM2`` with
    no id (an object the ids forgot). ``mpp``: µm per pixel (None: 0.5).
    """
    ids, classes = np.asarray(ids).astype(np.int64), np.asarray(classes)
    if ids.shape != classes.shape:
        raise UserError(f"{source} is {ids.shape[1]}x{ids.shape[0]} pixels but its class mask is "
                        f"{classes.shape[1]}x{classes.shape[0]}; give ids on the mask's grid.")
    px = float(mpp) if mpp else 0.5
    inside = ids > 0
    on_class = inside & (classes != background)
    pairs = np.unique(np.stack([ids[on_class], classes[on_class].astype(np.int64)], 1), axis=0)
    repeated = pairs[1:, 0][pairs[1:, 0] == pairs[:-1, 0]]
    if repeated.size:
        first = int(repeated.min())
        found = " and ".join(str(int(c)) for c in pairs[pairs[:, 0] == first, 1])
        raise UserError(f"{source}: id {first} covers pixels of class {found}; an id must lie inside one class "
                        "of the mask.")
    lost = np.setdiff1d(np.unique(ids[inside]), pairs[:, 0])
    if lost.size:
        raise UserError(f"{source}: id {int(lost.min())} lies wholly on the mask's background; every id must "
                        "mark an object of a class.")
    ids = np.where(on_class, ids, 0)
    orphan = (classes != background) & (ids == 0)
    if orphan.any() and on_class.any():
        dist, (ny, nx) = ndi.distance_transform_edt(ids == 0, return_indices=True)
        near = ids[ny, nx]
        mend = orphan & (dist <= RIM_UM / px) & (classes[ny, nx] == classes)
        ids = np.where(mend, near, ids)
        orphan &= ~mend
    if orphan.any():
        regions, n = ndi.label(orphan)
        area = np.bincount(regions.ravel())
        big = np.flatnonzero(area[1:] >= LOST_UM2 / (px * px)) + 1
        if big.size:
            y, x = np.argwhere(np.isin(regions, big))[0]
            raise UserError(f"{source} gives no id to pixel ({y}, {x}) of class {int(classes[y, x])}, in a region "
                            f"of {int(area[regions[y, x]])} pixels without any; every object of a class needs an id.")
    return ids
