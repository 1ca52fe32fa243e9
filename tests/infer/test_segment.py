"""Whole-slide segmentation: tiled == whole image, OME-Zarr output, resume, bad input, the CLI."""

import json

import numpy as np
import pytest
import torch

from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.errors import UserError
from genselfdiff.infer.segment import load_labels, segment, segment_batch, segment_tiles
from genselfdiff.io import omezarr
from genselfdiff.io.checkpoint import save_checkpoint
from genselfdiff.io.labels import default_colors, open_label_image
from genselfdiff.io.pixelsize import Resolution
from genselfdiff.nn.config import get_preset
from genselfdiff.nn.model import Model, load_model
from genselfdiff.nn.unet import UNet, to_segmentation

TINY = get_preset("tiny").net




def unet_model(net=None, classes=("background", "nucleus")):
    if net is None:
        torch.manual_seed(0)
        net = to_segmentation(UNet(TINY), len(classes))
    return Model(net=net.eval(), kind="segmentation", net_config=net.unet.cfg, device=torch.device("cpu"),
                 classes=list(classes), colors=default_colors(len(classes)), patch=64, amp=False)


def whole_image(net, rgb):
    x = torch.from_numpy(rgb)[None].permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return net(x).float().softmax(1)[0].numpy()




# --- tiled == whole image -------------------------------------------------------------------

def test_convolutional_network_tiled_equals_whole_image_exactly(local_model):
    model = local_model()
    rgb, _ = synthetic_tissue((200, 172), seed=2)
    whole = whole_image(model.net, rgb).argmax(0)
    # Several output chunks, several tiles per chunk, tiles cut through the image in both axes.
    result = segment(model, rgb, tile=64, overlap=16, chunk=96, skip_background=False)
    assert result.labels.shape == (200, 172) and result.tiles > 12
    assert (result.labels == whole).all()
    assert len(np.unique(whole)) == 3


@pytest.mark.slow  # ~10 s of training on 2 cores
def test_unet_tiled_matches_whole_image(trained_unet):
    model = unet_model(trained_unet)
    rgb, truth = synthetic_tissue((256, 256), seed=5, glass=0.1)
    whole = whole_image(trained_unet, rgb)
    assert (whole.argmax(0) == truth).mean() > 0.95  # the network does segment
    probs = np.full(whole.shape, np.nan, np.float32)
    for r in segment_tiles(model, rgb, tile=128, overlap=32, chunk=128, skip_background=False, probabilities=True):
        h, w = r.labels.shape
        probs[:, r.y:r.y + h, r.x:r.x + w] = r.probabilities
        assert (r.labels == r.probabilities.argmax(0)).all()
    assert r.done == r.total == 16
    assert not np.isnan(probs).any()
    # GroupNorm and attention statistics differ between a 128-px tile and the whole image,
    # so only pixels near the decision boundary may flip (measured: mean |dp| 0.006,
    # 99.5 % of labels equal, 99.8 % where the whole-image prediction is confident).
    diff = np.abs(probs - whole)[1]
    same = probs.argmax(0) == whole.argmax(0)
    confident = np.abs(whole[1] - 0.5) > 0.25
    assert diff.mean() < 0.01
    assert same.mean() > 0.99 and same[confident].mean() > 0.995


def test_bf16_inference_agrees_with_fp32(trained_unet, monkeypatch):
    """bf16 autocast (forced on, so this runs on any CPU) changes only pixels near the boundary."""
    from genselfdiff.nn import model as model_module

    rgb, truth = synthetic_tissue((256, 256), seed=5, glass=0.1)
    fp32 = unet_model(trained_unet)
    kw = dict(tile=128, overlap=32, chunk=128, skip_background=False)
    ref = segment(fp32, rgb, **kw).labels
    assert (ref == truth).mean() > 0.95  # non-trivial predictions
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    bf16 = unet_model(trained_unet)
    bf16.amp = True
    low = segment(bf16, rgb, **kw).labels
    assert not np.array_equal(bf16.predict(rgb[None, :128, :128]), fp32.predict(rgb[None, :128, :128]))  # bf16 ran
    assert (low == ref).mean() >= 0.995


