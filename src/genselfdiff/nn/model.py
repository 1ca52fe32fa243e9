"""Loading a trained model for use, and the preprocessing that goes with it.

Both training phases see pixels scaled to [-1, 1] (the official code used [-1, 1] for
pretraining but [0, 1] for fine-tuning; one normalisation keeps the pretrained filters
meaningful; the official recipe keeps its [0, 1] and its models say so). :class:`Model` carries that scaling, the class names and colours and the
resolution the model was trained at, so every caller segments the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from ..io.labels import default_colors
from ..io.pixelsize import Resolution
from .config import NetConfig
from .unet import SegmentationNet, UNet, has_geometry_weights, segmentation_net


def pick_device(name: str = "auto") -> torch.device:
    """'auto' prefers CUDA, then Apple MPS, then the CPU; a named device must exist."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("MPS was requested but is not available on this machine; use --device cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}; use auto, cpu, cuda or mps.") from None


def available_devices() -> list:
    out = ["auto"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def to_input(rgb: np.ndarray, device, normalization: str = "[-1, 1]") -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float (N, 3, H, W) on ``device``, in [-1, 1] or, for
    models of the official recipe, ``normalization="[0, 1]"``."""
    t = torch.from_numpy(np.ascontiguousarray(rgb))
    if t.dim() == 3:
        t = t[None]
    t = t.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if normalization == "[0, 1]":
        return t / 255.0
    if normalization != "[-1, 1]":
        raise ValueError(f"unknown input normalization {normalization!r}")
    return t / 127.5 - 1.0


@dataclass
class Model:
    """A network ready to run, with what is needed to use it correctly."""

    net: torch.nn.Module  # SegmentationNet (kind 'segmentation') or UNet (kind 'pretrained')
    kind: str
    net_config: NetConfig
    device: torch.device
    classes: list = field(default_factory=list)  # names, index 0 = background
    colors: list = field(default_factory=list)  # RGB per class
    resolution: Resolution = field(default_factory=Resolution)
    patch: int = 256
    path: Optional[Path] = None
    meta: dict = field(default_factory=dict)  # the checkpoint without weights or optimizer
    normalization: str = "[-1, 1]"  # input scaling it was trained with ("[0, 1]": the official recipe)
    amp: bool = True  # bf16 autocast where :func:`amp_enabled` says it pays; False keeps fp32
    stain: Optional[str] = None  # the stain normalization its input gets (:mod:`.stain`), or None: raw pixels

    @property
    def has_geometry(self) -> bool:
        """Whether the network also predicts the geometry map of touching objects (:mod:`.geometry`)."""
        return self.kind == "segmentation" and bool(getattr(self.net, "has_geometry", False))

    @property
    def multiple(self) -> int:
        """Input sides must be a multiple of this."""
        return self.net_config.downsampling

    def require_segmentation(self) -> SegmentationNet:
        if self.kind != "segmentation":
            raise UserError(f"{self.path or 'This model'} is a pretrained diffusion model, not a segmentation "
                            "model; fine-tune it first (genselfdiff finetune --model ...).")
        return self.net

    @torch.no_grad()
    def predict(self, rgb: np.ndarray, tta: bool = False, stain=None) -> np.ndarray:
        """Class probabilities (N, C, H, W) float32 for uint8 (N, H, W, 3); sides a multiple of ``multiple``.

        ``tta``: average over the four flips (see :func:`class_probabilities`). ``stain``: for a
        model that expects stain-normalised input, the image's :class:`~.stain.Stain`
        (:func:`~.stain.fit_image`); None fits it on ``rgb`` itself.
        """
        net = self.require_segmentation()
        if self.stain:
            from . import stain as stains

            stain = stain or stains.fit(rgb)
            rgb = stain.apply(rgb) if stain is not None else rgb
        return class_probabilities(net, to_input(rgb, self.device, self.normalization), amp=self.amp, tta=tta).cpu().numpy()


# --- numerics: one bf16 rule and one layout rule for pretraining, fine-tuning and inference ------

def amp_enabled(device: torch.device, amp: bool = True) -> bool:
    """bf16 autocast where it is fast: CUDA, and CPUs with native bf16 (AVX512-BF16 or AMX).

    Elsewhere CPU bf16 is emulated and slower than fp32, and MPS is left in fp32. Weights,
    optimizer state, losses and softmax stay fp32 either way. ``amp=False`` opts out.
    """
    if not amp:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, enabled: bool = True):
    """The autocast context of :func:`amp_enabled`: bf16 where it pays, fp32 elsewhere."""
    on = amp_enabled(device, enabled)
    return torch.autocast(device.type if on else "cpu", dtype=torch.bfloat16, enabled=on)


def memory_format(device: torch.device, channels_last: bool = True) -> torch.memory_format:
    """The layout of images and weights: channels_last on CUDA, where it pays; contiguous (NCHW)
    elsewhere, since on the CPU it measured slower (docs/pretraining.md, Measured)."""
    return torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format


# The flips of test-time augmentation, as tensor dims of (N, C, H, W): none, left-right,
# up-down, both (= 180° rotation). 90° rotations are left out: they need square tiles.
FLIPS = ((), (3,), (2,), (2, 3))


def class_probabilities(net, x: torch.Tensor, *, amp: bool = True, tta: bool = False) -> torch.Tensor:
    """Softmax (N, C, H, W) float32 of ``net`` on the normalised input ``x``.

    The network runs under :func:`autocast`; the softmax (and any argmax of it) is fp32.
    ``tta`` averages the softmax over :data:`FLIPS`, each flipped back, so the result is
    the same for a flipped input, flipped (4x the compute).
    """
    probs = []
    for dims in FLIPS if tta else ((),):
        with autocast(x.device, amp):
            logits = net(x.flip(dims) if dims else x)
        p = logits.float().softmax(1)
        probs.append(p.flip(dims) if dims else p)
    if not tta:
        return probs[0]
    # Summed in pairs: a flipped input permutes the four terms within and between the pairs
    # only, so its sum is bit for bit the flipped sum (a running sum would differ in rounding).
    return ((probs[0] + probs[1]) + (probs[2] + probs[3])) / len(FLIPS)


def class_probabilities_and_geometry(net, x: torch.Tensor, *, amp: bool = True, tta: bool = False) -> tuple:
    """(softmax (N, C, H, W), geometry maps (N, 2, H, W)), both float32, from one pass of a network
    with a geometry head (:class:`~genselfdiff.nn.unet.SegmentationNet`). ``tta`` as for
    :func:`class_probabilities`; a flipped tile's maps are flipped back and, along the flipped
    axis, negated (left-right turns the horizontal offsets round, up-down the vertical ones)."""
    probs, maps = [], []
    for dims in FLIPS if tta else ((),):
        with autocast(x.device, amp):
            logits, hv = net(x.flip(dims) if dims else x, geometry=True)
        p, hv = logits.float().softmax(1), hv.float()
        if dims:
            sign = torch.tensor([-1.0 if 3 in dims else 1.0, -1.0 if 2 in dims else 1.0], device=hv.device)
            p, hv = p.flip(dims), hv.flip(dims) * sign[None, :, None, None]
        probs.append(p)
        maps.append(hv)
    if not tta:
        return probs[0], maps[0]
    return (((probs[0] + probs[1]) + (probs[2] + probs[3])) / len(FLIPS),
            ((maps[0] + maps[1]) + (maps[2] + maps[3])) / len(FLIPS))


def load_model(checkpoint, device="auto", use_ema: bool = True) -> Model:
    """A trained model ready for use, from a checkpoint file (never executing code from it) or a
    checkpoint's dict (what a dask worker is sent for a model that has no file)."""
    path = None if isinstance(checkpoint, dict) else Path(checkpoint)
    ckpt = checkpoint if path is None else load_checkpoint(path)
    dev = pick_device(device) if not isinstance(device, torch.device) else device
    net_cfg = NetConfig.from_dict(ckpt["net"])
    kind = ckpt.get("kind", "pretrained")
    classes = list(ckpt.get("classes") or [])
    weights = ckpt.get("ema_state_dict") if use_ema and ckpt.get("ema_state_dict") else ckpt["state_dict"]
    try:
        net = (segmentation_net(net_cfg, len(classes), geometry=has_geometry_weights(weights))
               if kind == "segmentation" else UNet(net_cfg))
        net.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path or 'The model'} has weights that do not match its own network description "
                        f"({e.__class__.__name__}).") from None
    net.to(dev).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "ema_state_dict", "optimizer", "rng")}
    return Model(
        net=net, kind=kind, net_config=net.unet.cfg if kind == "segmentation" else net_cfg, device=dev,
        classes=classes, colors=list(ckpt.get("colors") or default_colors(len(classes))),
        resolution=Resolution(**ckpt.get("resolution", {})), patch=int(ckpt.get("config", {}).get("patch", 256)),
        path=path, meta=meta, normalization=str(ckpt.get("normalization", "[-1, 1]")),
        amp=bool((ckpt.get("config") or {}).get("amp", True)),  # a model trained in fp32 only (official) runs in fp32
        stain=ckpt.get("stain") or None,
    )
