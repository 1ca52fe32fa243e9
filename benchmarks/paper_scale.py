"""The paper's claim at the paper's scale, in one command: does diffusion pretraining help from 3 labelled images?

Two arms, each run end to end through the engine (``genselfdiff.pretrain``, ``finetune``,
``segment`` with their configs), so the figures come from the code users run:

- **default**: our recipe (bf16, EMA, clipping, warm-up) at GPU scale: the largest batch that
  fits with room to spare (a 2-step probe measures the memory, up to --max-batch; an
  out-of-memory error halves it and starts the arm again), Adam at --pretrain-lr; with
  --compile, ``torch.compile`` (a compiler error is recorded and the arm starts again eager);
- **official**: the official recipe exactly as the engine runs it (``recipe="official"``, see
  genselfdiff.train.recipe): fp32, Adam 1e-4, batch 8, no EMA, clipping or warm-up, for both
  pretraining and fine-tuning; its models segment in fp32 as well.

Each arm pretrains for --pretrain-minutes on the 24 MoNuSeg training images outside the held-out
split (no labels), keeping its model at --checkpoints points of that time; then random
initialisation and each kept model are fine-tuned on 3 labelled images (dense masks, and strokes
simulated by benchmarks.common.simulate_strokes) for --finetune-steps, paired over --seeds (the same
patches and head for every start of a seed), and the 6 held-out images are segmented and scored
(pixel Dice of the nucleus class). It also reports pretraining images/s, fine-tuning images/s,
segmentation Mpx/s and the model FLOP utilisation (MFU: 3 x the forward FLOPs of a patch x
images/s over the GPU's dense bf16 peak).

Both arms pretrain first, then the fine-tuning runs go in order of importance, each over all
seeds before the next: random and the last model from masks, alternating arms; then strokes;
then the earlier models; the official arm's strokes last. A run that would not end inside
--budget-minutes is listed under ``skipped``. DIR/results.json is written atomically at the
start and after every phase and run, so a run cut off (or an arm that fails, whose error is
recorded) keeps what it did; at the end DIR/results.md (the table) and DIR/dice_vs_steps.png.

Data: --data DIR, a folder with images/ and masks/ PNGs of the same names (MoNuSeg's training
folder; ``make gpu-data`` copies it into .gpu-data/monuseg for the GPU machine). The split is
benchmarks.common's: every fifth image held out, the labelled images the first 3 of a fixed order.

--quick runs the same path on the CPU with the tiny network, one seed and a few steps, training
and scoring on crops of the images, in a few minutes. docs/gpu.md says how to run it on a GPU.

Run: python benchmarks/paper_scale.py --work DIR [--data DIR] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("genselfdiff") is None:  # a checkout run without installing (a GPU machine)
    sys.path.insert(0, str(ROOT / "src"))
if __package__ in (None, ""):  # run as a script, not with -m: the benchmarks package is the repository's
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_data_argument,
    data_folder,
    dice,
    fail,
    header,
    machine,
    read_mask,
    read_rgb,
    simulate_strokes,
    split,
)
from benchmarks.gpu_check import forward_flops, peak_flops  # noqa: E402

T_START = time.perf_counter()
ARMS = ("default", "official")
QUICK_CROP = 256  # --quick trains and scores on the centre crop of this side of each image
MEMORY_SHARE = 0.6  # the share of the GPU's memory the chosen batch may be expected to use


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the models and results")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny network, one seed, few steps, crops")
    add_data_argument(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--budget-minutes", type=float, default=9.0,
                   help="whole run, start-up included (9: inside a 10-minute device command)")
    p.add_argument("--pretrain-minutes", type=float, default=1.5, help="pretraining time of each arm")
    p.add_argument("--checkpoints", type=int, default=2,
                   help="models the default arm keeps (at ..., 1/4, 1/2 and all of its time); the official arm keeps its last")
    p.add_argument("--pretrain-lr", type=float, default=2e-4, help="the default arm's Adam rate (its large batches)")
    p.add_argument("--max-batch", type=int, default=128, help="largest pretraining batch of the default arm")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the default arm's pretraining (default: off, as the engine's; a cold "
                        "compilation takes a minute or more of an arm's minutes, and each kept point compiles again)")
    p.add_argument("--labelled", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--arms", default=",".join(ARMS), help="default, official or both")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(args.arms) - set(ARMS):
        p.error(f"--arms takes {' and '.join(ARMS)}")
    if args.quick:
        args.device = "cpu" if args.device == "auto" else args.device
        args.pretrain_minutes, args.finetune_steps = min(args.pretrain_minutes, 0.2), min(args.finetune_steps, 4)
        args.checkpoints, args.seeds, args.max_batch = 1, args.seeds[:1], 8
    return args


# --- data -------------------------------------------------------------------------------------

def load(args) -> dict:
    """The split: unlabelled pool images (paths: pretraining reads files), the labelled images with
    their masks and strokes, the held-out images with their masks (arrays)."""
    data = data_folder(args, args.work)
    held, pool = split(data)
    missing = [p.name for p in held + pool if not (data / "masks" / p.name).exists()]
    if missing:
        fail(f"{data} has no masks/{missing[0]} (nor {len(missing) - 1} more): --data takes a folder with images/ "
             f"and masks/ PNGs of the same names (make gpu-data copies MoNuSeg's).")
    crop = crop_centre if args.quick else (lambda a: a)
    labelled = pool[: args.labelled]
    masks = [crop(read_mask(data, p)) for p in labelled]
    rng = np.random.default_rng(0)  # one set of strokes for every run
    return {
        "data": data, "unlabelled": pool,
        "images": [crop(read_rgb(p)) for p in labelled],
        "labels": {"masks": [m.astype(np.uint8) for m in masks],
                   "strokes": [simulate_strokes(m, rng) for m in masks]},  # 0 unpainted, 1 background, 2 nucleus
        "held": [(p.stem, crop(read_rgb(p)), crop(read_mask(data, p))) for p in held],
        "names": {"held": [p.stem for p in held], "labelled": [p.stem for p in labelled]}}


def crop_centre(a: np.ndarray, side: int = QUICK_CROP) -> np.ndarray:
    y, x = max(0, (a.shape[0] - side) // 2), max(0, (a.shape[1] - side) // 2)
    return np.ascontiguousarray(a[y : y + side, x : x + side])


# --- pretraining ------------------------------------------------------------------------------

def out_of_memory():
    """The exception torch raises when the GPU's memory runs out (torch.OutOfMemoryError from 2.5 on,
    torch.cuda.OutOfMemoryError before; pyproject allows torch 2.2)."""
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def arm_config(arm: str, preset: str, args, batch=None, compile_=False, minutes=None):
    from genselfdiff import PretrainConfig

    if arm == "official":  # the recipe's own values: fp32, 1e-4, batch 8, no EMA, clipping or warm-up
        return PretrainConfig.from_preset(preset, recipe="official", minutes=minutes)
    return PretrainConfig.from_preset(preset, batch=batch, lr=args.pretrain_lr, compile=compile_, minutes=minutes)


def probe_batch(args, preset: str, sources, dev, work: Path) -> dict:
    """The default arm's batch: 2 eager steps at batch 16 measure the memory one image takes beyond
    the weights, Adam and EMA; the largest power of two expected within MEMORY_SHARE of the GPU."""
    import torch

    from genselfdiff import pretrain

    cfg = arm_config("default", preset, args, batch=8 if args.quick else 16)
    if dev.type != "cuda":
        return {"batch": cfg.batch, "how": "the preset's (no GPU to fill)"}
    cfg = replace(cfg, steps=2, val_every=0, val_batches=1)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        res = pretrain(sources, work / "probe.pt", cfg, device=str(dev))
    except out_of_memory():
        torch.cuda.empty_cache()
        return {"batch": 8, "how": f"the probe at batch {cfg.batch} ran out of GPU memory"}
    peak = torch.cuda.max_memory_allocated(dev)
    params = sum(p.numel() for p in res.net.parameters())
    fixed = 20 * params  # fp32 weights, gradients, Adam's two moments, EMA
    per_image = max(1.0, (peak - fixed) / cfg.batch)
    total = torch.cuda.get_device_properties(dev).total_memory
    batch = 8
    while batch * 2 <= args.max_batch and fixed + batch * 2 * per_image <= MEMORY_SHARE * total:
        batch *= 2
    del res
    torch.cuda.empty_cache()
    return {"batch": batch, "how": f"probe: {peak / 2**30:.2f} GiB at batch {cfg.batch}, "
                                   f"{per_image / 2**20:.0f} MiB an image, {total / 2**30:.0f} GiB on the GPU"}


def pretrain_arm(arm: str, args, preset: str, sources, dev, work: Path, batch=None, compile_=False) -> dict:
    """Pretrain one arm for --pretrain-minutes, in stages that end at the kept points (each stage
    resumes the last); the model kept at a point is the run's best by validation so far."""
    from genselfdiff import pretrain

    stages = args.checkpoints if arm == "default" else 1
    fractions = [2.0 ** (i + 1 - stages) for i in range(stages)]  # ..., 1/4, 1/2, 1
    out = work / f"{arm}_pretrained.pt"
    kept, done, history = [], 0.0, []
    for k, fraction in enumerate(fractions):
        cfg = arm_config(arm, preset, args, batch, compile_, minutes=args.pretrain_minutes * (fraction - done))
        res = pretrain(sources, out, cfg, device=str(dev), resume=k > 0, progress=ticker(f"{arm} pretrain"))
        done = fraction
        path = work / f"{arm}_pretrained_step{res.steps}.pt"
        shutil.copyfile(out, path)
        history = res.history
        kept.append({"steps": res.steps, "best_step": res.best_step, "path": str(path),
                     "val_loss": res.best_val_loss})
    speeds = [h["patches_per_s"] for h in history if h.get("patches_per_s")]
    return {"batch": cfg.batch if arm == "official" else batch, "lr": cfg.lr, "compiled": bool(compile_),
            "precision": "fp32" if arm == "official" else "bf16 where the device has it",
            "steps": kept[-1]["steps"], "images_per_s": statistics.median(speeds[1:] or speeds) if speeds else None,
            "checkpoints": kept}


