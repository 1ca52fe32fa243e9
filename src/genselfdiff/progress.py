"""Progress reporting and cancellation for long work.

Every long-running engine function takes ``progress`` (called with a :class:`Progress`)
and ``should_stop`` (a no-argument callable returning True when the user asked to stop).
The CLI turns them into a tqdm bar and Ctrl-C; the napari widgets into a progress bar
and a Stop button. The engine never sees either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Progress:
    """One progress update: ``done`` of ``total`` units of ``stage`` plus live metrics."""

    stage: str
    done: int
    total: Optional[int] = None
    metrics: dict = field(default_factory=dict)
    # Optional payload for live views (a finished tile, sample images, ...).
    payload: object = None


ProgressCallback = Callable[[Progress], None]
StopCheck = Callable[[], bool]


def _no_progress(_: Progress) -> None:
    pass


def _never_stop() -> bool:
    return False


def resolve(progress: Optional[ProgressCallback], should_stop: Optional[StopCheck]):
    """Replace missing callbacks with no-ops so loops need no ``if`` around them."""
    return progress or _no_progress, should_stop or _never_stop


def drain(generator, each: Callable = None):
    """Run a generator of partial results to its end (calling ``each`` on every one); its return value."""
    while True:
        try:
            item = next(generator)
        except StopIteration as end:
            return end.value
        if each is not None:
            each(item)
