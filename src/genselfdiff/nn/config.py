"""Network and training configurations, and the named presets.

``paper`` is GenSelfDiff-HIS as published (width 64, multipliers 1-2-4-8, 256-px
patches, batch 8, Adam 1e-4). ``small`` and ``tiny`` shrink the same architecture for
laptops and CPUs; every field can still be overridden. ``auto``, the default, is resolved
when a run starts (:func:`resolve_preset`): the paper network on CUDA, ``CPU_AUTO_PRESET``
elsewhere, and the base model's preset when fine-tuning from one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from ..errors import UserError


@dataclass(frozen=True)
class NetConfig:
    """Shape of the diffusion U-Net (see :mod:`genselfdiff.nn.unet`)."""

    width: int = 64
    mults: tuple = (1, 2, 4, 8)
    in_channels: int = 3
    out_channels: int = 3
    groups: int = 8
    heads: int = 4
    head_dim: int = 32
    # The official code's final residual block takes no time input; ours does (see recipe.py).
    final_time: bool = True

    @property
    def downsampling(self) -> int:
        """Input sides must be a multiple of this."""
        return 2 ** (len(self.mults) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mults"] = list(self.mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "mults" in d:
            d["mults"] = tuple(d["mults"])
        return cls(**d)


@dataclass(frozen=True)
class Preset:
    net: NetConfig
    patch: int
    batch: int


PRESETS = {
    "paper": Preset(NetConfig(width=64, mults=(1, 2, 4, 8)), patch=256, batch=8),
    "small": Preset(NetConfig(width=32, mults=(1, 2, 4, 8), heads=4, head_dim=16), patch=128, batch=8),
    "tiny": Preset(NetConfig(width=16, mults=(1, 2, 4), heads=2, head_dim=16), patch=64, batch=8),
}


AUTO = "auto"
PRESET_CHOICES = (AUTO, *PRESETS)
# What "auto" means without CUDA: the preset that reached the best accuracy per minute of
# CPU training. Chosen by measurement, see docs/benchmarks.md; "tiny" until measured.
CPU_AUTO_PRESET = "tiny"


def resolve_preset(name: str, device, base: Optional[str] = None) -> str:
    """The preset a run on ``device`` uses for ``name``.

    A named preset is itself. ``auto`` is ``base`` (the preset recorded in the model a
    fine-tuning run starts from) when there is one, else ``paper`` on CUDA and
    :data:`CPU_AUTO_PRESET` on the CPU (and MPS, which is not measured).
    """
    if name != AUTO:
        get_preset(name)
        return name
    if base in PRESETS:
        return base
    return "paper" if getattr(device, "type", str(device)).startswith("cuda") else CPU_AUTO_PRESET


def with_preset(cfg, device, base: Optional[str] = None):
    """A run configuration with its preset resolved (:func:`resolve_preset`) and the network,
    patch and batch that it leaves open (None; ``net`` may be a dict of changed fields)
    taken from that preset. What is recorded in checkpoints."""
    name = resolve_preset(cfg.preset, device, base)
    p = get_preset(name)
    net = cfg.net if isinstance(cfg.net, NetConfig) else NetConfig.from_dict({**p.net.to_dict(), **(cfg.net or {})})
    return replace(cfg, preset=name, net=net, patch=cfg.patch or p.patch, batch=cfg.batch or p.batch)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"Unknown preset {name!r}; choose one of {', '.join(PRESET_CHOICES)}.") from None






def preset_fields(name: str, net=None) -> dict:
    """preset, net, patch and batch of a configuration made from preset ``name``.

    A named preset fills them in now (``net`` given as a dict changes some of the preset
    network's fields); ``auto`` leaves them open for :func:`with_preset` at the start of the run.
    """
    if name == AUTO:
        return {"preset": AUTO, "net": net, "patch": None, "batch": None}
    p = get_preset(name)
    if isinstance(net, dict):
        net = NetConfig.from_dict({**p.net.to_dict(), **net})
    return {"preset": name, "net": net or p.net, "patch": p.patch, "batch": p.batch}


def net_to_dict(net):
    return net.to_dict() if isinstance(net, NetConfig) else net


def net_from_dict(d):
    """A stored network description; None (an unresolved ``auto``) stays None."""
    return NetConfig.from_dict(d) if d is not None else None
