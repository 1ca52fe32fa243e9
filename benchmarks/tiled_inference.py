"""Tiled whole-slide inference: speed against the raw network and MONAI, and memory against slide size.

In one run, with one model and the same tile, overlap and batch:

(a) raw: the batched forward pass alone over exactly the tiles ``segment`` computes, their
    pixels already in memory (the ceiling for end-to-end speed);
(b) segment: end to end from a pyramidal TIFF to OME-Zarr (tissue map, reading, network,
    writing, pyramid, metadata), and its ratio to (a);
(c) MONAI ``sliding_window_inference`` over the whole image held as one tensor, which
    returns the whole float output;
(d) peak memory (RSS) of ``segment`` on pyramids of growing side, each in a fresh process.
    The pyramids are written tile by tile (never held in memory): white glass with the same
    5 x 5 tissue squares of 512 px spread over it, so the network does the same work at every
    size (peak RSS of the CPU allocator depends on how many batches ran) while the slide, its
    tissue map, its units and its output grow. With ``--instances`` the child calls
    ``segment(..., instances=True)``, so the peak also covers the objects pass (the ids written
    chunk by chunk into ``OUT/instances``), and it reports how many objects were written.
    ``--only-memory`` runs (d) alone.

With ``--amp-compare`` it runs only

(e) bf16 against fp32: (a) for each of ``--amp-presets`` (default tiny and small) with
    ``Model.amp`` off and on, alternating in rounds so that other load slows both alike;
    the best of ``--repeats`` rounds each. bf16 is only used where ``model.amp_enabled``
    says (CUDA, CPUs with native bf16); elsewhere both columns are fp32 and say so.

    python -m benchmarks.tiled_inference [--quick] [--device cpu] [--amp-compare]
    python -m benchmarks.tiled_inference --only-memory [--instances] [--memory-sizes 4096 40960]

(c) needs MONAI (``pip install -e '.[bench]'``); without it (c) is left out and says so.

Speeds are megapixels of the processing level per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from genselfdiff.io.atomic import atomic_path

from .common import ROOT, header


def tiny_model(device, preset="tiny", classes=2):
    import torch

    from genselfdiff.io.labels import default_colors
    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.model import Model
    from genselfdiff.nn.unet import UNet, to_segmentation

    torch.manual_seed(0)
    p = get_preset(preset)
    net = to_segmentation(UNet(p.net), classes).to(device).eval()
    return Model(net=net, kind="segmentation", net_config=net.unet.cfg, device=device,
                 classes=["background"] + [f"class {i}" for i in range(1, classes)],
                 colors=default_colors(classes), patch=p.patch)


# --- synthetic pyramids written tile by tile ---------------------------------------------------

def write_spotted_pyramid(path: Path, side: int, spots: int = 5, spot: int = 512, tile: int = 512,
                          texture_side: int = 1024, dense: bool = False) -> Path:
    """A JPEG pyramidal OME-TIFF of ``side`` px: synthetic tissue (``dense``) or white glass with
    ``spots`` x ``spots`` tissue squares of ``spot`` px, evenly spread (the same network work at
    every side). Memory: a few tiles, whatever the side."""
    spacing = side // spots
    spot = min(spot, spacing)
    offset = (spacing - spot) // 2
    import tifffile

    from genselfdiff.app.synthetic import downsample2, synthetic_tissue

    texture = synthetic_tissue((texture_side, texture_side), seed=0, glass=0.0)[0]
    textures = [texture]
    sides = [side]
    while sides[-1] // 2 >= 256:
        sides.append(math.ceil(sides[-1] / 2))
        textures.append(downsample2(textures[-1]))

    def tiles(k):
        n = sides[k]
        f = 2**k
        tex = textures[k]
        ts = tex.shape[0]
        for ty in range(0, n, tile):
            for tx in range(0, n, tile):
                out = np.full((tile, tile, 3), 246, np.uint8)
                ys, xs = np.arange(ty, ty + tile), np.arange(tx, tx + tile)
                if dense:
                    mask_y, mask_x = ys < n, xs < n
                else:  # inside a spot: (level-0 coordinate - offset) mod spacing < spot
                    mask_y = ((ys * f - offset) % spacing < spot) & (ys < n)
                    mask_x = ((xs * f - offset) % spacing < spot) & (xs < n)
                if mask_y.any() and mask_x.any():
                    patch = tex[np.ix_(ys % ts, xs % ts)]
                    m = mask_y[:, None] & mask_x[None, :]
                    out[m] = patch[m]
                yield out

    meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.5,
            "PhysicalSizeYUnit": "µm"}
    opts = dict(photometric="rgb", tile=(tile, tile), compression="jpeg", dtype=np.uint8)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        tw.write(tiles(0), shape=(side, side, 3), subifds=len(sides) - 1, metadata=meta, **opts)
        for k in range(1, len(sides)):
            tw.write(tiles(k), shape=(sides[k], sides[k], 3), subfiletype=1, metadata=None, **opts)
    return path


# --- (a) raw forward, (b) segment, (c) MONAI ---------------------------------------------------

def raw_forward(model, slide_path, tile, overlap, batch, repeats=1) -> dict:
    """The network alone over the tiles segment() would compute, pixels pre-read."""
    from genselfdiff.infer.pipeline import Predictor, crop
    from genselfdiff.infer.plan import make_plan
    from genselfdiff.io.slides import as_slide

    slide = as_slide(slide_path)
    plan = make_plan(model, slide, tile=tile, overlap=overlap, skip_background=True)
    tiles = [t for unit in plan.units for t in unit.tiles if plan.has_tissue(t)]
    image = np.asarray(plan.array)
    crops = [crop(image, (0, 0), t.window, plan.shape) for t in tiles]
    pixels = sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles)
    import torch

    predictor = Predictor(model, probabilities=False)
    predictor.collect(predictor.launch(torch.from_numpy(np.stack(crops[:batch]))))  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        in_flight = None
        for i in range(0, len(crops), batch):
            x = torch.from_numpy(np.stack(crops[i : i + batch]))
            if predictor.cuda:
                x = x.pin_memory()
            launched = predictor.launch(x)
            if in_flight is not None:
                predictor.collect(in_flight)
            in_flight = launched
        predictor.collect(in_flight)
        best = min(best, time.perf_counter() - t0)
    return {"tiles": len(tiles), "seconds": best, "mpx_per_s": pixels / best / 1e6, "mpx": pixels / 1e6}


def end_to_end(model, slide_path, out, tile, overlap, batch) -> dict:
    import shutil

    from genselfdiff import segment

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = segment(model, slide_path, out, tile=tile, overlap=overlap, batch=batch)
    seconds = time.perf_counter() - t0
    h, w = r.labels.shape  # level 0 == processing level here
    return {"tiles": r.tiles, "seconds": seconds, "mpx_per_s": h * w / seconds / 1e6}


def monai(model, slide_path, tile, overlap, batch, channels_last=False) -> dict:
    """MONAI over the whole image. ``channels_last`` hands the network NHWC-strided windows, the
    layout segment() feeds it (its uint8 HWC pixels, permuted): on CPU convolutions run faster so."""
    import torch
    from monai.inferers import sliding_window_inference

    from genselfdiff.io.slides import open_slide
    from genselfdiff.nn.model import autocast, to_input

    rgb = np.asarray(open_slide(slide_path).levels[0])
    def net(x, _net=model.net):
        return _net(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    with torch.inference_mode():  # warm-up, as for (a)
        sliding_window_inference(to_input(rgb[:tile, :tile], model.device), (tile, tile), batch, net)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(model.device):
        x = to_input(rgb, model.device)
        out = sliding_window_inference(x, (tile, tile), batch, net, overlap=overlap / tile)
        labels = out.argmax(1).to(torch.uint8).cpu().numpy()
    seconds = time.perf_counter() - t0
    held = out.element_size() * out.nelement() + x.element_size() * x.nelement()
    return {"seconds": seconds, "mpx_per_s": labels.size / seconds / 1e6, "held_bytes": held}


def amp_comparison(device, dense, args) -> None:
    """(e): the raw forward pass in fp32 and under the autocast rule, per preset, one line each."""
    from genselfdiff.nn.model import amp_enabled

    bf16 = amp_enabled(device)
    parts = []
    for preset in args.amp_presets:
        model = tiny_model(device, preset)
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for amp in (False, True):
                model.amp = amp
                runs[amp].append(raw_forward(model, dense, args.tile, args.overlap, args.batch)["mpx_per_s"])
        fp32, low = max(runs[False]), max(runs[True])
        each = "; ".join(f"{'bf16' if amp else 'fp32'} " + " ".join(f"{v:.3f}" for v in runs[amp]) for amp in runs)
        print(f"(e) {preset:<5} {args.size}^2 tile {args.tile} batch {args.batch}: fp32 {fp32:.3f}, "
              f"{'bf16' if bf16 else 'amp (fp32 here)'} {low:.3f} Mpx/s = {low / fp32:.2f}x (runs: {each})")
        parts.append(f"{preset} fp32 {fp32:.3f} / {'bf16' if bf16 else 'amp=fp32'} {low:.3f} ({low / fp32:.2f}x)")
    print("summary: raw forward Mpx/s, " + ", ".join(parts))


# --- (d) memory in a fresh process --------------------------------------------------------------

def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: on Linux the latter
    keeps the parent's peak across fork + exec, which would charge the parent's tensors here."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(args) -> None:
    """Runs in its own process: segment one slide, print the peak RSS as JSON.

    With ``--instances`` the objects pass runs too. The random-weight tiny model needs no help to
    give objects: its argmax is a speckle of class 1 over the tissue squares (and the glass next to
    them inside network tiles), which the split turns into thousands of small objects, so the
    objects pass has real work. The count is the pass's own (each object counted in the chunk of
    its first pixel); the largest id and the number of written chunks of ``OUT/instances/0`` are
    read back from the OME-Zarr after the peak was taken, so that reading them adds nothing to it.
    """
    import psutil
    import torch

    from genselfdiff import segment

    device = torch.device(args.device)
    model = tiny_model(device)
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    r = segment(model, args.memory_child, args.out, tile=args.tile, overlap=args.overlap, batch=args.batch,
                instances=args.instances)
    peak = peak_rss()
    d = {"peak": peak, "base": base, "seconds": time.perf_counter() - t0, "tiles": r.tiles,
         "skipped": r.skipped_tiles, "chunks": r.chunks_computed, "shape": list(r.shape)}
    if args.instances:
        d.update(instances_written(r))
    print(json.dumps(d))


def instances_written(r) -> dict:
    """What the objects pass of ``r`` wrote: its count, the largest id and the chunks stored in
    ``OUT/instances/0`` (a chunk without objects is not written), read back chunk by chunk."""
    import zarr

    if r.objects is None or r.objects.path is None:
        raise RuntimeError(f"segment(instances=True) returned no objects: stopped={r.stopped}, notes={r.notes}")
    ids = zarr.open_array(r.objects.path / "0", mode="r")
    cy, cx = ids.chunks
    top = 0
    for y in range(0, ids.shape[0], cy):
        for x in range(0, ids.shape[1], cx):
            top = max(top, int(np.asarray(ids[y : y + cy, x : x + cx]).max()))
    return {"objects": int(sum(r.objects.counts.values())), "max_id": top,
            "id_chunks": int(ids.nchunks_initialized), "id_chunks_total": int(ids.nchunks)}


def memory(work: Path, side: int, args) -> dict:
    path = work / f"spots_{side}_{args.spots}x{args.spot}.ome.tif"
    t0 = time.perf_counter()
    if not path.exists():
        write_spotted_pyramid(path, side, args.spots, args.spot)
    made = time.perf_counter() - t0
    out = work / f"spots_{side}.ome.zarr"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "benchmarks.tiled_inference", "--memory-child", str(path), "--out", str(out),
           "--tile", str(args.tile),
           "--overlap", str(args.overlap), "--batch", str(args.batch), "--device", args.device]
    if args.instances:
        cmd.append("--instances")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    d = json.loads(res.stdout.strip().splitlines()[-1])
    d["write_seconds"] = made
    shutil.rmtree(out, ignore_errors=True)
    (work / f"spots_{side}_objects.csv").unlink(missing_ok=True)  # the objects pass's summary, beside OUT
    return d


def memory_sizes(work: Path, sizes, args) -> dict:
    """(d) for each side in turn, one line each; returns the peaks by side."""
    peaks = {}
    for side in sizes:
        d = memory(work, side, args)
        peaks[side] = d["peak"]
        objects = (f", {d['objects']} objects (largest id {d['max_id']}, {d['id_chunks']} of {d['id_chunks_total']} "
                   f"id chunks written)" if "objects" in d else "")
        print(f"(d) memory {side}^2{' --instances' if args.instances else ''}: peak RSS {d['peak'] / 2**20:.0f} MiB "
              f"(after imports+model {d['base'] / 2**20:.0f} MiB), {d['tiles']} tiles ({d['skipped']} glass), "
              f"{d['chunks']} chunks{objects}, {d['seconds']:.0f} s (slide written in {d['write_seconds']:.0f} s)",
              flush=True)
    return peaks


def memory_only(work: Path, sizes, args) -> None:
    """``--only-memory``: (d) alone, and the ratio of the largest side's peak to the smallest's."""
    print(f"model: tiny preset (random weights), tile {args.tile}, overlap {args.overlap}, batch {args.batch}"
          f"{', instances=True' if args.instances else ''}", flush=True)
    peaks = memory_sizes(work, sizes, args)
    if peaks:
        print(f"summary: peak RSS {max(peaks)}^2 / {min(peaks)}^2 = {peaks[max(peaks)] / peaks[min(peaks)]:.2f}x"
              f"{' with --instances' if args.instances else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test, not a measurement: a 512^2 image, memory at 1024^2 and 2048^2 (2 x 2 squares of "
                        "256 px), one run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, help="side of the dense image for (a)-(c) (default 2048, quick 512)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--memory-sizes", type=int, nargs="*", help="sides for (d) (default 4096 16384 40960)")
    p.add_argument("--spots", type=int, default=5, help="(d): spots x spots tissue squares, whatever the side")
    p.add_argument("--spot", type=int, help="(d): side of a tissue square (default 512, quick 256)")
    p.add_argument("--instances", action="store_true",
                   help="(d): segment with instances=True (the objects pass too) and report the objects written")
    p.add_argument("--only-memory", action="store_true", help="only (d): no dense image, no (a)-(c)")
    p.add_argument("--no-monai", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="runs of (a)-(c), best kept (default %(default)s)")
    p.add_argument("--amp-compare", action="store_true", help="only (e): bf16 autocast against fp32 per preset")
    p.add_argument("--amp-presets", nargs="+", default=["tiny", "small"], help="presets for (e) (default: tiny small)")
    p.add_argument("--work", default=None, help="folder for the synthetic slides (default: a temporary one)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)

    import torch

    device = torch.device(args.device)
    size = args.size = args.size or (512 if args.quick else 2048)
    default_sizes = [1024, 2048] if args.quick else [4096, 16384, 40960]
    sizes = args.memory_sizes if args.memory_sizes is not None else default_sizes
    if args.quick:
        args.spots, args.repeats = 2, 1
    args.spot = args.spot or (256 if args.quick else 512)
    header(device)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="genselfdiff-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.only_memory:
        return memory_only(work, sizes, args)
    dense = work / f"dense_{size}.ome.tif"
    if not dense.exists():
        write_spotted_pyramid(dense, size, dense=True)
    if args.amp_compare:
        return amp_comparison(device, dense, args)
    model = tiny_model(device, args.preset)
    print(f"model: {args.preset} preset, tile {args.tile}, overlap {args.overlap}, batch {args.batch}")

    # (a), (b), (c) in turn, --repeats times, best of each: load from other processes varies.
    runs = {"a": [], "b": [], "c": [], "c2": []}
    if not args.no_monai and importlib.util.find_spec("monai") is None:
        args.no_monai = True
        print("(c) left out: MONAI is not installed (pip install -e '.[bench]')")
    for _ in range(args.repeats):
        runs["a"].append(raw_forward(model, dense, args.tile, args.overlap, args.batch))
        runs["b"].append(end_to_end(model, dense, work / "dense.ome.zarr", args.tile, args.overlap, args.batch))
        if not args.no_monai:
            runs["c"].append(monai(model, dense, args.tile, args.overlap, args.batch))
            runs["c2"].append(monai(model, dense, args.tile, args.overlap, args.batch, channels_last=True))
    raw, e2e = (max(runs[k], key=lambda d: d["mpx_per_s"]) for k in "ab")
    ratio = e2e["mpx_per_s"] / raw["mpx_per_s"]
    each = {k: " ".join(f"{d['mpx_per_s']:.3f}" for d in v) for k, v in runs.items()}
    print(f"(a) raw forward   {size}^2: {raw['tiles']} tiles, {raw['seconds']:.1f} s, {raw['mpx_per_s']:.3f} Mpx/s "
          f"(runs: {each['a']})")
    print(f"(b) segment       {size}^2: {e2e['tiles']} tiles, {e2e['seconds']:.1f} s, {e2e['mpx_per_s']:.3f} Mpx/s "
          f"= {ratio:.1%} of raw (runs: {each['b']})")
    mon = None
    if runs["c"]:
        mon = max(runs["c"], key=lambda d: d["mpx_per_s"])
        print(f"(c) MONAI sliding {size}^2: {mon['seconds']:.1f} s, {mon['mpx_per_s']:.3f} Mpx/s (runs: {each['c']}); "
              f"holds {mon['held_bytes'] / 2**20:.0f} MiB of input+output tensors (grows with the image)")
        mon2 = max(runs["c2"], key=lambda d: d["mpx_per_s"])
        print(f"(c') MONAI, NHWC windows {size}^2: {mon2['seconds']:.1f} s, {mon2['mpx_per_s']:.3f} Mpx/s "
              f"(runs: {each['c2']})")
    peaks = memory_sizes(work, sizes, args)
    growth = peaks[max(peaks)] / peaks[min(peaks)] if peaks else float("nan")
    summary = (f"summary: segment {e2e['mpx_per_s']:.3f} Mpx/s = {ratio:.0%} of raw {raw['mpx_per_s']:.3f}"
               + (f", MONAI {mon['mpx_per_s']:.3f} (NHWC windows {mon2['mpx_per_s']:.3f}) Mpx/s" if mon else "")
               + (f"; peak RSS {max(peaks)}^2 / {min(peaks)}^2 = {growth:.2f}x" if peaks else ""))
    print(summary)


if __name__ == "__main__":
    main()