def pretrain_default(args, preset, sources, dev, work: Path, results: dict, save) -> dict:
    """The default arm with its safety nets: the probed batch, halved after an out-of-memory error;
    compiled, and eager after a compiler error (recorded)."""
    oom = out_of_memory()
    compile_ = bool(args.compile)
    probe = probe_batch(args, preset, sources, dev, work)
    batch, notes = probe["batch"], [f"batch {probe['batch']} ({probe['how']})"]
    results["pretrain_notes"] = notes
    save()
    while True:
        try:
            return {**pretrain_arm("default", args, preset, sources, dev, work, batch, compile_), "notes": notes}
        except oom:
            if batch <= 8:
                raise
            notes.append(f"out of GPU memory at batch {batch}: starting again at {batch // 2}")
            batch //= 2
        except Exception as e:  # a compiler's failure can be of any type
            if not compile_:
                raise
            notes.append(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): "
                         "starting again eager")
            compile_ = False
        print(f"note: {notes[-1]}", flush=True)
        import torch

        torch.cuda.empty_cache()
        for leftover in work.glob("default_pretrained*"):
            leftover.unlink()
        save()


# --- fine-tuning and scoring --------------------------------------------------------------------

def plan_runs(args, starts: dict) -> list:
    """(arm, start name, pretrained path or None, pretrain steps, labels) in order of importance."""
    def run(arm, index, labels):
        if arm not in starts:
            return []
        if index is None:
            return [(arm, "random", None, 0, labels)]
        cks = starts[arm]
        if not cks or index >= len(cks) or (index < 0 and len(cks) < -index):
            return []
        c = cks[index]
        return [(arm, f"pretrained@{c['steps']}", c["path"], c["steps"], labels)]

    groups = [run("default", None, "masks") + run("official", None, "masks")
              + run("default", -1, "masks") + run("official", -1, "masks"),
              run("default", None, "strokes") + run("default", -1, "strokes")]
    earlier = [i for i in range(len(starts.get("default") or []) - 1)]
    groups += [sum((run("default", i, lab) for lab in ("masks", "strokes")), []) for i in reversed(earlier)]
    groups.append(run("official", None, "strokes") + run("official", -1, "strokes"))
    return [g for g in groups if g]


