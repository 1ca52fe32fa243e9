"""The recipes: every choice where the official GenSelfDiff-HIS code and ours differ, as one object each.

Read from suhas-srinath/GenSelfDiff-HIS at HEAD (GenSelfDiff/pretrain/SS_diff.py, utils.py,
model.py; GenSelfDiff/downstream_train/Diff_Seg.py, losses.py, model.py;
GenSelfDiff/test/test_script.py). A :class:`Recipe` is named by ``recipe`` in
:class:`~genselfdiff.train.config.PretrainConfig` and
:class:`~genselfdiff.train.config.FinetuneConfig` (``--recipe`` on the command line):
:data:`DEFAULT` is our documented recipe, :data:`OFFICIAL` reproduces the official code. The
configs take their defaults from :data:`DEFAULT` and ``from_preset(recipe="official")`` the
values of :data:`OFFICIAL`; the training code asks the recipe the rest (the initialisation,
the network's final block, the input scaling, which pretrained weights start fresh, what
fine-tuning keeps), so no other module tests a recipe's name.

The official recipe, both phases: conv, transposed-conv and GroupNorm weights drawn from
N(0, 0.01) (:func:`official_init`; biases and linear layers keep PyTorch's defaults), fp32,
Adam at 1e-4, batch 8, no EMA, gradient clipping or warm-up; the final residual block has no
time input (``NetConfig.final_time`` False).

Pretraining: inputs in [-1, 1], flips only, the P2 loss summed over the batch (we average;
under Adam nearly the same step), 100 epochs over a fixed set of patches keeping the best
validation loss (its early-stopping patience of 15 is counted but never stops the loop).
A stream of patches from slides has no epochs, so the budget stays --steps / --minutes.

Fine-tuning: every ``final_conv.*`` weight is dropped from the pretrained checkpoint, so
the final residual block and the 1x1 head start fresh (:meth:`Recipe.segmentation_net`);
inputs in [0, 1] (not the [-1, 1] of pretraining; the model records it, so ``segment``
and napari scale the same way); structural-similarity loss with one batch-mean
cross-entropy (:func:`genselfdiff.train.losses.ss_loss_official`) plus focal; Adam betas
(0.5, 0.999); flips, a 3x3 Gaussian blur with sigma x = 1, y = 2 at p 0.3 and colour
jitter (brightness 0.5, contrast 0.4) at p 0.3, nothing else; 150 epochs, the best
validation *loss* kept, never stopped early.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from torch import nn

from ..errors import UserError
from ..nn.config import NetConfig
from ..nn.unet import SegmentationNet, continued_net, normal_init, segmentation_net, set_geometry
from .augment import Augment

OFFICIAL_INIT_STD = 0.01  # the official code draws conv and norm weights from N(0, 0.01)


def official_init(module: nn.Module) -> nn.Module:
    """N(0, 0.01) for the weights of every convolution and normalisation layer, as the official code."""
    return normal_init(module, OFFICIAL_INIT_STD)


def official_augment() -> Augment:
    """Flips, blur 3x3 sigma (x 1, y 2) at p 0.3, jitter (brightness 0.5, contrast 0.4) at p 0.3."""
    return Augment(flips=True, rotate90=False, blur=0.3, blur_sigma=(1.0, 2.0), blur_fixed=True, color=0.3,
                   brightness=0.5, contrast=0.4, saturation=0.0, elastic=0.0, hed=0.0)


# Which Recipe fields a phase's configuration holds under the same name.
PRETRAIN_FIELDS = ("batch", "amp", "ema_decay", "grad_clip", "warmup_steps")
FINETUNE_FIELDS = ("batch", "amp", "lr", "betas", "loss", "augment", "epochs", "patience", "grad_clip",
                   "lr_schedule", "affinity", "prior", "anchor", "stain")


@dataclass(frozen=True)
class Recipe:
    """One recipe: what both training phases, and the models they write, do differently under it.

    ``None`` leaves a choice to the engine (the preset's batch, the learning rate by start, ...).
    Fields named as a config's field are that config's default (:meth:`pretrain_fields`,
    :meth:`finetune_fields`); the others the training code reads here.
    """

    name: str
    # both phases
    normalization: str  # input scaling of fine-tuning and of the segmentation model ("[-1, 1]" or "[0, 1]")
    official_init: bool  # conv and norm weights from N(0, 0.01) (official_init); False: PyTorch's defaults
    final_time: bool  # the final residual block takes the time input
    amp: bool  # bf16 autocast where nn.model.amp_enabled says it pays; False: fp32
    batch: Optional[int]  # None: the preset's
    # pretraining (its learning rate is 1e-4 in both recipes)
    ema_decay: float
    warmup_steps: int
    pretrain_grad_clip: float
    sum_loss: bool  # the P2 loss summed over the batch (the official code) rather than averaged
    # fine-tuning
    lr: Optional[float]  # None: the engine's rate for the preset and the start (finetune.LEARNING_RATES)
    betas: tuple
    loss: str
    augment: Augment = field(compare=False)
    epochs: Optional[int] = None  # None: the engine's budget (finetune.DEFAULT_EPOCHS, SPARSE_STEPS)
    patience: int = 10
    grad_clip: float = 0.0
    lr_schedule: Optional[str] = None  # None: cosine for strokes, else constant
    affinity: Optional[float] = None  # None: the engine's weight for strokes
    prior: Optional[float] = None
    anchor: Optional[float] = None  # None: the engine's weight when strokes continue a segmentation model
    fresh: tuple = ()  # prefixes of the pretrained weights that fine-tuning drops and starts fresh
    keep_lowest_loss: bool = False  # fine-tuning keeps the lowest validation loss (else the best Dice)
    stain: bool = True  # each image's stain normalised before the network (nn.stain); the official code has none

    def pretrain_fields(self) -> dict:
        """The PretrainConfig values of this recipe (``None``: left to the preset)."""
        values = {k: getattr(self, k) for k in PRETRAIN_FIELDS}
        values["grad_clip"] = self.pretrain_grad_clip
        return {**{k: v for k, v in values.items() if v is not None}, "recipe": self.name}

    def finetune_fields(self) -> dict:
        """The FinetuneConfig values of this recipe (``None``: left to the engine); a fresh augmentation."""
        values = {k: getattr(self, k) for k in FINETUNE_FIELDS}
        values["augment"] = replace(self.augment)
        return {**{k: v for k, v in values.items() if v is not None}, "recipe": self.name}

    def init(self, module: nn.Module) -> nn.Module:
        """``module`` with this recipe's initial weights (in place)."""
        return official_init(module) if self.official_init else module

    def net_config(self, net: NetConfig) -> NetConfig:
        """``net`` with this recipe's final block (the default recipe takes the network as it is)."""
        return net if self.final_time or not net.final_time else replace(net, final_time=False)

    def segmentation_net(self, net_cfg: NetConfig, classes: int, pretrained: Optional[dict] = None) -> SegmentationNet:
        """The network fine-tuning starts from: this recipe's initialisation, then the ``pretrained``
        U-Net weights (None: none) except those under :attr:`fresh`, and a new head of ``classes``."""
        return segmentation_net(self.net_config(net_cfg), classes, pretrained, fresh=self.fresh,
                                init_std=OFFICIAL_INIT_STD if self.official_init else None)

    def start_net(self, start, classes: int, net_cfg: NetConfig, geometry: bool = False) -> SegmentationNet:
        """The network a fine-tuning run starts from, drawn from torch's RNG: a segmentation model's
        own (``start.kind``; its head renewed for other ``classes``), else :meth:`segmentation_net` with
        the pretrained ``start.weights`` (no start: ``net_cfg`` from random initialisation); then with a
        geometry head (a new one unless the model has one) or without."""
        if start.kind != "segmentation":
            net = self.segmentation_net(start.net_cfg if start.kind else net_cfg, classes, start.weights)
        else:
            net = continued_net(start.net_cfg, start.weights, len(start.classes), classes)
        return set_geometry(net, geometry)


DEFAULT = Recipe(
    name="default", normalization="[-1, 1]", official_init=False, final_time=True, amp=True, batch=None,
    ema_decay=0.999, warmup_steps=100, pretrain_grad_clip=1.0, sum_loss=False,
    lr=None, betas=(0.5, 0.999), loss="dice_ce", augment=Augment())
OFFICIAL = Recipe(
    name="official", normalization="[0, 1]", official_init=True, final_time=False, amp=False, batch=8,
    ema_decay=0.0, warmup_steps=0, pretrain_grad_clip=0.0, sum_loss=True,
    lr=1e-4, betas=(0.5, 0.999), loss="official", augment=official_augment(), epochs=150, patience=0,
    lr_schedule="constant", affinity=0.0, prior=0.0, anchor=0.0, fresh=("final.", "head."), keep_lowest_loss=True,
    stain=False)
RECIPES = {r.name: r for r in (DEFAULT, OFFICIAL)}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a :class:`UserError` naming the choices otherwise."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise UserError(f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.") from None

