"""The configurations of the two training runs: :class:`PretrainConfig` and :class:`FinetuneConfig`.

:func:`resolve_config` and :func:`check_config` resolve a pretraining config for a device and
check it, before any work starts (fine-tuning resolves and checks its own with its data).

Each holds everything that defines a run and is stored, resolved, in its checkpoints. The
fields a recipe decides default to :data:`~genselfdiff.train.recipe.DEFAULT`'s values;
``from_preset(name, recipe="official", ...)`` takes :data:`~genselfdiff.train.recipe.OFFICIAL`'s,
then what the caller chose (``None`` meaning "not chosen").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from ..errors import UserError
from ..io.pixelsize import Resolution
from ..nn.config import AUTO, NetConfig, net_from_dict, net_to_dict, preset_fields, with_preset
from .augment import Augment
from .recipe import DEFAULT, RECIPES, get_recipe
from .run import default_workers


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; stored (resolved, :func:`with_preset`) in its checkpoints."""

    preset: str = AUTO
    net: Optional[NetConfig] = None  # None (or a dict of changed fields): the preset's
    patch: Optional[int] = None  # None: the preset's
    batch: Optional[int] = None
    lr: float = 1e-4
    steps: Optional[int] = None
    minutes: Optional[float] = None
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    max_timestep: Optional[int] = None  # sample t below this only (light noise); None: all T, as the paper
    # Not in the paper; what a careful practitioner adds. 0 switches each off.
    ema_decay: float = DEFAULT.ema_decay
    grad_clip: float = DEFAULT.pretrain_grad_clip
    warmup_steps: int = DEFAULT.warmup_steps
    val_fraction: float = 0.1
    val_every: int = 200
    val_batches: int = 4
    resolution: Optional[Resolution] = None  # None: the engine's default (pixelsize.working_resolution)
    seed: int = 0
    workers: Optional[int] = None  # None: the engine decides (run.default_workers)
    compile: bool = False
    amp: bool = DEFAULT.amp  # bf16 autocast on CUDA, and on CPUs with native bf16 (measured faster there)
    channels_last: bool = True  # on CUDA only (nn.model.memory_format)
    recipe: str = DEFAULT.name  # "official": the official code's choices (genselfdiff.train.recipe)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PretrainConfig":
        cfg = cls(**preset_fields(name, overrides.get("net")))
        recipe = RECIPES.get(overrides.get("recipe") or DEFAULT.name)  # an unknown name fails when the run starts
        if recipe is not None:  # the recipe's values, then what the caller chose
            cfg = replace(cfg, **recipe.pretrain_fields())
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None and k != "net"})
        if recipe is not None and isinstance(cfg.net, NetConfig):  # its architecture (auto: at the start)
            cfg = replace(cfg, net=recipe.net_config(cfg.net))
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        d["net"] = net_to_dict(self.net)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        d = dict(d)
        d["net"] = net_from_dict(d.get("net", {}))
        d["resolution"] = Resolution(**d["resolution"]) if d.get("resolution") is not None else None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run; stored in its checkpoint. The engine's defaults
    for strokes and by start are in :mod:`genselfdiff.train.finetune`."""

    preset: str = AUTO  # resolved when the run starts (config.with_preset)
    net: Optional[NetConfig] = None  # None (or a dict of changed fields): the preset's
    patch: Optional[int] = None  # None: the preset's
    batch: Optional[int] = None
    lr: Optional[float] = DEFAULT.lr  # default: LEARNING_RATES (by preset and start), chosen by measurement
    betas: tuple = DEFAULT.betas
    loss: str = DEFAULT.loss  # "dice_ce" (soft Dice + CE), "paper" (SS + focal), "official", "ce" or "dice"
    ss_weight: float = 1.0
    focal_weight: float = 1.0
    ss_beta: float = 0.1
    ss_c: float = 0.01
    focal_gamma: float = 2.0
    affinity: Optional[float] = DEFAULT.affinity  # colour-affinity weight; default SPARSE_AFFINITY for strokes, else 0
    prior: Optional[float] = DEFAULT.prior  # haematoxylin prior; default SPARSE_PRIOR for strokes that agree, else 0
    # The previous model's confident predictions on unpainted pixels (train.priors); default
    # SPARSE_ANCHOR when strokes continue a segmentation model of the same classes, else 0.
    anchor: Optional[float] = DEFAULT.anchor
    # Each image's stain mapped to one reference before the network sees it (nn.stain); a model
    # that is continued keeps its own setting.
    stain: bool = DEFAULT.stain
    # Budget: whichever comes first; none given means DEFAULT_EPOCHS and at least min_steps
    # (strokes: SPARSE_STEPS).
    epochs: Optional[int] = DEFAULT.epochs
    steps: Optional[int] = None
    minutes: Optional[float] = None
    steps_per_epoch: Optional[int] = None  # default: about one pass over the annotated tiles
    val_fraction: float = 0.1
    val_max_tiles: int = 64
    patience: int = DEFAULT.patience  # epochs without a better validation Dice before stopping; 0 = never
    # No early stop before this step: on a few images validation is noisy, and a run stopped
    # at its best step 462 scored 0.767 where 2500 steps scored 0.808 (docs/finetuning.md).
    min_steps: int = 2500
    sparse: bool = False
    classes: Optional[int] = None  # number of classes incl. background; default from names or labels
    class_names: Optional[list] = None  # index 0 = background
    colors: Optional[list] = None
    balance: Optional[float] = None  # share of class-balanced patches; default 1 sparse, 0 dense
    augment: Augment = field(default_factory=lambda: replace(DEFAULT.augment))
    grad_clip: float = DEFAULT.grad_clip  # not in the paper; 0 = off
    # "constant" (the paper's) or "cosine" (to 0 over the budget); None: SPARSE_LR_SCHEDULE for strokes, else constant
    lr_schedule: Optional[str] = DEFAULT.lr_schedule
    resolution: Optional[Resolution] = None  # None: the engine's default (pixelsize.working_resolution)
    seed: int = 0
    workers: int = 0  # threads preparing batches ahead of the network
    amp: bool = DEFAULT.amp  # bf16 autocast on CUDA and on CPUs with native bf16 (nn.model.amp_enabled)
    log_every: int = 10
    recipe: str = DEFAULT.name  # "official": the official code's choices (genselfdiff.train.recipe)
    preview_every: int = 200  # steps between predictions over the preview region (if one is given); 0 = none

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FinetuneConfig":
        cfg = cls(**preset_fields(name, overrides.pop("net", None)))
        recipe = RECIPES.get(overrides.get("recipe") or DEFAULT.name)  # an unknown name fails when the run starts
        if recipe is not None:  # the recipe's values, then what the caller chose
            cfg = replace(cfg, **recipe.finetune_fields())
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["net"] = net_to_dict(self.net)
        d["betas"] = list(self.betas)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        d = dict(d)
        d["net"] = net_from_dict(d.get("net", {}))
        d["resolution"] = Resolution(**d["resolution"]) if d.get("resolution") is not None else None
        d["augment"] = Augment.from_dict(d.get("augment", {}))
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def noise_levels(cfg: PretrainConfig) -> int:
    """How many of the T noise levels the pretext samples from (all, unless ``max_timestep``)."""
    return cfg.max_timestep or cfg.timesteps


def resolve_config(config: PretrainConfig, device) -> PretrainConfig:
    """``config`` as a run on ``device`` uses it: the preset resolved (:func:`with_preset`), the
    recipe's network and the engine's data workers; a resolved config comes back unchanged."""
    cfg = with_preset(config, device)
    cfg = replace(cfg, net=get_recipe(cfg.recipe).net_config(cfg.net))
    return cfg if cfg.workers is not None else replace(cfg, workers=default_workers(device))


def check_config(cfg: PretrainConfig) -> None:
    """One sentence per impossible setting, before any work starts."""
    d = cfg.net.downsampling
    if cfg.patch < d or cfg.patch % d:
        raise UserError(f"Patch size {cfg.patch} must be a positive multiple of {d} for this network.")
    if cfg.net.width % cfg.net.groups or cfg.net.width < cfg.net.groups:
        raise UserError(f"Network width {cfg.net.width} must be a multiple of {cfg.net.groups} (GroupNorm groups).")
    if cfg.batch < 1 or cfg.lr <= 0:
        raise UserError("Batch size must be at least 1 and the learning rate positive.")
    if (cfg.steps is not None and cfg.steps < 0) or (cfg.minutes is not None and cfg.minutes < 0):
        raise UserError("--steps and --minutes cannot be negative.")
    if not 0 <= cfg.ema_decay < 1 or cfg.grad_clip < 0 or cfg.warmup_steps < 0 or cfg.workers < 0:
        raise UserError("EMA decay must be in [0, 1); clipping, warm-up and workers cannot be negative.")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError("The validation fraction must be in [0, 1).")
    if cfg.max_timestep is not None and not 1 <= cfg.max_timestep <= cfg.timesteps:
        raise UserError(f"The largest timestep must be between 1 and {cfg.timesteps}.")
    get_recipe(cfg.recipe)
