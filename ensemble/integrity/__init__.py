"""VID, the Visual Integrity Detector: morphology features + XGBoost, and a capture-ratio CNN.

    model = IntegrityModel().fit(store)          # simulator truth, or labels_csv= hand labels
    model.save(path)
    load_integrity(path).weights(cells_table, crops)   # (n,) float32 in [0, 1]
"""

from ensemble.integrity.capture import CAPTURE_CLASSES, BorderCutDataset, CaptureNet, border_cut, capture_class
from ensemble.integrity.features import feature_matrix, integrity_targets, read_good_csv, simulated_good, whole_cells
from ensemble.integrity.model import (RULES, IntegrityCV, IntegrityModel, cross_validate_integrity, integrity_weight,
                                      load_integrity)
from ensemble.integrity.xgb import morphology_classifier

__all__ = [
    "CAPTURE_CLASSES",
    "RULES",
    "BorderCutDataset",
    "CaptureNet",
    "IntegrityCV",
    "IntegrityModel",
    "border_cut",
    "capture_class",
    "cross_validate_integrity",
    "feature_matrix",
    "integrity_targets",
    "integrity_weight",
    "load_integrity",
    "morphology_classifier",
    "read_good_csv",
    "simulated_good",
    "whole_cells",
]
