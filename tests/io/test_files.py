"""Finding input files and pairing them by stem; a fine-tuning run's GeoJSON read once per file."""

import json

import numpy as np
import pytest
from skimage.io import imsave

from genselfdiff.errors import UserError
from genselfdiff.io.files import (
    GEOJSON_SUFFIXES,
    find_images,
    fingerprint,
    image_paths,
    image_stem,
    match_by_stem,
    same_slides,
)
from genselfdiff.io.labels import read_mask


def test_stems_and_finding_images_in_folders(tmp_path):
    assert image_stem("a/b.ome.tif") == "b" and image_stem("c/b.ome.zarr") == "b" and image_stem("x.SVS") == "x"
    (tmp_path / "sub").mkdir()
    (tmp_path / "slide.ome.zarr").mkdir()
    (tmp_path / "slide.ome.zarr" / "0.png").touch()  # inside an OME-Zarr: part of that image, not another
    for name in ("a.png", "sub/b.svs", ".hidden.png", "notes.txt"):
        (tmp_path / name).touch()
    found = find_images([tmp_path, tmp_path / "a.png"])  # the same file twice counts once
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png", "slide.ome.zarr", "sub/b.svs"]
    with pytest.raises(UserError, match="does not exist"):
        find_images([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No images found"):
        image_paths([tmp_path / "empty"])


def test_geojson_files_are_matched_by_stem(tmp_path):
    for name in ("a.svs", "b.ome.tif", "c.png", "a.geojson", "b_annotations.json", "z.geojson"):
        (tmp_path / name).touch()
    images = find_images([tmp_path])
    pairs, unmatched, unused = match_by_stem(images, [tmp_path], suffixes=GEOJSON_SUFFIXES)
    assert [(i.name, a.name) for i, a in pairs] == [("a.svs", "a.geojson"), ("b.ome.tif", "b_annotations.json")]
    assert [p.name for p in unmatched] == ["c.png"] and [p.name for p in unused] == ["z.geojson"]


def test_read_mask_and_fingerprints(tmp_path):
    imsave(tmp_path / "m.png", np.array([[0, 1], [2, 0]], np.uint8), check_contrast=False)
    assert np.array_equal(np.asarray(read_mask(tmp_path / "m.png")), [[0, 1], [2, 0]])
    with pytest.raises(UserError, match="does not exist"):
        read_mask(tmp_path / "missing.png")
    now = {"files": [str(tmp_path / "m.png")], "fingerprint": fingerprint([tmp_path / "m.png"])}
    moved = {"files": ["/elsewhere/m.png"], "fingerprint": now["fingerprint"]}
    assert same_slides(moved, now) and same_slides({"files": ["/old/m.png"]}, now)  # old runs: by name
    assert not same_slides({"files": ["/x/m.png"], "fingerprint": [["m.png", 1]]}, now)


def test_a_fine_tuning_run_reads_each_geojson_file_once(tmp_path, monkeypatch):
    from genselfdiff.io import rasterize

    imsave(tmp_path / "a.png", np.full((40, 40, 3), 200, np.uint8), check_contrast=False)
    ring = [[4, 4], [20, 4], [20, 20], [4, 20], [4, 4]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
               "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [9, 8, 7]}}}
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    reads = []
    real = rasterize.read_geojson
    monkeypatch.setattr(rasterize, "read_geojson", lambda path: reads.append(path) or real(path))
    labels, names, colors, warns = rasterize.training_labels([(tmp_path / "a.png", tmp_path / "a.geojson")], None,
                                                            sparse=False)
    assert reads == [tmp_path / "a.geojson"]  # the classes and the pixels come from one reading
    assert names == ["background", "Tumor"] and colors[1] == [9, 8, 7] and not warns
    assert labels[0].shape == (40, 40) and int(labels[0].sum()) == 16 * 16
