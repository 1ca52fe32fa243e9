"""Segmentation speed on a CPU, against the machine's own arithmetic limit.

In one run, on a dense synthetic pyramid (tissue everywhere, so no tile is skipped):

(a) gemm: a bf16 matrix product (N x N by N x N) at torch's thread count: the bf16 TFLOP/s this
    machine does on the kind of work it does best;
(b) network: its FLOP per input pixel (torch's FLOP counter on one tile), so (a) / (b) is the
    arithmetic limit in Mpx/s;
(c) stages: one segmentation batch after another over the slide's units, each stage timed on its
    own in this thread (read/decode, tissue check, cut and stack, to_input, forward,
    argmax/probabilities, write), as the engine runs them (``infer.pipeline``, ``infer.merge``);
(d) end to end: ``segment`` from the pyramid to OME-Zarr with the engine's defaults, its Mpx/s and
    its share of the limit (Mpx/s x FLOP/px / gemm FLOP/s);
(e) with ``--levers``, the forward pass's levers, each against the engine's setting over the same
    tiles, alternating in rounds so other load slows both alike; the median of the paired ratios:
    bf16 autocast off, NCHW input, contiguous (NCHW) weights, one thread, batch sizes, the
    softmax before the argmax, the ``small`` preset per pixel, and with ``--compile``
    ``torch.compile`` (inductor; left out with one line when no compiler works).

    python -m benchmarks.cpu_speed [--quick] [--levers [--compile]] [--size 2048] [--threads N]

Speeds are megapixels of the processing level per second (core pixels, as ``segment`` counts).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .common import header


def segmentation_model(preset="tiny", classes=2, device="cpu"):
    """A segmentation Model of ``preset`` with random weights (speed does not depend on them)."""
    import torch

    from genselfdiff.io.labels import default_colors
    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.model import Model
    from genselfdiff.nn.unet import UNet, to_segmentation

    torch.manual_seed(0)
    p = get_preset(preset)
    net = to_segmentation(UNet(p.net), classes).to(device).eval()
    return Model(net=net, kind="segmentation", net_config=net.unet.cfg, device=torch.device(device),
                 classes=["background"] + [f"class {i}" for i in range(1, classes)],
                 colors=default_colors(classes), patch=p.patch)


def dense_pyramid(work: Path, side: int) -> Path:
    """A JPEG pyramidal OME-TIFF of synthetic tissue, 0.5 µm/px, tissue everywhere (written once)."""
    from .tiled_inference import write_spotted_pyramid

    path = Path(work) / f"dense_{side}.ome.tif"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_spotted_pyramid(path, side, dense=True)
    return path


# --- (a) gemm, (b) FLOP per pixel ----------------------------------------------------------------

def gemm_tflops(n: int, repeats: int) -> float:
    """Best bf16 (n x n) @ (n x n) throughput in TFLOP/s."""
    import torch

    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def flop_per_pixel(model, tile: int) -> float:
    """FLOP of one forward pass per input pixel (convolutions, matrix products, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, tile, tile)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.net(x)
    return counter.get_total_flops() / tile**2


# --- (c) stages --------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, stage):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def stages(model, slide_path: Path, out: Path, batch: int) -> tuple:
    """Every unit of the slide, stage after stage in this thread; (seconds per stage, core Mpx)."""
    import torch

    from genselfdiff.infer.config import SegmentConfig
    from genselfdiff.infer.merge import OmeZarrMerger
    from genselfdiff.infer.pipeline import Predictor, Reader, TileResult, crop
    from genselfdiff.infer.plan import make_plan
    from genselfdiff.infer.segment import _run_description
    from genselfdiff.io.omezarr import LabelImage, pyramid_levels
    from genselfdiff.io.slides import as_slide
    from genselfdiff.nn.model import autocast, to_input

    clock = Clock()
    shutil.rmtree(out, ignore_errors=True)
    with clock("plan + tissue map"):
        plan = make_plan(model, as_slide(slide_path), skip_background=True)
    image = LabelImage.create(out, shape=plan.shape0, chunk=plan.chunk, levels=pyramid_levels(plan.shape0, plan.chunk),
                              run=_run_description(model, plan, SegmentConfig()), probabilities=0)
    merger = OmeZarrMerger(image)
    merger.start(plan)
    predictor = Predictor(model, probabilities=False)
    reader = Reader(plan, [], batch, pin=False)  # its _read only: this thread does every stage
    pixels = 0
    for unit in plan.units:
        with clock("tissue check"):
            live = [t for t in unit.tiles if plan.has_tissue(t)]
        if not live:
            continue
        h, w = plan.shape
        y0, x0 = min(t.window[0] for t in live), min(t.window[1] for t in live)
        y1, x1 = min(max(t.window[2] for t in live), h), min(max(t.window[3] for t in live), w)
        with clock("read + decode"):
            region = reader._read(y0, x0, y1, x1)
        for i in range(0, len(live), batch):
            members = live[i : i + batch]
            with clock("cut + stack"):
                x = torch.from_numpy(np.stack([crop(region, (y0, x0), t.window, plan.shape) for t in members]))
            with torch.inference_mode():
                with clock("to_input"):
                    inp = to_input(x.numpy(), predictor.device, predictor.normalization)
                with clock("forward"), autocast(inp.device, predictor.amp):
                    logits = predictor.net(inp)
                with clock("argmax"):
                    labels = predictor.labels_of(logits).numpy()
            with clock("write"):
                for b, t in enumerate(members):
                    oy, ox = t.offset
                    ch, cw = t.core[2] - t.core[0], t.core[3] - t.core[1]
                    last = t is live[-1]
                    merger.paste(TileResult(t.core[0], t.core[1], labels[b, oy : oy + ch, ox : ox + cw], plan.level,
                                            plan.downsample, 0, 0, chunk=unit.index, chunk_done=last))
                    pixels += ch * cw
    with clock("write"):
        merger.close()  # waits for the writer thread: the writes of the last units
    return clock.seconds, pixels / 1e6


