"""Presets: what "auto" resolves to, and that a run records the resolved preset."""

import pytest
import torch

from genselfdiff.errors import UserError
from genselfdiff.nn import config
from genselfdiff.nn.config import CPU_AUTO_PRESET, PRESETS, get_preset, resolve_preset, with_preset
from genselfdiff.train.config import PretrainConfig


def test_auto_is_the_paper_network_on_cuda_and_the_measured_preset_on_a_cpu():
    assert CPU_AUTO_PRESET in PRESETS
    assert resolve_preset("auto", torch.device("cuda")) == "paper"
    assert resolve_preset("auto", torch.device("cpu")) == CPU_AUTO_PRESET
    assert resolve_preset("auto", "cpu", base="small") == "small"  # fine-tuning: the base model's
    assert resolve_preset("tiny", torch.device("cuda"), base="small") == "tiny"  # a named preset is itself
    with pytest.raises(UserError, match="Unknown preset 'huge'"):
        resolve_preset("huge", "cpu")


def test_auto_is_the_default_and_fills_only_what_was_left_open(monkeypatch):
    monkeypatch.setattr(config, "CPU_AUTO_PRESET", "small")
    assert PretrainConfig().preset == "auto"
    cfg = with_preset(PretrainConfig.from_preset("auto", batch=3, net={"width": 48}), torch.device("cpu"))
    small = get_preset("small")
    assert (cfg.preset, cfg.patch, cfg.batch) == ("small", small.patch, 3)
    assert cfg.net.width == 48 and cfg.net.mults == small.net.mults
    assert with_preset(PretrainConfig(), torch.device("cuda")).net == get_preset("paper").net
