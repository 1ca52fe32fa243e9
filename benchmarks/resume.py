"""Kill ``segment`` with SIGKILL at random moments, run it again, and compare with an uninterrupted run.

In one run, on a synthetic 40x slide (``--side`` px square at 0.25 µm/px, segmented at the
model's 0.5 µm/px) and a small model trained for ``--steps`` steps with ``genselfdiff.finetune``
on synthetic tissue:

(a) reference: ``python -m genselfdiff segment MODEL SLIDE --out REF`` once, uninterrupted; its
    wall time T;
(b) ``--kills`` times: the same command into a fresh folder, killed with SIGKILL at a moment drawn
    uniformly from 10-90 % of T (``--seed``), then the same command again to the end (a rerun
    computes only the chunks the first did not finish); every pyramid level of the final labels
    is compared pixel by pixel with (a). Other jobs on a shared machine change how long a run
    takes: a run that ends before its kill becomes the new T and the moment is drawn again (at
    most ``ATTEMPTS`` draws per run; every attempt is in the table).

The table (run, kill time, chunks finished at the kill, resume time, pixels differing) is
printed and written to ``WORK/resume.json`` after every run. All runs use the same settings
(``--threads``, the engine's tile, overlap and batch), so a difference can only come from the
interruption.

    python -m benchmarks.resume [--quick] [--side 4096] [--kills 10] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import MPP, ROOT, fail, header, write_synthetic_set

SLIDE_MPP = 0.25  # the synthetic slides are 40x
ATTEMPTS = 3  # draws per run while the run ends before its kill


# --- what the runs share: a small trained model and a synthetic slide ---------------------------

def small_model(work: Path, steps: int, device: str = "cpu") -> Path:
    """A ``tiny`` segmentation model (background, nucleus) trained for ``steps`` steps by
    ``genselfdiff.finetune`` on two synthetic images at the engine's 0.5 µm/px (written once)."""
    from genselfdiff import finetune
    from genselfdiff.train.config import FinetuneConfig

    out = Path(work) / f"model_tiny_{steps}.pt"
    if out.exists():
        return out
    data = write_synthetic_set(Path(work) / "synthetic", n=2, side=512)
    images = sorted((data / "images").glob("*.png"))
    masks = [data / "masks" / p.name for p in images]
    cfg = FinetuneConfig.from_preset("tiny", steps=steps, patience=0, seed=0, class_names=["background", "nucleus"])
    t0 = time.perf_counter()
    r = finetune([str(p) for p in images], [str(m) for m in masks], out, cfg, device=device, pixel_size=MPP)
    print(f"model: tiny, {r.steps} steps of genselfdiff.finetune on 2 synthetic images in "
          f"{time.perf_counter() - t0:.0f} s (validation Dice {r.best_dice:.3f}) -> {out}", flush=True)
    return out


