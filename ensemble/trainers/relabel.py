"""CRA, the Cells Re-labelling Algorithm of HCPL's "AI-trains-AI" (paper, Fig. 3c).

Weak cell labels copy the image's labels onto every cell of the image. CRA replaces them with
soft labels that the models themselves assign:

1. train DSA models on the current cell labels and collect their out-of-fold (OOF) cell-stream
   probabilities, so that no cell is scored by a model that was trained on it;
2. average the models' probabilities per cell and class: the combined confidence ``c``;
3. power-normalise, ``c -> c ** beta``, and keep only the classes of the cell's image (a cell
   cannot show a protein pattern its image was not labelled with, so CRA only removes labels);
4. write the result into the cell store as a new label version and train on it in the next round.

The paper runs two rounds and trains its final cell-level models (CLA, CLH) on the labels of
round two. :func:`cra_rounds` runs the rounds around any function that trains DSA models on
label versions and returns their OOF tables; :func:`nested_trainer` makes that function from a zoo.

CRA is nested in the folds, so that no OOF row's label reaches the labels that train the model
predicting it: for each outer fold j the rounds run on the other folds alone (the DSAs' OOF
over them is an inner cross-validation that leaves fold j out of training), and write label
version ``{prefix}{r}-f{j}``, on which the final job predicting fold j trains. Cost per round
and DSA model: K x (K-1) jobs, each on K-2 of the K folds (instead of K jobs on K-1 folds), less
in round one, whose jobs train on the weak labels and so serve both folds they leave out:
K x (K-1) / 2. With K = 3 a round costs no more training than an un-nested one, round one half.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ensemble import tracking
from ensemble.checks import preflight_zoo
from ensemble.data.store import CellStore, evaluation_labels, open_store
from ensemble.labels import NUM_CLASSES
from ensemble.metrics import cell_map
from ensemble.oof import CELL_COLUMNS, KEYS
from ensemble.storage import join, read_parquet, write_parquet
from ensemble.trainers.fit import oof_uri
from ensemble.trainers.jobs import Job, open_zoo, run_jobs, train_zoo
from ensemble.zoo import ModelSpec, Zoo

# The paper's Fig. 3c: about 60 % of the combined confidences of image labels are below 0.1,
# because models trained on weak labels spread an image's classes over all its cells. Training on
# such small targets would mostly teach "absent"; beta < 1 lifts low confidences (0.01 -> 0.1,
# 0.1 -> 0.32, 0.5 -> 0.71) while keeping their order and leaving 0 and 1 fixed.
DEFAULT_BETA = 0.5

OofTables = Mapping[str, "pd.DataFrame | str"]


@dataclass(frozen=True)
class RelabelResult:
    """Soft cell labels written by :func:`relabel`.

    Attributes
    ----------
    version : str
        Label version in the store (``CellStore.labels(version)``).
    models : tuple of str
        The models whose OOF probabilities were averaged.
    beta : float
        Exponent of the power normalisation.
    quality : float
        :func:`label_quality` of the new labels (NaN when the store has no cell truth).
    labels : ndarray of float32, shape (n_cells, 19)
        The labels written, in store row order.
    """

    version: str
    models: tuple[str, ...]
    beta: float
    quality: float
    labels: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class RoundResult:
    """One CRA round of :func:`cra_rounds`, over the outer folds.

    Attributes
    ----------
    round : int
        1-based round number.
    trained_on : str
        Labels the round's models were trained on: the start version, or the previous round's
        ``version``.
    trained_on_quality : float
        Quality of ``trained_on`` (NaN without cell truth): the baseline the round is measured against.
    version : str
        The round's name, ``{prefix}{round}``; each outer fold j's labels are ``versions[j]``.
    versions : dict of int to str
        Outer fold -> the label version the round wrote for it (``{version}-f{j}``).
    quality : float
        Mean over outer folds of :func:`label_quality` of ``versions[j]`` on the other folds' cells,
        those its models train on (NaN without cell truth).
    model_map : dict of str to float
        Mean over outer folds of each model's OOF cell mAP on the other folds' cells, against cell
        truth when known (else image labels).
    oof : dict of int to dict of str to str
        Outer fold -> the models' OOF tables over the other folds, as returned by the training function.
    """

    round: int
    trained_on: str
    trained_on_quality: float
    version: str
    versions: dict[int, str]
    quality: float
    model_map: dict[str, float]
    oof: dict[int, dict[str, str]]


def power_normalise(confidence: np.ndarray, beta: float = DEFAULT_BETA) -> np.ndarray:
    """``c -> c ** beta`` for probabilities ``c`` in [0, 1].

    Parameters
    ----------
    confidence : array
        Probabilities.
    beta : float
        Exponent, > 0; below 1 lifts low confidences, above 1 pushes them towards 0.

    Returns
    -------
    ndarray of float32, same shape
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    confidence = np.asarray(confidence, dtype=np.float64)
    if not (np.isfinite(confidence).all() and (confidence >= 0).all() and (confidence <= 1).all()):
        raise ValueError("confidences must be finite probabilities in [0, 1]")
    return (confidence**beta).astype(np.float32)


