"""The diffusion U-Net of GenSelfDiff-HIS.

Same architecture as the official code (itself after lucidrains' DDPM U-Net): a 7x7
stem to 2/3 of the base width, per level two residual blocks (GroupNorm 8, SiLU,
additive time shift) and a pre-norm linear attention, 4x4 stride-2 convolutions down
and 4x4 transposed convolutions up, skip concatenation, full attention in the middle.
At width 64 and multipliers (1, 2, 4, 8) it has about 31 M parameters.

For segmentation the same network is kept whole and only the last 1x1 convolution
(``head``) is replaced, with the timestep fixed at 0 (:func:`to_segmentation`). The
official code's final residual block has no time input (``NetConfig.final_time`` False,
the official recipe) and its fine-tuning starts that block and the head afresh
(:mod:`genselfdiff.train.recipe`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import NetConfig
from .geometry import CHANNELS as GEOMETRY_CHANNELS


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the timestep, then MLP to 4x the base width (GELU)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, 4 * width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat((angles.sin(), angles.cos()), dim=-1))


class ConvNormAct(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x):
        return F.silu(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    """Two conv-norm-SiLU blocks; the time embedding is added between them (``time_dim`` None: no time input)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: Optional[int], groups: int):
        super().__init__()
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out)) if time_dim else None
        self.block1 = ConvNormAct(dim_in, dim_out, groups)
        self.block2 = ConvNormAct(dim_out, dim_out, groups)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, temb):
        h = self.block1(x)
        if self.time is not None:
            h = h + self.time(temb)[:, :, None, None]
        return self.block2(h) + self.skip(x)


class LinearAttention(nn.Module):
    """Softmax-kernel linear attention (cost linear in pixels), pre-norm and residual."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.scale = heads, head_dim**-0.5
        hidden = heads * head_dim
        self.norm = nn.GroupNorm(1, dim)
        self.qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
        self.out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, -1, h * w).unbind(1)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, h, w)
        return x + self.out(out)


class Attention(nn.Module):
    """Full multi-head self-attention over pixels (the bottleneck only), pre-norm and residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, fused: bool = True):
        super().__init__()
        self.heads, self.fused = heads, fused
        hidden = heads * head_dim
        self.norm = nn.GroupNorm(1, dim)
        self.qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
        self.out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, -1, h * w).transpose(-1, -2).unbind(1)
        if self.fused:  # flash / memory-efficient kernels where available
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
            out = attn @ v
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return x + self.out(out)


class Level(nn.Module):
    def __init__(self, dim_in, dim_out, time_dim, cfg: NetConfig, resample: nn.Module):
        super().__init__()
        self.res1 = ResBlock(dim_in, dim_out, time_dim, cfg.groups)
        self.res2 = ResBlock(dim_out, dim_out, time_dim, cfg.groups)
        self.attn = LinearAttention(dim_out, cfg.heads, cfg.head_dim)
        self.resample = resample

    def forward(self, x, temb):
        x = self.attn(self.res2(self.res1(x, temb), temb))
        return x, self.resample(x)


