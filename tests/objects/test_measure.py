import numpy as np
import pytest
from skimage.color import rgb_from_hed

from genselfdiff.io.qupath import read_geojson
from genselfdiff.objects.measure import (
    detection_features,
    haematoxylin_od,
    measure_objects,
    object_rows,
    object_summary,
    summary_csv,
    tissue_area_mm2,
)


def _disk_and_bar():
    ids = np.zeros((40, 60), np.uint32)
    yy, xx = np.mgrid[:40, :60]
    ids[(yy - 15) ** 2 + (xx - 15) ** 2 <= 10**2] = 7  # a disk
    ids[30:32, 20:58] = 1000  # a thin bar, 2 x 38 px
    return ids


def test_areas_and_centroids_in_micrometres():
    ids = _disk_and_bar()
    cols = measure_objects(ids, mpp=0.5, offset=(100, 200))
    assert cols["id"].tolist() == [7, 1000]
    n_disk = int((ids == 7).sum())
    assert cols["Area µm^2"].tolist() == pytest.approx([n_disk * 0.25, 76 * 0.25])
    # The disk's pixel centres average to (15, 15); +0.5 for the pixel centre, + offset, x 0.5 µm.
    assert cols["Centroid X µm"][0] == pytest.approx((15.5 + 200) * 0.5)
    assert cols["Centroid Y µm"][0] == pytest.approx((15.5 + 100) * 0.5)
    assert "Area px^2" in measure_objects(ids)  # no pixel size: pixels, and the name says so
    # Tiled ids are sparse and large (1 + a raster index): measured all the same, quickly.
    sparse = np.where(ids == 1000, np.uint32(3_000_000_000), ids)
    cols = measure_objects(sparse, mpp=0.5)
    assert cols["id"].tolist() == [7, 3_000_000_000] and cols["Area µm^2"][1] == pytest.approx(76 * 0.25)
    assert measure_objects(np.ones((3, 3), np.uint32))["Area px^2"].tolist() == [9.0]  # no background


def test_circularity_tells_a_disk_from_a_bar():
    cols = measure_objects(_disk_and_bar(), mpp=0.5)
    disk, bar = cols["Circularity"]
    # A 2 x 38 bar: area 76, perimeter about 2 * 38 + 2 = 78 -> 4 pi 76 / 78^2 = 0.157.
    assert disk > 0.9 and bar == pytest.approx(4 * np.pi * 76 / 78**2, rel=0.1)
    # Perimeter of the disk (radius 10 px = 5 µm) near 2 pi r = 31.4 µm.
    assert cols["Perimeter µm"][0] == pytest.approx(2 * np.pi * 5, rel=0.1)


def test_haematoxylin_optical_density():
    # A pixel of pure haematoxylin at density c has RGB optical densities c * rgb_from_hed[0]
    # (log10 units), i.e. intensities 255 * 10^(-c v); deconvolution gives back c.
    c = 0.6
    pure_h = np.round(255 * 10 ** (-c * rgb_from_hed[0])).astype(np.uint8)
    white = np.array([255, 255, 255], np.uint8)
    rgb = np.stack([pure_h, white])[None]
    h = haematoxylin_od(rgb)
    assert h[0, 0] == pytest.approx(c, abs=0.01) and h[0, 1] == 0.0
    ids = np.array([[1, 2]])
    cols = measure_objects(ids, rgb, mpp=0.5)
    assert cols["Hematoxylin OD mean"].tolist() == pytest.approx([c, 0.0], abs=0.01)
    with pytest.raises(ValueError):
        measure_objects(np.zeros((3, 3), int), np.zeros((2, 2, 3), np.uint8))


def test_summary_counts_and_density():
    rgb = np.full((100, 100, 3), 255, np.uint8)
    rgb[20:80, 20:80] = (200, 120, 180)  # a 60 x 60 px patch of pink tissue on glass
    area = tissue_area_mm2(rgb, 0.5)  # 3600 px x (0.5e-3 mm)^2 = 0.0009 mm², less the opening's corners
    assert area == pytest.approx(0.0009, rel=0.01)
    assert tissue_area_mm2(rgb, None) is None
    rows = object_summary({"Nucleus": 9, "Gland": 0}, tissue_mm2=0.0009)
    assert rows[0] == {"class": "Nucleus", "objects": 9, "tissue_mm2": 0.0009, "objects_per_mm2": pytest.approx(10000)}
    assert rows[1]["objects_per_mm2"] == 0.0
    text = summary_csv("slide.svs", object_summary({"Nucleus": 3}))
    assert text.splitlines() == ["image,class,objects,tissue_mm2,objects_per_mm2", "slide.svs,Nucleus,3,,"]


def _shoelace(ring):
    x, y = np.asarray(ring).T
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def test_detections_for_qupath(tmp_path):
    ids = _disk_and_bar()
    cols = measure_objects(ids, mpp=0.5)
    feats = detection_features(ids, cols, class_name="Nucleus", color=(200, 30, 60), scale=2.0, offset=(10, 20))
    assert len(feats) == 2
    disk = feats[0]["properties"]
    assert disk["objectType"] == "detection"
    assert disk["classification"] == {"name": "Nucleus", "color": [200, 30, 60]}
    assert disk["measurements"]["Area µm^2"] == pytest.approx(cols["Area µm^2"][0])
    assert set(disk["measurements"]) == {"Area µm^2", "Perimeter µm", "Circularity", "Centroid X µm", "Centroid Y µm"}
    # Outline in level-0 pixels (scale 2): the polygon's area is the object's pixel count x 4, within
    # the 1 % the simplification may change it.
    ring = feats[0]["geometry"]["coordinates"][0]
    assert _shoelace(ring) == pytest.approx((ids == 7).sum() * 4, rel=0.011)
    xs = [p[0] for p in ring]
    assert min(xs) == pytest.approx(20 + 5 * 2, abs=1.0)  # disk's left edge at column 5
    # QuPath's importer (our reader) takes them back.
    path = tmp_path / "objects.geojson"
    import json

    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    objects, warnings = read_geojson(path)
    assert not warnings and [o.object_type for o in objects] == ["detection", "detection"]
    assert objects[1].name == "Nucleus" and feats[1]["properties"]["metadata"] == {"object_id": "1000"}


def test_an_object_in_two_pieces_is_one_multipolygon():
    ids = np.zeros((10, 10), np.uint32)
    ids[1:3, 1:3] = 5
    ids[6:8, 6:8] = 5
    feats = detection_features(ids, measure_objects(ids), class_name="Gland", color=(0, 0, 255))
    assert len(feats) == 1 and feats[0]["geometry"]["type"] == "MultiPolygon"
    assert len(feats[0]["geometry"]["coordinates"]) == 2
    assert object_rows(measure_objects(ids))[0]["Area px^2"] == 8.0
