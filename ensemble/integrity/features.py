"""What VID learns from: the morphology features of a cell, and which cells are good or bad.

The features are the paper's eight, computed when the cell store is built
(:data:`ensemble.data.features.VID_FEATURES`). The good/bad targets come from one of two sources:

- the simulator's truth: a cell is bad when less than half of a true cell is captured in it (cut
  by the image border, or split by the segmentation: ``truth_captured < 0.5``) or when it matches
  no true cell (``truth_iou < 0.5``: a merge, a fragment or debris);
- on real data, a hand-labelled CSV ``image_id, cell_id, good`` (the paper's 10K labelled cells).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from ensemble.data.crops import TRUTH_IOU
from ensemble.data.store import CellStore
from ensemble.data.features import VID_FEATURES
from ensemble.storage import read_bytes

# "For a meaningful prediction, at least 50 % of a cell has to be captured" (paper, after [16]).
MIN_CAPTURED = 0.5
# Cells the capture-ratio network may cut: whole by the truth, up to segmentation jitter.
WHOLE_CAPTURED = 0.95


def feature_matrix(cells: pd.DataFrame) -> np.ndarray:
    """The eight VID features of each cell as an (n, 8) float32 matrix, in VID_FEATURES order."""
    missing = [name for name in VID_FEATURES if name not in cells.columns]
    if missing:
        raise KeyError(f"cell table lacks the VID feature column(s) {missing}")
    return cells[list(VID_FEATURES)].to_numpy(dtype=np.float32)


def simulated_good(cells: pd.DataFrame, min_captured: float = MIN_CAPTURED) -> np.ndarray:
    """Good (True) or bad (False) per cell from the simulator's truth columns.

    Parameters
    ----------
    cells : DataFrame
        With ``truth_iou`` and ``truth_captured`` (a store built from a dataset with ``truth/``).
    min_captured : float
        Least share of the true cell captured by the segmented cell.
    """
    if not {"truth_iou", "truth_captured"} <= set(cells.columns):
        raise KeyError("cell table has no truth_iou/truth_captured: its dataset had no truth/; "
                       "give hand labels (labels_csv) instead")
    matched = cells["truth_iou"].to_numpy() >= TRUTH_IOU  # NaN compares False: unmatched
    return matched & (cells["truth_captured"].to_numpy() >= min_captured)


def read_good_csv(uri: str, cells: pd.DataFrame) -> np.ndarray:
    """Hand labels ``image_id, cell_id, good`` aligned to ``cells``: 1.0 good, 0.0 bad, NaN unlabelled.

    ``good`` may be 0/1, a boolean, or the words good/bad. Labelled cells that are not in
    ``cells`` raise, since they mean the labels belong to another segmentation.
    """
    table = pd.read_csv(io.BytesIO(read_bytes(uri)), dtype={"image_id": str})
    missing = {"image_id", "cell_id", "good"} - set(table.columns)
    if missing:
        raise ValueError(f"{uri}: needs columns image_id, cell_id, good; lacks {sorted(missing)}")
    words = {"good": 1.0, "bad": 0.0, "true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0}
    good = table["good"].astype(str).str.strip().str.lower().map(words)
    if good.isna().any():
        example = table["good"][good.isna()].iloc[0]
        raise ValueError(f"{uri}: 'good' must be 0/1, true/false or good/bad; got {example!r}")
    labelled = pd.MultiIndex.from_frame(table[["image_id", "cell_id"]].astype({"cell_id": np.int64}))
    if labelled.has_duplicates:
        raise ValueError(f"{uri}: {int(labelled.duplicated().sum())} cell(s) labelled more than once")
    keys = pd.MultiIndex.from_frame(cells[["image_id", "cell_id"]].astype({"cell_id": np.int64}))
    unknown = int((keys.get_indexer(labelled) < 0).sum())
    if unknown:
        raise ValueError(f"{uri}: {unknown} labelled cell(s) are not in the cell table")
    at = labelled.get_indexer(keys)
    return np.where(at >= 0, good.to_numpy()[np.maximum(at, 0)], np.nan)


def integrity_targets(store: CellStore, labels_csv: str | None = None) -> np.ndarray:
    """Good (1.0) / bad (0.0) per store cell, NaN where unknown: hand labels if given, else truth."""
    if labels_csv is not None:
        return read_good_csv(labels_csv, store.cells)
    return simulated_good(store.cells).astype(np.float64)


def whole_cells(cells: pd.DataFrame, min_captured: float = WHOLE_CAPTURED) -> np.ndarray:
    """Cells to cut for the capture-ratio network: off the image border and, when known, whole by the truth."""
    whole = ~cells["touches_border"].to_numpy(dtype=bool)
    if "truth_captured" in cells.columns:
        whole &= cells["truth_captured"].to_numpy() >= min_captured
    return whole