def test_flip_tta_is_invariant_to_flipping_the_input_through_tiles(local_model):
    model = local_model()
    rgb, _ = synthetic_tissue((192, 192), seed=8)
    # 16 tiles in one chunk on a grid that is its own mirror image, so a flipped image is
    # cut into the flipped tiles.
    kw = dict(tile=64, overlap=16, chunk=192, skip_background=False, batch=5)
    for tta in (False, True):
        r = segment(model, rgb, tta=tta, **kw)
        assert r.tiles == 16
        for axes in ((1,), (0,), (0, 1)):
            flipped = segment(model, np.ascontiguousarray(np.flip(rgb, axes)), tta=tta, **kw).labels
            same = (np.flip(flipped, axes) == r.labels).mean()
            if tta:
                assert same == 1.0
            else:
                assert same < 0.9  # the network itself is not symmetric: the test can fail


def test_tta_result_is_the_mean_of_the_flipped_predictions(local_model):
    model = local_model()
    rgb, _ = synthetic_tissue((64, 64), seed=9)
    x = torch.from_numpy(rgb)[None].permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = sum(model.net(x.flip(d)).softmax(1).flip(d) for d in ((), (3,), (2,), (2, 3))) / 4
    assert np.allclose(model.predict(rgb[None], tta=True), want.numpy(), atol=1e-6)


# --- OME-Zarr output --------------------------------------------------------------------------

def _check_ngff(path, shape0, classes):
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    [ms] = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"] and all(a["type"] == "space" for a in ms["axes"])
    scales = []
    for k, ds in enumerate(ms["datasets"]):
        assert ds["path"] == str(k)
        [t] = ds["coordinateTransformations"]
        assert t["type"] == "scale" and len(t["scale"]) == 2
        scales.append(t["scale"][0])
        meta = json.loads((path / ds["path"] / "zarr.json").read_text())
        assert meta["dimension_names"] == ["y", "x"] and meta["data_type"] == "uint8"
        assert meta["shape"] == [-(-shape0[0] // 2**k), -(-shape0[1] // 2**k)]
    assert all(b == 2 * a for a, b in zip(scales, scales[1:]))
    label = ome["image-label"]
    assert [c["label-value"] for c in label["colors"]] == list(range(len(classes)))
    assert all(len(c["rgba"]) == 4 and all(isinstance(v, int) and 0 <= v <= 255 for v in c["rgba"])
               for c in label["colors"])
    assert [p["class"] for p in label["properties"]] == classes
    return ms


def test_pyramid_output_has_level0_shape_and_valid_ngff(tmp_path, synthetic_slide, local_model):
    path, rgb, _ = synthetic_slide  # 1024 px, levels 1024 / 512 / 256, 0.5 µm/px
    model = local_model(level=1)
    out = tmp_path / "synthetic.ome.zarr"
    r = segment(model, path, out, tile=64, overlap=16, chunk=256, skip_background=False, png=True)
    assert not r.stopped and r.level == 1 and r.downsample == 2
    assert r.labels.shape == (1024, 1024) == r.shape
    ms = _check_ngff(out, (1024, 1024), ["background", "a", "b"])
    assert ms["axes"][0]["unit"] == "micrometer" and ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]
    levels = load_labels(out)
    assert len(levels) == 2 and levels[1].shape == (512, 512)
    lab0 = np.asarray(levels[0])
    # Level 0 is the processing-level result enlarged 2x (nearest); level 1 is level 0 [::2, ::2].
    proc = segment(model, path, tile=64, overlap=16, chunk=256, skip_background=False).labels
    assert proc.shape == (512, 512)
    assert (lab0 == np.repeat(np.repeat(proc, 2, 0), 2, 1)).all()
    assert (np.asarray(levels[1]) == lab0[::2, ::2]).all()
    from skimage.io import imread

    assert r.png == tmp_path / "synthetic.png" and (imread(r.png) == lab0).all()
    assert not (out / omezarr.PROGRESS).exists()
    info = open_label_image(out)
    assert info.class_names == ["background", "a", "b"] and info.scale == (0.5, 0.5) and info.unit == "micrometer"


def test_probabilities_and_skipped_glass(tmp_path, local_model):
    model = local_model()
    rgb, _ = synthetic_tissue((192, 192), seed=3, glass=0.0)
    rgb[:, 96:] = 250  # right half is glass
    out = tmp_path / "half.ome.zarr"
    r = segment(model, rgb, out, tile=64, overlap=16, chunk=96, probabilities=True)
    assert r.skipped_tiles > 0 and r.tiles > r.skipped_tiles
    labels = np.asarray(r.labels)
    probs = np.asarray(load_labels(out)[0])  # labels level 0
    assert (probs == labels).all()
    p = zarr_array(out / "probabilities" / "0")
    assert p.shape == (3, 192, 192) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(0), 1, atol=1e-5)
    assert (p.argmax(0) == labels).all()
    assert (labels[:, 112:] == 0).all()  # glass: background without running the network
    full = segment(model, rgb, tile=64, overlap=16, chunk=96, skip_background=False)
    assert full.skipped_tiles == 0 and (full.labels[:, :80] == labels[:, :80]).all()


