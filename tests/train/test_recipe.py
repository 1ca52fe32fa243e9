"""The official recipe: its network, initialisation, augmentation, configs and both training runs."""

import math

import numpy as np
import pytest
import torch

from genselfdiff.errors import UserError
from genselfdiff.io.checkpoint import load_checkpoint, save_checkpoint
from genselfdiff.nn.config import NetConfig, get_preset
from genselfdiff.nn.model import load_model, to_input
from genselfdiff.nn.unet import UNet
from genselfdiff.train.augment import augment
from genselfdiff.train.config import FinetuneConfig, PretrainConfig
from genselfdiff.train.finetune import finetune
from genselfdiff.train.recipe import OFFICIAL, official_augment, official_init

TINY = get_preset("tiny").net


def test_official_fine_tuning_keeps_everything_but_the_final_block_and_head():
    torch.manual_seed(0)
    pre = UNet(TINY).state_dict()  # our pretrained network: its final block has a time input
    assert any(k.startswith("final.time.") for k in pre)
    torch.manual_seed(1)
    net = OFFICIAL.segmentation_net(TINY, 3, pre)
    state = net.unet.state_dict()
    for name, value in pre.items():
        if not name.startswith(("final.", "head.")):
            assert torch.equal(state[name], value), name
    assert not any(k.startswith("final.time.") for k in state)  # no time input, as the official block
    assert net.unet.cfg.final_time is False and net.classes == 3
    # Fresh, N(0, 0.01): neither the pretrained final block nor PyTorch's default initialisation.
    w = state["final.block1.conv.weight"]
    assert not torch.equal(w, pre["final.block1.conv.weight"])
    assert 0.007 < w.std().item() < 0.013 and 0.007 < state["head.weight"].std().item() < 0.013
    assert 0.007 < state["final.block1.norm.weight"].std().item() < 0.013  # GroupNorm weights too


def test_official_init_draws_conv_and_norm_weights_only():
    torch.manual_seed(0)
    net = official_init(UNet(TINY))
    assert 0.009 < net.stem.weight.std().item() < 0.011
    assert abs(net.downs[0].res1.block1.norm.weight.mean().item()) < 0.01  # not GroupNorm's ones
    default = torch.nn.Linear(net.time.width, 4 * net.time.width).weight.std().item()
    assert net.time.mlp[0].weight.std().item() == pytest.approx(default, rel=0.2)  # linear layers untouched


def test_official_blur_is_torchvisions_3x3_with_sigma_x_1_and_y_2():
    image = np.zeros((9, 9, 3), np.uint8)
    image[4, 4] = 255
    labels = np.zeros((9, 9), np.int64)
    cfg = official_augment()
    cfg.flips, cfg.color = False, 0.0
    cfg.blur = 1.0
    out, lab = augment(image, labels, np.random.default_rng(0), cfg)

    def kernel(sigma):  # torchvision's _get_gaussian_kernel1d for size 3
        k = np.exp(-0.5 * (np.arange(-1, 2) / sigma) ** 2)
        return k / k.sum()

    want = 255 * np.outer(kernel(2.0), kernel(1.0))  # rows (y) sigma 2, columns (x) sigma 1
    got = out[3:6, 3:6, 0].astype(float)
    assert np.abs(got - want).max() <= 1.0  # uint8 rounding
    assert got[0, 1] > got[1, 0]  # the wider blur runs down the rows
    assert out[:3].sum() == 0 and np.array_equal(lab, labels)


def test_official_configs_and_what_the_caller_still_chooses():
    ft = FinetuneConfig.from_preset("tiny", recipe="official", steps=5)
    assert (ft.loss, ft.epochs, ft.patience, ft.amp, ft.grad_clip, ft.betas) == ("official", 150, 0, False, 0.0, (0.5, 0.999))
    assert not ft.augment.rotate90 and not ft.augment.elastic and ft.augment.blur_fixed and ft.steps == 5
    assert FinetuneConfig.from_dict(ft.to_dict()) == ft
    assert FinetuneConfig.from_preset("tiny", recipe="official", epochs=3).epochs == 3
    pre = PretrainConfig.from_preset("tiny", recipe="official", net=TINY)
    assert pre.net.final_time is False and (pre.ema_decay, pre.grad_clip, pre.warmup_steps, pre.amp) == (0, 0, 0, False)
    assert PretrainConfig.from_dict(pre.to_dict()) == pre
    assert PretrainConfig.from_preset("tiny").net.final_time is True  # the default recipe is unchanged


