"""Correlation between models' predictions, computed by streaming over cells.

50 models x 1.2M cells x 19 classes is 4.6 GB of float32; a float64 copy, or ``np.corrcoef`` on
the stacked predictions, would need several times that. Instead the rows are read in chunks and
only sums and Gram matrices (models x models) are kept, per fold and per class, so one pass yields
the overall matrix, the per-class matrices, and the matrix of any set of folds (the nested
cross-validation needs the correlation without each fold in turn).

Two single-matrix summaries (:data:`CORRELATIONS`):

- ``flat``: Pearson over all cells x classes flattened, as the paper's Fig. 4b reads.
- ``within_class``: the mean over classes of each class's Pearson matrix. Every model that has
  learnt the class priors predicts Nucleoplasm near 0.3 and Aggresome near 0.01, and the flat
  correlation is mostly that shared prior (0.79-0.99 between all six quick-zoo models, against
  0.25-0.72 within classes). mAP is computed per class, on rankings within the class, so
  whether two models make the same mistakes is a within-class question; each class counts
  equally, as in mAP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from ensemble.labels import CLASS_NAMES
from ensemble.oof import OOFSet

CORRELATIONS = ("within_class", "flat")


@dataclass(frozen=True, eq=False)
class PredictionMoments:
    """First and second moments of the models' cell predictions, per fold and class.

    Attributes
    ----------
    models : list of str
    folds : list of int
        One group per fold (a single group ``-1`` for predictions without folds).
    count : ndarray, shape (n_folds,)
        Cells per fold.
    sums : ndarray, shape (n_folds, n_classes, n_models)
        Sums of the shifted predictions.
    gram : ndarray, shape (n_folds, n_classes, n_models, n_models)
        Sums of products of the shifted predictions.
    """

    models: list[str]
    folds: list[int]
    count: np.ndarray
    sums: np.ndarray
    gram: np.ndarray

    def correlation(
        self, *, exclude_fold: int | None = None, kind: str = "flat", per_class: bool = False
    ) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """Pearson correlation between models: one matrix of ``kind``, or one per class.

        Parameters
        ----------
        exclude_fold : int, optional
            Leave this fold's cells out.
        kind : {"flat", "within_class"}
            See the module docstring.
        per_class : bool
            Return one matrix per class name instead (``kind`` is then ignored).
        """
        if kind not in CORRELATIONS:
            raise ValueError(f"correlation kind must be one of {CORRELATIONS}; got {kind!r}")
        keep = np.array([f != exclude_fold for f in self.folds])
        n = self.count[keep].sum()
        sums, gram = self.sums[keep].sum(axis=0), self.gram[keep].sum(axis=0)
        if per_class or kind == "within_class":
            matrices = [_pearson(gram[k], sums[k], n) for k in range(len(CLASS_NAMES))]
            if per_class:
                return {name: self._frame(m) for name, m in zip(CLASS_NAMES, matrices, strict=True)}
            return self._frame(np.mean(matrices, axis=0))
        return self._frame(_pearson(gram.sum(axis=0), sums.sum(axis=0), n * sums.shape[0]))

    def _frame(self, values: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(values, index=self.models, columns=self.models)


def prediction_moments(oof: OOFSet, *, chunk_rows: int = 8192, n_jobs: int | None = None) -> PredictionMoments:
    """One streaming pass over the cell predictions of ``oof``, its folds on ``n_jobs`` threads.

    Peak extra memory is one float64 chunk of ``n_models x n_classes x chunk_rows`` per thread
    (about 60 MB for 50 models at the default), whatever the number of cells.
    """
    models = oof.models
    groups = oof.fold_slices() or {-1: slice(0, oof.n_cells)}
    n_classes = next(iter(oof.cell.values())).shape[0]
    # Raw moments lose precision to cancellation when means are large next to the spread;
    # shifting each model by a rough mean (from the first rows) keeps them well conditioned.
    head = slice(0, min(chunk_rows, oof.n_cells))
    shift = np.array([oof.cell[m][:, head].mean(dtype=np.float64) for m in models])

    def fold_sums(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        sums, gram = np.zeros((n_classes, len(models))), np.zeros((n_classes, len(models), len(models)))
        buffer = np.empty((n_classes, len(models), chunk_rows))
        for start in range(rows.start, rows.stop, chunk_rows):
            stop = min(start + chunk_rows, rows.stop)
            x = buffer[:, :, : stop - start]
            for i, m in enumerate(models):
                x[:, i] = oof.cell[m][:, start:stop]
            x -= shift[:, None]
            sums += x.sum(axis=2)
            gram += x @ x.transpose(0, 2, 1)
        return sums, gram

    sums, gram = zip(*Parallel(n_jobs=n_jobs, prefer="threads")(delayed(fold_sums)(rows) for rows in groups.values()),
                     strict=True)
    count = np.array([rows.stop - rows.start for rows in groups.values()], dtype=np.int64)
    return PredictionMoments(models=models, folds=list(groups), count=count, sums=np.stack(sums), gram=np.stack(gram))


def correlation_matrix(
    oof: OOFSet, *, kind: str = "flat", per_class: bool = False, chunk_rows: int = 8192
) -> pd.DataFrame | dict[str, pd.DataFrame]:
    """Pearson correlation between the models' cell predictions.

    Parameters
    ----------
    oof : OOFSet
    kind : {"flat", "within_class"}
        ``flat``: one matrix over all cells x classes flattened (the paper's Fig. 4b);
        ``within_class``: the mean of the per-class matrices (module docstring).
    per_class : bool
        True: a dict class name -> matrix over cells instead.
    chunk_rows : int
        Cells per streaming chunk.

    Returns
    -------
    DataFrame (models x models) or dict of them.
    """
    return prediction_moments(oof, chunk_rows=chunk_rows).correlation(kind=kind, per_class=per_class)


def _pearson(gram: np.ndarray, sums: np.ndarray, n: int) -> np.ndarray:
    mean = sums / n
    cov = gram / n - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    # A model that is constant (over a class, say) has no defined correlation; 0 treats it as
    # unrelated to the others, so it lands in a block of its own instead of breaking clustering.
    corr = np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)
