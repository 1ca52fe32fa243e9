"""The diffusion U-Net: the paper preset's shapes, size and cost; the tiny one runs for real."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from genselfdiff.nn.config import get_preset
from genselfdiff.nn.unet import UNet, count_parameters


def test_paper_preset_parameter_count():
    n = count_parameters(UNet(get_preset("paper").net))
    assert n == pytest.approx(31.3e6, rel=0.005)  # "about 31 M" in the paper
    assert n == 31_283_531  # pinned: any change to the architecture shows here


def test_paper_preset_shapes_and_flops_at_256px():
    """On the meta device: shapes and FLOPs without computing anything."""
    seen = {}
    with torch.device("meta"):
        net = UNet(get_preset("paper").net)
        for name, mod in [*((f"down{i}", m) for i, m in enumerate(net.downs)), ("mid", net.mid_attn),
                          *((f"up{i}", m) for i, m in enumerate(net.ups)), ("final", net.final)]:
            mod.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(
                name, tuple((out[0] if isinstance(out, tuple) else out).shape)))
        x, t = torch.randn(2, 3, 256, 256), torch.zeros(2, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            y = net(x, t)
    assert y.shape == (2, 3, 256, 256)
    # Encoder: widths 64-128-256-512 (multipliers 1, 2, 4, 8), halving by 4x4 stride-2 convolutions.
    assert [seen[f"down{i}"] for i in range(4)] == [(2, 64, 256, 256), (2, 128, 128, 128),
                                                    (2, 256, 64, 64), (2, 512, 32, 32)]
    assert seen["mid"] == (2, 512, 32, 32)
    # Decoder: each level works at its input resolution and returns to the skip's width.
    assert [seen[f"up{i}"] for i in range(3)] == [(2, 256, 32, 32), (2, 128, 64, 64), (2, 64, 128, 128)]
    assert seen["final"] == (2, 64, 256, 256)
    assert counter.get_total_flops() / 2 == pytest.approx(152e9, rel=0.01)  # per image, MACs x 2


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet(get_preset("tiny").net)


def test_tiny_forward_backward(tiny):
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    t = torch.tensor([0, 999])
    y = tiny(x, t)
    assert y.shape == x.shape
    y.square().mean().backward()
    grads = [p.grad for p in tiny.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    tiny.zero_grad(set_to_none=True)


def test_timestep_changes_the_output(tiny):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = tiny(x, torch.tensor([10])), tiny(x, torch.tensor([900]))
    assert not torch.allclose(a, b, atol=1e-4)


def test_fused_attention_and_channels_last_compute_the_same(tiny):
    plain = UNet(tiny.cfg, fused_attention=False)
    plain.load_state_dict(tiny.state_dict())
    fast = UNet(tiny.cfg).to(memory_format=torch.channels_last)
    fast.load_state_dict(tiny.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    with torch.no_grad():
        ref = plain(x, t)
        out = fast(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)
