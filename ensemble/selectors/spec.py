"""The result of ensemble selection: :class:`EnsembleSpec`, its JSON form, report and MLflow logging."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from ensemble.selectors.baselines import GreedyResult
from ensemble.selectors.blocks import Cut
from ensemble.selectors.fusion import FusionRule
from ensemble.storage import read_bytes, write_bytes

METHODS = ("hcpl", "hcpl_unfused", "best_single", "mean_all", "greedy")
"""Scored methods: the selected ensemble, its cell stream alone (no fusion), and the baselines."""

FORMAT_VERSION = 1


@dataclass(frozen=True)
class MethodScore:
    """mAP of one method.

    Attributes
    ----------
    in_sample : float
        Fitted and scored on all OOF rows, pooled into one ranking per class: optimistic, since
        the choices were tuned on them. Compare with ``nested_pooled``.
    in_sample_mean : float, optional
        The same predictions scored fold by fold, then averaged. Compare with ``nested_mean``.
    nested_folds : dict of int to float, optional
        Per outer fold ``f``: fitted on the other folds, scored on ``f``.
    nested_mean : float, optional
        Mean of ``nested_folds``.
    nested_pooled : float, optional
        mAP of the out-of-sample predictions of all folds pooled together.
    nested_per_class : dict of str to float, optional
        Class name -> mean over the held-out folds of the class's AP (NaN where no fold has a positive).
    """

    in_sample: float
    in_sample_mean: float | None = None
    nested_folds: dict[int, float] | None = None
    nested_mean: float | None = None
    nested_pooled: float | None = None
    nested_per_class: dict[str, float] | None = None


@dataclass(frozen=True)
class EnsembleSpec:
    """What :func:`~ensemble.selectors.select_ensemble` chose, and the evidence for it.

    :func:`~ensemble.selectors.apply_spec` needs only ``groups``, ``weights``,
    ``image_models`` and ``fusion``; the rest documents the choice.

    Attributes
    ----------
    models : list of str
        Every candidate model.
    tags : dict of str to dict
        Candidate -> ``head``, ``backbone``, ``family`` (reports only).
    correlation : DataFrame
        Pearson correlation of the candidates' cell predictions, of kind ``correlation_kind``.
    blocks : dict of str to list of str
        Block -> its models, in dendrogram order.
    block_cuts : dict of str to Cut
        Kind of model (``"image_stream"``, ``"cell_level"``, or ``"all"`` when blocks may mix
        them) -> where its dendrogram was cut and why.
    members : dict of str to str
        Block -> the member chosen from it (best OOF mAP), for the blocks kept.
    weights : dict of str to float
        Member -> weight within its aggregation group.
    aggregation : {"mean", "hierarchical"}
    groups : dict of str to list of str
        Aggregation groups: ``{"all": members}`` for ``mean``; for ``hierarchical`` the members
        with an image stream (``"image_stream"``) and the others (``"cell_level"``). The
        prediction is the mean over groups of each group's weighted mean.
    image_models : list of str
        Models whose image streams, averaged with weights (1 for non-members), form the image
        stream fused with the cell stream.
    fusion_mode : {"fit", "paper", "off"}
    rho_th : float or None
    fusion : dict of str to FusionRule
        Class name -> rule, with the correlation and APs it was decided on.
    model_map : dict of str to float
        OOF mAP of every candidate (in-sample).
    pruned : dict of str to str
        Block left out -> why (its best model did not raise the ensemble's mAP).
    correlation_kind : {"within_class", "flat"}
        See :mod:`ensemble.selectors.correlation`.
    per_class_ap : dict of str to float
        In-sample AP of the ensemble per class, under ``objective``.
    objective : {"competition", "cell"}
        The metric selection maximised (:class:`~ensemble.selectors.scoring.Objective`).
    scores : dict of str to MethodScore
        Method (:data:`METHODS`) -> its mAPs under ``objective``.
    metric_scores : dict of str to dict of str to MethodScore
        Metric -> method -> its mAPs: every metric the labels could score, the objective's too.
    greedy : GreedyResult or None
        The greedy baseline fitted on all folds.
    integrity_weighting : bool
        Whether predictions are multiplied by the cell's visual-integrity weight.
    nested_predictions : DataFrame or None
        The selection's out-of-sample predictions (``image_id, cell_id, fold, cell_0..cell_18``):
        each fold's cells as the selection fitted on the other folds predicts them, for decisions
        taken after selection (the VID weighting). Not written to JSON: None when read back.
    """

    models: list[str]
    tags: dict[str, dict[str, str]]
    correlation: pd.DataFrame
    blocks: dict[str, list[str]]
    block_cuts: dict[str, Cut]
    members: dict[str, str]
    weights: dict[str, float]
    aggregation: str
    groups: dict[str, list[str]]
    image_models: list[str]
    fusion_mode: str
    rho_th: float | None
    fusion: dict[str, FusionRule]
    model_map: dict[str, float]
    pruned: dict[str, str] = field(default_factory=dict)
    correlation_kind: str = "flat"
    per_class_ap: dict[str, float] = field(default_factory=dict)
    objective: str = "cell"
    scores: dict[str, MethodScore] = field(default_factory=dict)
    metric_scores: dict[str, dict[str, MethodScore]] = field(default_factory=dict)
    greedy: GreedyResult | None = None
    integrity_weighting: bool = False
    nested_predictions: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN becomes None)."""
        out = {"format_version": FORMAT_VERSION}
        for f in fields(self):
            if f.name == "nested_predictions":
                continue
            value = getattr(self, f.name)
            if isinstance(value, pd.DataFrame):
                value = {"models": list(value.index), "values": value.to_numpy().tolist()}
            out[f.name] = _jsonable(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EnsembleSpec:
        """Inverse of :meth:`to_dict`."""
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported ensemble spec format {data.get('format_version')!r}")
        data = {k: v for k, v in data.items() if k != "format_version"}
        corr = data["correlation"]
        data["correlation"] = pd.DataFrame(_floats(corr["values"]), index=corr["models"], columns=corr["models"])
        data["fusion"] = {k: FusionRule(**v) for k, v in data["fusion"].items()}
        data["scores"] = _method_scores(data["scores"])
        data["metric_scores"] = {metric: _method_scores(scores)
                                 for metric, scores in data.get("metric_scores", {}).items()}
        if "block_threshold" in data:  # specs written before blocks were found per kind
            data["block_cuts"] = {"all": {"models": list(data["correlation"].index), "silhouette": None,
                                          "threshold": data.pop("block_threshold"), "rule": data.pop("block_rule")}}
        data["block_cuts"] = {k: Cut(**v) for k, v in data["block_cuts"].items()}
        data["model_map"] = _floats(data["model_map"])
        data["per_class_ap"] = _floats(data["per_class_ap"])
        if data["greedy"] is not None:
            data["greedy"] = GreedyResult(**data["greedy"])
        return cls(**data)

    def to_json(self, path: str | Path) -> str | Path:
        """Write the spec as JSON to a path or URL; returns ``path``."""
        write_bytes(json.dumps(self.to_dict(), indent=2, allow_nan=False).encode(), str(path))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> EnsembleSpec:
        """Read a spec that :meth:`to_json` wrote, from a path or URL."""
        return cls.from_dict(json.loads(read_bytes(path)))

    def family_agreement(self, within_kinds: bool = True) -> float | None:
        """Adjusted Rand index of the blocks against the models' backbone families (``tags``).

        1: the blocks are exactly the families; about 0: no more alike than chance. None when
        a model has no family tag.

        Parameters
        ----------
        within_kinds : bool
            Compare with family within each kind of :attr:`block_cuts` (a DSA and a CLA of one
            family are two families), which is all blocks found per kind can be; False compares
            with family alone.
        """
        families = [self.tags.get(m, {}).get("family") for m in self.models]
        if None in families or "" in families:
            return None
        if within_kinds:
            kind_of = self.kind_of()
            families = [f"{kind_of[m]}/{family}" for m, family in zip(self.models, families, strict=True)]
        block_of = {m: b for b, models in self.blocks.items() for m in models}
        return float(adjusted_rand_score(families, [block_of[m] for m in self.models]))

    def kind_of(self) -> dict[str, str]:
        """Model -> the kind its blocks were found in (a key of :attr:`block_cuts`)."""
        return {m: kind for kind, cut in self.block_cuts.items() for m in cut.models}

    def cuts_text(self) -> str:
        """One line on how the blocks were cut, e.g.
        ``cell_level: silhouette, cut at distance 0.489 (silhouette 0.44)``."""
        return "; ".join(
            f"{kind}: {cut.rule}" + (f", cut at distance {cut.threshold:.3f}" if cut.rule in ("silhouette", "given") else "")
            + (f" (silhouette {cut.silhouette:.2f})" if cut.silhouette is not None else "")
            for kind, cut in self.block_cuts.items()
        )

    def fusion_check(self) -> tuple[int, int, int] | None:
        """Of the classes given the product rule (with positives): how many the product won and lost
        out of sample, and how many there are.

        Compares the nested held-out AP of ``hcpl`` with that of ``hcpl_unfused`` per class (a
        class too rare for the image stream to reorder its positives ties). None without nested
        scores or without a class given the product.
        """
        fused, unfused = (self.scores.get(m) for m in ("hcpl", "hcpl_unfused"))
        if fused is None or unfused is None or fused.nested_per_class is None or unfused.nested_per_class is None:
            return None
        product = [c for c, rule in self.fusion.items() if rule.rule == "product"
                   and math.isfinite(fused.nested_per_class.get(c, math.nan))]
        if not product:
            return None
        gains = [fused.nested_per_class[c] - unfused.nested_per_class[c] for c in product]
        return sum(g > 0 for g in gains), sum(g < 0 for g in gains), len(product)

    def report(self) -> str:
        """A plain-text report: members, blocks, per-class fusion rules and scores."""
        member_of = {m: b for b, m in self.members.items()}
        left_out = {max(self.blocks[b], key=self.model_map.get) for b in self.pruned}
        lines = [
            f"Ensemble of {len(self.members)} members from {len(self.models)} models in {len(self.blocks)} blocks",
            f"  blocks: {self.correlation_kind} correlation; {self.cuts_text()}",
            f"  aggregation: {self.aggregation}; fusion: {self.fusion_mode}"
            + (f", rho_th = {self.rho_th:.3f}" if self.rho_th is not None else "")
            + f"; integrity weighting: {'on' if self.integrity_weighting else 'off'}",
            "",
            "Blocks (OOF mAP; * = member, with its weight; - = best of a block left out)"
            + self._agreement_text(),
        ]
        for block, models in self.blocks.items():
            cells = [
                f"{'*' if m in member_of else '-' if m in left_out else ' '}{m} {self.model_map[m]:.4f}"
                + (f" w={self.weights[m]:.2f}" if m in member_of else "")
                + (f" [{self.tags[m]['family']}]" if self.tags.get(m, {}).get("family") else "")
                for m in models
            ]
            lines.append(f"  {block:<9} " + ", ".join(cells))
        lines += [f"  {block} left out: {why}" for block, why in self.pruned.items()]
        lines += [f"  groups: {self.groups}", f"  image stream from: {', '.join(self.image_models) or '-'}", ""]
        held_out = {m: (self.scores[m].nested_per_class or {}) if m in self.scores else {}
                    for m in ("hcpl", "hcpl_unfused")}
        lines.append(f"  {'class':<42}{'rule':<9}{'r lab':>7}{'r all':>7}{'AP prod':>9}{'AP cell':>9}{'AP ens':>9}"
                     f"{'out ens':>9}{'out cell':>9}  reason   (r lab: over images with the class, the paper's; "
                     "r all: over all cells; out: mean AP over held-out folds, nested)")
        for name, rule in self.fusion.items():
            lines.append(
                f"  {name:<42}{rule.rule:<9}{_fmt(rule.correlation_labelled, 7)}{_fmt(rule.correlation_all, 7)}"
                f"{_fmt(rule.ap_product, 9)}"
                f"{_fmt(rule.ap_cell, 9)}{_fmt(self.per_class_ap.get(name), 9)}"
                f"{_fmt(held_out['hcpl'].get(name), 9)}{_fmt(held_out['hcpl_unfused'].get(name), 9)}  {rule.reason}"
            )
        if verdict := self.fusion_check():
            won, lost, n = verdict
            lines.append(f"  out of sample (nested), of the {n} classes fused the product beat the cell stream alone "
                         f"on {won}, lost on {lost}, tied on {n - won - lost}")
        for metric, scores in (self.metric_scores or {self.objective: self.scores}).items():
            heading = f"{metric} mAP" + (" (the objective)" if metric == self.objective else "")
            lines += ["", f"  {heading:<28}{'fold mean: in-sample':>21}{'nested':>8}{'pooled: in-sample':>19}"
                          f"{'nested':>8}  nested per fold"]
            for method, score in scores.items():
                folds = " ".join(f"{v:.4f}" for v in (score.nested_folds or {}).values())
                lines.append(
                    f"  {method:<28}{_fmt(score.in_sample_mean, 21)}{_fmt(score.nested_mean, 8)}"
                    f"{_fmt(score.in_sample, 19)}{_fmt(score.nested_pooled, 8)}  {folds}"
                )
        if self.greedy is not None:
            top = sorted(self.greedy.weights.items(), key=lambda kv: -kv[1])
            lines += [
                "",
                f"  greedy ({len(self.greedy.bags)} bags, scored on {self.greedy.sample_rows} cells): "
                + ", ".join(f"{m} {w:.2f}" for m, w in top),
            ]
        return "\n".join(lines)

    def _agreement_text(self) -> str:
        if (ari := self.family_agreement()) is None:
            return ""
        if len(self.block_cuts) == 1:
            return f"; agreement with backbone families: ARI {ari:.3f}"
        return (f"; agreement with backbone families within each kind: ARI {ari:.3f} "
                f"(with family alone: {self.family_agreement(within_kinds=False):.3f})")


def log_to_mlflow(spec: EnsembleSpec, plots: Iterable[str | Path] = (), artifact_path: str = "ensemble") -> None:
    """Log the spec (``<artifact_path>/ensemble_spec.json``), the plots and the mAPs to the active run.

    Metrics, each in both forms (``_fold_mean``: mean of the folds' mAPs; ``_pooled``: one mAP
    over all folds' cells): ``map_<method>_in_sample_*`` and ``map_<method>_nested_*`` under the
    objective, the same as ``<metric>_map_<method>_*`` under each metric (``competition``,
    ``cell``); and the
    blocks' agreement with backbone families, within each kind (``blocks_family_ari``) and with
    family alone (``blocks_family_only_ari``).

    Raises
    ------
    RuntimeError
        If no MLflow run is active (so nothing lands in a run started by accident).
    """
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_to_mlflow needs an active MLflow run (mlflow.start_run())")
    mlflow.log_dict(spec.to_dict(), f"{artifact_path}/ensemble_spec.json")
    for plot in plots:
        mlflow.log_artifact(str(plot), artifact_path)
    metrics = {}
    prefixes = {"map": spec.scores} | {f"{metric}_map": scores for metric, scores in spec.metric_scores.items()}
    for prefix, scores in prefixes.items():
        for method, score in scores.items():
            metrics[f"{prefix}_{method}_in_sample_pooled"] = score.in_sample
            metrics[f"{prefix}_{method}_in_sample_fold_mean"] = score.in_sample_mean
            metrics[f"{prefix}_{method}_nested_pooled"] = score.nested_pooled
            metrics[f"{prefix}_{method}_nested_fold_mean"] = score.nested_mean
    metrics["blocks_family_ari"] = spec.family_agreement()
    metrics["blocks_family_only_ari"] = spec.family_agreement(within_kinds=False)
    mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None and math.isfinite(v)})


def _jsonable(value):
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    return value


def _floats(value):
    """None -> NaN inside nested lists/dicts of numbers (the inverse of JSON's null for NaN)."""
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return float("nan") if value is None else value


def _method_scores(data: dict) -> dict[str, MethodScore]:
    return {k: MethodScore(**{**v, "in_sample": _floats(v["in_sample"]), "nested_folds": _int_keys(v["nested_folds"]),
                              "nested_per_class": _floats(v.get("nested_per_class"))})
            for k, v in data.items()}


def _int_keys(value: dict | None) -> dict[int, float] | None:
    return None if value is None else {int(k): _floats(v) for k, v in value.items()}


def _fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None or not math.isfinite(value) else f"{value:>{width}.4f}"
