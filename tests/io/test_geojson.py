import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk

from genselfdiff.errors import UserError
from genselfdiff.io.labels import open_label_image
from genselfdiff.io.qupath import export_geojson, labels_to_features, read_geojson
from genselfdiff.io.rasterize import rasterize, read_geojson_labels

FIXTURES = Path(__file__).parents[1] / "fixtures"
NAMES = ["background", "nucleus", "stroma"]
COLORS = [[0, 0, 0], [230, 25, 75], [60, 180, 75]]


def _polygons(feature):
    g = feature["geometry"]
    polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
    return [[np.asarray(r, float) for r in p] for p in polys]


def _area(feature):
    def ring(r):
        x, y = r[:, 0], r[:, 1]
        return 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return sum(ring(r) for p in _polygons(feature) for r in p)


@pytest.fixture(scope="module")
def scene():
    """Two classes: discs of many sizes (one with a hole holding an island), a bar with a hole."""
    lab = np.zeros((160, 220), np.uint8)
    rng = np.random.default_rng(1)
    for _ in range(14):
        r = rng.integers(6, 14)
        cy, cx = rng.integers(r + 1, 160 - r - 1), rng.integers(r + 1, 110 - r)
        lab[disk((cy, cx), r, shape=lab.shape)] = 1
    lab[disk((80, 170), 30, shape=lab.shape)] = 1
    lab[disk((80, 170), 12, shape=lab.shape)] = 0  # hole
    lab[disk((80, 170), 5, shape=lab.shape)] = 2  # an island of the other class inside it
    lab[5:30, 120:215] = 2
    for x in (125, 150, 175, 200):
        lab[12:20, x:x + 8] = 0  # holes in the bar, in different tiles
    return lab


def _objects(lab):
    """(class, mask) for every 4-connected region of every class."""
    out = []
    for k in np.unique(lab)[1:]:
        comp, n = ndi.label(lab == k)
        out += [(int(k), comp == i) for i in range(1, n + 1)]
    return out


def test_round_trip_per_object_iou_and_area(scene):
    feats = labels_to_features(scene, class_names=NAMES, colors=COLORS)
    objects = _objects(scene)
    assert len(feats) == len(objects)
    for f in feats:
        mask = rasterize(_polygons(f), scene.shape)
        k, truth = max(objects, key=lambda o: (o[1] & mask).sum())
        assert f["properties"]["classification"]["name"] == NAMES[k]
        assert (mask & truth).sum() / (mask | truth).sum() > 0.98
        assert abs(_area(f) - truth.sum()) <= 0.01 * truth.sum()


def test_exact_outlines_rasterise_back_exactly(scene):
    feats = labels_to_features(scene, class_names=NAMES, colors=COLORS, simplify=0)
    back = np.zeros_like(scene)
    for f in feats:
        back[rasterize(_polygons(f), scene.shape)] = NAMES.index(f["properties"]["classification"]["name"])
    # The island is drawn after (inside the hole of) the big disc, so order does not matter.
    np.testing.assert_array_equal(back, scene)


def test_holes_kept_and_qupath_properties(scene):
    feats = labels_to_features(scene, class_names=NAMES, colors=COLORS, object_type="detection")
    holes = {f["properties"]["classification"]["name"]: len(_polygons(f)[0]) - 1
             for f in feats if len(_polygons(f)[0]) > 1}
    assert holes == {"nucleus": 1, "stroma": 4}
    for f in feats:
        assert f["type"] == "Feature" and len(f["id"]) == 36
        assert f["properties"]["objectType"] == "detection"
        k = NAMES.index(f["properties"]["classification"]["name"])
        assert f["properties"]["classification"]["color"] == COLORS[k]
        for ring in _polygons(f)[0]:
            assert (ring[0] == ring[-1]).all() and len(ring) >= 4


def test_scale_and_offset_map_to_level0():
    lab = np.zeros((10, 10), np.uint8)
    lab[2:4, 3:7] = 1
    (f,) = labels_to_features(lab, scale=4.0, offset=(100, 1000), simplify=0)
    ring = _polygons(f)[0][0]
    assert ring[:, 0].min() == 1000 + 3 * 4 and ring[:, 0].max() == 1000 + 7 * 4
    assert ring[:, 1].min() == 100 + 2 * 4 and ring[:, 1].max() == 100 + 4 * 4
    assert f["properties"]["classification"]["name"] == "class 1"


