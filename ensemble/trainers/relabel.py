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
round two. :func:`cra_rounds` runs the rounds around any function that trains DSA models on a
label version and returns their OOF tables; :func:`zoo_trainer` makes that function from a zoo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ensemble.data.store import CellStore, evaluation_labels
from ensemble.labels import NUM_CLASSES
from ensemble.metrics import cell_map
from ensemble.oof import CELL_COLUMNS, KEYS
from ensemble.storage import join, read_parquet
from ensemble.zoo import Zoo

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
    """One CRA round of :func:`cra_rounds`.

    Attributes
    ----------
    round : int
        1-based round number.
    trained_on : str
        Label version the round's models were trained on.
    trained_on_quality : float
        :func:`label_quality` of ``trained_on`` (NaN without cell truth): the baseline the round
        is measured against.
    version : str
        Label version the round wrote.
    quality : float
        :func:`label_quality` of ``version`` (NaN without cell truth).
    model_map : dict of str to float
        OOF cell mAP of each model of the round, against cell truth when known (else image labels).
    oof : dict of str to str
        The models' OOF tables, as returned by the training function.
    """

    round: int
    trained_on: str
    trained_on_quality: float
    version: str
    quality: float
    model_map: dict[str, float]
    oof: dict[str, str]


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


def combined_confidence(store: CellStore | str, oof_tables: OofTables) -> np.ndarray:
    """Mean over models of the OOF cell-stream probabilities, in store row order.

    Parameters
    ----------
    store : CellStore or str
    oof_tables : mapping of model name to DataFrame or parquet URI
        OOF tables with ``image_id, cell_id, cell_0..cell_18``; each must list every cell of the
        store exactly once.

    Returns
    -------
    ndarray of float32, shape (n_cells, 19)
    """
    store = _open(store)
    if not oof_tables:
        raise ValueError("oof_tables is empty: give the OOF tables of at least one model")
    keys = pd.MultiIndex.from_frame(store.cells[KEYS])
    total = np.zeros((len(store), NUM_CLASSES), dtype=np.float64)
    for name, table in oof_tables.items():
        total += _aligned_probabilities(name, table, keys)
    return (total / len(oof_tables)).astype(np.float32)


def relabel(store: CellStore | str, oof_tables: OofTables, beta: float = DEFAULT_BETA,
            version: str = "cra1") -> RelabelResult:
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

    Returns
    -------
    RelabelResult
    """
    store = _open(store)
    soft = power_normalise(combined_confidence(store, oof_tables), beta)
    # Only the image's own classes survive: relabelling removes weak labels, it never adds one.
    labels = soft * store.labels("weak")
    store.write_labels(version, labels)
    quality = label_quality(store, version) if "truth" in store.label_versions() else float("nan")
    return RelabelResult(version=version, models=tuple(oof_tables), beta=float(beta), quality=quality, labels=labels)


def label_quality(store: CellStore | str, version: str) -> float:
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

    Returns
    -------
    float
    """
    store = _open(store)
    truth = store.labels("truth")  # KeyError when the store has no truth
    known = ~np.isnan(truth).any(axis=1)
    return cell_map(truth[known], store.labels(version)[known]).map


def cra_rounds(store: CellStore | str, train_dsas: Callable[[str], Mapping[str, str]], rounds: int = 2,
               beta: float = DEFAULT_BETA, start: str = "weak", prefix: str = "cra") -> list[RoundResult]:
    """Run CRA for several rounds: train on the current labels, re-label, repeat.

    Parameters
    ----------
    store : CellStore or str
    train_dsas : callable
        ``train_dsas(label_version) -> {model name: OOF table URI}``: trains the DSA models on
        that label version (``TrainSettings.labels``) and returns their OOF tables, e.g.
        :func:`zoo_trainer`.
    rounds : int
        Rounds (the paper: 2). The last round's version is what the final models train on.
    beta : float
        Power-normalisation exponent (:func:`relabel`).
    start : str
        Label version of the first round's training.
    prefix : str
        Round r writes version ``f"{prefix}{r}"``.

    Returns
    -------
    list of RoundResult
        One per round; ``[-1].version`` is the final label version.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    store = _open(store)
    if start not in store.label_versions():
        raise KeyError(f"label version {start!r} not in {store.uri}; have {store.label_versions()}")
    # Each round's baseline is the previous round's result; only the start's is measured here.
    quality = label_quality(store, start) if "truth" in store.label_versions() else float("nan")
    results, current = [], start
    for r in range(1, rounds + 1):
        oof = dict(train_dsas(current))
        result = relabel(store, oof, beta=beta, version=f"{prefix}{r}")
        results.append(RoundResult(round=r, trained_on=current, trained_on_quality=quality, version=result.version,
                                   quality=result.quality, model_map=oof_maps(store, oof), oof=oof))
        current, quality = result.version, result.quality
    return results


def oof_maps(store: CellStore | str, oof_tables: OofTables) -> dict[str, float]:
    """OOF cell mAP of each model, against :func:`~ensemble.data.store.evaluation_labels`."""
    store = _open(store)
    labels, _ = evaluation_labels(store)
    keys = pd.MultiIndex.from_frame(store.cells[KEYS])
    return {name: cell_map(labels, _aligned_probabilities(name, table, keys)).map
            for name, table in oof_tables.items()}


def relabelled_zoo(zoo: Zoo, version: str, heads: tuple[str, ...] = ("dsa",)) -> Zoo:
    """The zoo's models of the given heads, set to train on a label version, as zoo ``{name}-{version}``.

    The new name keeps each round's MLflow runs apart from the others' and from the final zoo's.
    """
    models = tuple(dataclasses.replace(m, train=dataclasses.replace(m.train, labels=version))
                   for m in zoo.models if m.head in heads)
    if not models:
        raise ValueError(f"zoo {zoo.name!r} has no model with head in {heads}")
    return dataclasses.replace(zoo, name=f"{zoo.name}-{version}", models=models)


def zoo_trainer(zoo: Zoo, store_uri: str, workdir: str, heads: tuple[str, ...] = ("dsa",),
                **train_zoo_kwargs) -> Callable[[str], dict[str, str]]:
    """A ``train_dsas`` for :func:`cra_rounds`: trains a zoo's models on a given label version.

    Each label version trains as :func:`relabelled_zoo` in its own ``{workdir}/labels-{version}``,
    so rounds do not resume each other's Ray checkpoints; a re-run skips finished jobs
    (``train_zoo`` is resumable).

    Parameters
    ----------
    zoo : Zoo
    store_uri : str
    workdir : str
    heads : tuple of str
        Heads of the zoo to train (the paper re-labels with DSAs only).
    **train_zoo_kwargs
        Passed to :func:`ensemble.trainers.zoo.train_zoo` (``tracking_uri``, ``experiment``, ...).
    """
    # Imported late: train_all (zoo.py) calls into this module, and a top-level import would be a cycle.
    from ensemble.trainers.zoo import train_zoo

    relabelled_zoo(zoo, "weak", heads)  # fail now, not after a round of training, if no model fits

    def train(version: str) -> dict[str, str]:
        return train_zoo(relabelled_zoo(zoo, version, heads), store_uri, join(workdir, f"labels-{version}"),
                         **train_zoo_kwargs).oof

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


def _open(store: CellStore | str) -> CellStore:
    return store if isinstance(store, CellStore) else CellStore(store)
