"""segment --instances: objects written beside the class labels, seamless across tiles and chunks."""

import csv

import numpy as np
import pytest
import torch
from skimage.io import imread, imsave

from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.errors import UserError
from genselfdiff.infer.segment import segment
from genselfdiff.io import omezarr
from genselfdiff.io.labels import open_label_image
from genselfdiff.objects.output import write_objects
from genselfdiff.objects.request import ObjectRequest, object_request
from genselfdiff.objects.split import first_pixel_order, split_objects


def save_segmentation_checkpoint(path):
    from genselfdiff.io.checkpoint import save_checkpoint
    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.unet import UNet, to_segmentation

    tiny = get_preset("tiny").net
    torch.manual_seed(0)
    net = to_segmentation(UNet(tiny), 2)
    return save_checkpoint(path, {"kind": "segmentation", "net": {**tiny.to_dict(), "out_channels": 2},
                                  "state_dict": net.state_dict(), "classes": ["background", "nucleus"],
                                  "colors": [[0, 0, 0], [255, 0, 0]], "config": {"patch": 64},
                                  "resolution": {"level": 0, "mpp": None}})


def same_partition(a, b) -> bool:
    return bool((first_pixel_order(np.asarray(a)) == first_pixel_order(np.asarray(b))).all())


def test_tiled_chunked_objects_equal_the_whole_image_split(tmp_path, local_model):
    model = local_model()
    rgb, _ = synthetic_tissue((200, 172), seed=2)
    whole = segment(model, rgb, skip_background=False, instances=True)  # one tile: the untiled result
    r = segment(model, rgb, tmp_path / "x.ome.zarr", tile=64, overlap=16, chunk=96, skip_background=False,
                instances=True, png=True)
    labels = np.asarray(r.labels)
    assert (labels == whole.labels).all()
    ids = np.asarray(r.objects.ids)
    assert ids.dtype == np.uint32 and ids.shape == (200, 172)
    # Objects lie on foreground classes (fragments too small to be an object on their own are dropped).
    assert (labels[ids > 0] > 0).all() and (ids > 0).any()
    # The same objects as one split of the whole image, class by class.
    want = np.zeros(labels.shape, np.int64)
    for k in (1, 2):
        split = split_objects(None, labels == k, mpp=None).astype(np.int64)
        want = np.where(split > 0, split + want.max(), want)
    assert same_partition(ids, want) and same_partition(whole.objects.ids, want)
    # Several chunks, and objects cut by a chunk border keep one id (global first-pixel ids).
    assert np.intersect1d(ids[95, :], ids[96, :]).size > 1
    assert sum(r.objects.counts.values()) == int(whole.objects.ids.max()) == np.unique(ids[ids > 0]).size
    # NGFF label image beside the class labels, PNG 1..n, summary CSV.
    inst = open_label_image(tmp_path / "x.ome.zarr" / "instances")
    assert inst.array.dtype == np.uint32 and len(inst.levels) == len(open_label_image(r.path).levels)
    png = imread(tmp_path / "x_instances.png")
    assert png.shape == (200, 172) and (png == first_pixel_order(ids)).all()
    rows = list(csv.DictReader(open(tmp_path / "x_objects.csv")))
    assert {row["class"]: int(row["objects"]) for row in rows} == r.objects.counts
    assert all(row["objects_per_mm2"] == "" for row in rows)  # no pixel size: no density


def finished_labels(out, truth):
    """A finished class-label output of ``truth`` (nucleus = 1) in 64-px chunks, as segment leaves one."""
    image = omezarr.LabelImage.create(out, shape=truth.shape, chunk=64, levels=2, run={})
    for i, j in image.units():
        image.write((i, j), truth[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64].astype(np.uint8))
    image.finish("t", ["background", "nucleus"], [(0, 0, 0), (255, 0, 0)], 0.5)
    return out


def test_objects_pass_is_seamless_with_a_small_halo_and_counts_density(tmp_path):
    from genselfdiff.app.synthetic import synthetic_tissue

    _, truth = synthetic_tissue((256, 256), seed=3)
    out = finished_labels(tmp_path / "t.ome.zarr", truth)
    request = ObjectRequest((1,), ("nucleus",), halo_um=16.0)
    res = write_objects(out, request, mpp=0.5)
    assert same_partition(res.ids, split_objects(None, truth == 1, mpp=0.5))
    assert res.counts["nucleus"] == int(split_objects(None, truth == 1, mpp=0.5).max()) > 5
    # A finished pass made with the same request is kept.
    before = (out / "instances" / "zarr.json").stat().st_mtime_ns
    assert write_objects(out, request, mpp=0.5).counts == res.counts
    assert (out / "instances" / "zarr.json").stat().st_mtime_ns == before


def test_a_stopped_objects_pass_leaves_nothing_finished_looking_and_a_rerun_redoes_it(tmp_path):
    _, truth = synthetic_tissue((192, 192), seed=4)
    out = finished_labels(tmp_path / "t.ome.zarr", truth)
    request = ObjectRequest((1,), ("nucleus",), halo_um=16.0)
    asked = []

    def stop_after_four_chunks():
        asked.append(1)
        return len(asked) > 4

    stopped = write_objects(out, request, mpp=0.5, png_max_pixels=10**6, should_stop=stop_after_four_chunks)
    assert stopped.path is None and "stopped" in stopped.notes[0]
    with pytest.raises(UserError):  # the metadata comes last: 4 of 9 chunks do not look like a result
        open_label_image(out / "instances")
    assert not (tmp_path / "t_instances.png").exists() and not (tmp_path / "t_objects.csv").exists()
    done = write_objects(out, request, mpp=0.5, png_max_pixels=10**6)
    want = split_objects(None, truth == 1, mpp=0.5)
    assert same_partition(done.ids, want) and same_partition(open_label_image(out / "instances").array, want)
    assert (imread(tmp_path / "t_instances.png") == first_pixel_order(np.asarray(done.ids))).all()
    rows = list(csv.DictReader(open(tmp_path / "t_objects.csv")))
    assert int(rows[0]["objects"]) == done.counts["nucleus"] == int(want.max())


