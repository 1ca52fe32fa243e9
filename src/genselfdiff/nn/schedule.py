"""The DDPM noise schedule: data plus a few pure functions, kept apart from the network.

GenSelfDiff-HIS uses epsilon prediction over T = 1000 steps with the "quadratic"
schedule beta_t = linspace(sqrt(1e-4), sqrt(0.02), T)^2, and the P2 weighting
lambda_t = 1 / (k + SNR_t)^gamma (Choi et al. 2022) with k = gamma = 1.
Timesteps are 0-based: t = 0 is the first noising step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    betas: torch.Tensor  # float64, shape (T,)

    @classmethod
    def quadratic(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        root = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64)
        return cls(root**2)

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t)."""
        a = self.alphas_cumprod
        return a / (1.0 - a)

    def p2_weights(self, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
        return 1.0 / (k + self.snr) ** gamma

    def to_dict(self) -> dict:
        return {"kind": "quadratic", "timesteps": self.timesteps,
                "beta_start": float(self.betas[0]), "beta_end": float(self.betas[-1])}


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as float32 on like's device, shaped to broadcast over N x C x H x W."""
    return values.float().to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))  # MPS has no float64


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = schedule.alphas_cumprod
    return _gather(a.sqrt(), t, x0) * x0 + _gather((1 - a).sqrt(), t, x0) * noise


def p2_loss(schedule: Schedule, eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
            k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """Mean over the batch of lambda_t times the per-image mean squared error of eps."""
    mse = (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(1)
    return (schedule.p2_weights(k, gamma).to(mse.device)[t].float() * mse).mean()

