"""Predicting a folder of images in process, given masks instead of segmenting, the submission
file, bad images, the integrity hook, models saved in the old (pickled) form, and evaluation
against the simulator's cell truth. (The Ray path runs in test_registry.py, on the registered
model, where Ray is up already; the streaming evaluation's own cases in test_evaluate.py.)"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from ensemble.cli.product import add_commands
from ensemble.data.hpa import read_image, read_truth
from ensemble.data.segment import create_segmenter
from ensemble.sim.images import simulate
from ensemble.serving.evaluate import COUNTS, evaluate, prediction_members
from ensemble.labels import CHANNELS, CLASS_NAMES, NUM_CLASSES
from ensemble.serving.predict import PredictResult, predict_images, write_predictions
from ensemble.oof import CELL_COLUMNS
from ensemble.serving.registry import save_ensemble
from ensemble.serving.model import OUTPUT_COLUMNS, Preprocessing, load_ensemble
from ensemble.serving.inputs import SERVING_COLUMNS
from ensemble.serving.submission import decode_mask, encode_mask, read_submission
from test_registry import tiny_members, tiny_spec

PREPROCESSING = Preprocessing(create_segmenter("classical").describe(), cell_size=32)
BAD = ("bad-truncated", "bad-missing")


class ConstantIntegrity:
    """A stand-in VID: every cell gets the weight written in the integrity directory."""

    def __init__(self, path: str):
        self.weight = float((Path(path) / "weight.txt").read_text())

    def weights(self, cells: pd.DataFrame, crops: np.ndarray) -> np.ndarray:
        assert {"image_id", "cell_id", "area", "perimeter"} <= set(cells.columns) and len(crops) == len(cells)
        return np.full(len(cells), self.weight, np.float32)


def load_constant_integrity(path: str) -> ConstantIntegrity:
    return ConstantIntegrity(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("model")
    return str(save_ensemble(tmp / "model", tiny_spec(), tiny_members(tmp / "checkpoints"), PREPROCESSING))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """4 simulated test images with truth, plus a truncated PNG and one missing its yellow channel."""
    root = tmp_path_factory.mktemp("images")
    simulate(root, n_images=4, seed=2, size=256, split="test")
    for image_id in BAD:
        for channel in CHANNELS:
            Image.fromarray(np.zeros((256, 256), np.uint8)).save(root / "test" / f"{image_id}_{channel}.png")
    red = root / "test" / "bad-truncated_red.png"
    red.write_bytes(red.read_bytes()[:40])
    (root / "test" / "bad-missing_yellow.png").unlink()
    with open(root / "test.csv", "a") as csv:
        csv.write("bad-truncated,0\nbad-missing,3\n")
    return root


@pytest.fixture(scope="module")
def local(model_dir, images, tmp_path_factory) -> PredictResult:
    out = tmp_path_factory.mktemp("local") / "preds.parquet"
    return predict_images(model_dir, images, out=out, engine="local", batch_size=3, progress=False)


def test_local_predict_skips_bad_images_and_writes_one_row_per_cell(local, images):
    skipped = dict(local.report.skipped)
    assert set(skipped) == set(BAD) and local.report.n_ok == 4
    assert "truncated" in skipped["bad-truncated"] and "bad-missing_yellow.png" in skipped["bad-missing"]
    assert list(local.images["image_id"]) == [f"sim2-{i:05d}" for i in range(4)]
    assert local.images["n_cells"].sum() == len(local.cells) > 0
    written = pd.read_parquet(local.out)
    assert list(written.columns) == OUTPUT_COLUMNS
    pd.testing.assert_frame_equal(written, local.cells, check_dtype=False)
    assert (written[CELL_COLUMNS].dtypes == np.float32).all()
    assert written[CELL_COLUMNS].to_numpy().min() >= 0 and written[CELL_COLUMNS].to_numpy().max() <= 1
    timings = local.timings
    assert timings.images == 4 and timings.cells == len(local.cells) and timings.segment > 0 and timings.members > 0


def test_model_registered_in_the_old_form_still_loads_and_predicts_the_same(model_dir, images, local, tmp_path,
                                                                          monkeypatch):
    """Models saved before models from code and the one name cell_size: a pickled python_model
    (here named ensemble.serving.registry.EnsembleModel), no code of their own, the old input
    signature (image_id, root[, split]); config.json says crop_size, image_size and placement in train."""
    from ensemble.serving.model import EnsembleModel

    artifacts = tmp_path / "artifacts"
    shutil.copytree(Path(model_dir) / "artifacts", artifacts)
    config = json.loads((artifacts / "config.json").read_text())
    config["preprocessing"]["crop_size"] = config["preprocessing"].pop("cell_size")
    for member in config["members"].values():
        member["image_size"] = member.pop("cell_size")
        member["train"].update(member.pop("placement"))
    (artifacts / "config.json").write_text(json.dumps(config))
    old = tmp_path / "old"
    signature = ModelSignature(inputs=Schema([ColSpec("string", "image_id"), ColSpec("string", "root"),
                                              ColSpec("string", "split", required=False)]))
    monkeypatch.setattr(EnsembleModel, "__module__", "ensemble.serving.registry")
    mlflow.pyfunc.save_model(str(old), python_model=EnsembleModel(), signature=signature, pip_requirements=[],
                             artifacts={name: str(artifacts / file) for name, file in (
                                 ("config", "config.json"), ("ensemble_spec", "ensemble_spec.json"), ("members", "members"))})
    monkeypatch.undo()
    assert b"ensemble.serving.registry" in (old / "python_model.pkl").read_bytes()
    assert not (old / "code").exists() and "model_code_path" not in (old / "MLmodel").read_text()
    again = predict_images(str(old), images, out=tmp_path / "preds.parquet", engine="local", batch_size=3,
                           progress=False)
    pd.testing.assert_frame_equal(again.cells, local.cells)
    served = mlflow.pyfunc.load_model(str(old)).predict(pd.DataFrame({"image_id": ["sim2-00000"], "root": str(images)}))
    assert list(served.columns) == SERVING_COLUMNS
    expected = local.cells[local.cells["image_id"] == "sim2-00000"]
    np.testing.assert_allclose(served[list(CLASS_NAMES)].to_numpy(), expected[CELL_COLUMNS].to_numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def given_masks(images, tmp_path_factory) -> Path:
    """Given masks of three images: two the truth's, one of the wrong size (the fourth has none)."""
    folder = tmp_path_factory.mktemp("masks")
    for image_id in ("sim2-00000", "sim2-00001"):
        shutil.copyfile(images / "truth" / "masks" / f"{image_id}.png", folder / f"{image_id}.png")
    Image.fromarray(np.ones((100, 120), np.uint16)).save(folder / "sim2-00002.png")
    return folder


