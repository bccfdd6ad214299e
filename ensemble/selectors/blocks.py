"""Blocks of strongly correlated models, and one member per block.

The paper (Fig. 4b) sees a block-diagonal correlation matrix, one block per architecture family,
and keeps the best model of each block. Here the blocks are found from the predictions alone:
average-linkage hierarchical clustering on the distance ``1 - correlation``, cut automatically
(or at a given distance).

Models can be split into kinds first (by default DSA models, which have an image stream, and
cell-level models), each clustered on its own. A DSA and a CLA of one backbone learn from
different inputs and labels and correlate less with each other than with other backbones of
their own head; the paper's system (Fig. 4c) likewise keeps DSA and cell-level networks of one
family side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import silhouette_score

NO_STRUCTURE = 0.25
"""Kaufman & Rousseeuw (1990, p. 88): a mean silhouette of 0.25 or less finds no substantial
structure, so no cut is kept and every model is its own block."""


@dataclass(frozen=True)
class Cut:
    """Where one kind's dendrogram was cut, and why.

    Attributes
    ----------
    models : list of str
        The kind's models.
    threshold : float
        Distance (1 - correlation) at which its dendrogram was cut.
    rule : str
        How the cut was chosen: ``"silhouette"``, ``"given"``, or why there was no cut.
    silhouette : float or None
        Mean silhouette of the kind's partition (None when undefined: 1 block or all singletons).
    """

    models: list[str]
    threshold: float
    rule: str
    silhouette: float | None


@dataclass(frozen=True)
class Blocks:
    """A partition of the models into blocks.

    Attributes
    ----------
    blocks : dict of str to list of str
        ``"block_0"``, ``"block_1"``, ... -> models, numbered and ordered as the leaves of
        :func:`model_linkage`, so that blocks are contiguous in a heatmap drawn in that order.
    cuts : dict of str to Cut
        Kind -> how its models were cut into blocks (``{"all": ...}`` when kinds are not split).
    """

    blocks: dict[str, list[str]]
    cuts: dict[str, Cut]

    def block_of(self) -> dict[str, str]:
        """Model -> its block."""
        return {m: b for b, models in self.blocks.items() for m in models}


def model_linkage(corr: pd.DataFrame, kind_of: Mapping[str, str] | None = None) -> np.ndarray:
    """Average-linkage tree of the models on the distance ``1 - correlation`` (scipy's format).

    With ``kind_of`` (model -> kind), models of different kinds are 3 further apart, above any
    distance within a kind (at most 2): each kind's subtree is then exactly its own clustering,
    and the kinds join only at the top.
    """
    distance = _distance(corr)
    if kind_of is not None:
        kinds = np.array([kind_of[m] for m in corr.index])
        distance = distance + 3.0 * (kinds[:, None] != kinds[None, :])
    return linkage(squareform(distance, checks=False), method="average")


def find_blocks(corr: pd.DataFrame, threshold: float | None = None,
                kind_of: Mapping[str, str] | None = None) -> Blocks:
    """Cluster models into blocks of mutually correlated predictions.

    Rule for the automatic cut, per kind: among the cuts of the average-linkage dendrogram that
    give between 2 and ``n_models - 1`` blocks, take the one whose partition has the highest mean
    silhouette (``sklearn.metrics.silhouette_score`` on the precomputed distances); a tie goes to
    fewer blocks. The silhouette compares each model's mean distance to its own block with its
    distance to the nearest other block, so it rewards exactly the block-diagonal pattern the
    paper describes and, unlike the largest gap in merge heights, is not fooled when families
    themselves group into super-families. The cut is placed halfway between the two merge heights
    it separates. When no cut scores above :data:`NO_STRUCTURE`, or none exists (fewer than 3
    models, all merges at one height), every model is its own block.

    Parameters
    ----------
    corr : DataFrame
        Square correlation matrix with model names as index and columns.
    threshold : float, optional
        Cut at this distance (1 - correlation) instead: models joined below it share a block.
    kind_of : mapping of str to str, optional
        Model -> kind; blocks are found within each kind, never across. Default: one kind.

    Returns
    -------
    Blocks
    """
    models = list(corr.index)
    if list(corr.columns) != models:
        raise ValueError("correlation matrix must have the same models, in the same order, as index and columns")
    if threshold is not None and not 0.0 <= threshold <= 2.0:
        raise ValueError(f"threshold is a distance 1 - correlation in [0, 2]; got {threshold}")
    kind_of = {m: "all" for m in models} if kind_of is None else dict(kind_of)
    if absent := [m for m in models if m not in kind_of]:
        raise ValueError(f"kind_of has no kind for models {absent}")
    order = [models[i] for i in leaves_list(model_linkage(corr, kind_of))] if len(models) > 1 else models
    kinds = list(dict.fromkeys(kind_of[m] for m in order))
    label_of: dict[str, tuple[str, int]] = {}
    cuts = {}
    for kind in kinds:
        members = [m for m in models if kind_of[m] == kind]
        labels, cuts[kind] = _cut(corr.loc[members, members], threshold)
        label_of |= {m: (kind, int(label)) for m, label in zip(members, labels, strict=True)}
    blocks: dict[tuple[str, int], list[str]] = {}
    for m in order:  # numbered by their first model in leaf order
        blocks.setdefault(label_of[m], []).append(m)
    return Blocks(blocks={f"block_{j}": ms for j, ms in enumerate(blocks.values())}, cuts=cuts)


def choose_members(blocks: Blocks, model_map: Mapping[str, float]) -> dict[str, str]:
    """Block -> its model with the highest OOF mAP (the first in block order on a tie)."""
    return {b: max(models, key=lambda m: model_map[m]) for b, models in blocks.blocks.items()}


def _cut(corr: pd.DataFrame, threshold: float | None) -> tuple[np.ndarray, Cut]:
    """Block labels of one kind's models, and how they were cut."""
    models = list(corr.index)
    singletons = np.arange(len(models))
    if len(models) == 1:
        return singletons, Cut(models, 0.0, "single model", None)
    tree = model_linkage(corr)
    distance = _distance(corr)
    if threshold is not None:
        labels = fcluster(tree, t=threshold, criterion="distance")
        return labels, Cut(models, threshold, "given", _silhouette(distance, labels))
    best = None
    heights = np.unique(tree[:, 2])
    for t in (heights[:-1] + heights[1:]) / 2:  # from many blocks to few; ">=" lets ties go to fewer
        labels = fcluster(tree, t=t, criterion="distance")
        score = _silhouette(distance, labels)
        if score is not None and (best is None or score >= best[0]):
            best = (score, t, labels)
    if best is None:
        why = "2 models, no cut to score" if len(models) == 2 else "no scorable cut"
        return singletons, Cut(models, 0.0, f"{why}: every model is its own block", None)
    score, t, labels = best
    if score <= NO_STRUCTURE:
        rule = f"no structure (best silhouette {score:.2f} <= {NO_STRUCTURE}): every model is its own block"
        return singletons, Cut(models, 0.0, rule, None)
    return labels, Cut(models, float(t), "silhouette", score)


def _distance(corr: pd.DataFrame) -> np.ndarray:
    """Symmetric distance matrix ``1 - correlation`` with a zero diagonal."""
    distance = 1.0 - corr.to_numpy(dtype=np.float64)
    distance = np.clip((distance + distance.T) / 2, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def _silhouette(distance: np.ndarray, labels: np.ndarray) -> float | None:
    n_blocks = len(np.unique(labels))
    if not 2 <= n_blocks <= len(labels) - 1:
        return None
    return float(silhouette_score(distance, labels, metric="precomputed"))
