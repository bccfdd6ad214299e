"""Fast per-class average precision for ranking models and candidate ensembles.

Selection scores thousands of predictions (every model, every outer fold, every greedy step), on
up to about a million cells. ``sklearn.metrics.average_precision_score`` builds a full
precision-recall curve from a stable argsort of all scores per class; AP needs less: for each
positive, how many positives and how many negatives score at least as high. Sorting the positives
and the negatives apart (unstable, SIMD ``np.sort``) and one binary search give that about 2-3
times faster, with the same value (the test suite checks it against sklearn, ties included).
``ensemble.metrics.cell_map`` is the reference metric for reports outside selection.

:class:`Objective` binds a metric to the OOF rows' labels: cell mAP, or an OOF estimate of the
competition's metric (each class ranked within the images that carry it). It finds each class's
positive and negative cells once, not per score, and greedy search hill-climbs on the scores of
those cells alone (:meth:`Objective.ranked_values`).
"""

from __future__ import annotations

import warnings

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
from joblib import Parallel, delayed


def average_precision(truth: np.ndarray, score: np.ndarray, ranked: np.ndarray | None = None) -> np.ndarray:
    """Average precision of each class, as sklearn defines it (ties share one threshold).

    AP is the mean, over the positives, of the precision at the positive's score::

        AP = 1/P * sum_{positive j} #{positives with score >= s_j} / #{cells with score >= s_j}

    which is sklearn's step-wise sum over thresholds, written per positive.

    Parameters
    ----------
    truth : ndarray of bool, shape (n_classes, n_cells)
        True where the cell has the class.
    score : ndarray of float, shape (n_classes, n_cells)
        Predicted scores; only their order within a class matters.
    ranked : ndarray of bool, shape (n_classes, n_cells), optional
        Per class, the cells that take part in its ranking (default: all).

    Returns
    -------
    ndarray of float64, shape (n_classes,)
        AP per class; NaN for a class without positives.
    """
    truth = np.asarray(truth, dtype=bool)
    if truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} must be (n_classes, n_cells)")
    if ranked is not None and ranked.shape != truth.shape:
        raise ValueError(f"ranked {ranked.shape} must have the shape of truth {truth.shape}")
    return _Ranking(truth, ranked).per_class(np.asarray(score))


def mean_average_precision(truth: np.ndarray, score: np.ndarray) -> float:
    """Mean of :func:`average_precision` over the classes that have positives (NaN if none has)."""
    return Objective("cell", np.asarray(truth, dtype=bool)).map(np.asarray(score))


class _Ranking:
    """What AP needs of the labels, prepared once for many scores: per class, which cells rank
    as positives and which as negatives.

    Each class's positives' scores, then its negatives', class after class, are the *ranked
    values* of a score (:meth:`ranked_values`); AP needs nothing else of it.

    Parameters
    ----------
    truth : ndarray of bool, shape (n_classes, n_cells)
    ranked : ndarray of bool, shape (n_classes, n_cells), or None (every cell)
    """

    def __init__(self, truth: np.ndarray, ranked: np.ndarray | None):
        self.shape = truth.shape
        self.positive = truth if ranked is None else truth & ranked
        self.negative = ~truth if ranked is None else ~truth & ranked
        self.n_positive = self.positive.sum(axis=1)
        self.offsets = np.r_[0, np.cumsum(self.n_positive + self.negative.sum(axis=1))]

    def ranked_values(self, score: np.ndarray) -> np.ndarray:
        """Per class, the scores of its positives, then of its negatives, class after class: 1-D."""
        self._check(score, self.shape)
        values = np.empty(self.offsets[-1], dtype=score.dtype)
        for k in range(self.shape[0]):
            middle = self.offsets[k] + self.n_positive[k]
            values[self.offsets[k] : middle] = score[k][self.positive[k]]
            values[middle : self.offsets[k + 1]] = score[k][self.negative[k]]
        return values

    def per_class(self, score: np.ndarray) -> np.ndarray:
        """AP per class of ``score`` (n_classes, n_cells), or of its :meth:`ranked_values` (1-D)."""
        ranked = score.ndim == 1
        self._check(score, (self.offsets[-1],) if ranked else self.shape)
        out = np.full(self.shape[0], np.nan)
        for k in range(self.shape[0]):
            if ranked:
                middle = self.offsets[k] + self.n_positive[k]
                positives, negatives = score[self.offsets[k] : middle], score[middle : self.offsets[k + 1]]
            else:
                positives, negatives = score[k][self.positive[k]], score[k][self.negative[k]]
            out[k] = _class_ap(positives, negatives)
        return out

    @staticmethod
    def _check(score: np.ndarray, shape: tuple[int, ...]) -> None:
        if score.shape != shape:
            raise ValueError(f"score {score.shape} must be {shape}: (n_classes, n_cells) as truth, or ranked values")


