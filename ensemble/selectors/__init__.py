"""Ensemble selection on out-of-fold predictions (HCPL's diversity-based ensembling).

Typical use::

    from ensemble.selectors import load_oof_dir, select_ensemble, plot_correlation, log_to_mlflow

    oof = load_oof_dir("oof/")
    spec = select_ensemble(oof, labels, aggregation="hierarchical")
    print(spec.report())
    spec.to_json("ensemble_spec.json")
"""

from ensemble.selectors.baselines import GreedyParams, GreedyResult, greedy_selection
from ensemble.selectors.blocks import Blocks, Cut, choose_members, find_blocks
from ensemble.selectors.correlation import PredictionMoments, correlation_matrix, prediction_moments
from ensemble.selectors.fusion import PAPER_RHO_TH, FusionRule, apply_spec, decide_fusion, stream_correlation
from ensemble.oof import OOFSet, Targets, align_labels, load_oof_dir, load_oof_mlflow
from ensemble.selectors.plots import plot_correlation
from ensemble.selectors.scoring import OBJECTIVES, Objective, average_precision, mean_average_precision
from ensemble.selectors.select import HCPLSelector, select_ensemble
from ensemble.selectors.spec import EnsembleSpec, MethodScore, log_to_mlflow

__all__ = [
    "OBJECTIVES",
    "PAPER_RHO_TH",
    "Blocks",
    "Cut",
    "EnsembleSpec",
    "FusionRule",
    "GreedyParams",
    "GreedyResult",
    "HCPLSelector",
    "MethodScore",
    "OOFSet",
    "Objective",
    "PredictionMoments",
    "Targets",
    "align_labels",
    "apply_spec",
    "average_precision",
    "choose_members",
    "correlation_matrix",
    "decide_fusion",
    "find_blocks",
    "greedy_selection",
    "load_oof_dir",
    "load_oof_mlflow",
    "log_to_mlflow",
    "mean_average_precision",
    "plot_correlation",
    "prediction_moments",
    "select_ensemble",
    "stream_correlation",
]
