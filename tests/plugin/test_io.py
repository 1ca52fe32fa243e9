"""The plugin's reader, writers and sample data, without a viewer."""

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_genselfdiff import _layers
from napari_genselfdiff._reader import get_geojson_reader, get_reader, read_geojson
from napari_genselfdiff._sample_data import make_sample
from napari_genselfdiff._writer import write_labels_geojson, write_labels_zarr


def test_reader_opens_a_pyramidal_ome_tiff_lazily_with_its_scale(synthetic_slide):
    path, rgb, _ = synthetic_slide
    reader = get_reader(str(path))
    assert reader is not None
    [(data, meta, kind)] = reader(str(path))
    assert kind == "image" and meta["rgb"] and meta["multiscale"]
    assert [lv.shape for lv in data] == [(1024, 1024, 3), (512, 512, 3), (256, 256, 3)]
    assert all(type(lv).__module__.startswith("dask") for lv in data)  # nothing decoded yet
    assert meta["scale"] == (0.5, 0.5)
    np.testing.assert_array_equal(np.asarray(data[0][100:140, 200:260]), rgb[100:140, 200:260])


def test_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "plain_folder").mkdir()
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "plain_folder")) is None
    assert get_geojson_reader(str(tmp_path / "notes.txt")) is None


def test_png_opens_as_a_single_scale_rgb_image(tmp_path, synthetic_pair):
    from skimage import io

    io.imsave(tmp_path / "tile.png", synthetic_pair[0], check_contrast=False)
    [(data, meta, kind)] = get_reader(str(tmp_path / "tile.png"))(str(tmp_path / "tile.png"))
    assert kind == "image" and not meta["multiscale"] and data.shape == (256, 256, 3)
    assert meta["name"] == "tile"


def test_sample_data_is_an_image_with_matching_ground_truth():
    (rgb, image_meta, image_kind), (truth, labels_meta, labels_kind) = make_sample(shape=(256, 256))
    assert (image_kind, labels_kind) == ("image", "labels")
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8 and truth.shape == (256, 256)
    assert set(np.unique(truth)) == {0, 1}
    assert image_meta["scale"] == labels_meta["scale"]
    assert labels_meta["metadata"]["genselfdiff"]["label_names"] == ["background", "nucleus"]


def _square_labels():
    labels = np.zeros((64, 80), np.uint8)
    labels[10:20, 10:30] = 1
    labels[40:60, 50:70] = 2
    return labels


def test_geojson_written_from_a_downsampled_layer_is_in_level0_pixels(tmp_path):
    labels = _square_labels()
    meta = {"metadata": _layers.labels_metadata(["background", "gland", "tumour"], [[0, 0, 0], [1, 2, 3], [4, 5, 6]],
                                                downsample=4.0, offset=[100.0, 200.0])}
    write_labels_geojson(str(tmp_path / "out.geojson"), labels, meta)
    features = json.loads((tmp_path / "out.geojson").read_text())["features"]
    by_class = {f["properties"]["classification"]["name"]: np.array(f["geometry"]["coordinates"][0]) for f in features}
    assert set(by_class) == {"gland", "tumour"}
    gland = by_class["gland"]  # x 10..30, y 10..20 at downsample 4, shifted by (x 200, y 100)
    assert gland[:, 0].min() == pytest.approx(240, abs=2) and gland[:, 0].max() == pytest.approx(320, abs=2)
    assert gland[:, 1].min() == pytest.approx(140, abs=2) and gland[:, 1].max() == pytest.approx(180, abs=2)
    assert by_class["tumour"][0].tolist() and features[0]["properties"]["classification"]["color"] in ([1, 2, 3], [4, 5, 6])


def test_geojson_round_trip_without_a_slide_uses_the_bounding_box(tmp_path):
    labels = _square_labels()
    meta = {"metadata": _layers.labels_metadata(["background", "gland", "tumour"], [[0, 0, 0], [9, 9, 9], [8, 8, 8]])}
    write_labels_geojson(str(tmp_path / "a.geojson"), labels, meta)
    [(back, back_meta, kind)] = read_geojson(str(tmp_path / "a.geojson"))
    assert kind == "labels" and back.shape == (60, 70)  # up to the objects' far corner
    names = back_meta["metadata"]["genselfdiff"]["label_names"]
    recoded = np.array([names.index(n) if n in names else 0 for n in ["background", "gland", "tumour"]])
    np.testing.assert_array_equal(back, recoded[labels[:60, :70]])
    assert back_meta["metadata"]["genselfdiff"]["label_colors"][names.index("gland")] == [9, 9, 9]


def test_geojson_beside_its_slide_takes_the_slide_size_and_scale(tmp_path, synthetic_slide):
    import shutil

    path, _, truth = synthetic_slide
    shutil.copy(path, tmp_path / "case.ome.tif")
    meta = {"metadata": _layers.labels_metadata(["background", "nucleus"], [[0, 0, 0], [255, 0, 0]])}
    write_labels_geojson(str(tmp_path / "case.geojson"), truth[:300, :300], meta)
    [(back, back_meta, _)] = read_geojson(str(tmp_path / "case.geojson"))
    assert back.shape == truth.shape and back_meta["scale"] == (0.5, 0.5)
    assert (back[:300, :300] > 0).sum() == pytest.approx((truth[:300, :300] > 0).sum(), rel=0.02)
    assert not back[300:, :].any()


