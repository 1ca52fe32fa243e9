"""``segment`` on a whole 40x slide: wall time, Mpx/s and peak memory, beside a 4k² slide.

In one run, with one model and the same settings (the engine's tile, overlap, batch and output
chunk; ``--threads``), for a ``--baseline``² slide and then a ``--side`` x 3/4 ``--side`` slide:

(a) the slide: a JPEG pyramidal OME-TIFF at 0.25 µm/px (40x) written tile by tile, never held
    in memory: a grid of tissue islands on white glass, one square of ``--cell``/sqrt(2) px
    centred in every ``--cell`` px square, so half of every slide is tissue (synthetic, drawn at
    0.5 µm/px, enlarged twice, repeating every 2048 px) and the glass between the islands, which
    reaches the slide's edges, is what the tissue map lets ``segment`` skip. (A checkerboard
    would not do: the tissue map fills holes, and glass squares enclosed by tissue are holes.)
(b) ``python -m genselfdiff segment MODEL SLIDE --out OUT`` in its own process under
    ``/usr/bin/time -v`` (where there is none, by polling the process's VmHWM): its wall time,
    its peak RSS, the engine's own Mpx/s (processing-level pixels per second of its run) and the
    slide's level-0 Mpx per second of wall time.

The model is the small one :mod:`benchmarks.resume` trains (``tiny``, 0.5 µm/px, so the network
runs on the slide's level 1). Results go to ``WORK/whole_slide.json`` after each size. The
summary gives the large slide's figures and the ratio of its peak RSS to the baseline's, which
should stay at most 1.2x.

    python -m benchmarks.whole_slide [--quick] [--side 80000] [--baseline 4096] [--work DIR]
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import ROOT, fail, header
from .resume import SLIDE_MPP, small_model, write_results

TEXTURE_SIDE = 1024  # synthetic tissue drawn at 0.5 µm/px, so 2048 px of the slide before it repeats
RATIO_LIMIT = 1.2  # peak RSS of the large slide over the baseline's


def island_slide(path: Path, width: int, height: int, cell: int, tile: int = 512) -> Path:
    """A JPEG pyramidal OME-TIFF of ``width`` x ``height`` px at 0.25 µm/px: in every ``cell``-px square
    of a grid, a centred tissue island of ``cell``/sqrt(2) px (half the area), glass around it.
    Written tile by tile from a repeating texture; memory is a few tiles and the texture's pyramid,
    whatever the size."""
    import tifffile
    from scipy import ndimage as ndi

    from genselfdiff.app.synthetic import GLASS, downsample2, synthetic_tissue
    from genselfdiff.io.atomic import atomic_path

    rgb = synthetic_tissue((TEXTURE_SIDE, TEXTURE_SIDE), seed=0, glass=0.0)[0]
    textures = [np.clip(ndi.zoom(rgb, (2, 2, 1), order=1), 0, 255).astype(np.uint8)]
    sizes = [(height, width)]
    while min(sizes[-1]) // 2 >= 256:
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
        textures.append(downsample2(textures[-1]) if textures[-1].shape[0] >= 2 else textures[-1])
    glass = np.empty((tile, tile, 3), np.uint8)
    glass[:] = np.round(GLASS).astype(np.uint8)
    side = round(cell / math.sqrt(2))
    start = (cell - side) // 2

    def inside(coords):  # level-0 coordinates within an island along one axis
        return (coords % cell >= start) & (coords % cell < start + side)

    def tiles(k):
        (h, w), f, tex = sizes[k], 2**k, textures[k]
        ts = tex.shape[0]
        for ty in range(0, h, tile):
            ys = np.arange(ty, ty + tile)
            on_y = inside(ys * f)
            for tx in range(0, w, tile):
                xs = np.arange(tx, tx + tile)
                tissue = on_y[:, None] & inside(xs * f)[None, :]
                if not tissue.any():
                    yield glass
                    continue
                out = tex[np.ix_(ys % ts, xs % ts)]
                out[~tissue] = glass[0, 0]
                yield out

    meta = {"axes": "YXS", "PhysicalSizeX": SLIDE_MPP, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": SLIDE_MPP,
            "PhysicalSizeYUnit": "µm"}
    opts = dict(photometric="rgb", tile=(tile, tile), compression="jpeg", dtype=np.uint8)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        tw.write(tiles(0), shape=(height, width, 3), subifds=len(sizes) - 1, metadata=meta, **opts)
        for k in range(1, len(sizes)):
            tw.write(tiles(k), shape=(*sizes[k], 3), subfiletype=1, metadata=None, **opts)
    return path


# --- one measured segment run ---------------------------------------------------------------------

def measured(cmd: list, log: Path) -> dict:
    """Run ``cmd`` with its stderr in ``log``: exit status, wall seconds and peak RSS in bytes
    (``/usr/bin/time -v``'s maximum resident set size, else the largest VmHWM polled every 0.2 s),
    and with ``/usr/bin/time`` the CPU seconds (user + system): on a shared machine the share of a
    core the run got says how much of the wall time was waiting."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    report = log.with_suffix(".time")
    wrapped = [time_bin, "-v", "-o", str(report), *cmd] if time_bin else cmd
    polled = [0]

    def poll(pid):
        status = Path(f"/proc/{pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        polled[0] = max(polled[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.2)

    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(wrapped, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        watcher = None if time_bin else threading.Thread(target=poll, args=(proc.pid,), daemon=True)
        if watcher:
            watcher.start()
        proc.wait()
        if watcher:
            watcher.join()
    seconds = time.perf_counter() - t0
    peak, how = polled[0], "VmHWM polled every 0.2 s"
    cpu = None
    if time_bin and report.exists():
        text = report.read_text()
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        peak, how = (int(m.group(1)) * 1024 if m else 0), "/usr/bin/time -v"
        cpu = sum(float(v) for v in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)) or None
    return {"exit": proc.returncode, "seconds": seconds, "peak": peak, "peak_by": how, "cpu_seconds": cpu}


def engine_figures(log: Path) -> dict:
    """The CLI's summary of its image: tiles, tiles without tissue, its seconds and Mpx/s."""
    text = log.read_text(errors="replace")
    m = re.search(r"(\d+) tiles \((\d+) without tissue\)(?:, \d+ chunk\(s\) resumed)?, ([\d.]+) s, ([\d.eE+-]+) Mpx/s",
                  text)
    if not m:
        return {}
    return {"tiles": int(m.group(1)), "glass_tiles": int(m.group(2)), "engine_seconds": float(m.group(3)),
            "engine_mpx_per_s": float(m.group(4))}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def one_size(work: Path, model: Path, width: int, height: int, args) -> dict:
    """(a) and (b) for one slide size; the output is removed afterwards, the slide kept in ``work``."""
    slide = work / f"islands_{width}x{height}_{args.cell}.ome.tif"
    t0 = time.perf_counter()
    if not slide.exists():
        island_slide(slide, width, height, args.cell)
    written = time.perf_counter() - t0
    out = work / f"out_{width}x{height}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "genselfdiff", "segment", str(model), str(slide), "--out", str(out),
           "--threads", str(args.threads), "--device", args.device]
    log = work / f"segment_{width}x{height}.log"
    d = measured(cmd, log)
    if d["exit"]:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"segment of {slide.name} ended with exit {d['exit']}: {' | '.join(tail)}")
    d.update(engine_figures(log))
    d.update(width=width, height=height, level0_mpx=width * height / 1e6, slide_written_s=round(written, 1),
             slide_bytes=slide.stat().st_size, output_bytes=folder_bytes(out),
             wall_level0_mpx_per_s=width * height / 1e6 / d["seconds"])
    shutil.rmtree(out, ignore_errors=True)
    return d


