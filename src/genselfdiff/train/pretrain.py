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
``resume`` needs to continue the exact run, which it does with the settings it was started
with (only :data:`RUNTIME_FIELDS` come from the caller).

:class:`DiffusionStep` is one training step, as :class:`PretrainRun` takes it; it needs no
slide reader, so a benchmark can time it on images in memory.
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
from ..io.files import same_slides
from ..io.pixelsize import Resolution, tell, unknown_note, working_resolution
from ..nn.config import AUTO
from ..nn.model import autocast, memory_format, pick_device, to_input
from ..nn.schedule import Schedule, p2_loss, q_sample
from ..nn.unet import UNet
from ..progress import Progress, resolve
from . import ddp as distributed
from .config import PretrainConfig, check_config, noise_levels, resolve_config
from .recipe import DEFAULT, get_recipe
from .run import (
    Budget,
    LossWindow,
    TrainingRun,
    TrainLoop,
    ignored_choices,
    last_path,
    load_resume_state,
    optimise,
    restore_resume_state,
)

# Fields a resumed run takes from the caller rather than from the checkpoint: they change
# how long and how fast it runs, not what it computes.
RUNTIME_FIELDS = ("steps", "minutes", "workers", "compile", "val_every")


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


class DiffusionStep:
    """One pretraining step, as a run takes it: ``loss = step(batch, s)``.

    ``batch``: uint8 (B, P, P, 3) patches; ``s``: the step's number, from which its timesteps and
    noise (with the seed and ``rank``) and its warm-up learning rate derive. The step scales the
    patches to [-1, 1], noises them, predicts the noise under the bf16 rule
    (:func:`genselfdiff.nn.model.autocast`) in the layout of :func:`~genselfdiff.nn.model.memory_format`,
    takes the P2 loss (summed over the batch under a recipe that says so), clips, steps Adam and
    updates the EMA. Returns the loss, a tensor not yet read (reading it waits for the device).

    ``config`` is resolved with :func:`resolve_config`; the initial weights follow its seed and
    recipe. ``net`` (the raw weights), ``ema`` (None without EMA), ``optimizer`` and ``model``
    (what runs the forward pass: the network, wrapped for DDP and compiled by :meth:`wrap`) are
    attributes.
    """

    def __init__(self, config: PretrainConfig, device, rank: int = 0):
        device = torch.device(device)
        cfg = self.cfg = resolve_config(config, device)
        self.device, self.rank, self.recipe = device, rank, get_recipe(cfg.recipe)
        self.schedule = schedule_of(cfg)
        if device.type != "cpu":  # its tensors on the GPU: no host copy (and stall) in every step
            # MPS has no float64; 1000 cumulative products in float32 stay within 1e-6 relative.
            dtype = torch.float64 if device.type == "cuda" else torch.float32
            self.schedule = Schedule(self.schedule.betas.to(device, dtype))
        self.memory_format = memory_format(device, cfg.channels_last)
        with torch.random.fork_rng(devices=[]):  # same initial weights for a seed, caller's RNG untouched
            torch.manual_seed(cfg.seed)
            self.net = self.recipe.init(UNet(cfg.net))
        self.net.to(device, memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.net).requires_grad_(False) if cfg.ema_decay > 0 else None
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, fused=device.type == "cuda" or None)
        self.model = self.net
        self.gen = torch.Generator(device=device)

    def wrap(self, wrapper=None) -> None:
        """Run the forward pass through ``wrapper(net)`` (e.g. DDP), compiled if the config says so."""
        self.model = wrapper(self.net) if wrapper is not None else self.net
        if self.cfg.compile:
            self.model = torch.compile(self.model)

    def autocast(self):
        return autocast(self.device, self.cfg.amp)

    def lr(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps`` (0: none), then constant as in the paper."""
        w = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (step + 1) / w) if w > 0 else self.cfg.lr

    def __call__(self, batch: np.ndarray, step: int) -> torch.Tensor:
        cfg, dev, fmt = self.cfg, self.device, self.memory_format
        self.gen.manual_seed(_seed(cfg.seed, self.rank, step))
        x0 = to_input(batch, dev).contiguous(memory_format=fmt)
        t = torch.randint(0, noise_levels(cfg), (x0.shape[0],), generator=self.gen, device=dev)
        noise = torch.randn(x0.shape, generator=self.gen, device=dev).contiguous(memory_format=fmt)
        with self.autocast():
            eps = self.model(q_sample(self.schedule, x0, t, noise), t)
        loss = p2_loss(self.schedule, eps, noise, t, cfg.p2_k, cfg.p2_gamma)
        # The official loss sums over the batch; the history keeps the per-image mean either way.
        optimise(self.optimizer, loss * x0.shape[0] if self.recipe.sum_loss else loss, cfg.grad_clip, lr=self.lr(step))
        if self.ema is not None:
            # Bias-corrected ramp (as in timm/diffusers), so short runs get a usable average.
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - d)
        return loss


def pretrain(sources, out, config: PretrainConfig, *, device="auto", resume: bool = False, progress=None,
             should_stop=None, log_every: Optional[int] = None, pixel_size=None,
             override_pixel_size: bool = False) -> PretrainResult:
    """Pretrain the diffusion U-Net on unlabelled slides; returns where the best checkpoint is.

    ``sources``: image files and/or folders (searched recursively). ``out``: the best checkpoint
    (by validation loss); the state of the last step goes to :func:`last_path` (``out``).
    ``resume=True`` continues that state with the settings it was started with, except
    :data:`RUNTIME_FIELDS`; a choice in ``config`` that contradicts them is said in one line and
    left out. The run ends after ``config.steps`` steps or ``config.minutes``
    minutes (whichever first; neither: until ``should_stop``). On stop it saves both files and
    returns with ``stopped=True``. Under ``torchrun`` it trains data-parallel (see
    :mod:`genselfdiff.train.ddp`). ``log_every``: steps per history entry (default 1 on the
    CPU, 10 on a GPU, where reading the loss waits for the device). ``pixel_size``: the level-0
    µm/px of the slides, for files that state none (see :func:`genselfdiff.io.slides.open_slide`);
    without ``config.resolution`` patches are read at ``DEFAULT_MPP`` where the size is known.
    """
    t0 = time.perf_counter()
    progress, should_stop = resolve(progress, should_stop)
    ctx = distributed.setup(pick_device(device))
    try:
        opening = {"pixel_size": pixel_size, "override_pixel_size": override_pixel_size}
        run = PretrainRun(sources, Path(out), config, ctx, resume, log_every, opening)
        return run.train(progress if ctx.is_main else resolve(None, None)[0], should_stop, t0)
    finally:
        distributed.teardown(ctx)


class PretrainRun(TrainingRun):
    """One pretraining run on :class:`~genselfdiff.train.run.TrainingRun`'s loop (see :func:`pretrain`)."""

    def __init__(self, sources, out: Path, config: PretrainConfig, ctx, resume: bool, log_every, opening=None):
        self.sources, self.ctx, self.device, self.is_main = list(sources), ctx, ctx.device, ctx.is_main
        self.opening = opening  # how open_slide is called: the user's pixel size
        ckpt = None
        if resume:
            ckpt = load_resume_state(out, lambda c: c.get("kind") == "pretrained" and "optimizer" in c, "pretraining")
            config = _resumed_config(config, ckpt, last_path(out), tell_user=ctx.is_main)
        cfg = self.cfg = resolve_config(config, self.device)
        check_config(cfg)
        self.stepper = DiffusionStep(cfg, self.device, rank=ctx.rank)
        super().__init__(out, self.stepper.net, self.stepper.optimizer)
        self.last = last_path(out)
        self.log_every = log_every or (1 if self.device.type == "cpu" else 10)
        self.last_val, self.logged, self.resumed_data = None, {}, None
        # Whether ``out`` holds this run's best (a file left by an unrelated earlier run does not count).
        self.best_written = ckpt is not None and out.exists()
        if ckpt is not None:
            self._restore(ckpt)
        self.stepper.wrap(lambda net: distributed.wrap(net, ctx))

    @property
    def best_val(self) -> Optional[float]:
        return self.best.get("val_loss")

    def _restore(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt["state_dict"])
        if self.stepper.ema is not None:
            self.stepper.ema.load_state_dict(ckpt.get("ema_state_dict") or ckpt["state_dict"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        val = ckpt.get("best_val_loss")
        self.best = {"score": -val if val is not None else -np.inf, "step": ckpt.get("best_step"), "val_loss": val,
                     "state": None}
        restore_resume_state(ckpt, self.optimizer)
        self.resumed_data = ckpt.get("data", {})

    # --- the run ----------------------------------------------------------------------
    def train(self, progress, should_stop, t0: float) -> PretrainResult:
        from .patches import plan_data  # the slide reader: not needed by the step alone

        cfg, ctx = self.cfg, self.ctx
        resolution = self.resolution_read = working_resolution(cfg.resolution)
        plan = plan_data(self.sources, cfg.patch, resolution, seed=cfg.seed, val_fraction=cfg.val_fraction,
                         val_patches=cfg.val_batches * cfg.batch, opening=self.opening)
        self.resolution = _learnt_resolution(cfg.resolution, resolution, plan, ctx.is_main)
        self.plan, self.provenance = plan, plan.provenance(self.sources)
        if not same_slides(self.resumed_data or self.provenance, self.provenance):
            warnings.warn("The slides differ from those of the run being resumed; the data stream will differ.")
        self.skipped = dict(plan.skipped)
        self.val = (plan.val_patches, *val_noise(len(plan.val_windows), cfg.patch, noise_levels(cfg), cfg.seed))

        agree = (lambda flags: distributed.any_rank(flags, ctx)) if ctx.active else None
        loop = TrainLoop(Budget(steps=cfg.steps, minutes=cfg.minutes), should_stop, since=t0, agree=agree,
                         agree_every=self.log_every)
        start_step = self.step
        self.fit(loop, progress)
        if len(self.window):  # steps since the last history entry
            self._log(self.window)
        if not loop.stopped and self.step > start_step and not self.history[-1].get("val_loss"):
            self.validate_and_save()  # the final weights compete for best too
        else:  # stopped before any validation: keep what we have
            self.save(best=not self.best_written)
            self.best_written = True
        if not distributed.weights_agree(self.net, ctx):
            raise RuntimeError("DDP ranks ended with different weights; this is a bug, please report it.")
        distributed.barrier(ctx)
        return PretrainResult(
            path=self.out, steps=self.step, history=self.history, stopped=loop.stopped,
            skipped=sorted(self.skipped.items()), best_val_loss=self.best_val, best_step=self.best["step"],
            last_path=self.last, seconds=time.perf_counter() - t0, validation=plan.validation,
            net=self.stepper.ema if self.stepper.ema is not None else self.net)

    def batches(self):
        from .patches import PatchStream

        cfg, plan = self.cfg, self.plan
        stream = PatchStream(plan.files, plan.train, cfg.patch, cfg.batch, self.resolution_read, seed=cfg.seed,
                             rank=self.ctx.rank, start=self.step, exclude=plan.exclude, bad=plan.bad,
                             opening=self.opening)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                             prefetch_factor=4 if cfg.workers else None)
        batches_in = iter(loader)
        try:
            while True:
                batch, bad = next(batches_in)
                self.skipped.update(dict(bad))
                yield batch.numpy()
        finally:
            del batches_in  # stops the loader's workers

    def train_step(self, batch, loop) -> torch.Tensor:
        return self.stepper(batch, self.step).detach()

    def after_step(self, loss, loop, progress) -> bool:
        cfg = self.cfg
        val_due = cfg.val_every > 0 and self.step % cfg.val_every == 0
        finishing = cfg.steps is not None and self.step >= cfg.steps
        if self.step % self.log_every == 0 or val_due or finishing:
            self.logged = self._log(self.window)
            if val_due:
                self.validate_and_save()
            self.window = LossWindow()  # validation is not counted in the next window's speed
        metrics = {"loss": self.logged.get("loss"), "patches/s": self.logged.get("patches_per_s"),
                   "val_loss": self.last_val}
        progress(Progress("pretrain", self.step, cfg.steps, {k: v for k, v in metrics.items() if v is not None}))
        return False

    def _log(self, window: LossWindow) -> dict:
        """The history entry of the steps in ``window``: their mean loss over all ranks, patches/s, learning rate."""
        ctx = self.ctx
        loss_sum = sum(window.losses, torch.zeros((), device=self.device))  # on the device: read once per entry
        mean = distributed.all_sum(loss_sum / len(window), ctx) / ctx.world_size
        entry = {"step": self.step, "loss": float(mean),
                 "patches_per_s": len(window) * self.cfg.batch * ctx.world_size / max(window.seconds, 1e-9),
                 "lr": self.stepper.lr(self.step - 1)}
        self.history.append(entry)
        return entry

    # --- validation and the files ------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """P2 loss of the EMA weights (or the raw ones) on fixed patches, timesteps and noise."""
        step = self.stepper
        net = step.ema if step.ema is not None else self.net
        net.eval()
        patches, ts, noise = self.val
        loss_sum, count = 0.0, 0
        for k, sl in enumerate(batches(len(patches), self.cfg.batch)):
            if k % self.ctx.world_size != self.ctx.rank:  # ranks share the batches out
                continue
            x0 = to_input(patches[sl], self.device).contiguous(memory_format=step.memory_format)
            t, eps = ts[sl].to(self.device), noise[sl].to(self.device)
            with step.autocast():
                pred = net(q_sample(step.schedule, x0, t, eps), t)
            loss_sum += float(p2_loss(step.schedule, pred, eps, t, self.cfg.p2_k, self.cfg.p2_gamma)) * len(t)
            count += len(t)
        net.train()
        total = torch.tensor([loss_sum, count], dtype=torch.float64,
                             device=self.device if self.ctx.active else "cpu")
        distributed.all_sum(total, self.ctx)
        return float(total[0] / total[1])

    def validate_and_save(self) -> None:
        """Validate, keep the network if its loss is the lowest so far, and write both files."""
        val = self.validate()
        if not self.history or self.history[-1]["step"] != self.step:
            self.history.append({"step": self.step})
        self.history[-1]["val_loss"] = self.last_val = val
        _, kept = self.consider(-val, force=self.best["step"] is None or not self.best_written, val_loss=val)
        self.save(best=kept)
        self.best_written = self.best_written or kept

    def kept_payload(self) -> dict:
        cfg = self.cfg
        d = {"kind": "pretrained", "net": cfg.net.to_dict(), "state_dict": self.net.state_dict(),
             "config": cfg.to_dict(), "schedule": schedule_of(cfg).to_dict(), "step": self.step,
             "data": {**self.provenance, "skipped": [list(s) for s in sorted(self.skipped.items())],
                      "world_size": self.ctx.world_size},
             "resolution": self.resolution.to_dict(), "normalization": "[-1, 1]", "history": self.history,
             "best_val_loss": self.best_val, "best_step": self.best["step"]}
        if self.stepper.ema is not None:
            d["ema_state_dict"] = self.stepper.ema.state_dict()
        return d

    resume_payload = kept_payload  # the resume state is the checkpoint of the last step


def _resumed_config(config: PretrainConfig, ckpt: dict, last: Path, tell_user: bool) -> PretrainConfig:
    """The saved run's config with the caller's :data:`RUNTIME_FIELDS`; the caller's other choices
    that contradict it are said in one line."""
    saved = PretrainConfig.from_dict(ckpt["config"])
    runtime = {k: getattr(config, k) for k in RUNTIME_FIELDS}
    if config.steps is None and config.minutes is None:  # continue to the original target
        runtime.update(steps=saved.steps, minutes=saved.minutes)
    try:  # what the caller's config holds where it chose nothing
        unasked = PretrainConfig.from_preset(config.preset, recipe=config.recipe)
    except UserError:  # a preset that does not exist: the saved one is used anyway
        unasked = PretrainConfig()
    ignored = ignored_choices(config, saved, replace(unasked, preset=AUTO, recipe=DEFAULT.name), RUNTIME_FIELDS)
    if ignored and tell_user:
        tell(f"Resuming {last} with the settings it was started with: {'; '.join(ignored)}. "
             "Start a new run to train with other settings.")
    return replace(saved, **runtime)


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


def val_noise(n: int, patch: int, timesteps: int, seed: int = 0):
    """Fixed timesteps (evenly spread over 0..T-1) and noise for the validation patches."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 13]).generate_state(1)[0]))
    t = torch.tensor([min(timesteps - 1, int((k + 0.5) * timesteps / n)) for k in range(n)], dtype=torch.long)
    t = t[torch.randperm(n, generator=g)]
    return t, torch.randn((n, 3, patch, patch), generator=g)


def batches(n: int, size: int):
    """Slices splitting ``n`` items into batches of at most ``size``."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)] if n else []


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