def test_diagonal_neighbours_are_separate_objects():
    lab = np.zeros((6, 6), np.uint8)
    lab[1, 1] = lab[2, 2] = 1
    feats = labels_to_features(lab)
    assert len(feats) == 2 and all(abs(_area(f) - 1) < 1e-9 for f in feats)


@pytest.mark.parametrize("tile", [16, 23, 50])
def test_tiled_export_equals_untiled(tmp_path, scene, tile):
    whole = export_geojson(scene, tmp_path / "whole.geojson", tile=4096, class_names=NAMES, colors=COLORS)
    tiled = export_geojson(scene, tmp_path / "tiled.geojson", tile=tile, class_names=NAMES, colors=COLORS)
    a = json.loads((tmp_path / "whole.geojson").read_text())["features"]
    b = json.loads((tmp_path / "tiled.geojson").read_text())["features"]
    assert whole == tiled == len(a) == len(b)
    key = lambda f: json.dumps(f, sort_keys=True)
    assert sorted(map(key, a)) == sorted(map(key, b))  # same polygons, ids, classes
    assert sorted(map(_area, a)) == pytest.approx(sorted(map(_area, b)))


def test_export_writes_a_feature_collection_atomically(tmp_path, scene):
    out = tmp_path / "sub" / "objects.geojson"
    n = export_geojson(scene, out, class_names=NAMES, colors=COLORS, tile=64, pretty=True)
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == n > 0
    assert [p.name for p in out.parent.iterdir()] == ["objects.geojson"]


def test_export_stops_cleanly(tmp_path, scene):
    calls = []
    n = export_geojson(scene, tmp_path / "part.geojson", tile=32, colors=COLORS,
                       should_stop=lambda: len(calls) > 0, progress=calls.append)
    doc = json.loads((tmp_path / "part.geojson").read_text())
    assert len(calls) == 1 and len(doc["features"]) == n
    assert 0 < n < len(_objects(scene))


def _write_ngff_labels(path, labels, names, colors):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    a = g.create_array("0", shape=labels.shape, dtype=labels.dtype, chunks=(32, 32))
    a[:] = labels
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                         "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}]}],
        "image-label": {"version": "0.5",
                        "colors": [{"label-value": k, "rgba": c + [255]} for k, c in enumerate(colors)],
                        "properties": [{"label-value": k, "class": n} for k, n in enumerate(names)]},
    }


def test_export_reads_names_and_colours_from_ome_zarr(tmp_path, scene):
    _write_ngff_labels(tmp_path / "seg.ome.zarr", scene, NAMES, COLORS)
    assert open_label_image(tmp_path / "seg.ome.zarr").class_names == NAMES
    export_geojson(tmp_path / "seg.ome.zarr", tmp_path / "seg.geojson", tile=40)
    feats = json.loads((tmp_path / "seg.geojson").read_text())["features"]
    assert {(f["properties"]["classification"]["name"], tuple(f["properties"]["classification"]["color"]))
            for f in feats} == {("nucleus", tuple(COLORS[1])), ("stroma", tuple(COLORS[2]))}


def test_export_from_png_then_import_round_trip(tmp_path, scene):
    from skimage.io import imsave

    imsave(tmp_path / "mask.png", scene, check_contrast=False)
    export_geojson(tmp_path / "mask.png", tmp_path / "mask.geojson", class_names=NAMES, colors=COLORS, tile=48)
    labels, names, warnings = read_geojson_labels(tmp_path / "mask.geojson", scene.shape, class_names=NAMES)
    assert names == NAMES and warnings == []
    assert (labels == scene).mean() > 0.995


# --- import ------------------------------------------------------------------------------

