"""Submission encoding: mask RLE round trips and the CSV written then read back."""

import base64
import zlib

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from ensemble.serving.submission import (
    Detection,
    SubmissionImage,
    cell_detections,
    decode_mask,
    encode_mask,
    read_submission,
    write_submission,
)


def competition_encode_binary_mask(mask: np.ndarray) -> str:
    """The competition's reference ``encode_binary_mask``, as published by the organisers."""
    mask = np.asfortranarray(mask.astype(np.uint8))
    rle = coco_mask.encode(mask)
    compressed = zlib.compress(rle["counts"], zlib.Z_BEST_COMPRESSION)
    return base64.b64encode(compressed).decode()


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (50, 31)])
@pytest.mark.parametrize("fill", ["random", "empty", "full"])
def test_mask_round_trip(shape, fill):
    rng = np.random.default_rng(sum(shape))
    masks = {"random": rng.random(shape) < 0.3, "empty": np.zeros(shape, bool), "full": np.ones(shape, bool)}
    mask = masks[fill]
    text = encode_mask(mask)
    assert text == competition_encode_binary_mask(mask)
    decoded = decode_mask(text, *shape)
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, mask)


def test_submission_written_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    instance = rng.integers(0, 4, size=(30, 45)).astype(np.uint16)  # cells 1..3, non-square
    scores = rng.random((3, 19))
    blob = rng.random((20, 20)) < 0.5
    images = {
        "img-a": SubmissionImage(45, 30, cell_detections(instance, [1, 2, 3], scores, min_confidence=0.5)),
        "img-b": SubmissionImage(
            20, 20, [Detection(18, 0.125, blob), Detection(0, 1.0, np.zeros((20, 20), bool))]
        ),
        "img-c": SubmissionImage(8, 8, []),
    }
    path = tmp_path / "submission.csv"
    write_submission(images, path)
    assert path.read_text().splitlines()[0] == "ID,ImageWidth,ImageHeight,PredictionString"

    read = read_submission(path)
    assert list(read) == list(images)
    kept = np.argwhere(scores >= 0.5)
    assert len(read["img-a"].detections) == len(kept)
    for detection, (row, class_id) in zip(read["img-a"].detections, kept):
        assert detection.class_id == class_id
        assert detection.confidence == pytest.approx(scores[row, class_id], rel=1e-5)
        np.testing.assert_array_equal(detection.mask, instance == row + 1)
    blob_read, empty_read = read["img-b"].detections
    assert (blob_read.class_id, blob_read.confidence, empty_read.confidence) == (18, 0.125, 1.0)
    np.testing.assert_array_equal(blob_read.mask, blob)
    assert not empty_read.mask.any() and empty_read.mask.shape == (20, 20)
    assert (read["img-c"].width, read["img-c"].height, read["img-c"].detections) == (8, 8, [])


def test_prediction_string_not_in_triples(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("ID,ImageWidth,ImageHeight,PredictionString\nx,4,4,0 0.5\n")
    with pytest.raises(ValueError, match="image 'x': 2 tokens"):
        read_submission(path)
