"""Fast per-class average precision for ranking models and candidate ensembles.

Selection scores thousands of predictions (every model, every outer fold, every greedy step), on
up to about a million cells. ``sklearn.metrics.average_precision_score`` builds a full
precision-recall curve from a stable argsort of all scores per class; AP needs less: for each
positive, how many positives and how many negatives score at least as high. Sorting the positives
and the negatives apart (unstable ``np.sort``) and one binary search give that, with the same value
(the test suite checks it against sklearn, ties included). Every class, and every fold, is scored
in one pass: each score is packed with its class into one integer key, so a candidate of greedy
search on a 20 k-cell sample costs a few sorts, not a Python call per class and fold.
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
    values* of a score (:meth:`ranked_values`); AP needs nothing else of it. All classes are
    scored in one vectorised pass (:func:`_segment_ap`), so a small sample (greedy's) costs a few
    sorts rather than a Python call per class.

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

    def layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Where the positives and the negatives lie among the ranked values, and their classes:
        ``(positive_at, positive_class, negative_at, negative_class)``, int32."""
        n_negative = np.diff(self.offsets) - self.n_positive
        classes = np.arange(self.shape[0], dtype=np.int32)
        is_positive = np.concatenate([np.r_[np.ones(p, bool), np.zeros(n, bool)]
                                      for p, n in zip(self.n_positive, n_negative, strict=True)] or [np.zeros(0, bool)])
        return (np.flatnonzero(is_positive).astype(np.int32), np.repeat(classes, self.n_positive),
                np.flatnonzero(~is_positive).astype(np.int32), np.repeat(classes, n_negative))

    @cached_property
    def segments(self) -> _Segments:
        """:meth:`layout` as a one-pass score reads it. Built on first use: only a one-pass score
        needs it, and on a million cells it would hold hundreds of MB."""
        return _Segments.build(*self.layout(), self.shape[0])

    @cached_property
    def gather(self) -> np.ndarray:
        """Where each ranked value lies in a flattened (n_classes, n_cells) score. Built on first
        use: greedy gathers many small scores' values; a million-cell score is scored class by
        class instead, and would need this at 8 bytes a value."""
        cells = np.arange(self.shape[1])
        return np.concatenate([k * self.shape[1] + cells[side[k]] for k in range(self.shape[0])
                               for side in (self.positive, self.negative)] or [np.zeros(0, np.intp)])

    def ranked_values(self, score: np.ndarray) -> np.ndarray:
        """Per class, the scores of its positives, then of its negatives, class after class: 1-D."""
        self._check(score, self.shape)
        return np.ascontiguousarray(score).reshape(-1)[self.gather]

    def per_class(self, score: np.ndarray) -> np.ndarray:
        """AP per class of ``score`` (n_classes, n_cells), or of its :meth:`ranked_values` (1-D)."""
        if score.ndim != 1 and self.offsets[-1] > ONE_PASS_VALUES:
            # Class by class: memory stays at one class's values and each sort is of plain scores.
            self._check(score, self.shape)
            return np.array([_segment_ap(score[k][self.positive[k]], score[k][self.negative[k]])[0]
                             for k in range(self.shape[0])])
        if score.ndim != 1:
            score = self.ranked_values(score)
        self._check(score, (self.offsets[-1],))
        return _segment_ap(score[self.segments.positive_at], score[self.segments.negative_at], self.segments)

    @staticmethod
    def _check(score: np.ndarray, shape: tuple[int, ...]) -> None:
        if score.shape != shape:
            raise ValueError(f"score {score.shape} must be {shape}: (n_classes, n_cells) as truth, or ranked values")