def zarr_array(path):
    import zarr

    return zarr.open_array(path, mode="r")[:]


# --- resume -----------------------------------------------------------------------------------

def test_stopped_run_resumes_to_the_uninterrupted_result(tmp_path, synthetic_slide, local_model):
    path = synthetic_slide[0]
    model = local_model(level=1)
    kw = dict(tile=64, overlap=16, chunk=256, skip_background=False)
    reference = segment(model, path, tmp_path / "ref.ome.zarr", **kw)
    n_chunks = reference.chunks_computed
    assert n_chunks == 16

    out = tmp_path / "run.ome.zarr"
    seen = []
    stopped = segment(model, path, out, progress=seen.append, should_stop=lambda: len(seen) >= 40, **kw)
    assert stopped.stopped and stopped.labels is None
    first = stopped.chunks_computed
    assert 0 < first < n_chunks
    # Unfinished: no multiscales, and the reader says so.
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert "ome" not in attrs and attrs["genselfdiff"]["complete"] is False
    with pytest.raises(UserError, match="unfinished"):
        load_labels(out)

    # A run killed while writing leaves a chunk without its progress file: fake one.
    import zarr

    missing = sorted(set(omezarr.LabelImage.open(out).units()) - omezarr.LabelImage.open(out).done())[0]
    zarr.open_array(out / "0", mode="r+")[missing[0] * 256:(missing[0] + 1) * 256,
                                           missing[1] * 256:(missing[1] + 1) * 256] = 7

    resumed = segment(model, path, out, **kw)
    assert not resumed.stopped
    assert resumed.chunks_resumed == first and resumed.chunks_computed == n_chunks - first
    assert resumed.tiles < reference.tiles
    for a, b in zip(load_labels(out), load_labels(tmp_path / "ref.ome.zarr")):
        assert (np.asarray(a) == np.asarray(b)).all()
    # Finished: a further run computes nothing.
    again = segment(model, path, out, **kw)
    assert again.chunks_computed == 0 and again.tiles == 0 and again.chunks_resumed == n_chunks


def test_other_settings_replace_an_old_output_but_never_a_foreign_folder(tmp_path, local_model):
    model = local_model()
    rgb, _ = synthetic_tissue((96, 96), seed=4)
    out = tmp_path / "a.ome.zarr"
    segment(model, rgb, out, tile=64, overlap=16)
    r = segment(model, rgb, out, tile=64, overlap=8)
    assert r.chunks_resumed == 0 and r.chunks_computed == 1
    foreign = tmp_path / "mine.ome.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a genselfdiff output"):
        segment(model, rgb, foreign)
    assert (foreign / "keep.txt").exists()


