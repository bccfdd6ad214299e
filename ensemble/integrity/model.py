"""The Visual Integrity Detector: both VID modules, combined into one weight per cell.

At inference the ensemble multiplies each cell's class probabilities by its integrity weight
(paper, Fig. 4c), so cells the detector distrusts sink in every class's ranking.

The combination rule (:func:`integrity_weight`):

- ``"product"`` (default): ``w = P_xgb(good) * P_cnn(captured >= 50 %)``, the probability that
  both modules accept the cell if their errors are independent. It is the paper's criterion read
  literally ("at least 50 % of a cell has to be captured" for a meaningful prediction): a cell
  that is clearly over the line keeps its full weight however much of it is missing.
- ``"expected"``: ``w = P_xgb(good) * E[captured fraction] / 0.9``, with each class at its
  midpoint (0.175, 0.4, 0.65, 0.9); a graded penalty that also lowers 50-80 % cells.

``bench/bench_vid.py`` scores both on held-out cells (AUC and accuracy against good/bad).
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from xgboost import XGBClassifier

from ensemble.data.crops import TRUTH_IOU
from ensemble.data.store import CellStore, open_store
from ensemble.data.features import VID_FEATURES
from ensemble.integrity.capture import (CAPTURE_CLASSES, CAPTURE_EDGES, CaptureNet, capture_class, predict_capture,
                                        train_capture)
from ensemble.integrity.features import feature_matrix, integrity_targets, whole_cells
from ensemble.integrity.xgb import morphology_classifier
from ensemble.storage import join, read_bytes, write_bytes

RULES = ("product", "expected")
FORMAT_VERSION = 1
_CLASS_MIDPOINTS = np.array([0.175, 0.4, 0.65, 0.9])
_HALF = CAPTURE_EDGES.index(0.5) + 1  # first class at or above 50 % captured


def integrity_weight(good: np.ndarray, capture: np.ndarray, rule: str = "product") -> np.ndarray:
    """One weight in [0, 1] per cell from P(good) (n,) and the capture-class probabilities (n, 4)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    good, capture = np.asarray(good, dtype=np.float64), np.asarray(capture, dtype=np.float64)
    if rule == "product":
        accepted = capture[:, _HALF:].sum(axis=1)
    else:
        accepted = capture @ _CLASS_MIDPOINTS / _CLASS_MIDPOINTS[-1]
    return np.clip(good * accepted, 0.0, 1.0).astype(np.float32)