def synthetic_slide(work: Path, side: int) -> Path:
    """A ``side``² pyramidal OME-TIFF at 0.25 µm/px: synthetic tissue with glass regions, drawn at
    0.5 µm/px (its nuclei at their true size) and enlarged twice (written once)."""
    from scipy import ndimage as ndi

    from genselfdiff.app.synthetic import synthetic_tissue, write_pyramidal_tiff

    path = Path(work) / f"tissue_{side}.ome.tif"
    if not path.exists():
        rgb = synthetic_tissue((side // 2, side // 2), seed=5, glass=0.3)[0]
        rgb = np.clip(ndi.zoom(rgb, (2, 2, 1), order=1), 0, 255).astype(np.uint8)
        write_pyramidal_tiff(path, rgb, mpp=SLIDE_MPP, tile=512, compression="jpeg")
    return path


def segment_command(model: Path, slide: Path, out: Path, threads: int, device: str) -> list:
    return [sys.executable, "-m", "genselfdiff", "segment", str(model), str(slide), "--out", str(out),
            "--threads", str(threads), "--device", device]


# --- one interrupted and resumed run -------------------------------------------------------------

def output_of(out_dir: Path) -> Path:
    """The one NAME.ome.zarr a segment run writes into ``out_dir`` (None before it exists)."""
    found = sorted(Path(out_dir).glob("*.ome.zarr"))
    return found[0] if found else None


def state_at_kill(out_dir: Path, units: int) -> str:
    """What an interrupted output holds: none yet, k of n chunks, or complete."""
    from genselfdiff.io.omezarr import PROGRESS, read_attributes

    zarr_dir = output_of(out_dir)
    if zarr_dir is None:
        return "no output yet"
    attrs = read_attributes(zarr_dir) or {}
    if "ome" in attrs:
        return "complete"
    done = len(list((zarr_dir / PROGRESS).glob("*_*"))) if (zarr_dir / PROGRESS).is_dir() else 0
    return f"{done} of {units} chunks"


def differing_pixels(a: Path, b: Path) -> tuple:
    """(level-0 pixels that differ, pixels that differ over all levels, levels) of two label images,
    read chunk by chunk; a level one of them lacks counts as wholly different."""
    import zarr

    level0 = total = levels = 0
    while (a / str(levels)).exists() or (b / str(levels)).exists():
        k = levels
        levels += 1
        if not ((a / str(k)).exists() and (b / str(k)).exists()):
            total += int(np.prod(zarr.open_array(a / str(k) if (a / str(k)).exists() else b / str(k), mode="r").shape))
            continue
        x, y = zarr.open_array(a / str(k), mode="r"), zarr.open_array(b / str(k), mode="r")
        if x.shape != y.shape:
            n = max(int(np.prod(x.shape)), int(np.prod(y.shape)))
        else:
            n, (cy, cx) = 0, x.chunks
            for i in range(0, x.shape[0], cy):
                for j in range(0, x.shape[1], cx):
                    n += int((np.asarray(x[i : i + cy, j : j + cx]) != np.asarray(y[i : i + cy, j : j + cx])).sum())
        total += n
        level0 = n if k == 0 else level0
    return level0, total, levels


def interrupted_run(cmd: list, out_dir: Path, kill_at: float, units: int, ref: Path) -> dict:
    """Start ``cmd``, SIGKILL it ``kill_at`` s later, rerun it to the end, compare with ``ref``."""
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=kill_at)
        killed = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        killed = True
    proc.communicate()
    stopped_after = time.perf_counter() - t0
    state = state_at_kill(out_dir, units) if killed else f"finished before the kill (exit {proc.returncode})"
    t1 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    resume = time.perf_counter() - t1
    d = {"kill_at_s": round(kill_at, 2), "stopped_after_s": round(stopped_after, 2), "killed": killed,
         "state_at_kill": state, "resume_s": round(resume, 2), "resume_exit": res.returncode}
    final = output_of(out_dir)
    if res.returncode or final is None:
        d.update(error=res.stderr.strip().splitlines()[-1:] or ["no output"], identical=False, pixels_differing=None)
        return d
    level0, total, levels = differing_pixels(ref, final)
    d.update(pixels_differing=level0, pixels_differing_all_levels=total, levels=levels,
             identical=(total == 0), resumed_note=_resumed_note(res.stderr))
    return d


def _resumed_note(stderr: str) -> str:
    """The CLI's own count of chunks it found finished, e.g. '3 chunk(s) resumed' ('' when none)."""
    import re

    m = re.search(r"(\d+) chunk\(s\) resumed", stderr)
    return f"{m.group(1)} chunk(s) resumed" if m else "0 chunks resumed"


def units_of(model: Path, slide: Path, device: str) -> int:
    """How many output chunks (units) the engine cuts the slide into."""
    from genselfdiff.infer.plan import make_plan
    from genselfdiff.nn.model import load_model

    return len(make_plan(load_model(model, device), str(slide), skip_background=False).units)


def write_results(path: Path, results: dict) -> None:
    from genselfdiff.io.atomic import write_text

    write_text(path, json.dumps(results, indent=1))


def row(i, r: dict, reference_s: float) -> str:
    differ = "-" if r["pixels_differing"] is None else f"{r['pixels_differing']:,}"
    kill = f"{r['kill_at_s']:.1f} s ({r['kill_at_s'] / reference_s:.0%})"
    state = r["state_at_kill"] if r["killed"] else "not killed: " + r["state_at_kill"]
    extra = f"  ERROR: {r['error'][0]}" if "error" in r else ""
    run = f"{i}" if r.get("attempt", 1) == 1 else f"{i} (draw {r['attempt']})"
    return f"| {run} | {kill} | {state} | {r['resume_s']:.1f} s | {differ} |{extra}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test, not a measurement: a 1024² slide, 2 kills, "
                                                        "a model trained for 5 steps")
    p.add_argument("--side", type=int, help="side of the 0.25 µm/px slide in pixels (default 4096, quick 1024)")
    p.add_argument("--kills", type=int, help="interrupted runs (default 10, quick 2)")
    p.add_argument("--steps", type=int, help="fine-tuning steps of the model (default 200, quick 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="segment --threads for every run (default %(default)s)")
    p.add_argument("--device", default="cpu", help="segment --device (default %(default)s)")
    p.add_argument("--work", type=Path, help="folder for the model, slide and outputs (default: a temporary one)")
    args = p.parse_args()
    side = args.side or (1024 if args.quick else 4096)
    kills = args.kills if args.kills is not None else (2 if args.quick else 10)
    steps = args.steps or (5 if args.quick else 200)
    if side < 512 or kills < 1 or steps < 1 or args.threads < 1:
        fail("--side must be at least 512, and --kills, --steps and --threads at least 1.")
    if args.work is not None and args.work.exists() and not args.work.is_dir():
        fail(f"--work {args.work} is a file; give a folder for the model, the slide and the outputs.")
    work = args.work or Path(tempfile.mkdtemp(prefix="genselfdiff-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    header(args.device)
    model = small_model(work, steps, args.device)
    slide = synthetic_slide(work, side)
    units = units_of(model, slide, args.device)

    ref_dir = work / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = subprocess.run(segment_command(model, slide, ref_dir, args.threads, args.device), cwd=ROOT,
                         capture_output=True, text=True)
    reference_s = time.perf_counter() - t0
    if res.returncode or output_of(ref_dir) is None:
        raise RuntimeError(f"the uninterrupted run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    ref = output_of(ref_dir)
    labels0 = _foreground_share(ref)
    print(f"slide: {side}² at {SLIDE_MPP} µm/px ({slide.name}), {units} output chunks; uninterrupted segment "
          f"{reference_s:.1f} s, nucleus share of level 0 {labels0:.1%}", flush=True)
    results = {"command": " ".join(segment_command(model, slide, Path("OUT"), args.threads, args.device)),
               "side": side, "units": units, "reference_s": round(reference_s, 2), "seed": args.seed, "runs": []}
    out_file = work / "resume.json"
    write_results(out_file, results)

    rng = np.random.default_rng(args.seed)
    print("| run | kill at (share of a whole run) | output at the kill | resume | level-0 pixels differing |")
    print("|---|---|---|---|---|", flush=True)
    expected = reference_s  # how long a whole run takes now; other jobs on the machine change it
    for i in range(1, kills + 1):
        for attempt in range(1, ATTEMPTS + 1):
            kill_at = float(rng.uniform(0.1, 0.9)) * expected
            cmd = segment_command(model, slide, work / "interrupted", args.threads, args.device)
            r = interrupted_run(cmd, work / "interrupted", kill_at, units, ref)
            r.update(run=i, attempt=attempt, expected_s=round(expected, 2))
            results["runs"].append(r)
            write_results(out_file, results)
            print(row(i, r, expected), flush=True)
            if r["killed"]:
                break
            # The machine got faster than the estimate: the run is the new estimate, and the draw is repeated.
            expected = r["stopped_after_s"]
    shutil.rmtree(work / "interrupted", ignore_errors=True)
    last = {r["run"]: r for r in results["runs"]}.values()  # each run's final attempt
    same = sum(r["identical"] for r in last)
    killed = sum(r["killed"] for r in last)
    kept = sum(r["killed"] and r["state_at_kill"].split()[0].isdigit() and r["state_at_kill"].split()[0] != "0"
               for r in last)
    results["identical"] = same
    write_results(out_file, results)
    print(f"results: {out_file}")
    print(f"summary: {same} of {kills} identical after SIGKILL and resume ({killed} killed mid-run, {kept} of them "
          f"with finished chunks kept), "
          f"{side}² slide at {SLIDE_MPP} µm/px, {units} chunks, uninterrupted {reference_s:.1f} s")


def _foreground_share(zarr_dir: Path) -> float:
    """Share of level-0 pixels that are not background: the comparison has something to compare."""
    import zarr

    arr = zarr.open_array(zarr_dir / "0", mode="r")
    cy, cx = arr.chunks
    fg = sum(int((np.asarray(arr[i : i + cy, j : j + cx]) > 0).sum())
             for i in range(0, arr.shape[0], cy) for j in range(0, arr.shape[1], cx))
    return fg / arr.size


if __name__ == "__main__":
    main()
