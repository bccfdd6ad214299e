"""Cells cut out of an image: one instance mask -> per-cell features and fixed-size crops.

The cell store is built from these crops and the registered ensemble cuts new images with the
same :func:`cut_cells`, so a network sees a cell at serving time exactly as it saw cells in
training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ensemble.data import hpa
from ensemble.data.features import FeatureSettings, cell_features
from ensemble.data.segment import image_cells, match_cells
from ensemble.labels import CHANNELS, NUM_CLASSES

CROP_DTYPE = np.uint8
TRUTH_IOU = 0.5  # a segmented cell takes the labels of the true cell it overlaps at this IoU


@dataclass
class ImageCells:
    """The cells of one image, as a worker hands them to the driver.

    Attributes
    ----------
    image_id : str
    table : pandas.DataFrame
        Features per cell (:func:`~ensemble.data.features.cell_features`), plus ``truth_iou``
        and ``truth_captured`` when truth is known.
    crops : ndarray of uint8, shape (n, 4, S, S)
    truth_labels : ndarray of float32, shape (n, 19), or None when the dataset has no truth
    error : str or None
        Why the image was skipped (then it has no cells).
    """

    image_id: str
    table: pd.DataFrame
    crops: np.ndarray
    truth_labels: np.ndarray | None = None
    error: str | None = None


def crop_cells(image: np.ndarray, cells: np.ndarray, table: pd.DataFrame, cell_size: int) -> np.ndarray:
    """Cut every cell out of an image as an S x S crop.

    Each crop is the cell's bounding box with the cell's own mask applied (so neighbours are
    zero), zero-padded to a centred square and resized to ``size`` with area interpolation.

    Parameters
    ----------
    image : ndarray of shape (H, W, 4), float in [0, 1]
    cells : ndarray of shape (H, W), instance labels
    table : DataFrame with ``cell_id, y0, x0, y1, x1``
    cell_size : int

    Returns
    -------
    ndarray of uint8, shape (n, 4, cell_size, cell_size)
    """
    crops = np.zeros((len(table), len(CHANNELS), cell_size, cell_size), dtype=CROP_DTYPE)
    for i, (cell_id, y0, x0, y1, x1) in enumerate(table[["cell_id", "y0", "x0", "y1", "x1"]].itertuples(index=False)):
        patch = image[y0:y1, x0:x1] * (cells[y0:y1, x0:x1] == cell_id)[..., None]
        height, width = patch.shape[:2]
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        patch = cv2.copyMakeBorder(
            patch, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0
        )
        patch = cv2.resize(patch, (cell_size, cell_size), interpolation=cv2.INTER_AREA)
        crops[i] = np.rint(np.clip(patch, 0, 1) * 255).astype(CROP_DTYPE).transpose(2, 0, 1)
    return crops


def cut_cells(image: np.ndarray, cells: np.ndarray, cell_size: int,
              features: FeatureSettings | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Measure and crop every cell of a segmented image.

    Parameters
    ----------
    image : ndarray of shape (H, W, 4), float in [0, 1]
    cells : ndarray of shape (H, W)
        Instance labels (0 = background), from a segmenter or a given mask.
    cell_size : int
        Crop side S.
    features : FeatureSettings, optional

    Returns
    -------
    table : DataFrame
        :func:`~ensemble.data.features.cell_features` of every cell, in cell id order.
    crops : ndarray of uint8, shape (n, 4, S, S)
    """
    table = cell_features(image, cells, features)
    return table, crop_cells(image, cells, table, cell_size)


def process_image(
    root: str | Path,
    image_id: str,
    segmenter,
    cell_size: int,
    split: str = "train",
    truth: hpa.Truth | None = None,
    features: FeatureSettings | None = None,
) -> ImageCells:
    """Read, segment (or take the given mask), measure and crop one image.

    A bad image does not raise: the result carries its ``error`` and no cells. Its truth is
    checked here too (a missing or misshapen truth mask of an image the truth table lists), so
    bad truth skips the image and names it rather than ending the whole build.

    Parameters
    ----------
    root : dataset root
    image_id : str
    segmenter : callable image -> Segmentation
    cell_size : int
        Crop side S.
    split : str
    truth : hpa.Truth, optional
        Ground truth: adds ``truth_labels``, ``truth_iou``, ``truth_captured``.
    features : FeatureSettings, optional
    """
    true_mask = None
    try:
        image = hpa.read_image(root, image_id, split)
        given = hpa.check_given_mask(hpa.read_given_mask(root, image_id), image, image_id)
        if truth is not None and len(truth.cell_labels(image_id)[0]):
            true_mask = truth.mask(image_id)
            if true_mask.shape != image.shape[:2]:
                raise hpa.DatasetError(f"{truth.root}/masks/{image_id}.png: truth mask of shape {true_mask.shape}, "
                                       f"image {image.shape[:2]}")
    except hpa.DatasetError as error:
        # A blank 1-pixel image yields the cell table's columns, typed and empty.
        image, cells, reason = np.zeros((1, 1, len(CHANNELS)), np.float32), np.zeros((1, 1), np.uint16), str(error)
        true_mask = None
    else:
        cells = image_cells(image, segmenter, given).cells
        reason = None
    table, crops = cut_cells(image, cells, cell_size, features)
    truth_labels = None
    if truth is not None:
        truth_labels = _attach_truth(table, cells, truth, image_id, true_mask)
    return ImageCells(image_id, table, crops, truth_labels, reason)


def _attach_truth(table: pd.DataFrame, cells: np.ndarray, truth: hpa.Truth, image_id: str,
                  true_mask: np.ndarray | None) -> np.ndarray:
    """Add ``truth_iou``/``truth_captured`` to ``table``; return the (n, 19) truth labels.

    A segmented cell takes the labels of the true cell it matches at IoU >= 0.5 (NaN if none).
    ``truth_captured`` is the share of that true cell which is both in the image (the truth's
    ``captured``) and inside the segmented cell: what the VID's capture-ratio model predicts.
    ``true_mask`` is None for an image without true cells.
    """
    n = len(table)
    labels = np.full((n, NUM_CLASSES), np.nan, np.float32)
    table["truth_iou"] = np.zeros(n, np.float32)
    table["truth_captured"] = np.zeros(n, np.float32)
    true_ids, true_labels = truth.cell_labels(image_id)
    if n == 0 or true_mask is None:
        return labels
    matches = match_cells(cells, true_mask, iou=TRUTH_IOU)
    rows = pd.Index(true_ids).get_indexer(matches.true_id)  # -1: background or unlabelled cell
    known = rows >= 0
    captured = np.ones(len(true_ids))
    if "captured" in truth.cells:
        per_image = truth.cells[truth.cells["ID"] == image_id].set_index("cell_id")["captured"]
        captured = per_image.reindex(true_ids).fillna(1.0).to_numpy()
    labels[matches.matched & known] = true_labels[rows[matches.matched & known]]
    table["truth_iou"] = matches.iou.astype(np.float32)
    table["truth_captured"] = np.where(known, captured[rows] * matches.true_share, 0.0).astype(np.float32)
    return labels