def combined_confidence(store: CellStore | str, oof_tables: OofTables, rows: np.ndarray | None = None) -> np.ndarray:
    """Mean over models of the OOF cell-stream probabilities, in store row order.

    Parameters
    ----------
    store : CellStore or str
    oof_tables : mapping of model name to DataFrame or parquet URI
        OOF tables with ``image_id, cell_id, cell_0..cell_18``; each must list every cell of
        ``rows`` exactly once.
    rows : array of int, optional
        Store rows the tables cover (default: every cell of the store).

    Returns
    -------
    ndarray of float32, shape (len(rows), 19)
    """
    store = open_store(store)
    if not oof_tables:
        raise ValueError("oof_tables is empty: give the OOF tables of at least one model")
    keys = _keys(store, rows)
    total = np.zeros((len(keys), NUM_CLASSES), dtype=np.float64)
    for name, table in oof_tables.items():
        total += _aligned_probabilities(name, table, keys)
    return (total / len(oof_tables)).astype(np.float32)


def relabel(store: CellStore | str, oof_tables: OofTables, beta: float = DEFAULT_BETA,
            version: str = "cra1", outer: int | None = None) -> RelabelResult:
    """Re-label the store's cells from models' OOF predictions and save them as a label version.

    Parameters
    ----------
    store : CellStore or str
    oof_tables : mapping of model name to DataFrame or parquet URI
        OOF tables of the models (the paper: DSAs trained on the previous labels); see
        :func:`combined_confidence`.
    beta : float
        Power-normalisation exponent (default :data:`DEFAULT_BETA` = 0.5, which lifts the low
        confidences of weakly trained models; see the module constants).
    version : str
        Name of the new label version (overwritten if it exists; not "weak" or "truth").
    outer : int, optional
        An outer fold: the tables cover the other folds' cells, which are re-labelled; the outer
        fold's cells keep their weak labels (no model of that outer fold trains on them).

    Returns
    -------
    RelabelResult
        ``quality`` is measured on the re-labelled cells.
    """
    store = open_store(store)
    rows = _rows_without(store, outer)
    labels = store.labels("weak")
    # Only the image's own classes survive: relabelling removes weak labels, it never adds one.
    labels[rows] *= power_normalise(combined_confidence(store, oof_tables, rows), beta)
    store.write_labels(version, labels)
    quality = label_quality(store, version, rows) if "truth" in store.label_versions() else float("nan")
    return RelabelResult(version=version, models=tuple(oof_tables), beta=float(beta), quality=quality, labels=labels)


def label_quality(store: CellStore | str, version: str, rows: np.ndarray | None = None) -> float:
    """Cell mAP of a label version, read as scores, against the cell truth.

    Only cells matched to a true cell count (the others have no true label). Soft labels rank
    cells, so a version that puts a cell's true classes above its false ones scores high; the
    truth itself scores 1. Being a ranking score, it does not see beta: ``c -> c ** beta`` keeps
    every class's order of cells.

    Parameters
    ----------
    store : CellStore or str
    version : str
        Any label version of the store.
    rows : array of int, optional
        Store rows to score (default: every cell).

    Returns
    -------
    float
    """
    store = open_store(store)
    rows = np.arange(len(store)) if rows is None else rows
    truth = store.labels("truth")[rows]  # KeyError when the store has no truth
    known = ~np.isnan(truth).any(axis=1)
    return cell_map(truth[known], store.labels(version)[rows][known]).map


