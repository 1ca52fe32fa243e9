"""A pixel size for every input: what the file states, what the user gives, and the default
working resolution (0.5 µm/px) that training uses when the size is known."""

import warnings

import pytest
import torch
from skimage.io import imsave

from genselfdiff.app.cli import main
from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.errors import UserError
from genselfdiff.eval.evaluate import evaluate
from genselfdiff.infer.segment import load_labels
from genselfdiff.io.checkpoint import load_checkpoint, save_checkpoint
from genselfdiff.io.pixelsize import DEFAULT_MPP, PixelSizeWarning, Resolution, resolve_pixel_size, working_resolution
from genselfdiff.io.slides import open_slide
from genselfdiff.nn.config import NetConfig
from genselfdiff.nn.unet import UNet, to_segmentation
from genselfdiff.train.patches import OpenSlide

TINY = NetConfig(width=16, mults=(1, 2, 4), heads=2, head_dim=16)


@pytest.fixture
def png(tmp_path):
    """A plain 40x-like PNG (no pixel size in the file) and its nucleus mask."""
    rgb, labels = synthetic_tissue((192, 160), seed=4, glass=0.1)
    imsave(tmp_path / "tile.png", rgb, check_contrast=False)
    imsave(tmp_path / "tile_mask.png", labels, check_contrast=False)
    return tmp_path / "tile.png", tmp_path / "tile_mask.png", rgb, labels


def _model_at(path, mpp):
    torch.manual_seed(0)
    net = to_segmentation(UNet(TINY), 2)
    return save_checkpoint(path, {
        "kind": "segmentation", "net": {**TINY.to_dict(), "out_channels": 2}, "state_dict": net.state_dict(),
        "classes": ["background", "nucleus"], "colors": [[0, 0, 0], [255, 0, 0]], "config": {"patch": 64},
        "resolution": {"level": 0, "mpp": mpp}})


# --- which size wins ---------------------------------------------------------------------------

def test_given_size_fills_in_for_files_that_state_none_and_wins_within_2x():
    assert resolve_pixel_size("a.png", None, None) == (None, None)
    assert resolve_pixel_size("a.png", None, "0.25") == (0.25, None)
    assert resolve_pixel_size("a.svs", 0.5, None) == (0.5, None)
    assert resolve_pixel_size("a.svs", 0.5, 0.52) == (0.52, None)  # within 10 %: silently
    mpp, note = resolve_pixel_size("a.svs", 0.5, 0.8)  # 1.6x: used, with a warning
    assert mpp == 0.8 and "a.svs states 0.5 µm/px" in note


def test_a_size_more_than_2x_from_the_stated_one_needs_the_override():
    with pytest.raises(UserError, match=r"^a\.svs states 0\.5 µm/px .* more than 2x apart.*--override-pixel-size"):
        resolve_pixel_size("a.svs", 0.5, 0.2)
    mpp, note = resolve_pixel_size("a.svs", 0.5, 0.2, override=True)
    assert mpp == 0.2 and note


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_bad_pixel_sizes_are_one_sentence_naming_the_file(png, value):
    with pytest.raises(UserError, match=r"given for .*tile\.png"):
        open_slide(png[0], pixel_size=value)


def test_open_slide_applies_the_given_size_to_plain_and_pyramidal_files(png, synthetic_slide):
    assert open_slide(png[0]).mpp is None
    assert open_slide(png[0], pixel_size=0.25).mpp == 0.25
    path = synthetic_slide[0]  # states 0.5 µm/px
    slide = open_slide(path, pixel_size=0.6)
    assert slide.mpp == 0.6 and slide.mpp_at(1) == pytest.approx(1.2) and len(slide.notes) == 1
    with pytest.raises(UserError, match="synthetic.ome.tif states 0.5"):
        open_slide(path, pixel_size=2.0)
    assert open_slide(path, pixel_size=2.0, override_pixel_size=True).mpp == 2.0


# --- the CLI: exit 2 and one sentence -------------------------------------------------------------