# --- live tiles -----------------------------------------------------------------------------

def test_segment_tiles_region_yields_only_visible_tiles(local_model):
    model = local_model()
    rgb, _ = synthetic_tissue((256, 256), seed=6)
    full = segment(model, rgb, tile=64, overlap=16, chunk=128, skip_background=False).labels
    region = (100, 30, 140, 90)
    tiles = list(segment_tiles(model, rgb, tile=64, overlap=16, chunk=128, skip_background=False, region=region))
    assert tiles and tiles[-1].done == tiles[-1].total == len(tiles) < 16
    for t in tiles:
        h, w = t.labels.shape
        assert t.y < region[2] and t.y + h > region[0] and t.x < region[3] and t.x + w > region[1]
        assert (full[t.y:t.y + h, t.x:t.x + w] == t.labels).all()
        assert t.level == 0 and t.downsample == 1


def test_stop_ends_the_generator_quietly(local_model):
    model = local_model()
    rgb, _ = synthetic_tissue((256, 256), seed=6)
    n = 0
    for n, _ in enumerate(segment_tiles(model, rgb, tile=64, overlap=16, skip_background=False,
                                        should_stop=lambda: n >= 3), 1):
        pass
    assert 3 <= n < 16


# --- bad input ----------------------------------------------------------------------------------

def test_unsupported_images_and_models_are_user_errors(tmp_path, local_model):
    model = local_model()
    with pytest.raises(UserError, match="pixel type float32"):
        segment(model, np.zeros((64, 64, 3), np.float32))
    with pytest.raises(UserError, match="2 channels"):
        segment(model, np.zeros((64, 64, 2), np.uint8))
    with pytest.raises(UserError, match="1 pyramid level.*works at level 2"):
        segment(local_model(level=2), np.zeros((64, 64, 3), np.uint8))
    pretrained = Model(net=UNet(TINY), kind="pretrained", net_config=TINY, device=torch.device("cpu"))
    with pytest.raises(UserError, match="fine-tune it first"):
        segment(pretrained, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UserError, match="Invalid tiling"):
        segment(model, np.zeros((64, 64, 3), np.uint8), tile=66)


def test_model_at_a_finer_magnification_is_refused(synthetic_slide, local_model):
    model = local_model()
    model.resolution = Resolution(mpp=0.25)  # the slide has 0.5, 1 and 2 µm/px: nothing to read 0.25 from
    with pytest.raises(UserError, match="no pyramid level near 0.25"):
        segment(model, synthetic_slide[0])


def test_a_coarser_model_reads_a_level_derived_by_block_averaging(tmp_path, synthetic_slide, local_model):
    from genselfdiff.io.slides import open_slide

    path, rgb, _ = synthetic_slide
    model = local_model()
    model.resolution = Resolution(mpp=4.0)  # the pyramid stops at 2 µm/px (256 px)
    slide = open_slide(path)
    level = slide.level_for(model.resolution)
    assert level == 3 and slide.mpp_at(level) == pytest.approx(4.0)
    assert slide.level_for(model.resolution) == level  # derived once
    lv2 = np.asarray(slide.levels[2]).astype(float)
    expected = lv2.reshape(128, 2, 128, 2, 3).mean((1, 3)).round().astype(np.uint8)
    assert np.array_equal(np.asarray(slide.levels[level]), expected)
    r = segment(model, path, tmp_path / "out.ome.zarr", tile=64, overlap=16, skip_background=False)
    assert r.downsample == 8 and r.labels.shape == (1024, 1024)
    proc = segment(model, expected, tile=64, overlap=16, skip_background=False).labels
    assert (np.asarray(r.labels) == np.repeat(np.repeat(proc, 8, 0), 8, 1)).all()