class _FoldRanking:
    """A :class:`_Ranking` per fold: each class is ranked within each fold apart.

    Ranked values are the folds' ranked values, fold after fold; every (fold, class) is scored in
    the same vectorised pass.
    """

    def __init__(self, truth: np.ndarray, ranked: np.ndarray | None, folds: np.ndarray):
        self.shape = truth.shape
        self.parts = [(rows, _Ranking(truth[:, rows], None if ranked is None else ranked[:, rows]))
                      for rows in (np.flatnonzero(folds == fold) for fold in np.unique(folds))]
        self.offsets = np.r_[0, np.cumsum([ranking.offsets[-1] for _, ranking in self.parts])]

    @cached_property
    def segments(self) -> _Segments:
        """:attr:`_Ranking.segments` of every fold, fold after fold; a value's "class" is its
        (fold, class) pair, ``fold * n_classes + class``."""
        parts = []
        for fold, ((_, ranking), at) in enumerate(zip(self.parts, self.offsets[:-1], strict=True)):
            positive_at, positive_class, negative_at, negative_class = ranking.layout()
            first = fold * self.shape[0]  # the fold's first (fold, class) pair
            parts.append((positive_at + at, positive_class + first, negative_at + at, negative_class + first))
        layout = (np.concatenate(arrays).astype(np.int32) for arrays in zip(*parts, strict=True))
        return _Segments.build(*layout, len(self.parts) * self.shape[0])

    @cached_property
    def gather(self) -> np.ndarray:
        """:attr:`_Ranking.gather` of every fold, fold after fold, into the flattened whole score."""
        parts = []
        for rows, ranking in self.parts:
            classes, cells = np.divmod(ranking.gather, rows.size)
            parts.append(classes * self.shape[1] + rows[cells])
        return np.concatenate(parts)

    def ranked_values(self, score: np.ndarray) -> np.ndarray:
        _Ranking._check(score, self.shape)
        return np.ascontiguousarray(score).reshape(-1)[self.gather]

    def per_fold(self, score: np.ndarray) -> np.ndarray:
        """(n_folds, n_classes) AP of ``score`` (n_classes, n_cells), or of its ranked values."""
        if score.ndim != 1 and self.offsets[-1] > ONE_PASS_VALUES:
            _Ranking._check(score, self.shape)
            return np.stack([ranking.per_class(score[:, rows]) for rows, ranking in self.parts])
        if score.ndim != 1:
            score = self.ranked_values(score)
        _Ranking._check(score, (self.offsets[-1],))
        ap = _segment_ap(score[self.segments.positive_at], score[self.segments.negative_at], self.segments)
        return ap.reshape(len(self.parts), self.shape[0])


@dataclass(frozen=True)
class _Segments:
    """What a one-pass AP reads of a ranking, apart from the score: where each class's positives
    and negatives lie among the ranked values, the class of each (for the positives also as the
    high half of their sort keys) and how many positives and negatives each class has.

    Built once per ranking: greedy scores thousands of candidates on the same rows.
    """

    positive_at: np.ndarray
    negative_at: np.ndarray
    positive_class: np.ndarray
    positive_high: np.ndarray  # uint64, class << 32
    negative_high: np.ndarray
    n_positive: np.ndarray
    n_negative: np.ndarray

    @classmethod
    def build(cls, positive_at: np.ndarray, positive_class: np.ndarray, negative_at: np.ndarray,
              negative_class: np.ndarray, n_classes: int) -> _Segments:
        high = np.uint64(32)
        return cls(positive_at, negative_at, positive_class, positive_class.astype(np.uint64) << high,
                   negative_class.astype(np.uint64) << high, np.bincount(positive_class, minlength=n_classes),
                   np.bincount(negative_class, minlength=n_classes))


def _segment_ap(positive_scores: np.ndarray, negative_scores: np.ndarray,
                segments: _Segments | None = None) -> np.ndarray:
    """AP of every class at once from its positives' and negatives' scores (NaN without positives).

    ``segments`` gives each score's class (None: one class). Scores are packed with their class
    into keys that sort class by class, then by score (ties kept), so one sort of the positives
    and one of the negatives, and one binary search, give for each positive the positives and
    the negatives of its class that score at least as high.
    """
    if segments is None:  # one class: the scores order themselves (a sort puts -0.0 beside its equal 0.0)
        positives, negatives = np.sort(positive_scores), np.sort(negative_scores)
        positive_class = np.zeros(positives.size, dtype=np.intp)
        n_positive, n_negative = np.array([positives.size]), np.array([negatives.size])
    else:
        positive_codes, negative_codes = _score_codes(positive_scores, negative_scores)
        positives = np.sort(positive_codes | segments.positive_high)
        negatives = np.sort(negative_codes | segments.negative_high)
        positive_class, n_positive, n_negative = segments.positive_class, segments.n_positive, segments.n_negative
    # Positives at or above each positive: its class's end minus the index where its tie group starts.
    first_of_group = np.arange(positives.size)
    tied = positives[1:] == positives[:-1]
    if tied.any():  # rare in sums of float32 predictions, so the pass that resolves ties is skipped
        first_of_group = np.maximum.accumulate(np.where(np.r_[True, ~tied], first_of_group, 0))
    pos_at_or_above = np.cumsum(n_positive)[positive_class] - first_of_group
    neg_at_or_above = np.cumsum(n_negative)[positive_class] - _count_below(negatives, positives)
    precision = pos_at_or_above / (pos_at_or_above + neg_at_or_above)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(positive_class, weights=precision, minlength=n_positive.size) / n_positive


