"""Cheap, consistent augmentation of one (image, labels) patch for fine-tuning.

Geometric changes (flips, rotations by 90 degrees, elastic deformation) move image and
labels together; photometric ones (Gaussian blur, colour jitter, stain) touch the image
only. The official code at HEAD has flips, a 3x3 Gaussian blur (sigma x 1, y 2, p = 0.3)
and colour jitter (brightness 0.5, contrast 0.4, p = 0.3) (:func:`genselfdiff.train.recipe.
official_augment`); an earlier version also had an elastic transform. Ours adds rotations
by 90 degrees and a small saturation jitter, free for histology, which has no up or down,
and an elastic deformation given in pixels (smoothness ``elastic_sigma``, displacement
``elastic_px``) so it means the same at every patch size, drawn anew for each patch.
Labels are resampled by nearest neighbour so class indices, including the ignore value
-1, stay exact; labels may carry a channel axis (H, W, C), e.g. class targets and instance ids,
which then move together.

Not in the paper: HED stain augmentation (Tellez et al. 2018, 2019), which scales and
shifts the haematoxylin, eosin and DAB concentrations of colour deconvolution
(``skimage.color.rgb2hed``) by a random factor in [1 - s, 1 + s] and offset in [-s, s]
times the channel's spread. Staining differs between labs far more than brightness
does; a model trained on three images has seen three stainings, and this shows it many.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass
class Augment:
    flips: bool = True
    rotate90: bool = True
    blur: float = 0.3  # probability
    blur_sigma: tuple = (1.0, 2.0)
    color: float = 0.3  # probability of a colour jitter
    brightness: float = 0.5
    contrast: float = 0.4
    saturation: float = 0.2
    elastic: float = 0.5  # probability
    elastic_sigma: float = 8.0  # smoothness of the displacement field, px
    elastic_px: float = 3.0  # standard deviation of the displacement, px
    hed: float = 0.5  # probability of a HED stain perturbation (not in the paper)
    hed_sigma: float = 0.2  # Tellez et al.'s "HED-light" is 0.05, "HED-strong" 0.2
    # True: blur_sigma is one fixed (x, y) pair, as torchvision's gaussian_blur reads the
    # official [1.0, 2.0]; False: a range each blur draws one isotropic sigma from.
    blur_fixed: bool = False

    @classmethod
    def off(cls) -> "Augment":
        return cls(flips=False, rotate90=False, blur=0.0, color=0.0, elastic=0.0, hed=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blur_sigma"] = list(self.blur_sigma)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Augment":
        d = dict(d)
        if "blur_sigma" in d:
            d["blur_sigma"] = tuple(d["blur_sigma"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: Augment = Augment()):
    """Return an augmented copy of uint8 (H, W, 3) ``image`` and integer (H, W) or (H, W, C) ``labels``."""
    if cfg.flips:
        if rng.random() < 0.5:
            image, labels = image[::-1], labels[::-1]
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
    if cfg.rotate90 and image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    if cfg.elastic and rng.random() < cfg.elastic:
        image, labels = elastic(image, labels, rng, cfg.elastic_sigma, cfg.elastic_px)
    image = np.ascontiguousarray(image)
    labels = np.ascontiguousarray(labels)
    if cfg.blur and rng.random() < cfg.blur:
        if cfg.blur_fixed:  # rows blur with sigma y; torchvision pads by reflection (scipy's "mirror")
            sx, sy = cfg.blur_sigma
            image = ndi.gaussian_filter(image, (sy, sx, 0), radius=(1, 1, 0), mode="mirror")
        else:
            s = rng.uniform(*cfg.blur_sigma)
            image = ndi.gaussian_filter(image, (s, s, 0), radius=(1, 1, 0))  # 3x3, as the official blur
    if cfg.hed and rng.random() < cfg.hed:
        image = hed_jitter(image, rng, cfg.hed_sigma)
    if cfg.color and rng.random() < cfg.color:
        image = color_jitter(image, rng, cfg.brightness, cfg.contrast, cfg.saturation)
    return image, labels


def hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Random scale and shift of each stain's concentration (Tellez et al.), back to RGB.

    Optical density is deconvolved with scikit-image's H&E-DAB matrices but without its
    clipping of negative concentrations, so sigma = 0 gives the image back exactly.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    od = -np.log((image.astype(np.float32) + 1) / 256)
    conc = od @ hed_from_rgb.astype(np.float32)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3).astype(np.float32)
    beta = (rng.uniform(-sigma, sigma, 3) * conc.reshape(-1, 3).std(0)).astype(np.float32)
    rgb = np.exp(-((conc * alpha + beta) @ rgb_from_hed.astype(np.float32))) * 256 - 1
    return np.round(np.clip(rgb, 0, 255)).astype(np.uint8)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float) -> np.ndarray:
    """torchvision-style factors drawn from [1 - a, 1 + a], applied in random order."""
    x = image.astype(np.float32)
    ops = []
    if brightness:
        ops.append(lambda v, f=rng.uniform(1 - brightness, 1 + brightness): v * f)
    if contrast:
        ops.append(lambda v, f=rng.uniform(1 - contrast, 1 + contrast): (v - _grey(v).mean()) * f + _grey(v).mean())
    if saturation:
        ops.append(lambda v, f=rng.uniform(1 - saturation, 1 + saturation): (v - _grey(v)[..., None]) * f + _grey(v)[..., None])
    for i in rng.permutation(len(ops)):
        x = np.clip(ops[i](x), 0, 255)
    return np.round(x).astype(np.uint8)


def _grey(v: np.ndarray) -> np.ndarray:
    return v @ np.array([0.299, 0.587, 0.114], np.float32)


def elastic(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, sigma: float, px: float):
    """Smooth random displacement: linear interpolation for the image, nearest for labels."""
    h, w = labels.shape[:2]
    fields = []
    for _ in range(2):
        d = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma, mode="reflect")
        fields.append(d * (px / (d.std() + 1e-8)))
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    coords = np.stack([yy + fields[0], xx + fields[1]])
    out = np.empty(image.shape, np.uint8)
    for ch in range(image.shape[2]):
        out[..., ch] = np.clip(np.round(ndi.map_coordinates(image[..., ch].astype(np.float32), coords,
                                                            order=1, mode="reflect")), 0, 255)
    if labels.ndim == 3:
        lab = np.stack([ndi.map_coordinates(labels[..., c], coords, order=0, mode="reflect")
                        for c in range(labels.shape[2])], -1)
    else:
        lab = ndi.map_coordinates(labels, coords, order=0, mode="reflect")
    return out, lab.astype(labels.dtype)
