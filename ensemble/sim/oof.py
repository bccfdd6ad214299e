"""Synthetic OOF predictions with known blocks, known best members and known fusion behaviour.

Generative model (class-major, per cell ``c`` and class ``k``)::

    image labels     y_img[i, k] ~ Bernoulli(prevalence[k]); an image without labels gets Negative
    cell truth       y[c, k] = y_img[image(c), k] and u < fraction[k]
    cell stream      p_m = sigmoid(-3 + signal_m * y + shared + family_f(m) + own_m)

with Gaussian ``shared`` (all models), ``family`` (one draw per family: models of a family share
it, so they correlate strongly and form a block) and ``own`` (per model) noise. Within a family the
signal falls with the model's index, so ``<head>_<family>_0`` is the family's best model. DSA
models add an image stream, constant over an image's cells::

    image stream     q_m = sigmoid(-2 + image_signal[k] * y_img + family image noise + own image noise)

The image stream is informative for most classes, where fusing it helps, and nearly noise for the
``over_labelled`` classes (the paper's mitotic spindle, centrosome and aggresome), whose cells
also carry the class less often than their image does; there fusing hurts and the two streams
correlate weakly. Everything is generated in float32, a chunk of images at a time, straight into
the final arrays, so 50 models x 1.2M cells need little more than their 4.6 GB.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ensemble.labels import NEGATIVE, NUM_CLASSES
from ensemble.oof import LABEL_COLUMNS, OOFSet

DEFAULT_FAMILIES: dict[str, tuple[str, int]] = {
    "effnet": ("dsa", 3),
    "nfnet": ("dsa", 2),
    "resnet": ("cla", 3),
    "swin": ("cla", 2),
    "scatter": ("clh", 2),
}


@dataclass(frozen=True, eq=False)
class SyntheticOOF:
    """Output of :func:`make_synthetic_oof`.

    Attributes
    ----------
    oof : OOFSet
    labels : DataFrame
        ``image_id, cell_id, fold, label_0..label_18, cell_truth``.
    family : dict of str to str
        Model -> family (the true blocks).
    signal : dict of str to float
        Model -> its signal strength (higher is better).
    """

    oof: OOFSet
    labels: pd.DataFrame
    family: dict[str, str]
    signal: dict[str, float]


def make_synthetic_oof(
    n_images: int = 200,
    cells_per_image: int = 10,
    n_folds: int = 5,
    families: Mapping[str, tuple[str, int]] | None = None,
    *,
    over_labelled: Collection[int] = (11, 12, 15),
    truth_fraction: float = 1.0,
    chunk_images: int = 2000,
    seed: int = 0,
) -> SyntheticOOF:
    """Simulate the OOF predictions of a model zoo.

    Parameters
    ----------
    n_images, cells_per_image : int
        ``n_images * cells_per_image`` cells; images are split into ``n_folds`` contiguous folds.
    n_folds : int
    families : mapping of family to (head, n_models), optional
        Heads ``dsa`` get an image stream. Default :data:`DEFAULT_FAMILIES` (12 models).
    over_labelled : collection of int
        Classes the image stream over-labels (fusion should leave them to the cell stream).
    truth_fraction : float
        Fraction of images whose cells carry cell-level truth in ``labels``; the others carry
        their image labels (``cell_truth`` False).
    chunk_images : int
        Images generated at a time (bounds the temporaries).
    seed : int

    Returns
    -------
    SyntheticOOF
    """
    families = dict(DEFAULT_FAMILIES if families is None else families)
    if n_images < n_folds or cells_per_image < 1 or n_folds < 1:
        raise ValueError("need n_images >= n_folds >= 1 and cells_per_image >= 1")
    rng = np.random.default_rng(seed)
    n_cells = n_images * cells_per_image
    over = np.zeros(NUM_CLASSES, dtype=bool)
    over[list(over_labelled)] = True
    prevalence = np.linspace(0.30, 0.04, NUM_CLASSES)
    cell_fraction = np.where(over, 0.4, 0.85)
    image_signal = np.where(over, 0.3, 2.5).astype(np.float32)[:, None]

    image_labels = rng.random((NUM_CLASSES, n_images)) < prevalence[:, None]
    image_labels[NEGATIVE, ~image_labels.any(axis=0)] = True
    family_signal = {f: rng.uniform(2.0, 3.0) for f in families}
    models: list[tuple[str, str, str, float]] = [
        (f"{head}_{f}_{j}", f, head, family_signal[f] * (1 - 0.15 * j))
        for f, (head, count) in families.items()
        for j in range(count)
    ]
    cell = {name: np.empty((NUM_CLASSES, n_cells), dtype=np.float32) for name, *_ in models}
    image = {name: np.empty((NUM_CLASSES, n_cells), dtype=np.float32) for name, _, head, _ in models if head == "dsa"}
    truth = np.empty((NUM_CLASSES, n_cells), dtype=bool)

    def normal(shape, scale):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    for i0 in range(0, n_images, chunk_images):
        i1 = min(i0 + chunk_images, n_images)
        rows = slice(i0 * cells_per_image, i1 * cells_per_image)
        labels_here = np.repeat(image_labels[:, i0:i1], cells_per_image, axis=1)
        y = labels_here & (rng.random(labels_here.shape, dtype=np.float32) < cell_fraction[:, None])
        truth[:, rows] = y
        shared = normal(y.shape, 0.6)
        y_img = image_labels[:, i0:i1].astype(np.float32)
        for f in families:
            family_noise = shared + normal(y.shape, 1.2)
            family_image_noise = normal(y_img.shape, 0.8)
            for name, model_family, head, signal in models:
                if model_family != f:
                    continue
                logit = family_noise + normal(y.shape, 0.5)
                logit += np.float32(signal) * y - np.float32(3.0)
                cell[name][:, rows] = _sigmoid(logit)
                if head == "dsa":
                    image_logit = image_signal * y_img - np.float32(2.0) + family_image_noise + normal(y_img.shape, 0.5)
                    image[name][:, rows] = np.repeat(_sigmoid(image_logit), cells_per_image, axis=1)

    image_of_cell = np.repeat(np.arange(n_images), cells_per_image)
    index = pd.DataFrame(
        {
            "image_id": pd.array([f"img_{i:07d}" for i in range(n_images)], dtype="str")[image_of_cell],
            "cell_id": np.tile(np.arange(1, cells_per_image + 1), n_images),
            "fold": (image_of_cell * n_folds // n_images).astype(np.int64),
        }
    )
    has_truth = (rng.random(n_images) < truth_fraction)[image_of_cell]
    label_values = np.where(has_truth, truth, image_labels[:, image_of_cell]).T.astype(np.uint8)
    labels = pd.concat([index, pd.DataFrame(label_values, columns=list(LABEL_COLUMNS))], axis=1)
    labels["cell_truth"] = has_truth
    tags = {name: {"head": head, "backbone": f, "family": f} for name, f, head, _ in models}
    return SyntheticOOF(
        oof=OOFSet(index=index, cell=cell, image=image, tags=tags),
        labels=labels,
        family={name: f for name, f, *_ in models},
        signal={name: float(signal) for name, *_, signal in models},
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """In-place float32 logistic function (no float64 temporaries)."""
    np.negative(x, out=x)
    np.exp(x, out=x)
    x += np.float32(1.0)
    return np.reciprocal(x, out=x)
