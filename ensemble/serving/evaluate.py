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

:func:`compare` puts two score sets of one file side by side (the ensemble and a member network,
``predict --members``): their difference, with an interval from resampling the images.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from pycocotools import mask as coco_mask
from scipy.stats import bootstrap

from ensemble.data import hpa
from ensemble.labels import CLASS_NAMES, NUM_CLASSES
from ensemble.metrics import CellScores, CompetitionScores, MapResult
from ensemble.oof import CELL_COLUMNS, member_columns
from ensemble.storage import beside, is_local, open_file, read_parquet, write_bytes
from ensemble.serving.submission import cell_rles, iter_submission, text_rle

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
    plot : Path, str or None
        The per-class bar plot (a URL where it was written to one).
    """

    cell: MapResult
    competition: MapResult
    per_class: pd.DataFrame
    n_images: int
    n_missed: int
    n_cells: int
    matched: float
    n_unknown: int = 0
    plot: Path | str | None = None

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
        Output of ``ensemble predict`` (a path or URL, as every path here).
    data_root : str or Path
        Dataset with ``truth/masks/{ID}.png`` and ``truth/cell_labels.csv``.
    iou : float
        Mask IoU at which a predicted cell matches a true one.
    plot : str or Path, optional
        Where to write the per-class bar plot; default ``{predictions stem}_per_class_ap.png``
        beside the predictions (in their bucket, for a URL).
    member : str, optional
        Score this member network's own probabilities (written by ``predict_images(...,
        members=True)``; :func:`prediction_members` lists them) instead of the ensemble's.

    Raises
    ------
    ValueError
        The dataset has no truth, or no predicted image is in it.
    """
    truth = _truth(data_root)
    competition, cell = CompetitionScores(iou), CellScores()
    n_images, n_missed, n_cells, matched, unknown = 0, 0, 0, 0, 0
    for image in match_images(predictions, truth, CELL_COLUMNS if member is None else member_columns(member)):
        if image is None:
            unknown += 1
            continue
        labels, hit = image.cell_labels(iou)
        competition.add(image.overlap, image.scores, image.true_labels)
        cell.add(labels, image.scores)
        n_images, n_missed = n_images + 1, n_missed + (not len(labels))
        n_cells, matched = n_cells + len(labels), matched + int(hit.sum())
    cell_result, competition_result = cell.result(), competition.result()
    per_class = pd.DataFrame({"cell_ap": cell_result.per_class, "competition_ap": competition_result.per_class},
                             index=list(CLASS_NAMES)).assign(true_cells=competition.n_truth.astype(int))
    path = plot if plot is not None else beside(predictions, f"{Path(predictions).stem}_per_class_ap.png")
    path = plot_per_class(per_class, path,
                          title=f"cell mAP {cell_result.map:.3f}, competition mAP {competition_result.map:.3f}")
    return EvaluationResult(cell_result, competition_result, per_class, n_images, n_missed, n_cells,
                            matched / max(n_cells, 1), unknown, path)


@dataclass
class Comparison:
    """How much one set of scores in a prediction file beats another on the same images.

    Attributes
    ----------
    candidate, baseline : str
        The two score sets: ``"ensemble"`` or a member network's name.
    table : DataFrame
        Index ``competition_map``, ``cell_map``; columns ``candidate`` and ``baseline`` (the two
        scores), ``difference`` (candidate - baseline) and ``low``, ``high``: the interval of the
        difference at ``confidence``, from a paired bootstrap over the images.
    n_images : int
    confidence : float
    """

    candidate: str
    baseline: str
    table: pd.DataFrame
    n_images: int
    confidence: float

    def beats(self, metric: str = "cell_map") -> bool:
        """Whether the candidate is ahead on ``metric`` beyond what the choice of images explains."""
        return bool(self.table.loc[metric, "low"] > 0)

    def report(self) -> str:
        parts = [f"{name.removesuffix('_map')} {row.difference:+.4f} [{row.low:+.4f}, {row.high:+.4f}]"
                 for name, row in self.table.iterrows()]
        return (f"{self.candidate} - {self.baseline}: {', '.join(parts)} "
                f"({self.confidence:.0%} interval, paired bootstrap over {self.n_images} images)")