@pytest.mark.parametrize("value, words", [("abc", "is not a number"), ("-0.5", "must be a positive number")])
def test_cli_refuses_a_bad_pixel_size_with_exit_2(tmp_path, png, capsys, value, words):
    model = _model_at(tmp_path / "m.pt", 0.5)
    assert main(["segment", str(model), str(png[0]), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--pixel-size", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("genselfdiff: error:") and "tile.png" in err and words in err and "Traceback" not in err


def test_cli_refuses_a_contradiction_unless_overridden(tmp_path, png, synthetic_slide, capsys):
    path = synthetic_slide[0]
    assert main(["pretrain", str(path), "--out", str(tmp_path / "p.pt"), "--preset", "tiny", "--steps", "1",
                 "--device", "cpu", "--quiet", "--pixel-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "synthetic.ome.tif states 0.5 µm/px" in err and "--override-pixel-size" in err


def test_evaluate_takes_the_pixel_size_and_refuses_a_bad_one(tmp_path, png, capsys):
    _, mask, _, labels = png
    assert main(["evaluate", "--pred", str(mask), "--truth", str(mask), "--pixel-size", "zero"]) == 2
    assert "tile_mask.png" in capsys.readouterr().err
    report = evaluate(mask, mask, pixel_size="0.25")
    assert report.scale_um == 0.25 and report.rows[0]["dice"] == 1.0


def test_evaluate_compares_at_the_truths_size(tmp_path, png):
    from genselfdiff.io.omezarr import LabelImage

    _, mask, _, labels = png  # the truth, at 0.25 µm/px
    half = labels[1::2, 1::2]  # the same field at 0.5 µm/px, as OME-Zarr stating it
    out = LabelImage.create(tmp_path / "tile.ome.zarr", shape=half.shape, chunk=128, levels=1, run={})
    for index in out.units():
        out.write(index, half[index[0] * 128:(index[0] + 1) * 128, index[1] * 128:(index[1] + 1) * 128])
    out.finish("tile", ["background", "nucleus"], [[0, 0, 0], [255, 0, 0]], 0.5)
    report = evaluate(tmp_path / "tile.ome.zarr", mask, pixel_size=0.25)
    assert 0.8 < report.rows[0]["dice"] < 1.0
    with pytest.raises(UserError, match="truth's resolution"):  # without the truth's size: no guessing
        evaluate(tmp_path / "tile.ome.zarr", mask)


# --- segmenting at the model's µm/px ------------------------------------------------------------

def test_a_40x_png_is_segmented_at_the_models_05_um_and_labelled_at_its_own_size(tmp_path, png, capsys):
    image, _, rgb, _ = png
    model = _model_at(tmp_path / "m.pt", 0.5)
    out = tmp_path / "out"
    assert main(["segment", str(model), str(image), "--out", str(out), "--device", "cpu", "--all-tiles",
                 "--pixel-size", "0.25", "--png"]) == 0
    assert load_labels(out / "tile.ome.zarr")[0].shape == rgb.shape[:2]
    assert "unknown" not in capsys.readouterr().err

    from genselfdiff.infer.segment import segment
    from genselfdiff.nn.model import load_model

    result = segment(load_model(model, "cpu"), image, pixel_size=0.25, skip_background=False)
    assert result.downsample == 2 and result.labels.shape == (96, 80)  # processed at 0.5 µm/px


def test_an_image_of_unknown_size_gets_one_line_saying_how_to_give_it(tmp_path, png, capsys):
    image = png[0]
    model = _model_at(tmp_path / "m.pt", 0.5)
    assert main(["segment", str(model), str(image), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(lines) == 1 and "--pixel-size" in lines[0] and "0.25" in lines[0] and "tile.png" in lines[0]


# --- training at the default working resolution -------------------------------------------------

def test_default_working_resolution_is_05_um_when_the_size_is_known(png, synthetic_slide):
    assert working_resolution(None) == Resolution(0, DEFAULT_MPP) and DEFAULT_MPP == 0.5
    assert working_resolution(Resolution(level=1)) == Resolution(level=1)
    at_40x = OpenSlide(png[0], 32, working_resolution(None), opening={"pixel_size": 0.25})
    assert (at_40x.level, at_40x.read) == (0, 64)  # 64 px at 0.25 µm/px become one 32-px patch
    unknown = OpenSlide(png[0], 32, working_resolution(None))
    assert (unknown.level, unknown.read) == (0, 32)  # full resolution


def test_finetune_learns_at_05_um_from_a_40x_png_and_its_full_size_mask(tmp_path, png):
    from genselfdiff.train.finetune import FinetuneConfig, finetune

    image, mask, _, _ = png
    cfg = FinetuneConfig.from_preset("tiny", patch=32, batch=2, steps=2, steps_per_epoch=2, val_fraction=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeWarning)  # the size is known: nothing to say
        finetune([image], [mask], tmp_path / "seg.pt", cfg, device="cpu", pixel_size=0.25)
    assert load_checkpoint(tmp_path / "seg.pt")["resolution"] == {"level": 0, "mpp": 0.5}

    with pytest.warns(PixelSizeWarning, match="pixel size of .*tile.png is unknown.*--pixel-size"):
        finetune([image], [mask], tmp_path / "full.pt", cfg, device="cpu")
    assert load_checkpoint(tmp_path / "full.pt")["resolution"] == {"level": 0, "mpp": None}


def test_pretrain_records_the_default_working_resolution(tmp_path, png, capsys):
    args = ["pretrain", str(png[0]), "--preset", "tiny", "--patch", "32", "--batch", "2", "--steps", "1",
            "--val-every", "0", "--warmup", "0", "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a.pt"), "--pixel-size", "0.25"]) == 0
    assert load_checkpoint(tmp_path / "a.pt")["resolution"] == {"level": 0, "mpp": 0.5}
    assert "warning" not in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.pt")]) == 0
    assert load_checkpoint(tmp_path / "b.pt")["resolution"] == {"level": 0, "mpp": None}
    assert "genselfdiff: warning: The pixel size of" in capsys.readouterr().err
