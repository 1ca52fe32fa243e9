import math

import numpy as np
import pytest

from genselfdiff.eval.metrics import aji, boundary, dice, hd95, instances_from_mask, iou, segmentation_scores


def _mask(shape, *boxes):
    m = np.zeros(shape, bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


def test_dice_and_iou_by_hand():
    pred = _mask((6, 6), (0, 2, 0, 2))  # 4 pixels
    truth = _mask((6, 6), (0, 2, 0, 3))  # 6 pixels, 4 shared
    assert dice(pred, truth) == pytest.approx(2 * 4 / (4 + 6))
    assert iou(pred, truth) == pytest.approx(4 / 6)
    assert dice(pred, ~pred) == 0.0 and iou(pred, ~pred) == 0.0


def test_empty_masks():
    empty, some = np.zeros((4, 4), bool), _mask((4, 4), (1, 2, 1, 2))
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(empty, some) == 0.0 and iou(some, empty) == 0.0
    assert math.isnan(hd95(empty, some)) and math.isnan(hd95(some, empty))


def test_boundary_is_inner_4_connected_edge():
    m = _mask((5, 5), (0, 4, 0, 4))
    b = boundary(m)
    assert b.sum() == 16 - 4 and not b[1:3, 1:3].any()  # the image border counts as outside


def test_hd95_by_hand():
    # Two 1-pixel-thick segments on row 5: truth columns 2..6, prediction columns 4..8.
    truth = _mask((10, 12), (5, 6, 2, 7))
    pred = _mask((10, 12), (5, 6, 4, 9))
    # Prediction -> truth distances: 0, 0, 0, 1, 2; truth -> prediction: 2, 1, 0, 0, 0.
    # numpy's 95th percentile of [0, 0, 0, 1, 2] interpolates at rank 3.8: 1 + 0.8 * (2 - 1) = 1.8.
    assert hd95(pred, truth) == pytest.approx(1.8)
    assert hd95(pred, truth, spacing=0.5) == pytest.approx(0.9)
    assert hd95(truth, truth) == 0.0
    # Single pixels 3 rows apart: every distance is 3.
    assert hd95(_mask((8, 8), (1, 2, 1, 2)), _mask((8, 8), (4, 5, 1, 2))) == pytest.approx(3.0)


def test_aji_tiny_example_by_hand():
    truth = np.zeros((6, 7), np.uint16)
    truth[0:2, 0:2] = 7  # A: 4 px
    truth[0:2, 4:6] = 3  # B: 4 px
    pred = np.zeros((6, 7), np.int32)
    pred[0:2, 0:3] = 1  # P1: 6 px, covers A -> IoU 4/6
    pred[1:3, 4:6] = 2  # P2: 4 px, half of B -> IoU 2/6
    pred[4, 0:3] = 5  # P3: 3 px, matches nothing
    # C = 4 + 2; U = 6 + 6 + 3 (the unused P3); AJI = 6 / 15.
    assert aji(pred, truth) == pytest.approx(6 / 15)
    assert aji(truth, truth) == 1.0


def test_aji_unmatched_truth_and_empty_cases():
    truth = np.zeros((4, 4), np.uint8)
    truth[0:2, 0:2] = 1
    assert aji(np.zeros_like(truth), truth) == 0.0
    assert aji(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    # A prediction may be the best match of two truths (original AJI): C = 2 + 2, U = 4 + 4.
    truth = np.array([[1, 1, 2, 2]])
    assert aji(np.array([[9, 9, 9, 9]]), truth) == pytest.approx(4 / 8)


def test_multiclass_scores_per_class_and_mean():
    truth = np.zeros((4, 6), np.uint8)
    truth[:, 0:2] = 1  # 8 px of class 1
    truth[:, 3:6] = 2  # 12 px of class 2
    pred = truth.copy()
    pred[:, 2] = 1  # class 1 grows to 12 px: Dice 16/20, IoU 8/12
    s = segmentation_scores(pred, truth, spacing=0.25)
    assert s["per_class"][2]["dice"] == 1.0 and s["per_class"][2]["hd95_px"] == 0.0
    assert s["per_class"][1]["dice"] == pytest.approx(16 / 20)
    assert s["per_class"][1]["iou"] == pytest.approx(8 / 12)
    assert s["dice"] == pytest.approx((16 / 20 + 1) / 2)
    assert s["hd95_um"] == pytest.approx(s["hd95_px"] * 0.25)
    both_empty = segmentation_scores(np.zeros((3, 3)), np.zeros((3, 3)))
    assert both_empty["dice"] == 1.0 and both_empty["hd95_px"] == 0.0 and both_empty["per_class"] == {}
    # A class only in the prediction: Dice 0 for it, its HD95 is undefined and left out of the mean.
    s = segmentation_scores(np.array([[1, 2]]), np.array([[1, 0]]))
    assert s["per_class"][2]["dice"] == 0.0 and math.isnan(s["per_class"][2]["hd95_px"])
    assert s["dice"] == 0.5 and s["hd95_px"] == 0.0


def test_instances_from_mask_uses_4_connectivity():
    m = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    inst = instances_from_mask(m)
    assert inst.max() == 2 and inst[0, 0] != inst[1, 1] and inst[1, 1] == inst[1, 2]


# --- object scores -------------------------------------------------------------------------

from genselfdiff.eval.metrics import count_error, object_dice, object_f1, object_hausdorff, panoptic_quality  # noqa: E402


def _three_predictions():
    """Truths A (4 px) and B (4 px); predictions P1 (6 px over A), P2 (4 px, half of B), P3 (3 px, alone)."""
    truth = np.zeros((6, 7), np.uint16)
    truth[0:2, 0:2] = 7  # A
    truth[0:2, 4:6] = 3  # B
    pred = np.zeros((6, 7), np.int32)
    pred[0:2, 0:3] = 1  # P1: IoU with A = 4/6
    pred[1:3, 4:6] = 2  # P2: overlaps B by 2 px, IoU 2/6
    pred[4, 0:3] = 5  # P3
    return pred, truth


def test_panoptic_quality_by_hand():
    pred, truth = _three_predictions()
    # Only P1-A has IoU > 0.5: TP 1, FP 2 (P2, P3), FN 1 (B).
    # DQ = 1 / (1 + 2/2 + 1/2) = 0.4; SQ = 4/6; PQ = 0.4 * 4/6.
    q = panoptic_quality(pred, truth)
    assert (q["tp"], q["fp"], q["fn"]) == (1, 2, 1)
    assert q["dq"] == pytest.approx(0.4) and q["sq"] == pytest.approx(4 / 6)
    assert q["pq"] == pytest.approx(0.4 * 4 / 6)
    assert panoptic_quality(truth, truth)["pq"] == 1.0
    empty = np.zeros_like(truth)
    assert panoptic_quality(empty, empty)["pq"] == 1.0
    assert panoptic_quality(empty, truth) == {"pq": 0.0, "dq": 0.0, "sq": 0.0, "tp": 0, "fp": 0, "fn": 2}


def test_glas_object_f1_by_hand():
    pred, truth = _three_predictions()
    # P1 covers all 4 px of A (> half): TP. P2 covers 2 of B's 4 px (not more than half): FP.
    # P3 touches no truth: FP. FN = 2 truths - 1 TP. Precision 1/3, recall 1/2, F1 = 2 (1/6) / (5/6) = 0.4.
    s = object_f1(pred, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(0.4)
    empty = np.zeros_like(truth)
    assert object_f1(empty, empty)["f1"] == 1.0 and object_f1(empty, truth)["f1"] == 0.0


def test_glas_object_dice_by_hand():
    pred, truth = _three_predictions()
    # Predictions (13 px in all): P1-A Dice 2*4/(6+4) = 0.8 (weight 6/13), P2-B 2*2/(4+4) = 0.5 (4/13),
    # P3 no partner: 0 (3/13) -> 6.8/13. Truths (8 px): A-P1 0.8 and B-P2 0.5, weight 1/2 each -> 0.65.
    assert object_dice(pred, truth) == pytest.approx(0.5 * (6.8 / 13 + 0.65))
    assert object_dice(truth, truth) == 1.0
    empty = np.zeros_like(truth)
    assert object_dice(empty, empty) == 1.0 and object_dice(empty, truth) == 0.0


def test_glas_object_hausdorff_by_hand():
    truth = np.zeros((5, 7), np.uint8)
    truth[0, 0] = 1  # A
    truth[0, 5] = 2  # B
    pred = np.zeros((5, 7), np.uint8)
    pred[0, 0:2] = 1  # P1 overlaps A: H(P1, A) = 1 (pixel (0,1) is 1 from A)
    pred[3, 5] = 2  # P2 overlaps nothing: nearest by Hausdorff is B, 3 away (A is sqrt(34) away)
    # Predictions (3 px): 2/3 * 1 + 1/3 * 3 = 5/3.
    # Truths (2 px): A-P1 1; B overlaps nothing: H(B, P1) = 5 (from (0,0)), H(B, P2) = 3 -> 3. 1/2 + 3/2 = 2.
    assert object_hausdorff(pred, truth) == pytest.approx(0.5 * (5 / 3 + 2))
    assert object_hausdorff(pred, truth, spacing=0.5) == pytest.approx(0.25 * (5 / 3 + 2))
    assert object_hausdorff(truth, truth) == 0.0
    empty = np.zeros_like(truth)
    assert object_hausdorff(empty, empty) == 0.0 and math.isnan(object_hausdorff(empty, truth))


def test_count_error():
    pred, truth = _three_predictions()
    assert count_error(pred, truth) == pytest.approx(0.5)  # 3 found, 2 true
    assert count_error(truth, truth) == 0.0
    assert math.isnan(count_error(truth, np.zeros_like(truth)))
