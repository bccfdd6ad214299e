"""Score predictions on images with ground-truth cells: cell mAP and the competition metric.

Two views of the same predictions (see :mod:`ensemble.metrics`, and :data:`COUNTS`):

- **cell mAP** ranks the predicted cells: each takes the labels of the true cell it matches at
  mask IoU >= 0.6; a predicted cell that matches none has no class, so its scores are false
  positives. True cells that no prediction matched are not counted here.
- **competition mAP** is the Kaggle metric, which also charges those missed cells, also those of
  images with no prediction at all, and scores a class only in images whose truth has it.

Scoring streams, one image at a time: its predicted masks stay RLEs (the IoU with the true cells
is pycocotools' ``mask.iou`` on RLEs), its true mask is read, turned into RLEs and dropped, and
only each detection's score and true-positive flag are kept. Memory does not grow with the
number of images beyond those few numbers per cell (BENCHMARKS.md, "Evaluation that streams").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from pycocotools import mask as coco_mask

from ensemble.data import hpa
from ensemble.labels import CLASS_NAMES, NUM_CLASSES
from ensemble.metrics import CellScores, CompetitionScores, MapResult
from ensemble.oof import CELL_COLUMNS, member_columns
from ensemble.submission import cell_rles, iter_submission, text_rle

COUNTS = ("counts: cell mAP ranks every predicted cell for all 19 classes, labelled by the true cell it "
          "matches (none: negative), and ignores missed true cells; competition mAP ranks a class only in "
          "images whose truth has it (detections of classes absent from an image are ignored) and counts "
          "every missed true cell as a false negative")
"""One line that says why the two metrics differ (0.77 beside 0.27 is expected, not a bug)."""


@dataclass
class EvaluationResult:
    """Scores of a prediction file against the dataset's truth.

    Attributes
    ----------
    cell : MapResult
        Cell mAP over the predicted cells, labelled by their matched true cell.
    competition : MapResult
        The competition metric (mask IoU >= ``iou``) over every image of the truth.
    per_class : DataFrame
        Index: class names; columns ``cell_ap``, ``competition_ap``, ``true_cells`` (positive
        true cells of the class). NaN where a class has no positive.
    n_images : int
        Images of the truth, all scored.
    n_missed : int
        Of those, images without any predicted cell: their true cells count as missed.
    n_cells : int
        Predicted cells on images of the truth.
    matched : float
        Share of those predicted cells matched to a true cell.
    n_unknown : int
        Predicted images that are not in the truth (not scored).
    plot : Path or None
        The per-class bar plot.
    """

    cell: MapResult
    competition: MapResult
    per_class: pd.DataFrame
    n_images: int
    n_missed: int
    n_cells: int
    matched: float
    n_unknown: int = 0
    plot: Path | None = None

    def report(self) -> str:
        lines = [f"{self.n_images} images with truth, {self.n_missed} of them without any predicted cell "
                 f"(their true cells count as missed); {self.n_cells} predicted cells, {self.matched:.1%} matched "
                 "to a true cell"]
        if self.n_unknown:
            lines.append(f"{self.n_unknown} predicted images have no truth: not scored")
        lines += [f"cell mAP {self.cell.map:.4f}   competition mAP {self.competition.map:.4f}", COUNTS, "",
                  self.per_class.to_string(float_format=lambda v: f"{v:.4f}")]
        if self.plot is not None:
            lines.append(f"\nplot: {self.plot}")
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        """Figures for MLflow: the two mAPs, the counts, and each class's APs (``.../{class}``)."""
        figures = {"cell_map": self.cell.map, "competition_map": self.competition.map, "n_images": self.n_images,
                   "n_missed_images": self.n_missed, "n_cells": self.n_cells, "matched": self.matched}
        for column in ("cell_ap", "competition_ap"):
            figures |= {f"{column}/{name}": value for name, value in self.per_class[column].dropna().items()}
        return {key: float(value) for key, value in figures.items()}


@dataclass
class PredictedImage:
    """The predicted cells of one image, masks as submission RLE texts (never decoded here)."""

    image_id: str
    height: int
    width: int
    rles: list[str]
    scores: np.ndarray
    """(n, 19) class scores, one row per entry of ``rles``."""


