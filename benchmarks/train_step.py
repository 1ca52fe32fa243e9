"""Training step throughput: the engine's own step, with the config's speed options on and off.

The step is the object the engine's runs call: :class:`genselfdiff.train.pretrain.DiffusionStep`
(uint8 patches scaled, noised, the U-Net under the bf16 rule, P2 loss, backward, clipping, Adam,
EMA) or, with ``--stage finetune``, :class:`genselfdiff.train.finetune_run.SegmentationStep`
(the segmentation network, Dice + cross-entropy, backward, Adam), built from the same
:class:`~genselfdiff.PretrainConfig` / :class:`~genselfdiff.FinetuneConfig` a user's run
resolves. Two configs, in the same process on the same random patches:

  plain    amp=False, channels_last=False, compile=False: fp32, NCHW, eager
  engine   the config's defaults: bf16 autocast where the engine uses it (CUDA, and CPUs with
           native bf16: genselfdiff.nn.model.amp_enabled), channels_last on CUDA (pretraining;
           the engine keeps NCHW on the CPU, where it measured slower); torch.compile with --compile

They alternate in ``--rounds`` rounds, so a machine shared with other work slows both alike; the
figures are the medians over rounds (the loss is read once at the end of a round, as a
pretraining run reads it every ``log_every`` steps; a fine-tuning step reads its own). On CUDA
it also reports model FLOP utilisation: the U-Net's forward FLOPs from torch.utils.flop_counter
(multiply-adds counted twice), x3 for forward and backward, over the GPU's dense bf16 peak.
Patch reading and augmentation are not in the step; ``label_efficiency`` times whole runs.

    python -m benchmarks.train_step [--quick] [--stage pretrain|finetune] [--preset tiny|small|paper] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from .common import header
from .gpu_check import forward_flops, peak_flops


class Timed:
    """One config's step on fixed patches: ``rate(steps)`` in patches per second."""

    def __init__(self, stage: str, cfg, device, batch):
        import torch

        self.stage, self.device, self.batch = stage, device, batch
        if stage == "pretrain":
            from genselfdiff.train.pretrain import DiffusionStep

            self.step = DiffusionStep(cfg, device)
            self.step.wrap()  # compiled if the config says so, as a run does
            self.cfg = self.step.cfg
        else:
            from genselfdiff.nn.config import with_preset
            from genselfdiff.nn.unet import segmentation_net
            from genselfdiff.train.finetune_run import SegmentationStep

            self.cfg = with_preset(cfg, device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                net = segmentation_net(self.cfg.net, 2).to(device)
            net.train()
            self.step = SegmentationStep.from_config(self.cfg, net, device)
        self.done = 0

    def __call__(self):
        s = self.step(self.batch, self.done) if self.stage == "pretrain" else self.step(self.batch)
        self.done += 1
        return s

    def rate(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self()
        float(loss)  # a pretraining step's loss is a tensor not yet read
        sync(self.device)
        return steps * self.cfg.batch / (time.perf_counter() - t0)


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configs(args) -> dict:
    """The two configs, by name: ``plain`` (speed options off) and ``engine`` (the defaults)."""
    from genselfdiff import FinetuneConfig, PretrainConfig

    if args.stage == "pretrain":
        common = dict(patch=args.patch, batch=args.batch)
        return {"plain": PretrainConfig.from_preset(args.preset, amp=False, channels_last=False, **common),
                "engine": PretrainConfig.from_preset(args.preset, compile=args.compile, **common)}
    from genselfdiff.train.finetune import LEARNING_RATES

    lr = LEARNING_RATES.get(args.preset, (1e-3, 1e-3))[1]  # from random weights
    common = dict(patch=args.patch, batch=args.batch, lr=lr, affinity=0.0, prior=0.0)
    return {"plain": FinetuneConfig.from_preset(args.preset, amp=False, **common),
            "engine": FinetuneConfig.from_preset(args.preset, **common)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["pretrain", "finetune"], default="pretrain")
    p.add_argument("--preset", default=None, help="tiny, small or paper (default: tiny on CPU, paper on CUDA)")
    p.add_argument("--patch", type=int, help="patch side (default: the preset's)")
    p.add_argument("--batch", type=int, help="batch (default: the preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 8 on CPU, 20 on CUDA)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (the median is reported; default 7)")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine config's network (pretraining)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="3 steps in 2 rounds, for a smoke test")
    args = p.parse_args(argv)
    if args.compile and args.stage != "pretrain":
        p.error("--compile: only pretraining has a compile option")

    import numpy as np
    import torch

    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.model import amp_enabled, pick_device

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    args.preset = args.preset or ("paper" if cuda else "tiny")
    preset = get_preset(args.preset)
    args.patch, args.batch = args.patch or preset.patch, args.batch or preset.batch
    steps = args.steps or (3 if args.quick else 20 if cuda else 8)
    rounds = args.rounds or (2 if args.quick else 7)
    header(device)
    if cuda:
        torch.backends.cudnn.benchmark = True

    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (args.batch, args.patch, args.patch, 3), dtype=np.uint8)
    batch = patches if args.stage == "pretrain" else \
        (patches, rng.integers(0, 2, (args.batch, args.patch, args.patch)).astype(np.int64))
    timed = {name: Timed(args.stage, cfg, device, batch) for name, cfg in configs(args).items()}
    engine = timed["engine"].cfg
    tags = ["fused attention"] + (["channels_last"] if cuda and args.stage == "pretrain" and engine.channels_last
                                  else []) + \
           (["bf16 autocast"] if engine.amp and amp_enabled(device) else []) + \
           (["torch.compile"] if args.compile else [])

    t0 = time.perf_counter()
    for t in timed.values():  # warm-up: allocator, cuDNN autotuning, compilation
        for _ in range(3):
            t()
        sync(device)
    warm = time.perf_counter() - t0
    rates = {name: [] for name in timed}
    for _ in range(rounds):
        for name, t in timed.items():
            rates[name].append(t.rate(steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [f / p for f, p in zip(rates["engine"], rates["plain"])]
    for k, v in rates.items():
        print(f"  {k:6s} median {med[k]:8.2f} patches/s  rounds: {' '.join(f'{r:.1f}' for r in v)}")
    print(f"  per-round ratio: {' '.join(f'{r:.2f}' for r in ratios)}; warm-up {warm:.0f} s")

    flops = 3 * forward_flops(preset.net.to_dict(), args.patch)  # per patch, forward + backward
    achieved = flops * med["engine"]
    peak = peak_flops(torch.cuda.get_device_name(device)) if cuda else None
    mfu = f", MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""
    print(f"summary: train_step {args.stage} {args.preset}@{args.patch}px batch {args.batch} on {device}: "
          f"plain (fp32, NCHW, eager) {med['plain']:.2f}, engine ({' + '.join(tags)}) {med['engine']:.2f} "
          f"patches/s = {med['engine'] / med['plain']:.2f}x (median per-round {statistics.median(ratios):.2f}x); "
          f"{achieved / 1e12:.3g} TFLOP/s model{mfu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
