"""Segmentation speed on a CPU, against the machine's own arithmetic limit.

In one run, on a dense synthetic pyramid (tissue everywhere, so no tile is skipped):

(a) gemm: a bf16 matrix product (N x N by N x N) at torch's thread count: the bf16 TFLOP/s this
    machine does on the kind of work it does best;
(b) network: its FLOP per input pixel (torch's FLOP counter on one tile), so (a) / (b) is the
    arithmetic limit in Mpx/s;
(c) stages: one segmentation batch after another over the slide's units, each stage timed on its
    own in this thread (read/decode, stain, tissue check, cut and stack, to_input, forward,
    argmax/probabilities, write), as the engine runs them (``infer.pipeline``, ``infer.merge``).
    The model expects Macenko stain normalization, as models fine-tuned with today's defaults do
    (``--stain none``: raw pixels): ``make_plan`` fits the slide's stain (its row "stain fit") and
    ``Reader._read`` applies it to every region it reads (its row "stain apply");
(d) end to end: ``segment`` from the pyramid to OME-Zarr with the engine's defaults, its Mpx/s and
    its share of the limit (Mpx/s x FLOP/px / gemm FLOP/s);
(e) with ``--levers``, the forward pass's levers, each against the engine's setting over the same
    tiles, alternating in rounds so other load slows both alike; the median of the paired ratios:
    bf16 autocast off, NCHW input, contiguous (NCHW) weights, one thread, batch sizes, the
    softmax before the argmax, the ``small`` preset per pixel, and with ``--compile``
    ``torch.compile`` (inductor; left out with one line when no compiler works); and other
    runtimes of the same network exported to ONNX: ONNX Runtime (CPU provider, graph
    optimisation basic and all) and OpenVINO (f32, and bf16 where the CPU has it), at torch's
    thread count, each with its share of pixels labelled as the engine's bf16 path labels them
    and as torch fp32 does. A runtime that is not installed, or that cannot take the network, is
    left out with one line.

    python -m benchmarks.cpu_speed [--quick] [--levers [--compile]] [--size 2048] [--threads N]
                                   [--stain {macenko,none}]

Speeds are megapixels of the processing level per second (core pixels, as ``segment`` counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from .common import header


def segmentation_model(preset="tiny", classes=2, device="cpu", stain="macenko"):
    """A segmentation Model of ``preset`` with random weights (speed does not depend on them) that
    expects ``stain`` normalization (``nn.stain``; None: raw pixels)."""
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
                 colors=default_colors(classes), patch=p.patch, stain=stain)


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


@contextmanager
def timing_stain_fit(clock):
    """Times ``nn.stain.fit_image`` (which ``make_plan`` imports when it runs) as the stage "stain fit"."""
    from genselfdiff.nn import stain

    fit_image = stain.fit_image

    def timed(*args, **kwargs):
        with clock("stain fit"):
            return fit_image(*args, **kwargs)

    stain.fit_image = timed
    try:
        yield
    finally:
        stain.fit_image = fit_image


def stages(model, slide_path: Path, out: Path, batch: int) -> tuple:
    """Every unit of the slide, stage after stage in this thread; (seconds per stage, core Mpx, plan)."""
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
    with clock("plan + tissue map"), timing_stain_fit(clock):
        plan = make_plan(model, as_slide(slide_path), skip_background=True)
    clock.seconds["plan + tissue map"] -= clock.seconds.get("stain fit", 0.0)  # its own row
    image = LabelImage.create(out, shape=plan.shape0, chunk=plan.chunk, levels=pyramid_levels(plan.shape0, plan.chunk),
                              run=_run_description(model, plan, SegmentConfig()), probabilities=0)
    merger = OmeZarrMerger(image)
    merger.start(plan)
    predictor = Predictor(model, probabilities=False)
    # Its _read only (this thread does every stage), on the plan without its stain: _read is the
    # read, then plan.stain.apply, split here to time each.
    reader = Reader(dataclasses.replace(plan, stain=None), [], batch, pin=False)
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
        if plan.stain is not None:
            with clock("stain apply"):
                region = plan.stain.apply(region)
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
    return clock.seconds, pixels / 1e6, plan


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
    image = image if plan.stain is None else plan.stain.apply(image)  # what the network sees
    crops = np.stack([crop(image, (0, 0), t.window, plan.shape) for t in tiles])
    return crops, sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles)


def forward_seconds(model, crops, batch, *, amp=True, nchw_input=False, softmax=False, threads=None, net=None,
                    labels=None):
    """Seconds for the forward pass (to_input, network, labels) over ``crops`` in batches of ``batch``;
    the labels are appended to the list ``labels`` when one is given."""
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
                y = (logits.float().softmax(1) if softmax else logits.float()).argmax(1).to(torch.uint8)
                if labels is not None:
                    labels.append(y.numpy())
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


# Other runtimes: the network exported to ONNX once, run by ONNX Runtime or OpenVINO. Optional:
# neither is a dependency of genselfdiff, and a missing one only drops its rows.

class RuntimeNet:
    """An exported network behind the torch network's call: float (N, 3, H, W) in, logits out."""

    def __init__(self, run):
        self.run = run  # float32 NCHW numpy -> logits numpy

    def __call__(self, x):
        import torch

        return torch.from_numpy(self.run(np.ascontiguousarray(x.numpy())))  # to_input's NHWC memory -> NCHW


