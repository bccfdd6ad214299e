"""Per-fold evidence on candidate ensembles, computed once on all OOF rows and read by every refit.

Selection is fitted K + 1 times (on all folds, then once without each fold for the nested
scores), and pruning and fusion try mostly the same candidates in each fit. The objective ranks
every class within each fold apart, so a fit on all folds but one reads the same per-fold APs as
the fit on all of them, less the left-out fold's; and the stream correlation that fusion
thresholds is built from sums over cells, which add up fold by fold. So a candidate (a set of
members, with the image models for fusion) is aggregated and scored once, on all rows, and each
fit reads the folds it may see. A fit never reads the fold it leaves out: the nested scores stay
out of sample (``tests/test_selectors.py`` shuffles a fold's labels to check it).

Pruning (:func:`prune_members`) is here too: it is nothing but a walk over these candidates.
The fits run on threads and share one :class:`CandidateScores`; each candidate is still computed
once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ensemble.selectors.fusion import StreamMoments
from ensemble.selectors.scoring import Objective, _nanmean


@dataclass(frozen=True)
class FusionEvidence:
    """What fusion's fit reads of a candidate: per fold and class (the folds that have rows with
    cell-level truth, ``fold_ids``), the AP of image x cell and of the cell stream on those rows,
    and the moments of the two streams over all rows and over the images that carry each class."""

    fold_ids: np.ndarray
    ap_product: np.ndarray
    ap_cell: np.ndarray
    moments_all: StreamMoments
    moments_labelled: StreamMoments


class CandidateScores:
    """Each candidate's per-fold evidence on all rows, computed on first request and kept.

    Parameters
    ----------
    objective : Objective
        The selection's objective on all OOF rows, ranked within each fold.
    fold_rows : dict of int to slice
        Each fold's rows (:meth:`~ensemble.oof.OOFSet.fold_slices`), in the objective's fold order.
    cell_stream : callable
        Members (a tuple) -> their aggregated cell stream on all rows, (n_classes, n_cells).
    image_stream : callable
        Image models (a tuple) -> their aggregated image stream on all rows.
    scored : ndarray of bool, shape (n_cells,)
        Rows with cell-level truth, on which fusion's APs are measured.
    carried : ndarray of bool, shape (n_classes, n_cells)
        Per class, the cells of the images that carry it.
    """

    def __init__(self, objective: Objective, fold_rows: dict[int, slice],
                 cell_stream: Callable[[tuple[str, ...]], np.ndarray],
                 image_stream: Callable[[tuple[str, ...]], np.ndarray], scored: np.ndarray, carried: np.ndarray):
        self.objective, self.fold_ids = objective, np.array(list(fold_rows))
        self.fold_rows = list(fold_rows.values())
        self.cell_stream, self.image_stream = cell_stream, image_stream
        self.scored, self.carried = scored, carried
        self.scored_folds = np.unique(objective.folds[scored])
        self.on_scored = objective.on(scored)  # its ranking is built once, for every candidate
        self._cell_ap: dict[tuple[str, ...], np.ndarray] = {}
        self._fusion: dict[tuple[tuple[str, ...], tuple[str, ...]], FusionEvidence] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _once(self, cache: dict, key: Hashable, compute: Callable[[], object]):
        """``cache[key]``, computed by the first fit that asks: fits run on threads, and two that
        want the same candidate at once would otherwise both aggregate and score it."""
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in cache:
                cache[key] = compute()
        return cache[key]

    def kept(self, exclude_fold: int | None, fold_ids: np.ndarray | None = None) -> np.ndarray:
        """Mask over ``fold_ids`` (default: every fold) of the folds a fit without ``exclude_fold`` sees."""
        fold_ids = self.fold_ids if fold_ids is None else fold_ids
        return fold_ids != exclude_fold

    def fold_maps(self, members: Sequence[str], exclude_fold: int | None) -> np.ndarray:
        """Each seen fold's mAP of the members' aggregated cell stream: 1-D."""
        key = tuple(sorted(members))
        ap = self._once(self._cell_ap, key, lambda: self.objective.per_fold_and_class(self.cell_stream(key)))
        return _nanmean(ap[self.kept(exclude_fold)], axis=1)

    def fusion(self, members: Sequence[str], image_models: Sequence[str]) -> FusionEvidence:
        """The candidate's :class:`FusionEvidence` on all rows."""
        key = (tuple(sorted(members)), tuple(sorted(image_models)))
        return self._once(self._fusion, key, lambda: self._fusion_evidence(*key))

    def _fusion_evidence(self, members: tuple[str, ...], image_models: tuple[str, ...]) -> FusionEvidence:
        cell, image = self.cell_stream(members), self.image_stream(image_models)
        if self.scored.any():
            # Every row is scored where the store knows every cell's truth: no copies of the streams.
            on_scored = (cell, image) if self.scored.all() else (cell[:, self.scored], image[:, self.scored])
            ap_product = self.on_scored.per_fold_and_class(on_scored[0] * on_scored[1])
            ap_cell = self.on_scored.per_fold_and_class(on_scored[0])
        else:
            ap_product = ap_cell = np.zeros((0, cell.shape[0]))
        return FusionEvidence(self.scored_folds, ap_product, ap_cell, StreamMoments.of(image, cell, self.fold_rows),
                              StreamMoments.of(image, cell, self.fold_rows, within=self.carried))


def prune_members(
    members: Mapping[str, str],
    model_map: Mapping[str, float],
    candidates: CandidateScores,
    exclude_fold: int | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Leave a block's member out only if adding it lowers the aggregated cell stream's score in
    every fold the fit sees (all but ``exclude_fold``).

    The bar is consistent harm, not "no gain": the first member is the best of several models on
    these rows, so its score is biased upwards, and a member that adds as much as it costs here
    still adds an independent view of new images (on the quick zoo, pruning on "raise the pooled
    score" kept one network per nested refit and scored 0.017 competition mAP below the mean of
    all models out of sample). A block of models that learnt little but the class priors lowers
    the ensemble in every fold, and goes.

    Greedy in order of member score, one pass: each block is tried once, so this costs one score
    per block, not Caruana's one per model per step.
    """
    order = sorted(members, key=lambda b: -model_map[members[b]])
    kept, pruned = {order[0]: members[order[0]]}, {}
    current = candidates.fold_maps([members[order[0]]], exclude_fold)
    for block in order[1:]:
        scores = candidates.fold_maps([*kept.values(), members[block]], exclude_fold)
        if (scores < current).all():
            pruned[block] = (f"adding {members[block]} lowers the score in every fold: "
                             + ", ".join(f"{old:.4f} -> {new:.4f}" for old, new in zip(current, scores, strict=True)))
        else:
            kept[block], current = members[block], scores
    return {b: kept[b] for b in members if b in kept}, pruned