def finetune_and_score(args, preset, dev, data, arm, start, pretrained, labels, seed, work: Path) -> dict:
    from genselfdiff import FinetuneConfig, finetune, load_model, segment

    cfg = FinetuneConfig.from_preset(preset, recipe=arm, steps=args.finetune_steps, seed=seed, patience=0,
                                     sparse=labels == "strokes", class_names=["background", "nucleus"])
    out = work / f"ft_{arm}_{start.replace('@', '')}_{labels}_s{seed}.pt"
    res = finetune(data["images"], data["labels"][labels], out, cfg, pretrained=pretrained, device=dev,
                   progress=ticker(out.stem))
    model = load_model(out, dev)  # an official model segments in fp32: its checkpoint says so
    scores, rates = [], []
    for _, rgb, truth in data["held"]:
        seg = segment(model, rgb, skip_background=False)
        scores.append(dice(np.asarray(seg.labels) == 1, truth))
        rates.append(seg.mpx_per_s)
    return {"dice": scores, "steps": res.steps, "seconds": res.seconds, "batch": cfg.batch,
            "finetune_images_per_s": res.steps * (cfg.batch or 8) / max(res.seconds, 1e-9),
            "segment_mpx_per_s": statistics.median(rates), "amp": model.amp}


def ticker(name: str, every: int = 100):
    def tick(p):
        if p.done and p.done % every == 0 and p.stage in ("pretrain", "finetune") and p.payload is None:
            m = " ".join(f"{k} {v:.4g}" for k, v in p.metrics.items() if isinstance(v, float))
            print(f"  [{time.strftime('%H:%M:%S')}] {name} step {p.done} {m}", file=sys.stderr, flush=True)
    return tick