def test_single_level_image_without_scale_names_the_missing_level(tmp_path, local_model):
    from skimage.io import imsave

    imsave(tmp_path / "crop.png", np.zeros((64, 64, 3), np.uint8), check_contrast=False)
    with pytest.raises(UserError, match="crop.png has 1 pyramid level.*works at level 1"):
        segment(local_model(level=1), tmp_path / "crop.png")


# --- batch and CLI ----------------------------------------------------------------------------

def save_segmentation_checkpoint(path, kind="segmentation"):
    torch.manual_seed(0)
    if kind == "segmentation":
        net = to_segmentation(UNet(TINY), 2)
        payload = {"kind": "segmentation", "net": {**TINY.to_dict(), "out_channels": 2},
                   "state_dict": net.state_dict(), "classes": ["background", "nucleus"],
                   "colors": [[0, 0, 0], [255, 0, 0]], "config": {"patch": 64}, "resolution": {"level": 0, "mpp": None}}
    else:
        payload = {"kind": "pretrained", "net": TINY.to_dict(), "state_dict": UNet(TINY).state_dict()}
    return save_checkpoint(path, payload)


def test_segmentation_checkpoint_loads(tmp_path):
    model = load_model(save_segmentation_checkpoint(tmp_path / "seg.pt"), "cpu")
    assert model.kind == "segmentation" and model.classes == ["background", "nucleus"] and model.net.classes == 2


