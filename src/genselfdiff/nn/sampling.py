"""Drawing images from a pretrained diffusion model: the reverse process, optionally respaced.

:func:`sample_images` runs DDPM backwards from noise (all T steps, or a strided subset by
:func:`respace`); :func:`image_grid` lays the images out for one picture.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from ..progress import Progress, resolve
from .model import Model, autocast, load_model
from .schedule import Schedule


def respace(schedule: Schedule, steps: Optional[int] = None) -> tuple:
    """(timesteps, betas) of a strided DDPM over ``steps`` of the T timesteps (Nichol & Dhariwal 2021).

    The kept timesteps are spread evenly over 0..T-1 and the new betas are chosen so that
    abar at each kept timestep is unchanged: beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}.
    ``steps`` None or >= T gives back the full schedule.
    """
    T = schedule.timesteps
    steps = T if steps is None else max(1, min(int(steps), T))
    ts = np.unique(np.round(np.linspace(0, T - 1, steps)).astype(int))
    abar = schedule.alphas_cumprod[torch.from_numpy(ts)]
    prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return [int(t) for t in ts], 1.0 - abar / prev


@torch.no_grad()
def sample_images(model, n: int = 4, *, device="auto", seed: int = 0, timesteps: Optional[int] = None,
                  size: Optional[int] = None, progress=None, should_stop=None) -> np.ndarray:
    """Draw ``n`` images from a pretrained model by the reverse process: uint8 (n, H, W, 3).

    ``model``: a checkpoint path or a loaded :class:`~genselfdiff.nn.model.Model` of kind
    "pretrained" (then its own device is used). ``timesteps``: run a strided (respaced)
    DDPM over that many of the T steps instead of all T, e.g. 50 for a quick look; each
    step uses the posterior variance and clips the predicted x0 to [-1, 1]. ``size``: side in
    pixels (default: the training patch). On ``should_stop`` it returns the current
    estimate of the clean images. Progress payloads carry that estimate every 10 % of steps.
    """
    progress, should_stop = resolve(progress, should_stop)
    m = model if isinstance(model, Model) else load_model(model, device)
    if m.kind != "pretrained":
        raise UserError(f"{m.path or 'This model'} is a segmentation model; sampling needs a pretrained "
                        "diffusion model (genselfdiff pretrain).")
    size = int(size or m.patch)
    if size % m.multiple:
        raise UserError(f"Sample size {size} must be a multiple of {m.multiple} for this network.")
    s = m.meta.get("schedule", {})
    schedule = Schedule.quadratic(int(s.get("timesteps", 1000)), float(s.get("beta_start", 1e-4)),
                                  float(s.get("beta_end", 0.02)))
    ts, betas = respace(schedule, timesteps)
    abar = schedule.alphas_cumprod[torch.tensor(ts)]
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn((n, 3, size, size), generator=g).to(m.device)
    x0 = x
    net, dev = m.net, m.device
    every = max(1, len(ts) // 10)
    for i in reversed(range(len(ts))):
        tt = torch.full((n,), ts[i], device=dev, dtype=torch.long)
        with autocast(dev, m.amp):
            eps = net(x, tt).float()
        a, ap, b = float(abar[i]), float(abar_prev[i]), float(betas[i])
        x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
        done = len(ts) - i
        if should_stop():
            break
        if i > 0:
            # Posterior q(x_{t-1} | x_t, x0): mean and variance beta * (1 - abar_prev) / (1 - abar).
            mean = (ap**0.5 * b / (1 - a)) * x0 + ((1 - b) ** 0.5 * (1 - ap) / (1 - a)) * x
            noise = torch.randn(x.shape, generator=g).to(dev)
            x = mean + (b * (1 - ap) / (1 - a)) ** 0.5 * noise
        progress(Progress("sample", done, len(ts), payload=_to_uint8(x0) if done % every == 0 else None))
    return _to_uint8(x0)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, gap: int = 2) -> np.ndarray:
    """Tile uint8 (n, H, W, 3) images into one near-square grid with white gaps."""
    n, h, w, _ = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = img
    return grid
