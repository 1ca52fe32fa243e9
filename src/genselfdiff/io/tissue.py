"""A cheap tissue detector, so patches and tiles skip empty glass.

H&E tissue is coloured (eosin pink, haematoxylin purple) while glass is bright and grey.
The mask is computed on a low pyramid level (a few megapixels at most) and looked up
at full resolution by scaling coordinates.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .slides import Slide

# A pixel is tissue when it is both somewhat saturated and not near-white.
MIN_SATURATION = 0.07
MAX_BRIGHTNESS = 235


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of tissue for a uint8 RGB image, smoothed to drop dust and fill holes."""
    rgb = np.asarray(rgb)
    hi = rgb.max(axis=2).astype(np.float32)
    lo = rgb.min(axis=2).astype(np.float32)
    saturation = (hi - lo) / np.maximum(hi, 1)
    mask = (saturation > MIN_SATURATION) & (rgb.mean(axis=2) < MAX_BRIGHTNESS)
    mask = ndi.binary_closing(mask, iterations=2)
    mask = ndi.binary_opening(mask, iterations=1)
    return ndi.binary_fill_holes(mask)


class TissueMap:
    """Tissue mask of a slide at a coarse level, queried in any level's pixel coordinates."""

    def __init__(self, slide: Slide, max_side: int = 2048):
        self.slide = slide
        self.level = slide.thumbnail_level(max_side)
        thumb = slide.levels[self.level]
        if max(thumb.shape[:2]) > max_side:  # no small level: subsample (lazy, strided) before reading
            step = int(np.ceil(max(thumb.shape[:2]) / max_side))
            thumb = thumb[::step, ::step]
        self.mask = tissue_mask(np.asarray(thumb))
        self.scale = slide.levels[0].shape[0] / self.mask.shape[0]  # level-0 pixels per mask pixel

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    def coverage(self, level: int, y: int, x: int, h: int, w: int) -> float:
        """Fraction of tissue inside a window given in ``level`` pixel coordinates."""
        f = self.slide.downsample(level) / self.scale
        y0, x0 = int(max(y, 0) * f), int(max(x, 0) * f)
        y1, x1 = int(np.ceil((y + h) * f)), int(np.ceil((x + w) * f))
        window = self.mask[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
        return float(window.mean()) if window.size else 0.0