def test_qupath_fixture_imports_classes_holes_and_multipolygons():
    labels, names, warnings = read_geojson_labels(FIXTURES / "qupath_v05_annotations.geojson", (150, 200))
    assert names == ["background", "Tumor", "Stroma", "Tumor: Positive", "Unclassified"]
    assert labels.dtype == np.uint8 and labels.shape == (150, 200)
    counts = np.bincount(labels.ravel(), minlength=5)
    assert counts[1] == 80 * 60 - 20 * 20  # rectangle minus its hole
    assert counts[2] == 20 * 20 + (40 * 40 - 10 * 10) + 20 * 20  # MultiPolygon (one part holed) + polygon
    assert counts[3] == 20 * 20 and counts[4] == 20 * 10
    assert labels[40, 50] == 0 and labels[12, 22] == 1  # inside the hole / inside the shell
    assert labels[115, 165] == 0 and labels[105, 155] == 2
    assert len(warnings) == 1 and "feature 5" in warnings[0] and "MultiPoint" in warnings[0]
    assert "1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e" in warnings[0]


def test_qupath_fixture_with_class_names_and_downsample():
    labels, names, warnings = read_geojson_labels(FIXTURES / "qupath_v05_annotations.geojson", (75, 100),
                                                  downsample=2.0, class_names=["background", "Stroma", "tumor"])
    assert names == ["background", "Stroma", "tumor"]
    assert labels[5:35, 10:50].astype(bool).sum() == 40 * 30 - 10 * 10 and labels[6, 11] == 2
    assert labels[12, 62] == 1
    skipped = [w for w in warnings if "not one of" in w]
    assert len(skipped) == 2 and any("Tumor: Positive" in w for w in skipped)


def test_qupath_fixture_objects_keep_colours_and_types():
    objects, _ = read_geojson(FIXTURES / "qupath_v05_annotations.geojson")
    assert [o.object_type for o in objects] == ["annotation", "annotation", "detection", "annotation", "annotation"]
    assert objects[0].color == [200, 0, 0] and objects[0].label == "Tumour region 1"
    assert len(objects[1].polygons) == 2 and len(objects[1].polygons[1]) == 2


def test_legacy_qupath_array_with_packed_colours():
    objects, warnings = read_geojson(FIXTURES / "qupath_v02_annotations.geojson")
    assert warnings == []
    assert [(o.name, o.color) for o in objects] == [("Tumor", [200, 0, 0]), ("Stroma", [150, 200, 150])]
    labels, names, _ = read_geojson_labels(FIXTURES / "qupath_v02_annotations.geojson", (40, 70))
    assert names == ["background", "Tumor", "Stroma"] and np.bincount(labels.ravel()).tolist() == [2800 - 600, 400, 200]


def test_zipped_export_reads_like_the_plain_file(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "objects.zip", "w") as z:
        z.write(FIXTURES / "qupath_v02_annotations.geojson", "objects.geojson")
    objects, _ = read_geojson(tmp_path / "objects.zip")
    assert [o.name for o in objects] == ["Tumor", "Stroma"]


def _write(tmp_path, features):
    path = tmp_path / "objects.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _square(x0, y0, x1, y1, name="Tumor", **extra):
    return {"type": "Feature", **extra,
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [1, 2, 3]}}}


def test_invalid_json_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(UserError, match="broken.geojson is not valid JSON"):
        read_geojson_labels(path, (10, 10))
    path.write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not GeoJSON"):
        read_geojson_labels(path, (10, 10))


def test_bad_features_warn_and_the_rest_imports(tmp_path):
    unknown = _square(0, 0, 5, 5, id="u-1")
    unknown["geometry"]["type"] = "Circle"
    broken = _square(0, 0, 5, 5, id="b-2")
    broken["geometry"]["coordinates"] = [[["a", 1], [2, 3]]]
    outside = _square(15, 15, 30, 30, name="Stroma", id="o-3")
    far = _square(100, 100, 120, 120, id="f-4")
    path = _write(tmp_path, [unknown, broken, _square(2, 2, 6, 6), outside, far, "nonsense"])
    labels, names, warnings = read_geojson_labels(path, (20, 20))
    assert names == ["background", "Tumor", "Stroma"]
    assert (labels == 1).sum() == 16 and (labels == 2).sum() == 25  # the part inside the image
    assert len(warnings) == 5
    assert "feature 1 (id u-1)" in warnings[0] and "unknown geometry type 'Circle'" in warnings[0]
    assert "feature 2 (id b-2)" in warnings[1] and "broken feature" in warnings[1]
    assert "feature 4 (id o-3)" in warnings[2] and "outside" in warnings[2] and "imported" in warnings[2]
    assert "feature 5 (id f-4)" in warnings[3] and "entirely outside" in warnings[3]
    assert "feature 6" in warnings[4]


