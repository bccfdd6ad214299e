"""Scores: cell-level mAP, and the HPA competition metric (mask IoU >= 0.6, Open Images-style AP).

Two metrics, used for different things:

- :func:`cell_map` ranks cells whose identity is known (OOF predictions against the simulator's
  or relabelled cell labels): per class, scikit-learn's average precision over all cells.
- :func:`competition_map` is the Kaggle HPA single-cell metric, computed as the organisers'
  Open Images (OID) challenge evaluator does: predicted cell masks are matched to ground-truth
  cells by mask IoU, so it also charges segmentation errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from ensemble.labels import CLASS_NAMES

# Soft labels (relabelled cells, simulator fractions) count as positive above this value,
# the threshold `ensemble.labels.from_multi_hot` uses too.
POSITIVE_THRESHOLD = 0.5


@dataclass(frozen=True)
class MapResult:
    """A mean average precision and its parts.

    Attributes
    ----------
    map : float
        Mean of ``per_class`` (NaN when no class could be scored).
    per_class : pandas.Series
        Class name -> AP, for the classes that were scored.
    missing : list of str
        Classes left out of the mean because the truth has no positive of them.
    """

    map: float
    per_class: pd.Series
    missing: list[str]


@dataclass(frozen=True)
class MaskedCells:
    """The cells of one image: an instance mask and one row of 19 values per cell.

    Used for predictions (``values`` = class scores) and for ground truth (``values`` = 0/1 or
    soft labels, positive above :data:`POSITIVE_THRESHOLD`).

    Attributes
    ----------
    mask : numpy.ndarray
        (H, W) integer instance labels, 0 = background. Pixels whose label is not in
        ``cell_ids`` count as background.
    cell_ids : numpy.ndarray
        (n,) instance label of each cell.
    values : numpy.ndarray
        (n, 19) per-cell scores or labels.
    """

    mask: np.ndarray
    cell_ids: np.ndarray
    values: np.ndarray

    def __post_init__(self):
        # Accept lists and other array-likes; store arrays (a frozen dataclass needs setattr).
        object.__setattr__(self, "mask", np.asarray(self.mask))
        object.__setattr__(self, "cell_ids", np.asarray(self.cell_ids, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "values", np.asarray(self.values, dtype=float))
        if self.mask.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {self.mask.shape}")
        if self.values.ndim != 2 or len(self.values) != len(self.cell_ids):
            raise ValueError(f"values must be ({len(self.cell_ids)}, classes), got {self.values.shape}")
        if (self.cell_ids <= 0).any() or len(np.unique(self.cell_ids)) != len(self.cell_ids):
            raise ValueError("cell_ids must be distinct positive instance labels (0 is background)")


def cell_map(
    y_true: np.ndarray,
    y_score: np.ndarray,
    class_names: Sequence[str] = CLASS_NAMES,
) -> MapResult:
    """Mean over classes of scikit-learn's average precision, one row per cell.

    Parameters
    ----------
    y_true : array (n, C)
        Cell labels; soft labels are made binary with ``> 0.5`` (:data:`POSITIVE_THRESHOLD`).
    y_score : array (n, C)
        Predicted scores.
    class_names : sequence of str
        Names of the C classes.

    Returns
    -------
    MapResult
        Classes with no positive cell have no defined AP: they are listed in ``missing`` and
        left out of the mean.
    """
    y_true = np.asarray(y_true) > POSITIVE_THRESHOLD
    y_score = np.asarray(y_score)
    if y_true.shape != y_score.shape or y_true.ndim != 2 or y_true.shape[1] != len(class_names):
        raise ValueError(
            f"y_true {y_true.shape} and y_score {y_score.shape} must both be (n, {len(class_names)})"
        )
    scored = y_true.any(axis=0)
    # One call for all classes: scikit-learn's argument checks cost more than the AP itself.
    values = average_precision_score(y_true[:, scored], y_score[:, scored], average=None) if scored.any() else []
    per_class = pd.Series(np.atleast_1d(values), index=[n for n, s in zip(class_names, scored) if s], dtype=float)
    missing = [name for c, name in enumerate(class_names) if not scored[c]]
    return MapResult(map=_mean(per_class), per_class=per_class, missing=missing)


def competition_map(
    predictions: Mapping[str, MaskedCells],
    truth: Mapping[str, MaskedCells],
    iou_threshold: float = 0.6,
    class_names: Sequence[str] = CLASS_NAMES,
) -> MapResult:
    """The HPA single-cell competition metric: per-class AP over matched cell masks, averaged.

    The rules of the OID challenge evaluator, per class c:

    1. In each image whose ground truth has cells of class c, every predicted cell is a
       detection of c with confidence ``values[:, c]``. Detections in images without ground-truth
       cells of c are ignored (OID scores a class only in images verified for it).
    2. Detections are taken highest confidence first; each is compared with the ground-truth
       cell of class c it overlaps most (mask IoU). IoU >= ``iou_threshold`` with a cell not yet
       matched is a true positive; anything else (too little overlap, or that cell already
       matched) is a false positive.
    3. Recall is over all ground-truth cells of c, matched or not; AP is the area under the
       precision-recall curve with precision made non-increasing (OID's
       ``compute_average_precision``, see :func:`oid_average_precision`).
    4. The mAP is the mean over classes that have ground-truth cells.

    Parameters
    ----------
    predictions : mapping image_id -> MaskedCells
        Predicted instance mask and per-cell class scores. Images missing here count as
        images with no detections.
    truth : mapping image_id -> MaskedCells
        Ground-truth instance mask and per-cell labels. Predicted images missing here are ignored.
    iou_threshold : float
        Least mask IoU of a match (0.6 in the competition).
    class_names : sequence of str
        Names of the classes, in column order.

    Returns
    -------
    MapResult
        ``missing`` lists the classes with no ground-truth cell.
    """
    scores = CompetitionScores(iou_threshold, class_names)
    for image_id, gt in truth.items():
        predicted = predictions.get(image_id)
        for cells in (gt, predicted):
            if cells is not None and cells.values.shape[1] != len(class_names):
                raise ValueError(f"image {image_id}: {cells.values.shape[1]} classes, not {len(class_names)}")
        if predicted is None or len(predicted.cell_ids) == 0:
            scores.add(np.zeros((0, len(gt.cell_ids))), np.zeros((0, len(class_names))), gt.values)
            continue
        if predicted.mask.shape != gt.mask.shape:
            shapes = f"predicted {predicted.mask.shape}, truth {gt.mask.shape}"
            raise ValueError(f"image {image_id}: masks differ in shape ({shapes})")
        scores.add(mask_iou(predicted.mask, predicted.cell_ids, gt.mask, gt.cell_ids), predicted.values, gt.values)
    return scores.result()


class CompetitionScores:
    """:func:`competition_map` one image at a time: what is kept per class is each detection's
    confidence and true-positive flag, never a mask (see :func:`competition_map` for the rules).

    Examples
    --------
    >>> scores = CompetitionScores()
    >>> for iou, predicted, truth in images:     # (n, m) mask IoU, (n, 19) scores, (m, 19) labels
    ...     scores.add(iou, predicted, truth)
    >>> scores.result().map
    """

    def __init__(self, iou_threshold: float = 0.6, class_names: Sequence[str] = CLASS_NAMES):
        self.iou_threshold = iou_threshold
        self.class_names = list(class_names)
        self.n_truth = np.zeros(len(class_names), dtype=np.int64)
        self.scores: list[list[np.ndarray]] = [[] for _ in class_names]
        self.hits: list[list[np.ndarray]] = [[] for _ in class_names]

    def add(self, iou: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> None:
        """One image: ``iou`` (n, m) of its n predicted and m true cells, their (n, C) scores and
        the (m, C) true labels (positive above :data:`POSITIVE_THRESHOLD`). An image without
        predictions (n = 0) still adds its true cells, as missed ones."""
        gt_positive = np.asarray(truth) > POSITIVE_THRESHOLD
        self.n_truth += gt_positive.sum(axis=0)
        if len(predicted) == 0:
            return
        iou = np.asarray(iou).reshape(len(predicted), len(gt_positive))
        for c in np.flatnonzero(gt_positive.any(axis=0)):
            confidence = np.asarray(predicted)[:, c]
            order = np.argsort(-confidence, kind="stable")
            self.scores[c].append(confidence[order])
            self.hits[c].append(_match_greedy(iou[order][:, gt_positive[:, c]], self.iou_threshold))

    @classmethod
    def pooled(cls, parts: Sequence[CompetitionScores]) -> CompetitionScores:
        """One accumulator holding the images of all ``parts`` (a part may come more than once, as
        in a bootstrap sample of images)."""
        pooled = cls(parts[0].iou_threshold, parts[0].class_names)
        pooled.n_truth = np.sum([part.n_truth for part in parts], axis=0)
        for c in range(len(pooled.class_names)):
            pooled.scores[c] = [scores for part in parts for scores in part.scores[c]]
            pooled.hits[c] = [hits for part in parts for hits in part.hits[c]]
        return pooled

    def result(self) -> MapResult:
        """The mAP over the images added so far; ``missing`` lists the classes with no true cell."""
        per_class = {}
        for c, name in enumerate(self.class_names):
            if self.n_truth[c] > 0:
                # A class with ground truth but no detections anywhere scores AP 0.
                class_scores = np.concatenate(self.scores[c]) if self.scores[c] else np.zeros(0)
                class_hits = np.concatenate(self.hits[c]) if self.hits[c] else np.zeros(0, dtype=bool)
                per_class[name] = oid_average_precision(class_scores, class_hits, int(self.n_truth[c]))
        missing = [name for c, name in enumerate(self.class_names) if self.n_truth[c] == 0]
        per_class = pd.Series(per_class, dtype=float)
        return MapResult(map=_mean(per_class), per_class=per_class, missing=missing)


class CellScores:
    """:func:`cell_map` one image at a time: each predicted cell's scores and its matched true
    cell's labels (binary), nothing else."""

    def __init__(self, class_names: Sequence[str] = CLASS_NAMES):
        self.class_names = list(class_names)
        self.labels: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []

    def add(self, labels: np.ndarray, scores: np.ndarray) -> None:
        """(n, C) labels of an image's predicted cells (all 0 for a cell that matched none) and their scores."""
        self.labels.append(np.asarray(labels) > POSITIVE_THRESHOLD)
        self.scores.append(np.asarray(scores, dtype=np.float32))

    @classmethod
    def pooled(cls, parts: Sequence[CellScores]) -> CellScores:
        """One accumulator holding the images of all ``parts`` (see :meth:`CompetitionScores.pooled`)."""
        pooled = cls(parts[0].class_names)
        pooled.labels = [labels for part in parts for labels in part.labels]
        pooled.scores = [scores for part in parts for scores in part.scores]
        return pooled

    def result(self) -> MapResult:
        empty = np.zeros((0, len(self.class_names)))
        return cell_map(np.concatenate(self.labels or [empty]), np.concatenate(self.scores or [empty]),
                        self.class_names)


