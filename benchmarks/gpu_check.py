"""Every CUDA path of the engine in one command, in at most 5 minutes on one GPU: a pass/fail table.

    python benchmarks/gpu_check.py                        # on a GPU workstation (or the lent GPU machine)
    python benchmarks/gpu_check.py --device cpu --quick   # the same steps on the CPU, tiny network, in 1-2 min

Each step runs in a process of its own, through the command line (``python -m genselfdiff ...``)
or the engine's public functions, on synthetic tissue written first (no download, no data set):

environment         torch, the GPU, bf16, and the packages the engine needs (dask, zarr, distributed)
data                synthetic OME-TIFF slides, a mask and painted strokes
pretrain            ``genselfdiff pretrain`` of the paper network, bf16 autocast, ``--compile``, 50 steps;
                    patches/s and training MFU
pretrain --resume   the same run resumed from its ``.last.pt`` to step 60
finetune ...        ``genselfdiff finetune`` for 50 steps from the pretrained model, from masks and from
                    strokes (``--sparse``), with ``--recipe default`` and ``--recipe official`` (fp32)
segment 4096²       ``genselfdiff.segment`` of a 4096² slide on the GPU (Mpx/s, MFU), and a 512² corner of
                    it again on the CPU in fp32: at least 98 % of its labels must agree
segment --instances ``genselfdiff segment --instances`` (objects split, counted, written)
torchrun            ``torchrun`` with one rank that joins an NCCL group (gloo on the CPU), checks an
                    all-reduce, then pretrains through the CLI inside that group
dask                ``segment(..., scheduler=...)`` on a ``distributed.LocalCluster`` with one worker on the
                    device: the same labels as one process
pytest -m gpu       the test suite's GPU tests (they skip themselves without CUDA)

The timed steps (pretraining, segmentation) run alone; the others two at a time (--jobs).
After each step ``--json`` (default WORK/gpu_check.json) is rewritten atomically, so a run cut off
keeps what it did. A failed step is one row with one line of why (the end of its log is in the JSON
and in WORK/NAME.log), and the next step still runs; a step whose input failed runs on what there
is (fine-tuning without a pretrained model starts from random weights). MFU (model FLOPs
utilisation): the network's FLOPs (torch's FLOP counter on one input, multiply-adds counted twice;
training x3 for the backward pass) per second over the GPU's dense bf16 peak. A GPU without native
bf16 runs everything in fp32 (``--no-amp``) and the check says so.
``torch.compile`` is on for CUDA and off on the CPU (a cold inductor build takes minutes there).

Exit status: 0 every row passed (or skipped for want of CUDA), 1 some row failed, 2 unusable
arguments (e.g. --device cuda without a GPU). docs/gpu.md says how to run it and what each row means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
RESULT = "GPU_CHECK_RESULT "  # the line a step process reports its figures on
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; the first name found in the GPU's wins.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}
AGREEMENT = 0.98  # labels that must agree between the GPU (bf16) and the CPU (fp32)


@dataclass(frozen=True)
class Sizes:
    preset: str
    slide: int  # side of the pretraining slides and of the labelled image
    big: int  # side of the slide segmented for speed
    region: int  # side of its corner segmented again on the CPU
    tile: int
    pretrain_steps: int
    resume_steps: int  # the step the resumed run ends at
    finetune_steps: int
    ddp_steps: int


FULL = Sizes("paper", slide=1024, big=4096, region=512, tile=512, pretrain_steps=50, resume_steps=60,
             finetune_steps=50, ddp_steps=5)
QUICK = Sizes("tiny", slide=256, big=512, region=256, tile=128, pretrain_steps=4, resume_steps=6,
              finetune_steps=4, ddp_steps=2)
FINETUNES = [("default", "masks"), ("default", "strokes"), ("official", "masks"), ("official", "strokes")]


class Failed(Exception):
    """A step failed; the message is the one line of why."""


class Skipped(Exception):
    """A step could not run or has nothing to check here; the message says why."""


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto (default): the GPU; without one, the CPU with --quick, else a one-line error")
    p.add_argument("--quick", action="store_true", help="tiny network, small images, a few steps")
    p.add_argument("--work", type=Path, default=Path("/tmp/genselfdiff-gpu-check"),
                   help="folder for the data, models and logs: a new one, or an earlier check's (emptied first)")
    p.add_argument("--json", type=Path, help="where the results go (default WORK/gpu_check.json)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile in pretraining (default: on for CUDA, off on the CPU)")
    p.add_argument("--budget-minutes", type=float, default=5.0,
                   help="a step that would start later than this is skipped (default %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="steps that need nothing of each other and report no speed run "
                   "side by side, this many at a time (default %(default)s; the timed steps, pretraining and "
                   "segmentation, always run alone)")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--no-amp", action="store_true", help=argparse.SUPPRESS)  # internal: fp32 (a GPU without bf16)
    args = p.parse_args(argv)
    args.sizes = QUICK if args.quick else FULL
    args.json = args.json or args.work / "gpu_check.json"
    return args


def settle(args, cuda: bool) -> str:
    """Resolve --device auto, and --compile from it; an error sentence, or ''."""
    if args.device == "auto":
        args.device = "cuda" if cuda or not args.quick else "cpu"
    if args.device == "cuda" and not cuda:
        return ("No CUDA GPU is visible to torch here; on a machine without one run "
                "python benchmarks/gpu_check.py --device cpu --quick")
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    return ""


# --- the orchestrating process (imports no torch: every GPU context lives in a step process) ------

class Check:
    def __init__(self, args):
        self.args, self.sizes, self.work = args, args.sizes, args.work
        self.data = self.work / "data"
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60 * args.budget_minutes
        self.env: dict = {}
        self.fp32 = False  # a GPU without bf16: every step with --no-amp
        self.report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
                       "sizes": asdict(self.sizes), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}

    # running steps
    def row(self, name: str, step) -> None:
        self.record(self.attempt(name, step))

    def rows(self, steps: list) -> None:
        """Untimed steps that need nothing of each other: side by side with --jobs above 1, recorded in order."""
        if self.args.jobs <= 1:
            for name, step in steps:
                self.row(name, step)
            return
        with ThreadPoolExecutor(self.args.jobs) as pool:
            for done in [pool.submit(self.attempt, name, step) for name, step in steps]:
                self.record(done.result())

    def attempt(self, name: str, step) -> dict:
        """Run one step: its row (status, seconds, figures, why)."""
        t = time.perf_counter()
        status, figures, why, tail = "pass", {}, "", []
        try:
            if time.perf_counter() > self.deadline:
                raise Skipped(f"out of time (--budget-minutes {self.args.budget_minutes:g})")
            figures = step() or {}
        except Skipped as e:
            status, why = "skip", str(e)
        except Failed as e:
            status, why = "fail", str(e)
            tail = getattr(e, "tail", [])
        except Exception as e:  # a bug of this script: still one row, and the next step runs
            status, why, tail = "fail", f"{type(e).__name__}: {e}", traceback.format_exc().splitlines()[-8:]
        row = {"step": name, "status": status, "seconds": round(time.perf_counter() - t, 1), "figures": figures,
               "why": why}
        if tail:
            row["log_tail"] = tail
        return row

    def record(self, row: dict) -> None:
        self.report["rows"].append(row)
        self.report["wall_seconds"] = round(time.perf_counter() - self.t0, 1)
        self.save()
        print(f"{row['status'].upper():4}  {row['step']:<34} {row['seconds']:6.1f} s  "
              f"{row['why'] or describe(row['figures'])}", flush=True)

    def save(self) -> None:
        from genselfdiff.io.atomic import write_text

        write_text(self.args.json, json.dumps(self.report, indent=1, default=str) + "\n")

    def run(self, name: str, argv: list, limit: float) -> str:
        """Run ``argv`` (cwd: the repository) with the log in WORK/NAME.log; its output, or Failed with
        the line that says why. The whole process group goes when the time is up."""
        log = self.work / f"{slug(name)}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's own group: torchrun's ranks, dask's workers
            out, _ = proc.communicate()
            log.write_text(" ".join(map(str, argv)) + "\n\n" + out)
            raise failed(f"still running after {limit:.0f} s, stopped", out)
        log.write_text(" ".join(map(str, argv)) + "\n\n" + out)
        if proc.returncode != 0:
            raise failed(why_line(out) or f"exit status {proc.returncode}", out)
        return out

    def python_step(self, name: str, step: str, limit: float, launcher=()) -> dict:
        """One of this script's in-process steps (see STEPS) in a process of its own; its figures."""
        argv = [*(launcher or [sys.executable]), str(Path(__file__).resolve()), "--step", step, "--work",
                str(self.work), "--device", self.args.device, *(["--quick"] if self.args.quick else []),
                *(["--no-amp"] if self.fp32 else [])]
        out = self.run(name, argv, limit)
        found = [line[len(RESULT):] for line in out.splitlines() if line.startswith(RESULT)]
        if not found:
            raise failed("the step reported nothing", out)
        result = json.loads(found[-1])
        if result.get("skip"):
            raise Skipped(result["skip"])
        if result.get("fail"):
            raise failed(result["fail"], out)
        return result

    def cli(self, name: str, args: list, limit: float) -> str:
        return self.run(name, [sys.executable, "-m", "genselfdiff", *map(str, args),
                               *(["--no-amp"] if self.fp32 else [])], limit)

    # the steps
    def environment(self) -> dict:
        self.env = self.python_step("environment", "environment", 120)
        missing = [k for k, v in self.env["packages"].items() if v is None]
        self.report["machine"] = self.env["machine"]
        if missing:
            raise Failed(f"missing {', '.join(missing)}: install, or carry as wheels (docs/gpu.md)")
        return {k: self.env[k] for k in ("gpu", "bf16", "torch", "memory_gb") if k in self.env}

    def write_data(self) -> dict:
        """Synthetic slides: two for pretraining, one labelled image with its mask and strokes, one large."""
        import numpy as np
        from skimage.io import imsave

        from genselfdiff.app.synthetic import synthetic_tissue, write_pyramidal_tiff

        s = self.sizes
        for i in range(2):
            write_pyramidal_tiff(self.data / "slides" / f"slide{i}.ome.tif", synthetic_tissue((s.slide, s.slide), seed=i)[0],
                                 mpp=0.5)
        rgb, truth = synthetic_tissue((s.slide, s.slide), seed=5)
        write_pyramidal_tiff(self.data / "image.ome.tif", rgb, mpp=0.5)
        for kind, labels in (("masks", truth), ("strokes", paint_strokes(truth))):
            (self.data / kind).mkdir(parents=True, exist_ok=True)
            imsave(self.data / kind / "image.png", labels.astype(np.uint8), check_contrast=False)
        piece = synthetic_tissue((s.big // 4, s.big // 4), seed=9, glass=0.1)[0]
        write_pyramidal_tiff(self.data / "big.ome.tif", np.tile(piece, (4, 4, 1)), mpp=0.5, compression=None)
        return {"slides": f"2 x {s.slide}²", "labelled": f"{s.slide}²", "large": f"{s.big}²"}

    def pretrain(self, resume: bool) -> dict:
        s, out = self.sizes, self.work / "pretrained.pt"
        steps = s.resume_steps if resume else s.pretrain_steps
        args = ["pretrain", self.data / "slides", "--out", out, "--preset", s.preset, "--steps", steps,
                "--device", self.args.device, "--val-every", 0, "--quiet",
                "--compile" if self.args.compile else "--no-compile", *(["--resume"] if resume else [])]
        self.cli("pretrain --resume" if resume else "pretrain", args, 240 if self.args.compile else 150)
        ckpt = load(out.with_name("pretrained.last.pt"))
        if ckpt["step"] != steps:
            raise Failed(f"the run ended at step {ckpt['step']}, not {steps}")
        first = s.pretrain_steps if resume else 0  # the resumed run's own windows
        speeds = [h["patches_per_s"] for h in ckpt["history"] if h.get("patches_per_s") and h["step"] > first]
        speed = statistics.median(speeds[1:] or speeds) if speeds else None  # the first window holds the compilation
        cfg = ckpt["config"]
        figures = {"steps": ckpt["step"], "batch": cfg["batch"], "patch": cfg["patch"], "patches_per_s": speed,
                   "precision": self.precision(cfg), "compiled": cfg["compile"]}
        if speed and not resume:
            flops = 3 * forward_flops(ckpt["net"], cfg["patch"]) * speed
            figures.update(train_tflops=flops / 1e12, mfu=self.mfu(flops))
        return figures

    def finetune(self, recipe: str, labels: str) -> dict:
        s, pretrained = self.sizes, self.work / "pretrained.pt"
        out = self.work / f"finetuned_{recipe}_{labels}.pt"
        start = ["--model", pretrained] if pretrained.exists() else ["--preset", s.preset]
        self.cli(f"finetune {labels}, {recipe}", [
            "finetune", "--images", self.data / "image.ome.tif", "--masks", self.data / labels, "--out", out, *start,
            "--steps", s.finetune_steps, "--recipe", recipe, "--device", self.args.device,
            *(["--sparse"] if labels == "strokes" else [])], 120)
        ckpt = load(out)
        figures = {"steps": ckpt.get("trained_steps", ckpt.get("step")), "val_dice": ckpt.get("best_dice"),
                   "precision": self.precision(ckpt["config"]),
                   "start": "pretrained" if pretrained.exists() else "random weights (no pretrained model)"}
        return figures

    def model(self) -> Path:
        for recipe, labels in FINETUNES:
            path = self.work / f"finetuned_{recipe}_{labels}.pt"
            if path.exists():
                return path
        raise Skipped("no fine-tuned model to segment with (every fine-tuning step failed)")

    def segment(self) -> dict:
        self.model()
        figures = self.python_step("segment", "segment", 240)
        figures["mfu"] = self.mfu(figures.pop("flops_per_s"))
        if figures["agreement"] < AGREEMENT:
            raise Failed(f"only {100 * figures['agreement']:.2f} % of the CPU's labels agree (at least "
                         f"{100 * AGREEMENT:g} % expected)")
        return figures

    def instances(self) -> dict:
        out = self.work / "instances"
        shutil.rmtree(out, ignore_errors=True)
        text = self.cli("segment --instances", ["segment", self.model(), self.data / "image.ome.tif", "--out", out,
                                                "--instances", "--device", self.args.device], 120)
        if not (out / "image.ome.zarr" / "instances").exists():
            raise Failed(f"no instance image in {out / 'image.ome.zarr'}")
        counted = [line.split("objects:", 1)[1].split("->")[0].strip() for line in text.splitlines() if "objects:" in line]
        return {"objects": counted[-1] if counted else "?"}

    def torchrun(self) -> dict:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        return self.python_step("torchrun", "ddp-rank", 150, launcher=launcher)

    def dask(self) -> dict:
        self.model()
        return self.python_step("dask", "dask", 180)

    def pytest(self) -> dict:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                       if re.search(r"mark\.gpu\b", p.read_text(encoding="utf-8")))
        if not files:
            raise Skipped("no test is marked gpu")
        if self.args.device != "cuda":  # every test run collects them, and they skip themselves without CUDA
            raise Skipped(f"the GPU tests of {len(files)} file(s) need CUDA")
        out = self.run("pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                         *files], 150)
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out)}
        if not counts.get("passed"):
            raise Failed(f"no GPU test ran: {counts or out.strip().splitlines()[-1:]}")
        return {"files": len(files), **counts}

    def precision(self, config: dict) -> str:
        """What a run of ``config`` computed in: bf16 where it asked for autocast and the device has it."""
        return "bf16" if config.get("amp") and self.env["amp"][self.args.device] and not self.fp32 else "fp32"

    def mfu(self, flops_per_s):
        peak = peak_flops(self.env.get("gpu", "")) if self.args.device == "cuda" else None
        return round(flops_per_s / peak, 4) if peak and flops_per_s else None

    def main(self) -> int:
        marker = self.work / ".gpu_check"
        if self.work.exists() and any(self.work.iterdir()) and not marker.exists():
            print(f"{self.work} holds files of something else: --work takes a new folder or an earlier check's.",
                  file=sys.stderr)
            return 2
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        marker.touch()
        print("command:", self.report["command"], flush=True)
        self.row("environment", self.environment)
        error = settle(self.args, bool(self.env.get("cuda")))
        if error:
            print(error, file=sys.stderr)
            return 2
        self.report.update(device=self.args.device, compile=self.args.compile, jobs=self.args.jobs)
        print("machine:", self.env.get("machine", "?"), flush=True)
        if self.args.device == "cuda" and not self.env.get("bf16"):
            self.fp32 = True
            print(f"note: {self.env['gpu']} has no bf16: every step runs in fp32 (--no-amp).", flush=True)
        self.row("data", self.write_data)
        self.row(f"pretrain ({'compiled' if self.args.compile else 'eager'})", lambda: self.pretrain(False))
        self.row("pretrain --resume", lambda: self.pretrain(True))
        self.rows([(f"finetune {labels}, {recipe}", lambda r=recipe, lab=labels: self.finetune(r, lab))
                   for recipe, labels in FINETUNES])
        s = self.sizes
        self.row(f"segment {s.big}², {self.args.device} vs cpu {s.region}²", self.segment)
        self.rows([("segment --instances", self.instances),
                   (f"torchrun, 1 {'NCCL' if self.args.device == 'cuda' else 'gloo'} process", self.torchrun),
                   ("dask LocalCluster, 1 worker", self.dask),
                   ("pytest -m gpu", self.pytest)])
        rows = self.report["rows"]
        failed = [r["step"] for r in rows if r["status"] == "fail"]
        print(f"summary: {sum(r['status'] == 'pass' for r in rows)} passed, {len(failed)} failed, "
              f"{sum(r['status'] == 'skip' for r in rows)} skipped in {self.report['wall_seconds']:.0f} s "
              f"({self.args.device}{', quick' if self.args.quick else ''}) -> {self.args.json}", flush=True)
        return 1 if failed else 0


