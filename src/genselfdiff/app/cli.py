"""The ``genselfdiff`` command line: a thin layer over the engine.

Each subcommand is a module in :mod:`genselfdiff.app.commands` with ``register(subparsers)``
(which sets ``run`` as the parser's default) and an ``ORDER`` number for ``--help``. Exit status: 0 success, 1 some inputs of a batch failed,
2 a usage or input error (one sentence on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import time
import warnings

from .._version import __version__
from ..errors import UserError
from ..progress import Progress

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genselfdiff",
        description="Self-supervised diffusion pretraining, few-label fine-tuning and whole-slide "
                    "segmentation for histopathology (GenSelfDiff-HIS).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands

    modules = [importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]
    for module in sorted(modules, key=lambda m: getattr(m, "ORDER", 100)):
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    warnings.showwarning = _show_warning
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"genselfdiff: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("genselfdiff: interrupted.", file=sys.stderr)
        return 130


# --- helpers shared by the subcommands ------------------------------------------------

class StopOnInterrupt:
    """First Ctrl-C asks the running job to stop cleanly (it saves what it has); a second one aborts."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def __enter__(self):
        self._old = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nStopping after the current step (Ctrl-C again to abort)...", file=sys.stderr)

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            pass
        return self

    def __exit__(self, *exc):
        try:
            signal.signal(signal.SIGINT, self._old)
        except ValueError:
            pass
        return False


class ProgressBar:
    """A tqdm bar per stage, fed by :class:`Progress` updates; metrics go in the postfix."""

    def __init__(self, unit: str = "it", quiet: bool = False, rate=None):
        self.unit, self.quiet, self.rate = unit, quiet, rate
        self.bar, self.stage = None, None
        self.t0 = time.perf_counter()

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(total=p.total, desc=p.stage, unit=self.unit, dynamic_ncols=True, file=sys.stderr)
            self.t0 = time.perf_counter()
        self.bar.n = p.done
        if p.total is not None and self.bar.total != p.total:
            self.bar.total = p.total
        if p.metrics:
            self.bar.set_postfix({k: _fmt(v) for k, v in p.metrics.items()}, refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The engine's messages for the user as one plain line; other warnings as Python prints them."""
    from ..io.pixelsize import PixelSizeWarning

    if issubclass(category, PixelSizeWarning):
        print(f"genselfdiff: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def add_pixel_size_arguments(parser, override: bool = True) -> None:
    """--pixel-size (passed as typed: the engine checks it and names the file) and --override-pixel-size."""
    parser.add_argument("--pixel-size", metavar="UM",
                        help="µm per pixel at full resolution of the input images, for files that state none "
                             "(PNG, JPEG, plain TIFF): e.g. 0.25 for 40x, 0.5 for 20x. Wins over a size the file "
                             "states within 2x (a warning when they differ by more than 10 %%)")
    if override:
        parser.add_argument("--override-pixel-size", action="store_true",
                            help="use --pixel-size even where it is more than 2x from the size the file states")


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")


if __name__ == "__main__":
    sys.exit(main())
