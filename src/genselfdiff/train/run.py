"""What every training run shares: the run itself, its end, the step, the resume file, batches made ahead.

Pretraining (:mod:`pretrain`) and fine-tuning (:mod:`finetune`) differ in their batches,
their loss, their validation and what a checkpoint holds; the run around them is here once:

- :class:`TrainingRun`: one run, the base of both jobs' runs: the loop (:meth:`~TrainingRun.fit`)
  with hooks for the batches, the step and what follows it, the history, the choice of the
  best network (:meth:`~TrainingRun.consider`) and writing both files (:meth:`~TrainingRun.save`);
- :class:`Budget`: steps, minutes and epochs, whichever ends first; the progress total
  and the fraction used (for learning-rate schedules);
- :class:`TrainLoop`: whether the run takes another step (the budget, then the user's
  stop; under DDP decided by all ranks together), and the run's clock;
- :class:`LossWindow`: the losses and time of the steps since the last history entry;
- :func:`optimise`: one optimisation step (gradients, clipping, learning rate);
- :func:`last_path`, :func:`save_resume_state`, :func:`load_resume_state` and
  :func:`restore_resume_state`: where the state of the last step lives next to the best
  checkpoint, what it holds besides the run's own payload, and reading it back (with one
  clear error) into the optimizer and the RNGs;
- :func:`ignored_choices`: what a resumed run, which keeps the settings it was started with,
  leaves out of the caller's choices (to say so);
- :func:`prefetch`: batches made ahead in threads, the same batches whatever the threads;
- :func:`default_workers`: how many data workers a device gets when the user says nothing.

The step of each job is an object of its own (:class:`genselfdiff.train.pretrain.DiffusionStep`,
:class:`genselfdiff.train.finetune_run.SegmentationStep`) that the runs call and benchmarks time.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..errors import UserError
from ..io.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

MAX_DATA_WORKERS = 8  # beyond this, reading patches outpaces any one GPU we measured


def default_workers(device) -> int:
    """Data workers when the user chose none: up to 8 (half the cores) on CUDA, none elsewhere
    (on a CPU they would compete with the network for the same cores)."""
    kind = getattr(device, "type", str(device))
    return min(MAX_DATA_WORKERS, (os.cpu_count() or 2) // 2) if kind == "cuda" else 0


def last_path(out) -> Path:
    """Where the resume state of ``out`` lives: ``model.pt`` -> ``model.last.pt``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.last{out.suffix}") if out.suffix else out.with_name(out.name + ".last")


def save_resume_state(out, payload: dict, optimizer) -> None:
    """Write ``payload`` and what continuing needs besides (the optimizer's state, every RNG) to
    :func:`last_path` (``out``)."""
    save_checkpoint(last_path(out), {**payload, "optimizer": optimizer.state_dict(), "rng": capture_rng()})


