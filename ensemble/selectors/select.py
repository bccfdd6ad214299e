"""``select_ensemble``: the paper's diversity-based selection on OOF predictions, scored honestly.

Recipe (HCPL, "Robust protein localisation using diversity-based ensembling" and "Multi-stream
information fusion"): correlate the models' predictions, group them into blocks of correlated
models, keep the best model of each block, average the members (flat or hierarchically: DSA
members and cell-level members first within their kind), then per class either multiply the
image stream into the cell stream or not, depending on how well the two streams correlate.

One step is ours: a block whose best model does not raise the ensemble's mAP is left out
(``prune``). The paper chose its blocks by eye from strong, pretrained networks; a zoo trained
briefly from scratch can hold a block of models that have learnt little more than the class
priors, and averaging one of them in pulls the ensemble below its best member.

Every choice above is tuned on the OOF rows, so its in-sample mAP flatters it. With
``nested=True`` the whole recipe is refitted once per fold on the other folds and scored on the
held-out fold, and the baselines (best single model, mean of all models, Caruana's greedy
selection) are scored the same way beside it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from ensemble.labels import CLASS_NAMES
from ensemble.selectors.baselines import GreedyParams, GreedyResult, greedy_selection
from ensemble.selectors.blocks import choose_members, find_blocks
from ensemble.selectors.candidates import CandidateScores, prune_members
from ensemble.selectors.correlation import CORRELATIONS, PredictionMoments, prediction_moments
from ensemble.selectors.fusion import (FUSION_MODES, aggregate, apply_spec, decide_fusion, fuse_rows, member_weights,
                                       predict_rows)
from ensemble.oof import CELL_COLUMNS, OOFSet, Targets, align_labels
from ensemble.selectors.scoring import OBJECTIVES, Objective, _nanmean, carried_by_image
from ensemble.selectors.spec import EnsembleSpec, MethodScore

logger = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "hierarchical")


class HCPLSelector(BaseEstimator):
    """Select a diverse ensemble from out-of-fold predictions (the module docstring's recipe).

    A scikit-learn estimator: the parameters below are its whole configuration, stored as given
    and checked by :meth:`fit`; :func:`select_ensemble` is the same as a function.

    Parameters
    ----------
    correlation : {"within_class", "flat"}
        How models are correlated (:mod:`ensemble.selectors.correlation`): the mean of per-class
        correlations, or one correlation over cells x classes flattened (the paper's figure).
    threshold : float, optional
        Cut the model dendrogram at this distance (1 - correlation); by default the cut with the
        best silhouette (:func:`~ensemble.selectors.blocks.find_blocks`).
    blocks_by_kind : bool
        Find blocks among the models with an image stream (DSA) and among the cell-level models
        separately, never mixing the two kinds in one block; False clusters all models together.
    prune : bool
        Visit the blocks' best models in order of their objective score and leave one out only
        where adding it lowers the aggregated cell stream's score in every fold of the fitting
        rows (the best one is always kept). False keeps one member from every block, as the
        paper does.
    fusion : {"fit", "paper", "off"}
        Per-class image x cell fusion (:func:`~ensemble.selectors.fusion.decide_fusion`):
        ``fit`` tunes ``rho_th`` and per-class overrides on the rows with cell-level truth;
        ``paper`` applies ``correlation > rho_th`` with the paper's default; ``off`` never fuses.
    rho_th : float, optional
        Fixed correlation threshold (in ``fit``, only the overrides are then fitted).
    override_margin : float
        AP gain a class needs to override the threshold rule in ``fit``.
    weights : mapping of model name to float, optional
        Member weights; members not listed (and all, by default) weigh 1.
    aggregation : {"mean", "hierarchical"}
        ``hierarchical``: mean of the DSA members' mean and the cell-level members' mean.
    image_models : sequence of str, optional
        Models whose image streams are fused. Default: the members that have one, or else the
        best-scoring model that has one.
    objective : {"competition", "cell"}
        The metric every choice maximises (member ranking, pruning, fusion, greedy):
        ``competition`` ranks each class's cells only within the images that carry it, the OOF
        estimate of the competition's metric (:class:`~ensemble.selectors.scoring.Objective`);
        ``cell`` ranks every cell. Without cell-level truth the competition's ranking is empty
        (every cell of an image carrying a class is labelled with it), so selection falls back
        to ``cell`` with a warning. Both metrics are scored and reported.
    nested : bool
        Score every method out of sample (one refit per fold). Costs about ``n_folds`` times the
        selection itself.
    greedy : GreedyParams or bool
        Settings of the greedy baseline; True for the defaults, False to skip it.
    n_jobs : int, optional
        Threads for scoring models (``-1``: all cores).
    chunk_rows : int
        Cells per chunk when streaming the correlation.

    Attributes
    ----------
    spec_ : EnsembleSpec
        Fitted on all folds; its ``scores`` hold in-sample and, with ``nested``, out-of-sample
        scores under the objective (``metric_scores`` under each metric) of ``hcpl`` (this recipe),
        ``hcpl_unfused`` (the same members, cell stream only, which shows what fusion adds),
        ``best_single``, ``mean_all`` and ``greedy``. The baselines combine cell streams only (no
        image-stream fusion). When every fold makes the same choices as the full fit, the pooled
        out-of-sample mAP equals the in-sample one.
    scores_ : dict of str to MethodScore
        ``spec_.scores``.
    objective_ : str
        The objective used: ``objective``, or ``"cell"`` where the labels hold no cell truth.

    Examples
    --------
    >>> selector = HCPLSelector(aggregation="hierarchical").fit(oof, labels)
    >>> selector.scores_["hcpl"].nested_mean
    >>> fused = selector.predict(test_predictions)      # what serving computes
    """

    def __init__(self, *, correlation: str = "within_class", threshold: float | None = None,
                 blocks_by_kind: bool = True, prune: bool = True, fusion: str = "fit", rho_th: float | None = None,
                 override_margin: float = 0.01, weights: Mapping[str, float] | None = None,
                 aggregation: str = "mean", image_models: Sequence[str] | None = None,
                 objective: str = "competition", nested: bool = True, greedy: GreedyParams | bool = True,
                 n_jobs: int | None = None, chunk_rows: int = 8192):
        self.correlation, self.threshold, self.blocks_by_kind, self.prune = correlation, threshold, blocks_by_kind, prune
        self.fusion, self.rho_th, self.override_margin, self.weights = fusion, rho_th, override_margin, weights
        self.aggregation, self.image_models, self.objective = aggregation, image_models, objective
        self.nested, self.greedy, self.n_jobs, self.chunk_rows = nested, greedy, n_jobs, chunk_rows

    def fit(self, oof: OOFSet | Mapping[str, pd.DataFrame], labels: pd.DataFrame | np.ndarray,
            tags: Mapping[str, Mapping[str, str]] | None = None) -> HCPLSelector:
        """Select on ``oof`` against ``labels``.

        Parameters
        ----------
        oof : OOFSet or mapping of model name to OOF table
            See :mod:`ensemble.oof` for the table contract.
        labels : DataFrame or ndarray
            Cell labels (``image_id, cell_id, label_0..label_18`` [, ``fold``, ``cell_truth``]), or
            an array (n_cells, 19) in the row order of ``oof.index``.
        tags : mapping, optional
            Model metadata when ``oof`` is a mapping of tables (an OOFSet carries its own).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            On misaligned or invalid inputs (see :class:`~ensemble.oof.OOFSet`), on fusion
            asked without an image stream or, for ``fit``, without cell-level truth, and on
            ``nested`` with fewer than two folds.
        """
        oof = oof if isinstance(oof, OOFSet) else OOFSet.from_frames(oof, tags)
        targets = align_labels(labels, oof)
        _check_settings(self, oof, targets)
        greedy_params = GreedyParams() if self.greedy is True else (self.greedy or None)
        folds = oof.fold_slices()
        if self.nested and len(folds) < 2:
            raise ValueError(f"nested scoring needs at least 2 folds; the OOF has {len(folds)}")
        metrics = _objectives(targets, oof.index["image_id"].to_numpy(), oof.index["fold"].to_numpy())
        self.objective_ = self.objective
        if self.objective not in metrics:
            warnings.warn("the labels hold no cell-level truth, so the competition's ranking within images is "
                          "empty: selecting on cell mAP", stacklevel=2)
            self.objective_ = "cell"
        chosen = metrics[self.objective_]

        logger.info("streaming the correlation of %d models over %d cells", len(oof.models), oof.n_cells)
        moments = prediction_moments(oof, chunk_rows=self.chunk_rows, n_jobs=self.n_jobs)
        # A model's score on a fit's rows is the mean of its folds' (each fold is ranked apart), so
        # every model is scored once per fold here, not once per refit.
        logger.info("scoring %d models", len(oof.models))
        fold_maps = dict(zip(oof.models, chosen.map_many((oof.cell[m] for m in oof.models), self.n_jobs, by_fold=True),
                             strict=True))
        candidates = _candidates(oof, targets, chosen, self)
        # The fit on all folds and the nested refits are independent: they go to threads together
        # (their sorts and array sums release the GIL), each reading the candidates' shared scores.
        exclusions = [None, *folds] if self.nested else [None]
        fits = dict(zip(exclusions, Parallel(n_jobs=self.n_jobs, prefer="threads")(
            delayed(_refit)(oof, chosen, moments, fold_maps, fold, self, candidates, greedy_params)
            for fold in exclusions), strict=True))
        spec, _, greedy_result = fits[None]
        logger.info("predicting with each fit")
        predictions, held_out = _predictions(oof, fits, self.n_jobs)
        logger.info("scoring %d methods under %s", len(predictions), " and ".join(metrics))
        metric_scores = _method_scores(metrics, predictions, held_out, self.n_jobs)
        self.spec_ = replace(
            spec,
            objective=self.objective_,
            per_class_ap={name: float(v) for name, v in zip(CLASS_NAMES, chosen.per_class(predictions["hcpl"]),
                                                             strict=True)},
            scores=metric_scores[self.objective_],
            metric_scores=metric_scores,
            greedy=greedy_result,
            nested_predictions=None if held_out is None else oof.index.assign(
                **dict(zip(CELL_COLUMNS, held_out["hcpl"]))),
        )
        self.scores_ = self.spec_.scores
        return self

    def predict(self, predictions: OOFSet | Mapping[str, pd.DataFrame]) -> pd.DataFrame:
        """The ensemble's per-cell probabilities on new predictions (:func:`apply_spec` of ``spec_``)."""
        check_is_fitted(self, "spec_")
        return apply_spec(self.spec_, predictions)


def select_ensemble(oof: OOFSet | Mapping[str, pd.DataFrame], labels: pd.DataFrame | np.ndarray, *,
                    tags: Mapping[str, Mapping[str, str]] | None = None, **params) -> EnsembleSpec:
    """``HCPLSelector(**params).fit(oof, labels, tags).spec_``: the selection as one call.

    Parameters are those of :class:`HCPLSelector` and of its ``fit``.

    Returns
    -------
    EnsembleSpec
        ``spec_`` (see :class:`HCPLSelector`).
    """
    return HCPLSelector(**params).fit(oof, labels, tags).spec_


def _objectives(targets: Targets, image_ids: np.ndarray, folds: np.ndarray) -> dict[str, Objective]:
    """Each metric that the labels can score, bound to them and ranked within each fold.

    The competition's ranking keeps only rows with cell-level truth: where cells hold their
    image's labels, every cell of an image that carries a class is a positive of it.
    """
    metrics = {"cell": Objective.build("cell", targets.truth, image_ids, folds)}
    if targets.cell_level.any():
        competition = Objective.build("competition", targets.truth, image_ids, folds)
        metrics["competition"] = replace(competition, ranked=competition.ranked & targets.cell_level)
    return {name: metrics[name] for name in OBJECTIVES if name in metrics}


def _fit(
    oof: OOFSet,
    moments: PredictionMoments,
    fold_maps: Mapping[str, np.ndarray],
    exclude_fold: int | None,
    settings: HCPLSelector,
    candidates: CandidateScores,
) -> EnsembleSpec:
    """The whole recipe on all folds but ``exclude_fold`` (None: on all); ``fold_maps`` holds each
    model's score in each fold of the OOF, in the order of the folds' ids, and ``candidates`` the
    per-fold evidence on candidate ensembles, of which the fit reads only its own folds."""
    corr = moments.correlation(exclude_fold=exclude_fold, kind=settings.correlation)
    kind_of = None
    if settings.blocks_by_kind:  # the kinds are the hierarchical aggregation's groups
        kind_of = {m: kind for kind, models in _groups(oof.models, oof, "hierarchical").items() for m in models}
    blocks = find_blocks(corr, settings.threshold, kind_of)
    kept = candidates.kept(exclude_fold)
    model_map = {m: float(np.nanmean(fold_maps[m][kept])) for m in oof.models}
    members = choose_members(blocks, model_map)
    pruned: dict[str, str] = {}
    if settings.prune:
        members, pruned = prune_members(members, model_map, candidates, exclude_fold)
    chosen = list(members.values())
    weights = member_weights(settings.weights, chosen)
    groups = _groups(chosen, oof, settings.aggregation)

    image_models: list[str] = []
    correlation = ap_product = ap_cell = fold_gain = None
    if settings.fusion != "off":
        image_models = list(settings.image_models or [m for m in chosen if m in oof.image])
        if not image_models:  # no member has an image stream: borrow the best model that has one
            image_models = [max(oof.image, key=model_map.get)]
        evidence = candidates.fusion(chosen, image_models)
        statistics = {"all": evidence.moments_all.correlation(kept),
                      "labelled": evidence.moments_labelled.correlation(kept)}
        correlation = statistics["labelled" if settings.fusion == "paper" else "all"]
        seen = candidates.kept(exclude_fold, evidence.fold_ids)
        if seen.any():
            product_ap, cell_ap = evidence.ap_product[seen], evidence.ap_cell[seen]
            ap_product, ap_cell = _nanmean(product_ap, axis=0), _nanmean(cell_ap, axis=0)
            fold_gain = dict(zip(evidence.fold_ids[seen].tolist(), product_ap - cell_ap, strict=True))
        elif settings.fusion == "fit":
            raise ValueError(f"fusion='fit' found no cell-level truth outside fold {exclude_fold} to fit on")
    rules, rho_th = decide_fusion(
        correlation,
        mode=settings.fusion,
        rho_th=settings.rho_th,
        ap_product=ap_product,
        ap_cell=ap_cell,
        override_margin=settings.override_margin,
        fold_gain=fold_gain,
    )
    if correlation is not None:
        rules = {name: replace(rule, correlation_labelled=float(statistics["labelled"][k]),
                               correlation_all=float(statistics["all"][k]))
                 for k, (name, rule) in enumerate(rules.items())}
    return EnsembleSpec(
        models=oof.models,
        tags=oof.tags,
        correlation=corr,
        blocks=blocks.blocks,
        block_cuts=blocks.cuts,
        members=members,
        pruned=pruned,
        weights=weights,
        aggregation=settings.aggregation,
        groups=groups,
        image_models=image_models,
        fusion_mode=settings.fusion,
        rho_th=rho_th,
        fusion=rules,
        model_map=model_map,
        correlation_kind=settings.correlation,
    )


def _groups(members: Sequence[str], oof: OOFSet, aggregation: str) -> dict[str, list[str]]:
    """Aggregation groups: all members together, or (hierarchical) those with an image stream apart."""
    if aggregation == "mean":
        return {"all": list(members)}
    groups = {
        "image_stream": [m for m in members if m in oof.image],
        "cell_level": [m for m in members if m not in oof.image],
    }
    return {g: ms for g, ms in groups.items() if ms}


def _candidates(oof: OOFSet, targets: Targets, objective: Objective, settings: HCPLSelector) -> CandidateScores:
    """Per-fold evidence on the candidate ensembles that pruning and fusion try, on all rows,
    aggregated as ``settings`` say."""
    everything = slice(0, oof.n_cells)

    def cell_stream(members: tuple[str, ...]) -> np.ndarray:
        return aggregate({m: oof.cell[m] for m in members}, _groups(members, oof, settings.aggregation),
                         member_weights(settings.weights, members))

    def image_stream(models: tuple[str, ...]) -> np.ndarray:
        return aggregate({m: oof.image[m] for m in models}, {"image": list(models)},
                         member_weights(settings.weights, models))

    carried = carried_by_image(targets.truth, oof.index["image_id"].to_numpy())
    return CandidateScores(objective.on(everything), oof.fold_slices(), cell_stream, image_stream,
                           targets.cell_level, carried)


def _fit_baselines(
    oof: OOFSet,
    objective: Objective,
    spec: EnsembleSpec,
    rows: slice | np.ndarray,
    greedy_params: GreedyParams | None,
    n_jobs: int | None,
) -> tuple[dict[str, dict[str, float]], GreedyResult | None]:
    """Model weights of each baseline fitted on ``rows`` (``spec`` was fitted on the same rows)."""
    baselines = {
        "best_single": {max(spec.model_map, key=spec.model_map.get): 1.0},
        "mean_all": dict.fromkeys(oof.models, 1.0),
    }
    greedy = None
    if greedy_params is not None:
        logger.info("greedy baseline")
        rows = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        if greedy_params.sample_rows is not None and greedy_params.sample_rows < rows.size:
            rng = np.random.default_rng(greedy_params.random_state)
            rows = np.sort(rng.choice(rows, size=greedy_params.sample_rows, replace=False))
        sample = np.stack([oof.cell[m][:, rows] for m in oof.models])
        greedy = greedy_selection(sample, objective.on(rows), oof.models, greedy_params, n_jobs)
        baselines["greedy"] = greedy.weights
    return baselines, greedy


def _weighted_mean(oof: OOFSet, weights: Mapping[str, float], rows: slice | np.ndarray) -> np.ndarray:
    return aggregate({m: oof.cell[m][:, rows] for m in weights}, {"all": list(weights)}, weights)


def _refit(
    oof: OOFSet,
    objective: Objective,
    moments: PredictionMoments,
    fold_maps: Mapping[str, np.ndarray],
    exclude_fold: int | None,
    settings: HCPLSelector,
    candidates: CandidateScores,
    greedy_params: GreedyParams | None,
) -> tuple[EnsembleSpec, dict[str, dict[str, float]], GreedyResult | None]:
    """The recipe and the baselines' weights fitted on all folds but ``exclude_fold`` (None: all)."""
    rows = slice(0, oof.n_cells)
    if exclude_fold is not None:
        held = oof.fold_slices()[exclude_fold]
        rows = np.r_[0 : held.start, held.stop : oof.n_cells]
    logger.info("fitting %s", "on every fold" if exclude_fold is None else f"without fold {exclude_fold}")
    spec = _fit(oof, moments, fold_maps, exclude_fold, settings, candidates)
    return spec, *_fit_baselines(oof, objective, spec, rows, greedy_params, settings.n_jobs)


def _predictions(
    oof: OOFSet,
    fits: Mapping[int | None, tuple[EnsembleSpec, dict[str, dict[str, float]], GreedyResult | None]],
    n_jobs: int | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Per method (``hcpl``, ``hcpl_unfused``, each baseline), its predictions ``(n_classes,
    n_cells)`` as fitted on all folds (``fits[None]``) and, where ``fits`` holds the refits by the
    fold each left out, held out: each fold's cells as the method fitted on the other folds
    predicts them (else None). Computed on threads, as array sums release the GIL; each fold's
    predictions go straight into their rows, so memory holds no second copy."""
    methods = ["hcpl", "hcpl_unfused", *fits[None][1]]
    in_sample: dict[str, np.ndarray] = {}
    held_out = None
    if len(fits) > 1:
        shape = (next(iter(oof.cell.values())).shape[0], oof.n_cells)
        held_out = {method: np.empty(shape, dtype=np.float32) for method in methods}

    def predict(fold: int | None) -> None:
        spec, baselines, _ = fits[fold]
        rows = slice(0, oof.n_cells) if fold is None else oof.fold_slices()[fold]
        unfused = predict_rows(spec, oof, rows, fused=False)
        values = {"hcpl": fuse_rows(spec, oof, rows, unfused), "hcpl_unfused": unfused}
        values |= {method: _weighted_mean(oof, weights, rows) for method, weights in baselines.items()}
        if fold is None:
            in_sample.update(values)
            return
        for method, prediction in values.items():
            held_out[method][:, rows] = prediction

    Parallel(n_jobs=n_jobs, prefer="threads")(delayed(predict)(fold) for fold in fits)
    return in_sample, held_out


def _method_scores(metrics: Mapping[str, Objective], predictions: Mapping[str, np.ndarray],
                   held_out: Mapping[str, np.ndarray] | None,
                   n_jobs: int | None) -> dict[str, dict[str, MethodScore]]:
    """Under each metric (ranked within each fold), each method's in-sample and (with
    ``held_out``) nested scores, on threads.

    Fold-wise means are the honest figures. Pooling the folds' predictions into one ranking also
    measures whether their scales agree, which fused predictions need not: a class fused in one
    refit and not in another mixes products with plain probabilities.
    """
    fold_ids = {name: np.unique(metric.folds).tolist() for name, metric in metrics.items()}
    pooled = {name: metric.pooled() for name, metric in metrics.items()}

    def score(name: str, method: str) -> MethodScore:
        metric, nested = metrics[name], {}
        if held_out is not None:
            fold_ap = metric.per_fold_and_class(held_out[method])
            by_fold = _nanmean(fold_ap, axis=1)
            nested = {
                "nested_folds": dict(zip(fold_ids[name], map(float, by_fold), strict=True)),
                "nested_mean": float(_nanmean(by_fold)),
                "nested_pooled": pooled[name].map(held_out[method]),
                "nested_per_class": dict(zip(CLASS_NAMES, map(float, _nanmean(fold_ap, axis=0)), strict=True)),
            }
        return MethodScore(in_sample=pooled[name].map(predictions[method]),
                           in_sample_mean=metric.map(predictions[method]), **nested)

    pairs = [(name, method) for name in metrics for method in predictions]
    scores = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(score)(*pair) for pair in pairs)
    by_metric: dict[str, dict[str, MethodScore]] = {name: {} for name in metrics}
    for (name, method), result in zip(pairs, scores, strict=True):
        by_metric[name][method] = result
    return by_metric


def _check_settings(settings: HCPLSelector, oof: OOFSet, targets: Targets) -> None:
    if settings.fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {FUSION_MODES}; got {settings.fusion!r}")
    if settings.correlation not in CORRELATIONS:
        raise ValueError(f"correlation must be one of {CORRELATIONS}; got {settings.correlation!r}")
    if settings.aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {settings.aggregation!r}")
    if settings.rho_th is not None and not -1.0 <= settings.rho_th <= 1.0:
        raise ValueError(f"rho_th is a correlation in [-1, 1]; got {settings.rho_th}")
    if settings.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {settings.objective!r}")
    if settings.override_margin < 0:
        raise ValueError(f"override_margin must be >= 0; got {settings.override_margin}")
    weights = settings.weights or {}
    unknown = [m for m in weights if m not in oof.cell]
    if unknown or any(w <= 0 for w in weights.values()):
        raise ValueError(f"weights must be positive and name known models; unknown: {unknown}")
    if not targets.truth.any():
        raise ValueError("labels have no positive cell in any class")
    if settings.fusion == "off":
        return
    if settings.image_models is not None:
        for m in settings.image_models:
            if m not in oof.cell:
                raise ValueError(f"image_models: unknown model {m!r}")
            if m not in oof.image:
                raise ValueError(f"image_models: model {m!r} has no image stream (image_0..image_18 columns)")
    if not oof.image:
        raise ValueError(
            f"fusion={settings.fusion!r} needs a model with an image stream (a DSA head's image_0..image_18 columns); "
            f"none of the {len(oof.models)} models has one. Use fusion='off'."
        )
    if settings.fusion == "fit" and not targets.cell_level.any():
        raise ValueError(
            "fusion='fit' needs rows with cell-level truth (labels' cell_truth column); none has. "
            "Use fusion='paper' for the paper's fixed threshold."
        )
