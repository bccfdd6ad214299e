"""The demo: train-all on a simulated dataset, then the registered ensemble scored on unseen images.

``make demo`` (``ensemble demo``) runs :func:`run_demo`: the same chain as ``train_all.py`` on its
built-in default, then the ensemble it registered predicts simulated test images of another seed and is scored
with the competition metric beside each of its member networks alone, and against the best of them
with an interval from the choice of test images (:func:`~ensemble.serving.evaluate.compare`). Re-running
skips every finished step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ensemble.sim.images import simulate
from ensemble.serving.evaluate import Comparison, compare_pairs, evaluate, prediction_members
from ensemble.pipeline import PipelineResult, train_all
from ensemble.serving.predict import predict_images
from ensemble.zoo import load_zoo, zoo_with

TEST_SEED = 1000  # another seed than the training data's: images no model has seen


def default_dataset(workdir: str | Path, images: int, seed: int, image_px: int, difficulty: str) -> str:
    """The built-in default dataset: simulated once into ``{workdir}/data`` and reused after."""
    root = Path(workdir) / "data"
    if not (root / "train.csv").exists():
        print(f"no --data given: simulating {images} images ({difficulty}, {image_px} px) into {root}")
        simulate(root, n_images=images, seed=seed, size=image_px, difficulty=difficulty)
    return str(root)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes
    ----------
    pipeline : PipelineResult
        The train-all chain (store, OOF, selection, registration).
    scores : DataFrame
        Index ``model`` (``ensemble`` then each member network), columns ``competition_map``
        and ``cell_map`` on the test images.
    comparisons : list of Comparison
        The ensemble against the member with the best test cell mAP, and against the one with the
        best competition mAP if that is another.
    n_images, n_cells : int
        Test images and their cells.
    out : Path
    tracking_uri : str
    """

    pipeline: PipelineResult
    scores: pd.DataFrame
    comparisons: list[Comparison]
    n_images: int
    n_cells: int
    out: Path
    tracking_uri: str

    def report(self) -> str:
        return "\n".join([
            self.pipeline.report(), "",
            f"Registered ensemble and its member networks on {self.n_images} held-out simulated test images "
            f"({self.n_cells} cells; competition mAP: mask IoU >= 0.6):",
            self.scores.to_string(float_format=lambda v: f"{v:.4f}"),
            *(comparison.report() for comparison in self.comparisons),
            f"  per-class AP plot: {self.out / 'test_per_class.png'};  MLflow: mlflow ui --backend-store-uri "
            f"{self.tracking_uri}",
        ])


def run_demo(out: str | Path = "demo", *, images: int = 240, image_px: int = 384, difficulty: str = "medium",
             epochs: int | None = None, test_images: int = 40, relabel_rounds: int | None = None,
             integrity: bool = False, zoo: str = "quick", seed: int = 0) -> DemoResult:
    """Train a zoo (the quick one) on a simulated dataset, register the ensemble, score it on unseen images.

    Everything goes under ``out``: the datasets, the store, Ray checkpoints, OOF tables and, unless
    ``MLFLOW_TRACKING_URI`` says otherwise, the MLflow database ``out/mlflow.db``. The training
    images are simulated with ``seed``, the test images with ``TEST_SEED + seed``.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")
    data = default_dataset(out, images, seed=seed, image_px=image_px, difficulty=difficulty)
    zoo = zoo_with(load_zoo(zoo, {"epochs": epochs} if epochs else None), relabel_rounds=relabel_rounds,
                   integrity=integrity)
    pipeline = train_all(zoo, data=data, workdir=str(out))
    test_root = out / "test_data"
    if not (test_root / "test.csv").exists():
        simulate(test_root, n_images=test_images, seed=TEST_SEED + seed, size=image_px, difficulty=difficulty,
                 split="test")
    # The version this run registered: on a re-run with other data it need not be the champion.
    version = pipeline.model_version
    predictions = predict_images(f"models:/{version.name}/{version.version}", str(test_root), split="test",
                                 out=str(out / "test_predictions.parquet"), members=True)
    rows = {"ensemble": evaluate(predictions.out, str(test_root), plot=out / "test_per_class.png")}
    for member in prediction_members(predictions.out):
        rows[member] = evaluate(predictions.out, str(test_root), plot=out / f"test_per_class_{member}.png",
                                member=member)
    scores = pd.DataFrame({"competition_map": [r.competition.map for r in rows.values()],
                           "cell_map": [r.cell.map for r in rows.values()]}, index=pd.Index(list(rows), name="model"))
    best = dict.fromkeys(scores.drop(index="ensemble").idxmax()[["cell_map", "competition_map"]])
    comparisons = compare_pairs(predictions.out, str(test_root), [("ensemble", member) for member in best])
    return DemoResult(pipeline=pipeline, scores=scores, comparisons=comparisons, n_images=rows["ensemble"].n_images,
                      n_cells=rows["ensemble"].n_cells, out=out, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