def export_onnx(model, path: Path, tile: int) -> Optional[str]:
    """``model.net`` as ONNX at ``path`` (fp32, the batch axis free); None, or why it could not be exported."""
    import torch

    x = torch.zeros(2, 3, tile, tile)
    why = []
    for dynamo in (False, True):  # the TorchScript exporter first: the dynamo one needs onnxscript
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model.net, (x,), str(path), input_names=["x"], output_names=["logits"],
                                  opset_version=18 if dynamo else 17, dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                                  dynamo=dynamo)
            return None
        except Exception as e:  # an operator the exporter lacks, or a missing exporter package
            why.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}")
    return "; ".join(why)


def onnx_runtime(path: Path, threads: int, level: str) -> tuple:
    """(RuntimeNet, None) running ``path`` in ONNX Runtime's CPU provider at graph optimisation
    ``level`` ("basic" or "all"), or (None, why not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # a graph this onnxruntime cannot run
        return None, f"onnxruntime {ort.__version__} cannot run the network ({type(e).__name__}: {str(e)[:200]})"
    return RuntimeNet(lambda a: session.run(None, {"x": a})[0]), None


def openvino_runtime(path: Path, threads: int, precision: str) -> tuple:
    """(RuntimeNet, None) running ``path`` in OpenVINO on the CPU at ``precision`` ("f32" or "bf16"), each input
    shape compiled on its first call, or (None, why not)."""
    try:
        import openvino as ov
    except ImportError:
        return None, "openvino is not installed"
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision}
    shapes = {}  # input shape -> (infer request, output): one compiled model per shape (static shapes
    # measured faster than a free batch axis, 1.50x against 1.43x the engine's setting)

    def compiled(shape):
        if shape not in shapes:
            net = core.read_model(str(path))
            net.reshape({0: list(shape)})
            c = core.compile_model(net, "CPU", config)
            shapes[shape] = c.create_infer_request(), c.output(0)
        return shapes[shape]

    def run(a):
        request, output = compiled(a.shape)
        return request.infer({0: a})[output]

    try:
        compiled((1, 3, 64, 64))
    except Exception as e:  # a graph this OpenVINO cannot compile
        return None, f"openvino {ov.__version__} cannot run the network ({type(e).__name__}: {str(e)[:200]})"
    return RuntimeNet(run), None


def runtimes(model, work: Path, tile: int, bf16: bool) -> dict:
    """name -> RuntimeNet for each runtime installed here that runs the network; one line for each left out."""
    import importlib.util

    import torch

    candidates = [("ONNX Runtime fp32 (optimisation basic)", onnx_runtime, "basic"),
                  ("ONNX Runtime fp32 (optimisation all)", onnx_runtime, "all"),
                  ("OpenVINO f32 (static shapes)", openvino_runtime, "f32")]
    if bf16:
        candidates.append(("OpenVINO bf16 (static shapes)", openvino_runtime, "bf16"))
    for package, runner in (("onnxruntime", onnx_runtime), ("openvino", openvino_runtime)):
        if importlib.util.find_spec(package) is None:  # before exporting: the export is for them
            print(f"(e) {package} left out: it is not installed; the engine runs torch")
            candidates = [c for c in candidates if c[1] is not runner]
    if not candidates:
        return {}
    path = Path(work) / "net.onnx"
    t0 = time.perf_counter()
    why = export_onnx(model, path, tile)
    if why:
        print(f"(e) other runtimes left out: the network does not export to ONNX ({why}); the engine runs torch")
        return {}
    print(f"(e) network exported to ONNX in {time.perf_counter() - t0:.0f} s")
    nets, missing = {}, {}
    for name, make, option in candidates:
        net, why = make(path, torch.get_num_threads(), option)
        if net is None:
            missing.setdefault(why, []).append(name)
        else:
            nets[name] = net
    for why, names in missing.items():
        print(f"(e) {', '.join(names)} left out: {why}; the engine runs torch")
    return nets


def same_labels(a: list, b: list) -> float:
    """Share of pixels with the same label in two lists of label batches."""
    return float(np.mean(np.concatenate([x.ravel() for x in a]) == np.concatenate([x.ravel() for x in b])))


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
    engine, fp32 = [], []
    forward_seconds(model, crops, b, labels=engine)  # also the warm-up
    forward_seconds(model, crops, b, amp=False, labels=fp32)
    agreement = {}
    for name, net in runtimes(model, args.work, crops.shape[1], args.bf16).items():
        got = []
        forward_seconds(model, crops, b, amp=False, net=net, labels=got)  # also its warm-up
        agreement[name] = (same_labels(got, engine), same_labels(got, fp32))
        variants[name] = dict(amp=False, net=net)
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
        print(f"    {k:38s} {out[k]:.2f}x  (rounds: {' '.join(f'{r:.2f}' for r in v)})")
    print(f"    same labels, torch fp32 against the engine's setting: {same_labels(fp32, engine):.2%} of pixels")
    for k, (vs_engine, vs_fp32) in agreement.items():
        adopt = out[k] >= 1.5 and vs_engine >= 0.99
        print(f"    {k}: same labels as the engine's setting {vs_engine:.2%}, as torch fp32 {vs_fp32:.2%}; "
              f"rule (>= 1.5x and >= 99 % same labels) {'met' if adopt else 'not met'}")
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
    print(f"    {'small preset per pixel (tile 512)':38s} {r:.2f}x  (rounds: {' '.join(f'{x:.2f}' for x in ratios)})")
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
    p.add_argument("--stain", choices=["macenko", "none"], default="macenko",
                   help="the stain normalization the model expects (default macenko, as fine-tuning's default)")
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
    work = args.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="genselfdiff-cpu-speed-"))
    slide = dense_pyramid(work, args.size)
    model = segmentation_model(args.preset, stain=None if args.stain == "none" else args.stain)
    from genselfdiff.infer.plan import default_tile
    from genselfdiff.nn.model import amp_enabled

    bf16 = args.bf16 = amp_enabled(model.device, model.amp)
    print(f"model: {args.preset} preset, tile {default_tile(model)}, batch {args.batch}, "
          f"{'bf16 autocast' if bf16 else 'fp32 (no native bf16 on this CPU)'}, stain normalization "
          f"{model.stain or 'none'}; slide {args.size}^2 of tissue")

    tflops = gemm_tflops(args.gemm or (256 if args.quick else 2048), 3 if args.quick else 10)
    fpp = flop_per_pixel(model, default_tile(model))
    limit = tflops * 1e12 / fpp / 1e6
    print(f"(a) gemm bf16: {tflops:.3f} TFLOP/s")
    print(f"(b) network: {fpp / 1e3:.0f} kFLOP per pixel -> arithmetic limit {limit:.2f} Mpx/s")

    seconds, mpx, plan = stages(model, slide, work / "stages.ome.zarr", args.batch)
    total = sum(seconds.values())
    print(f"(c) stages, one after another in one thread ({mpx:.2f} Mpx, {total:.1f} s, {mpx / total:.3f} Mpx/s):")
    for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"    {k:18s} {v:7.2f} s  {v / total:6.1%}")
    if model.stain:
        fit, apply = seconds.get("stain fit", 0.0), seconds.get("stain apply", 0.0)
        fitted = "fitted" if plan.stain is not None else "no stain found, so the tiles stay raw"
        print(f"    stain normalization ({model.stain}, {fitted}): {fit + apply:.2f} s = {(fit + apply) / total:.1%}; "
              "the fit is in make_plan (the plan stage), the apply in Reader._read (the read stage, in the "
              "pipeline's reader threads)")

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
