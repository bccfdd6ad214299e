"""Whether to multiply the ensemble's probabilities by per-cell weights (the VID's), decided and
scored out of sample.

The decision compares the ensemble's score with and without the weights. Taken on the same
predictions whose score is then reported, "weighting on" would report the better of two; so, as
every other choice of selection, it is taken once per outer fold on the other folds' rows and
scored on the held-out fold (:func:`decide_weighting`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ensemble.selectors.scoring import Objective

WEIGHTING_MODES = ("on", "off", "auto")


@dataclass(frozen=True)
class WeightingDecision:
    """Outcome of :func:`decide_weighting`.

    Attributes
    ----------
    weighting : bool
        The decision on all rows: what the registered ensemble does.
    without, with_weights : float
        The objective's mean over folds of each fold's score with the weights never / always on.
    nested : float
        The same with each fold weighted as the decision taken without it says: the honest figure.
    fold_decisions : dict of int to bool
        Per outer fold, the decision taken on the other folds.
    """

    weighting: bool
    without: float
    with_weights: float
    nested: float
    fold_decisions: dict[int, bool]


def decide_weighting(scores: np.ndarray, weights: np.ndarray, objective: Objective, folds: np.ndarray,
                     mode: str = "auto") -> WeightingDecision:
    """Decide integrity weighting per outer fold and on all rows.

    Parameters
    ----------
    scores : ndarray, shape (n_cells, n_classes)
        The ensemble's held-out (nested) predictions.
    weights : ndarray, shape (n_cells,)
        Per-cell weights, each predicted without the cell's image (cross-validated).
    objective : Objective
        Bound to the same rows (class-major truth).
    folds : ndarray of int, shape (n_cells,)
        Outer fold of each row.
    mode : {"auto", "on", "off"}
        ``auto`` weighs where the weights raise the objective's fold mean on the deciding rows.

    Returns
    -------
    WeightingDecision
    """
    if mode not in WEIGHTING_MODES:
        raise ValueError(f"weighting must be one of {WEIGHTING_MODES}; got {mode!r}")
    if not len(scores) == len(weights) == len(folds) == objective.truth.shape[1]:
        raise ValueError("scores, weights, folds and the objective must cover the same rows")
    plain, weighted = scores.T, (scores * weights[:, None]).T
    fold_ids = [int(f) for f in np.unique(folds)]
    with warnings.catch_warnings():  # a class without positives in a fold is NaN there
        warnings.simplefilter("ignore", RuntimeWarning)
        per_fold = {f: (objective.on(folds == f).map(plain[:, folds == f]),
                        objective.on(folds == f).map(weighted[:, folds == f])) for f in fold_ids}

    def decide(used: list[int]) -> bool:
        if mode != "auto":
            return mode == "on"
        return bool(np.nanmean([per_fold[f][1] for f in used]) > np.nanmean([per_fold[f][0] for f in used]))

    fold_decisions = {f: decide([g for g in fold_ids if g != f]) for f in fold_ids}
    return WeightingDecision(
        weighting=decide(fold_ids),
        without=float(np.nanmean([per_fold[f][0] for f in fold_ids])),
        with_weights=float(np.nanmean([per_fold[f][1] for f in fold_ids])),
        nested=float(np.nanmean([per_fold[f][int(fold_decisions[f])] for f in fold_ids])),
        fold_decisions=fold_decisions,
    )