def line(d: dict) -> str:
    glass = f", {d['glass_tiles']} of {d['tiles']} tiles glass" if "tiles" in d else ""
    engine = f", engine {d['engine_mpx_per_s']:.3g} Mpx/s (processing level)" if "engine_mpx_per_s" in d else ""
    cpu = f" ({d['cpu_seconds']:.0f} CPU s)" if d.get("cpu_seconds") else ""
    return (f"{d['width']} x {d['height']} ({d['level0_mpx']:.0f} Mpx at level 0): segment {d['seconds']:.0f} s wall{cpu}, "
            f"peak RSS {d['peak'] / 2**20:.0f} MiB, {d['wall_level0_mpx_per_s']:.3g} level-0 Mpx/s of wall{engine}"
            f"{glass}; slide {d['slide_bytes'] / 2**20:.0f} MiB written in {d['slide_written_s']:.0f} s, "
            f"output {d['output_bytes'] / 2**20:.1f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test, not a measurement: 1024² beside 2048 x 1536, "
                                                        "512-px pitch, a model trained for 5 steps")
    p.add_argument("--side", type=int, help="width of the large slide in px, its height 3/4 of it (default 80000)")
    p.add_argument("--baseline", type=int, help="side of the square baseline slide (default 4096, quick 1024)")
    p.add_argument("--cell", type=int, help="pitch of the tissue islands in px (default 4096, quick 512)")
    p.add_argument("--steps", type=int, help="fine-tuning steps of the model (default 200, quick 5)")
    p.add_argument("--threads", type=int, default=1, help="segment --threads (default %(default)s)")
    p.add_argument("--device", default="cpu", help="segment --device (default %(default)s)")
    p.add_argument("--work", type=Path, help="folder for the model and slides, kept for reruns (default: a "
                                             "temporary one, removed at the end)")
    args = p.parse_args()
    side = args.side or (2048 if args.quick else 80000)
    baseline = args.baseline or (1024 if args.quick else 4096)
    args.cell = args.cell or (512 if args.quick else 4096)
    steps = args.steps or (5 if args.quick else 200)
    if min(side * 3 // 4, baseline) < 1024 or args.cell < 64 or steps < 1 or args.threads < 1:
        fail("--side must be at least 1366 and --baseline at least 1024 px, --cell at least 64, and --steps and "
             "--threads at least 1.")
    if args.work is not None and args.work.exists() and not args.work.is_dir():
        fail(f"--work {args.work} is a file; give a folder for the model and the slides.")
    work = args.work or Path(tempfile.mkdtemp(prefix="genselfdiff-wsi-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    header(args.device)
    model = small_model(work, steps, args.device)
    print(f"slides: 0.25 µm/px, half tissue: an island of {round(args.cell / math.sqrt(2))} px in every {args.cell}-px "
          f"square, glass between; segment --threads "
          f"{args.threads}, the engine's tile and batch, network on level 1 (0.5 µm/px)", flush=True)
    results = {"sizes": []}
    out_file = work / "whole_slide.json"
    try:
        for width, height in ((baseline, baseline), (side, side * 3 // 4)):
            d = one_size(work, model, width, height, args)
            results["sizes"].append(d)
            write_results(out_file, results)
            print(line(d), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    small, large = results["sizes"]
    ratio = large["peak"] / small["peak"]
    verdict = "within" if ratio <= RATIO_LIMIT else "OVER"
    print(f"results: {out_file if args.work else '(temporary folder, removed)'}")
    print(f"summary: {large['width']} x {large['height']} slide: {large['seconds']:.0f} s, "
          f"{large.get('engine_mpx_per_s', float('nan')):.3g} Mpx/s (engine, processing level), peak RSS "
          f"{large['peak'] / 2**20:.0f} MiB; {baseline}² {small['seconds']:.0f} s, peak {small['peak'] / 2**20:.0f} MiB; "
          f"peak ratio {ratio:.2f}x ({verdict} the {RATIO_LIMIT}x limit)")


if __name__ == "__main__":
    main()
