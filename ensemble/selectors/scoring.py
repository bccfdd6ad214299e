"""Fast per-class average precision for ranking models and candidate ensembles.

Selection scores thousands of predictions (every model, every outer fold, every greedy step), on
up to about a million cells. ``sklearn.metrics.average_precision_score`` builds a full
precision-recall curve from a stable argsort of all scores per class; AP needs less: for each
positive, how many positives and how many negatives score at least as high. Sorting the positives
and the negatives apart (unstable ``np.sort``) and one binary search give that about 2-3 times
faster, with the same value (the test suite checks it against sklearn, ties included).
``ensemble.metrics.cell_map`` is the reference metric for reports outside selection.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from joblib import Parallel, delayed


def average_precision(truth: np.ndarray, score: np.ndarray) -> np.ndarray:
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

    Returns
    -------
    ndarray of float64, shape (n_classes,)
        AP per class; NaN for a class without positives.
    """
    truth = np.asarray(truth, dtype=bool)
    score = np.asarray(score)
    if truth.shape != score.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and score {score.shape} must be the same (n_classes, n_cells)")
    out = np.full(truth.shape[0], np.nan)
    for k in range(truth.shape[0]):
        positives = np.sort(score[k][truth[k]])
        n_pos = positives.size
        if n_pos == 0:
            continue
        # Positives at or above each positive: n_pos minus the index where its tie group starts.
        group_start = np.ones(n_pos, dtype=bool)
        np.not_equal(positives[1:], positives[:-1], out=group_start[1:])
        pos_at_or_above = n_pos - np.maximum.accumulate(np.where(group_start, np.arange(n_pos), 0))
        negatives = np.sort(score[k][~truth[k]])
        neg_at_or_above = negatives.size - np.searchsorted(negatives, positives, side="left")
        out[k] = np.mean(pos_at_or_above / (pos_at_or_above + neg_at_or_above))
    return out


def mean_average_precision(truth: np.ndarray, score: np.ndarray) -> float:
    """Mean of :func:`average_precision` over the classes that have positives (NaN if none has)."""
    per_class = average_precision(truth, score)
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def map_many(truth: np.ndarray, scores: Iterable[np.ndarray], n_jobs: int | None = None) -> np.ndarray:
    """mAP of several predictions against the same truth, optionally on threads.

    ``np.sort`` and ``np.searchsorted`` release the GIL, so threads (joblib's threading
    backend, as scikit-learn uses for such loops) nearly double the speed on two cores without
    copying the predictions into other processes.

    Parameters
    ----------
    truth : ndarray of bool, shape (n_classes, n_cells)
    scores : iterable of ndarray, shape (n_classes, n_cells)
        Consumed lazily, so a generator can slice one model's rows at a time.
    n_jobs : int, optional
        Threads; ``None`` means 1, ``-1`` all cores.

    Returns
    -------
    ndarray of float64, shape (n_predictions,)
    """
    results = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(mean_average_precision)(truth, s) for s in scores)
    return np.asarray(results, dtype=np.float64)
