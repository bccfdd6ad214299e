"""Predict every cell of a set of images with a registered ensemble; write a table or a Kaggle CSV.

A few images run in this process. Many stream through Ray Data in two stages, so each kind of
work gets the hardware it needs and neither waits for the other::

    image ids -> read, segment, crop, mask RLEs     CPU actors, one image at a time
              -> members, fusion, integrity         one actor holding the networks (on a GPU
                                                    when the cluster has one), a batch of images

Bad images (unreadable, truncated, a missing channel) are skipped and listed in the result's
:class:`~ensemble.data.hpa.BatchReport`, whichever path runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import ray
import torch
from tqdm.auto import tqdm

from ensemble import tracking
from ensemble.cluster import cluster_shape
from ensemble.data import hpa
from ensemble.oof import CELL_COLUMNS
from ensemble.serving.model import OUTPUT_COLUMNS, PredictTimings, SegmentedImage, batched, load_ensemble
from ensemble.serving.inputs import given_masks
from ensemble.storage import write_parquet
from ensemble.serving.submission import Detection, SubmissionImage, write_submission

RAY_MIN_IMAGES = 32
"""``engine="auto"`` streams through Ray from this many images on (below, Ray's start-up costs more)."""


@dataclass
class PredictResult:
    """What :func:`predict_images` produced.

    Attributes
    ----------
    cells : DataFrame
        One row per cell, :data:`ensemble.serving.model.OUTPUT_COLUMNS`, sorted by image and cell.
    images : DataFrame
        ``image_id, width, height, n_cells`` of every image read (also those without cells).
    report : BatchReport
        Images read, and those skipped with the reason.
    out : str or None
        The file written.
    seconds : float
        Wall time.
    timings : PredictTimings or None
        Seconds per stage (in-process engine only).
    """

    cells: pd.DataFrame
    images: pd.DataFrame
    report: hpa.BatchReport
    out: str | None
    seconds: float
    timings: PredictTimings | None = None

    def summary(self) -> str:
        rate = len(self.images) / self.seconds if self.seconds else float("nan")
        lines = [f"{len(self.images)} images, {len(self.cells)} cells in {self.seconds:.1f} s ({rate:.2f} images/s)"
                 + (f" -> {self.out}" if self.out else ""), self.report.summary()]
        return "\n".join(lines)


def predict_images(
    model_uri: str,
    data_root: str | Path,
    ids: Sequence[str] | None = None,
    split: str = "test",
    out: str | Path | None = None,
    *,
    engine: str = "auto",
    batch_size: int = 8,
    num_workers: int | None = None,
    device: str | None = None,
    progress: bool = True,
    members: bool = False,
    masks: str | Path | None = None,
) -> PredictResult:
    """Predict the cells of images in the Kaggle layout (``{data_root}/{split}/{ID}_{channel}.png``).

    Parameters
    ----------
    model_uri : str
        ``models:/hpa-ensemble@champion``, ``runs:/...`` or a directory from ``save_ensemble``.
        Resolved against the current MLflow tracking URI (``MLFLOW_TRACKING_URI``).
    data_root : str or Path
    ids : sequence of str, optional
        Images to predict; default every image of the split (``hpa.read_index``).
    split : str
        ``"test"`` or ``"train"`` (any image sub-directory).
    out : str or Path, optional
        ``*.parquet``: the per-cell table; ``*.csv``: the Kaggle submission (every class of every
        cell with its confidence and the cell's mask RLE).
    engine : {"auto", "local", "ray"}
        ``local``: this process; ``ray``: the Ray Data pipeline of the module docstring (on the
        running cluster, or a local Ray); ``auto``: ``ray`` from :data:`RAY_MIN_IMAGES` images.
    batch_size : int
        Images whose cells go through the networks together.
    num_workers : int, optional
        Most Ray segmentation actors of the autoscaling pool (default: the most CPUs the cluster
        can hold, less one for the network actor).
    device : str, optional
        Torch device of the member networks, e.g. ``"cpu"`` on a GPU machine; default CUDA when
        this process has one. On Ray, ``"cuda"`` makes the network actor ask for a GPU (an
        autoscaling cluster starts a GPU node for it); otherwise it runs on a CPU.
    progress : bool
        Show a progress bar (images, cells/s).
    members : bool
        Also keep each member network's own cell probabilities (:func:`ensemble.oof.member_columns`),
        so that :func:`ensemble.serving.evaluate.evaluate` can score the members beside the ensemble.
    masks : str or Path, optional
        A folder of given cell masks ``{ID}.png`` (uint16 instance labels, as hpacellseg writes)
        used instead of segmenting; ``"auto"``: the dataset's ``masks/`` when it has one. An image
        whose mask is missing or not its size is skipped and reported.
    """
    if out is not None and Path(str(out)).suffix not in (".parquet", ".csv"):
        raise ValueError(f"out must end in .parquet (per-cell table) or .csv (Kaggle submission), got {out}")
    if engine not in ("auto", "local", "ray"):
        raise ValueError(f"engine must be 'auto', 'local' or 'ray', got {engine!r}")
    start = time.perf_counter()
    ids = list(hpa.read_index(data_root, split)["ID"]) if ids is None else [str(i) for i in ids]
    masks = given_masks(masks, data_root)
    if engine == "auto":
        engine = "ray" if len(ids) >= RAY_MIN_IMAGES else "local"
    if engine == "local":
        cells, images, report, timings = _predict_local(model_uri, str(data_root), ids, split, batch_size, device,
                                                        progress, members, masks=masks)
    else:
        cells, images, report, timings = _predict_ray(model_uri, str(data_root), ids, split, batch_size, num_workers,
                                                      device, progress, members, masks=masks)
    cells = cells.sort_values(["image_id", "cell_id"], ignore_index=True)
    result = PredictResult(cells, images, report, None if out is None else str(out), 0.0, timings)
    if out is not None:
        write_predictions(result, out)
    result.seconds = time.perf_counter() - start
    return result


def write_predictions(result: PredictResult, out: str | Path) -> None:
    """Write ``result`` as a per-cell parquet table or as the Kaggle submission CSV (by suffix)."""
    if str(out).endswith(".parquet"):
        write_parquet(result.cells, str(out))
        return
    by_image = dict(tuple(result.cells.groupby("image_id", sort=False)))
    images = {}
    for image_id, width, height in result.images[["image_id", "width", "height"]].itertuples(index=False):
        cells = by_image.get(image_id, result.cells.iloc[:0])
        detections = [Detection(k, float(p), rle)
                      for rle, probabilities in zip(cells["rle"], cells[CELL_COLUMNS].to_numpy())
                      for k, p in enumerate(probabilities)]
        images[image_id] = SubmissionImage(int(width), int(height), detections)
    write_submission(images, out)


def _image_rows(segmented: Sequence[SegmentedImage]) -> list[tuple]:
    return [(s.image_id, s.width, s.height, len(s.cells)) for s in segmented]


def _results(cells: list[pd.DataFrame], images: list[tuple], report, timings):
    cells = pd.concat(cells, ignore_index=True) if cells else pd.DataFrame(columns=OUTPUT_COLUMNS)
    images = pd.DataFrame(images, columns=["image_id", "width", "height", "n_cells"])
    return cells, images, report, timings


def _predict_local(model_uri, data_root, ids, split, batch_size, device, progress, members, masks=None):
    """Everything in this process: read and segment a batch of images, then classify it."""
    model = load_ensemble(model_uri)
    model.member_outputs = members
    if device:
        model.device = torch.device(device)
    report = hpa.BatchReport()
    cells, images = [], []
    segmented = model.iter_segmented(data_root, ids, split, report, masks)
    with tqdm(total=len(ids), unit="img", desc="predict", disable=not progress) as bar:
        for batch in batched(segmented, batch_size):
            cells.append(model.classify(batch))
            images += _image_rows(batch)
            bar.update(report.n_ok + len(report.skipped) - bar.n)
            bar.set_postfix(cells=model.timings.cells, refresh=False)
        bar.update(len(ids) - bar.n)  # images skipped after the last batch
    return _results(cells, images, report, model.timings)


@dataclass
class _Skipped:
    """Stage 1's result for an unreadable image (an object, as a SegmentedImage is: a None in an
    object column does not survive Ray Data's batching)."""

    reason: str


class _Segment:
    """Ray Data stage 1: read and segment images (CPU); the member networks are never loaded here."""

    def __init__(self, model_uri: str, tracking_uri: str, data_root: str, split: str, masks: str | None = None):
        mlflow.set_tracking_uri(tracking_uri)
        self.model = load_ensemble(model_uri, networks=False)
        self.data_root, self.split, self.masks = data_root, split, masks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for image_id in batch["image_id"]:
            report = hpa.BatchReport()
            found = list(self.model.iter_segmented(self.data_root, [str(image_id)], self.split, report, self.masks))
            results.append(found[0] if found else _Skipped(report.skipped[0][1]))
        # Object columns travel pickled, as in the cell store's pipeline (variable-size crops).
        return {"image_id": batch["image_id"], "segmented": _object_array(results)}


class _Classify:
    """Ray Data stage 2: the member networks, fusion and integrity on a batch of segmented images."""

    def __init__(self, model_uri: str, tracking_uri: str, device: str | None, members: bool):
        mlflow.set_tracking_uri(tracking_uri)
        self.model = load_ensemble(model_uri)
        self.model.member_outputs = members
        if device:
            self.model.device = torch.device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segmented = [s for s in batch["segmented"] if isinstance(s, SegmentedImage)]
        cells = self.model.classify(segmented)
        by_image = dict(tuple(cells.groupby("image_id", sort=False)))
        sizes = {s.image_id: (s.width, s.height) for s in segmented}
        ids = [str(i) for i in batch["image_id"]]
        return {  # the crops stay here: only the cell rows go back to the driver
            "image_id": batch["image_id"],
            "error": np.array([s.reason if isinstance(s, _Skipped) else "" for s in batch["segmented"]], dtype=object),
            "width": np.array([sizes.get(i, (0, 0))[0] for i in ids]),
            "height": np.array([sizes.get(i, (0, 0))[1] for i in ids]),
            "cells": _object_array([by_image.get(i, cells.iloc[:0]) for i in ids]),
        }


def _predict_ray(model_uri, data_root, ids, split, batch_size, num_workers, device, progress, members, masks=None):
    """The two-stage Ray Data pipeline of the module docstring."""
    if not ray.is_initialized():
        ray.init()  # a local Ray, or the cluster this process runs in
    # Declared, not sniffed: the network actor asks for a GPU when told to run on one, so an
    # autoscaling cluster with no GPU node yet starts one.
    gpus = 1 if device == "cuda" else 0
    num_workers = num_workers or max(1, int(cluster_shape().most("CPU")) - 1)
    # Actors load the model themselves, so they need the tracking server (or SQLite file) and a
    # model path that do not depend on their working directory.
    tracking_uri = tracking.tracking_uri(mlflow.get_tracking_uri())
    model_uri = model_uri if ":" in model_uri else str(Path(model_uri).resolve())
    # One block per image so idle actors pick up single images and the driver sees each result.
    dataset = ray.data.from_items([{"image_id": i} for i in ids], override_num_blocks=max(1, len(ids)))
    dataset = dataset.map_batches(
        _Segment, fn_constructor_kwargs=dict(model_uri=model_uri, tracking_uri=tracking_uri, data_root=data_root,
                                             split=split, masks=masks),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_workers), batch_size=1, num_cpus=1,
    )
    dataset = dataset.map_batches(
        _Classify, fn_constructor_kwargs=dict(model_uri=model_uri, tracking_uri=tracking_uri, device=device,
                                    members=members),
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=batch_size, num_cpus=1, num_gpus=gpus,
    )
    dataset.context.enable_progress_bars = False  # ours below counts cells too
    dataset.context.enable_fallback_to_arrow_object_ext_type = True
    report, cells, images = hpa.BatchReport(), [], []
    start = time.perf_counter()
    with tqdm(total=len(ids), unit="img", desc="predict", disable=not progress) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for image_id, error, width, height, table in zip(batch["image_id"], batch["error"], batch["width"],
                                                             batch["height"], batch["cells"]):
                if error:
                    report.skipped.append((str(image_id), str(error)))
                else:
                    report.n_ok += 1
                    cells.append(table)
                    images.append((str(image_id), int(width), int(height), len(table)))
                bar.update(1)
            n_cells = sum(len(t) for t in cells)
            bar.set_postfix(cells_per_s=f"{n_cells / (time.perf_counter() - start):.0f}", refresh=False)
    return _results(cells, images, report, None)


def _object_array(items: list) -> np.ndarray:
    """A 1-D object array of ``items`` (``np.array`` would unpack DataFrames into a 3-D array)."""
    array = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        array[i] = item
    return array