def restore_resume_state(ckpt: dict, optimizer) -> None:
    """Put back what :func:`save_resume_state` added: the optimizer's state and every RNG."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("rng"):
        restore_rng(ckpt["rng"])


def load_resume_state(out, is_resume_state: Callable[[dict], bool], what: str) -> dict:
    """The checkpoint at :func:`last_path` (``out``); ``what`` names the job ("pretraining")."""
    last = last_path(out)
    if not last.exists():
        raise UserError(f"Nothing to resume: {last} does not exist (it is written next to the model during "
                        f"{what}); start without resuming.")
    ckpt = load_checkpoint(last)
    if not is_resume_state(ckpt):
        raise UserError(f"{last} is not the resume state of a {what} run.")
    return ckpt


def ignored_choices(asked, kept, unasked, runtime: tuple = ()) -> list:
    """What a resumed run leaves out of the caller's config ``asked``: ``"name kept (not asked)"``
    for each field, but the ``runtime`` ones, that the caller chose (a value other than ``unasked``,
    the config of no choices) and that the run being resumed (``kept``) does not have. A network
    given as a dict of changed fields is compared field by field."""
    ignored = []
    for name in (f.name for f in fields(asked) if f.name not in runtime):
        mine, theirs = getattr(asked, name), getattr(kept, name)
        if mine is None or mine == getattr(unasked, name):
            continue
        if isinstance(mine, dict) and not isinstance(theirs, dict):
            ignored += [f"{k} {_shown(getattr(theirs, k, None))} (not {_shown(v)})" for k, v in mine.items()
                        if getattr(theirs, k, None) != v]
        elif mine != theirs:
            ignored.append(f"{name} {_shown(theirs)} (not {_shown(mine)})")
    return ignored


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Budget:
    """How long a run trains: ``steps``, ``minutes`` or ``epochs`` of ``steps_per_epoch``, whichever ends first."""

    steps: Optional[int] = None
    minutes: Optional[float] = None
    epochs: Optional[int] = None
    steps_per_epoch: Optional[int] = None

    @property
    def epoch_steps(self) -> Optional[int]:
        return self.epochs * self.steps_per_epoch if self.epochs is not None and self.steps_per_epoch else None

    def spent(self, step: int, elapsed: float, epoch: Optional[int] = None) -> bool:
        """Whether the run is over after ``step`` steps, ``elapsed`` seconds (and ``epoch`` epochs, if counted)."""
        if self.steps is not None and step >= self.steps:
            return True
        if self.epochs is not None and (epoch >= self.epochs if epoch is not None else
                                        self.epoch_steps is not None and step >= self.epoch_steps):
            return True
        return self.minutes is not None and elapsed >= 60 * self.minutes

    def total(self, step: int, elapsed: float) -> Optional[int]:
        """The step the run will likely end at (for a progress bar); None while nothing bounds it."""
        totals = [t for t in (self.steps, self.epoch_steps) if t is not None]
        if self.minutes is not None and step > 0 and elapsed > 0:
            totals.append(int(step / elapsed * self.minutes * 60))
        return min(totals) if totals else None

    def fraction(self, step: int, elapsed: float) -> float:
        """How much of the budget is used (0 to 1)."""
        used = [0.0]
        if self.steps:
            used.append(step / self.steps)
        if self.epoch_steps:
            used.append(step / self.epoch_steps)
        if self.minutes:
            used.append(elapsed / (self.minutes * 60))
        return min(1.0, max(used))


class TrainLoop:
    """Whether a run takes another step: ``while loop.goes_on(step): ...``.

    It ends when the budget is spent or, failing that, when ``should_stop()`` says so
    (``stopped``). ``since``: the ``time.perf_counter()`` the run's clock counts from (earlier
    sessions of a resumed run included); default now. Under DDP every rank must end at the same
    step: ``agree`` turns this rank's [budget spent, stop] into all ranks' verdict
    (:func:`genselfdiff.train.ddp.any_rank`), asked every ``agree_every`` steps since it waits
    for every rank; a step budget is the same on every rank and needs no agreement.
    """

    def __init__(self, budget: Budget, should_stop: Callable[[], bool], since: Optional[float] = None,
                 agree: Optional[Callable[[list], list]] = None, agree_every: int = 1):
        self.budget, self.should_stop, self.agree, self.agree_every = budget, should_stop, agree, agree_every
        self.since = time.perf_counter() if since is None else since
        self.stopped = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.since

    def goes_on(self, step: int, epoch: Optional[int] = None) -> bool:
        if self.agree is None:
            if self.budget.spent(step, self.elapsed, epoch):
                return False
            self.stopped = bool(self.should_stop())
            return not self.stopped
        if self.budget.steps is not None and step >= self.budget.steps:
            return False
        if step % self.agree_every:
            return True
        spent, stop = self.agree([self.budget.spent(step, self.elapsed, epoch), self.should_stop()])
        self.stopped = stop and not spent
        return not (spent or stop)

    def total(self, step: int) -> Optional[int]:
        return self.budget.total(step, self.elapsed)

    def fraction(self, step: int) -> float:
        return self.budget.fraction(step, self.elapsed)


class LossWindow:
    """The losses of the steps since the last history entry, and the seconds they took."""

    def __init__(self):
        self.losses: list = []
        self.started = time.perf_counter()

    def add(self, loss) -> None:
        self.losses.append(loss)

    def __len__(self) -> int:
        return len(self.losses)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def optimise(optimizer, loss, grad_clip: float = 0.0, lr: Optional[float] = None) -> None:
    """One step down ``loss``: its gradients, clipped to norm ``grad_clip`` (0: not clipped), at
    learning rate ``lr`` (None: the optimizer's own)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.step()


def prefetch(make: Callable[[int], object], start: int, workers: int) -> Iterator:
    """``make(start)``, ``make(start + 1)``, ... made ``2 * workers`` ahead in threads (in order; 0: inline).
    Each batch depends only on its step, so the stream is the same however many threads make it."""
    step = start
    if workers <= 0:
        while True:
            yield make(step)
            step += 1
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers)
    try:
        ahead = deque(pool.submit(make, s) for s in range(step, step + 2 * workers))
        step += 2 * workers
        while True:
            batch = ahead.popleft().result()
            ahead.append(pool.submit(make, step))
            step += 1
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class TrainingRun:
    """One training run: the loop both jobs share, with hooks for what differs.

    :meth:`fit` draws batches (:meth:`batches`, a stream from ``self.step``) and takes one
    optimisation step on each (:meth:`train_step`), adding its loss to ``self.window`` (the
    steps since the last history entry), then hands over to :meth:`after_step` (history,
    validation, progress), which may end the run early. Validation is the job's own; choosing
    the network to keep is :meth:`consider`, and :meth:`save` writes the resume state
    (:meth:`resume_payload`, with the optimizer and the RNGs) to :func:`last_path` and, when
    asked, the kept network (:meth:`kept_payload`) to ``out``. Only the main process writes.

    State: ``step``, ``epoch``, ``history`` (a list of dicts, each with ``step``), ``best``
    (``score``, higher is better, ``step`` and, when kept in memory, ``state``: the weights)
    and ``since_best`` (validations since the last improvement).
    """

    is_main = True  # under DDP only rank 0 writes files

    def __init__(self, out, net, optimizer):
        self.out, self.net, self.optimizer = Path(out), net, optimizer
        self.step = self.epoch = self.since_best = 0
        self.history: list = []
        self.best: dict = {"score": -math.inf, "step": None, "state": None}
        self.window = LossWindow()

    # --- hooks ---------------------------------------------------------------------------
    def batches(self) -> Iterator:
        """The batches from step ``self.step`` on; closed (if it can be) when the loop ends."""
        raise NotImplementedError

    def train_step(self, batch, loop: TrainLoop):
        """One optimisation step on ``batch``; its loss (a tensor, read when logged, or a number)."""
        raise NotImplementedError

    def after_step(self, loss, loop: TrainLoop, progress) -> bool:
        """What follows step ``self.step`` (history, validation, progress); True ends the run early."""
        return False

    def resume_payload(self) -> dict:
        """What the resume state holds besides the optimizer and the RNGs."""
        raise NotImplementedError

    def kept_payload(self) -> dict:
        """The checkpoint of the kept network."""
        raise NotImplementedError

    # --- the loop ------------------------------------------------------------------------
    def fit(self, loop: TrainLoop, progress) -> bool:
        """Train until ``loop`` ends or :meth:`after_step` says so (then True)."""
        batches = self.batches()
        self.window = LossWindow()
        self.net.train()
        try:
            while loop.goes_on(self.step, self.epoch):
                loss = self.train_step(next(batches), loop)
                self.step += 1
                self.window.add(loss)
                if self.after_step(loss, loop, progress):
                    return True
            return False
        finally:
            if hasattr(batches, "close"):
                batches.close()  # stops the threads or processes making batches

    # --- the best network and the files ----------------------------------------------------
    def consider(self, score: float, *, margin: float = 0.0, ties: bool = False, force: bool = False,
                 keep_weights: bool = False, **record) -> tuple:
        """Whether the network at ``self.step`` with ``score`` (higher is better) is an improvement
        (by more than ``margin``, or ``force``) and whether it is now the one kept: an improvement,
        or with ``ties`` a score within ``margin`` of the best, which keeps the later, longer-trained
        network (a small validation set often saturates). Only an improvement resets ``since_best``.
        ``keep_weights`` keeps a CPU copy of the weights in ``best["state"]``; ``record`` is stored
        with the score."""
        improved = force or score > self.best["score"] + margin
        tied = ties and not improved and self.step > 0 and score >= self.best["score"] - margin
        if improved or tied:
            state = ({n: v.detach().to("cpu", copy=True) for n, v in self.net.state_dict().items()}
                     if keep_weights else None)
            self.best = {**record, "score": score, "step": self.step, "state": state}
        self.since_best = 0 if improved else self.since_best + 1
        return improved, improved or tied

    def save(self, best: bool) -> None:
        """Write the resume state and, if ``best``, the kept network."""
        if self.is_main:
            save_resume_state(self.out, self.resume_payload(), self.optimizer)
            if best:
                save_checkpoint(self.out, self.kept_payload())