def failed(why: str, output: str) -> Failed:
    e = Failed(why)
    e.tail = [line for line in output.replace("\r", "\n").splitlines() if line.strip()][-15:]
    return e


def why_line(output: str) -> str:
    """The line of a failed process's output that says why: the exception, or the CLI's one sentence."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    said = [line for line in lines if re.match(r"([\w.]+(Error|Exception|Interrupt)\b|genselfdiff: error|FAILED |"
                                               r"E +\w+Error)", line)]
    line = (said or lines or [""])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def describe(figures: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k} {fmt(v)}" for k, v in figures.items() if v is not None)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def paint_strokes(truth):
    """Strokes a person might paint: 3-px rows every 32 px, 2 inside nuclei, 1 on clear background, 0 elsewhere."""
    import numpy as np
    from scipy import ndimage as ndi

    inside = ndi.binary_erosion(truth == 1)
    outside = ~ndi.binary_dilation(truth == 1, iterations=3)
    rows = np.zeros(truth.shape, bool)
    for r in range(16, truth.shape[0] - 3, 32):
        rows[r : r + 3] = True
    strokes = np.zeros(truth.shape, np.uint8)
    strokes[rows & outside] = 1
    strokes[rows & inside] = 2
    return strokes


def load(path) -> dict:
    from genselfdiff.io.checkpoint import load_checkpoint

    if not Path(path).exists():
        raise Failed(f"{path} was not written")
    return load_checkpoint(path)


def forward_flops(net: dict, side: int) -> float:
    """FLOPs of one forward pass of the U-Net ``net`` (a NetConfig dict) on a side x side input
    (torch's FLOP counter on the meta device: no memory, no time)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from genselfdiff.nn.config import NetConfig
    from genselfdiff.nn.unet import UNet

    with torch.device("meta"):
        model = UNet(NetConfig.from_dict(net))
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, side, side), torch.zeros(1, dtype=torch.long))
    return float(counter.get_total_flops())


