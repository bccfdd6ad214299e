"""Cell mAP and the competition metric on small hand-worked cases, one per rule.

Most competition cases use a one-row image (1 x W pixels), so a cell is a run of pixels and an
IoU is a ratio of run lengths that can be read off the test.
"""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from ensemble.labels import CLASS_NAMES, NUM_CLASSES
from ensemble.metrics import MaskedCells, cell_map, competition_map, mask_iou, oid_average_precision


def row_mask(width: int, runs: list[tuple[int, int]]) -> np.ndarray:
    """A 1 x width instance mask; cell i + 1 covers pixels [start, stop) of runs[i]."""
    mask = np.zeros((1, width), dtype=np.uint16)
    for cell_id, (start, stop) in enumerate(runs, start=1):
        mask[0, start:stop] = cell_id
    return mask


def cells(mask: np.ndarray, values: dict[int, dict[int, float]]) -> MaskedCells:
    """MaskedCells of cells 1..n of ``mask``; ``values[cell][class]`` (missing entries are 0)."""
    ids = sorted(values)
    table = np.zeros((len(ids), NUM_CLASSES))
    for row, cell_id in enumerate(ids):
        for c, value in values[cell_id].items():
            table[row, c] = value
    return MaskedCells(mask, np.array(ids), table)


def test_perfect_prediction_scores_one():
    mask = row_mask(30, [(0, 10), (10, 20), (20, 30)])
    truth = {"a": cells(mask, {1: {0: 1}, 2: {0: 1, 5: 1}, 3: {18: 1}})}
    predictions = {"a": cells(mask, {1: {0: 0.9, 5: 0.1}, 2: {0: 0.8, 5: 0.7}, 3: {18: 0.6}})}
    result = competition_map(predictions, truth)
    assert result.map == 1.0
    assert list(result.per_class.index) == [CLASS_NAMES[0], CLASS_NAMES[5], CLASS_NAMES[18]]
    assert len(result.missing) == NUM_CLASSES - 3


@pytest.mark.parametrize("overlap, expected_ap", [(59, 0.0), (61, 1.0)])
def test_iou_threshold(overlap, expected_ap):
    # Truth: pixels 0..99; prediction: the first `overlap` of them, so IoU = overlap / 100.
    truth = {"a": cells(row_mask(100, [(0, 100)]), {1: {0: 1}})}
    predictions = {"a": cells(row_mask(100, [(0, overlap)]), {1: {0: 0.9}})}
    assert competition_map(predictions, truth).per_class[CLASS_NAMES[0]] == pytest.approx(expected_ap)


def test_greedy_by_confidence_and_duplicate_is_false_positive():
    # Two disjoint cells cannot both reach IoU 0.6 with one cell, so a lower threshold (0.4)
    # lets two detections claim the same truth cell. Truth: G = [0, 10), H = [10, 20).
    truth = {"a": cells(row_mask(20, [(0, 10), (10, 20)]), {1: {0: 1}, 2: {0: 1}})}
    # A = [0, 4): IoU 0.4 with G, confidence 0.9; B = [4, 10): IoU 0.6 with G, confidence 0.8;
    # C = [10, 20) = H exactly, confidence 0.7.
    predicted_mask = row_mask(20, [(0, 4), (4, 10), (10, 20)])
    predictions = {"a": cells(predicted_mask, {1: {0: 0.9}, 2: {0: 0.8}, 3: {0: 0.7}})}
    # A is taken first and wins G although B overlaps G more; B is then a duplicate of G (FP).
    # Ranked TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 2/3.
    result = competition_map(predictions, truth, iou_threshold=0.4)
    assert result.map == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_unmatched_truth_lowers_recall():
    # Two truth cells of class 0; only one is predicted (exactly): recall stops at 1/2.
    truth = {"a": cells(row_mask(20, [(0, 10), (10, 20)]), {1: {0: 1}, 2: {0: 1}})}
    predictions = {"a": cells(row_mask(20, [(0, 10)]), {1: {0: 0.9}})}
    assert competition_map(predictions, truth).map == pytest.approx(0.5)


def test_images_missing_from_predictions_count_as_missed():
    mask = row_mask(10, [(0, 10)])
    truth = {"a": cells(mask, {1: {0: 1}}), "b": cells(mask, {1: {0: 1}})}
    predictions = {"a": cells(mask, {1: {0: 0.9}})}
    assert competition_map(predictions, truth).map == pytest.approx(0.5)


def test_class_absent_from_an_images_truth_is_not_counted():
    mask = row_mask(10, [(0, 10)])
    truth = {"a": cells(mask, {1: {0: 1}}), "b": cells(mask, {1: {5: 1}})}
    predictions = {
        # In image a, class 5 scores 0.95 but a has no class-5 cell: ignored, not a false positive
        # (counted, it would rank first and halve class 5's AP).
        "a": cells(mask, {1: {0: 0.9, 5: 0.95}}),
        "b": cells(mask, {1: {5: 0.5}}),
        # An image without truth is ignored entirely.
        "c": cells(mask, {1: {0: 0.99, 5: 0.99}}),
    }
    result = competition_map(predictions, truth)
    assert result.per_class.to_dict() == {CLASS_NAMES[0]: 1.0, CLASS_NAMES[5]: 1.0}