def _images(tmp_path):
    from skimage.io import imsave

    good, _ = synthetic_tissue((96, 80), seed=8)
    imsave(tmp_path / "good.png", good, check_contrast=False)
    from genselfdiff.app.synthetic import write_pyramidal_tiff

    tif = write_pyramidal_tiff(tmp_path / "big.ome.tif", synthetic_tissue((128, 128), seed=9)[0], min_side=64, tile=64)
    data = tif.read_bytes()
    (tmp_path / "broken.tif").write_bytes(data[: len(data) // 3])  # truncated
    return tmp_path / "good.png", tmp_path / "broken.tif"


def test_batch_reports_a_corrupt_file_and_does_the_others(tmp_path):
    good, broken = _images(tmp_path)
    model = unet_model()
    results = segment_batch(model, [broken, good], tmp_path / "out", tile=64, overlap=16)
    (b, err), (g, r) = results
    assert b == broken and isinstance(err, str) and "broken.tif" in err
    assert g == good and r.path == tmp_path / "out" / "good.ome.zarr" and r.labels.shape == (96, 80)


def test_cli_segment_exit_codes(tmp_path, capsys):
    from genselfdiff.app.cli import main

    good, broken = _images(tmp_path)
    ckpt = save_segmentation_checkpoint(tmp_path / "seg.pt")
    out = tmp_path / "out"
    assert main(["segment", str(ckpt), str(good), str(broken), "--out", str(out), "--device", "cpu",
                 "--tile", "64", "--overlap", "16", "--png"]) == 1
    err = capsys.readouterr().err
    assert "broken.tif" in err and "FAILED" in err and "1 of 2 image(s) segmented" in err
    assert (out / "good.png").exists() and len(load_labels(out / "good.ome.zarr")) == 1
    # Only bad input: one sentence, exit 2.
    assert main(["segment", str(ckpt), str(broken), "--out", str(out)]) == 2
    assert "broken.tif" in capsys.readouterr().err
    pre = save_segmentation_checkpoint(tmp_path / "pre.pt", kind="pretrained")
    assert main(["segment", str(pre), str(good), "--out", str(out)]) == 2
    assert "fine-tune it first" in capsys.readouterr().err


def test_cli_segment_tta_and_no_amp_match_the_engine(tmp_path):
    from skimage.io import imread

    from genselfdiff.app.cli import main

    good, _ = _images(tmp_path)
    ckpt = save_segmentation_checkpoint(tmp_path / "seg.pt")
    assert main(["segment", str(ckpt), str(good), "--out", str(tmp_path / "out"), "--device", "cpu", "--tile", "64",
                 "--overlap", "16", "--all-tiles", "--tta", "--no-amp", "--png"]) == 0
    model = load_model(ckpt, "cpu")
    model.amp = False
    rgb = imread(good)
    want = segment(model, rgb, tile=64, overlap=16, skip_background=False, tta=True).labels
    assert (imread(tmp_path / "out" / "good.png") == want).all()
    assert not (segment(model, rgb, tile=64, overlap=16, skip_background=False).labels == want).all()


@pytest.mark.gpu
def test_cuda_pipeline_matches_cpu(tmp_path, local_model):
    """Pinned memory, asynchronous copies, bf16 autocast: the same labels up to bf16 rounding."""
    rgb, _ = synthetic_tissue((300, 280), seed=13)
    cpu = segment(local_model(), rgb, tile=64, overlap=16, chunk=96, skip_background=False).labels
    model = local_model()
    model.net.to("cuda")
    model.device, model.amp = torch.device("cuda"), True
    gpu = segment(model, rgb, tmp_path / "gpu.ome.zarr", tile=64, overlap=16, chunk=96, skip_background=False)
    assert (np.asarray(gpu.labels) == cpu).mean() > 0.98


def test_a_tiff_missing_its_pixel_offsets_is_refused_without_tifffile_noise(tmp_path, capfd):
    """tifffile logs (not raises) unreadable tile offsets, and the file would then read as blank."""
    import tifffile

    from genselfdiff.io.slides import open_slide

    tifffile.imwrite(tmp_path / "whole.tif", np.full((512, 512, 3), 200, np.uint8), tile=(64, 64),
                     compression="zlib")
    with tifffile.TiffFile(tmp_path / "whole.tif") as tif:
        cut = tif.pages[0].tags["TileOffsets"].valueoffset + 8  # inside the tile-offset table
    (tmp_path / "cut.tif").write_bytes((tmp_path / "whole.tif").read_bytes()[:cut])
    with pytest.raises(UserError, match=r"cut.tif is damaged.*corrupt or truncated"):
        open_slide(tmp_path / "cut.tif")
    assert open_slide(tmp_path / "whole.tif").shape == (512, 512, 3)
    assert capfd.readouterr().err == ""


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    """Batches never span output chunks, so which tiles share a forward pass (which changes bf16's
    and some CPU kernels' rounding) does not depend on where a run started."""
    from genselfdiff.infer import pipeline
    from genselfdiff.nn import model as model_module

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    batches, pack = [], pipeline.Reader._pack  # (chunk, tile core) of every batch, as the reader packs them

    def recorded(self, items):
        batches.append(tuple((unit.index, t.core) for unit, t, _ in items))
        return pack(self, items)

    monkeypatch.setattr(pipeline.Reader, "_pack", recorded)
    model = unet_model()
    model.amp = True
    rgb, _ = synthetic_tissue((256, 256), seed=14, glass=0.0)
    kw = dict(tile=64, overlap=16, chunk=128, batch=4, skip_background=False, probabilities=True)
    whole = segment(model, rgb, tmp_path / "whole.ome.zarr", **kw)
    assert not whole.stopped and whole.chunks_computed == 4
    uninterrupted, batches[:] = list(batches), []
    out, seen = tmp_path / "resumed.ome.zarr", []
    # A chunk holds 9 tiles (batches of 4, 4, 1): stop inside the second chunk.
    first = segment(model, rgb, out, progress=seen.append, should_stop=lambda: len(seen) >= 13, **kw)
    assert first.stopped and first.chunks_computed == 1
    batches.clear()
    rest = segment(model, rgb, out, **kw)
    assert not rest.stopped and rest.chunks_resumed == 1 and rest.chunks_computed == 3
    assert all(len({chunk for chunk, _ in b}) == 1 for b in uninterrupted)  # no batch spans two chunks
    assert set(batches) <= set(uninterrupted)  # the resumed chunks ran in the very same batches
    for name in ("0", "probabilities/0"):
        a, b = zarr_array(tmp_path / "whole.ome.zarr" / name), zarr_array(out / name)
        assert a.tobytes() == b.tobytes(), name
