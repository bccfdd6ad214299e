"""Per-fold evidence on candidate ensembles, computed once on all OOF rows and read by every refit.

Selection is fitted K + 1 times (on all folds, then once without each fold for the nested
scores), and pruning and fusion try mostly the same candidates in each fit. The objective ranks
every class within each fold apart, so a fit on all folds but one reads the same per-fold APs as
the fit on all of them, less the left-out fold's; and the stream correlation that fusion
thresholds is built from sums over cells, which add up fold by fold. So a candidate (a set of
members, with the image models for fusion) is aggregated and scored once, on all rows, and each
fit reads the folds it may see. A fit never reads the fold it leaves out: the nested scores stay
out of sample (``tests/test_selectors.py`` shuffles a fold's labels to check it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    def kept(self, exclude_fold: int | None, fold_ids: np.ndarray | None = None) -> np.ndarray:
        """Mask over ``fold_ids`` (default: every fold) of the folds a fit without ``exclude_fold`` sees."""
        fold_ids = self.fold_ids if fold_ids is None else fold_ids
        return fold_ids != exclude_fold

    def fold_maps(self, members: Sequence[str], exclude_fold: int | None) -> np.ndarray:
        """Each seen fold's mAP of the members' aggregated cell stream: 1-D."""
        key = tuple(sorted(members))
        if key not in self._cell_ap:
            self._cell_ap[key] = self.objective.per_fold_and_class(self.cell_stream(key))
        return _nanmean(self._cell_ap[key][self.kept(exclude_fold)], axis=1)

    def fusion(self, members: Sequence[str], image_models: Sequence[str]) -> FusionEvidence:
        """The candidate's :class:`FusionEvidence` on all rows."""
        key = (tuple(sorted(members)), tuple(sorted(image_models)))
        if key not in self._fusion:
            cell, image = self.cell_stream(key[0]), self.image_stream(key[1])
            if self.scored.any():
                ap_product = self.on_scored.per_fold_and_class((cell * image)[:, self.scored])
                ap_cell = self.on_scored.per_fold_and_class(cell[:, self.scored])
            else:
                ap_product = ap_cell = np.zeros((0, cell.shape[0]))
            self._fusion[key] = FusionEvidence(
                self.scored_folds, ap_product, ap_cell, StreamMoments.of(image, cell, self.fold_rows),
                StreamMoments.of(image, cell, self.fold_rows, within=self.carried))
        return self._fusion[key]