def test_plugin_modules_load_without_torch():
    """napari imports the widgets when it docks them: that must not pull torch in."""
    code = ("import sys, napari_genselfdiff._reader, napari_genselfdiff._writer, napari_genselfdiff._sample_data, "
            "napari_genselfdiff.widgets.pretrain, napari_genselfdiff.widgets.finetune, napari_genselfdiff.widgets.segment\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3]); "
            "sys.exit('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ome_zarr_writer_round_trip_keeps_classes_colours_and_scale(tmp_path):
    from napari_genselfdiff._reader import read

    labels = np.zeros((3000, 2100), np.uint8)  # more than one 2048 chunk each way
    labels[100:900, 50:400] = 1
    labels[2500:2900, 2000:2100] = 2
    names, colors = ["background", "gland", "tumour"], [[0, 0, 0], [10, 20, 30], [40, 50, 60]]
    meta = {"name": "case", "metadata": _layers.labels_metadata(names, colors, mpp=0.5)}
    [written] = write_labels_zarr(str(tmp_path / "case.ome.zarr"), labels, meta)
    assert get_reader(written) is not None
    [(data, back, kind)] = read(written)
    assert kind == "labels" and back["multiscale"] and back["scale"] == [0.5, 0.5]
    np.testing.assert_array_equal(np.asarray(data[0]), labels)
    np.testing.assert_array_equal(np.asarray(data[1]), labels[::2, ::2])
    info = back["metadata"]["genselfdiff"]
    assert info["label_names"] == names and info["label_colors"] == colors and info["mpp"] == 0.5
    # Saving again over it replaces it.
    write_labels_zarr(written, np.zeros_like(labels), meta)
    assert not np.asarray(read(written)[0][0][0]).any()


@pytest.mark.parametrize("mpp", [0.5, None])
def test_ome_zarr_writer_keeps_where_a_level_1_layer_lies(tmp_path, mpp):
    """Labels made on level 1 of a pyramid, starting at level-1 pixel (50, 25), come back where
    napari showed them: scale and translate as the widgets placed the layer over the image."""
    from napari.layers import Image

    from napari_genselfdiff._reader import read

    s = mpp or 1.0
    image = Image([np.zeros((400, 400, 3), np.uint8), np.zeros((200, 200, 3), np.uint8)], rgb=True,
                  multiscale=True, scale=(s, s), metadata={_layers.META: {"mpp": mpp}})
    scale, translate = _layers.level_transform(image, 1, origin=(50, 25))
    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 5:9] = 1
    meta = {"name": "crop", "metadata": _layers.labels_metadata(["background", "nucleus"], [[0, 0, 0], [255, 0, 0]],
                                                                **_layers.placement(image, 1, origin=(50, 25)))}
    [written] = write_labels_zarr(str(tmp_path / "crop.ome.zarr"), labels, meta)
    [(data, back, kind)] = read(written)
    np.testing.assert_allclose(back["scale"], scale)
    np.testing.assert_allclose(back["translate"], translate)
    np.testing.assert_array_equal(np.asarray(data), labels)
    info = back["metadata"][_layers.META]  # what the GeoJSON writer needs to put it back at level 0
    assert info["downsample"] == 2 and info["offset"] == [100, 50]


def test_an_unfinished_output_is_refused_in_plain_words(tmp_path):
    from genselfdiff.errors import UserError
    from genselfdiff.io.omezarr import LabelImage
    from napari_genselfdiff._reader import read

    LabelImage.create(tmp_path / "half.ome.zarr", shape=(100, 100), chunk=64, levels=1, run={"x": 1})
    with pytest.raises(UserError, match="unfinished"):
        read(str(tmp_path / "half.ome.zarr"))


def test_settings_persist_in_the_folder_the_environment_names(tmp_path, monkeypatch):
    from napari_genselfdiff.settings import Settings, settings_file

    monkeypatch.setenv("GENSELFDIFF_NAPARI_CONFIG_DIR", str(tmp_path / "cfg"))
    heard = []
    first = Settings()
    first.changed.connect(lambda key, value: heard.append((key, value)))
    first.set("model", "/models/a.pt")
    first.set("model", "/models/a.pt")  # unchanged: no second notice
    assert settings_file() == tmp_path / "cfg" / "settings.json"
    assert json.loads(settings_file().read_text()) == {"model": "/models/a.pt"}
    assert Settings().get("model") == "/models/a.pt" and Settings().get("device", "auto") == "auto"
    assert heard == [("model", "/models/a.pt")]
    settings_file().write_text("{broken")
    assert Settings().get("model") is None  # a damaged file is ignored, not fatal


def test_opening_a_geojson_and_the_sample_does_not_import_torch(tmp_path):
    """napari opens these often; torch takes seconds to import and is not needed for them."""
    from genselfdiff.io.qupath import export_geojson

    labels = np.zeros((40, 50), np.uint8)
    labels[5:20, 10:30] = 1
    export_geojson(labels, tmp_path / "objects.geojson")
    code = (
        "import sys\n"
        "from napari_genselfdiff._reader import get_geojson_reader\n"
        "from napari_genselfdiff._sample_data import make_sample\n"
        f"path = {str(tmp_path / 'objects.geojson')!r}\n"
        "[(labels, meta, kind)] = get_geojson_reader(path)(path)\n"
        "assert kind == 'labels' and labels.max() == 1, (kind, labels.max())\n"
        "assert len(make_sample((128, 128))) == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