def peak_flops(gpu_name: str):
    """The dense bf16 peak of the named GPU (FLOP/s), None when unknown."""
    return next((v for k, v in PEAK_BF16.items() if k in gpu_name), None)


# --- the steps that run in a process of their own (--step NAME) ---------------------------------

def step_environment(args) -> dict:
    import importlib
    import platform

    import torch

    from genselfdiff.nn.model import amp_enabled

    packages = {}
    for name in ("numpy", "tifffile", "skimage", "dask", "zarr", "distributed"):
        try:
            packages[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            packages[name] = None
    cuda = torch.cuda.is_available()
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": cuda, "packages": packages,
            "cpu_cores": os.cpu_count(), "amp": {d: autocast_bf16(d, amp_enabled) for d in ("cuda", "cpu")}}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1),
                    bf16=native_bf16(torch), gpus=torch.cuda.device_count())
    device = f", {info['gpu']} ({info['memory_gb']} GiB, bf16 {'yes' if info['bf16'] else 'no'})" if cuda else ""
    info["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{info['python']}, torch {torch.__version__}{device}")
    return info


def step_segment(args) -> dict:
    """The large slide on the device, timed, then its top-left corner on the CPU in fp32."""
    import numpy as np

    from genselfdiff import load_model, segment, segment_tiles

    s, work = args.sizes, args.work
    path, slide = first_model(work), work / "data" / "big.ome.tif"
    model = load_model(path, args.device)
    model.amp = model.amp and not args.no_amp
    drain_tiles(segment_tiles(model, slide, tile=s.tile, skip_background=False, region=(0, 0, s.tile, s.tile)))  # warm-up
    out = work / "big.ome.zarr"
    shutil.rmtree(out, ignore_errors=True)
    result = segment(model, slide, out, tile=s.tile, skip_background=False)
    device_labels = np.asarray(result.labels[: s.region, : s.region])
    reference = load_model(path, "cpu")
    reference.amp = False
    cpu = np.zeros((s.big, s.big), np.uint8)
    for tile in drain_tiles(segment_tiles(reference, slide, tile=s.tile, skip_background=False,
                                          region=(0, 0, s.region, s.region))):
        h, w = tile.labels.shape
        cpu[tile.y : tile.y + h, tile.x : tile.x + w] = tile.labels
    agreement = float((device_labels == cpu[: s.region, : s.region]).mean())
    flops = forward_flops(model.net_config.to_dict(), s.tile) * result.tiles / result.seconds
    return {"mpx_per_s": round(result.mpx_per_s, 2), "tiles": result.tiles, "seconds": round(result.seconds, 2),
            "tile": s.tile, "agreement": round(agreement, 5), "flops_per_s": flops}


