"""The configuration of a pretraining run (fine-tuning's is :class:`~genselfdiff.train.finetune.FinetuneConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from ..io.pixelsize import Resolution
from ..nn.config import AUTO, NetConfig, net_from_dict, net_to_dict, preset_fields
from .recipe import official_pretrain_fields


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
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    warmup_steps: int = 100
    val_fraction: float = 0.1
    val_every: int = 200
    val_batches: int = 4
    resolution: Optional[Resolution] = None  # None: the engine's default (pixelsize.working_resolution)
    seed: int = 0
    workers: Optional[int] = None  # None: the engine decides (trainjob.default_workers)
    compile: bool = False
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 (measured faster there)
    channels_last: bool = True
    recipe: str = "default"  # "official": the official code's choices (genselfdiff.train.recipe)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PretrainConfig":
        cfg = cls(**preset_fields(name, overrides.get("net")))
        if overrides.get("recipe") == "official":  # the recipe's values, then what the caller chose
            cfg = replace(cfg, **official_pretrain_fields())
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None and k != "net"})
        if cfg.recipe == "official" and isinstance(cfg.net, NetConfig):  # its architecture (auto: at the start)
            cfg = replace(cfg, net=replace(cfg.net, final_time=False))
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
