"""VID module (i): an XGBoost classifier of good and bad cells on the eight morphology features."""

from __future__ import annotations

from xgboost import XGBClassifier

# Small trees and shrunken steps: eight features and a few thousand cells need no more.
DEFAULT_PARAMS = {"n_estimators": 200, "max_depth": 4, "learning_rate": 0.05, "subsample": 0.8}


def morphology_classifier(seed: int = 0, n_jobs: int = 1, **params) -> XGBClassifier:
    """An unfitted ``XGBClassifier`` with :data:`DEFAULT_PARAMS`, overridden by ``params``.

    ``n_jobs`` defaults to 1: the classifier is small and usually trains beside other jobs.
    """
    return XGBClassifier(**{**DEFAULT_PARAMS, **params}, objective="binary:logistic", eval_metric="logloss",
                         random_state=seed, n_jobs=n_jobs)