# --- output -----------------------------------------------------------------------------------

def table(results) -> str:
    rows = ["| arm | start | labels | pretrain steps | seeds | Dice (mean ± sd over seeds) | paired Δ vs random |",
            "|---|---|---|---|---|---|---|"]
    runs = results["runs"]
    for r in runs:
        d = {s: float(np.mean(v)) for s, v in zip(r["seeds"], r["dice"])}
        values = np.array(list(d.values()))
        rand = next((q for q in runs if q["start"] == "random" and q["arm"] == r["arm"] and q["labels"] == r["labels"]),
                    None)
        delta = ""
        if rand is not None and r is not rand:
            base = {s: float(np.mean(v)) for s, v in zip(rand["seeds"], rand["dice"])}
            diff = np.array([d[s] - base[s] for s in d if s in base])
            if len(diff):
                sd = f" ± {diff.std(ddof=1):.3f}" if len(diff) > 1 else ""
                delta = f"{diff.mean():+.3f}{sd} ({int((diff > 0).sum())}/{len(diff)} seeds better)"
        sd = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
        rows.append(f"| {r['arm']} | {r['start']} | {r['labels']} | {r['pretrain_steps']} | {len(values)} | "
                    f"{values.mean():.3f}{sd} | {delta} |")
    s = results.get("speed", {})
    if s:
        mfu = f"{100 * s['mfu']:.1f} %" if s.get("mfu") is not None else "n/a (no known peak for this device)"
        train = (f"training {s['train_images_per_s']:.1f} images/s ({s['train_tflops']:.2f} TFLOP/s, MFU {mfu}); "
                 if s.get("train_images_per_s") else "")
        rows += ["", f"{train}fine-tuning {s['finetune_images_per_s']:.1f} images/s; "
                     f"segmentation {s['segment_mpx_per_s']:.2f} Mpx/s"]
    if results["skipped"]:
        rows += ["", f"skipped (out of time): {len(results['skipped'])} run(s)"]
    return "\n".join(rows) + "\n"