def _count_below(negatives: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """For each of the sorted ``positives``, how many of the sorted ``negatives`` are below it.

    One binary search per positive, or, where positives outnumber negatives (the competition's
    ranking within images that carry a class is mostly positives), one per negative: a negative
    is below positive j exactly when at most j positives are at or below it.
    """
    if positives.size <= negatives.size:
        return np.searchsorted(negatives, positives, side="left")
    at_or_below = np.searchsorted(positives, negatives, side="right")
    return np.cumsum(np.bincount(at_or_below, minlength=positives.size + 1))[: positives.size]


def _score_codes(positive_scores: np.ndarray, negative_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 codes below 2**32 that order the scores as they order, ties equal.

    float32 scores (OOF predictions and their sums) map to their order-preserving bit pattern;
    other dtypes go through their dense rank, which costs one more sort but is exact for any score.
    """
    if positive_scores.dtype == np.float32 and negative_scores.dtype == np.float32:
        return _float32_codes(positive_scores), _float32_codes(negative_scores)
    rank = np.unique(np.concatenate([positive_scores, negative_scores]), return_inverse=True)[1].astype(np.uint64)
    return rank[: positive_scores.size], rank[positive_scores.size :]


def _float32_codes(scores: np.ndarray) -> np.ndarray:
    bits = (scores + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0, its equal
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)


# Above this many ranked values, a 2-D score is scored class by class (and fold by fold): one
# vectorised pass would hold several copies of every value at once, and a plain float32 sort of
# one class is faster per value than the packed keys that let classes share a sort.
ONE_PASS_VALUES = 1 << 20

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

    def per_fold_and_class(self, score: np.ndarray) -> np.ndarray:
        """AP of ``score`` (n_classes, n_cells), or of its :meth:`ranked_values`, per fold and class:
        (n_folds, n_classes), one row without ``folds``; NaN where a fold has no positive of a class."""
        if self.folds is None:
            return self._ranking.per_class(score)[None]
        return self._ranking.per_fold(score)

    def per_class(self, score: np.ndarray) -> np.ndarray:
        """AP per class (with ``folds``: the mean over the folds that have positives of it)."""
        return _nanmean(self.per_fold_and_class(score), axis=0)

    def map(self, score: np.ndarray) -> float:
        """Mean of :meth:`per_class` over the classes with positives (with ``folds``: the mean over
        folds of each fold's), NaN if none has."""
        return float(_nanmean(self.fold_maps(score)))

    def fold_maps(self, score: np.ndarray) -> np.ndarray:
        """Each fold's mAP of ``score`` (with ``folds``), or the one pooled mAP: 1-D."""
        return _nanmean(self.per_fold_and_class(score), axis=1)

    def map_many(self, scores: Iterable[np.ndarray], n_jobs: int | None = None, *, by_fold: bool = False) -> np.ndarray:
        """:meth:`map` (with ``by_fold``: :meth:`fold_maps`) of several predictions, optionally on threads.

        ``np.sort`` and ``np.searchsorted`` release the GIL, so threads (joblib's threading
        backend, as scikit-learn uses for such loops) nearly double the speed on two cores without
        copying the predictions into other processes. ``scores`` is consumed lazily, so a
        generator can slice one model's rows at a time.
        """
        _ = self._ranking  # built once, before the threads
        score_one = self.fold_maps if by_fold else self.map
        results = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(score_one)(s) for s in scores)
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
