"""The figures the widgets show: painted shares, area shares, implausible predictions, changed strokes."""

import numpy as np

from napari_genselfdiff import _figures

NAMES = ["background", "nucleus"]


def test_painted_share_per_class_over_all_images():
    strokes = np.zeros((100, 100), np.uint8)
    strokes[0, :40] = 1  # 0.4 % background
    strokes[1, :30] = 2  # 0.3 % nucleus
    other = np.zeros((100, 100), np.uint8)
    counts = _figures.class_counts(strokes, 3) + _figures.class_counts(other, 3)
    assert _figures.painted_line(counts, NAMES, 2) == "painted: background 0.2 %, nucleus 0.15 % of 2 images"
    assert _figures.painted_line(_figures.class_counts(strokes, 3), NAMES, 1) == (
        "painted: background 0.4 %, nucleus 0.3 % of 1 image")


def test_area_line_with_objects():
    counts = np.array([801, 199])
    assert _figures.area_line(counts, NAMES) == "background 80.1 %, nucleus 19.9 % of the area"
    assert _figures.area_line(counts, NAMES, {"nucleus": 140}).endswith("of the area; 140 nucleus objects")


def test_implausible_when_most_is_one_object_class_or_nothing():
    share = _figures.IMPLAUSIBLE_SHARE
    assert _figures.implausible([100 - 100 * share + 1, 100 * share - 1], NAMES, "x") is None
    most = _figures.implausible([30, 70], NAMES, "the preview")
    assert most.startswith("The model calls 70 % of the preview nucleus") and "paint background strokes" in most
    none = _figures.implausible([100, 0], NAMES, "slide 1")
    assert "finds no nucleus in slide 1" in none and "paint nucleus strokes" in none
    assert "tumour" in _figures.implausible([10, 10, 80], ["background", "stroma", "tumour"], "x")
    assert _figures.implausible([0, 0], NAMES, "x") is None  # nothing to judge


def test_changed_strokes_counts_painted_pixels_of_another_class_only():
    before = np.zeros((20, 20), np.uint8)
    before[0, :10] = 2
    before[1, :10] = 1
    snap = _figures.stroke_snapshot(before)
    after = before.copy()
    after[0, :3] = 1  # 3 nucleus pixels now background
    after[1, :2] = 0  # erased: not a contradiction
    after[5, :5] = 2  # new strokes: not a contradiction
    assert _figures.changed_strokes(snap, after) == 3
    assert _figures.changed_strokes(snap, np.zeros((5, 5), np.uint8)) == 0  # another layer: nothing to compare