def cra_rounds(store: CellStore | str, train_dsas: Callable[[Mapping[int, str]], Mapping[int, Mapping[str, str]]],
               rounds: int = 2, beta: float = DEFAULT_BETA, start: str = "weak", prefix: str = "cra",
               folds: list[int] | None = None) -> list[RoundResult]:
    """Run CRA for several rounds, nested in the folds: train on the current labels, re-label, repeat.

    Parameters
    ----------
    store : CellStore or str
    train_dsas : callable
        ``train_dsas({outer fold j: label version}) -> {j: {model name: OOF table URI}}``: for
        each outer fold, trains the DSA models on its label version (``TrainSettings.labels``)
        on the other folds only and returns their OOF tables over those folds, e.g.
        :func:`nested_trainer`.
    rounds : int
        Rounds (the paper: 2). The last round's versions are what the final models train on.
    beta : float
        Power-normalisation exponent (:func:`relabel`).
    start : str
        Label version of the first round's training.
    prefix : str
        Round r writes version ``f"{prefix}{r}-f{j}"`` for outer fold j.
    folds : list of int, optional
        Outer folds to re-label for (default: every fold of the store).

    Returns
    -------
    list of RoundResult
        One per round; ``[-1].versions`` are the final label versions.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    store = open_store(store)
    if start not in store.label_versions():
        raise KeyError(f"label version {start!r} not in {store.uri}; have {store.label_versions()}")
    folds = sorted(int(f) for f in (np.unique(store.cells["fold"]) if folds is None else folds))
    known = "truth" in store.label_versions()
    current = {j: start for j in folds}
    # Each round's baseline is the previous round's result; only the start's is measured here.
    quality = (float(np.mean([label_quality(store, start, _rows_without(store, j)) for j in folds])) if known
               else float("nan"))
    results = []
    for r in range(1, rounds + 1):
        oof = {j: dict(tables) for j, tables in train_dsas(current).items()}
        written = {j: relabel(store, oof[j], beta=beta, version=f"{prefix}{r}-f{j}", outer=j) for j in folds}
        maps = [oof_maps(store, oof[j], _rows_without(store, j)) for j in folds]
        results.append(RoundResult(
            round=r, trained_on=start if r == 1 else f"{prefix}{r - 1}", trained_on_quality=quality,
            version=f"{prefix}{r}", versions={j: written[j].version for j in folds},
            quality=float(np.mean([written[j].quality for j in folds])),
            model_map={name: float(np.mean([m[name] for m in maps])) for name in maps[0]}, oof=oof))
        current, quality = results[-1].versions, results[-1].quality
    return results


def oof_maps(store: CellStore | str, oof_tables: OofTables, rows: np.ndarray | None = None) -> dict[str, float]:
    """OOF cell mAP of each model on ``rows`` (default: every cell), against
    :func:`~ensemble.data.store.evaluation_labels`."""
    store = open_store(store)
    labels, _ = evaluation_labels(store)
    rows = np.arange(len(store)) if rows is None else rows
    keys = _keys(store, rows)
    return {name: cell_map(labels[rows], _aligned_probabilities(name, table, keys)).map
            for name, table in oof_tables.items()}


def fold_specs(zoo: Zoo, versions: Mapping[int, str]) -> dict[tuple[str, int], ModelSpec]:
    """Each (model, fold) job of ``zoo`` set to train on its outer fold's label version (``versions[fold]``)."""
    return {(m.name, j): dataclasses.replace(m, train=dataclasses.replace(m.train, labels=version))
            for m in zoo.models for j, version in versions.items()}


def relabelled_zoo(zoo: Zoo, version: str, heads: tuple[str, ...] = ("dsa",)) -> Zoo:
    """The zoo's models of the given heads, set to train on a label version, as zoo ``{name}-{version}``.

    The new name keeps each round's MLflow runs apart from the others' and from the final zoo's.
    """
    models = tuple(dataclasses.replace(m, train=dataclasses.replace(m.train, labels=version))
                   for m in zoo.models if m.head in heads)
    if not models:
        raise ValueError(f"zoo {zoo.name!r} has no model with head in {heads}")
    return dataclasses.replace(zoo, name=f"{zoo.name}-{version}", models=models)


def zoo_trainer(zoo: Zoo, store: CellStore | str, workdir: str, heads: tuple[str, ...] = ("dsa",),
                **train_zoo_kwargs) -> Callable[[str], dict[str, str]]:
    """A function that trains a zoo's models of ``heads`` on a given label version, on every fold.

    Not nested: for label versions no fold's labels chose, such as the weak labels (benchmarks'
    baselines); CRA's own rounds use :func:`nested_trainer`. Each label version trains as
    :func:`relabelled_zoo` in its own ``{workdir}/labels-{version}``; a re-run skips finished jobs.

    Parameters
    ----------
    zoo : Zoo
    store : CellStore or str
    workdir : str
    heads : tuple of str
        Heads of the zoo to train.
    **train_zoo_kwargs
        Passed to :func:`ensemble.trainers.jobs.train_zoo` (``tracking_uri``, ``experiment``, ...).
    """
    relabelled_zoo(zoo, "weak", heads)  # fail now, not after a round of training, if no model fits

    def train(version: str) -> dict[str, str]:
        return train_zoo(relabelled_zoo(zoo, version, heads), store, join(workdir, f"labels-{version}"),
                         **train_zoo_kwargs).oof

    return train


