"""``genselfdiff sample``: draw images from a pretrained model, to see what it learned."""

from __future__ import annotations

from pathlib import Path

ORDER = 15


def register(sub) -> None:
    from ..cli import add_device_argument

    p = sub.add_parser("sample", help="draw images from a pretrained diffusion model into a PNG grid",
                       description="Run the reverse diffusion process of a pretrained model from pure noise and "
                                   "save the images as one grid. Tissue-like images mean the model learned "
                                   "what tissue looks like.")
    p.add_argument("model", metavar="MODEL", help="checkpoint written by genselfdiff pretrain")
    p.add_argument("-n", type=int, default=8, help="number of images (default: %(default)s)")
    p.add_argument("--out", default="samples.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--timesteps", type=int,
                   help="strided sampling over K of the T=1000 steps (e.g. 50: ~20x faster); default all T")
    p.add_argument("--size", type=int, help="image side in pixels (default: the training patch)")
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from ...errors import UserError
    from ...nn.sampling import image_grid, sample_images
    from ..cli import ProgressBar, StopOnInterrupt

    if args.n < 1:
        raise UserError("-n must be at least 1.")
    with StopOnInterrupt() as stop, ProgressBar(unit="step", quiet=args.quiet) as bar:
        images = sample_images(args.model, args.n, device=args.device, seed=args.seed, timesteps=args.timesteps,
                               size=args.size, progress=bar, should_stop=stop)
    out = Path(args.out)
    write_png(out, image_grid(images))
    note = " (stopped early: partly denoised)" if stop.requested else ""
    print(f"Wrote {len(images)} samples of {images.shape[1]} px to {out}{note}.")
    return 0


def write_png(path: Path, rgb) -> None:
    from PIL import Image

    from ...io.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        Image.fromarray(rgb).save(f, format="PNG")
