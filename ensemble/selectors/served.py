"""What selection would see if each cell were predicted as serving predicts it: by every fold network.

Serving averages a member's K fold networks; the OOF holds, for each cell, the one network that
did not train on it. Networks trained briefly on different folds disagree, so the average is
better than any one of them, by more for some models than for others, and a mix of members that
beats the best member on the OOF can lose to that member's average on new images (BENCHMARKS.md,
"The ensemble against its members").

The disagreement is measurable without labels. A job also predicts its inner validation split,
images of the other folds it did not train on: there a cell of fold j has two out-of-sample
predictions of every model, from the networks of folds j and k. Half the mean product of their
differences is the covariance ``C`` of the fold networks' noise (per class, across models: models
trained on the same fold share its sample). Written for one class, with ``f`` a cell's OOF
predictions of the M models, ``mu`` and ``S`` their mean and covariance over cells, the served
average's expectation given the OOF is (noise independent of signal, linear):

    E[mean of K networks | f] = f - (1 - 1/K) C S^-1 (f - mu)

(the OOF network is one of the K; the other K - 1 average out their noise). :func:`served_form`
replaces the OOF's cell stream with it; no label enters, so nested scores stay out of sample.
No library estimates this: it is the linear (BLUP) regression of the noise on the predictions.
The image stream of DSA models is left as it is (fusion alone reads it).
"""

from __future__ import annotations

import posixpath
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from ensemble.oof import CELL_COLUMNS, KEYS, VALIDATION_ARTIFACT, OOFSet, latest_oof_runs
from ensemble.storage import exists, join, read_parquet

NETWORK = "network"  # a validation table's column: the fold whose job predicted the row
MIN_PAIRS = 100      # cells with two out-of-sample predictions of every model below which selection does not use them
# Validation rows read per model: a per-class covariance of 50 models is estimated to about 1 % from
# this many cells, while the whole tables of a large zoo are as large as half its OOF.
MAX_CELLS = 20_000


@dataclass(frozen=True)
class FoldNoise:
    """Covariance of the fold networks' noise, per class, across models.

    Attributes
    ----------
    models : list of str
    covariance : ndarray, shape (n_classes, n_models, n_models)
    n_pairs : int
        Cells (with their second network) the estimate rests on.
    n_folds : int
        Networks a member's served prediction averages.
    """

    models: list[str]
    covariance: np.ndarray
    n_pairs: int
    n_folds: int

    def spread(self) -> dict[str, float]:
        """Per model, the standard deviation of one network's noise (mean over classes)."""
        return {m: float(np.sqrt(np.diagonal(self.covariance, axis1=1, axis2=2)[:, i]).mean())
                for i, m in enumerate(self.models)}


def load_validation_dir(oof_dir: str, models: list[str], max_cells: int = MAX_CELLS,
                        seed: int = 0) -> dict[str, pd.DataFrame] | None:
    """The validation tables training assembled beside the OOF (``{oof_dir}/validation/{model}.parquet``),
    or None where a model has none (jobs of an older version, OOF tables from elsewhere).

    Only the rows of a random sample of images, the same for every model, with about ``max_cells``
    rows in the first model's table (all rows where it has fewer).
    """
    paths = {m: [join(oof_dir, "validation", f"{m}.parquet")] for m in models}
    if not all(exists(p) for parts in paths.values() for p in parts):
        return None
    return _read_sample(paths, max_cells, seed)