def test_unclassified_objects_need_a_listed_class(tmp_path):
    f = _square(0, 0, 4, 4)
    del f["properties"]["classification"]
    path = _write(tmp_path, [f])
    labels, names, warnings = read_geojson_labels(path, (8, 8))
    assert names == ["background", "Unclassified"] and labels.sum() == 16 and warnings == []
    labels, names, warnings = read_geojson_labels(path, (8, 8), class_names=["background", "nucleus"])
    assert labels.sum() == 0 and "Unclassified" in warnings[0]


# --- command line ------------------------------------------------------------------------

def test_cli_export_and_import(tmp_path, scene, capsys):
    from skimage.io import imread, imsave

    from genselfdiff.app.cli import main

    imsave(tmp_path / "mask.png", scene, check_contrast=False)
    imsave(tmp_path / "image.png", np.zeros(scene.shape + (3,), np.uint8), check_contrast=False)
    assert main(["export-geojson", str(tmp_path / "mask.png"), "--out", str(tmp_path / "m.geojson"),
                 "--detections", "--tile", "64", "--class-names", "nucleus,stroma"]) == 0
    doc = json.loads((tmp_path / "m.geojson").read_text())
    assert doc["features"][0]["properties"]["objectType"] == "detection"
    assert main(["import-geojson", str(tmp_path / "m.geojson"), "--like", str(tmp_path / "image.png"),
                 "--out", str(tmp_path / "back.tif"), "--class-names", "nucleus,stroma"]) == 0
    assert "nucleus" in capsys.readouterr().out
    back = imread(tmp_path / "back.tif")
    assert back.dtype == np.uint8 and (back == scene).mean() > 0.995
    # A fixture with a non-area object: the mask is written and the exit status says "partly".
    imsave(tmp_path / "qupath.png", np.zeros((150, 200, 3), np.uint8), check_contrast=False)
    assert main(["import-geojson", str(FIXTURES / "qupath_v05_annotations.geojson"), "--like",
                 str(tmp_path / "qupath.png"), "--out", str(tmp_path / "q.png"), "--downsample", "2"]) == 1
    assert imread(tmp_path / "q.png").shape == (75, 100)
    assert "feature 5" in capsys.readouterr().err


def test_cli_errors_exit_2(tmp_path, capsys):
    from genselfdiff.app.cli import main

    bad = tmp_path / "bad.geojson"
    bad.write_text("not json")
    (tmp_path / "img.png").write_bytes(b"")
    assert main(["export-geojson", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.geojson")]) == 2
    from skimage.io import imsave

    imsave(tmp_path / "img.png", np.zeros((8, 8, 3), np.uint8), check_contrast=False)
    assert main(["import-geojson", str(bad), "--like", str(tmp_path / "img.png"), "--out", str(tmp_path / "m.png")]) == 2
    assert "bad.geojson is not valid JSON" in capsys.readouterr().err
    assert main(["import-geojson", str(FIXTURES / "qupath_v02_annotations.geojson"), "--like",
                 str(tmp_path / "img.png"), "--out", str(tmp_path / "m.jpg")]) == 2
    assert "m.jpg: write the mask as .png" in capsys.readouterr().err


def test_training_classes_number_the_files_of_a_run_from_python(tmp_path):
    from genselfdiff.io.rasterize import training_classes

    def feature(cls, color):
        ring = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"classification": {"name": cls, "color": color}}}

    a, b = tmp_path / "a.geojson", tmp_path / "b.geojson"
    a.write_text(json.dumps([feature("Tumor", [200, 0, 0])]))
    b.write_text(json.dumps([feature("Stroma", [0, 200, 0]), feature("Background", [9, 9, 9])]))
    names, colors, warns = training_classes([a, b], sparse=False)
    assert names == ["Background", "Tumor", "Stroma"] and colors[1:] == [[200, 0, 0], [0, 200, 0]] and not warns
    names, _, warns = training_classes([a], sparse=True)
    assert names == ["Tumor"] and "no QuPath class is called 'background'" in warns[0]
    names, _, _ = training_classes([a], sparse=False)
    assert names == ["background", "Tumor"]
