"""The pixel size (µm per pixel) of an input: what the file states, what the user gives, which wins.

Results depend on the physical scale: a 64-px patch holds a few nuclei at 0.5 µm/px but
barely one at 0.25 µm/px. Files that state their size (SVS, OME-TIFF, OME-Zarr, TIFF
resolution tags) need nothing; PNG, JPEG and plain TIFF state none, so the user gives it.

The rules (:func:`resolve_pixel_size`): a given size is used when the file states none,
and wins over a stated one within :data:`MAX_DISAGREEMENT` (a warning when they differ by
more than :data:`NOTICEABLE`); further apart it is refused unless the user overrides the
file (``--override-pixel-size``), since one of them is then plainly wrong. Messages for
the user go out as :class:`PixelSizeWarning`; the CLI prints them as one line, napari
shows them as notifications.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

from ..errors import UserError

# The µm/px that training reads patches at when the images' pixel size is known and no
# --level/--mpp is given: nuclei did best near 0.5 µm/px (20x) in our sweeps.
DEFAULT_MPP = 0.5

@dataclass
class Resolution:
    """Where patches are taken: a pyramid level, or a target µm/px when the image's pixel size is known
    (stated by the file or given); images of unknown size fall back to the level."""

    level: int = 0
    mpp: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)

MAX_DISAGREEMENT = 2.0  # a given size further than this factor from the stated one is refused
NOTICEABLE = 0.10  # given and stated sizes further apart than this (relative) are worth a warning

HOW_TO_GIVE = ("give it with --pixel-size (or the widget's Pixel size field), e.g. 0.25 µm/px for 40x "
               "or 0.5 for 20x")


class PixelSizeConflict(UserError):
    """A given pixel size that contradicts the file's own (the message starts with the file)."""


class PixelSizeWarning(UserWarning):
    """Something the user should know about pixel sizes (one line; not an error)."""


def tell(message: str) -> None:
    """Warn once per distinct message (the warnings module drops repeats)."""
    warnings.warn(message, PixelSizeWarning, stacklevel=2)


def check_pixel_size(value, where) -> Optional[float]:
    """``value`` (a number or a string holding one, or None) as µm/px; ``where`` names the file."""
    if value is None:
        return None
    try:
        um = float(value)
    except (TypeError, ValueError):
        raise UserError(f"The pixel size {value!r} given for {where} is not a number; give µm per pixel, "
                        "e.g. 0.25 for 40x or 0.5 for 20x.") from None
    if not math.isfinite(um) or um <= 0:
        raise UserError(f"The pixel size {value!r} given for {where} must be a positive number of µm per pixel, "
                        "e.g. 0.25 for 40x or 0.5 for 20x.")
    return um


def resolve_pixel_size(where, stated: Optional[float], given, override: bool = False) -> tuple:
    """``(µm/px to use, note or None)`` from the file's ``stated`` size and the user's ``given`` one."""
    given = check_pixel_size(given, where)
    if given is None:
        return stated, None
    if stated is None or stated <= 0:
        return given, None
    ratio = given / stated
    if not override and not 1 / MAX_DISAGREEMENT <= ratio <= MAX_DISAGREEMENT:
        raise PixelSizeConflict(f"{where} states {stated:g} µm/px but the pixel size given is {given:g} µm/px, more than "
                        f"{MAX_DISAGREEMENT:g}x apart; check the value, or use it anyway with --override-pixel-size.")
    if abs(ratio - 1) > NOTICEABLE:
        return given, f"{where} states {stated:g} µm/px; using the {given:g} µm/px given instead."
    return given, None


def unknown_note(names: list) -> str:
    """The one line that says the pixel size of some inputs is unknown, and how to give it."""
    which = names[0] if len(names) == 1 else f"{len(names)} images (e.g. {names[0]})"
    return (f"The pixel size of {which} is unknown, so it is used at full resolution; results depend on "
            f"the pixel size: {HOW_TO_GIVE}.")


def working_resolution(requested: Optional[Resolution]) -> Resolution:
    """Where training reads patches: what the user asked for (a level or a µm/px), else
    :data:`DEFAULT_MPP` for every image whose pixel size is known and full resolution for
    the others (:meth:`Slide.level_for` falls back to the level when the size is unknown)."""
    return requested if requested is not None else Resolution(level=0, mpp=DEFAULT_MPP)
