"""Blocks of strongly correlated models, and one member per block.

The paper (Fig. 4b) sees a block-diagonal correlation matrix, one block per architecture family,
and keeps the best model of each block. Here the blocks are found from the predictions alone:
average-linkage hierarchical clustering on the distance ``1 - correlation``, cut automatically
(or at a given distance).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import silhouette_score


@dataclass(frozen=True)
class Blocks:
    """A partition of the models into blocks.

    Attributes
    ----------
    blocks : dict of str to list of str
        ``"block_0"``, ``"block_1"``, ... -> models, numbered and ordered as the dendrogram's
        leaves, so that blocks are contiguous in a heatmap drawn in that order.
    threshold : float
        Distance (1 - correlation) at which the dendrogram was cut.
    rule : str
        How the cut was chosen: ``"silhouette"``, ``"given"``, or why there was no cut.
    silhouette : float or None
        Mean silhouette of the partition (None when it is undefined: 1 block or all singletons).
    """

    blocks: dict[str, list[str]]
    threshold: float
    rule: str
    silhouette: float | None

    def block_of(self) -> dict[str, str]:
        """Model -> its block."""
        return {m: b for b, models in self.blocks.items() for m in models}


def model_linkage(corr: pd.DataFrame) -> np.ndarray:
    """Average-linkage tree of the models on the distance ``1 - correlation`` (scipy's format)."""
    return linkage(squareform(_distance(corr), checks=False), method="average")


def find_blocks(corr: pd.DataFrame, threshold: float | None = None) -> Blocks:
    """Cluster models into blocks of mutually correlated predictions.

    Rule for the automatic cut: among the cuts of the average-linkage dendrogram that give
    between 2 and ``n_models - 1`` blocks, take the one whose partition has the highest mean
    silhouette (``sklearn.metrics.silhouette_score`` on the precomputed distances); a tie goes to
    fewer blocks. The silhouette compares each model's mean distance to its own block with its
    distance to the nearest other block, so it rewards exactly the block-diagonal pattern the
    paper describes and, unlike the largest gap in merge heights, is not fooled when families
    themselves group into super-families. The cut is placed halfway between the two merge heights
    it separates. When no such cut exists (fewer than 3 models, or all merges at one height) every
    model is its own block.

    Parameters
    ----------
    corr : DataFrame
        Square correlation matrix with model names as index and columns.
    threshold : float, optional
        Cut at this distance (1 - correlation) instead: models joined below it share a block.

    Returns
    -------
    Blocks
    """
    models = list(corr.index)
    if list(corr.columns) != models:
        raise ValueError("correlation matrix must have the same models, in the same order, as index and columns")
    if threshold is not None and not 0.0 <= threshold <= 2.0:
        raise ValueError(f"threshold is a distance 1 - correlation in [0, 2]; got {threshold}")
    singletons = np.arange(len(models))
    if len(models) == 1:
        return _blocks(models, singletons, singletons, 0.0, "single model", None)
    tree = model_linkage(corr)
    order = leaves_list(tree)
    distance = _distance(corr)
    if threshold is not None:
        labels = fcluster(tree, t=threshold, criterion="distance")
        return _blocks(models, labels, order, threshold, "given", _silhouette(distance, labels))
    best = None
    heights = np.unique(tree[:, 2])
    for t in (heights[:-1] + heights[1:]) / 2:  # from many blocks to few; ">=" lets ties go to fewer
        labels = fcluster(tree, t=t, criterion="distance")
        score = _silhouette(distance, labels)
        if score is not None and (best is None or score >= best[0]):
            best = (score, t, labels)
    if best is None:
        return _blocks(models, singletons, order, 0.0, "no scorable cut: every model is its own block", None)
    score, t, labels = best
    return _blocks(models, labels, order, float(t), "silhouette", score)


def choose_members(blocks: Blocks, model_map: Mapping[str, float]) -> dict[str, str]:
    """Block -> its model with the highest OOF mAP (the first in block order on a tie)."""
    return {b: max(models, key=lambda m: model_map[m]) for b, models in blocks.blocks.items()}


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


def _blocks(models, labels, order, threshold, rule, silhouette) -> Blocks:
    """Number blocks by their first model in dendrogram-leaf order and list models in that order."""
    blocks: dict[int, list[str]] = {}
    for i in order:
        blocks.setdefault(labels[i], []).append(models[i])
    named = {f"block_{j}": members for j, members in enumerate(blocks.values())}
    return Blocks(blocks=named, threshold=float(threshold), rule=rule, silhouette=silhouette)
