"""Segmentation: the classical segmenter's quality on the simulator, matching, the adapters."""

import sys
import types

import numpy as np
import pytest
import torch
from skimage.draw import disk

from ensemble.data.hpacellseg import HPACellSegmenterUnavailable, label_cell_predictions
from ensemble.data.segment import (
    ClassicalSegmenter,
    ClassicalSettings,
    create_segmenter,
    from_given_mask,
    match_cells,
)
from ensemble.sim.images import simulate_image


def test_classical_segmenter_matches_90_percent_of_medium_cells():
    segmenter = ClassicalSegmenter()
    matched = n_true = 0
    for index in range(6):
        sim = simulate_image([7, index], size=384, difficulty="medium")
        seg = segmenter(sim.image)
        assert seg.cells.shape == sim.cell_mask.shape and seg.cells.dtype == np.uint16
        matches = match_cells(seg.cells, sim.cell_mask, iou=0.6)
        matched += matches.matched.sum()
        n_true += matches.n_true
    assert matched / n_true >= 0.9


def test_cells_are_numbered_1_to_n_and_nuclei_carry_their_cell_id():
    sim = simulate_image([3, 0], size=256)
    seg = ClassicalSegmenter()(sim.image)
    ids = np.unique(seg.cells)
    assert list(ids) == list(range(ids.max() + 1))
    inside = seg.nuclei > 0
    assert inside.any() and np.array_equal(seg.nuclei[inside], seg.cells[inside])


def test_segmenting_at_work_size_returns_full_resolution_labels():
    sim = simulate_image([3, 1], size=1024)
    seg = ClassicalSegmenter(ClassicalSettings(work_size=256))(sim.image)
    assert seg.cells.shape == (1024, 1024)
    assert match_cells(seg.cells, sim.cell_mask, iou=0.6).recall > 0.7


def test_blank_image_has_no_cells():
    seg = ClassicalSegmenter()(np.zeros((128, 128, 4), np.float32))
    assert seg.cells.max() == 0 and seg.nuclei.max() == 0


def test_match_cells_counts_iou_and_shares():
    true = np.zeros((20, 20), np.uint16)
    true[0:10, 0:10] = 5  # area 100
    true[10:20, 10:20] = 9
    pred = np.zeros_like(true)
    pred[0:10, 0:10] = 2  # exact copy of true cell 5
    pred[10:20, 10:15] = 7  # half of true cell 9: IoU 0.5
    pred[0:5, 15:20] = 3  # on background
    m = match_cells(pred, true, iou=0.6)
    assert list(m.pred_id) == [2, 3, 7]
    assert list(m.true_id) == [5, 0, 9]
    np.testing.assert_allclose(m.iou, [1.0, 0.0, 0.5])
    np.testing.assert_allclose(m.true_share, [1.0, 0.0, 0.5])
    assert m.recall == 0.5 and m.false_cells == 2
    assert match_cells(pred, true, iou=0.5).recall == 1.0
    with pytest.raises(ValueError):
        match_cells(pred, true, iou=0.3)


def test_given_mask_keeps_its_ids_and_nuclei_are_the_blue_foreground():
    image = np.zeros((40, 40, 4), np.float32)
    cells = np.zeros((40, 40), np.uint16)
    cells[disk((20, 20), 15)] = 42
    image[disk((20, 20), 5) + (2,)] = 1.0
    seg = from_given_mask(image, cells)
    assert set(np.unique(seg.cells)) == {0, 42}
    assert set(np.unique(seg.nuclei)) == {0, 42}
    assert (seg.nuclei == 42).sum() == (image[..., 2] > 0).sum()


def test_hpacellseg_post_processing_runs_on_current_scikit_image():
    # Fake U-Net outputs (channel 2: interior, 1: borders) of two touching round cells.
    shape = (600, 600)
    nuclei_pred = np.zeros((*shape, 3), np.uint8)
    cell_pred = np.zeros((*shape, 3), np.uint8)
    for centre in ((300, 180), (300, 420)):
        cell_pred[..., 2][disk(centre, 125, shape=shape)] = 255
        nuclei_pred[..., 2][disk(centre, 50, shape=shape)] = 255
    seg = label_cell_predictions(nuclei_pred, cell_pred, downscale=0.5)
    assert seg.cells.max() == 2
    assert set(np.unique(seg.nuclei[seg.nuclei > 0])) == {1, 2}


def test_hpacellseg_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "hpacellseg", None)  # makes `import hpacellseg` fail
    with pytest.raises(HPACellSegmenterUnavailable) as error:
        create_segmenter("hpacellseg", nuclei_model_path="n.pth", cell_model_path="c.pth")
    assert isinstance(error.value, ImportError)
    message = str(error.value)
    for needed in ("pip install", "HPA-Cell-Segmentation/archive/master.zip", "pytorch_zoo",
                   "dpn_unet_nuclei_v1.pth", "dpn_unet_cell_3ch_v1.pth", "zenodo"):
        assert needed in message


def test_hpacellseg_adapter_wiring_with_a_stand_in_package(monkeypatch, tmp_path):
    """The adapter's own code (loading, calls, post-processing) against a fake hpacellseg."""

    class FakeCellSegmentator:  # U-Nets replaced by thresholds: channel 2 is the interior
        def __init__(self, nuclei_model, cell_model, scale_factor, device, multi_channel_model):
            assert isinstance(nuclei_model, torch.nn.Conv2d)  # loaded and unwrapped from DataParallel

        def pred_nuclei(self, images):
            (blue,) = images
            return [np.stack([0 * blue, 0 * blue, blue > 0.5], axis=-1).astype(np.uint8) * 255]

        def pred_cells(self, images):
            (red,), (yellow,), (blue,) = images
            return [np.stack([0 * red, 0 * red, red + yellow > 0.2], axis=-1).astype(np.uint8) * 255]

    package = types.ModuleType("hpacellseg")
    package.cellsegmentator = types.SimpleNamespace(CellSegmentator=FakeCellSegmentator)
    monkeypatch.setitem(sys.modules, "hpacellseg", package)
    monkeypatch.setitem(sys.modules, "pytorch_zoo", types.ModuleType("pytorch_zoo"))
    for name in ("nuclei.pth", "cells.pth"):
        torch.save(torch.nn.DataParallel(torch.nn.Conv2d(3, 3, 1)), tmp_path / name)
    segmenter = create_segmenter(
        "hpacellseg", nuclei_model_path=str(tmp_path / "nuclei.pth"), cell_model_path=str(tmp_path / "cells.pth")
    )
    image = np.zeros((512, 512, 4), np.float32)
    for centre in ((256, 150), (256, 362)):
        image[disk(centre, 100, shape=(512, 512)) + (0,)] = 0.5
        image[disk(centre, 40, shape=(512, 512)) + (2,)] = 1.0
    seg = segmenter(image)
    assert seg.cells.shape == (512, 512) and seg.cells.max() == 2
    assert segmenter.describe()["settings"]["downscale"] == 0.5


def test_unknown_segmenter_name():
    with pytest.raises(ValueError, match="classical"):
        create_segmenter("watershed")