# --- (d) end to end ----------------------------------------------------------------------------

def end_to_end(model, slide_path: Path, out: Path, **options) -> dict:
    from genselfdiff.infer.segment import segment

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = segment(model, slide_path, out, **options)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "mpx_per_s": r.shape[0] * r.shape[1] / seconds / 1e6, "tiles": r.tiles,
            "skipped": r.skipped_tiles}


# --- (e) levers --------------------------------------------------------------------------------

def tiles_of(model, slide_path: Path, tile=None) -> tuple:
    """The windows segment() would run (uint8 NHWC) and their core pixels."""
    from genselfdiff.infer.pipeline import crop
    from genselfdiff.infer.plan import make_plan
    from genselfdiff.io.slides import as_slide

    plan = make_plan(model, as_slide(slide_path), tile=tile, skip_background=False)
    tiles = [t for unit in plan.units for t in unit.tiles]
    image = np.asarray(plan.array)
    crops = np.stack([crop(image, (0, 0), t.window, plan.shape) for t in tiles])
    return crops, sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles)


def forward_seconds(model, crops, batch, *, amp=True, nchw_input=False, softmax=False, threads=None, net=None):
    """Seconds for the forward pass (to_input, network, labels) over ``crops`` in batches of ``batch``."""
    import torch

    from genselfdiff.nn.model import autocast, to_input

    net = net or model.net
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(crops), batch):
                x = to_input(crops[i : i + batch], model.device, model.normalization)
                if nchw_input:
                    x = x.contiguous()
                with autocast(x.device, amp):
                    logits = net(x)
                (logits.float().softmax(1) if softmax else logits.float()).argmax(1).to(torch.uint8)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def compiled(net):
    """``torch.compile(net)`` (inductor, frozen weights) when a compiler works, else None with the reason."""
    import torch

    try:
        import torch._inductor.config as inductor

        inductor.freezing = True
        c = torch.compile(net)
        with torch.inference_mode():
            c(torch.zeros(1, 3, 64, 64))
        return c, None
    except Exception as e:  # no C++ compiler, or inductor failing on this platform
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def levers(model, slide_path: Path, args) -> dict:
    """Median ratio (engine setting's seconds / lever's seconds, so > 1 is faster) per lever."""
    import copy

    import torch

    crops, pixels = tiles_of(model, slide_path)
    b = args.batch
    cl_net = copy.deepcopy(model.net).to(memory_format=torch.channels_last)
    nchw_net = model.net  # the engine's weights stay contiguous; its input is NHWC (to_input)
    variants = {
        "bf16 autocast off (fp32)": dict(amp=False),
        "NCHW input (weights NCHW)": dict(nchw_input=True),
        "channels_last weights": dict(net=cl_net),
        "softmax before argmax": dict(softmax=True),
        "1 thread": dict(threads=1),
        **{f"batch {n}": dict(batch=n) for n in args.lever_batches if n != b},
    }
    if args.compile:
        t0 = time.perf_counter()
        c, why = compiled(model.net)
        if c is None:
            print(f"(e) torch.compile left out: no working compiler ({why}); the engine runs eager")
        else:
            with torch.inference_mode():
                forward_seconds(model, crops[:b], b, net=c)  # compiles for this batch size
            print(f"(e) torch.compile: {time.perf_counter() - t0:.0f} s to compile")
            variants["torch.compile (inductor, frozen)"] = dict(net=c)
    forward_seconds(model, crops[:b], b)  # warm-up
    ratios = {k: [] for k in variants}
    base_runs = []
    for _ in range(args.rounds):
        for name, v in variants.items():
            base = forward_seconds(model, crops, b)
            kw = dict(v)
            lever = forward_seconds(model, crops, kw.pop("batch", b), **kw)
            ratios[name].append(base / lever)
            base_runs.append(base)
    del nchw_net
    out = {k: statistics.median(v) for k, v in ratios.items()}
    base_rate = pixels / statistics.median(base_runs) / 1e6
    print(f"(e) forward over {len(crops)} tiles, engine setting (bf16 where native, NHWC input, batch {b}, "
          f"{torch.get_num_threads()} threads): median {base_rate:.3f} Mpx/s")
    for k, v in ratios.items():
        print(f"    {k:34s} {out[k]:.2f}x  (rounds: {' '.join(f'{r:.2f}' for r in v)})")
    out.update(small_per_pixel(model, slide_path, crops, pixels, args))
    return out


