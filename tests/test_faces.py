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
