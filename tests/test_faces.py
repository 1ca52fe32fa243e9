"""The faces are thin: the CLI and napari turn the same choices into the same engine call."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imsave

import genselfdiff.train.finetune as finetune_module
from genselfdiff.app.cli import main
from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.train.finetune import FinetuneResult
from napari_genselfdiff._jobs import finetune_job, pretrain_job


@pytest.fixture
def captured(monkeypatch):
    """Replace the engine's finetune by one that records how it was called."""
    calls = []

    def record(images, labels, out, config, **kw):
        calls.append({"images": [str(i) for i in images], "labels": [str(m) for m in labels], "out": str(out),
                      "config": asdict(config), "pretrained": kw.get("pretrained"), "device": kw.get("device"),
                      "pixel_size": kw.get("pixel_size")})
        return FinetuneResult(path=Path(out), best_dice=0.0, per_class_dice=[], history=[], stopped=False, steps=0)

    monkeypatch.setattr(finetune_module, "finetune", record)
    return calls


def test_napari_and_cli_build_the_same_finetune_call(tmp_path, captured):
    rgb, mask = synthetic_tissue((64, 64), seed=1)
    image, labels = tmp_path / "a.png", tmp_path / "a_mask.png"
    imsave(image, rgb, check_contrast=False)
    imsave(labels, (mask > 0).astype(np.uint8), check_contrast=False)
    base, out = str(tmp_path / "base.pt"), str(tmp_path / "model.pt")

    assert main(["finetune", "--images", str(image), "--masks", str(labels), "--model", base, "--out", out,
                 "--class-names", "background,tissue", "--steps", "30", "--level", "0", "--device", "cpu"]) == 0
    # What the Fine-tune widget hands its job (widgets/finetune.py, FinetuneWidget.spec) for the same choices.
    finetune_job({"images": [str(image)], "labels": [str(labels)], "out": out, "classes": ["background", "tissue"],
                  "sparse": False, "pretrained": base, "preset": "auto", "device": "cpu",
                  "resolution": {"level": 0, "mpp": None}, "pixel_size": None,
                  "overrides": {"preview_every": 200}, "preview": None, "budget_unit": "steps", "budget": 30},
                 progress=None, should_stop=None)
    cli, napari = captured
    assert cli["config"]["preview_every"] == napari["config"]["preview_every"]  # the widget's value is the default
    assert cli == napari


def test_data_workers_are_the_engines_choice(monkeypatch):
    """Neither face picks data workers: the config leaves them to the engine, whatever the device."""
    import genselfdiff.train.pretrain as pretrain_module
    from genselfdiff.app.cli import build_parser
    from genselfdiff.app.commands.pretrain import build_config
    from genselfdiff.train.run import default_workers

    args = build_parser().parse_args(["pretrain", "x", "--out", "y.pt", "--device", "cuda"])
    assert build_config(args).workers is None
    configs = []
    monkeypatch.setattr(pretrain_module, "pretrain", lambda sources, out, config, **kw: configs.append(config))
    pretrain_job({"sources": ["x"], "out": "y.pt", "preset": "tiny", "device": "cuda"}, None, None)
    assert configs[0].workers is None
    assert default_workers("cpu") == 0 and 1 <= default_workers("cuda") <= 8


# --- the real widgets against the CLI parser ---------------------------------------------------

@pytest.fixture
def _private_settings(tmp_path, monkeypatch):
    """Never read or write the user's real settings file."""
    monkeypatch.setenv("GENSELFDIFF_NAPARI_CONFIG_DIR", str(tmp_path / "config"))


def _cli_segment_config(*options):
    from genselfdiff.app.cli import build_parser
    from genselfdiff.app.commands.segment import build_config

    return build_config(build_parser().parse_args(["segment", "model.pt", "image.png", "--out", "out", *options]))


@pytest.mark.gui
@pytest.mark.parametrize("choices, options", [
    ({}, []),  # nothing chosen: both leave every default to the engine
    ({"tile": 128, "overlap": 16, "batch": 4, "tta": True, "instances": True, "device": "cpu"},
     ["--tile", "128", "--overlap", "16", "--batch", "4", "--tta", "--instances", "--device", "cpu"]),
    ({"tile": 256, "overlap": 0}, ["--tile", "256", "--overlap", "0"]),  # 0 is an overlap, not "auto"
])
def test_segment_widget_and_cli_build_the_same_config(make_napari_viewer, _private_settings, choices, options):
    from genselfdiff.infer.config import SegmentConfig

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="image")
    _, widget = viewer.window.add_plugin_dock_widget("napari-genselfdiff", "Segment")
    widget.model.setText("model.pt")
    for name, value in choices.items():
        box = getattr(widget, name)
        if hasattr(box, "setChecked"):
            box.setChecked(value)
        elif hasattr(box, "setValue"):
            box.setValue(value)
        else:
            box.setCurrentText(value)
    spec = widget.spec()
    assert isinstance(spec["config"], SegmentConfig) and spec["model"] == "model.pt"
    assert spec["config"] == _cli_segment_config(*options)
    if not choices:
        assert spec["config"] == SegmentConfig()  # and those are the engine's defaults


@pytest.mark.gui
def test_finetune_widget_and_cli_build_the_same_config(make_napari_viewer, _private_settings, tmp_path, captured):
    """The real Fine-tune widget (strokes painted over the sample at 0.5 µm/px) and ``genselfdiff
    finetune`` with the same choices hand the engine equal FinetuneConfigs."""
    from genselfdiff import FinetuneConfig
    from genselfdiff.io.labels import default_class_names
    from napari_genselfdiff._sample_data import make_sample

    viewer = make_napari_viewer()
    (rgb, meta, _), (truth, _, _) = make_sample((128, 128))
    image = viewer.add_image(rgb, **meta)
    _, widget = viewer.window.add_plugin_dock_widget("napari-genselfdiff", "Fine-tune")
    widget.image.setCurrentText(image.name)
    widget.new_annotation_layer()
    strokes = np.where(truth > 0, 2, 1).astype(np.uint8)
    strokes[::2] = 0
    viewer.layers[-1].data = strokes
    widget.classes.setText("background, tissue")
    widget.budget.amount.setValue(30)
    base, out = str(tmp_path / "base.pt"), str(tmp_path / "model.pt")
    widget.base.setText(base)
    widget.out.setText(out)
    widget.device.setCurrentText("cpu")
    finetune_job(widget.spec(), progress=None, should_stop=None)

    imsave(tmp_path / "a.png", rgb, check_contrast=False)
    imsave(tmp_path / "a_mask.png", strokes, check_contrast=False)
    assert main(["finetune", "--images", str(tmp_path / "a.png"), "--masks", str(tmp_path / "a_mask.png"),
                 "--model", base, "--out", out, "--sparse", "--class-names", "background,tissue", "--steps", "30",
                 "--mpp", "0.5", "--pixel-size", "0.5", "--device", "cpu"]) == 0
    napari, cli = captured
    assert napari["config"] == cli["config"]
    assert (napari["pretrained"], napari["device"], napari["pixel_size"]) == (cli["pretrained"], "cpu", 0.5)
    assert napari["config"]["sparse"] and napari["config"]["class_names"] == ["background", "tissue"]
    assert napari["config"] != asdict(FinetuneConfig.from_preset("auto"))  # the choices did arrive
    # Fewer than two names typed: the names the engine gives classes nothing names.
    widget.classes.setText("nucleus")
    assert widget.class_names() == default_class_names(2) == ["background", "class 1"]
