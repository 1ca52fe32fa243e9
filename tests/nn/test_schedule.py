"""The DDPM schedule and P2 weights against values computed by hand, and the strided sampler's schedule."""

import math

import pytest
import torch

from genselfdiff.nn.sampling import respace
from genselfdiff.nn.schedule import Schedule, p2_loss, q_sample

T = 1000


def beta(t: int) -> float:
    """beta_t = (sqrt(1e-4) + t (sqrt(0.02) - sqrt(1e-4)) / (T - 1))^2, 0-based t."""
    lo, hi = math.sqrt(1e-4), math.sqrt(0.02)
    return (lo + t * (hi - lo) / (T - 1)) ** 2


def abar(t: int) -> float:
    return math.prod(1 - beta(s) for s in range(t + 1))


@pytest.fixture(scope="module")
def sched():
    return Schedule.quadratic(T)


def test_betas_are_the_quadratic_schedule(sched):
    assert sched.timesteps == T
    assert sched.betas.dtype == torch.float64
    assert sched.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert sched.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    for t in (1, 250, 500, 998):
        assert sched.betas[t].item() == pytest.approx(beta(t), rel=1e-12)
    assert torch.all(sched.betas[1:] > sched.betas[:-1])


@pytest.mark.parametrize("t", [0, 1, 99, 499, 999])
def test_alphas_cumprod_snr_and_p2_weights_by_hand(sched, t):
    a = abar(t)
    assert sched.alphas_cumprod[t].item() == pytest.approx(a, rel=1e-10)
    snr = a / (1 - a)
    assert sched.snr[t].item() == pytest.approx(snr, rel=1e-9)
    # k = gamma = 1 (the paper): lambda = 1 / (1 + SNR) = 1 - abar.
    assert sched.p2_weights()[t].item() == pytest.approx(1 / (1 + snr), rel=1e-9)
    assert sched.p2_weights()[t].item() == pytest.approx(1 - a, rel=1e-9)
    assert sched.p2_weights(k=2.0, gamma=0.5)[t].item() == pytest.approx((2 + snr) ** -0.5, rel=1e-9)


def test_known_endpoints(sched):
    # abar_0 = 1 - 1e-4 (lambda tiny: almost-clean images barely count); abar_999 ~ 7.3e-4 (nearly pure
    # noise; the quadratic schedule ends less noisy than the linear one's 4e-5).
    assert sched.p2_weights()[0].item() == pytest.approx(1e-4, rel=1e-9)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(7.334e-4, rel=1e-3)
    assert sched.p2_weights()[-1].item() == pytest.approx(1 - 7.334e-4, rel=1e-6)


def test_q_sample_mixes_image_and_noise(sched):
    x0, eps = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), -1.0)
    t = torch.tensor([0, 600])
    xt = q_sample(sched, x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        a = abar(ti)
        expect = math.sqrt(a) * 0.5 - math.sqrt(1 - a)
        assert torch.allclose(xt[i], torch.full((3, 4, 4), expect), atol=1e-6)


def test_p2_loss_by_hand(sched):
    eps = torch.zeros(2, 3, 4, 4)
    pred = torch.zeros(2, 3, 4, 4)
    pred[0] = 1.0  # squared error 1 everywhere in image 0
    pred[1, 0] = 2.0  # squared error 4 on one of 3 channels in image 1 -> mean 4/3
    t = torch.tensor([10, 900])
    expect = ((1 - abar(10)) * 1.0 + (1 - abar(900)) * 4 / 3) / 2
    assert p2_loss(sched, pred, eps, t).item() == pytest.approx(expect, rel=1e-6)


def test_respaced_schedule_keeps_abar_at_kept_steps(sched):
    ts, betas = respace(sched, 10)
    assert ts[0] == 0 and ts[-1] == T - 1 and len(ts) == 10
    assert torch.allclose(torch.cumprod(1 - betas, 0), sched.alphas_cumprod[torch.tensor(ts)], rtol=1e-12)
    full_ts, full_betas = respace(sched, None)
    assert full_ts == list(range(T)) and torch.allclose(full_betas, sched.betas, rtol=1e-10)