def compare(predictions: str | Path | Sequence[str | Path], data_root: str | Path | Sequence[str | Path],
            baseline: str, *, candidate: str = "ensemble", iou: float = 0.6, confidence: float = 0.9,
            n_resamples: int = 1000, seed: int = 0) -> Comparison:
    """Candidate minus baseline on the images of ``data_root``, with a bootstrap interval.

    On 40 or 80 test images a difference of 0.01 mAP can come from which images happen to be in
    the set. Both score sets come from one file (``predict --members``), so they rank the same
    cells: the images are resampled with replacement, the same for both (a paired bootstrap), and
    each metric is recomputed on every resample. The interval is scipy's percentile bootstrap.

    Parameters
    ----------
    predictions : str or Path, or a sequence of them
        A ``preds.parquet`` with member columns (``predict --members``); several (each with its
        ``data_root``) pool their images into one comparison.
    data_root : str or Path, or a sequence of them
        Dataset with ``truth/``, one per prediction file.
    baseline, candidate : str
        ``"ensemble"`` or one of :func:`prediction_members`.
    iou : float
        Mask IoU at which a predicted cell matches a true one.
    confidence : float
        Level of the interval, in (0, 1).
    n_resamples : int
    seed : int
        Seed of the resampling.

    Raises
    ------
    ValueError
        A score set that is not in the file, or a ``confidence`` outside (0, 1).
    """
    return compare_pairs(predictions, data_root, [(candidate, baseline)], iou=iou, confidence=confidence,
                         n_resamples=n_resamples, seed=seed)[0]