def small_per_pixel(tiny, slide_path, tiny_crops, tiny_pixels, args) -> dict:
    """The ``small`` preset (tile 512) against ``tiny`` (tile 256): Mpx/s of their raw forwards, alternating."""
    small = segmentation_model("small")
    crops, pixels = tiles_of(small, slide_path)
    b_small = max(1, args.batch // 4)  # the same pixels per forward pass
    ratios = []
    for _ in range(args.rounds):
        t_tiny = forward_seconds(tiny, tiny_crops, args.batch) / tiny_pixels
        t_small = forward_seconds(small, crops, b_small) / pixels
        ratios.append(t_tiny / t_small)
    r = statistics.median(ratios)
    print(f"    {'small preset per pixel (tile 512)':34s} {r:.2f}x  (rounds: {' '.join(f'{x:.2f}' for x in ratios)})")
    return {"small per pixel": r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test, not a measurement: a 256^2 slide (one tile), "
                                                        "a small gemm, one round")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, help="side of the dense slide (default 2048, quick 256)")
    p.add_argument("--batch", type=int, default=None, help="tiles per forward pass (default: the engine's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--gemm", type=int, default=None, help="side of the gemm (default 2048, quick 256)")
    p.add_argument("--levers", action="store_true", help="also (e): the forward pass's levers side by side")
    p.add_argument("--lever-batches", type=int, nargs="+", default=[1, 2, 4, 16])
    p.add_argument("--compile", action="store_true", help="(e): also torch.compile (minutes to compile)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of (e) (default 3, quick 1)")
    p.add_argument("--work", default=None, help="folder for the synthetic slide and outputs (default: temporary)")
    args = p.parse_args()

    import torch

    from genselfdiff.infer.config import DEFAULT_BATCH

    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = args.size or (256 if args.quick else 2048)
    args.batch = args.batch or DEFAULT_BATCH
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.quick:
        args.lever_batches = [2]
    header()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="genselfdiff-cpu-speed-"))
    slide = dense_pyramid(work, args.size)
    model = segmentation_model(args.preset)
    from genselfdiff.infer.plan import default_tile
    from genselfdiff.nn.model import amp_enabled

    bf16 = amp_enabled(model.device, model.amp)
    print(f"model: {args.preset} preset, tile {default_tile(model)}, batch {args.batch}, "
          f"{'bf16 autocast' if bf16 else 'fp32 (no native bf16 on this CPU)'}; slide {args.size}^2 of tissue")

    tflops = gemm_tflops(args.gemm or (256 if args.quick else 2048), 3 if args.quick else 10)
    fpp = flop_per_pixel(model, default_tile(model))
    limit = tflops * 1e12 / fpp / 1e6
    print(f"(a) gemm bf16: {tflops:.3f} TFLOP/s")
    print(f"(b) network: {fpp / 1e3:.0f} kFLOP per pixel -> arithmetic limit {limit:.2f} Mpx/s")

    seconds, mpx = stages(model, slide, work / "stages.ome.zarr", args.batch)
    total = sum(seconds.values())
    print(f"(c) stages, one after another in one thread ({mpx:.2f} Mpx, {total:.1f} s, {mpx / total:.3f} Mpx/s):")
    for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"    {k:18s} {v:7.2f} s  {v / total:6.1%}")

    e2e = end_to_end(model, slide, work / "segment.ome.zarr", batch=args.batch)
    share = e2e["mpx_per_s"] * 1e6 * fpp / (tflops * 1e12)
    print(f"(d) segment end to end: {e2e['tiles']} tiles, {e2e['seconds']:.1f} s, {e2e['mpx_per_s']:.3f} Mpx/s "
          f"= {share:.0%} of the arithmetic limit")
    lever_line = ""
    if args.levers:
        out = levers(model, slide, args)
        best = max(out, key=out.get)
        lever_line = f"; best lever {best} {out[best]:.2f}x"
    fwd = seconds["forward"] / total
    print(f"summary: segment {e2e['mpx_per_s']:.3f} Mpx/s end to end = {share:.0%} of the bf16 gemm limit "
          f"({tflops:.3f} TFLOP/s, {fpp / 1e3:.0f} kFLOP/px); forward {fwd:.0%} of the stages{lever_line}")


if __name__ == "__main__":
    main()
