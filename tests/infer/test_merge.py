"""Mergers: where finished tiles go (an array, a display pyramid, an OME-Zarr output)."""

from types import SimpleNamespace

import numpy as np
import pytest

from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.errors import UserError
from genselfdiff.infer import merge
from genselfdiff.infer.merge import ArrayMerger, PyramidMerger
from genselfdiff.infer.segment import load_labels, segment, segment_tiles
from genselfdiff.io.omezarr import pyramid_levels


def _tile(y, x, labels):
    return SimpleNamespace(y=y, x=x, labels=labels)


def test_display_pyramid_writes_every_level():
    pyramid = PyramidMerger((300, 500), min_side=128)
    assert [lv.shape for lv in pyramid.levels] == [(300, 500), (150, 250), (75, 125)]
    tile = np.full((64, 64), 3, np.uint8)
    pyramid.paste(_tile(33, 101, tile))
    for k, level in enumerate(pyramid.levels):
        s = 2**k
        ys, xs = np.nonzero(level)
        assert ys.min() * s >= 33 and (ys.max() * s) < 33 + 64 and xs.min() * s >= 101 and xs.max() * s < 101 + 64
    np.testing.assert_array_equal(pyramid.levels[1], pyramid.levels[0][::2, ::2])
    np.testing.assert_array_equal(pyramid.levels[2], pyramid.levels[0][::4, ::4])


def test_display_pyramid_has_the_engines_number_of_levels():
    for shape in ((300, 500), (2000, 700), (5000, 9000), (100, 100)):
        assert len(PyramidMerger(shape).levels) == pyramid_levels(shape, merge.DISPLAY_CHUNK)
    assert len(PyramidMerger((100, 100)).levels) == 1 and PyramidMerger((100, 100)).data.shape == (100, 100)


def test_display_pyramid_of_a_whole_slide_lives_in_compressed_zarr_chunks(monkeypatch):
    monkeypatch.setattr(merge, "IN_MEMORY_LIMIT", 10_000)
    big, small = PyramidMerger((300, 500), min_side=128), None
    monkeypatch.setattr(merge, "IN_MEMORY_LIMIT", 10**9)
    small = PyramidMerger((300, 500), min_side=128)
    assert type(big.levels[0]).__module__.startswith("zarr") and isinstance(small.levels[0], np.ndarray)
    tile = np.random.default_rng(0).integers(0, 3, (70, 90)).astype(np.uint8)
    for pyramid in (big, small):
        pyramid.paste(_tile(17, 251, tile))
    for a, b in zip(big.levels, small.levels):
        np.testing.assert_array_equal(np.asarray(a[:]), b)


def test_every_merger_gets_the_same_tiles_as_segment(tmp_path, local_model):
    """segment()'s array, a display pyramid given to the generator, and the OME-Zarr output agree."""
    model = local_model()
    rgb, _ = synthetic_tissue((200, 172), seed=2)
    kw = dict(tile=64, overlap=16, chunk=96, skip_background=False)
    want = segment(model, rgb, **kw).labels
    pyramid, array = PyramidMerger(min_side=64), ArrayMerger()
    for _ in segment_tiles(model, rgb, merger=pyramid, **kw):
        pass
    for _ in segment_tiles(model, rgb, tmp_path / "out.ome.zarr", merger=array, **kw):
        pass
    np.testing.assert_array_equal(pyramid.labels, want)
    np.testing.assert_array_equal(pyramid.levels[1], want[::2, ::2])
    np.testing.assert_array_equal(array.finish(), want)
    np.testing.assert_array_equal(np.asarray(load_labels(tmp_path / "out.ome.zarr")[0]), want)


def test_objects_in_memory_are_accepted_with_a_merger_that_keeps_the_labels(local_model):
    """The napari Segment widget's path: no output folder, a display pyramid not yet started."""
    model = local_model()
    rgb, _ = synthetic_tissue((128, 128), seed=2)
    pyramid = PyramidMerger(min_side=64)
    for _ in segment_tiles(model, rgb, merger=pyramid, tile=64, overlap=16, skip_background=False, instances=True):
        pass
    np.testing.assert_array_equal(pyramid.labels, segment(model, rgb, tile=64, overlap=16, skip_background=False).labels)
    with pytest.raises(UserError, match="needs an output path"):
        next(iter(segment_tiles(model, rgb, tile=64, overlap=16, skip_background=False, instances=True)))
