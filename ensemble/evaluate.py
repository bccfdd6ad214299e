"""Score predictions on images with ground-truth cells: cell mAP and the competition metric.

Two views of the same predictions (see :mod:`ensemble.metrics`):

- **cell mAP** ranks the predicted cells: each takes the labels of the true cell it matches at
  mask IoU >= 0.6 (``segment.match_cells``); a predicted cell that matches none has no class, so
  its scores are false positives. True cells that no prediction matched are not counted here.
- **competition mAP** is the Kaggle metric, which also charges those missed cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from ensemble.data import hpa
from ensemble.data.segment import match_cells
from ensemble.labels import CLASS_NAMES, NUM_CLASSES
from ensemble.metrics import ImageCells, MapResult, cell_map, competition_map
from ensemble.oof import CELL_COLUMNS, member_columns
from ensemble.submission import decode_mask, read_submission


@dataclass
class EvaluationResult:
    """Scores of a prediction file against the dataset's truth.

    Attributes
    ----------
    cell : MapResult
        Cell mAP over the predicted cells, labelled by their matched true cell.
    competition : MapResult
        The competition metric (mask IoU >= ``iou``).
    per_class : DataFrame
        Index: class names; columns ``cell_ap``, ``competition_ap``, ``true_cells`` (positive
        true cells of the class). NaN where a class has no positive.
    n_images, n_cells : int
        Images scored (predicted and with truth) and their predicted cells.
    matched : float
        Share of the predicted cells matched to a true cell.
    plot : Path or None
        The per-class bar plot.
    """

    cell: MapResult
    competition: MapResult
    per_class: pd.DataFrame
    n_images: int
    n_cells: int
    matched: float
    plot: Path | None = None

    def report(self) -> str:
        lines = [f"{self.n_images} images, {self.n_cells} predicted cells, {self.matched:.1%} matched to a true cell",
                 f"cell mAP {self.cell.map:.4f}   competition mAP {self.competition.map:.4f}", "",
                 self.per_class.to_string(float_format=lambda v: f"{v:.4f}")]
        if self.plot is not None:
            lines.append(f"\nplot: {self.plot}")
        return "\n".join(lines)


def evaluate(predictions: str | Path, data_root: str | Path, *, iou: float = 0.6,
             plot: str | Path | None = None, member: str | None = None) -> EvaluationResult:
    """Score a prediction file (``preds.parquet`` or a submission ``.csv``) against ``DATA/truth``.

    Only images that are both predicted and in the truth are scored (a subset of a labelled set
    can be predicted); a predicted image without any cell counts as an image with no detections.

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
    predicted = load_predictions(predictions, CELL_COLUMNS if member is None else member_columns(member))
    known = set(truth.image_ids)
    ids = [i for i in predicted if i in known]
    if not ids:
        raise ValueError(f"none of the {len(predicted)} predicted images has ground truth in {data_root}")
    true_cells = {}
    labels, scores, matched = [], [], 0
    for image_id in ids:
        true_ids, true_labels = truth.cell_labels(image_id)
        true_cells[image_id] = ImageCells(truth.mask(image_id), true_ids, true_labels)
        cells = predicted[image_id]
        matches = match_cells(cells.mask, true_cells[image_id].mask, iou=iou)
        # match_cells lists the cells present in the mask, in id order; the labels follow that.
        rows = pd.Index(cells.cell_ids).get_indexer(matches.pred_id)
        label_rows = pd.Index(true_ids).get_indexer(matches.true_id)  # -1: unlabelled or no match
        hit = matches.matched & (label_rows >= 0)
        image_labels = np.zeros((len(rows), NUM_CLASSES), np.float32)
        image_labels[hit] = true_labels[label_rows[hit]]
        labels.append(image_labels)
        scores.append(cells.values[rows])
        matched += int(matches.matched.sum())
    cell = cell_map(np.concatenate(labels), np.concatenate(scores))
    competition = competition_map({i: predicted[i] for i in ids}, true_cells, iou_threshold=iou)
    positives = sum((c.values > 0.5).sum(axis=0) for c in true_cells.values())
    per_class = pd.DataFrame({"cell_ap": cell.per_class, "competition_ap": competition.per_class},
                             index=list(CLASS_NAMES)).assign(true_cells=positives.astype(int))
    n_cells = sum(len(predicted[i].cell_ids) for i in ids)
    path = Path(plot) if plot is not None else Path(predictions).with_name(f"{Path(predictions).stem}_per_class_ap.png")
    plot_per_class(per_class, path, title=f"cell mAP {cell.map:.3f}, competition mAP {competition.map:.3f}")
    return EvaluationResult(cell, competition, per_class, len(ids), n_cells, matched / max(n_cells, 1), path)


def prediction_members(path: str | Path) -> list[str]:
    """The member networks whose own probabilities a ``preds.parquet`` holds (``members=True``)."""
    names = pq.read_schema(path).names if Path(path).suffix == ".parquet" else []  # no data read
    return [c[: -len(".cell_0")] for c in names if c.endswith(".cell_0")]


def load_predictions(path: str | Path, columns: list[str] = CELL_COLUMNS) -> dict[str, ImageCells]:
    """Predicted cells per image from ``preds.parquet`` (per-cell rows) or a submission CSV.

    ``columns``: the 19 probability columns to read from a parquet table (default the ensemble's).

    In a CSV a cell appears once per class with the same mask; ``read_submission`` decodes each
    mask text once per image, so the distinct mask arrays of an image are its cells. Classes a
    cell is not listed for score 0.
    """
    path = Path(path)
    images = {}
    if path.suffix == ".csv":
        for image_id, image in read_submission(path).items():
            masks, scores = {}, {}
            for detection in image.detections:
                cell = masks.setdefault(id(detection.mask), (len(masks) + 1, detection.mask))[0]
                scores.setdefault(cell, np.zeros(NUM_CLASSES))[detection.class_id] = detection.confidence
            mask = np.zeros((image.height, image.width), np.int32)
            for cell, cell_mask in masks.values():
                mask[cell_mask] = cell
            cell_ids = np.array(sorted(scores), dtype=np.int64)
            images[image_id] = ImageCells(mask, cell_ids, np.array([scores[c] for c in cell_ids]).reshape(-1, NUM_CLASSES))
        return images
    table = pd.read_parquet(path)
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise ValueError(f"{path}: no column(s) {absent[:3]}{'...' if len(absent) > 3 else ''}")
    for image_id, cells in table.groupby("image_id", sort=False):
        height, width = int(cells["height"].iloc[0]), int(cells["width"].iloc[0])
        mask = np.zeros((height, width), np.int32)
        for cell_id, rle in zip(cells["cell_id"], cells["rle"]):
            mask[decode_mask(rle, height, width)] = cell_id
        images[str(image_id)] = ImageCells(mask, cells["cell_id"].to_numpy(), cells[columns].to_numpy())
    return images


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