def test_instances_of_and_models_without_foreground_are_one_sentence(local_model):
    model = local_model()
    assert object_request(model, ["B"]).classes == (2,)
    assert object_request(model).names == ("a", "b")
    with pytest.raises(UserError, match="no foreground class 'nuclei'.*its classes are a, b"):
        object_request(model, ["nuclei"])
    with pytest.raises(UserError, match="no foreground class 'background'"):
        object_request(model, ["background"])
    model.classes = ["background"]
    with pytest.raises(UserError, match="no foreground class to split"):
        object_request(model)


def test_cli_segment_instances_writes_zarr_png_and_summary_and_refuses_bad_names(tmp_path, capsys):
    from genselfdiff.app.cli import main

    rgb, _ = synthetic_tissue((96, 80), seed=8)
    imsave(tmp_path / "good.png", rgb, check_contrast=False)
    ckpt = save_segmentation_checkpoint(tmp_path / "seg.pt")
    out = tmp_path / "out"
    args = ["segment", str(ckpt), str(tmp_path / "good.png"), "--out", str(out), "--device", "cpu",
            "--tile", "64", "--overlap", "16", "--all-tiles", "--png", "--pixel-size", "0.5"]
    assert main(args + ["--instances-of", "Nucleus"]) == 0
    assert "objects: " in capsys.readouterr().err
    labels = imread(out / "good.png")
    ids = imread(out / "good_instances.png")
    assert ids.shape == labels.shape == (96, 80) and (labels[ids > 0] == 1).all() and ids.max() > 0
    assert np.array_equal(np.unique(ids), np.arange(ids.max() + 1))  # 0 and 1..n
    inst = open_label_image(out / "good.ome.zarr" / "instances")
    assert same_partition(inst.array, ids) and inst.array.dtype == np.uint32
    rows = list(csv.DictReader(open(out / "good_objects.csv")))
    assert rows[0]["class"] == "nucleus" and int(rows[0]["objects"]) == ids.max()
    assert float(rows[0]["tissue_mm2"]) > 0 and float(rows[0]["objects_per_mm2"]) > 0
    # One QuPath detection per object, with its class and measurements; import-geojson reads them back.
    from genselfdiff.io.qupath import read_geojson
    from genselfdiff.io.rasterize import read_geojson_labels

    geo = tmp_path / "objects.geojson"
    assert main(["export-geojson", str(out / "good.ome.zarr"), "--out", str(geo), "--objects"]) == 0
    objects, warnings = read_geojson(geo)
    assert len(objects) == ids.max() and not warnings
    assert {o.object_type for o in objects} == {"detection"} and {o.name for o in objects} == {"nucleus"}
    import json
    props = json.loads(geo.read_text())["features"][0]["properties"]
    assert {"Area µm^2", "Perimeter µm", "Circularity", "Hematoxylin OD mean"} <= set(props["measurements"])
    back, names, _ = read_geojson_labels(geo, ids.shape)
    assert names == ["background", "nucleus"] and ((back > 0) == (ids > 0)).mean() > 0.9
    # Bad input: one sentence naming the model, exit 2, nothing segmented.
    assert main(args[:5] + ["--out", str(tmp_path / "bad"), "--instances-of", "gland"]) == 2
    err = capsys.readouterr().err
    assert "seg.pt has no foreground class 'gland'" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_evaluate_scores_the_objects_of_segment_instances(tmp_path, capsys):
    from genselfdiff.app.cli import main

    # 16 pairs of touching squares (an instance map: more than 16 ids): 16 clumps in the class map.
    truth = np.zeros((40, 40), np.uint16)
    for n, (i, j, d) in enumerate((i, j, d) for i in range(4) for j in range(4) for d in (0, 4)):
        truth[2 + 10 * i: 6 + 10 * i, 1 + 10 * j + d: 5 + 10 * j + d] = n + 1
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    imsave(tmp_path / "truth" / "x.png", truth, check_contrast=False)
    imsave(tmp_path / "pred" / "x.png", (truth > 0).astype(np.uint8), check_contrast=False)
    imsave(tmp_path / "pred" / "x_instances.png", truth, check_contrast=False)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--instances",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    for column in ("aji", "pq", "dq", "sq", "object_f1", "object_dice", "count_error"):
        assert column in out
    import json
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["aji"] == row["pq"] == row["object_f1"] == row["object_dice"] == 1.0 and row["count_error"] == 0.0
    # Without the instance image each touching pair is one object, matching neither square (IoU 0.5).
    (tmp_path / "pred" / "x_instances.png").unlink()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--instances",
                 "--json", str(tmp_path / "r.json")]) == 0
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["count_error"] == 0.5 and row["dq"] == 0.0 and row["aji"] == pytest.approx(0.5)
