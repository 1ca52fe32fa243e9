"""Objects from a geometry map: touching nuclei cut where the network says their borders are.

A model fine-tuned with instance ids also predicts HoVer-Net's horizontal and vertical maps
(:mod:`genselfdiff.nn.geometry`): in each nucleus the horizontal map runs from -1 at its left
edge to +1 at its right edge, the vertical one from top to bottom. Where two nuclei touch, one
of the maps falls from +1 to -1 within a pixel or two, so a steep *fall* of the horizontal map
along x, or of the vertical map along y, is a border (Graham et al. 2019):

    energy = max(-d(horizontal)/dx, -d(vertical)/dy), after a Gaussian of ``smooth_um``, scaled
             so that a clean +1 -> -1 step seen through that Gaussian is 1

Two ways to cut with it (``markers``):

- ``"distance"`` (default): the distance split of :mod:`.split` on a surface that the borders cut
  into, distance x foreground probability x (1 - ``weight`` x energy), clipped at 0: a learnt
  border is a waist even where the outline has none, and the split's h-maxima, watershed and
  fragment merging stay as they are.
- ``"energy"``: HoVer-Net's own post-processing: markers are the mask where the energy (and
  1 - the foreground probability) is below ``border``, opened by a disk of ``marker_um``, of at
  least ``min_marker_um2``; a watershed of the energy from them inside the mask; pixels no marker
  reaches are objects of their own; fragments below ``min_area_um2`` join a neighbour.

On MoNuSeg (3 labelled images, fold 0 of ``benchmarks.instances``) the energy markers scored AJI
0.43 at HoVer-Net's threshold 0.4 and 0.54 at 0.1, no better than the distance split alone (0.54);
the distance markers with learnt valleys 0.56 (docs/research/2026-12-08-instance-geometry.md).

HoVer-Net min-max normalises the maps and their gradients over the whole image; that would tie
every tile to the whole slide, so the scale here is fixed instead. The result for a clump
depends only on the clump and the maps within :meth:`HVParameters.reach_px` of it, so the
seamless tiling of :mod:`.split` holds unchanged (ids from the first pixel, cut clumps counted).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from .split import _CROSS, DEFAULT_MPP, SplitParameters, _absorb_small, first_pixel_order, split_objects

MARKERS = ("distance", "energy")


@dataclass(frozen=True)
class HVParameters:
    """How objects are cut out of a class mask with the geometry map; lengths in µm, areas in µm²."""

    markers: str = "distance"  # "distance": the distance split with learnt valleys; "energy": HoVer-Net's
    weight: float = 2.0  # distance: how deep a border (energy 1) cuts the surface: x (1 - weight)
    smooth_um: float = 0.5  # Gaussian smoothing of the maps before their gradient
    border: float = 0.4  # energy: at or above this a pixel is a border (HoVer-Net's threshold, fixed scale)
    marker_um: float = 0.5  # energy: radius of the opening that cleans markers
    min_marker_um2: float = 1.0  # energy: smaller markers are dropped
    min_area_um2: float = 6.0  # smaller fragments join a neighbour (or vanish if alone)
    distance: SplitParameters = SplitParameters(min_area_um2=6.0)  # the distance split's own parameters

    method = "hv"

    def check(self) -> None:
        if (self.markers not in MARKERS or not 0 < self.border <= 1 or self.smooth_um <= 0 or self.weight < 0
                or min(self.marker_um, self.min_marker_um2, self.min_area_um2) < 0):
            raise ValueError(f"geometry split parameters out of range: {self}")
        self.distance.check()

    def describe(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def reach_px(self, mpp: Optional[float]) -> int:
        """How far (px) the split of a clump looks beyond it: the smoothings' reach and the gradient's."""
        px = float(mpp) if mpp else DEFAULT_MPP
        return max(int(math.ceil(4.0 * self.smooth_um / px)) + 2, self.distance.reach_px(mpp))

    def split(self, prob, mask, *, mpp: Optional[float] = None, maps=None) -> np.ndarray:
        if maps is None:
            raise ValueError("the geometry split needs the maps of a model with a geometry head")
        return hv_split(prob, mask, maps, mpp=mpp, params=self)


def hv_energy(maps: np.ndarray, *, mpp: Optional[float], smooth_um: float = HVParameters.smooth_um) -> np.ndarray:
    """The border energy (float, >= 0) of the module docstring, for maps (2, H, W)."""
    px = float(mpp) if mpp else DEFAULT_MPP
    sigma = smooth_um / px
    h = ndi.gaussian_filter(np.asarray(maps[0], np.float64), sigma)
    v = ndi.gaussian_filter(np.asarray(maps[1], np.float64), sigma)
    # ndi.sobel is 8x the central difference along its axis (a 1-2-1 average across it).
    fall = np.maximum(-ndi.sobel(h, axis=1), -ndi.sobel(v, axis=0)) / 8.0
    # A step of -2 blurred by a Gaussian of sigma px has a steepest slope of 2 / (sigma sqrt(2 pi)).
    return np.clip(fall * max(sigma, 1.0) * math.sqrt(2 * math.pi) / 2.0, 0.0, None)


def hv_split(prob: Optional[np.ndarray], mask: np.ndarray, maps: np.ndarray, *, mpp: Optional[float] = None,
             params: HVParameters = HVParameters()) -> np.ndarray:
    """Object ids (uint32, 0 = not this class) of one class mask from the geometry ``maps`` (2, H, W),
    numbered 1..n in raster order of each object's first pixel; ``prob`` the foreground probability
    (None: the mask alone)."""
    mask = np.asarray(mask, bool)
    params.check()
    maps = np.asarray(maps)
    if maps.shape != (2,) + mask.shape:
        raise ValueError(f"maps {maps.shape} do not fit the mask {mask.shape}")
    if not mask.any():
        return np.zeros(mask.shape, np.uint32)
    energy = hv_energy(maps, mpp=mpp, smooth_um=params.smooth_um)
    p = np.ones(mask.shape) if prob is None else np.clip(np.asarray(prob, np.float64), 0.0, 1.0)
    if params.markers == "distance":
        return split_objects(p * np.clip(1.0 - params.weight * energy, 0.0, 1.0), mask, mpp=mpp,
                             params=params.distance)
    return _energy_split(np.maximum(energy, 1.0 - p), mask, mpp, params)


def _energy_split(energy: np.ndarray, mask: np.ndarray, mpp: Optional[float], params: HVParameters) -> np.ndarray:
    """HoVer-Net's markers and watershed on ``energy`` (see the module docstring)."""
    from skimage.morphology import disk
    from skimage.segmentation import watershed

    px = float(mpp) if mpp else DEFAULT_MPP
    seeds = mask & (energy < params.border)
    radius = int(round(params.marker_um / px))
    if radius > 0:
        seeds = ndi.binary_opening(seeds, disk(radius))
    markers = ndi.label(seeds, _CROSS)[0]
    min_marker = int(round(params.min_marker_um2 / (px * px)))
    if min_marker > 1 and markers.max():
        small = np.bincount(markers.ravel()) < min_marker
        small[0] = False
        markers = np.where(small[markers], 0, markers)
    ids = watershed(energy, markers, mask=mask, connectivity=1)
    orphans, n_orphans = ndi.label(mask & (ids == 0), _CROSS)
    if n_orphans:
        ids = np.where(orphans > 0, orphans + ids.max(), ids)
    ids = _absorb_small(ids, params.min_area_um2 / (px * px))
    return first_pixel_order(ids).astype(np.uint32)
