import numpy as np
import pytest
from scipy import ndimage as ndi

from genselfdiff.objects.split import (
    SplitParameters,
    array_reader,
    core_grid,
    first_pixel_order,
    object_tiles,
    objects_in_core,
    owned_by_core,
    split_objects,
)


def _disks(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for cy, cx in centres:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    return mask


def _touching_disks(shape=(150, 170), radius=7, seed=0):
    """Pairs and chains of overlapping disks (radius 7 px = 3.5 µm at 0.5 µm/px) scattered over an image."""
    rng = np.random.default_rng(seed)
    centres = []
    for cy in range(12, shape[0] - 12, 26):
        for cx in range(12, shape[1] - 30, 34):
            cy2, cx2 = cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)
            centres.append((cy2, cx2))
            if rng.random() < 0.7:  # a touching neighbour, 10-12 px away: a clear waist between them
                centres.append((cy2 + rng.integers(-4, 5), cx2 + 10 + rng.integers(0, 3)))
    return _disks(shape, centres, radius), centres


def _same_partition(a, b) -> bool:
    """True when two id maps cut the image into the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], 1), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def test_two_touching_disks_split_and_one_disk_does_not():
    two = _disks((40, 60), [(20, 20), (20, 32)], 8)  # centres 12 px apart: a waist between them
    ids = split_objects(None, two, mpp=0.5)
    assert ids.dtype == np.uint32 and ids.max() == 2
    assert ids[20, 20] != ids[20, 32] and (ids > 0).sum() == two.sum()
    one = _disks((40, 60), [(20, 26)], 9)
    one[11, 20:32] = False  # a ragged edge is no reason to split
    assert split_objects(None, one, mpp=0.5).max() == 1


def test_ids_are_numbered_in_raster_order_of_first_pixels():
    ids = split_objects(None, _disks((30, 30), [(20, 6), (5, 20)], 4), mpp=0.5)
    assert ids[5, 20] == 1 and ids[20, 6] == 2  # the upper disk starts first
    assert np.array_equal(first_pixel_order(np.array([[0, 9, 9], [4, 0, 0]])), [[0, 1, 1], [2, 0, 0]])
    big = np.array([[0, 4_000_000_000, 4_000_000_000], [7, 0, 3_000_000_000]], np.uint32)  # sparse tiled ids
    assert np.array_equal(first_pixel_order(big), [[0, 1, 1], [2, 0, 3]])


def test_small_fragments_join_a_neighbour_or_vanish():
    mask = _disks((40, 60), [(20, 20)], 8)
    mask[2, 50] = True  # an isolated 1-pixel speck: 0.25 µm² at 0.5 µm/px, below the minimum area
    ids = split_objects(None, mask, mpp=0.5, params=SplitParameters(min_area_um2=5.0))
    assert ids[2, 50] == 0 and ids.max() == 1
    kept = split_objects(None, mask, mpp=0.5, params=SplitParameters(min_area_um2=0.0))
    assert kept[2, 50] > 0 and kept.max() == 2


def test_parameters_are_in_micrometres():
    """The same tissue at two resolutions gives the same number of objects."""
    mask, centres = _touching_disks()
    fine = _disks((300, 340), [(2 * y, 2 * x) for y, x in centres], 14)
    assert split_objects(None, mask, mpp=0.5).max() == split_objects(None, fine, mpp=0.25).max()


def test_probability_valley_separates_objects():
    mask = np.zeros((20, 40), bool)
    mask[5:15, 5:35] = True  # one bar: its distance map has no two peaks
    prob = np.ones(mask.shape)
    prob[:, 19:21] = 0.2  # but the network is unsure in the middle
    assert split_objects(None, mask, mpp=0.5).max() == 1
    split = split_objects(prob, mask, mpp=0.5)
    assert split.max() == 2 and split[10, 8] != split[10, 32]


def test_tiled_objects_equal_untiled():
    mask, _ = _touching_disks()
    prob = np.clip(mask + np.random.default_rng(1).normal(0, 0.05, mask.shape), 0, 1)
    whole = split_objects(prob, mask, mpp=0.5)
    assert whole.max() > ndi.label(mask)[1] + 10  # touching pairs were split
    tiled = np.zeros(mask.shape, np.uint32)
    cut = 0
    # Small cores (37 px) so that many pairs straddle core borders; the halo (40 px) holds any clump.
    for t in object_tiles(array_reader(mask, prob), mask.shape, core=37, halo_um=20.0, mpp=0.5):
        y0, x0, y1, x1 = t.core
        tiled[y0:y1, x0:x1] = t.ids
        cut += t.cut_clumps
    assert cut == 0
    assert _same_partition(tiled, whole)
    # Ids are 1 + the raster index of each object's first pixel, whichever tile wrote them.
    for k in np.unique(tiled[tiled > 0])[:10]:
        assert np.flatnonzero(tiled.ravel() == k)[0] + 1 == k
    # Every object starts in exactly one core.
    ids = np.unique(tiled[tiled > 0])
    owners = sum(owned_by_core(ids, c, mask.shape[1]).astype(int) for c in core_grid(mask.shape, 37))
    assert np.all(owners == 1)


def test_a_halo_too_small_is_reported():
    mask = np.zeros((20, 120), bool)
    mask[5:15, 5:115] = True  # one clump 110 px wide
    tile = objects_in_core(array_reader(mask), (0, 0, 20, 40), mask.shape, halo=10, mpp=0.5)
    assert tile.cut_clumps == 1
    assert core_grid((5, 7), 4) == [(0, 0, 4, 4), (0, 4, 4, 7), (4, 0, 5, 4), (4, 4, 5, 7)]


def test_ids_that_would_not_fit_uint32_are_refused():
    def never(win):
        raise AssertionError("must not read")

    with pytest.raises(ValueError, match="uint32"):
        objects_in_core(never, (0, 0, 10, 10), (70000, 70000), halo=4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        split_objects(np.ones((3, 3)), np.ones((4, 4), bool))