def test_precision_is_made_monotone():
    # Ranked FP, TP, TP over 2 truth cells: raw precision 0, 1/2, 2/3 at recall 0, 1/2, 1.
    # Monotone precision at recall 1/2 is max(1/2, 2/3) = 2/3, so AP = 2/3; the raw curve
    # (scikit-learn's step sum) would give 1/2 * 1/2 + 1/2 * 2/3 = 7/12.
    truth = {"a": cells(row_mask(30, [(0, 10), (10, 20)]), {1: {0: 1}, 2: {0: 1}})}
    predicted_mask = row_mask(30, [(20, 30), (0, 10), (10, 20)])
    predictions = {"a": cells(predicted_mask, {1: {0: 0.9}, 2: {0: 0.8}, 3: {0: 0.7}})}
    assert competition_map(predictions, truth).map == pytest.approx(2 / 3)
    hits = np.array([False, True, True])
    assert oid_average_precision(np.array([0.9, 0.8, 0.7]), hits, 2) == pytest.approx(2 / 3)


def test_oid_average_precision_hand_computed():
    # Ranked TP, FP, FP, TP over 3 truth instances (one never detected):
    # precision 1, 1/2, 1/3, 1/2 at recall 1/3, 1/3, 1/3, 2/3 -> AP = 1/3 * 1 + 1/3 * 1/2 = 1/2.
    scores = np.array([0.2, 0.9, 0.5, 0.6])  # unsorted on purpose
    hits = np.array([True, True, False, False])
    assert oid_average_precision(scores, hits, 3) == pytest.approx(0.5)
    assert oid_average_precision(np.zeros(0), np.zeros(0, dtype=bool), 3) == 0.0


def test_classes_without_truth_are_left_out_of_the_mean():
    mask = row_mask(20, [(0, 10), (10, 20)])
    truth = {"a": cells(mask, {1: {0: 1}, 2: {3: 1}})}
    # Class 0 found exactly; class 3's cell is predicted with IoU 0.4 (AP 0); class 7 has
    # no truth at all, so its confident prediction changes nothing.
    predictions = {"a": cells(row_mask(20, [(0, 10), (16, 20)]), {1: {0: 0.9, 7: 0.9}, 2: {3: 0.9}})}
    result = competition_map(predictions, truth)
    assert result.per_class.to_dict() == {CLASS_NAMES[0]: 1.0, CLASS_NAMES[3]: 0.0}
    assert result.map == pytest.approx(0.5)
    assert CLASS_NAMES[7] in result.missing and len(result.missing) == NUM_CLASSES - 2


def test_mask_iou_matches_pixel_counting():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(40, 50)).astype(np.uint16)
    b = rng.integers(0, 4, size=(40, 50)).astype(np.uint16)
    ids_a, ids_b = np.array([5, 1, 3, 9]), np.array([2, 3, 1])  # 9 has no pixels; 2, 4 unlisted
    expected = np.zeros((len(ids_a), len(ids_b)))
    for i, p in enumerate(ids_a):
        for j, q in enumerate(ids_b):
            union = np.sum((a == p) | (b == q))
            expected[i, j] = np.sum((a == p) & (b == q)) / union if union else 0.0
    np.testing.assert_allclose(mask_iou(a, ids_a, b, ids_b), expected)


def test_image_cells_rejects_bad_input():
    with pytest.raises(ValueError, match="values must be"):
        MaskedCells(np.zeros((2, 2)), [1, 2], np.zeros((3, NUM_CLASSES)))
    with pytest.raises(ValueError, match="distinct positive"):
        MaskedCells(np.zeros((2, 2)), [0], np.zeros((1, NUM_CLASSES)))


# --- cell mAP -------------------------------------------------------------------------------


def test_cell_map_perfect_and_missing_classes_named():
    y_true = np.zeros((4, NUM_CLASSES))
    y_true[[0, 1], 0] = 1
    y_true[[2], 4] = 1
    y_true[:, 18] = [0, 0, 0, 1]
    result = cell_map(y_true, y_true * 0.8 + 0.1)
    assert result.map == 1.0
    assert list(result.per_class.index) == [CLASS_NAMES[0], CLASS_NAMES[4], CLASS_NAMES[18]]
    assert result.missing == [name for c, name in enumerate(CLASS_NAMES) if c not in (0, 4, 18)]


def test_cell_map_thresholds_soft_labels_and_matches_sklearn():
    rng = np.random.default_rng(1)
    soft = rng.random((50, 3))
    scores = rng.random((50, 3))
    names = ["a", "b", "c"]
    result = cell_map(soft, scores, class_names=names)
    expected = [average_precision_score(soft[:, c] > 0.5, scores[:, c]) for c in range(3)]
    np.testing.assert_allclose(result.per_class.to_numpy(), expected)
    assert result.map == pytest.approx(np.mean(expected)) and result.missing == []


def test_cell_map_with_no_positives_is_nan():
    result = cell_map(np.full((3, 2), 0.5), np.ones((3, 2)), class_names=["a", "b"])
    assert np.isnan(result.map) and result.missing == ["a", "b"]
