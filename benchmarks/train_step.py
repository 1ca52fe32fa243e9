"""Pretraining step throughput: the optimised step against a plain fp32 eager step of the same network.

Both run the full step of :mod:`genselfdiff.train.pretrain` (noising, forward, P2 loss, backward,
gradient clipping, Adam, EMA) on the same shapes in the same process, alternating in
rounds so that a machine shared with other work slows both alike; the figures are the
medians over rounds.

  plain      UNet(cfg, fused_attention=False), fp32, contiguous (NCHW), eager
  optimised  what ``genselfdiff pretrain`` does: fused scaled-dot-product attention, bf16
             autocast on CUDA and on CPUs with native bf16 (model.amp_enabled),
             channels_last on CUDA only (it measured slower on the CPU; --channels-last
             forces it), torch.compile with --compile

On CUDA it also reports model FLOP utilisation: forward FLOPs from
torch.utils.flop_counter (multiply-adds counted twice), x3 for forward + backward, over
the GPU's dense bf16 peak.

    .venv/bin/python benchmarks/train_step.py [--quick] [--preset tiny|small|paper] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from _common import machine  # benchmarks/ is on sys.path when a benchmark is run as a script

from genselfdiff.nn.config import get_preset
from genselfdiff.nn.schedule import Schedule, p2_loss, q_sample
from genselfdiff.nn.unet import UNet

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
PEAK_BF16 = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}


class Variant:
    """One way of running the pretraining step."""

    def __init__(self, name, cfg, device, *, fused, channels_last, bf16, compile_, seed=0):
        self.name, self.device, self.bf16 = name, device, bf16
        torch.manual_seed(seed)
        self.net = UNet(cfg, fused_attention=fused).to(device)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.fmt)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        self.model = torch.compile(self.net) if compile_ else self.net
        self.schedule = Schedule.quadratic(1000)
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def step(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.contiguous(memory_format=self.fmt)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device).contiguous(memory_format=self.fmt)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            eps = self.model(q_sample(self.schedule, x0, t, noise), t)
        loss = p2_loss(self.schedule, eps, noise, t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1e-3)
        return loss

    def time(self, x0: torch.Tensor, steps: int) -> float:
        """Patches per second over ``steps`` steps (the loss is read once at the end, as training does)."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step(x0)
        loss.item()
        sync(self.device)
        return steps * x0.shape[0] / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(cfg, patch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = UNet(cfg)
        x, t = torch.randn(1, 3, patch, patch), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            net(x, t)
    return float(counter.get_total_flops())


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="tiny, small or paper (default: tiny on CPU, paper on CUDA)")
    p.add_argument("--patch", type=int, help="patch side (default: the preset's)")
    p.add_argument("--batch", type=int, help="batch (default: the preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (the median is reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile the optimised network")
    p.add_argument("--no-bf16", action="store_true", help="keep the optimised step in fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CUDA, off on the CPU")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="a few steps, for a smoke test")
    args = p.parse_args(argv)

    from genselfdiff.nn.model import amp_enabled, pick_device

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset_name = args.preset or ("paper" if device.type == "cuda" else "tiny")
    preset = get_preset(preset_name)
    cfg, patch, batch = preset.net, args.patch or preset.patch, args.batch or preset.batch
    steps = args.steps or (3 if args.quick else (20 if device.type == "cuda" else 8))
    rounds = args.rounds or (2 if args.quick else 7)
    bf16 = amp_enabled(device) and not args.no_bf16
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last

    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print("machine:", machine(device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    plain = Variant("plain", cfg, device, fused=False, channels_last=False, bf16=False, compile_=False)
    tags = ["fused attention"] + (["channels_last"] if channels_last else []) + \
           (["bf16 autocast"] if bf16 else []) + (["torch.compile"] if args.compile else [])
    fast = Variant("optimised", cfg, device, fused=True, channels_last=channels_last, bf16=bf16,
                   compile_=args.compile)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand((batch, 3, patch, patch), generator=g) * 2 - 1).to(device)

    t0 = time.perf_counter()
    for v in (plain, fast):  # warm-up: allocator, cuDNN autotuning, compilation
        for _ in range(3):
            v.step(x0)
        sync(device)
    warm = time.perf_counter() - t0
    rates = {plain.name: [], fast.name: []}
    for _ in range(rounds):
        for v in (plain, fast):
            rates[v.name].append(v.time(x0, steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [f / p for f, p in zip(rates["optimised"], rates["plain"])]
    for k, v in rates.items():
        print(f"  {k:9s} median {med[k]:8.2f} patches/s  rounds: {' '.join(f'{r:.1f}' for r in v)}")
    print(f"  per-round ratio: {' '.join(f'{r:.2f}' for r in ratios)}; warm-up {warm:.0f} s")

    flops = 3 * forward_flops(cfg, patch)  # per patch, forward + backward
    mfu = ""
    peak = peak_flops(device)
    achieved = flops * med["optimised"]
    if peak:
        mfu = f", MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16"
    print(f"train_step {preset_name}@{patch}px batch {batch} on {device}: plain fp32 eager {med['plain']:.2f}, "
          f"optimised ({' + '.join(tags)}) {med['optimised']:.2f} patches/s = "
          f"{med['optimised'] / med['plain']:.2f}x (median per-round {statistics.median(ratios):.2f}x); "
          f"{achieved / 1e12:.3g} TFLOP/s model{mfu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