def test_given_masks_replace_the_segmentation_and_bad_ones_are_reported(model_dir, images, given_masks):
    ids = [f"sim2-{i:05d}" for i in range(4)]
    result = predict_images(model_dir, images, ids, engine="local", progress=False, masks=str(given_masks))
    skipped = dict(result.report.skipped)
    assert set(skipped) == {"sim2-00002", "sim2-00003"} and result.report.n_ok == 2
    assert "is 120x100 (WxH), the image 256x256" in skipped["sim2-00002"]
    assert "sim2-00003.png" in skipped["sim2-00003"] and "not found" in skipped["sim2-00003"]
    for image_id in ("sim2-00000", "sim2-00001"):
        mask = np.asarray(Image.open(given_masks / f"{image_id}.png"))
        rows = result.cells[result.cells["image_id"] == image_id]
        assert sorted(rows["cell_id"]) == sorted(set(np.unique(mask)) - {0}), "the given cells, ids kept"
        for cell_id, rle in zip(rows["cell_id"], rows["rle"]):
            np.testing.assert_array_equal(decode_mask(rle, *mask.shape), mask == cell_id)


def test_masks_auto_takes_the_datasets_masks_folder(model_dir, images, given_masks, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    for channel in CHANNELS:
        shutil.copyfile(images / "test" / f"sim2-00001_{channel}.png", root / "test" / f"sim2-00001_{channel}.png")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    command = ["predict", str(root), "--model", model_dir, "--out", str(tmp_path / "p.parquet"), "--engine", "local",
               "--masks", "auto"]
    args = parser.parse_args(command)
    assert args.func(args) == 0
    segmented = pd.read_parquet(tmp_path / "p.parquet")  # no masks/ folder: auto segments
    shutil.copytree(given_masks, root / "masks")
    args = parser.parse_args(command)
    assert args.func(args) == 0
    given = pd.read_parquet(tmp_path / "p.parquet")
    mask = np.asarray(Image.open(given_masks / "sim2-00001.png"))
    assert sorted(given["cell_id"]) == sorted(set(np.unique(mask)) - {0})
    assert not given[["cell_id", "rle"]].equals(segmented[["cell_id", "rle"]])
    args = parser.parse_args([*command[:-1], str(tmp_path / "absent")])
    with pytest.raises(ValueError, match="mask folder .* does not exist"):
        args.func(args)


def test_submission_decodes_to_the_segmented_cell_masks(local, images, model_dir, tmp_path):
    out = tmp_path / "submission.csv"
    write_predictions(local, out)
    submission = read_submission(out)
    assert list(submission) == list(local.images["image_id"])
    segmenter = load_ensemble(model_dir).segmenter
    for image_id, image in submission.items():
        cells = segmenter(read_image(images, image_id, "test")).cells
        assert (image.height, image.width) == cells.shape
        rows = local.cells[local.cells["image_id"] == image_id]
        assert len(image.detections) == len(rows) * len(CLASS_NAMES), "every class of every cell"
        for detection in image.detections[:: len(CLASS_NAMES)]:  # one per cell, in row order
            cell_id = cells[detection.mask][0]
            np.testing.assert_array_equal(detection.mask, cells == cell_id)
        confidences = np.array([d.confidence for d in image.detections]).reshape(len(rows), -1)
        np.testing.assert_allclose(confidences, rows[CELL_COLUMNS].to_numpy(), rtol=1e-5)


def test_integrity_weights_multiply_the_probabilities(images, tmp_path):
    members = tiny_members(tmp_path / "checkpoints")
    (tmp_path / "vid").mkdir()
    (tmp_path / "vid" / "weight.txt").write_text("0.5")
    image = {"sim2-00000": read_image(images, "sim2-00000", "test")}
    predictions = {}
    for weighting in (True, False):  # the integrity model is packed either way; the spec decides
        path = save_ensemble(tmp_path / f"weighting-{weighting}", tiny_spec(integrity_weighting=weighting), members,
                             PREPROCESSING, integrity_dir=tmp_path / "vid",
                             integrity_loader="test_predict:load_constant_integrity")
        model = load_ensemble(str(path))
        model.member_outputs = True
        predictions[weighting] = model.predict_arrays(image)
    weighted, measured = predictions[True], predictions[False]
    assert (weighted["integrity"] == 0.5).all() and (measured["integrity"] == 0.5).all()
    np.testing.assert_allclose(weighted[CELL_COLUMNS], 0.5 * measured[CELL_COLUMNS].to_numpy(), rtol=1e-6)
    # The members' own columns carry the same weight, so that they compare like for like with the ensemble.
    own = [c for c in measured.columns if "." in c and c.split(".")[0] in members]
    assert len(own) == 2 * NUM_CLASSES
    np.testing.assert_allclose(weighted[own], 0.5 * measured[own].to_numpy(), rtol=1e-6)


def perfect_predictions(root: Path) -> pd.DataFrame:
    """Per-cell rows that are the truth itself: true masks, labels as probabilities."""
    truth = read_truth(root)
    rows = []
    for image_id in truth.image_ids:
        mask = truth.mask(image_id)
        for cell_id, labels in zip(*truth.cell_labels(image_id)):
            rows.append({"image_id": image_id, "cell_id": int(cell_id), **dict(zip(CELL_COLUMNS, labels)),
                         "integrity": 1.0, "rle": encode_mask(mask == cell_id),
                         "width": mask.shape[1], "height": mask.shape[0]})
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def test_evaluate_scores_perfect_predictions_one_in_both_formats(images, tmp_path):
    cells = perfect_predictions(images)
    cells.to_parquet(tmp_path / "perfect.parquet")
    sizes = cells.groupby("image_id", as_index=False).agg(width=("width", "first"), height=("height", "first"),
                                                          n_cells=("cell_id", "size"))
    write_predictions(PredictResult(cells, sizes, None, None, 0.0), tmp_path / "perfect.csv")
    for path in (tmp_path / "perfect.parquet", tmp_path / "perfect.csv"):
        result = evaluate(path, images)
        assert result.cell.map == pytest.approx(1.0) and result.competition.map == pytest.approx(1.0)
        assert result.matched == 1.0 and result.n_images == 4 and result.n_missed == 0
        scored = result.per_class.dropna(subset=["cell_ap"])
        assert set(scored.index) <= set(CLASS_NAMES) and len(scored) > 0
        assert (scored["true_cells"] > 0).all()
        assert result.plot.exists() and result.plot.stat().st_size > 0


def test_cli_predicts_and_evaluates_a_folder(model_dir, images, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    out = tmp_path / "preds.parquet"
    (tmp_path / "ids.txt").write_text("sim2-00001\nsim2-00003\n")
    args = parser.parse_args(["predict", str(images / "test"), "--model", model_dir, "--out", str(out),
                              "--ids", str(tmp_path / "ids.txt"), "--engine", "local"])
    assert args.func(args) == 0
    assert "2 images" in capsys.readouterr().out
    assert set(pd.read_parquet(out)["image_id"]) == {"sim2-00001", "sim2-00003"}
    args = parser.parse_args(["evaluate", str(out), str(images), "--plot", str(tmp_path / "ap.png")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "competition mAP" in printed and "Nucleoplasm" in printed and (tmp_path / "ap.png").exists()
    assert "4 images with truth, 2 of them without any predicted cell" in printed, "the images not predicted"
    assert COUNTS in printed


def test_member_outputs_score_each_network_beside_the_ensemble(model_dir, images, tmp_path, capsys):
    out = tmp_path / "preds.parquet"
    result = predict_images(model_dir, images, ids=["sim2-00000", "sim2-00001"], out=out, engine="local",
                            progress=False, members=True)
    spec = load_ensemble(model_dir).spec
    names = prediction_members(out)
    assert sorted(names) == sorted(spec.members.values())
    cells = result.cells
    # Where the spec fuses nothing ("cell" rule), the ensemble is the mean of its two members' cells.
    cell_only = [CELL_COLUMNS[k] for k, name in enumerate(CLASS_NAMES) if spec.fusion[name].rule == "cell"]
    mean = np.mean([cells[[f"{n}.{c}" for c in cell_only]].to_numpy() for n in names], axis=0)
    np.testing.assert_allclose(cells[cell_only].to_numpy(), mean, rtol=1e-5, atol=1e-6)
    scores = {n: evaluate(out, images, member=n, plot=tmp_path / f"{n}.png") for n in names}
    assert all(0 <= s.cell.map <= 1 and s.n_images == 4 and s.n_missed == 2 for s in scores.values())
    with pytest.raises(ValueError, match="no column"):
        evaluate(out, images, member="not-a-member")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["evaluate", str(out), str(images), "--against", names[0], "--plot", str(tmp_path / "e.png")])
    assert args.func(args) == 0
    assert f"ensemble - {names[0]}: competition " in capsys.readouterr().out
