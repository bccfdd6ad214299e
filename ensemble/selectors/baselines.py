"""Greedy forward selection with replacement (Caruana et al., ICML 2004), the standard baseline.

Caruana's recipe: start from the best ``n_init`` models (sorted initialisation), then repeatedly
add - with replacement, so a model can gain weight - the model that most improves the ensemble's
score, until no addition improves it or the ensemble reaches ``max_size``. Bagging: run this on
``n_bags`` random subsets of the models (a fraction ``bag_fraction`` each) and average the bags'
weights, which damps the hill-climb's overfitting to the selection rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from joblib import Parallel, delayed

from ensemble.selectors.scoring import Objective


@dataclass(frozen=True)
class GreedyParams:
    """Settings of :func:`greedy_selection`.

    Attributes
    ----------
    n_init : int
        Sorted initialisation: each bag starts from its ``n_init`` best models.
    max_size : int
        Most models (counting repeats) in one bag's ensemble.
    n_bags : int
    bag_fraction : float
        Fraction of the models drawn (without replacement) into each bag.
    sample_rows : int or None
        Hill-climbing scores every candidate at every step (``n_models x steps x bags`` mAPs), so
        candidates are scored on a fixed random sample of this many cells, not on all of them;
        ``None`` uses all. Caruana et al. hill-climbed on 5,000 points; 20,000 cells still hold
        about 100 positives of a class with 0.5% prevalence, and bagging averages out the rest.
    random_state : int
    """

    n_init: int = 3
    max_size: int = 25
    n_bags: int = 10
    bag_fraction: float = 0.5
    sample_rows: int | None = 20_000
    random_state: int = 0

    def __post_init__(self):
        if self.n_init < 1 or self.max_size < self.n_init or self.n_bags < 1:
            raise ValueError(f"need 1 <= n_init <= max_size and n_bags >= 1; got {self}")
        if not 0.0 < self.bag_fraction <= 1.0:
            raise ValueError(f"bag_fraction must be in (0, 1]; got {self.bag_fraction}")
        if self.sample_rows is not None and self.sample_rows < 1:
            raise ValueError(f"sample_rows must be positive or None; got {self.sample_rows}")


@dataclass(frozen=True)
class GreedyResult:
    """Outcome of :func:`greedy_selection`.

    Attributes
    ----------
    weights : dict of str to float
        Model -> weight (mean over bags of its share of the bag's picks); sums to 1.
    bags : list of dict of str to int
        Per bag, model -> times picked.
    history : list of list of float
        Per bag, the selection-sample mAP after the initialisation and after each addition.
    sample_rows : int
        Cells the candidates were scored on.
    """

    weights: dict[str, float]
    bags: list[dict[str, int]]
    history: list[list[float]]
    sample_rows: int


def greedy_selection(
    predictions: np.ndarray,
    objective: Objective,
    models: list[str],
    params: GreedyParams | None = None,
    n_jobs: int | None = None,
) -> GreedyResult:
    """Caruana's bagged greedy forward selection with replacement.

    Parameters
    ----------
    predictions : ndarray, shape (n_models, n_classes, n_cells)
        The models' predictions on the selection rows (already sampled; see
        :attr:`GreedyParams.sample_rows`).
    objective : Objective
        The score hill-climbed, on the same ``n_cells`` rows.
    models : list of str
        Names of the ``n_models`` rows of ``predictions``.
    params : GreedyParams, optional
        Defaults to ``GreedyParams()``.
    n_jobs : int, optional
        Threads to climb the bags on (each bag's climb is the same on any number of threads).

    Returns
    -------
    GreedyResult
    """
    params = params or GreedyParams()
    if predictions.shape[0] != len(models):
        raise ValueError(f"{predictions.shape[0]} predictions for {len(models)} model names")
    rng = np.random.default_rng(params.random_state)
    # AP reads only each class's ranked cells (all cells, or for the competition's objective
    # those of the images carrying the class); hill-climbing adds those alone, gathered once.
    predictions = np.stack([objective.ranked_values(p) for p in predictions])
    single = objective.map_many(predictions, n_jobs)
    bag_size = max(1, round(params.bag_fraction * len(models)))
    bags = [np.sort(rng.choice(len(models), size=bag_size, replace=False)) for _ in range(params.n_bags)]

    def climb(bag: np.ndarray) -> tuple[np.ndarray, list[float]]:
        count = np.zeros(len(models), dtype=np.int64)
        start = bag[np.argsort(-single[bag], kind="stable")[: params.n_init]]
        count[start] += 1
        # AP is invariant to scaling the scores, so the running sum ranks cells exactly as the
        # running mean would; adding one model's predictions is the whole cost of a candidate.
        running = predictions[start].sum(axis=0, dtype=np.float32)
        scores = [objective.map(running)]
        while count.sum() < params.max_size:
            gains = [objective.map(running + predictions[j]) for j in bag]
            best = int(np.argmax(gains))
            if gains[best] <= scores[-1]:
                break
            count[bag[best]] += 1
            running += predictions[bag[best]]
            scores.append(float(gains[best]))
        return count, scores

    # Bags, not a step's candidates, go to the threads: a candidate is a few milliseconds of
    # sorting, too little to hand to a thread one at a time.
    counts, history = zip(*Parallel(n_jobs=n_jobs, prefer="threads")(delayed(climb)(bag) for bag in bags), strict=True)
    shares = np.mean([c / c.sum() for c in counts], axis=0)
    return GreedyResult(
        weights={m: float(w) for m, w in zip(models, shares, strict=True) if w > 0},
        bags=[{m: int(c) for m, c in zip(models, count, strict=True) if c > 0} for count in counts],
        history=list(history),
        sample_rows=int(objective.truth.shape[1]),
    )