def load_validation_mlflow(experiment_name: str, models: list[str], tracking_uri: str | None = None,
                           max_cells: int = MAX_CELLS, seed: int = 0) -> dict[str, pd.DataFrame] | None:
    """:func:`load_validation_dir` for OOF tables read from MLflow (:func:`~ensemble.oof.load_oof_mlflow`):
    the validation artifact of each model's latest run per fold, or None where a run has none."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = latest_oof_runs(client, experiment.experiment_id) if experiment is not None else {}
    if any(m not in runs for m in models):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for model in models:
            for run in runs[model]:
                listed = client.list_artifacts(run.info.run_id, posixpath.dirname(VALIDATION_ARTIFACT))
                if not any(a.path == VALIDATION_ARTIFACT for a in listed):
                    return None
                paths.setdefault(model, []).append(download_artifacts(
                    run_id=run.info.run_id, artifact_path=VALIDATION_ARTIFACT, dst_path=f"{tmp}/{run.info.run_id}",
                    tracking_uri=tracking_uri))
        return _read_sample(paths, max_cells, seed)


def _read_sample(paths: Mapping[str, list[str]], max_cells: int, seed: int) -> dict[str, pd.DataFrame]:
    """Each model's rows (from its parts) of a random sample of images chosen on the first model's."""
    if max_cells < 1:
        raise ValueError(f"max_cells must be positive, got {max_cells}")
    first = next(iter(paths.values()))
    rows = pd.concat([read_parquet(p, columns=["image_id"]) for p in first])["image_id"].value_counts()
    rows = rows.iloc[np.random.default_rng(seed).permutation(len(rows))]
    images = rows.index[: int(np.searchsorted(rows.cumsum().to_numpy(), max_cells)) + 1].tolist()
    return {m: pd.concat([read_parquet(p, filters=[("image_id", "in", images)]) for p in parts], ignore_index=True)
            for m, parts in paths.items()}


def fold_noise(oof: OOFSet, validation: Mapping[str, pd.DataFrame]) -> FoldNoise:
    """Estimate :class:`FoldNoise` from each model's validation predictions and its OOF.

    Parameters
    ----------
    oof : OOFSet
        With a ``fold`` column in its index.
    validation : mapping of str to DataFrame
        Per model of ``oof``: ``image_id, cell_id``, ``network`` (the fold of the job that
        predicted the row; never the cell's own) and the cell columns.

    Raises
    ------
    ValueError
        A model without its table, a row predicted by its own fold's network or of a cell that
        the OOF does not hold, or no cell that every model's tables share.
    """
    missing = [m for m in oof.models if m not in validation]
    if missing:
        raise ValueError(f"no validation predictions of {missing}")
    folds = oof.index["fold"].to_numpy()
    shared = None
    for name in oof.models:
        keys = pd.MultiIndex.from_frame(validation[name][[*KEYS, NETWORK]])
        shared = keys if shared is None else shared.intersection(keys)
    if not len(shared):
        raise ValueError("no cell has validation predictions of every model: their inner validation splits differ")
    pairs = shared.to_frame(index=False)
    # OOF rows of the pairs' images only: indexing every cell of a large OOF costs seconds.
    rows = np.flatnonzero(oof.index["image_id"].isin(pairs["image_id"].unique()).to_numpy())
    position = pd.Series(rows, index=pd.MultiIndex.from_frame(oof.index.iloc[rows][KEYS]))
    at = position.reindex(pd.MultiIndex.from_frame(pairs[KEYS])).to_numpy()
    if np.isnan(at).any():
        raise ValueError("validation predictions of cells that are not in the OOF tables")
    at = at.astype(np.int64)
    if (folds[at] == pairs[NETWORK].to_numpy()).any():
        raise ValueError("a validation row predicted by the network of its own fold: not a second network")
    differences = []
    for name in oof.models:
        table = validation[name].set_index([*KEYS, NETWORK]).loc[shared, CELL_COLUMNS].to_numpy(np.float32)
        differences.append(oof.cell[name][:, at] - table.T)  # (n_classes, n_pairs)
    d = np.stack(differences, axis=1)                          # (n_classes, n_models, n_pairs)
    covariance = np.einsum("cmn,cln->cml", d, d) / (2 * d.shape[2])
    return FoldNoise(models=list(oof.models), covariance=covariance, n_pairs=len(shared),
                     n_folds=int(np.unique(folds).size))


def served_form(oof: OOFSet, noise: FoldNoise, copy: bool = True) -> OOFSet:
    """The OOF with each cell stream replaced by its served average's expectation (module docstring).

    Parameters
    ----------
    oof : OOFSet
    noise : FoldNoise
        Of the same models (:func:`fold_noise`).
    copy : bool, default True
        False writes the served form into ``oof``'s own cell arrays: a large OOF is not held twice,
        and ``oof`` is then the served form too.

    Returns
    -------
    OOFSet
        Same index, tags and image streams; cell streams in [0, 1].
    """
    if list(noise.models) != list(oof.models):
        raise ValueError(f"the noise is of {noise.models}, the OOF of {oof.models}")
    shrink = 1 - 1 / noise.n_folds
    cell = {m: np.empty_like(oof.cell[m]) for m in oof.models} if copy else oof.cell
    # One class of every model at a time, in two buffers reused across classes: fresh arrays of a
    # large OOF's size cost more in page faults than the arithmetic.
    centred = np.empty((len(oof.models), oof.n_cells), np.float32)  # (n_models, n_cells)
    served = np.empty_like(centred)
    for c in range(len(CELL_COLUMNS)):
        np.stack([oof.cell[m][c] for m in oof.models], out=centred)
        mean = centred.mean(axis=1, keepdims=True)
        centred -= mean
        spread = (centred @ centred.T).astype(np.float64) / centred.shape[1]
        # A ridge of the spread's scale keeps a model that predicts one value everywhere solvable.
        ridge = 1e-6 * max(np.trace(spread) / len(spread), 1e-12) * np.eye(len(spread))
        regression = shrink * noise.covariance[c] @ np.linalg.inv(spread + ridge)  # (n_models, n_models)
        # f - R (f - mu) = (I - R)(f - mu) + mu: one product, no further copy of the class.
        np.matmul((np.eye(len(spread)) - regression).astype(np.float32), centred, out=served)
        served += mean
        for i, m in enumerate(oof.models):
            np.clip(served[i], 0, 1, out=cell[m][c])
    return replace(oof, cell=cell)


def as_served(oof: OOFSet, validation: Mapping[str, pd.DataFrame] | None,
              copy: bool = True) -> tuple[OOFSet, FoldNoise | None]:
    """What selection scores: the served form (:func:`served_form`, with ``copy``) where ``validation``
    gives ``MIN_PAIRS`` cells or more, else the OOF as it is, with a warning that says why; and the
    noise used (None for the OOF)."""
    noise = fold_noise(oof, validation) if validation is not None else None
    if noise is not None and noise.n_pairs >= MIN_PAIRS:
        return served_form(oof, noise, copy=copy), noise
    why = (f"only {noise.n_pairs} cells have a second network's prediction (need {MIN_PAIRS}; a larger "
           "train.val_fraction gives more)" if noise is not None else
           "no validation predictions of the jobs with the OOF tables (train with this version to have them)")
    warnings.warn(f"{why}: selection sees one network per cell, while serving averages the fold networks",
                  stacklevel=3)
    return oof, None