class _FoldRanking:
    """A :class:`_Ranking` per fold: each class is ranked within each fold apart.

    Ranked values are the folds' ranked values, fold after fold.
    """

    def __init__(self, truth: np.ndarray, ranked: np.ndarray | None, folds: np.ndarray):
        self.shape = truth.shape
        self.parts = [(rows, _Ranking(truth[:, rows], None if ranked is None else ranked[:, rows]))
                      for rows in (np.flatnonzero(folds == fold) for fold in np.unique(folds))]
        self.offsets = np.r_[0, np.cumsum([ranking.offsets[-1] for _, ranking in self.parts])]

    def ranked_values(self, score: np.ndarray) -> np.ndarray:
        _Ranking._check(score, self.shape)
        return np.concatenate([ranking.ranked_values(score[:, rows]) for rows, ranking in self.parts])

    def per_fold(self, score: np.ndarray) -> np.ndarray:
        """(n_folds, n_classes) AP of ``score`` (n_classes, n_cells), or of its ranked values."""
        if score.ndim == 1:
            _Ranking._check(score, (self.offsets[-1],))
            parts = (score[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True))
        else:
            _Ranking._check(score, self.shape)
            parts = (score[:, rows] for rows, _ in self.parts)
        return np.stack([ranking.per_class(part) for part, (_, ranking) in zip(parts, self.parts, strict=True)])


