"""What every training run shares: the budget, the resume file, batches made ahead, data workers.

Pretraining (:mod:`pretrain`) and fine-tuning (:mod:`finetune`) differ in their loss,
their validation and what a checkpoint holds; the bookkeeping around them is here once:

- :class:`Budget`: steps, minutes and epochs, whichever ends first; the progress total
  and the fraction used (for learning-rate schedules);
- :func:`last_path` and :func:`load_resume_state`: where the state of the last step lives
  next to the best checkpoint, and reading it back with one clear error;
- :func:`prefetch`: batches made ahead in threads, the same batches whatever the threads;
- :func:`default_workers`: how many data workers a device gets when the user says nothing.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import UserError

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


def load_resume_state(out, is_resume_state: Callable[[dict], bool], what: str) -> dict:
    """The checkpoint at :func:`last_path` (``out``); ``what`` names the job ("pretraining")."""
    from .checkpoint import load_checkpoint

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
