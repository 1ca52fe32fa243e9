"""``genselfdiff pretrain``: self-supervised diffusion pretraining on a folder of unannotated slides."""

from __future__ import annotations

import argparse
import sys

ORDER = 10


def register(sub) -> None:
    from ...nn.config import PRESET_CHOICES
    from ..cli import add_device_argument, add_pixel_size_arguments

    p = sub.add_parser(
        "pretrain", help="pretrain the diffusion U-Net on unannotated slides (no labels)",
        description="Teach the GenSelfDiff-HIS U-Net what tissue looks like by learning to remove noise from "
                    "random tissue patches (DDPM, P2-weighted loss). Writes the best checkpoint by validation "
                    "loss to --out and the resume state next to it (model.pt -> model.last.pt). "
                    "Ctrl-C stops cleanly after the current step, leaving both files usable. "
                    "On a CPU, pretraining at the budgets tried (10 minutes to about an hour, up to 16,000 steps "
                    "of the tiny network) did not improve fine-tuning: without a GPU, skip it and fine-tune from "
                    "random weights "
                    "(genselfdiff finetune without --model). Pretraining is meant for GPU-scale runs; "
                    "see docs/pretraining.md.",
        epilog="Exit status: 0 done (also when files without tissue were skipped), 1 done but some files could "
               "not be read, 2 nothing could be done (bad arguments or no usable image). Several GPUs or "
               "machines: torchrun --nproc_per_node=N -m genselfdiff pretrain ... (see docs/pretraining.md).")
    p.add_argument("slides", nargs="+", metavar="SLIDES", help="slide files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="checkpoint to write (the best by validation loss)")
    p.add_argument("--preset", default="auto", choices=list(PRESET_CHOICES),
                   help="paper: as published (width 64, 256-px patches, batch 8); small, tiny: for laptops and CPUs; "
                        "auto: paper on CUDA, the CPU's best by measurement otherwise (default: %(default)s)")
    p.add_argument("--recipe", choices=["default", "official"], default="default",
                   help="official: the official code's initialisation, fp32, no EMA, clipping or warm-up, "
                        "summed loss and a final block without time input (default: %(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="number of training steps")
    budget.add_argument("--minutes", type=float, help="train for this long instead (neither: until Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="continue the run saved next to --out (same data, "
                   "same random stream); --steps counts from the start of the run")
    add_device_argument(p)
    add_pixel_size_arguments(p)
    h = p.add_argument_group("hyperparameters (default: the preset's)")
    h.add_argument("--patch", type=int, help="patch side in pixels")
    h.add_argument("--batch", type=int, help="patches per step (per process under torchrun)")
    h.add_argument("--lr", type=float, help="Adam learning rate (paper: 1e-4)")
    h.add_argument("--width", type=int, help="base width of the U-Net (paper: 64)")
    res = h.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, help="pyramid level to read patches from (default: 0.5 µm/px where the "
                                                "pixel size is known, else full resolution)")
    res.add_argument("--mpp", type=float, help="read patches at this many µm per pixel (images of known pixel size)")
    h.add_argument("--ema", type=float, help="EMA decay of the weights; 0 = off (default 0.999)")
    h.add_argument("--grad-clip", type=float, help="clip the gradient norm; 0 = off (default 1.0)")
    h.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps; 0 = off (default 100)")
    h.add_argument("--val-every", type=int, help="validate (and keep the best) every N steps; 0 = only at the end")
    h.add_argument("--val-fraction", type=float, help="share of the files held out for validation (default 0.1)")
    h.add_argument("--seed", type=int, help="random seed (default 0)")
    s = p.add_argument_group("speed")
    s.add_argument("--workers", type=int, help="data-loading processes (default: 0 on the CPU, up to 8 on a GPU)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network (slow start, faster steps on GPUs)")
    s.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA and on CPUs with native bf16 (default on)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def build_config(args):
    from ...io.pixelsize import Resolution
    from ...train.config import PretrainConfig

    net = {"width": args.width} if args.width is not None else None  # the preset's network, this wide
    resolution = Resolution(level=args.level or 0, mpp=args.mpp) if args.level is not None or args.mpp else None
    return PretrainConfig.from_preset(
        args.preset, net=net, patch=args.patch, batch=args.batch, lr=args.lr, steps=args.steps,
        minutes=args.minutes, ema_decay=args.ema, grad_clip=args.grad_clip, warmup_steps=args.warmup,
        val_every=args.val_every, val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
        compile=args.compile, amp=args.amp, resolution=resolution, recipe=args.recipe)


def run(args) -> int:
    from ...train.ddp import env_rank
    from ...train.pretrain import pretrain
    from ..cli import EXIT_OK, EXIT_PARTIAL, ProgressBar, StopOnInterrupt

    cfg = build_config(args)
    main = env_rank() == 0
    if main and cfg.steps is None and cfg.minutes is None and not args.resume:
        print("No --steps or --minutes given: training until Ctrl-C.", file=sys.stderr)
    with StopOnInterrupt() as stop, ProgressBar(unit="step", quiet=args.quiet or not main) as bar:
        result = pretrain(args.slides, args.out, cfg, device=args.device, resume=args.resume,
                          progress=bar, should_stop=stop, pixel_size=args.pixel_size,
                          override_pixel_size=args.override_pixel_size)
    if not main:
        return EXIT_OK
    print(summary(result))
    for path, reason in result.skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    unreadable = [s for s in result.skipped if "could not be read" in s[1]]
    return EXIT_PARTIAL if unreadable else EXIT_OK


def summary(result) -> str:
    """One line: steps, time, speed, best validation loss, where the files are, what was skipped."""
    speeds = [h["patches_per_s"] for h in result.history if h.get("patches_per_s")]
    speed = f", {speeds[-1]:.3g} patches/s" if speeds else ""
    best = (f"best validation loss {result.best_val_loss:.4g} at step {result.best_step} ({result.validation})"
            if result.best_val_loss is not None else "not validated")
    how = "Stopped pretraining after" if result.stopped else "Pretrained"
    return (f"{how} {result.steps} steps in {result.seconds / 60:.1f} min{speed}; {best}; "
            f"model {result.path}, resume state {result.last_path}; {len(result.skipped)} file(s) skipped.")