def _class_ap(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """AP of one class from its positives' and negatives' scores (NaN without positives).

    Sorting the positives and the negatives apart (unstable, SIMD ``np.sort``) and one binary
    search give, for each positive, the positives and the negatives that score at least as high.
    """
    positives = np.sort(positive_scores)
    n_pos = positives.size
    if n_pos == 0:
        return float("nan")
    # Positives at or above each positive: n_pos minus the index where its tie group starts.
    group_start = np.ones(n_pos, dtype=bool)
    np.not_equal(positives[1:], positives[:-1], out=group_start[1:])
    pos_at_or_above = n_pos - np.maximum.accumulate(np.where(group_start, np.arange(n_pos), 0))
    negatives = np.sort(negative_scores)
    neg_at_or_above = negatives.size - np.searchsorted(negatives, positives, side="left")
    return float(np.mean(pos_at_or_above / (pos_at_or_above + neg_at_or_above)))


OBJECTIVES = ("competition", "cell")
"""What selection maximises: an OOF estimate of the competition's metric, or cell mAP."""


@dataclass(frozen=True)
class Objective:
    """The metric selection maximises, bound to the OOF rows' labels.

    ``cell``: per class, AP over every cell. ``competition``: per class, AP over the cells of the
    images that carry the class, as the competition ranks a class's detections only within the
    images whose truth has it; a score that only separates images with a class from images
    without it (an image stream) earns much of the first and little of the second.

    The competition's metric also matches predicted to true masks and counts true cells that no
    prediction matched against recall. On OOF rows every cell is a segmented one, so a missed true
    cell would only scale a class's AP by a constant that no choice of selection changes; it is
    left out.

    Scoring methods take a prediction (n_classes, n_cells) or its :meth:`ranked_values`.

    OOF rows of different folds come from different networks, whose scales differ; a ranking
    that pools them charges an ensemble for disagreements between fold networks that one set of
    networks scoring new images never has (on the quick zoo, the pooled competition mAP of the
    mean of all models was 0.04 below the mean of its folds' scores, and a single model's only
    0.01). With ``folds``, each class is ranked within each fold apart: :meth:`map` is the mean
    over folds of each fold's mAP and :meth:`per_class` the mean over folds of each class's AP,
    the form in which the nested scores are reported.

    Attributes
    ----------
    kind : {"competition", "cell"}
    truth : ndarray of bool, shape (n_classes, n_cells)
    ranked : ndarray of bool, shape (n_classes, n_cells), or None
        Per class, the cells in its ranking; None ranks every cell.
    folds : ndarray of int, shape (n_cells,), or None
        Each row's fold; None ranks all rows together (pooled).
    """

    kind: str
    truth: np.ndarray
    ranked: np.ndarray | None = None
    folds: np.ndarray | None = None

    @classmethod
    def build(cls, kind: str, truth: np.ndarray, image_ids: np.ndarray, folds: np.ndarray | None = None) -> Objective:
        """The objective ``kind`` for cell labels ``truth`` (n_classes, n_cells) of cells of
        ``image_ids``, ranked within each of ``folds`` if given."""
        if kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {kind!r}")
        truth = np.asarray(truth, dtype=bool)
        folds = None if folds is None else np.asarray(folds)
        if kind == "cell":
            return cls(kind, truth, folds=folds)
        return cls(kind, truth, carried_by_image(truth, image_ids), folds)

    @cached_property
    def _ranking(self) -> _Ranking | _FoldRanking:
        # Built on first use and kept: greedy and pruning score many predictions on the same rows.
        if self.folds is None:
            return _Ranking(self.truth, self.ranked)
        return _FoldRanking(self.truth, self.ranked, self.folds)

    def on(self, rows: slice | np.ndarray) -> Objective:
        """The same objective on a subset of the rows (a slice, indices or a boolean mask)."""
        return Objective(self.kind, self.truth[:, rows], None if self.ranked is None else self.ranked[:, rows],
                         None if self.folds is None else self.folds[rows])

    def pooled(self) -> Objective:
        """The same objective ranking all rows together, whatever their folds."""
        return Objective(self.kind, self.truth, self.ranked)

    def ranked_values(self, score: np.ndarray) -> np.ndarray:
        """The scores that AP reads of ``score`` (n_classes, n_cells): each class's ranked cells,
        class after class (1-D). Sums of predictions and their ranked values commute, so a search
        that adds predictions (greedy) can add these, fewer, instead."""
        return self._ranking.ranked_values(score)

    def per_class(self, score: np.ndarray) -> np.ndarray:
        """AP per class of ``score`` (n_classes, n_cells), or of its :meth:`ranked_values`; NaN for
        a class without positives (with ``folds``: the mean over the folds that have some)."""
        if self.folds is None:
            return self._ranking.per_class(score)
        return _nanmean(self._ranking.per_fold(score), axis=0)

    def map(self, score: np.ndarray) -> float:
        """Mean of :meth:`per_class` over the classes with positives (with ``folds``: the mean over
        folds of each fold's), NaN if none has."""
        if self.folds is None:
            return float(_nanmean(self._ranking.per_class(score)))
        return float(_nanmean(_nanmean(self._ranking.per_fold(score), axis=1)))

    def fold_maps(self, score: np.ndarray) -> np.ndarray:
        """Each fold's mAP of ``score`` (with ``folds``), or the one pooled mAP: 1-D."""
        if self.folds is None:
            return np.array([self.map(score)])
        return _nanmean(self._ranking.per_fold(score), axis=1)

    def map_many(self, scores: Iterable[np.ndarray], n_jobs: int | None = None) -> np.ndarray:
        """:meth:`map` of several predictions, optionally on threads.

        ``np.sort`` and ``np.searchsorted`` release the GIL, so threads (joblib's threading
        backend, as scikit-learn uses for such loops) nearly double the speed on two cores without
        copying the predictions into other processes. ``scores`` is consumed lazily, so a
        generator can slice one model's rows at a time.
        """
        _ = self._ranking  # built once, before the threads
        results = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(self.map)(s) for s in scores)
        return np.asarray(results, dtype=np.float64)


def carried_by_image(truth: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """Per class, the cells of the images that carry it: (n_classes, n_cells) bool.

    An image carries a class where any of its cells is labelled with it, which, where cells hold
    their image's labels, is the image label itself.
    """
    codes = pd.factorize(np.asarray(image_ids))[0]
    carried = np.zeros((truth.shape[0], codes.max() + 1 if len(codes) else 0), dtype=bool)
    for k in range(truth.shape[0]):
        carried[k, codes[np.asarray(truth[k], dtype=bool)]] = True
    return carried[:, codes]


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` that is NaN, without a warning, where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)
