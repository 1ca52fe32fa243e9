"""The split by the geometry map: borders where the maps say, seamless over tiles and chunks."""

import numpy as np
import pytest
import torch
from torch import nn

from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.infer.segment import segment
from genselfdiff.nn.geometry import hv_maps
from genselfdiff.objects.hv_split import HVParameters, hv_split
from genselfdiff.objects.request import object_request
from genselfdiff.objects.split import array_reader, first_pixel_order, object_tiles, split_objects


def same_partition(a, b) -> bool:
    return bool((first_pixel_order(np.asarray(a)) == first_pixel_order(np.asarray(b))).all())


def two_boxes():
    """Two nuclei side by side that make one rectangle: no waist for a distance split to find."""
    ids = np.zeros((40, 60), np.int64)
    ids[10:30, 8:30] = 1
    ids[10:30, 30:52] = 2
    return ids


def test_maps_cut_touching_nuclei_that_distance_cannot():
    ids = two_boxes()
    mask = ids > 0
    assert split_objects(None, mask, mpp=0.5).max() == 1  # one rectangle: the distance split sees one object
    for markers in ("distance", "energy"):
        params = HVParameters(markers=markers)
        found = hv_split(None, mask, hv_maps(ids), mpp=0.5, params=params)
        assert found.max() == 2, markers
        assert (first_pixel_order(found)[ids == 1] == 1).mean() > 0.95, markers  # cut at (about) the true border
        assert (first_pixel_order(found)[ids == 2] == 2).mean() > 0.95, markers
        # Without a border in the maps (one nucleus's maps), one object.
        assert hv_split(None, mask, hv_maps(mask.astype(int)), mpp=0.5, params=params).max() == 1, markers
    with pytest.raises(ValueError, match="maps"):
        hv_split(None, mask, hv_maps(ids)[:, :10], mpp=0.5)


def test_geometry_split_tiled_equals_untiled():
    _, truth = synthetic_tissue((300, 260), seed=5)
    ids = np.asarray(__import__("scipy.ndimage", fromlist=["label"]).label(truth > 0)[0])
    maps = hv_maps(ids)
    mask = truth > 0
    prob = np.clip(mask + np.random.default_rng(0).normal(0, 0.1, mask.shape), 0, 1)
    for params in (HVParameters(), HVParameters(markers="energy")):
        whole = hv_split(prob, mask, maps, mpp=0.5, params=params)
        tiled = np.zeros(mask.shape, np.uint32)
        for t in object_tiles(array_reader(mask, prob, maps), mask.shape, core=64, halo_um=32.0, mpp=0.5,
                              params=params):
            y0, x0, y1, x1 = t.core
            tiled[y0:y1, x0:x1] = t.ids
            assert t.cut_clumps == 0
        assert whole.max() > 10 and same_partition(tiled, whole), params.markers


class GeometryNet(nn.Module):
    """A convolutional stand-in with a geometry head: tiling is exact for it."""

    classes = 2
    has_geometry = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.Tanh())
        self.head = nn.Conv2d(8, 2, 5, padding=2)
        self.geometry = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, geometry=False):
        dark = -nn.functional.avg_pool2d(x.mean(1, keepdim=True), 3, stride=1, padding=1)  # nuclei are dark
        logits = torch.cat([-dark, dark], 1) * 20 + self.head(self.body(x))
        return (logits, torch.tanh(self.geometry(self.body(x)) * 100)) if geometry else logits


def geometry_model():
    from genselfdiff.io.labels import default_colors
    from genselfdiff.io.pixelsize import Resolution
    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.model import Model

    return Model(net=GeometryNet().eval(), kind="segmentation", net_config=get_preset("tiny").net,
                 device=torch.device("cpu"), classes=["background", "nucleus"], colors=default_colors(2),
                 resolution=Resolution(level=0), patch=64, amp=False)


def test_objects_pass_with_a_head_tiled_equals_untiled(tmp_path):
    from genselfdiff.nn.model import class_probabilities_and_geometry, to_input

    model = geometry_model()
    assert model.has_geometry and isinstance(object_request(model).params, HVParameters)
    rgb, _ = synthetic_tissue((200, 172), seed=2)
    whole = segment(model, rgb, skip_background=False, instances=True)  # in memory, one tile
    r = segment(model, rgb, tmp_path / "x.ome.zarr", tile=64, overlap=32, chunk=96, skip_background=False,
                instances=True)
    assert (np.asarray(r.labels) == whole.labels).all()
    # The split the geometry map gives on the whole image, computed here by hand.
    with torch.no_grad():
        p, maps = class_probabilities_and_geometry(model.net, to_input(rgb, "cpu"), amp=False)
    want = hv_split(1 - p[0, 0].numpy(), whole.labels == 1, maps[0].numpy(), mpp=None)
    assert want.max() > 5
    assert same_partition(whole.objects.ids, want)
    assert same_partition(r.objects.ids, want)
    assert np.intersect1d(np.asarray(r.objects.ids)[95, :], np.asarray(r.objects.ids)[96, :]).size > 1
    # The geometry is stored beside the labels for the objects pass, and differs from the distance split.
    assert (tmp_path / "x.ome.zarr" / "geometry" / "0").exists()
    assert not same_partition(want, split_objects(None, whole.labels == 1, mpp=None))


def test_a_display_pyramid_without_maps_falls_back_to_the_distance_split():
    from genselfdiff.infer.merge import PyramidMerger
    from genselfdiff.infer.segment import segment_tiles

    model = geometry_model()
    rgb, _ = synthetic_tissue((128, 96), seed=2)
    merger = PyramidMerger()
    run = segment_tiles(model, rgb, merger=merger, skip_background=False, instances=True)
    while True:
        try:
            next(run)
        except StopIteration as end:
            result = end.value
            break
    labels = np.asarray(merger.labels)
    assert same_partition(result.objects.ids, split_objects(None, labels == 1, mpp=None))
    assert any("split by distance" in n for n in result.notes)
