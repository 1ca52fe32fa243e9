"""Files are the old version or the complete new one: a failed write changes nothing."""

import numpy as np
import pytest

from genselfdiff.io.atomic import atomic_open, atomic_path, write_text


class Boom(Exception):
    pass


def test_a_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "sub" / "report.csv"
    write_text(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.csv"]


@pytest.mark.parametrize("interrupt", [Boom, KeyboardInterrupt])
def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, interrupt):
    target = tmp_path / "objects.geojson"
    target.write_text("old")
    with pytest.raises(interrupt):
        with atomic_open(target, "w") as f:
            f.write("half of the new")
            raise interrupt()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["objects.geojson"]


def test_the_temporary_name_keeps_the_ending_for_writers_that_choose_the_format_by_it(tmp_path):
    from skimage.io import imread, imsave

    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    with atomic_path(tmp_path / "mask.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp.name != "mask.png"
        imsave(tmp, labels, check_contrast=False)
    assert (imread(tmp_path / "mask.png") == labels).all()


def test_the_synthetic_tiff_writer_leaves_no_temporary_file_when_it_fails(tmp_path):
    from genselfdiff.app.synthetic import write_pyramidal_tiff

    target = tmp_path / "slide.ome.tif"
    target.write_bytes(b"old")
    with pytest.raises(Exception):
        write_pyramidal_tiff(target, np.zeros((64, 64, 3), np.uint8), min_side=16, tile=16, compression="no-such-codec")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["slide.ome.tif"]


def test_an_interrupted_geojson_export_keeps_the_previous_file(tmp_path):
    from genselfdiff.io.qupath import export_geojson

    labels = np.zeros((64, 64), np.uint8)
    labels[5:20, 5:20] = 1
    labels[40:60, 40:60] = 2
    target = tmp_path / "out.geojson"
    target.write_text("previous export")

    def fail_after_first_tile(p):
        raise Boom()

    with pytest.raises(Boom):
        export_geojson(labels, target, tile=32, progress=fail_after_first_tile)
    assert target.read_text() == "previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["out.geojson"]