def nested_trainer(zoo: Zoo, store: CellStore | str, workdir: str, heads: tuple[str, ...] = ("dsa",), *,
                   tracking_uri: str | None = None, progress: bool = True,
                   max_concurrent: int | None = None) -> Callable[[Mapping[int, str]], dict[int, dict[str, str]]]:
    """A ``train_dsas`` for :func:`cra_rounds`: each outer fold's models on its label version, on the other folds.

    For outer fold j and each other fold i, one job trains on every fold but i and j and predicts
    both (:class:`~ensemble.trainers.jobs.Job` ``without``); fold j's inner OOF table is fold i's
    rows of each such job, written to ``{workdir}/labels-{version}/oof/outer{j}/{model}.parquet``.
    The models of a label version train as zoo ``{zoo}-{version}`` (:func:`relabelled_zoo`: its own
    MLflow experiment and ``{workdir}/labels-{version}``). A job is its version, model and pair
    of folds, so outer folds on the same version (round one's weak labels) share their jobs.
    Every job of a call is handed to Ray at once, ``max_concurrent`` at a time; a re-run skips
    finished jobs.

    Parameters
    ----------
    zoo : Zoo
    store : CellStore or str
    workdir : str
    heads : tuple of str
        Heads of the zoo to train (the paper re-labels with DSAs only).
    tracking_uri : str, optional
    progress : bool
    max_concurrent : int, optional
        Jobs in flight at once (default: all).
    """
    preflight_zoo(relabelled_zoo(zoo, "weak", heads))  # fail now, not after a round of training

    def train(versions: Mapping[int, str]) -> dict[int, dict[str, str]]:
        opened = open_store(store)
        folds = [int(f) for f in np.unique(opened.cells["fold"])]
        contexts = {}
        for version in sorted(set(versions.values())):
            sub = relabelled_zoo(zoo, version, heads)
            contexts[version] = sub, open_zoo(sub, opened, join(workdir, f"labels-{version}"),
                                              tracking_uri=tracking_uri)
        jobs = {}
        for j, version in versions.items():
            sub, ctx = contexts[version]
            for spec, i in ((spec, i) for spec in sub.models for i in folds if i != j):
                first, second = sorted((i, j))
                jobs.setdefault((version, spec.name, first, second), Job(spec, first, ctx, (second,)))
        try:
            run_jobs(list(jobs.values()), zoo.source or f"zoo {zoo.name}", progress, max_concurrent,
                     desc=f"CRA {zoo.name}")
        except BaseException:
            for _, ctx in contexts.values():
                tracking.end_run(ctx.parent_run_id, "FAILED", ctx.tracking_uri)
            raise
        for _, ctx in contexts.values():
            tracking.end_run(ctx.parent_run_id, "FINISHED", ctx.tracking_uri)
        tables = {}
        for j, version in versions.items():
            sub, ctx = contexts[version]
            tables[j] = {}
            for spec in sub.models:
                parts = []
                for i in (i for i in folds if i != j):
                    first, second = sorted((i, j))
                    part = read_parquet(oof_uri(ctx.workdir, spec.name, first, (second,)))
                    parts.append(part[part["fold"] == i])
                tables[j][spec.name] = join(ctx.workdir, "oof", f"outer{j}", f"{spec.name}.parquet")
                write_parquet(pd.concat(parts, ignore_index=True), tables[j][spec.name])
        return tables

    return train


def _aligned_probabilities(name: str, table: pd.DataFrame | str, keys: pd.MultiIndex) -> np.ndarray:
    """A model's OOF cell probabilities in store row order; errors name the model."""
    if not isinstance(table, pd.DataFrame):
        table = read_parquet(table)
    missing = [c for c in (*KEYS, *CELL_COLUMNS) if c not in table.columns]
    if missing:
        raise ValueError(f"OOF table of {name!r} lacks column(s) {missing}")
    found = pd.MultiIndex.from_frame(table[KEYS])
    if found.has_duplicates:
        raise ValueError(f"OOF table of {name!r} lists {int(found.duplicated().sum())} cell(s) more than once")
    at = found.get_indexer(keys)
    absent, extra = int((at < 0).sum()), len(found) - int((at >= 0).sum())
    if absent or extra:
        raise ValueError(f"OOF table of {name!r} does not cover the store's cells exactly once: "
                         f"{absent} store cell(s) missing, {extra} cell(s) not in the store")
    probabilities = table[CELL_COLUMNS].to_numpy(dtype=np.float64)[at]
    if not (np.isfinite(probabilities).all() and (probabilities >= 0).all() and (probabilities <= 1).all()):
        raise ValueError(f"OOF table of {name!r} holds values outside [0, 1]")
    return probabilities


def _keys(store: CellStore, rows: np.ndarray | None) -> pd.MultiIndex:
    """The (image_id, cell_id) keys of the store's ``rows`` (every cell when None), in row order."""
    cells = store.cells[KEYS]
    return pd.MultiIndex.from_frame(cells if rows is None else cells.iloc[rows])


def _rows_without(store: CellStore, outer: int | None) -> np.ndarray:
    """Store rows of every fold but ``outer`` (every row when None)."""
    folds = store.cells["fold"].to_numpy()
    return np.arange(len(folds)) if outer is None else np.flatnonzero(folds != outer)
