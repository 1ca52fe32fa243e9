"""Self-supervised diffusion pretraining (the pretext task of GenSelfDiff-HIS).

The network learns to predict the noise added to unlabelled tissue patches: x0 in [-1, 1],
t uniform over the T = 1000 steps of the quadratic schedule (or below ``max_timestep``),
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss = lambda_t * |eps - eps_theta(x_t, t)|^2
with the P2 weights lambda_t = 1 / (1 + SNR_t). Adam at 1e-4 as in the paper; EMA of the weights, gradient
clipping and a linear warm-up are our additions (each off at 0). The checkpoint kept at
``out`` is the best by the loss on fixed validation patches, timesteps and noise.
``recipe="official"`` follows the official code instead (:mod:`genselfdiff.train.recipe`).

Everything random in step ``s`` (patches, flips, timesteps, noise) derives from
(seed, rank, s), so ``<out>.last.pt`` (weights, EMA, Adam state, step, history) is all
``resume`` needs to continue the exact run.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from ..io.checkpoint import save_checkpoint
from ..io.pixelsize import Resolution, tell, unknown_note, working_resolution
from ..nn.config import with_preset
from ..nn.model import autocast, pick_device, to_input
from ..nn.schedule import Schedule, p2_loss, q_sample
from ..nn.unet import UNet
from ..progress import Progress, resolve
from ..train.config import PretrainConfig
from . import ddp as distributed
from .patches import PatchStream, batches, plan_data, same_slides, val_noise
from .recipe import check_recipe, official_init
from .run import (
    Budget,
    LossWindow,
    TrainLoop,
    default_workers,
    last_path,
    load_resume_state,
    optimise,
    restore_resume_state,
    save_resume_state,
)

# Fields a resumed run takes from the caller rather than from the checkpoint: they change
# how long and how fast it runs, not what it computes.
RUNTIME_FIELDS = ("steps", "minutes", "workers", "compile", "val_every", "amp", "channels_last")


@dataclass
class PretrainResult:
    path: Path  # the best checkpoint by validation loss
    steps: int
    history: list  # {step, loss, patches_per_s, lr[, val_loss]}
    stopped: bool
    skipped: list  # (path, reason)
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None
    last_path: Optional[Path] = None  # resume state of the final step
    seconds: float = 0.0
    validation: str = ""  # "held-out files", "held-out regions" or "in-sample"
    net: Optional[torch.nn.Module] = field(default=None, repr=False)  # trained network (EMA weights if on)


def schedule_of(config: PretrainConfig) -> Schedule:
    return Schedule.quadratic(config.timesteps, config.beta_start, config.beta_end)


def _noise_levels(cfg: PretrainConfig) -> int:
    """How many of the T noise levels the pretext samples from (all, unless ``max_timestep``)."""
    return cfg.max_timestep or cfg.timesteps


def check_config(cfg: PretrainConfig) -> None:
    """One sentence per impossible setting, before any work starts."""
    d = cfg.net.downsampling
    if cfg.patch < d or cfg.patch % d:
        raise UserError(f"Patch size {cfg.patch} must be a positive multiple of {d} for this network.")
    if cfg.net.width % cfg.net.groups or cfg.net.width < cfg.net.groups:
        raise UserError(f"Network width {cfg.net.width} must be a multiple of {cfg.net.groups} (GroupNorm groups).")
    if cfg.batch < 1 or cfg.lr <= 0:
        raise UserError("Batch size must be at least 1 and the learning rate positive.")
    if (cfg.steps is not None and cfg.steps < 0) or (cfg.minutes is not None and cfg.minutes < 0):
        raise UserError("--steps and --minutes cannot be negative.")
    if not 0 <= cfg.ema_decay < 1 or cfg.grad_clip < 0 or cfg.warmup_steps < 0 or cfg.workers < 0:
        raise UserError("EMA decay must be in [0, 1); clipping, warm-up and workers cannot be negative.")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError("The validation fraction must be in [0, 1).")
    if cfg.max_timestep is not None and not 1 <= cfg.max_timestep <= cfg.timesteps:
        raise UserError(f"The largest timestep must be between 1 and {cfg.timesteps}.")
    check_recipe(cfg.recipe)


def pretrain(sources, out, config: PretrainConfig, *, device="auto", resume: bool = False, progress=None,
             should_stop=None, log_every: Optional[int] = None, pixel_size=None,
             override_pixel_size: bool = False) -> PretrainResult:
    """Pretrain the diffusion U-Net on unlabelled slides; returns where the best checkpoint is.

    ``sources``: image files and/or folders (searched recursively). ``out``: the best checkpoint
    (by validation loss); the state of the last step goes to :func:`last_path` (``out``).
    ``resume=True`` continues that state (the config comes from the checkpoint except
    :data:`RUNTIME_FIELDS`). The run ends after ``config.steps`` steps or ``config.minutes``
    minutes (whichever first; neither: until ``should_stop``). On stop it saves both files and
    returns with ``stopped=True``. Under ``torchrun`` it trains data-parallel (see
    :mod:`genselfdiff.train.ddp`). ``log_every``: steps per history entry (default 1 on the
    CPU, 10 on a GPU, where reading the loss waits for the device). ``pixel_size``: the level-0
    µm/px of the slides, for files that state none (see :func:`genselfdiff.io.slides.open_slide`);
    without ``config.resolution`` patches are read at ``DEFAULT_MPP`` where the size is known.
    """
    t0 = time.perf_counter()
    progress, should_stop = resolve(progress, should_stop)
    out = Path(out)
    ctx = distributed.setup(pick_device(device))
    try:
        opening = {"pixel_size": pixel_size, "override_pixel_size": override_pixel_size}
        trainer = _Trainer(sources, out, config, ctx, resume, log_every, opening)
        return trainer.run(progress if ctx.is_main else resolve(None, None)[0], should_stop, t0)
    finally:
        distributed.teardown(ctx)


class _Trainer:
    def __init__(self, sources, out: Path, config: PretrainConfig, ctx, resume: bool, log_every, opening=None):
        self.sources, self.out, self.last, self.ctx = list(sources), out, last_path(out), ctx
        self.opening = opening  # how open_slide is called: the user's pixel size
        self.device = ctx.device
        ckpt = self._load_resume_state(config) if resume else None
        cfg = self.cfg = with_preset(config, self.device) if ckpt is None else self._resumed_config(config, ckpt)
        if cfg.recipe == "official" and cfg.net.final_time:  # the official final block has no time input
            cfg = self.cfg = replace(cfg, net=replace(cfg.net, final_time=False))
        if cfg.workers is None:  # the engine's choice for this device, the same from the CLI and napari
            cfg = self.cfg = replace(cfg, workers=default_workers(self.device))
        check_config(cfg)
        self.schedule = schedule_of(cfg)
        if self.device.type != "cpu":  # its tensors on the GPU: no host copy (and stall) in every step
            # MPS has no float64; 1000 cumulative products in float32 stay within 1e-6 relative.
            dtype = torch.float64 if self.device.type == "cuda" else torch.float32
            self.schedule = Schedule(self.schedule.betas.to(self.device, dtype))
        self.log_every = log_every or (1 if self.device.type == "cpu" else 10)
        # channels_last pays on GPUs; on the CPU it measured slower (docs/pretraining.md, Measured).
        cl = cfg.channels_last and self.device.type == "cuda"
        self.memory_format = torch.channels_last if cl else torch.contiguous_format

        with torch.random.fork_rng(devices=[]):  # same initial weights for a seed, caller's RNG untouched
            torch.manual_seed(cfg.seed)
            self.net = UNet(cfg.net)
            if cfg.recipe == "official":
                official_init(self.net)
        self.net.to(self.device, memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.net).requires_grad_(False) if cfg.ema_decay > 0 else None
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, fused=self.device.type == "cuda" or None)
        self.step, self.history = 0, []
        self.best_val, self.best_step, self.last_val = None, None, None
        # Whether ``out`` holds this run's best (a file left by an unrelated earlier run does not count).
        self.best_written = ckpt is not None and out.exists()
        if ckpt is not None:
            self._restore(ckpt)
        self.model = distributed.wrap(self.net, ctx)
        if cfg.compile:
            self.model = torch.compile(self.model)

    # --- resume ---------------------------------------------------------------------
    def _load_resume_state(self, config) -> dict:
        return load_resume_state(self.out, lambda c: c.get("kind") == "pretrained" and "optimizer" in c, "pretraining")

    @staticmethod
    def _resumed_config(config: PretrainConfig, ckpt: dict) -> PretrainConfig:
        saved = PretrainConfig.from_dict(ckpt["config"])
        runtime = {k: getattr(config, k) for k in RUNTIME_FIELDS}
        if config.steps is None and config.minutes is None:  # continue to the original target
            runtime.update(steps=saved.steps, minutes=saved.minutes)
        return replace(saved, **runtime)

    def _restore(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt["state_dict"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.get("ema_state_dict") or ckpt["state_dict"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.best_val, self.best_step = ckpt.get("best_val_loss"), ckpt.get("best_step")
        restore_resume_state(ckpt, self.opt)
        self.resumed_data = ckpt.get("data", {})

    # --- the loop -------------------------------------------------------------------
    def run(self, progress, should_stop, t0: float) -> PretrainResult:
        cfg, ctx = self.cfg, self.ctx
        resolution = working_resolution(cfg.resolution)
        plan = plan_data(self.sources, cfg.patch, resolution, seed=cfg.seed, val_fraction=cfg.val_fraction,
                         val_patches=cfg.val_batches * cfg.batch, opening=self.opening)
        self.resolution = _learnt_resolution(cfg.resolution, resolution, plan, ctx.is_main)
        self.plan, self.provenance = plan, plan.provenance(self.sources)
        if not same_slides(getattr(self, "resumed_data", None) or self.provenance, self.provenance):
            warnings.warn("The slides differ from those of the run being resumed; the data stream will differ.")
        self.skipped = dict(plan.skipped)
        self.val = (plan.val_patches, *val_noise(len(plan.val_windows), cfg.patch, _noise_levels(cfg), cfg.seed))

        stream = PatchStream(plan.files, plan.train, cfg.patch, cfg.batch, resolution, seed=cfg.seed,
                             rank=ctx.rank, start=self.step, exclude=plan.exclude, bad=plan.bad, opening=self.opening)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                             prefetch_factor=4 if cfg.workers else None)
        batches_in = iter(loader)
        gen = torch.Generator(device=self.device)
        agree = (lambda flags: distributed.any_rank(flags, ctx)) if ctx.active else None
        loop = TrainLoop(Budget(steps=cfg.steps, minutes=cfg.minutes), should_stop, since=t0, agree=agree,
                         agree_every=self.log_every)
        window, logged = LossWindow(), {}
        start_step = self.step
        self.net.train()
        try:
            while loop.goes_on(self.step):
                batch, bad = next(batches_in)
                self.skipped.update(dict(bad))
                window.add(self._train_step(batch.numpy(), gen).detach())
                self.step += 1
                val_due = cfg.val_every > 0 and self.step % cfg.val_every == 0
                finishing = cfg.steps is not None and self.step >= cfg.steps
                if self.step % self.log_every == 0 or val_due or finishing:
                    logged = self._log(window)
                    if val_due:
                        self._validate_and_save()
                    window = LossWindow()  # validation is not counted in the next window's speed
                metrics = {"loss": logged.get("loss"), "patches/s": logged.get("patches_per_s"),
                           "val_loss": self.last_val}
                progress(Progress("pretrain", self.step, cfg.steps, {k: v for k, v in metrics.items() if v is not None}))
            if len(window):  # steps since the last history entry
                self._log(window)
        finally:
            del batches_in  # stops the loader's workers

        if not loop.stopped and self.step > start_step and not self.history[-1].get("val_loss"):
            self._validate_and_save()  # the final weights compete for best too
        else:
            self._save_last()
            if not self.best_written and ctx.is_main:  # stopped before any validation: keep what we have
                save_checkpoint(self.out, self._payload())
                self.best_written = True
        if not distributed.weights_agree(self.net, ctx):
            raise RuntimeError("DDP ranks ended with different weights; this is a bug, please report it.")
        distributed.barrier(ctx)
        return PretrainResult(
            path=self.out, steps=self.step, history=self.history, stopped=loop.stopped,
            skipped=sorted(self.skipped.items()), best_val_loss=self.best_val, best_step=self.best_step,
            last_path=self.last, seconds=time.perf_counter() - t0, validation=plan.validation,
            net=self.ema if self.ema is not None else self.net)

    def _log(self, window: LossWindow) -> dict:
        """The history entry of the steps in ``window``: their mean loss over all ranks, patches/s, learning rate."""
        ctx = self.ctx
        loss_sum = sum(window.losses, torch.zeros((), device=self.device))  # on the device: read once per entry
        mean = distributed.all_sum(loss_sum / len(window), ctx) / ctx.world_size
        entry = {"step": self.step, "loss": float(mean),
                 "patches_per_s": len(window) * self.cfg.batch * ctx.world_size / max(window.seconds, 1e-9),
                 "lr": self._lr(self.step - 1)}
        self.history.append(entry)
        return entry

    def _autocast(self):
        return autocast(self.device, self.cfg.amp)

    def _lr(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps`` (0: none), then constant as in the paper."""
        w = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (step + 1) / w) if w > 0 else self.cfg.lr

    def _train_step(self, batch: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        gen.manual_seed(_seed(cfg.seed, self.ctx.rank, self.step))
        x0 = to_input(batch, self.device).contiguous(memory_format=self.memory_format)
        t = torch.randint(0, _noise_levels(cfg), (x0.shape[0],), generator=gen, device=self.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.device).contiguous(memory_format=self.memory_format)
        with self._autocast():
            eps = self.model(q_sample(self.schedule, x0, t, noise), t)
        loss = p2_loss(self.schedule, eps, noise, t, cfg.p2_k, cfg.p2_gamma)
        # The official loss sums over the batch; the history keeps the per-image mean either way.
        optimise(self.opt, loss * x0.shape[0] if cfg.recipe == "official" else loss, cfg.grad_clip,
                 lr=self._lr(self.step))
        if self.ema is not None:
            # Bias-corrected ramp (as in timm/diffusers), so short runs get a usable average.
            d = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - d)
        return loss

    @torch.no_grad()
    def validate(self) -> float:
        """P2 loss of the EMA weights (or the raw ones) on fixed patches, timesteps and noise."""
        net = self.ema if self.ema is not None else self.net
        net.eval()
        patches, ts, noise = self.val
        loss_sum, count = 0.0, 0
        for k, sl in enumerate(batches(len(patches), self.cfg.batch)):
            if k % self.ctx.world_size != self.ctx.rank:  # ranks share the batches out
                continue
            x0 = to_input(patches[sl], self.device).contiguous(memory_format=self.memory_format)
            t, eps = ts[sl].to(self.device), noise[sl].to(self.device)
            with self._autocast():
                pred = net(q_sample(self.schedule, x0, t, eps), t)
            loss_sum += float(p2_loss(self.schedule, pred, eps, t, self.cfg.p2_k, self.cfg.p2_gamma)) * len(t)
            count += len(t)
        net.train()
        total = torch.tensor([loss_sum, count], dtype=torch.float64,
                             device=self.device if self.ctx.active else "cpu")
        distributed.all_sum(total, self.ctx)
        return float(total[0] / total[1])

    def _validate_and_save(self) -> None:
        val = self.validate()
        if not self.history or self.history[-1]["step"] != self.step:
            self.history.append({"step": self.step})
        self.history[-1]["val_loss"] = self.last_val = val
        if self.best_val is None or val < self.best_val or not self.best_written:
            self.best_val, self.best_step = val, self.step
            if self.ctx.is_main:
                save_checkpoint(self.out, self._payload())
            self.best_written = True
        self._save_last()

    def _save_last(self) -> None:
        if self.ctx.is_main:
            save_resume_state(self.out, self._payload(), self.opt)

    def _payload(self) -> dict:
        cfg = self.cfg
        d = {"kind": "pretrained", "net": cfg.net.to_dict(), "state_dict": self.net.state_dict(),
             "config": cfg.to_dict(), "schedule": schedule_of(cfg).to_dict(), "step": self.step,
             "data": {**self.provenance, "skipped": [list(s) for s in sorted(self.skipped.items())],
                      "world_size": self.ctx.world_size},
             "resolution": self.resolution.to_dict(), "normalization": "[-1, 1]", "history": self.history,
             "best_val_loss": self.best_val, "best_step": self.best_step}
        if self.ema is not None:
            d["ema_state_dict"] = self.ema.state_dict()
        return d


def _learnt_resolution(requested, used: Resolution, plan, tell_user: bool) -> Resolution:
    """What the checkpoint records: the µm/px asked for, or the default one when the files opened
    know their pixel size; the user hears once about files of unknown size."""
    unknown = [plan.files[i] for i, mpp in sorted(plan.pixel_sizes.items()) if mpp is None]
    if tell_user:
        for note in plan.notes:
            tell(note)
        if unknown:
            tell(unknown_note([str(f) for f in unknown]))
    if requested is None and unknown:
        return Resolution(used.level, None)
    return used


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
