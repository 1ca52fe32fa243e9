"""One label-image reader and one class naming, whichever part of the project opens a file."""

import json

import numpy as np
import pytest

from genselfdiff.errors import UserError
from genselfdiff.io.labels import class_metadata, default_colors, open_label_image
from genselfdiff.io.omezarr import write_label_array
from genselfdiff.io.qupath import export_geojson


def test_classes_the_metadata_leaves_out_get_the_one_default_name():
    names, colors = class_metadata({"properties": [{"label-value": 1, "class": "tumor"}],
                                    "colors": [{"label-value": 3, "rgba": [1, 2, 3, 255]}]})
    assert names == ["background", "tumor", "class 2", "class 3"]
    assert colors == default_colors(3) + [[1, 2, 3]]
    assert class_metadata({}) == (None, None)


def test_grey_rgb_pngs_are_read_and_colour_ones_refused_naming_the_file(tmp_path):
    from skimage.io import imsave

    labels = np.zeros((20, 30), np.uint8)
    labels[5:10, 5:25] = 2
    imsave(tmp_path / "grey.png", np.stack([labels] * 3, -1), check_contrast=False)
    np.testing.assert_array_equal(np.asarray(open_label_image(tmp_path / "grey.png").array), labels)
    colour = np.stack([labels, labels, labels * 0], -1)
    imsave(tmp_path / "colour.png", colour, check_contrast=False)
    with pytest.raises(UserError, match="colour.png is a colour image"):
        open_label_image(tmp_path / "colour.png")


def test_an_output_gets_the_same_class_names_in_napari_in_geojson_and_in_python(tmp_path):
    from napari_genselfdiff._reader import read

    labels = np.zeros((64, 64), np.uint8)
    labels[4:20, 4:20] = 1
    labels[30:50, 30:60] = 2
    out = tmp_path / "seg.ome.zarr"
    write_label_array(out, labels, name="seg", classes=["background", "tumor", "stroma"],
                      colors=default_colors(3), run={"test": 1}, downsample=2, offset=(10, 20), mpp=0.5)
    source = open_label_image(out)
    assert source.class_names == ["background", "tumor", "stroma"]
    assert source.scale == (0.5, 0.5) and source.unit == "micrometer"
    assert source.translation == pytest.approx(((10 + 0.5) * 0.25, (20 + 0.5) * 0.25))
    [(_, meta, kind)] = read(str(out))
    assert kind == "labels" and meta["metadata"]["genselfdiff"]["label_names"] == source.class_names
    export_geojson(out, tmp_path / "seg.geojson")
    features = json.loads((tmp_path / "seg.geojson").read_text())["features"]
    assert sorted(f["properties"]["classification"]["name"] for f in features) == ["stroma", "tumor"]
