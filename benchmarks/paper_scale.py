"""The paper's claim at the paper's scale, in one command: does diffusion pretraining help from 3 labelled images?

On one GPU, within --budget-minutes of wall-clock (10, start-up included):
1. pretrain the paper's U-Net (width 64, 256-px patches; bf16, the largest batch that fits
   up to --max-batch, torch.compile if it measures faster) on the 24 MoNuSeg training
   images outside the held-out split (no labels), keeping its weights at a few step counts;
2. fine-tune each of those starts and random initialisation on 3 labelled images, from
   dense masks and from simulated strokes, paired over --seeds (each seed: the same
   patches, augmentations and head for every start), with our recipe, then the official
   one (genselfdiff.train.recipe) for the last pretrained start and random init while time is left;
3. score the 6 held-out images (pixel Dice of the nucleus class), and measure training
   images/s, segmentation Mpx/s and the model FLOP utilisation.
It writes DIR/results.json, DIR/results.md (the table) and DIR/dice_vs_steps.png.

The split is benchmarks/label_efficiency.py's (benchmarks/_common.py): every fifth image
is held out and seen by no phase, the labelled images are the first 3 of its fixed order.
Training runs on in-memory tensors with the engine's network, schedule, losses,
augmentation and recipes, not through ``genselfdiff.train.pretrain``/``finetune``: the GPU
machine has no dask, zarr or imagecodecs, which the engine's slide reader needs. Runs of
the study have a fixed step budget (no validation split from 3 images), so paired runs
see the same data.

--quick runs the same path on the CPU with the tiny network and a few steps, scoring a
centre crop of each held-out image, in a few minutes. CI does not run this.

Run: python benchmarks/paper_scale.py --work DIR [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import DATA, dice, machine, read_mask, read_rgb, simulate_strokes, split  # benchmarks/ is on sys.path

T_START = time.perf_counter()
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s per GPU (SXM)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for checkpoints and results")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny network, few steps, centre crops")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--device", default="auto")
    p.add_argument("--budget-minutes", type=float, default=9.0,
                   help="whole run, start-up included (9: inside a 10-minute device command)")
    p.add_argument("--pretrain-minutes", type=float, default=3.5)
    p.add_argument("--checkpoints", type=int, default=3, help="pretrained starts kept (at 1/4, 1/2, 1 of the time)")
    p.add_argument("--pretrain-lr", type=float, default=2e-4)
    p.add_argument("--max-batch", type=int, default=128, help="largest pretraining batch tried")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--labelled", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--finetune-batch", type=int, default=16)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.device = "cpu" if args.device == "auto" else args.device
        args.pretrain_minutes, args.finetune_steps, args.finetune_batch = 0.5, 6, 4
        args.max_batch, args.compile, args.checkpoints = 8, "off", 2
    return args


# --- data ------------------------------------------------------------------------------------

def load(args):
    held, pool = split(args.data)
    labelled = pool[: args.labelled]
    rng = np.random.default_rng(0)
    masks = [read_mask(args.data, p) for p in labelled]
    return dict(
        unlabelled=np.stack([read_rgb(p) for p in pool]),
        images=np.stack([read_rgb(p) for p in labelled]),
        dense=np.stack(masks).astype(np.int64),  # 0 background, 1 nucleus
        strokes=np.stack([simulate_strokes(m, rng) for m in masks]).astype(np.int64) - 1,  # -1 = unlabelled
        held=[(p.stem, read_rgb(p), read_mask(args.data, p)) for p in held],
        names=dict(held=[p.stem for p in held], labelled=[p.stem for p in labelled]))


def crops(images: np.ndarray, labels, patch: int, n: int, rng: np.random.Generator):
    """n random patch x patch crops (and their labels) from uint8 (K, H, W, 3) images."""
    k = rng.integers(len(images), size=n)
    y = rng.integers(images.shape[1] - patch + 1, size=n)
    x = rng.integers(images.shape[2] - patch + 1, size=n)
    imgs = np.stack([images[a, b : b + patch, c : c + patch] for a, b, c in zip(k, y, x)])
    labs = None if labels is None else np.stack([labels[a, b : b + patch, c : c + patch] for a, b, c in zip(k, y, x)])
    return imgs, labs


# --- pretraining -------------------------------------------------------------------------------

def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


class Pretrainer:
    """The engine's pretext task (quadratic schedule, P2 loss, [-1, 1], flips) on in-memory images."""

    def __init__(self, net_cfg, patch, lr, dev, amp):
        import torch

        from genselfdiff.nn.schedule import Schedule
        from genselfdiff.nn.unet import UNet

        torch.manual_seed(0)
        self.net = UNet(net_cfg).to(dev, memory_format=torch.channels_last if dev.type == "cuda" else torch.contiguous_format)
        self.model = self.net
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, fused=dev.type == "cuda" or None)
        self.schedule = Schedule.quadratic()
        self.patch, self.dev, self.amp, self.lr, self.step = patch, dev, amp, lr, 0

    def train_step(self, x_uint8) -> float:
        import torch

        from genselfdiff.nn.model import to_input
        from genselfdiff.nn.schedule import p2_loss, q_sample

        x0 = to_input(x_uint8, self.dev)
        flip = torch.rand(2) < 0.5
        x0 = x0.flip(2) if flip[0] else x0
        x0 = x0.flip(3) if flip[1] else x0
        t = torch.randint(0, 1000, (x0.shape[0],), device=self.dev)
        noise = torch.randn_like(x0)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
            eps = self.model(q_sample(self.schedule, x0, t, noise), t)
        loss = p2_loss(self.schedule, eps, noise, t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        for g in self.opt.param_groups:  # the engine's linear warm-up over 100 steps
            g["lr"] = self.lr * min(1.0, (self.step + 1) / 100)
        self.opt.step()
        self.step += 1
        return loss.detach()


def largest_batch(args, net_cfg, patch, dev, amp, data) -> int:
    """Double the batch from 8 while a training step fits in GPU memory (up to --max-batch)."""
    import torch

    if dev.type != "cuda":
        return min(8, args.max_batch)
    best, b = 8, 8
    while b <= args.max_batch:
        trial = Pretrainer(net_cfg, patch, 1e-4, dev, amp)
        try:
            trial.train_step(crops(data, None, patch, b, np.random.default_rng(b))[0])
            sync(dev)
            best = b
        except torch.OutOfMemoryError:
            break
        finally:
            del trial
            torch.cuda.empty_cache()
        b *= 2
    return best


def rate(pre: Pretrainer, data, batch, steps: int) -> float:
    """Training images per second over ``steps`` steps (after the call has warmed up)."""
    rng = np.random.default_rng(123)
    sync(pre.dev)
    t = time.perf_counter()
    for _ in range(steps):
        pre.train_step(crops(data, None, pre.patch, batch, rng)[0])
    sync(pre.dev)
    return steps * batch / (time.perf_counter() - t)


def pretrain(args, net_cfg, patch, dev, data, work: Path) -> dict:
    import torch

    amp = dev.type == "cuda"
    batch = largest_batch(args, net_cfg, patch, dev, amp, data)
    pre = Pretrainer(net_cfg, patch, args.pretrain_lr, dev, amp)
    probe = 3 if args.quick else 10
    pre.train_step(crops(data, None, patch, batch, np.random.default_rng(1))[0])  # warm-up
    eager = rate(pre, data, batch, probe)
    compiled, compile_s = None, 0.0
    if args.compile != "off":
        t = time.perf_counter()
        pre.model = torch.compile(pre.net)
        pre.train_step(crops(data, None, patch, batch, np.random.default_rng(2))[0])
        sync(dev)
        compile_s = time.perf_counter() - t
        compiled = rate(pre, data, batch, probe)
        if args.compile == "auto" and compiled <= eager:
            pre.model = pre.net
    used_compile = pre.model is not pre.net
    budget = 60 * args.pretrain_minutes
    marks = [budget * 2.0 ** (i + 1 - args.checkpoints) for i in range(args.checkpoints)]  # ..., 1/4, 1/2, 1
    kept, losses, rng = [], [], np.random.default_rng(7)
    t0 = time.perf_counter()
    steps0 = pre.step
    while marks:
        losses.append(pre.train_step(crops(data, None, patch, batch, rng)[0]))
        if time.perf_counter() - t0 >= marks[0]:
            marks.pop(0)
            path = work / f"pretrained_step{pre.step}.pt"
            torch.save({"step": pre.step, "state_dict": {k: v.detach().cpu() for k, v in pre.net.state_dict().items()}},
                       path)
            kept.append({"step": pre.step, "path": str(path), "loss": float(torch.stack(losses[-20:]).mean())})
    sync(dev)
    seconds = time.perf_counter() - t0
    return {"batch": batch, "patch": patch, "steps": pre.step, "seconds": seconds, "amp_bf16": amp,
            "images_per_s": (pre.step - steps0) * batch / seconds, "eager_images_per_s": eager,
            "compiled_images_per_s": compiled, "compile_seconds": compile_s, "compiled": used_compile,
            "lr": args.pretrain_lr, "checkpoints": kept}


# --- fine-tuning and scoring -------------------------------------------------------------------

def build(recipe: str, net_cfg, weights):
    """The segmentation network a recipe starts from (``weights`` None: random initialisation)."""
    from genselfdiff.nn.unet import UNet, to_segmentation
    from genselfdiff.train.recipe import official_segmentation_net

    if recipe == "official":
        return official_segmentation_net(net_cfg, 2, weights)
    unet = UNet(net_cfg)
    if weights is not None:
        unet.load_state_dict(weights)
    return to_segmentation(unet, 2)


def recipe_choices(recipe: str) -> tuple:
    """(augmentation, loss, Adam betas, bf16) of a fine-tuning recipe. The default's are
    FinetuneConfig's defaults, restated: genselfdiff.train.finetune imports the slide reader (dask)."""
    from genselfdiff.train.augment import Augment
    from genselfdiff.train.recipe import official_finetune_fields

    if recipe == "official":
        f = official_finetune_fields()
        return f["augment"], f["loss"], f["betas"], f["amp"]
    return Augment(), "dice_ce", (0.5, 0.999), True


def finetune_once(args, net_cfg, patch, dev, data, weights, recipe: str, labels: str, seed: int):
    import torch

    from genselfdiff.nn.model import to_input
    from genselfdiff.train.augment import augment
    from genselfdiff.train.losses import make_loss
    from genselfdiff.train.recipe import NORMALIZATIONS

    aug, loss_name, betas, amp = recipe_choices(recipe)
    aug = replace(aug, elastic=0.0)  # elastic warps cost more CPU than a GPU step
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same head for every start of a seed
        net = build(recipe, net_cfg, weights).to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=args.finetune_lr, betas=tuple(betas))
    # strokes: the default recipe's colour-affinity term (finetune.SPARSE_AFFINITY)
    loss_fn = make_loss(loss_name, affinity=1.0 if labels == "strokes" and recipe != "official" else 0.0)
    amp = amp and dev.type == "cuda"
    target = data[labels]
    t = time.perf_counter()
    for step in range(args.finetune_steps):
        rng = np.random.default_rng([seed, step])  # the same patches for every start
        imgs, labs = crops(data["images"], target, patch, args.finetune_batch, rng)
        pairs = [augment(i, lab, rng, aug) for i, lab in zip(imgs, labs)]
        x = to_input(np.stack([p[0] for p in pairs]), dev, NORMALIZATIONS[recipe])
        y = torch.from_numpy(np.stack([p[1] for p in pairs])).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = loss_fn(logits, y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(dev)
    return net.eval(), time.perf_counter() - t, loss.item()


def predict(net, rgb: np.ndarray, dev, normalization: str, tile: int, halo: int) -> np.ndarray:
    """Class ids of a whole image from overlapping tiles, keeping each tile's core."""
    import torch

    from genselfdiff.nn.model import to_input

    core = tile - 2 * halo
    h, w, _ = rgb.shape
    ph, pw = math.ceil(h / core) * core, math.ceil(w / core) * core
    padded = np.pad(rgb, ((halo, ph - h + halo), (halo, pw - w + halo), (0, 0)), mode="reflect")
    out = np.zeros((ph, pw), np.uint8)
    windows = [(y, x) for y in range(0, ph, core) for x in range(0, pw, core)]
    for i in range(0, len(windows), 16):
        part = windows[i : i + 16]
        x = to_input(np.stack([padded[y : y + tile, x : x + tile] for y, x in part]), dev, normalization)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            ids = net(x).argmax(1).to(torch.uint8).cpu().numpy()
        for (y, x0), lab in zip(part, ids):
            out[y : y + core, x0 : x0 + core] = lab[halo : halo + core, halo : halo + core]
    return out[:h, :w]


def score(net, held, dev, recipe, args, patch) -> tuple:
    from genselfdiff.train.recipe import NORMALIZATIONS

    tile, halo = 2 * patch, 16 if args.quick else 32
    sync(dev)
    t, pixels, scores = time.perf_counter(), 0, []
    for _, rgb, truth in held:
        labels = predict(net, rgb, dev, NORMALIZATIONS[recipe], tile, halo)
        pixels += labels.size
        scores.append(dice(labels == 1, truth))
    sync(dev)
    return scores, pixels / (time.perf_counter() - t) / 1e6


def flops_per_image(net, patch, dev) -> float:
    """Forward FLOPs of one patch (torch's FLOP counter: matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, patch, patch, device=dev)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, torch.zeros(1, dtype=torch.long, device=dev))
    return float(fc.get_total_flops())


def peak_flops(dev):
    import torch

    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --- output -----------------------------------------------------------------------------------

def table(results) -> str:
    rows = ["| start | recipe | labels | pretrain steps | Dice (mean ± sd over seeds) | paired Δ vs random |",
            "|---|---|---|---|---|---|"]
    runs = results["runs"]
    for r in runs:
        d = np.array(r["dice"], float).mean(1)
        rand = next((q for q in runs if q["start"] == "random" and q["recipe"] == r["recipe"]
                     and q["labels"] == r["labels"]), None)
        delta = ""
        if rand is not None and r is not rand:
            diff = d - np.array(rand["dice"], float).mean(1)
            delta = f"{diff.mean():+.3f} ± {diff.std(ddof=1):.3f} ({int((diff > 0).sum())}/{len(diff)} seeds better)"
        rows.append(f"| {r['start']} | {r['recipe']} | {r['labels']} | {r['pretrain_steps']} | "
                    f"{d.mean():.3f} ± {d.std(ddof=1) if len(d) > 1 else float('nan'):.3f} | {delta} |")
    s = results["speed"]
    mfu = f"{100 * s['mfu']:.1f} %" if s.get("mfu") is not None else "n/a (no known peak for this device)"
    rows += ["", f"training {s['train_images_per_s']:.1f} images/s ({s['train_tflops']:.2f} TFLOP/s, MFU {mfu}); "
             f"segmentation {s['segment_mpx_per_s']:.2f} Mpx/s"]
    return "\n".join(rows) + "\n"


def plot(results, path: Path) -> None:
    """Dice against pretraining steps, one line per recipe and label kind (random init at 0)."""
    series = {}
    for r in results["runs"]:
        series.setdefault(f"{r['recipe']}, {r['labels']}", []).append(
            (r["pretrain_steps"], float(np.mean(r["dice"]))))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the GPU machine may lack matplotlib: a bare raster plot, the table has the numbers
        return _raster_plot(series, path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel("pretraining steps (0 = random initialisation)")
    ax.set_ylabel("held-out Dice (mean over seeds)")
    ax.set_title(f"MoNuSeg, {results['args']['labelled']} labelled images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _raster_plot(series, path: Path) -> None:
    from skimage.draw import disk, line
    from skimage.io import imsave

    img = np.full((300, 400, 3), 255, np.uint8)
    xs = [p[0] for pts in series.values() for p in pts] or [1]
    to_px = lambda s, d: (int(280 - 260 * d), int(20 + 360 * s / max(1, max(xs))))  # noqa: E731
    img[280, 20:380], img[20:281, 20] = 0, 0
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for c, pts in zip(colours * 4, series.values()):
        pts = sorted(pts)
        for a, b in zip(pts, pts[1:]):
            rr, cc = line(*to_px(*a), *to_px(*b))
            img[rr, cc] = c
        for p in pts:
            rr, cc = disk(to_px(*p), 3, shape=img.shape[:2])
            img[rr, cc] = c
    imsave(path, img, check_contrast=False)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from genselfdiff.nn.config import get_preset
    from genselfdiff.nn.model import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine:", machine(dev))
    args.work.mkdir(parents=True, exist_ok=True)
    deadline = T_START + 60 * args.budget_minutes
    preset = get_preset("tiny" if args.quick else "paper")
    net_cfg, patch = preset.net, preset.patch
    data = load(args)
    if args.quick:  # centre crops keep the CPU scoring short
        c = 64
        data["held"] = [(n, rgb[500 - c : 500 + c, 500 - c : 500 + c], m[500 - c : 500 + c, 500 - c : 500 + c])
                        for n, rgb, m in data["held"]]
    print(f"held out: {', '.join(data['names']['held'])}; labelled: {', '.join(data['names']['labelled'])}", flush=True)

    pre = pretrain(args, net_cfg, patch, dev, data["unlabelled"], args.work)
    print(f"pretrained {pre['steps']} steps of batch {pre['batch']} in {pre['seconds'] / 60:.1f} min "
          f"({pre['images_per_s']:.1f} images/s, compiled: {pre['compiled']})", flush=True)
    starts = [("random", 0, None)] + [
        (f"pretrained@{c['step']}", c["step"], c["path"]) for c in pre["checkpoints"]]
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": machine(dev), "net": net_cfg.to_dict(), "pretrain": pre, "names": data["names"],
               "runs": [], "skipped": []}
    plan = [(s, "default", lab) for lab in ("dense", "strokes") for s in starts]
    plan += [(s, "official", "dense") for s in (starts[0], starts[-1])]  # while time is left
    seg_rates, ft_rates = [], []
    for (name, steps, path), recipe, labels in plan:
        if time.perf_counter() > deadline - 30:
            results["skipped"].append(f"{name} {recipe} {labels}: out of time")
            continue
        weights = torch.load(path, weights_only=True)["state_dict"] if path else None
        run = {"start": name, "pretrain_steps": steps, "recipe": recipe, "labels": labels, "dice": [], "seeds": []}
        for seed in args.seeds:
            net, secs, loss = finetune_once(args, net_cfg, patch, dev, data, weights, recipe, labels, seed)
            scores, mpx = score(net, data["held"], dev, recipe, args, patch)
            run["dice"].append(scores)
            run["seeds"].append(seed)
            ft_rates.append(args.finetune_steps * args.finetune_batch / secs)
            seg_rates.append(mpx)
        results["runs"].append(run)
        print(f"  {name:>18} {recipe:>8} {labels:>7}: Dice {np.mean(run['dice']):.3f}", flush=True)
        (args.work / "results.json").write_text(json.dumps(results, indent=1, default=float))

    fwd = flops_per_image(build("default", net_cfg, None).unet.to(dev), patch, dev)
    train_flops = 3 * fwd * pre["images_per_s"]  # backward ~ 2x forward
    peak = peak_flops(dev)
    results["speed"] = {"train_images_per_s": pre["images_per_s"], "finetune_images_per_s": float(np.median(ft_rates)),
                        "segment_mpx_per_s": float(np.median(seg_rates)), "forward_gflops_per_image": fwd / 1e9,
                        "train_tflops": train_flops / 1e12, "peak_tflops": peak / 1e12 if peak else None,
                        "mfu": train_flops / peak if peak else None}
    results["wall_seconds"] = time.perf_counter() - T_START
    (args.work / "results.json").write_text(json.dumps(results, indent=1, default=float))
    md = table(results)
    (args.work / "results.md").write_text(md)
    plot(results, args.work / "dice_vs_steps.png")
    print("\n" + md)
    best = max((r for r in results["runs"] if r["start"] != "random"), key=lambda r: np.mean(r["dice"]), default=None)
    rand = next(r for r in results["runs"] if r["start"] == "random")
    print(f"summary: {'tiny (quick)' if args.quick else 'paper'} U-Net, {pre['steps']} pretraining steps, "
          f"{args.labelled} labelled images, {len(args.seeds)} seeds | random {np.mean(rand['dice']):.3f} | "
          f"best pretrained {best['start'] if best else '-'} {np.mean(best['dice']) if best else float('nan'):.3f} | "
          f"{results['speed']['train_images_per_s']:.1f} img/s, {results['speed']['segment_mpx_per_s']:.2f} Mpx/s | "
          f"{results['wall_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