def mask_iou(mask_a: np.ndarray, ids_a: np.ndarray, mask_b: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
    """IoU of every cell of one instance mask with every cell of another.

    Parameters
    ----------
    mask_a, mask_b : array (H, W) of non-negative int
        Instance masks of the same image.
    ids_a, ids_b : array (n,), (m,)
        The instance labels to compare (other labels count as background).

    Returns
    -------
    numpy.ndarray
        (n, m) float IoU; 0 where both cells are empty.
    """
    return overlap_iou(overlap_counts(mask_a, ids_a, mask_b, ids_b))


def overlap_counts(mask_a: np.ndarray, ids_a: np.ndarray, mask_b: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
    """Pixels shared by every cell of one instance mask and every cell of another.

    Parameters are those of :func:`mask_iou`.

    Returns
    -------
    numpy.ndarray
        (n + 1, m + 1) int64 pixel counts: [i, j] for cells ``ids_a[i - 1]`` and ``ids_b[j - 1]``,
        row and column 0 for the background (and labels not in the ids); so row sums are the areas
        of a's cells, column sums those of b's.
    """
    # One np.bincount over the pair (row of a, column of b) of every pixel gives all n*m
    # intersections at once: exact, O(pixels), and no per-cell binary masks or RLEs to build
    # (pycocotools.mask.iou would need both, which costs O(pixels * cells)).
    n, m = len(ids_a), len(ids_b)
    # In place and in int32 (half the memory traffic of int64): about a quarter faster at 2048 px.
    # int32 cannot overflow: (n + 1) * (m + 1) bins of 2**31 would not fit in memory anyway.
    pair = _dense_index(mask_a, ids_a)
    pair *= m + 1
    pair += _dense_index(mask_b, ids_b)
    joint = np.bincount(pair.ravel(), minlength=(n + 1) * (m + 1))
    return joint.reshape(n + 1, m + 1)


def overlap_iou(counts: np.ndarray) -> np.ndarray:
    """(n, m) IoU of the cells of an :func:`overlap_counts` table; 0 where both cells are empty."""
    intersection = counts[1:, 1:]
    union = counts[1:, :].sum(axis=1)[:, None] + counts[:, 1:].sum(axis=0)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros(intersection.shape), where=union > 0)


def oid_average_precision(scores: np.ndarray, is_true_positive: np.ndarray, n_truth: int) -> float:
    """AP as the OID/VOC evaluators compute it: area under the precision-made-monotone PR curve.

    Parameters
    ----------
    scores : array (k,)
        Confidence of each detection.
    is_true_positive : array (k,) of bool
        Whether each detection matched a ground-truth instance.
    n_truth : int
        Number of ground-truth instances (the recall denominator).
    """
    # Hand-written because scikit-learn's average_precision_score has no recall denominator
    # beyond the detections (unmatched ground truth must lower recall) and does not make
    # precision monotone, both of which the competition's evaluator does.
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    true_positives = np.cumsum(np.asarray(is_true_positive, dtype=bool)[order])
    precision = true_positives / np.arange(1, len(order) + 1)
    recall = true_positives / n_truth
    precision = np.concatenate([[0.0], precision, [0.0]])
    recall = np.concatenate([[0.0], recall, [1.0]])
    # Precision at each recall becomes the best precision at that recall or beyond.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def _match_greedy(iou: np.ndarray, iou_threshold: float) -> np.ndarray:
    """True-positive flags of detections (rows, highest confidence first) against truth (columns).

    As in the OID evaluator, each detection looks only at the ground-truth cell it overlaps
    most; it is a true positive if that IoU reaches the threshold and no earlier detection took
    the same cell, otherwise a false positive (it does not fall back to its second-best cell).
    """
    is_true_positive = np.zeros(len(iou), dtype=bool)
    if iou.shape[1] == 0:
        return is_true_positive
    best = iou.argmax(axis=1)
    candidates = np.flatnonzero(iou[np.arange(len(iou)), best] >= iou_threshold)
    # Among the detections over the threshold, the first (highest-confidence) one of each
    # ground-truth cell wins; np.unique's return_index gives exactly those first occurrences.
    _, first = np.unique(best[candidates], return_index=True)
    is_true_positive[candidates[first]] = True
    return is_true_positive


def _dense_index(mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Map each pixel's instance label to 1 + its position in ``ids`` (0 for anything else)."""
    ids = np.asarray(ids, dtype=np.int64)
    if np.issubdtype(mask.dtype, np.signedinteger) and mask.size and mask.min() < 0:
        raise ValueError("instance masks must hold non-negative labels")
    # A lookup table indexed by label is O(pixels); instance masks are uint16, so it stays small.
    size = max(int(mask.max(initial=0)), int(ids.max(initial=0))) + 1
    lookup = np.zeros(size, dtype=np.int32)
    lookup[ids] = np.arange(1, len(ids) + 1)
    return lookup[mask]


def _mean(per_class: pd.Series) -> float:
    """Mean of the per-class APs; NaN if there are none."""
    return float(per_class.mean()) if len(per_class) else float("nan")