class IntegrityModel(BaseEstimator):
    """VID: XGBoost on morphology features times a capture-ratio CNN on crops.

    Parameters
    ----------
    backbone : str
        timm model of the capture network. The paper uses ``efficientnet_b2`` (pretrained); the
        default, timm's tiny test EfficientNet, trains from scratch on a CPU in seconds. On 24
        simulated images it reached a held-out AUC of 0.96 in 15 s, where an ``efficientnet_b0``
        from scratch reached 0.62 in 90 s: small data needs a small network.
    cell_size : int, optional
        Cell side of the capture network; default: the store's crop size.
    pretrained : bool
        Start the capture network from timm's pretrained weights (downloads them).
    rule : {"product", "expected"}
        How the two modules combine (module docstring).
    epochs, batch_size, lr, cuts_per_cell : training of the capture network
        (:func:`~ensemble.integrity.capture.train_capture`).
    xgb_params : dict, optional
        XGBoost parameters over :data:`~ensemble.integrity.xgb.DEFAULT_PARAMS`.
    seed : int

    Attributes
    ----------
    classifier_ : xgboost.XGBClassifier
    capture_net_ : CaptureNet
    cell_size_ : int
    history_ : list of float
        Training loss of the capture network per epoch (empty after :func:`load_integrity`).
    """

    def __init__(self, backbone: str = "test_efficientnet", cell_size: int | None = None, pretrained: bool = False,
                 rule: str = "product", epochs: int = 15, batch_size: int = 64, lr: float = 1e-3,
                 cuts_per_cell: int = 4, xgb_params: dict | None = None, seed: int = 0):
        # scikit-learn's convention: the constructor stores its arguments; fit checks them.
        self.backbone, self.cell_size, self.pretrained, self.rule = backbone, cell_size, pretrained, rule
        self.epochs, self.batch_size, self.lr, self.cuts_per_cell = epochs, batch_size, lr, cuts_per_cell
        self.xgb_params, self.seed = xgb_params, seed

    def _check_params(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.cuts_per_cell < 1 or not self.lr > 0:
            raise ValueError("epochs, batch_size and cuts_per_cell must be >= 1 and lr > 0")

    def fit(self, store: CellStore | str, rows: np.ndarray | None = None, labels_csv: str | None = None):
        """Train both modules on the store's cells.

        Parameters
        ----------
        store : CellStore or str
        rows : array of int, optional
            Store rows to learn from (default all).
        labels_csv : str, optional
            Hand labels ``image_id, cell_id, good``; default: the simulator's truth
            (:func:`~ensemble.integrity.features.integrity_targets`).

        Returns
        -------
        self
        """
        self._check_params()
        store = open_store(store)
        rows = np.arange(len(store)) if rows is None else np.asarray(rows, dtype=np.int64)
        cells = store.cells.iloc[rows]
        good = integrity_targets(store, labels_csv)[rows]
        labelled = ~np.isnan(good)
        if len(np.unique(good[labelled])) < 2:
            raise ValueError("VID needs both good and bad labelled cells to learn from")
        self.classifier_ = morphology_classifier(self.seed, **(self.xgb_params or {}))
        self.classifier_.fit(feature_matrix(cells[labelled]), good[labelled].astype(int))
        # NaN != 0 is True: unlabelled cells stay candidates; hand-labelled bad ones do not.
        whole = whole_cells(cells) & (good != 0)
        if not whole.any():
            raise ValueError("no whole cell (off the border, fully captured) to train the capture network on")
        self.cell_size_ = int(self.cell_size or store.cell_size)
        torch.manual_seed(self.seed)  # the network's initial weights
        self.capture_net_ = CaptureNet(self.backbone, self.cell_size_, pretrained=self.pretrained)
        self.history_ = train_capture(self.capture_net_, store.crops(rows[whole]), epochs=self.epochs,
                                      batch_size=self.batch_size, lr=self.lr, cuts_per_cell=self.cuts_per_cell,
                                      seed=self.seed)
        return self

    def good_probability(self, cells: pd.DataFrame) -> np.ndarray:
        """P(good) (n,) of the XGBoost module from the cells' morphology features."""
        if len(cells) == 0:
            return np.zeros(0, np.float32)
        return self.classifier_.predict_proba(feature_matrix(cells))[:, 1].astype(np.float32)

    def capture_probabilities(self, crops: np.ndarray) -> np.ndarray:
        """Probabilities (n, 4) of the capture classes (:data:`CAPTURE_CLASSES`) of uint8 crops."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1] != 4 or crops.dtype != np.uint8:
            raise ValueError(f"crops must be uint8 (n, 4, S, S), got {crops.dtype} {crops.shape}")
        return predict_capture(self.capture_net_, crops)

    def weights(self, cells: pd.DataFrame, crops: np.ndarray) -> np.ndarray:
        """Integrity weight in [0, 1] of each cell, float32 (n,).

        Parameters
        ----------
        cells : DataFrame
            One row per cell with the :data:`~ensemble.data.features.VID_FEATURES` columns.
        crops : ndarray (n, 4, S, S) uint8
            The same cells' crops, in the same order.
        """
        if len(cells) != len(crops):
            raise ValueError(f"{len(cells)} cell rows but {len(crops)} crops")
        return integrity_weight(self.good_probability(cells), self.capture_probabilities(crops), self.rule)

    def save(self, uri: str) -> None:
        """Write ``config.json``, ``morphology.json`` (XGBoost's JSON) and ``capture.pt`` (a state_dict)."""
        config = {"format": FORMAT_VERSION, "params": self.get_params(), "cell_size": self.cell_size_,
                  "features": list(VID_FEATURES), "capture_classes": list(CAPTURE_CLASSES)}
        with tempfile.TemporaryDirectory() as tmp:
            # XGBClassifier.save_model keeps the scikit-learn wrapper's metadata; it writes files only.
            self.classifier_.save_model(Path(tmp) / "morphology.json")
            write_bytes((Path(tmp) / "morphology.json").read_bytes(), join(uri, "morphology.json"))
        buffer = io.BytesIO()
        torch.save(self.capture_net_.state_dict(), buffer)
        write_bytes(buffer.getvalue(), join(uri, "capture.pt"))
        write_bytes(json.dumps(config, indent=2).encode(), join(uri, "config.json"))


def load_integrity(uri: str) -> IntegrityModel:
    """Load an :class:`IntegrityModel` written by :meth:`IntegrityModel.save` (no training data needed)."""
    config = json.loads(read_bytes(join(uri, "config.json")))
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{uri}: integrity model format {config.get('format')!r}, expected {FORMAT_VERSION}")
    if config["features"] != list(VID_FEATURES):
        raise ValueError(f"{uri}: trained on features {config['features']}, this version uses {list(VID_FEATURES)}")
    # Models saved before the crop side was called cell_size everywhere say image_size.
    params = {("cell_size" if k == "image_size" else k): v for k, v in config["params"].items()}
    model = IntegrityModel(**params)
    model.cell_size_ = int(config.get("cell_size", config.get("image_size")))
    model.classifier_ = XGBClassifier()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "morphology.json").write_bytes(read_bytes(join(uri, "morphology.json")))
        model.classifier_.load_model(Path(tmp) / "morphology.json")
    model.capture_net_ = CaptureNet(model.backbone, model.cell_size_)  # weights come from the file
    state = torch.load(io.BytesIO(read_bytes(join(uri, "capture.pt"))), map_location="cpu", weights_only=True)
    model.capture_net_.load_state_dict(state)
    model.capture_net_.eval()
    model.history_ = []
    return model


@dataclass(frozen=True)
class IntegrityCV:
    """Held-out results of :func:`cross_validate_integrity`.

    Attributes
    ----------
    scores : DataFrame
        One row per score (``xgb``: P(good); ``cnn``: P(captured >= 50 %); then each rule's
        weight), columns ``accuracy`` (threshold 0.5) and ``auc`` against the good/bad labels.
    capture_accuracy : float
        Accuracy of the capture network's class against the true captured fraction's class,
        over held-out cells matched to a true cell (NaN without truth).
    cells : DataFrame
        Per labelled cell: ``image_id, cell_id, split, good, p_good, capture_0..3`` and a
        ``w_{rule}`` column per rule.
    """

    scores: pd.DataFrame
    capture_accuracy: float
    cells: pd.DataFrame = field(repr=False)


def cross_validate_integrity(store: CellStore | str, n_splits: int = 5, labels_csv: str | None = None,
                             **params) -> IntegrityCV:
    """k-fold cross-validation of the whole VID (the paper: five folds for XGBoost).

    Labelled cells are split by scikit-learn's ``StratifiedGroupKFold``: stratified on good/bad
    and grouped by image, so no model scores a cell of an image it trained on. Each split fits an
    :class:`IntegrityModel` on every cell of the other images and scores the held-out cells.

    Parameters
    ----------
    store : CellStore or str
    n_splits : int
    labels_csv : str, optional
        Hand labels (default: the simulator's truth).
    **params
        :class:`IntegrityModel` parameters.

    Returns
    -------
    IntegrityCV
    """
    store = open_store(store)
    good = integrity_targets(store, labels_csv)
    labelled = np.flatnonzero(~np.isnan(good))
    images = store.cells["image_id"].to_numpy()
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=params.get("seed", 0))
    table = store.cells.iloc[labelled][["image_id", "cell_id"]].reset_index(drop=True)
    table["split"], table["good"] = -1, good[labelled].astype(int)
    p_good = np.zeros(len(labelled), np.float32)
    capture = np.zeros((len(labelled), len(CAPTURE_CLASSES)), np.float32)
    for split, (_, test) in enumerate(splitter.split(labelled, good[labelled].astype(int), images[labelled])):
        train_rows = np.flatnonzero(~np.isin(images, images[labelled[test]]))
        model = IntegrityModel(**params).fit(store, rows=train_rows, labels_csv=labels_csv)
        held_out = labelled[test]
        p_good[test] = model.good_probability(store.cells.iloc[held_out])
        capture[test] = model.capture_probabilities(store.crops(held_out))
        table.loc[test, "split"] = split
    table["p_good"] = p_good
    table[[f"capture_{k}" for k in range(len(CAPTURE_CLASSES))]] = capture
    scored = {"xgb": p_good, "cnn": capture[:, _HALF:].sum(axis=1)}
    for rule in RULES:
        table[f"w_{rule}"] = scored[rule] = integrity_weight(p_good, capture, rule)
    scores = pd.DataFrame([{"score": name, "accuracy": accuracy_score(table["good"], values >= 0.5),
                            "auc": roc_auc_score(table["good"], values)} for name, values in scored.items()])
    capture_accuracy = float("nan")
    if "truth_captured" in store.cells.columns:
        cells = store.cells.iloc[labelled]
        matched = (cells["truth_iou"] >= TRUTH_IOU).to_numpy()
        truth_class = capture_class(cells["truth_captured"].to_numpy())
        capture_accuracy = float((capture.argmax(axis=1) == truth_class)[matched].mean())
    return IntegrityCV(scores=scores.set_index("score"), capture_accuracy=capture_accuracy, cells=table)