def plot(results, path: Path) -> None:
    """Dice against pretraining steps, one line per arm and label kind (random initialisation at 0)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no matplotlib, no plot (the table has the figures)")
        return
    series = {}
    for r in results["runs"]:
        series.setdefault(f"{r['arm']}, {r['labels']}", []).append((r["pretrain_steps"], float(np.mean(r["dice"]))))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel("pretraining steps (0 = random initialisation)")
    ax.set_ylabel("held-out Dice (mean over seeds)")
    ax.set_title(f"MoNuSeg, {results['args']['labelled']} labelled images")
    ax.legend()
    fig.tight_layout()
    from genselfdiff.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = load(args)  # first: a --data folder without images and masks ends here, in one sentence
    import torch

    from genselfdiff.io.atomic import write_text
    from genselfdiff.io.pixelsize import PixelSizeWarning
    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.model import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    header(dev)
    deadline = T_START + 60 * args.budget_minutes
    preset = "tiny" if args.quick else "paper"
    warnings.filterwarnings("ignore", category=PixelSizeWarning)  # said once here, not in every run
    print("The PNGs state no pixel size: every phase works at their full resolution (MoNuSeg's 0.2527 µm/px, as the paper).")
    print(f"held out: {', '.join(data['names']['held'])}; labelled: {', '.join(data['names']['labelled'])}", flush=True)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": machine(dev), "preset": preset, "net": get_preset(preset).net.to_dict(),
               "names": data["names"], "data": str(data["data"]), "pretrain": {}, "errors": {}, "runs": [],
               "skipped": []}

    def save():
        results["wall_seconds"] = time.perf_counter() - T_START
        write_text(args.work / "results.json", json.dumps(results, indent=1, default=float))

    save()
    starts = {}
    for arm in args.arms:
        t = time.perf_counter()
        try:
            if arm == "default":
                pre = pretrain_default(args, preset, data["unlabelled"], dev, args.work, results, save)
            else:
                pre = pretrain_arm(arm, args, preset, data["unlabelled"], dev, args.work)
        except Exception as e:  # recorded; the other arm and the random starts go on
            traceback.print_exc()
            results["errors"][f"{arm} pretraining"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"error: {arm} pretraining failed: {results['errors'][f'{arm} pretraining']}", flush=True)
            starts[arm] = []
            save()
            continue
        pre["wall_seconds"] = time.perf_counter() - t
        results["pretrain"][arm] = pre
        starts[arm] = pre["checkpoints"]
        print(f"{arm}: pretrained {pre['steps']} steps of batch {pre['batch']} in {pre['wall_seconds'] / 60:.1f} min "
              f"({pre['images_per_s'] or float('nan'):.1f} images/s, compiled: {pre['compiled']})", flush=True)
        save()

    durations = []
    for group in plan_runs(args, starts):
        for arm, start, path, steps, labels in group:
            run = {"arm": arm, "start": start, "pretrain_steps": steps, "labels": labels, "seeds": [], "dice": [],
                   "details": []}
            for seed in args.seeds:
                expected = statistics.median(durations) if durations else 30.0
                if time.perf_counter() + expected > deadline:
                    results["skipped"].append(f"{arm} {start} {labels} seed {seed}: out of time")
                    continue
                t = time.perf_counter()
                try:
                    r = finetune_and_score(args, preset, dev, data, arm, start, path, labels, seed, args.work)
                except Exception as e:  # recorded; the next run goes on
                    traceback.print_exc()
                    results["errors"][f"{arm} {start} {labels} seed {seed}"] = f"{type(e).__name__}: {e}"[:300]
                    save()
                    continue
                durations.append(time.perf_counter() - t)
                run["seeds"].append(seed)
                run["dice"].append(r.pop("dice"))
                run["details"].append(r)
                if run not in results["runs"]:
                    results["runs"].append(run)
                save()
            if run["seeds"]:
                print(f"  {arm:>8} {start:>18} {labels:>7}: Dice {np.mean(run['dice']):.3f} "
                      f"({len(run['seeds'])} seed(s))", flush=True)

    details = [d for r in results["runs"] for d in r["details"]]
    default = results["pretrain"].get("default") or {}
    speed = default.get("images_per_s")
    fwd = forward_flops(results["net"], get_preset(preset).patch)
    peak = peak_flops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    train_flops = 3 * fwd * speed if speed else None
    results["speed"] = {
        "train_images_per_s": speed, "forward_gflops_per_image": fwd / 1e9,
        "train_tflops": train_flops / 1e12 if train_flops else None, "peak_tflops": peak / 1e12 if peak else None,
        "mfu": train_flops / peak if peak and train_flops else None,
        "finetune_images_per_s": statistics.median([d["finetune_images_per_s"] for d in details]) if details else float("nan"),
        "segment_mpx_per_s": statistics.median([d["segment_mpx_per_s"] for d in details]) if details else float("nan")}
    save()
    md = table(results)
    write_text(args.work / "results.md", md)
    if results["runs"]:
        plot(results, args.work / "dice_vs_steps.png")
    print("\n" + md)
    for what, why in results["errors"].items():
        print(f"error: {what}: {why}")
    parts = []
    for arm in args.arms:
        arm_runs = [r for r in results["runs"] if r["arm"] == arm and r["labels"] == "masks"]
        rand = next((r for r in arm_runs if r["start"] == "random"), None)
        best = max((r for r in arm_runs if r["start"] != "random"), key=lambda r: np.mean(r["dice"]), default=None)
        parts.append(f"{arm}: random {np.mean(rand['dice']) if rand else float('nan'):.3f}, "
                     f"best pretrained {np.mean(best['dice']) if best else float('nan'):.3f}")
    s = results["speed"]
    print(f"summary: {preset} U-Net, {args.labelled} labelled images, masks | {' | '.join(parts)} | "
          f"{s['train_images_per_s'] or float('nan'):.1f} img/s, {s['segment_mpx_per_s']:.2f} Mpx/s | "
          f"{len(results['skipped'])} skipped, {len(results['errors'])} error(s) | {results['wall_seconds'] / 60:.1f} min",
          flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
