"""Which classes of a model become objects, and how they are split: an :class:`ObjectRequest`.

The plan of a segmentation asks for one when objects are wanted (before any tile is read), and
the objects pass (:mod:`.output`) splits the finished labels as it says. A model with a
geometry head is split by its learnt maps (:mod:`.hv_split`), any other by distance (:mod:`.split`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import UserError
from .hv_split import HVParameters
from .split import HALO_UM, SplitParameters


@dataclass(frozen=True)
class ObjectRequest:
    """Which classes to split into objects, and how."""

    classes: tuple  # label values
    names: tuple  # their class names
    params: object = SplitParameters()  # SplitParameters (distance) or HVParameters (geometry map)
    halo_um: float = HALO_UM

    @property
    def uses_geometry(self) -> bool:
        return isinstance(self.params, HVParameters)

    def describe(self) -> dict:
        return {"classes": list(self.classes), "names": list(self.names), "halo_um": self.halo_um,
                "params": self.params.describe()}


def object_request(model, instances_of: Optional[Sequence[str]] = None, **kw) -> ObjectRequest:
    """The classes of ``model`` to split: every foreground class, or those named in ``instances_of``;
    by its geometry map when the model has one (:mod:`.hv_split`), else by distance (:mod:`.split`).

    A name the model does not have, or a model without foreground classes, is a :class:`UserError`.
    """
    if "params" not in kw:
        kw["params"] = HVParameters() if getattr(model, "has_geometry", False) else SplitParameters()
    classes = list(model.classes)
    source = model.path or "The model"
    if len(classes) < 2:
        raise UserError(f"{source} has no foreground class to split into objects; segment without --instances.")
    if not instances_of:
        chosen = list(range(1, len(classes)))
    else:
        lookup = {str(n).lower(): k for k, n in enumerate(classes)}
        chosen = []
        for name in instances_of:
            k = lookup.get(str(name).strip().lower())
            if not k:  # unknown, or the background
                raise UserError(f"{source} has no foreground class {str(name).strip()!r} to split into objects; "
                                f"its classes are {', '.join(map(str, classes[1:]))}.")
            chosen += [k] if k not in chosen else []
    return ObjectRequest(tuple(chosen), tuple(str(classes[k]) for k in chosen), **kw)
