"""The Kaggle HPA single-cell submission file: per image, cells as (class, confidence, mask RLE).

CSV columns ``ID,ImageWidth,ImageHeight,PredictionString``; the prediction string is a
space-separated list of ``class confidence rle`` triples, where ``rle`` is the competition's
``encode_binary_mask``: base64 of the zlib-compressed COCO RLE counts of the mask in Fortran
order. An image with no cells has an empty prediction string.
"""

from __future__ import annotations

import base64
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools import mask as coco_mask

COLUMNS = ["ID", "ImageWidth", "ImageHeight", "PredictionString"]


@dataclass(frozen=True)
class Detection:
    """One predicted cell for one class.

    Attributes
    ----------
    class_id : int
        Class id 0..18.
    confidence : float
        Score of the class for the cell.
    mask : numpy.ndarray or str
        (H, W) binary mask of the cell, or that mask already encoded by :func:`encode_mask`
        (so a cell listed for 19 classes is encoded once, see :func:`cell_detections`).
    """

    class_id: int
    confidence: float
    mask: np.ndarray | str


@dataclass(frozen=True)
class SubmissionImage:
    """The submission row of one image: its size and its detections."""

    width: int
    height: int
    detections: list[Detection]


def encode_mask(mask: np.ndarray) -> str:
    """Encode a binary (H, W) mask exactly as the competition's ``encode_binary_mask``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return rle_text(coco_mask.encode(np.asfortranarray(mask.astype(np.uint8))))


def encode_cells(cells: np.ndarray, cell_ids: Sequence[int]) -> list[str]:
    """:func:`encode_mask` of ``cells == i`` for each id, from one pass over the instance mask."""
    return [rle_text(rle) for rle in cell_rles(cells, cell_ids)]


def cell_rles(cells: np.ndarray, cell_ids: Sequence[int]) -> list[dict]:
    """pycocotools RLEs of the given cells of an (H, W) instance mask (0 = background).

    Equal to ``pycocotools.mask.encode`` of each cell's binary mask, but the pixels are read once
    for all cells: O(pixels + runs) instead of a full-size binary mask per cell (25 cells of a
    2048 px image would be 25 passes over 4 M pixels).
    """
    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {cells.shape}")
    height, width = cells.shape
    flat = cells.ravel(order="F")  # COCO runs go down the columns
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    stops = np.append(starts[1:], flat.size)
    order = np.argsort(flat[starts], kind="stable")  # runs of each label together, in pixel order
    labels = flat[starts][order]
    ids = np.asarray(cell_ids, dtype=np.int64)
    first, last = np.searchsorted(labels, ids, "left"), np.searchsorted(labels, ids, "right")
    objects = []
    for a, b in zip(first, last):
        begin, end = starts[order[a:b]], stops[order[a:b]]
        counts = np.empty(2 * len(begin) + 1, np.int64)
        counts[0:-1:2] = begin - np.concatenate([[0], end[:-1]])  # background before each run
        counts[1::2] = end - begin
        counts[-1] = flat.size - (end[-1] if len(end) else 0)
        # COCO leaves out a final empty background run.
        objects.append({"size": [height, width], "counts": (counts if counts[-1] else counts[:-1]).tolist()})
    return coco_mask.frPyObjects(objects, height, width) if objects else []


def rle_text(rle: dict) -> str:
    """The submission's text of a pycocotools RLE: base64 of its zlib-compressed counts."""
    return base64.b64encode(zlib.compress(rle["counts"], zlib.Z_BEST_COMPRESSION)).decode("ascii")


def text_rle(text: str, height: int, width: int) -> dict:
    """The pycocotools RLE of a submission mask text (:func:`rle_text`), without decoding the mask."""
    return {"size": [int(height), int(width)], "counts": zlib.decompress(base64.b64decode(text))}


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """Decode the text of :func:`encode_mask` back to an (height, width) bool mask."""
    with warnings.catch_warnings():
        # pycocotools 2.0.11's compiled decoder trips a NumPy 2 deprecation inside itself;
        # the result is correct, and the warning is not the caller's to act on.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return coco_mask.decode(text_rle(text, height, width)).astype(bool)


def cell_detections(
    mask: np.ndarray,
    cell_ids: np.ndarray,
    scores: np.ndarray,
    min_confidence: float = 0.0,
) -> list[Detection]:
    """Detections of every cell for every class, each cell's mask encoded once.

    Parameters
    ----------
    mask : array (H, W)
        Instance mask, 0 = background.
    cell_ids : array (n,)
        Instance label of each cell.
    scores : array (n, 19)
        Class scores of each cell.
    min_confidence : float
        Scores below this are left out (AP does not need them; they only make the file larger).
    """
    scores = np.asarray(scores, dtype=float)
    detections = []
    for cell_id, cell_scores in zip(cell_ids, scores):
        text = encode_mask(mask == cell_id)
        kept = np.flatnonzero(cell_scores >= min_confidence)
        detections.extend(Detection(int(c), float(cell_scores[c]), text) for c in kept)
    return detections


def write_submission(images: Mapping[str, SubmissionImage], path: str | Path) -> None:
    """Write the submission CSV, one row per image, in the order of ``images``.

    Confidences are written with 6 significant digits, which keeps the file small and every
    ranking that AP depends on (up to ties below 1e-6 relative).
    """
    rows = []
    for image_id, image in images.items():
        triples = []
        for detection in image.detections:
            text = detection.mask if isinstance(detection.mask, str) else encode_mask(detection.mask)
            triples.append(f"{detection.class_id} {detection.confidence:.6g} {text}")
        rows.append((image_id, image.width, image.height, " ".join(triples)))
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, index=False)


def read_submission(path: str | Path) -> dict[str, SubmissionImage]:
    """Read a submission CSV; every detection's mask is decoded to an (H, W) bool array.

    Raises
    ------
    ValueError
        A missing column, or a prediction string that is not made of triples (the message names
        the file and the image ID).
    """
    images = {}
    for image_id, width, height, triples in iter_submission(path):
        # A cell appears once per class with the same RLE text: decode each text once.
        masks: dict[str, np.ndarray] = {}
        detections = []
        for class_id, confidence, rle in triples:
            if rle not in masks:
                masks[rle] = decode_mask(rle, height, width)
            detections.append(Detection(class_id, confidence, masks[rle]))
        images[image_id] = SubmissionImage(width, height, detections)
    return images


def iter_submission(path: str | Path, rows_per_chunk: int = 16) -> Iterator[tuple[str, int, int, list[tuple[int, float, str]]]]:
    """The rows of a submission CSV one image at a time, masks left as text.

    Yields ``(image_id, width, height, [(class_id, confidence, rle text), ...])``; only
    ``rows_per_chunk`` rows are held at once, so a file of thousands of images streams.

    Raises
    ------
    ValueError
        As :func:`read_submission`.
    """
    options = dict(dtype={"ID": str, "PredictionString": str}, keep_default_na=False)
    missing = [column for column in COLUMNS if column not in pd.read_csv(path, nrows=0, **options).columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    with pd.read_csv(path, usecols=COLUMNS, chunksize=rows_per_chunk, **options) as chunks:
        for chunk in chunks:
            for image_id, width, height, text in chunk[COLUMNS].itertuples(index=False):
                tokens = text.split()
                if len(tokens) % 3:
                    raise ValueError(
                        f"{path}: image {image_id!r}: {len(tokens)} tokens, not class-confidence-rle triples"
                    )
                triples = [(int(c), float(p), rle) for c, p, rle in zip(tokens[0::3], tokens[1::3], tokens[2::3])]
                yield image_id, int(width), int(height), triples