def compare_pairs(predictions: str | Path | Sequence[str | Path], data_root: str | Path | Sequence[str | Path],
                  pairs: Sequence[tuple[str, str]], *, iou: float = 0.6, confidence: float = 0.9,
                  n_resamples: int = 1000, seed: int = 0) -> list[Comparison]:
    """:func:`compare` of each ``(candidate, baseline)`` of ``pairs``, the images read and matched
    to their truth once for all of them (matching is most of a comparison's time)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    sources = list(zip(*(([p] if isinstance(p, str | Path) else list(p)) for p in (predictions, data_root)),
                       strict=True))
    names = list(dict.fromkeys(name for pair in pairs for name in pair))
    for path, _ in sources:
        known = ["ensemble", *prediction_members(path)]
        for name in names:
            if name not in known:
                raise ValueError(f"{path}: no scores of {name!r}; it has {known} (members: predict --members)")
    columns = [c for name in names for c in (CELL_COLUMNS if name == "ensemble" else member_columns(name))]
    # Per image and score set, the (competition, cell) accumulators of its scores.
    images: list[dict[str, tuple[CompetitionScores, CellScores]]] = []
    matched = (image for path, root in sources for image in match_images(path, _truth(root), columns))
    for image in matched:
        if image is None:
            continue
        labels, _ = image.cell_labels(iou)
        images.append({})
        for name, scores in zip(names, np.split(image.scores, len(names), axis=1)):
            competition, cell = CompetitionScores(iou), CellScores()
            competition.add(image.overlap, scores, image.true_labels)
            cell.add(labels, scores)
            images[-1][name] = (competition, cell)

    def maps(sample: np.ndarray, pair: tuple[str, str]) -> np.ndarray:
        """(2, 2): candidate then baseline, competition then cell mAP, on the images of ``sample``."""
        with warnings.catch_warnings():  # a resample may lack a class: left out of that mean
            warnings.simplefilter("ignore")
            return np.array([[CompetitionScores.pooled([images[i][name][0] for i in sample]).result().map,
                              CellScores.pooled([images[i][name][1] for i in sample]).result().map] for name in pair])

    every = np.arange(len(images))
    comparisons = []
    for pair in pairs:
        def difference(sample: np.ndarray, pair=pair) -> np.ndarray:
            candidate_maps, baseline_maps = maps(sample, pair)
            return candidate_maps - baseline_maps

        (candidate_maps, baseline_maps), interval = maps(every, pair), bootstrap(
            (every,), difference, vectorized=False, n_resamples=n_resamples, confidence_level=confidence,
            method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        table = pd.DataFrame({"candidate": candidate_maps, "baseline": baseline_maps,
                              "difference": candidate_maps - baseline_maps, "low": interval.low,
                              "high": interval.high}, index=["competition_map", "cell_map"])
        comparisons.append(Comparison(*pair, table, len(images), confidence))
    return comparisons


def _truth(data_root: str | Path) -> hpa.Truth:
    truth = hpa.read_truth(data_root)
    if truth is None:
        raise ValueError(f"{data_root} has no ground truth (truth/cell_labels.csv): predictions are scored against "
                         "true cells, which Kaggle's data lacks; give a hand-labelled subset in that layout")
    return truth


@dataclass
class ImageMatch:
    """One image of the truth and its predicted cells: all that either metric takes from it."""

    overlap: np.ndarray
    """(n, m) mask IoU of the n predicted and the m true cells."""
    scores: np.ndarray
    """(n, k) scores of the predicted cells (the columns read)."""
    true_labels: np.ndarray
    """(m, 19) labels of the true cells."""

    def cell_labels(self, iou: float) -> tuple[np.ndarray, np.ndarray]:
        """(n, 19) labels of the true cell each predicted cell overlaps most, if at ``iou`` (else 0),
        and the (n,) flags of the predicted cells that matched."""
        labels = np.zeros((len(self.overlap), NUM_CLASSES), np.float32)
        if not self.overlap.size:
            return labels, np.zeros(len(self.overlap), bool)
        best = self.overlap.argmax(axis=1)
        hit = self.overlap[np.arange(len(best)), best] >= iou
        labels[hit] = self.true_labels[best[hit]]
        return labels, hit


def match_images(predictions: str | Path, truth: hpa.Truth, columns: list[str]) -> Iterator[ImageMatch | None]:
    """Every image of ``truth`` with the predicted cells of ``predictions``, one at a time; ``None``
    for each predicted image that is not in the truth.

    The images of the truth that have no predicted cell (absent from the file, or predicted empty:
    a parquet table cannot hold one, a submission can) come with none, after the predicted ones.

    Raises
    ------
    ValueError
        No predicted image is in the truth.
    """
    known, scored = set(truth.image_ids), set()
    for image in iter_predictions(predictions, columns):
        if image.image_id not in known:
            yield None
            continue
        scored.add(image.image_id)
        true_ids, true_labels = truth.cell_labels(image.image_id)
        overlap = (rle_iou(image, truth.mask(image.image_id), true_ids) if image.rles
                   else np.zeros((0, len(true_ids))))
        yield ImageMatch(overlap, image.scores, true_labels)
    if not scored:
        raise ValueError(f"none of the predicted images of {predictions} has ground truth in {truth.root}")
    for image_id in truth.image_ids:
        if image_id not in scored:
            true_ids, true_labels = truth.cell_labels(image_id)
            yield ImageMatch(np.zeros((0, len(true_ids))), np.zeros((0, len(columns))), true_labels)


def rle_iou(image: PredictedImage, true_mask: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """(n, m) mask IoU of an image's predicted cells with its true cells, computed on RLEs.

    The predicted masks are never decoded and the true mask is read once for all its cells
    (:func:`~ensemble.serving.submission.cell_rles`); pycocotools' ``iou`` works on the runs.
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
    if Path(path).suffix != ".parquet":
        return []
    with open_file(path) as handle:  # the footer only: no data read
        names = pq.read_schema(handle).names
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
    table = read_parquet(path)  # a few numbers and an RLE text per cell: small beside one mask
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise ValueError(f"{path}: no column(s) {absent[:3]}{'...' if len(absent) > 3 else ''}")
    scores = table[columns].to_numpy()
    for image_id, rows in table.groupby("image_id", sort=False).indices.items():
        first = table.iloc[rows[0]]
        yield PredictedImage(str(image_id), int(first["height"]), int(first["width"]),
                             table["rle"].to_numpy()[rows].tolist(), scores[rows])


def plot_per_class(per_class: pd.DataFrame, out_png: str | Path, title: str = "") -> Path | str:
    """Bar plot of the per-class APs (cell and competition) of :func:`evaluate`; returns its path (or URL)."""
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes(buffer.getvalue(), str(out_png))
    return Path(out_png) if is_local(out_png) else str(out_png)
