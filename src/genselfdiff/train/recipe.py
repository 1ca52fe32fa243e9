"""The official recipe: each choice of the official GenSelfDiff-HIS code where ours differs.

Read from suhas-srinath/GenSelfDiff-HIS at HEAD (GenSelfDiff/pretrain/SS_diff.py, utils.py,
model.py; GenSelfDiff/downstream_train/Diff_Seg.py, losses.py, model.py;
GenSelfDiff/test/test_script.py). ``recipe="official"`` in :class:`~genselfdiff.train.config.PretrainConfig`
and :class:`~genselfdiff.train.finetune.FinetuneConfig` (``--recipe official`` on the command
line) reproduces them; ``"default"`` is our documented recipe.

Both phases: conv, transposed-conv and GroupNorm weights drawn from N(0, 0.01)
(:func:`official_init`; biases and linear layers keep PyTorch's defaults), fp32, Adam at
1e-4, batch 8, no EMA, gradient clipping or warm-up; the final residual block has no
time input (``NetConfig.final_time`` False).

Pretraining: inputs in [-1, 1], flips only, the P2 loss summed over the batch (we average;
under Adam nearly the same step), 100 epochs over a fixed set of patches keeping the best
validation loss (its early-stopping patience of 15 is counted but never stops the loop).
A stream of patches from slides has no epochs, so the budget stays --steps / --minutes.

Fine-tuning: every ``final_conv.*`` weight is dropped from the pretrained checkpoint, so
the final residual block and the 1x1 head start fresh (:func:`official_segmentation_net`);
inputs in [0, 1] (not the [-1, 1] of pretraining; the model records it, so ``segment``
and napari scale the same way); structural-similarity loss with one batch-mean
cross-entropy (:func:`genselfdiff.train.losses.ss_loss_official`) plus focal; Adam betas
(0.5, 0.999); flips, a 3x3 Gaussian blur with sigma x = 1, y = 2 at p 0.3 and colour
jitter (brightness 0.5, contrast 0.4) at p 0.3, nothing else; 150 epochs, the best
validation *loss* kept, never stopped early.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from torch import nn

from ..errors import UserError
from ..nn.config import NetConfig
from ..nn.unet import SegmentationNet, UNet, to_segmentation
from .augment import Augment

RECIPES = ("default", "official")
OFFICIAL_FINETUNE_EPOCHS = 150
NORMALIZATIONS = {"default": "[-1, 1]", "official": "[0, 1]"}  # fine-tuning and segmentation inputs


def check_recipe(name: str) -> str:
    if name not in RECIPES:
        raise UserError(f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    return name


def official_init(module: nn.Module) -> nn.Module:
    """N(0, 0.01) for the weights of every convolution and normalisation layer, as the official code."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 0.0, 0.01)
    return module


def official_augment() -> Augment:
    """Flips, blur 3x3 sigma (x 1, y 2) at p 0.3, jitter (brightness 0.5, contrast 0.4) at p 0.3."""
    return Augment(flips=True, rotate90=False, blur=0.3, blur_sigma=(1.0, 2.0), blur_fixed=True, color=0.3,
                   brightness=0.5, contrast=0.4, saturation=0.0, elastic=0.0, hed=0.0)


def official_pretrain_fields() -> dict:
    """PretrainConfig values of the official recipe (the caller's explicit choices still win)."""
    return dict(lr=1e-4, batch=8, ema_decay=0.0, grad_clip=0.0, warmup_steps=0, amp=False, recipe="official")


def official_finetune_fields() -> dict:
    """FinetuneConfig values of the official recipe (the caller's explicit choices still win)."""
    return dict(lr=1e-4, betas=(0.5, 0.999), batch=8, loss="official", ss_weight=1.0, focal_weight=1.0,
                ss_beta=0.1, ss_c=0.01, focal_gamma=2.0, epochs=OFFICIAL_FINETUNE_EPOCHS, patience=0,
                augment=official_augment(), grad_clip=0.0, lr_schedule="constant", amp=False, affinity=0.0, prior=0.0,
                recipe="official")


def official_segmentation_net(net_cfg: NetConfig, classes: int, pretrained: Optional[dict] = None) -> SegmentationNet:
    """The official fine-tuning network: N(0, 0.01) initialisation, then every pretrained weight
    except the final residual block and the head (which start fresh, the block without time input)."""
    unet = official_init(UNet(replace(net_cfg, final_time=False)))
    if pretrained is not None:
        kept = {k: v for k, v in pretrained.items() if not k.startswith(("final.", "head."))}
        missing, unexpected = unet.load_state_dict(kept, strict=False)
        if unexpected or any(not k.startswith(("final.", "head.")) for k in missing):
            raise KeyError(f"pretrained weights do not fit: missing {missing}, unexpected {unexpected}")
    net = to_segmentation(unet, classes)
    official_init(net.unet.head)
    return net
