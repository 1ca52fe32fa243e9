import csv
import json
import math

import numpy as np
import pytest
from skimage.io import imsave

from genselfdiff.errors import UserError
from genselfdiff.eval.evaluate import evaluate, score_pair


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, arr)
    else:
        imsave(path, arr, check_contrast=False)
    return path


def _box(shape, r0, r1, c0, c1, value=1, dtype=np.uint8):
    a = np.zeros(shape, dtype)
    a[r0:r1, c0:c1] = value
    return a


@pytest.fixture
def folders(tmp_path):
    """a: perfect; b: Dice 0.8 (4 of 6 px); c: truth only; d: prediction only."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    _save(truth / "a.png", _box((8, 8), 2, 5, 2, 5, 255))  # a 0/255 mask
    _save(pred / "a.tif", _box((8, 8), 2, 5, 2, 5))
    _save(truth / "b.png", _box((8, 8), 0, 2, 0, 3))
    _save(pred / "b.png", _box((8, 8), 0, 2, 0, 2))
    _save(truth / "c.png", _box((8, 8), 0, 2, 0, 3))
    _save(pred / "d.png", _box((8, 8), 0, 2, 0, 3))
    return pred, truth


def test_evaluate_folders_rows_means_and_missing(folders):
    report = evaluate(*folders, scale_um=0.5)
    assert [r["image"] for r in report.rows] == ["a", "b"]
    a, b = report.rows
    assert a["dice"] == 1.0 and a["iou"] == 1.0 and a["hd95_px"] == 0.0
    assert b["dice"] == pytest.approx(0.8) and b["iou"] == pytest.approx(4 / 6)
    assert b["hd95_um"] == pytest.approx(b["hd95_px"] * 0.5)
    assert report.mean["dice"] == pytest.approx(0.9) and report.mean["iou"] == pytest.approx((1 + 4 / 6) / 2)
    assert report.missing_truth == ["d"] and report.missing_prediction == ["c"] and not report.complete
    assert "aji" not in a


def test_csv_json_and_table(folders, tmp_path):
    report = evaluate(*folders)
    report.to_csv(tmp_path / "out" / "m.csv")
    report.to_json(tmp_path / "out" / "m.json")
    rows = list(csv.DictReader(open(tmp_path / "out" / "m.csv")))
    assert [r["image"] for r in rows] == ["a", "b", "mean"]
    assert float(rows[2]["dice"]) == pytest.approx(0.9)
    doc = json.loads((tmp_path / "out" / "m.json").read_text())
    assert doc["images"] == 2 and doc["mean"]["dice"] == pytest.approx(0.9)
    assert doc["missing_truth"] == ["d"] and doc["missing_prediction"] == ["c"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.csv", "m.json"]
    table = report.table()
    assert table.splitlines()[0].split()[:3] == ["image", "dice", "iou"] and "0.8000" in table
    assert table.splitlines()[-1].startswith("mean")


def test_undefined_hd95_is_null_in_json_and_skipped_in_mean(tmp_path):
    pred, truth = tmp_path / "p", tmp_path / "t"
    _save(truth / "x.png", _box((6, 6), 1, 3, 1, 3))
    _save(pred / "x.png", np.zeros((6, 6), np.uint8))
    _save(truth / "y.png", _box((6, 6), 1, 3, 1, 3))
    _save(pred / "y.png", _box((6, 6), 1, 3, 1, 3))
    report = evaluate(pred, truth)
    assert math.isnan(report.rows[0]["hd95_px"]) and report.mean["hd95_px"] == 0.0
    assert report.mean["dice"] == 0.5
    doc = json.loads(report.to_json(tmp_path / "r.json").read_text())
    assert doc["rows"][0]["hd95_px"] is None
    assert "n/a" in report.table()


def _instances(shape, n, rng):
    """n separate 3x3 objects with distinct ids."""
    inst = np.zeros(shape, np.uint16)
    cells = [(r, c) for r in range(0, shape[0] - 3, 5) for c in range(0, shape[1] - 3, 5)]
    for i, k in enumerate(rng.choice(len(cells), n, replace=False)):
        r, c = cells[k]
        inst[r:r + 3, c:c + 3] = i + 1
    return inst


def test_instance_truth_gives_aji(tmp_path, rng):
    truth = _instances((40, 40), 20, rng)
    pred = (truth > 0).astype(np.uint8)
    pred[truth == 1] = 0  # one object missed: AJI = 19*9 / (20*9)
    _save(tmp_path / "t" / "s.tif", truth)
    _save(tmp_path / "p" / "s.png", pred)
    report = evaluate(tmp_path / "p", tmp_path / "t")
    row = report.rows[0]
    assert row["aji"] == pytest.approx(19 / 20)
    assert row["dice"] == pytest.approx(2 * 19 / 39)


def test_instances_flag_on_class_masks():
    truth = _box((10, 10), 0, 3, 0, 3)
    truth[6:9, 6:9] = 1
    pred = _box((10, 10), 0, 3, 0, 3)  # finds one of the two objects
    assert "aji" not in score_pair(pred, truth)
    assert score_pair(pred, truth, instances=True)["aji"] == pytest.approx(0.5)


def test_multiclass_columns_use_class_names():
    truth = np.array([[1, 1, 2, 2]] * 4, np.uint8)
    pred = np.array([[1, 2, 2, 2]] * 4, np.uint8)
    row = score_pair(pred, truth, class_names=["background", "tumor", "stroma"])
    assert row["dice[tumor]"] == pytest.approx(2 * 4 / 12) and row["dice[stroma]"] == pytest.approx(2 * 8 / 20)
    assert row["dice"] == pytest.approx((2 * 4 / 12 + 2 * 8 / 20) / 2)


def _write_ngff_labels(path, labels, names):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    a = g.create_array("0", shape=labels.shape, dtype=labels.dtype, chunks=(4, 4))
    a[:] = labels
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                         "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}]}],
        "image-label": {"version": "0.5", "properties": [{"label-value": k, "class": n} for k, n in enumerate(names)]},
    }


def test_ome_zarr_prediction_is_paired_by_stem(tmp_path):
    truth = np.array([[1, 1, 2, 2]] * 4, np.uint8)
    _write_ngff_labels(tmp_path / "p" / "slide.ome.zarr", truth, ["background", "tumor", "stroma"])
    _save(tmp_path / "t" / "slide.png", truth)
    report = evaluate(tmp_path / "p", tmp_path / "t")
    assert report.complete and report.rows[0]["dice[stroma]"] == 1.0 and report.mean["dice"] == 1.0


def test_shape_mismatch(tmp_path):
    _save(tmp_path / "p" / "a.png", np.zeros((4, 6), np.uint8))
    _save(tmp_path / "t" / "a.png", np.zeros((8, 12), np.uint8))
    _save(tmp_path / "p" / "b.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "t" / "b.png", np.zeros((4, 4), np.uint8))
    report = evaluate(tmp_path / "p", tmp_path / "t")
    assert [r["image"] for r in report.rows] == ["b"]
    (stem, error), = report.failures
    assert stem == "a" and "6 x 4 pixels" in error and "12 x 8" in error
    with pytest.raises(UserError, match="6 x 4 pixels"):
        evaluate(tmp_path / "p" / "a.png", tmp_path / "t" / "a.png")


def test_two_files_pair_whatever_their_names(tmp_path):
    _save(tmp_path / "slide.png", _box((8, 8), 0, 2, 0, 2))
    _save(tmp_path / "data" / "truth.png", _box((8, 8), 0, 2, 0, 3))
    report = evaluate(tmp_path / "slide.png", tmp_path / "data" / "truth.png", scale_um=0.5)
    assert report.complete and report.rows[0]["image"] == "slide"
    assert report.mean["dice"] == pytest.approx(0.8) and "hd95_um" in report.mean


def test_cli_exit_codes(folders, tmp_path, capsys):
    from genselfdiff.app.cli import main

    pred, truth = folders
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--csv", str(tmp_path / "m.csv"),
                 "--json", str(tmp_path / "m.json"), "--scale-um", "0.25"]) == 1  # c and d are unpaired
    out = capsys.readouterr()
    assert "mean" in out.out and "1 prediction(s) without a truth: d" in out.err
    assert (tmp_path / "m.csv").exists() and json.loads((tmp_path / "m.json").read_text())["scale_um"] == 0.25
    (pred / "d.png").unlink()
    (truth / "c.png").unlink()
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--instances"]) == 0
    assert "aji" in capsys.readouterr().out
    assert main(["evaluate", "--pred", str(tmp_path / "nowhere"), "--truth", str(truth)]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--pred", str(empty), "--truth", str(truth)]) == 2