def step_dask(args) -> dict:
    import numpy as np
    from distributed import Client, LocalCluster

    from genselfdiff import load_model, segment

    s, work = args.sizes, args.work
    model, image = load_model(first_model(work), args.device), work / "data" / "image.ome.tif"
    model.amp = model.amp and not args.no_amp
    kw = dict(tile=s.tile, skip_background=False)
    outs = [work / "dask.ome.zarr", work / "local.ome.zarr"]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        remote = segment(model, image, outs[0], scheduler=client, device=args.device, **kw)
    local = segment(model, image, outs[1], **kw)
    if remote.stopped or remote.chunks_computed != local.chunks_computed:
        return {"fail": f"the cluster wrote {remote.chunks_computed} chunks, one process {local.chunks_computed}"}
    agreement = float((np.asarray(remote.labels) == np.asarray(local.labels)).mean())
    if agreement < AGREEMENT:
        return {"fail": f"only {100 * agreement:.2f} % of the labels agree with one process"}
    return {"chunks": remote.chunks_computed, "agreement": round(agreement, 5), "mpx_per_s": round(remote.mpx_per_s, 2)}


def step_ddp_rank(args) -> dict:
    """What torchrun starts: join the group (NCCL on CUDA), all-reduce, then pretrain through the CLI in it."""
    import torch
    import torch.distributed as dist

    from genselfdiff.app.cli import main
    from genselfdiff.io.checkpoint import load_checkpoint

    backend = "nccl" if args.device == "cuda" else "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        ones = torch.ones(4, device=device)
        dist.all_reduce(ones)
        world = dist.get_world_size()
        if not torch.equal(ones.cpu(), torch.full((4,), float(world))):
            return {"fail": f"all_reduce over {world} rank(s) gave {ones.tolist()}"}
        out = args.work / "ddp.pt"
        s = args.sizes
        code = main(["pretrain", str(args.work / "data" / "slides"), "--out", str(out), "--preset", s.preset,
                     "--steps", str(s.ddp_steps), "--device", args.device, "--val-every", "0", "--quiet", "--no-compile",
                     *(["--no-amp"] if args.no_amp else [])])
    finally:
        dist.destroy_process_group()
    if code != 0:
        return {"fail": f"genselfdiff pretrain exited with {code} inside the {backend} group"}
    ckpt = load_checkpoint(out.with_name("ddp.last.pt"))
    return {"backend": backend, "world_size": world, "steps": ckpt["step"]}


def first_model(work: Path) -> Path:
    return next(p for p in (work / f"finetuned_{r}_{lab}.pt" for r, lab in FINETUNES) if p.exists())


def drain_tiles(generator) -> list:
    from genselfdiff.progress import drain

    tiles = []
    drain(generator, tiles.append)
    return tiles


def native_bf16(torch) -> bool:
    """Whether the GPU computes bf16 itself (torch may otherwise emulate it, slowly)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.4 counts no emulation
        return bool(torch.cuda.is_bf16_supported())


def autocast_bf16(device: str, amp_enabled) -> bool:
    """Whether the engine's autocast computes in bf16 on ``device`` (else fp32)."""
    import torch

    return (device != "cuda" or torch.cuda.is_available()) and amp_enabled(torch.device(device))


STEPS = {"environment": step_environment, "segment": step_segment, "dask": step_dask, "ddp-rank": step_ddp_rank}


def run_step(args) -> int:
    try:
        result = STEPS[args.step](args)
    except Exception as e:
        traceback.print_exc()
        result = {"fail": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    print(RESULT + json.dumps(result, default=str), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    if args.step:
        return run_step(args)
    sys.path.insert(0, str(SRC))  # a checkout without installing: the engine's atomic writer, checkpoints
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
