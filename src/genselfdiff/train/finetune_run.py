"""One fine-tuning run: its step, the validation after each epoch, the preview, both checkpoints, resume.

:func:`genselfdiff.train.finetune.finetune` (the module doc says what a run does) checks the inputs
and builds the network, the data, the loss and the budget; :class:`FinetuneRun` trains them on
:class:`~genselfdiff.train.run.TrainingRun`'s loop, one :class:`SegmentationStep` at a time.
:class:`SegmentationStep` needs no slide reader, so a benchmark can time it on images in memory.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from ..nn.config import NetConfig
from ..nn.geometry import GEOMETRY_WEIGHT, hv_loss, hv_targets
from ..nn.model import autocast, to_input
from ..progress import Progress
from .augment import augment
from .losses import IGNORE, make_loss
from .recipe import get_recipe
from .run import (
    Budget,
    LossWindow,
    TrainingRun,
    TrainLoop,
    last_path,
    load_resume_state,
    optimise,
    prefetch,
    restore_resume_state,
)

if TYPE_CHECKING:
    from .annotations import PatchSampler, ValidationSet
    from .config import FinetuneConfig


@dataclass
class FinetuneResult:
    path: Path
    best_dice: float
    per_class_dice: list
    history: list
    stopped: bool
    steps: int
    classes: list = field(default_factory=list)
    early_stopped: bool = False
    best_step: int = 0
    seconds: float = 0.0


class SegmentationStep:
    """One fine-tuning step, as a run takes it: ``loss = step((images, targets), lr)``.

    ``images``: uint8 (B, P, P, 3), scaled as the recipe says (``normalization``); ``targets``:
    int64 (B, P, P) class ids (``IGNORE`` where unlabelled). A batch of three, ``(images, targets,
    maps)``, also trains the geometry head on ``maps`` (B, 3, P, P) from
    :func:`genselfdiff.nn.geometry.hv_targets`, adding ``GEOMETRY_WEIGHT`` x its loss. The network
    runs under the bf16 rule (:func:`genselfdiff.nn.model.autocast`); then the loss, clipping to
    ``grad_clip`` and Adam at ``lr`` (None: the optimizer's own). Returns the loss as a number.
    """

    def __init__(self, net, optimizer, loss_fn, device, *, normalization: str = "[-1, 1]", amp: bool = True,
                 grad_clip: float = 0.0):
        self.net, self.optimizer, self.loss_fn, self.device = net, optimizer, loss_fn, torch.device(device)
        self.normalization, self.amp, self.grad_clip = normalization, amp, grad_clip

    @classmethod
    def from_config(cls, cfg: "FinetuneConfig", net, device) -> "SegmentationStep":
        """The step ``cfg`` describes for ``net`` (already on ``device``): Adam at ``cfg.lr`` (which
        must be set) with its betas, its loss and weights, its recipe's input scaling, bf16 and clipping."""
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        loss_fn = make_loss(cfg.loss, ss_weight=cfg.ss_weight, focal_weight=cfg.focal_weight, beta=cfg.ss_beta,
                            c=cfg.ss_c, gamma=cfg.focal_gamma, affinity=cfg.affinity, prior=cfg.prior,
                            anchor=cfg.anchor or 0.0)
        return cls(net, optimizer, loss_fn, device, normalization=get_recipe(cfg.recipe).normalization,
                   amp=cfg.amp, grad_clip=cfg.grad_clip)

    def __call__(self, batch: tuple, lr: Optional[float] = None) -> float:
        images, targets, *maps = batch
        x, y = to_input(images, self.device, self.normalization), torch.from_numpy(targets).to(self.device)
        with autocast(self.device, self.amp):
            logits = self.net(x, geometry=True) if maps else self.net(x)
        if maps:
            logits, predicted = logits
        loss = self.loss_fn(logits, y, x)
        if maps:
            loss = loss + GEOMETRY_WEIGHT * hv_loss(predicted, torch.from_numpy(maps[0]).to(self.device))
        optimise(self.optimizer, loss, self.grad_clip, lr)
        return loss.item()


class FinetuneRun(TrainingRun):
    """The state of a fine-tuning run. ``meta``: what every checkpoint of it says about the model
    and its data; ``step``: its :class:`SegmentationStep` (the official recipe also validates with
    its loss); ``preview``: a :class:`genselfdiff.train.finetune.Preview` or None."""

    def __init__(self, *, cfg, step: SegmentationStep, sampler: "PatchSampler", budget: Budget, out: Path,
                 names: list, colors: list, meta: dict, val: "ValidationSet", preview=None):
        super().__init__(out, step.net, step.optimizer)
        self.cfg, self.stepper, self.sampler, self.budget = cfg, step, sampler, budget
        self.loss_fn, self.device = step.loss_fn, step.device
        self.names, self.colors, self.meta, self.val = names, colors, meta, val
        self.preview_region = preview
        self.spe = budget.steps_per_epoch
        self.best = {"dice": -1.0, "score": -math.inf, "per_class": [], "step": 0, "state": None}
        self.last_val_step = self.last_preview_step = -1
        self.seconds = 0.0
        self.final = False  # the resume state says whether the run finished
        self.recent: deque = deque(maxlen=max(1, cfg.log_every))  # the running loss the progress bar shows

    # validation
    @torch.no_grad()
    def validate(self, dev) -> tuple:
        """Score the held-out tiles: Dice per class and the mean cross-entropy ("val_loss").

        Dense labels choose the best network by Dice. For painted strokes both numbers are
        reported (their Dice reaches 1 within a few steps; the loss at least tells a confident
        network from a hesitant one) but the latest network is kept.
        """
        val: ValidationSet = self.val
        recipe = get_recipe(self.cfg.recipe)
        by_loss = recipe.keep_lowest_loss
        k = len(self.names)
        conf = np.zeros((k, k), np.int64)
        ce, counted, loss_sum = 0.0, 0, 0.0
        self.net.eval()
        for b in range(0, len(val.images), self.cfg.batch):
            x = to_input(val.images[b : b + self.cfg.batch], dev, recipe.normalization)
            with autocast(dev, self.cfg.amp):
                logits = self.net(x).float()
            t = val.targets[b : b + self.cfg.batch]
            if by_loss:
                loss_sum += float(self.loss_fn(logits, torch.from_numpy(t).to(dev))) * len(t)
            sel = t != IGNORE
            target = torch.from_numpy(np.where(sel, t, 0)).to(dev).long()
            nll = -logits.log_softmax(1).gather(1, target[:, None])[:, 0]
            ce += float(nll[torch.from_numpy(sel).to(dev)].sum())
            counted += int(sel.sum())
            pred = logits.argmax(1).cpu().numpy()
            conf += np.bincount(t[sel] * k + pred[sel], minlength=k * k).reshape(k, k)
        self.net.train()
        tp = np.diag(conf).astype(float)
        denom = conf.sum(0) + conf.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(denom > 0, 2 * tp / denom, np.nan)
        mean = _mean_dice(per_class)
        self.last_val_step = self.step
        entry = {"step": self.step, "epoch": self.epoch, "val_dice": mean, "val_loss": ce / max(counted, 1),
                 "per_class_dice": [float(v) for v in per_class]}
        if by_loss:  # the recipe's own loss, averaged over images
            entry["val_loss"] = loss_sum / max(1, len(val.images))
        self.history.append(entry)
        # Dense labels: the best Dice; a tie keeps the later network (trained longer on the same
        # score: a small validation set often saturates, and the first network to reach it is the
        # least trained). The official recipe: the lowest loss (the official code keeps the lowest
        # validation loss, a tie to the earlier network). Strokes: the latest network. Held-out
        # strokes are too few to choose by: their loss jumps between 0.1 and 0.5 from one epoch to
        # the next, and the network it chose scored 0.06 lower on unseen images than the last one
        # (docs/finetuning.md); so they never stop a run early either.
        record = {"dice": mean, "per_class": entry["per_class_dice"], "keep_weights": True}
        if self.cfg.sparse and not by_loss:
            _, kept = self.consider(float(self.step), force=True, **record)
        elif by_loss:
            _, kept = self.consider(-entry["val_loss"], **record)
        else:
            _, kept = self.consider(mean, margin=1e-4, ties=True, **record)
        return mean, kept

    # preview
    def preview(self, dev, progress) -> None:
        """Report the current network's class ids over the preview region, leaving training as it was."""
        from ..infer.segment import segment  # the tiler, as a slide would be segmented
        from ..nn.model import Model

        region = self.preview_region
        model = Model(net=self.net, kind="segmentation", net_config=self.net.unet.cfg, device=dev,
                      classes=list(self.names), colors=self.colors, patch=self.cfg.patch,
                      normalization=get_recipe(self.cfg.recipe).normalization, amp=self.cfg.amp,
                      stain=self.meta.get("stain"))
        self.net.eval()
        try:
            with torch.random.fork_rng(devices=[]):  # inference draws nothing; this makes sure
                labels = segment(model, np.asarray(region.image), skip_background=False).labels
        finally:
            self.net.train()
        self.last_preview_step = self.step
        progress(Progress("preview", self.step, payload={
            "labels": labels.astype(np.uint8), "origin": tuple(int(v) for v in region.origin), "step": self.step,
            "classes": list(self.names), "colors": [list(map(int, c)) for c in self.colors[: len(self.names)]]}))

    # resume
    def resume(self) -> None:
        last = last_path(self.out)
        ckpt = load_resume_state(self.out, lambda c: c.get("kind") == "segmentation" and "train_state" in c
                                 and "optimizer" in c, "fine-tuning")
        if list(ckpt.get("classes") or []) != self.names or NetConfig.from_dict(ckpt["net"]) != self.net.unet.cfg:
            raise UserError(f"{last} was trained with other classes or another network; "
                            "resume with the same settings, or choose a new output file.")
        self.net.load_state_dict(ckpt["state_dict"])
        st = ckpt["train_state"]
        self.step, self.epoch, self.since_best = int(ckpt["step"]), int(st["epoch"]), int(st["since_best"])
        best = load_checkpoint(self.out)["state_dict"] if self.out.exists() else ckpt["state_dict"]
        self.best = {"dice": float(st["best_dice"]), "score": float(st.get("best_score", st["best_dice"])),
                     "per_class": list(st["per_class_dice"]),
                     "step": int(st["best_step"]), "state": best}
        self.history = list(ckpt.get("history") or [])
        self.seconds = float(st.get("seconds", 0.0))
        restore_resume_state(ckpt, self.optimizer)

    # training
    def batches(self):
        cfg, sampler = self.cfg, self.sampler

        def make(step):
            rng = np.random.default_rng([cfg.seed, step])  # the same batches however many threads
            pairs = [augment(*sampler.sample(rng), rng, cfg.augment) for _ in range(cfg.batch)]
            images, targets = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
            if targets.ndim == 3:
                return images, targets
            # Class targets and instance ids, augmented together: the maps come from the augmented ids.
            targets, ids = np.ascontiguousarray(targets[..., 0]), targets[..., 1]
            return images, targets, np.stack([hv_targets(i, t >= 0) for i, t in zip(ids, targets)])

        return prefetch(make, self.step, cfg.workers)

    def train(self, progress, should_stop, resume: bool = False) -> FinetuneResult:
        """Train from the saved state (``resume``) or from the start, scored first as a baseline and a first "best"."""
        cfg = self.cfg
        if resume:
            self.resume()
        else:
            self.validate(self.device)
        loop = TrainLoop(self.budget, should_stop, since=time.perf_counter() - self.seconds)
        early = self.fit(loop, progress)
        if self.last_val_step != self.step:
            self.validate(self.device)
        if (self.preview_region is not None and cfg.preview_every and not loop.stopped
                and self.last_preview_step != self.step):
            self.preview(self.device, progress)  # what the network finally does (Stop should not wait for it)
        self.seconds = loop.elapsed
        self.save(best=True, final=True)
        return FinetuneResult(path=self.out, best_dice=float(self.best["dice"]), per_class_dice=self.best["per_class"],
                              history=self.history, stopped=loop.stopped, steps=self.step, classes=self.names,
                              early_stopped=early, best_step=self.best["step"], seconds=self.seconds)

    def train_step(self, batch, loop: TrainLoop) -> float:
        return self.stepper(batch, self._lr(loop))

    def after_step(self, loss: float, loop: TrainLoop, progress) -> bool:
        cfg = self.cfg
        self.recent.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"fine-tuning loss became {loss} at step {self.step}")
        if self.step % cfg.log_every == 0:
            self.history.append({"step": self.step, "loss": float(np.mean(self.window.losses))})
            self.window = LossWindow()
        progress(Progress("finetune", self.step, loop.total(self.step),
                          {"loss": float(np.mean(self.recent)), "val_dice": self.history_val()}))
        if self.step % self.spe == 0 and self._end_epoch(progress, loop, float(np.mean(self.recent))):
            return True
        if self.preview_region is not None and cfg.preview_every and self.step % cfg.preview_every == 0:
            self.preview(self.device, progress)
        return False

    def _lr(self, loop: TrainLoop) -> Optional[float]:
        """The cosine schedule's learning rate for the next step; None for a constant one (the optimizer's)."""
        if self.cfg.lr_schedule != "cosine":
            return None
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * loop.fraction(self.step)))

    def _end_epoch(self, progress, loop: TrainLoop, train_loss: float) -> bool:
        """Validate, save, report; whether the patience has run out."""
        self.epoch += 1
        dice, improved = self.validate(self.device)
        entry = self.history[-1]
        entry["train_loss"] = train_loss
        self.seconds = loop.elapsed
        self.save(best=improved)
        progress(Progress("finetune", self.step, loop.total(self.step),
                          {"loss": train_loss, "val_dice": dice, "val_loss": entry["val_loss"]},
                          payload={"epoch": self.epoch, "val_dice": dice, "improved": improved,
                                   "val_loss": entry["val_loss"], "per_class_dice": entry["per_class_dice"],
                                   "classes": self.names}))
        return bool(self.cfg.patience) and self.since_best >= self.cfg.patience and self.step >= self.cfg.min_steps

    def history_val(self) -> float:
        for h in reversed(self.history):
            if "val_dice" in h:
                return h["val_dice"]
        return float("nan")

    # the files
    def save(self, best: bool, final: bool = False) -> Path:
        """Write the resume state to ``<out>.last.pt`` and, if ``best`` (or nothing is there yet),
        the kept network to ``out``."""
        self.final = final
        super().save(best or not self.out.exists())
        return self.out

    def _common(self) -> dict:
        return {**self.meta, "history": self.history, "best_step": self.best["step"],
                "best_dice": float(self.best["dice"]), "per_class_dice": list(self.best["per_class"])}

    def _weights(self) -> dict:
        return {n: v.detach().to("cpu", copy=True) for n, v in self.net.state_dict().items()}

    def resume_payload(self) -> dict:
        return {**self._common(), "state_dict": self._weights(), "step": self.step,
                "train_state": {"epoch": self.epoch, "since_best": self.since_best,
                                "best_dice": float(self.best["dice"]), "best_score": float(self.best["score"]),
                                "best_step": self.best["step"], "per_class_dice": list(self.best["per_class"]),
                                "seconds": self.seconds, "finished": self.final}}

    def kept_payload(self) -> dict:
        state = self.best["state"] if self.best["state"] is not None else self._weights()
        return {**self._common(), "state_dict": state, "step": self.best["step"], "trained_steps": self.step}


def _mean_dice(per_class: np.ndarray) -> float:
    """Mean Dice of the object classes (background excluded, as usual); falls back to all classes."""
    for values in (per_class[1:], per_class):
        values = values[~np.isnan(values)]
        if len(values):
            return float(values.mean())
    return 0.0
