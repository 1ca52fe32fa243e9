"""Tile arithmetic: cores partition the image, halos are kept, chunks line up with the pyramid."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from genselfdiff.infer import tiling
from genselfdiff.io import omezarr


@pytest.mark.parametrize("start,stop,size,overlap", [(0, 1000, 256, 32), (5, 37, 64, 16), (0, 224 * 9, 256, 32),
                                                     (0, 100, 64, 0), (3, 4, 64, 16)])
def test_split_partitions_the_range_with_cores_near_the_stride(start, stop, size, overlap):
    cores = tiling.split(start, stop, size, overlap)
    assert cores[0][0] == start and cores[-1][1] == stop
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    lengths = [b - a for a, b in cores]
    assert max(lengths) - min(lengths) <= 1
    assert max(lengths) <= size - overlap + overlap // 4
    # No extra row of tiles: one core fewer would exceed the allowed slack.
    if len(cores) > 1:
        assert (stop - start) / (len(cores) - 1) > size - overlap + overlap // 4


def test_exact_multiples_of_the_stride_give_exact_strides():
    assert [b - a for a, b in tiling.split(0, 224 * 9, 256, 32)] == [224] * 9


@pytest.mark.parametrize("shape", [(700, 530), (256, 1000), (90, 70)])
def test_unit_tiles_cover_the_unit_once_with_the_halo_inside_the_window(shape):
    tile, overlap, multiple = 128, 32, 4
    h, w = shape
    covered = np.zeros(shape, int)
    unit = (0, 0, h, w)
    th, tw = tiling.tile_shape(shape, tile, multiple)
    for t in tiling.unit_tiles(unit, shape, tile, overlap, multiple):
        y0, x0, y1, x1 = t.core
        wy0, wx0, wy1, wx1 = t.window
        covered[y0:y1, x0:x1] += 1
        assert (wy1 - wy0, wx1 - wx0) == (th, tw)
        assert wy0 >= 0 and wx0 >= 0
        if h >= tile:
            assert wy1 <= h  # never cut at the image border: shifted inwards instead
            # halo: a core edge inside the image is at least about overlap/2 from its window's edge
            if y0 > 0:
                assert y0 - wy0 >= overlap // 2 - overlap // 8
            if y1 < h:
                assert wy1 - y1 >= overlap // 2 - overlap // 8
    assert (covered == 1).all()


def test_small_image_is_one_tile_rounded_up_to_the_multiple():
    tiles = tiling.unit_tiles((0, 0, 90, 70), (90, 70), 128, 32, 8)
    assert len(tiles) == 1
    assert tiles[0].core == (0, 0, 90, 70) and tiles[0].window == (0, 0, 96, 72)


def test_local_filter_tiled_equals_whole_image():
    """For any operation with a receptive field inside the halo, centre-cropped tiles are exact."""
    rng = np.random.default_rng(0)
    image = rng.random((301, 257)).astype(np.float32)

    def op(x):  # 9x9 receptive field, zero padding at the border like a convolution
        return ndi.uniform_filter(x, size=9, mode="constant")

    whole = op(image)
    shape = image.shape
    for overlap, exact in ((16, True), (0, False)):
        out = np.full(shape, np.nan, np.float32)
        for index, rect0 in tiling.chunk_grid(shape, 128):
            rect = tiling.unit_region(rect0, shape, shape)
            for t in tiling.unit_tiles(rect, shape, 64, overlap, 4):
                y0, x0, y1, x1 = t.window
                pred = op(image[y0:y1, x0:x1])
                oy, ox = t.offset
                c = t.core
                out[c[0]:c[2], c[1]:c[3]] = pred[oy:oy + c[2] - c[0], ox:ox + c[3] - c[1]]
        assert not np.isnan(out).any()
        err = np.abs(out - whole).max()
        if exact:
            assert err < 1e-6
        else:
            assert err > 1e-3  # without a halo the seams show


def test_nearest_mapping_from_level0_to_a_coarser_level():
    # Exact 2x: level-0 pixel Y takes processing pixel Y // 2.
    ys = np.arange(1000)
    assert (tiling.nearest_index(ys, 1000, 500) == ys // 2).all()
    # Odd pyramid (1001 -> 500): every index valid, monotonic, each processing pixel used.
    j = tiling.nearest_index(np.arange(1001), 1001, 500)
    assert j.min() == 0 and j.max() == 499 and (np.diff(j) >= 0).all() and len(np.unique(j)) == 500
    assert tiling.nearest_index(1000, 1001, 500) == 499


def test_units_cover_every_processing_pixel():
    shape0, shape = (1001, 777), (500, 388)
    chunk = 256
    rows = np.zeros(shape[0], int)
    for index, rect0 in tiling.chunk_grid(shape0, chunk):
        if index[1] == 0:
            y0, x0, y1, x1 = tiling.unit_region(rect0, shape0, shape)
            rows[y0:y1] += 1
    assert (rows >= 1).all() and rows.max() <= 2  # neighbours share at most the odd row


def test_chunk_side_is_a_whole_number_of_strides_and_pyramid_friendly():
    assert tiling.chunk_side(256, 32, 1.0) % 64 == 0
    assert tiling.chunk_side(256, 32, 2.0) % 64 == 0
    assert abs(tiling.chunk_side(256, 32, 1.0) - 2048) <= 224
    assert omezarr.pyramid_levels((40000, 40000), 2048) == 7  # 40000 -> 625 at level 6
    assert omezarr.pyramid_levels((1000, 1000), 2048) == 2
    assert omezarr.pyramid_levels((400, 300), 2048) == 1
    assert omezarr.pyramid_levels((40000, 40000), 96) == 2  # 96 -> 48; 24 would be below the 32-px minimum chunk


def test_check_tiling_rejects_what_the_network_cannot_take():
    tiling.check_tiling(256, 32, 8)
    for tile, overlap in ((250, 32, ), (256, 256), (256, 31), (0, 0)):
        with pytest.raises(ValueError):
            tiling.check_tiling(tile, overlap, 8)


def test_work_units_are_the_chunks_with_their_tiles_and_a_region_keeps_what_meets_it():
    shape0, shape, chunk, tile, overlap, multiple = (1001, 777), (500, 388), 256, 64, 16, 4
    units = tiling.work_units(shape0, shape, chunk, tile, overlap, multiple)
    assert [u.index for u in units] == [i for i, _ in tiling.chunk_grid(shape0, chunk)]
    for u in units:
        assert u.rect == tiling.unit_region(u.rect0, shape0, shape)
        assert list(u.tiles) == tiling.unit_tiles(u.rect, shape, tile, overlap, multiple)
    region = (100, 150, 180, 260)
    inside = tiling.work_units(shape0, shape, chunk, tile, overlap, multiple, region)
    assert 0 < len(inside) < len(units)
    assert {u.index for u in inside} == {u.index for u in units if tiling.intersects(u.rect, region)}
    whole = {u.index: u.tiles for u in units}
    for u in inside:
        assert u.tiles and list(u.tiles) == [t for t in whole[u.index] if tiling.intersects(t.core, region)]
