"""Evaluation that streams: RLEs of a whole instance mask at once, the rows of a submission one
image at a time, and scores equal to the in-memory metrics, with the images nobody predicted
counted as missed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as coco_mask

from ensemble.data.hpa import read_truth
from ensemble.data.segment import match_cells
from ensemble.serving.evaluate import COUNTS, compare, compare_pairs, evaluate
from ensemble.labels import NUM_CLASSES
from ensemble.metrics import MaskedCells, cell_map, competition_map
from ensemble.oof import CELL_COLUMNS
from ensemble.serving.model import OUTPUT_COLUMNS
from ensemble.serving.submission import (Detection, SubmissionImage, cell_rles, encode_cells, encode_mask, iter_submission,
                                 read_submission, write_submission)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (50, 31)])
def test_cell_rles_equal_each_cells_own_encoding(shape):
    rng = np.random.default_rng(sum(shape))
    for labels in (rng.integers(0, 5, shape), np.zeros(shape, int), np.full(shape, 3)):
        ids = [1, 2, 3, 4, 9]  # 9 is absent: an empty mask
        assert encode_cells(labels.astype(np.uint16), ids) == [encode_mask(labels == i) for i in ids]
        areas = coco_mask.area(cell_rles(labels, ids))
        np.testing.assert_array_equal(areas, [(labels == i).sum() for i in ids])


def test_a_submission_streams_row_by_row(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for k in range(40):
        labels = rng.integers(0, 3, (9, 11))
        images[f"img{k}"] = SubmissionImage(11, 9, [Detection(c, float(rng.random()), labels == cell)
                                                    for cell in (1, 2) for c in range(3)] if k % 7 else [])
    write_submission(images, tmp_path / "s.csv")
    streamed = list(iter_submission(tmp_path / "s.csv", rows_per_chunk=16))
    read = read_submission(tmp_path / "s.csv")
    assert [row[0] for row in streamed] == list(read) == list(images)
    for (image_id, width, height, triples), image in zip(streamed, read.values()):
        assert (width, height) == (image.width, image.height) and len(triples) == len(image.detections)
        for (class_id, confidence, text), detection in zip(triples, image.detections):
            assert (class_id, confidence) == (detection.class_id, detection.confidence)
            assert encode_mask(detection.mask) == text


def shifted_predictions(root, ids, seed=0):
    """Predictions off the truth: each true mask moved by (2, 3) px, one cell per image left out,
    random scores (4 decimals, so the CSV keeps them exactly)."""
    truth = read_truth(root)
    rng = np.random.default_rng(seed)
    predicted = {}
    for image_id in ids:
        mask = np.roll(truth.mask(image_id), (2, 3), axis=(0, 1))
        cell_ids = np.unique(mask)[1:]
        mask[mask == cell_ids[0]] = 0
        cell_ids = cell_ids[1:]
        predicted[image_id] = MaskedCells(mask, cell_ids, np.round(rng.random((len(cell_ids), NUM_CLASSES)), 4))
    return predicted


def in_memory_scores(predicted, root, iou=0.6):
    """The metrics on whole masks held in memory, as evaluate computed them before it streamed."""
    truth = read_truth(root)
    true_cells = {i: MaskedCells(truth.mask(i), *truth.cell_labels(i)) for i in truth.image_ids}
    labels, scores = [], []
    for image_id, cells in predicted.items():
        true_ids, true_labels = truth.cell_labels(image_id)
        matches = match_cells(cells.mask, true_cells[image_id].mask, iou=iou)
        rows = pd.Index(cells.cell_ids).get_indexer(matches.pred_id)
        label_rows = pd.Index(true_ids).get_indexer(matches.true_id)
        hit = matches.matched & (label_rows >= 0)
        image_labels = np.zeros((len(rows), NUM_CLASSES))
        image_labels[hit] = true_labels[label_rows[hit]]
        labels.append(image_labels)
        scores.append(cells.values[rows])
    return cell_map(np.concatenate(labels), np.concatenate(scores)), competition_map(predicted, true_cells, iou)


def test_streaming_scores_equal_the_in_memory_metrics_and_count_missed_images(small_dataset, tmp_path):
    ids = read_truth(small_dataset).image_ids
    predicted = shifted_predictions(small_dataset, ids[:6])
    rows = [{"image_id": i, "cell_id": int(c), **dict(zip(CELL_COLUMNS, v)), "integrity": 1.0,
             "rle": text, "width": cells.mask.shape[1], "height": cells.mask.shape[0]}
            for i, cells in predicted.items()
            for c, v, text in zip(cells.cell_ids, cells.values, encode_cells(cells.mask, cells.cell_ids))]
    pd.DataFrame(rows, columns=OUTPUT_COLUMNS).to_parquet(tmp_path / "p.parquet")
    submission = {i: SubmissionImage(c.mask.shape[1], c.mask.shape[0],
                                     [Detection(k, float(v[k]), c.mask == cell) for cell, v in zip(c.cell_ids, c.values)
                                      for k in range(NUM_CLASSES)]) for i, c in predicted.items()}
    submission[ids[6]] = SubmissionImage(256, 256, [])  # predicted, but no cell: missed as well
    submission["not-in-truth"] = SubmissionImage(256, 256, [])
    write_submission(submission, tmp_path / "p.csv")
    cell, competition = in_memory_scores(predicted, small_dataset)
    assert 0.1 < competition.map < 0.9, "a case where misses and shifts matter"
    for path in (tmp_path / "p.parquet", tmp_path / "p.csv"):
        result = evaluate(path, small_dataset)
        assert result.competition.map == pytest.approx(competition.map, abs=1e-9)
        pd.testing.assert_series_equal(result.competition.per_class, competition.per_class, atol=1e-9)
        assert result.cell.map == pytest.approx(cell.map, abs=1e-9)
        assert result.n_images == len(ids) == 24 and result.n_missed == 18
        assert result.n_cells == sum(len(c.cell_ids) for c in predicted.values())
        assert result.n_unknown == (path.suffix == ".csv")
        assert "24 images with truth, 18 of them without any predicted cell" in result.report()
        assert COUNTS in result.report()
    # The images nobody predicted are what keeps the competition metric down.
    only_predicted = competition_map(predicted, {i: MaskedCells(read_truth(small_dataset).mask(i),
                                                               *read_truth(small_dataset).cell_labels(i))
                                                 for i in predicted})
    assert only_predicted.map > competition.map


def test_compare_gives_the_paired_difference_and_an_interval_that_tells_skill_from_the_choice_of_images(
        small_dataset, tmp_path):
    truth = read_truth(small_dataset)
    rng = np.random.default_rng(1)
    rows = []
    for image_id in truth.image_ids:
        mask = truth.mask(image_id)
        cell_ids, labels = truth.cell_labels(image_id)
        informed = np.clip(labels + rng.normal(0, 0.4, labels.shape), 0, 1)  # knows the truth, noisily
        for cell_id, text, good, guess in zip(cell_ids, encode_cells(mask, cell_ids), informed,
                                              rng.random((len(cell_ids), NUM_CLASSES))):
            rows.append({"image_id": image_id, "cell_id": int(cell_id), **dict(zip(CELL_COLUMNS, good)),
                         "integrity": 1.0, "rle": text, "width": mask.shape[1], "height": mask.shape[0],
                         **{f"guess.{c}": v for c, v in zip(CELL_COLUMNS, guess)},
                         **{f"same.{c}": v for c, v in zip(CELL_COLUMNS, good)}})
    path = tmp_path / "p.parquet"
    pd.DataFrame(rows).to_parquet(path)
    ensemble, guess = evaluate(path, small_dataset), evaluate(path, small_dataset, member="guess")

    result = compare(path, small_dataset, "guess", n_resamples=200)
    assert result.n_images == 24
    np.testing.assert_allclose(result.table["candidate"], [ensemble.competition.map, ensemble.cell.map])
    np.testing.assert_allclose(result.table["baseline"], [guess.competition.map, guess.cell.map])
    assert (result.table["low"] < result.table["difference"]).all()
    assert (result.table["difference"] < result.table["high"]).all()
    assert result.beats("cell_map") and result.beats("competition_map")
    assert "ensemble - guess: competition +" in result.report()
    # The same scores under another name: no difference on any resample.
    same = compare(path, small_dataset, "same", n_resamples=50)
    assert (same.table[["difference", "low", "high"]] == 0).all().all() and not same.beats()
    # The other way round, the interval is the mirror image.
    reverse = compare(path, small_dataset, "ensemble", candidate="guess", n_resamples=200)
    np.testing.assert_allclose(reverse.table["difference"], -result.table["difference"])
    # Several pairs on images matched once: each as alone.
    both = compare_pairs(path, small_dataset, [("ensemble", "guess"), ("guess", "ensemble")], n_resamples=200)
    pd.testing.assert_frame_equal(both[0].table, result.table)
    pd.testing.assert_frame_equal(both[1].table, reverse.table)
    with pytest.raises(ValueError, match=r"p.parquet: no scores of 'gues'.*'guess'"):
        compare(path, small_dataset, "gues")
