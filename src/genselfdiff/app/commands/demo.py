"""``genselfdiff demo``: the whole pipeline on a built-in synthetic slide."""

from __future__ import annotations

import sys

ORDER = 90


def register(sub) -> None:
    from ..cli import add_device_argument

    p = sub.add_parser("demo", help="run pretrain -> fine-tune -> segment -> evaluate on a built-in synthetic slide",
                       description="Run the whole pipeline on procedurally generated H&E-like tissue (no download): "
                                   "pretrain the tiny preset, fine-tune from a sample annotation, segment the slide "
                                   "lazily into OME-Zarr, and write an overlay, a loss plot and metrics into --out.")
    p.add_argument("--out", default="genselfdiff-demo", help="output folder (default: %(default)s)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gui", action="store_true", help="open napari on the result")
    add_device_argument(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..cli import ProgressBar, StopOnInterrupt
    from ..demo import run_demo

    with StopOnInterrupt() as stop, ProgressBar() as bar:
        result = run_demo(args.out, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                          device=args.device, seed=args.seed, progress=bar, should_stop=stop)
    print(f"\nDemo finished in {sum(result.seconds.values()):.0f} s; results in {result.out}/", file=sys.stderr)
    for name, path in result.files.items():
        print(f"  {name:13s} {path}")
    print((result.out / "metrics.md").read_text())
    if args.gui:
        _open_napari(result)
    return 0


def _open_napari(result) -> None:
    """Start napari in its own process: the engine never imports the UI."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("napari") is None:
        print("napari is not installed; skipping --gui.", file=sys.stderr)
        return
    files = [str(result.out / "data" / "slide.ome.tif"), str(result.files["segmentation"])]
    subprocess.run([sys.executable, "-m", "napari", *files, "--plugin", "napari-genselfdiff"], check=False)
