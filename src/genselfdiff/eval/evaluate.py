"""Scoring predicted label images against ground truth, image by image and on average.

Predictions (PNG/TIFF or OME-Zarr, level 0) and truths (PNG/TIFF) are paired by file stem
(:func:`genselfdiff.io.files.image_stem`: ``a/b.ome.zarr`` and ``c/b.png`` are both ``b``).
Masks saved as 0/255 count as 0/1. A truth with more than ``INSTANCE_MIN_IDS`` distinct ids
is taken for an instance map (MoNuSeg style): Dice, IoU and HD95 then compare foreground,
and the object scores (AJI, PQ with DQ and SQ, GlaS object F1 and object Dice, count error)
compare instances. The predicted objects are, in this order of preference: the ``instances``
image of an OME-Zarr output (``segment --instances``), a ``NAME_instances.png`` beside the
prediction, the prediction itself when it is an instance map, else the connected components
of the predicted foreground.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError
from ..io.atomic import write_text
from ..io.labels import default_class_name, open_label_image
from ..progress import Progress, resolve
from .metrics import (
    aji,
    count_error,
    instances_from_mask,
    object_dice,
    object_f1,
    panoptic_quality,
    segmentation_scores,
)

INSTANCE_MIN_IDS = 16  # more distinct ids than this: an instance map, not a class map


@dataclass
class EvaluationReport:
    """Per-image rows (``image`` plus metrics), their means, and what could not be scored."""

    rows: list = field(default_factory=list)
    mean: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)  # [(image, sentence)]
    missing_truth: list = field(default_factory=list)  # prediction stems without a truth
    missing_prediction: list = field(default_factory=list)  # truth stems without a prediction
    scale_um: Optional[float] = None

    @property
    def complete(self) -> bool:
        """True when every prediction and every truth was paired and scored."""
        return not (self.failures or self.missing_truth or self.missing_prediction)

    def columns(self) -> list:
        cols = ["image"]
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def to_csv(self, path) -> Path:
        """One row per image and a last row ``mean``; empty cells for undefined values."""
        cols = self.columns()
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(cols)
        for row in self.rows + [{"image": "mean", **self.mean}]:
            writer.writerow([_csv_value(row.get(c)) for c in cols])
        return write_text(path, buf.getvalue())

    def to_json(self, path) -> Path:
        """Rows, means, unpaired files and failures; undefined values are ``null``."""
        doc = {
            "images": len(self.rows),
            "scale_um": self.scale_um,
            "mean": _finite(self.mean),
            "rows": [_finite(r) for r in self.rows],
            "missing_truth": self.missing_truth,
            "missing_prediction": self.missing_prediction,
            "failures": [{"image": n, "error": e} for n, e in self.failures],
        }
        return write_text(path, json.dumps(doc, indent=2) + "\n")

    def table(self) -> str:
        """A plain-text table: one line per image, then the mean."""
        cols = self.columns()
        lines = [[c for c in cols]]
        for row in self.rows:
            lines.append([_cell(row.get(c)) for c in cols])
        if self.rows:
            lines.append([_cell({"image": "mean", **self.mean}.get(c)) for c in cols])
        widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
        fmt = lambda line: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
        out = [fmt(lines[0]), "  ".join("-" * w for w in widths)]
        out += [fmt(line) for line in lines[1:-1]]
        if self.rows:
            out += ["  ".join("-" * w for w in widths), fmt(lines[-1])]
        return "\n".join(out)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _csv_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    return "" if v is None else v


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# --- pairing and reading ----------------------------------------------------------------

def _index(source: Path, role: str) -> dict:
    """stem -> candidate files (OME-Zarr first), for a file or a folder."""
    from ..io.files import find_images, image_stem

    if not source.exists():
        raise UserError(f"The {role} path {source} does not exist.")
    files = find_images([source])
    out: dict = {}
    for f in files:
        out.setdefault(image_stem(f), []).append(f)
    for stem in out:
        out[stem].sort(key=lambda p: (not p.name.lower().endswith(".zarr"), p.name))
    return out


def _read(path: Path) -> tuple:
    """(2-D label array, class names or None)."""
    img = open_label_image(path)
    arr = np.asarray(img.array)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.all(np.mod(arr, 1) == 0):
            raise UserError(f"{path} holds fractional values; save class or instance ids, not probabilities.")
        arr = arr.astype(np.int64)
    if arr.size and arr.max() == 255 and set(np.unique(arr).tolist()) <= {0, 255}:
        arr = (arr > 0).astype(np.uint8)  # a 0/255 binary mask
    return arr, img.class_names


def looks_like_instances(labels: np.ndarray) -> bool:
    """More distinct non-zero ids than a class map would have."""
    return np.unique(labels).size - (1 if (labels == 0).any() else 0) > INSTANCE_MIN_IDS


def object_scores(pred_instances: np.ndarray, truth_instances: np.ndarray) -> dict:
    """AJI, PQ (DQ, SQ), GlaS object F1 and Dice, and the count error of two instance maps."""
    pq = panoptic_quality(pred_instances, truth_instances)
    return {"aji": aji(pred_instances, truth_instances), "pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"],
            "object_f1": object_f1(pred_instances, truth_instances)["f1"],
            "object_dice": object_dice(pred_instances, truth_instances),
            "count_error": count_error(pred_instances, truth_instances)}


def score_pair(pred: np.ndarray, truth: np.ndarray, *, scale_um=None, instances=None,
               class_names: Optional[Sequence[str]] = None, pred_instances: Optional[np.ndarray] = None) -> dict:
    """Metrics for one prediction/truth pair of equal shape (see the module docstring);
    ``pred_instances``: the predicted objects, when the prediction comes with them."""
    truth_instances = instances if instances is not None else looks_like_instances(truth)
    row = {}
    if truth_instances:
        scores = segmentation_scores(pred > 0, truth > 0, classes=[1], spacing=scale_um)
    else:
        scores = segmentation_scores(pred, truth, spacing=scale_um)
    row.update({k: v for k, v in scores.items() if k != "per_class"})
    if truth_instances:
        if pred_instances is None:
            pred_instances = pred if looks_like_instances(pred) else instances_from_mask(pred > 0)
        t_inst = truth if looks_like_instances(truth) else instances_from_mask(truth > 0)
        row.update(object_scores(pred_instances, t_inst))
    elif len(scores["per_class"]) > 1:
        for k, vals in scores["per_class"].items():
            name = class_names[k] if class_names is not None and k < len(class_names) else default_class_name(k)
            for key, v in vals.items():
                row[f"{key}[{name}]"] = v
    return row


def evaluate(pred, truth, *, pixel_size=None, scale_um=None, instances=None, progress=None,
             class_names=None) -> EvaluationReport:
    """Score predictions against truths; both are a label image or a folder of them.

    Scores are computed at the truth's size: with ``pixel_size`` (µm per pixel of the truths;
    ``scale_um`` is its old name), a prediction that states its own µm/px (OME-Zarr) and covers
    the same field at another resolution is resampled to the truth's grid by nearest neighbour.
    ``pixel_size`` also adds HD95 in µm. ``instances``: None decides from each truth
    (instance map or not), True treats every truth as instances (connected components if it
    is a class map) and adds AJI, False never computes AJI. Unpaired files and images that
    cannot be scored are listed in the report; a single pair that cannot be scored raises
    :class:`UserError`.
    """
    from ..io.pixelsize import check_pixel_size

    progress, _ = resolve(progress, None)
    pred, truth = Path(pred), Path(truth)
    scale_um = check_pixel_size(pixel_size if pixel_size is not None else scale_um, truth)
    preds, truths = _index(pred, "prediction"), _index(truth, "truth")
    # NAME_instances.png is the objects of NAME's prediction (segment --instances --png), not an image of its own.
    preds = {s: f for s, f in preds.items() if not (s.endswith("_instances") and s[: -len("_instances")] in preds)}
    single = not pred.is_dir() or pred.name.lower().endswith(".zarr")
    single = single and (not truth.is_dir() or truth.name.lower().endswith(".zarr"))
    if single:  # two files: pair them whatever their names
        preds = {next(iter(preds)): next(iter(preds.values()))}
        truths = {next(iter(preds)): next(iter(truths.values()))}
    report = EvaluationReport(scale_um=scale_um)
    report.missing_truth = sorted(set(preds) - set(truths))
    report.missing_prediction = sorted(set(truths) - set(preds))
    stems = sorted(set(preds) & set(truths))
    if not stems:
        raise UserError(f"No prediction in {pred} has a truth of the same name in {truth} "
                        "(files are paired by name without extension).")
    for i, stem in enumerate(stems):
        try:
            row = _score_stem(stem, preds[stem], truths[stem][0], scale_um, instances, class_names)
        except UserError as e:
            if single:
                raise
            report.failures.append((stem, str(e)))
        else:
            report.rows.append(row)
            progress(Progress("evaluate", i + 1, len(stems), {k: row[k] for k in ("dice",) if k in row}))
    report.mean = _means(report.rows)
    return report


def _score_stem(stem, pred_files, truth_file, scale_um, instances, class_names) -> dict:
    truth, _ = _read(truth_file)
    shapes = []
    for f in pred_files:
        pred, names = _read(f)
        if pred.shape != truth.shape and same_field(pred.shape, _stated_mpp(f), truth.shape, scale_um):
            from ..io.labels import resize_labels

            pred = np.asarray(resize_labels(pred, truth.shape))
        if pred.shape == truth.shape:
            objects = None
            if instances is not False and (instances or looks_like_instances(truth)):
                objects = _predicted_objects(f, truth.shape, scale_um)
            row = {"image": stem}
            row.update(score_pair(pred, truth, scale_um=scale_um, instances=instances,
                                  class_names=class_names if class_names is not None else names,
                                  pred_instances=objects))
            return row
        shapes.append((f, pred.shape))
    f, shape = shapes[0]
    raise UserError(f"{f} is {shape[1]} x {shape[0]} pixels but its truth {truth_file} is "
                    f"{truth.shape[1]} x {truth.shape[0]}; compare predictions at the truth's resolution.")


def _predicted_objects(pred_file: Path, shape: tuple, scale_um) -> Optional[np.ndarray]:
    """The object ids that come with a prediction (``segment --instances``), at the truth's grid."""
    from ..io.files import image_stem
    from ..io.outputs import INSTANCES_GROUP

    candidates = [pred_file / INSTANCES_GROUP, pred_file.with_name(image_stem(pred_file) + "_instances.png")]
    for f in candidates:
        if f.exists():
            ids, _ = _read(f)
            if ids.shape != shape and same_field(ids.shape, _stated_mpp(f), shape, scale_um):
                from ..io.labels import resize_labels

                ids = np.asarray(resize_labels(ids, shape))
            if ids.shape == shape:
                return ids
    return None


def _stated_mpp(path: Path) -> Optional[float]:
    """The µm/px a label image states (OME-Zarr with a micrometre unit; None otherwise)."""
    from ..io.labels import open_label_image

    source = open_label_image(path)
    return float(source.scale[-1]) if source.unit == "micrometer" else None


def same_field(shape: tuple, mpp: Optional[float], truth_shape: tuple, truth_mpp: Optional[float]) -> bool:
    """Whether a label image of ``shape`` at ``mpp`` µm/px covers the truth's field (to a pixel of the
    truth's grid in both directions); unknown sizes never do."""
    if not mpp or not truth_mpp:
        return False
    return all(abs(n * mpp / truth_mpp - t) <= 1 for n, t in zip(shape[:2], truth_shape[:2]))


def _means(rows: list) -> dict:
    keys = []
    for row in rows:
        keys += [k for k in row if k != "image" and k not in keys]
    mean = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
        mean[k] = float(np.mean(vals)) if vals else math.nan
    return mean