def evaluate(predictions: str | Path, data_root: str | Path, *, iou: float = 0.6,
             plot: str | Path | None = None, member: str | None = None) -> EvaluationResult:
    """Score a prediction file (``preds.parquet`` or a submission ``.csv``) against ``DATA/truth``.

    Every image of the truth is scored, as the competition does: one without a predicted cell
    (absent from the file, or predicted empty) counts as an image with no detections, so its true
    cells are missed. Predicted images that are not in the truth are left out and counted.

    Parameters
    ----------
    predictions : str or Path
        Output of ``ensemble predict``.
    data_root : str or Path
        Dataset with ``truth/masks/{ID}.png`` and ``truth/cell_labels.csv``.
    iou : float
        Mask IoU at which a predicted cell matches a true one.
    plot : str or Path, optional
        Where to write the per-class bar plot; default ``{predictions stem}_per_class_ap.png``
        beside the predictions.
    member : str, optional
        Score this member network's own probabilities (written by ``predict_images(...,
        members=True)``; :func:`prediction_members` lists them) instead of the ensemble's.

    Raises
    ------
    ValueError
        The dataset has no truth, or no predicted image is in it.
    """
    truth = hpa.read_truth(data_root)
    if truth is None:
        raise ValueError(f"{data_root} has no ground truth (truth/cell_labels.csv)")
    known = set(truth.image_ids)
    competition, cell = CompetitionScores(iou), CellScores()
    scored, n_cells, matched, unknown, empty = set(), 0, 0, 0, 0
    for image in iter_predictions(predictions, CELL_COLUMNS if member is None else member_columns(member)):
        if image.image_id not in known:
            unknown += 1
            continue
        scored.add(image.image_id)
        empty += not image.rles
        true_ids, true_labels = truth.cell_labels(image.image_id)
        overlap = (rle_iou(image, truth.mask(image.image_id), true_ids) if image.rles
                   else np.zeros((0, len(true_ids))))
        competition.add(overlap, image.scores, true_labels)
        # Each predicted cell takes the labels of the true cell it overlaps most, if at the threshold.
        labels = np.zeros((len(image.rles), NUM_CLASSES), np.float32)
        if overlap.size:
            best = overlap.argmax(axis=1)
            hit = overlap[np.arange(len(best)), best] >= iou
            labels[hit] = true_labels[best[hit]]
            matched += int(hit.sum())
        cell.add(labels, image.scores)
        n_cells += len(image.rles)
    if not scored:
        raise ValueError(f"none of the {unknown} predicted images has ground truth in {data_root}")
    missed = [i for i in truth.image_ids if i not in scored]
    for image_id in missed:
        true_ids, true_labels = truth.cell_labels(image_id)
        competition.add(np.zeros((0, len(true_ids))), np.zeros((0, NUM_CLASSES)), true_labels)
    cell_result, competition_result = cell.result(), competition.result()
    per_class = pd.DataFrame({"cell_ap": cell_result.per_class, "competition_ap": competition_result.per_class},
                             index=list(CLASS_NAMES)).assign(true_cells=competition.n_truth.astype(int))
    path = Path(plot) if plot is not None else Path(predictions).with_name(f"{Path(predictions).stem}_per_class_ap.png")
    plot_per_class(per_class, path, title=f"cell mAP {cell_result.map:.3f}, competition mAP {competition_result.map:.3f}")
    # An image predicted empty is missed too (a parquet table cannot hold one; a submission can).
    return EvaluationResult(cell_result, competition_result, per_class, len(known), len(missed) + empty, n_cells,
                            matched / max(n_cells, 1), unknown, path)


def rle_iou(image: PredictedImage, true_mask: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """(n, m) mask IoU of an image's predicted cells with its true cells, computed on RLEs.

    The predicted masks are never decoded and the true mask is read once for all its cells
    (:func:`~ensemble.submission.cell_rles`); pycocotools' ``iou`` works on the runs.
    """
    if true_mask.shape != (image.height, image.width):
        raise ValueError(f"image {image.image_id}: predicted {image.height}x{image.width} (HxW), "
                         f"truth mask {true_mask.shape[0]}x{true_mask.shape[1]}")
    if not image.rles or not len(true_ids):
        return np.zeros((len(image.rles), len(true_ids)))
    predicted = [text_rle(text, image.height, image.width) for text in image.rles]
    return np.asarray(coco_mask.iou(predicted, cell_rles(true_mask, true_ids), [0] * len(true_ids)), dtype=float)


def prediction_members(path: str | Path) -> list[str]:
    """The member networks whose own probabilities a ``preds.parquet`` holds (``members=True``)."""
    names = pq.read_schema(path).names if Path(path).suffix == ".parquet" else []  # no data read
    return [c[: -len(".cell_0")] for c in names if c.endswith(".cell_0")]


def iter_predictions(path: str | Path, columns: list[str] = CELL_COLUMNS) -> Iterator[PredictedImage]:
    """Predicted cells one image at a time from ``preds.parquet`` (per-cell rows) or a submission CSV.

    ``columns``: the 19 probability columns to read from a parquet table (default the ensemble's).
    Masks stay RLE text. In a CSV a cell appears once per
    class with the same mask text; classes a cell is not listed for score 0.
    """
    if Path(path).suffix == ".csv":
        for image_id, width, height, triples in iter_submission(path):
            rows: dict[str, np.ndarray] = {}
            for class_id, confidence, rle in triples:
                rows.setdefault(rle, np.zeros(NUM_CLASSES))[class_id] = confidence
            scores = np.array(list(rows.values())).reshape(-1, NUM_CLASSES)
            yield PredictedImage(image_id, height, width, list(rows), scores)
        return
    table = pd.read_parquet(path)  # a few numbers and an RLE text per cell: small beside one mask
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise ValueError(f"{path}: no column(s) {absent[:3]}{'...' if len(absent) > 3 else ''}")
    scores = table[columns].to_numpy()
    for image_id, rows in table.groupby("image_id", sort=False).indices.items():
        first = table.iloc[rows[0]]
        yield PredictedImage(str(image_id), int(first["height"]), int(first["width"]),
                             table["rle"].to_numpy()[rows].tolist(), scores[rows])


def plot_per_class(per_class: pd.DataFrame, out_png: str | Path, title: str = "") -> Path:
    """Bar plot of the per-class APs (cell and competition) of :func:`evaluate`; returns its path."""
    out_png = Path(out_png)
    fig = Figure(figsize=(11, 4.5), dpi=100)
    ax = fig.subplots()
    x = np.arange(len(per_class))
    for offset, column, label in ((-0.2, "cell_ap", "cell AP"), (0.2, "competition_ap", "competition AP")):
        ax.bar(x + offset, per_class[column].fillna(0).to_numpy(), width=0.4, label=label)
    ax.set_xticks(x, [f"{name} ({n})" for name, n in zip(per_class.index, per_class["true_cells"])],
                  rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="average precision", ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png
