"""What every training run shares: the loop's end, the step, the resume file, batches made ahead.

Pretraining (:mod:`pretrain`) and fine-tuning (:mod:`finetune`) differ in their loss,
their validation and what a checkpoint holds; the bookkeeping around them is here once:

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
- :func:`prefetch`: batches made ahead in threads, the same batches whatever the threads;
- :func:`default_workers`: how many data workers a device gets when the user says nothing.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
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
