"""K folds over images, stratified on the 19 image labels.

Folds are assigned to images, never to cells: cells of one image share its fold, so no image
leaks between a model's training and its out-of-fold predictions.
"""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit


def assign_folds(image_labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Assign each image to one of ``n_folds`` folds by iterative stratification.

    Parameters
    ----------
    image_labels : ndarray of shape (n_images, n_classes)
        Multi-hot image labels (rows in a fixed order, e.g. sorted by image id).
    n_folds : int
        Number of folds, at least 2 and at most ``n_images``.
    seed : int
        Seed of the shuffling; the same labels and seed give the same folds.

    Returns
    -------
    ndarray of shape (n_images,)
        Fold index in ``0..n_folds-1`` of each image.
    """
    labels = np.asarray(image_labels)
    if labels.ndim != 2:
        raise ValueError(f"image_labels must be 2-D (n_images, n_classes), got shape {labels.shape}")
    if not 2 <= n_folds <= len(labels):
        raise ValueError(f"n_folds must be between 2 and the number of images ({len(labels)}), got {n_folds}")
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[held_out] = fold
    return folds


def inner_split(image_labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Set aside a stratified share of a job's training images as its inner validation split.

    Early stopping and the choice of epoch are made on these images, so the held-out fold is
    predicted once, by weights that none of its labels helped to choose.

    Parameters
    ----------
    image_labels : ndarray of shape (n_images, n_classes)
        Multi-hot labels of the training folds' images.
    fraction : float
        Share of the images in the split, in (0, 1); at least one image is taken, and at
        least one is left to train on.
    seed : int

    Returns
    -------
    ndarray of bool, shape (n_images,)
        True for the images of the inner validation split.
    """
    labels = np.asarray(image_labels)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if len(labels) < 2:
        raise ValueError(f"an inner validation split needs at least 2 training images, got {len(labels)}")
    size = min(max(1, round(fraction * len(labels))), len(labels) - 1)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=size, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(labels)), labels))
    inner = np.zeros(len(labels), dtype=bool)
    inner[held] = True
    return inner