def test_unknown_recipe_is_a_user_error(tmp_path, synthetic_pair):
    img, truth = synthetic_pair
    with pytest.raises(UserError, match="recipe"):
        finetune([img], [truth], tmp_path / "x.pt", FinetuneConfig.from_preset("tiny", recipe="nope"), device="cpu")


def test_official_finetuning_records_0_1_inputs_and_keeps_the_lowest_validation_loss(tmp_path, synthetic_pair):
    img, truth = synthetic_pair
    torch.manual_seed(0)
    pre = tmp_path / "pre.pt"
    save_checkpoint(pre, {"kind": "pretrained", "net": TINY.to_dict(), "state_dict": UNet(TINY).state_dict(),
                          "config": {"preset": "tiny"}})
    cfg = FinetuneConfig.from_preset("tiny", recipe="official", patch=64, batch=4, steps=12, steps_per_epoch=4,
                                     class_names=["background", "nucleus"])
    result = finetune([img], [truth], tmp_path / "seg.pt", cfg, pretrained=pre, device="cpu")
    vals = [h for h in result.history if "val_loss" in h]
    assert len(vals) == 4 and all(math.isfinite(h["val_loss"]) for h in vals)
    best = min(vals, key=lambda h: h["val_loss"])
    assert result.best_step == best["step"]
    ckpt = load_checkpoint(result.path)
    assert ckpt["normalization"] == "[0, 1]" and ckpt["net"]["final_time"] is False
    model = load_model(result.path, "cpu")
    assert model.normalization == "[0, 1]"
    # The model scales its input the way it was trained: [0, 1], not [-1, 1].
    x = to_input(img[None, :64, :64], "cpu", model.normalization)
    with torch.no_grad():
        want = model.net(x).float().softmax(1).numpy()
    assert np.allclose(model.predict(img[None, :64, :64]), want, atol=1e-6)
    assert x.min() >= 0 and x.max() <= 1


def test_official_pretraining_has_no_ema_and_a_final_block_without_time(tmp_path):
    from skimage.io import imsave

    from genselfdiff.app.synthetic import synthetic_tissue
    from genselfdiff.train.pretrain import pretrain

    for i in range(2):
        imsave(tmp_path / f"t{i}.png", synthetic_tissue((96, 96), seed=i, glass=0.1)[0], check_contrast=False)
    cfg = PretrainConfig.from_preset("tiny", recipe="official", patch=32, batch=4, steps=3, val_every=0, val_batches=1)
    result = pretrain([tmp_path], tmp_path / "m.pt", cfg, device="cpu")
    ckpt = load_checkpoint(result.path)
    assert "ema_state_dict" not in ckpt and NetConfig.from_dict(ckpt["net"]).final_time is False
    assert not any(k.startswith("final.time.") for k in ckpt["state_dict"])
    assert ckpt["config"]["recipe"] == "official" and math.isfinite(result.history[-1]["loss"])


def test_a_recipe_is_one_object_that_both_configs_follow():
    from dataclasses import asdict

    from genselfdiff.train.recipe import DEFAULT, OFFICIAL, get_recipe

    # The configs' defaults are the default recipe's values; from_preset takes a recipe's values.
    for config, values in ((FinetuneConfig(), DEFAULT.finetune_fields()), (PretrainConfig(), DEFAULT.pretrain_fields())):
        assert {k: getattr(config, k) for k in values} == values
    ft, pre = FinetuneConfig.from_preset("tiny", recipe="official"), PretrainConfig.from_preset("tiny", recipe="official")
    assert all(getattr(ft, k) == v for k, v in OFFICIAL.finetune_fields().items())
    assert all(getattr(pre, k) == v for k, v in OFFICIAL.pretrain_fields().items())
    assert asdict(ft.augment) == asdict(official_augment()) and ft.augment is not OFFICIAL.augment  # a copy each
    assert (OFFICIAL.normalization, DEFAULT.normalization) == ("[0, 1]", "[-1, 1]")
    assert OFFICIAL.net_config(TINY).final_time is False and DEFAULT.net_config(TINY) is TINY
    with pytest.raises(UserError, match="Unknown recipe 'nope'; choose one of default, official"):
        get_recipe("nope")