class UNet(nn.Module):
    """``forward(x, t)``: images N x C x H x W (H, W multiples of ``cfg.downsampling``)."""

    def __init__(self, cfg: NetConfig, fused_attention: bool = True):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        stem = w // 3 * 2
        dims = [stem] + [w * m for m in cfg.mults]
        pairs = list(zip(dims[:-1], dims[1:]))
        time_dim = 4 * w

        self.time = TimeEmbedding(w)
        self.stem = nn.Conv2d(cfg.in_channels, stem, 7, padding=3)
        self.downs = nn.ModuleList(
            Level(a, b, time_dim, cfg, nn.Conv2d(b, b, 4, 2, 1) if i < len(pairs) - 1 else nn.Identity())
            for i, (a, b) in enumerate(pairs)
        )
        mid = dims[-1]
        self.mid1 = ResBlock(mid, mid, time_dim, cfg.groups)
        self.mid_attn = Attention(mid, cfg.heads, cfg.head_dim, fused=fused_attention)
        self.mid2 = ResBlock(mid, mid, time_dim, cfg.groups)
        # As in the official code the decoder consumes the skips of all but the first
        # level and upsamples after each, returning to full resolution at width w.
        self.ups = nn.ModuleList(
            Level(2 * b, a, time_dim, cfg, nn.ConvTranspose2d(a, a, 4, 2, 1)) for a, b in reversed(pairs[1:])
        )
        self.final = ResBlock(w, w, time_dim if cfg.final_time else None, cfg.groups)
        self.head = nn.Conv2d(w, cfg.out_channels, 1)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Everything but the 1x1 head: N x width x H x W."""
        temb = self.time(t)
        x = self.stem(x)
        skips = []
        for level in self.downs:
            skip, x = level(x, temb)
            skips.append(skip)
        x = self.mid2(self.mid_attn(self.mid1(x, temb)), temb)
        for level in self.ups:
            _, x = level(torch.cat((x, skips.pop()), dim=1), temb)
        return self.final(x, temb)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, t))


class GeometryHead(nn.Module):
    """A light regression head to the geometry maps (:mod:`genselfdiff.nn.geometry`): 3x3
    convolution, GroupNorm, SiLU, 1x1 to the horizontal and vertical map."""

    def __init__(self, width: int, groups: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(min(groups, width), width)
        self.out = nn.Conv2d(width, GEOMETRY_CHANNELS, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.norm(self.conv(features))))


class SegmentationNet(nn.Module):
    """The whole diffusion U-Net with a new head of ``classes`` logits and t fixed at 0.

    ``geometry``: also a :class:`GeometryHead` on the same features
    (HoVer-Net's horizontal and vertical maps); ``forward(x, geometry=True)`` then returns
    ``(logits, maps)`` from one pass. Without it the network is the one of old checkpoints.
    """

    def __init__(self, unet: UNet, geometry: bool = False):
        super().__init__()
        self.unet = unet
        self.geometry = GeometryHead(unet.head.in_channels).to(unet.head.weight.device) if geometry else None

    @property
    def classes(self) -> int:
        return self.unet.head.out_channels

    @property
    def has_geometry(self) -> bool:
        return self.geometry is not None

    def forward(self, x: torch.Tensor, geometry: bool = False):
        t = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
        if not geometry:
            return self.unet(x, t)
        if self.geometry is None:
            raise ValueError("this network has no geometry head")
        features = self.unet.features(x, t)
        return self.unet.head(features), self.geometry(features)


def to_segmentation(unet: UNet, classes: int, geometry: bool = False) -> SegmentationNet:
    """Keep every pretrained weight; replace the output head by one of ``classes`` channels
    (``geometry``: and add a new geometry head)."""
    width = unet.head.in_channels
    unet.head = nn.Conv2d(width, classes, 1).to(unet.head.weight.device)
    unet.cfg = NetConfig(**{**unet.cfg.to_dict(), "mults": unet.cfg.mults, "out_channels": classes})
    return SegmentationNet(unet, geometry)


def normal_init(module: nn.Module, std: float) -> nn.Module:
    """N(0, ``std``) for the weights of every convolution and normalisation layer (in place)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 0.0, std)
    return module


def segmentation_net(cfg: NetConfig, classes: int, unet_weights: Optional[dict] = None, *, fresh: tuple = (),
                     init_std: Optional[float] = None, geometry: bool = False) -> SegmentationNet:
    """A segmentation network of ``classes`` built from ``cfg``: the U-Net (conv and norm weights
    from N(0, ``init_std``) when given, else PyTorch's), then the ``unet_weights`` of a pretrained
    U-Net (None: none) except those under the ``fresh`` prefixes, and a new head (drawn the same way);
    ``geometry``: also a new geometry head."""
    unet = UNet(cfg)
    if init_std:
        normal_init(unet, init_std)
    if unet_weights is not None and not fresh:
        unet.load_state_dict(unet_weights)
    elif unet_weights is not None:
        kept = {k: v for k, v in unet_weights.items() if not k.startswith(fresh)}
        missing, unexpected = unet.load_state_dict(kept, strict=False)
        if unexpected or any(not k.startswith(fresh) for k in missing):
            raise KeyError(f"pretrained weights do not fit: missing {missing}, unexpected {unexpected}")
    net = to_segmentation(unet, classes, geometry)
    if init_std:
        normal_init(net.unet.head, init_std)
        if net.geometry is not None:
            normal_init(net.geometry, init_std)
    return net


def continued_net(cfg: NetConfig, weights: dict, weight_classes: int, classes: int) -> SegmentationNet:
    """A segmentation network of ``weight_classes`` with its ``weights`` (its geometry head too, if they
    hold one), its head renewed (drawn from torch's RNG, without a geometry head) when ``classes`` differ."""
    net = to_segmentation(UNet(replace(cfg, out_channels=3)), weight_classes, geometry=has_geometry_weights(weights))
    net.load_state_dict(weights)
    return net if weight_classes == classes else to_segmentation(net.unet, classes)


def set_geometry(net: SegmentationNet, on: bool) -> SegmentationNet:
    """``net`` with a geometry head (a new one, drawn from torch's RNG, unless it has one) or without."""
    if on and net.geometry is None:
        net.geometry = GeometryHead(net.unet.head.in_channels).to(net.unet.head.weight.device)
    elif not on:
        net.geometry = None
    return net


def has_geometry_weights(state_dict: dict) -> bool:
    """Whether a segmentation network's weights hold a geometry head (old checkpoints do not)."""
    return any(k.startswith("geometry.") for k in state_dict)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
