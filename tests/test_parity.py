"""Serving scores a cell as training and selection saw it scored.

One store of simulated images and an ensemble of two tiny members (a DSA that sees its cells at
24 px on 32 px crops, and a CLA), saved as an MLflow model and loaded as users load it:

- serving cuts from an image the crops that the store holds (segmentation, cutting);
- the training loader hands a network the input that serving hands it for the same cells;
- served predictions equal the training code's: ``predict_rows`` (the OOF path) of each fold
  network, the mean over a member's fold networks, then ``apply_spec``.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from ensemble.data.datasets import CellDataset
from ensemble.data.hpa import read_image
from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.labels import CLASS_NAMES
from ensemble.models import build_model, cell_input
from ensemble.oof import CELL_COLUMNS, IMAGE_COLUMNS
from ensemble.selectors import apply_spec
from ensemble.serving.model import OUTPUT_COLUMNS, Preprocessing
from ensemble.serving.inputs import SERVING_COLUMNS
from ensemble.serving.registry import save_ensemble
from ensemble.serving.submission import decode_mask
from ensemble.sim.images import simulate
from ensemble.trainers.loop import _inputs, predict_rows
from test_registry import MODEL_SPECS, tiny_members, tiny_spec

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> SimpleNamespace:
    """The store of 6 simulated images, two tiny members x 2 folds, the ensemble as a loaded model."""
    tmp = tmp_path_factory.mktemp("parity")
    simulate(tmp / "data", n_images=6, seed=1, size=256)
    store = CellStore(prepare(tmp / "data", tmp / "store", cell_size=32, n_folds=2, progress=False).store)
    members = tiny_members(tmp / "checkpoints")
    spec = tiny_spec()
    path = save_ensemble(tmp / "model", spec, members, Preprocessing.from_store(store))
    model = mlflow.pyfunc.load_model(str(path))
    image_id = sorted(store.cells["image_id"].unique())[0]
    return SimpleNamespace(root=tmp / "data", store=store, members=members, spec=spec, model=model,
                           image_id=image_id, image=read_image(tmp / "data", image_id, "train"))


def test_serving_cuts_the_crops_the_store_holds(ensemble):
    segmented = ensemble.model.unwrap_python_model().segment(ensemble.image_id, ensemble.image)
    rows = ensemble.store.image_slice(ensemble.image_id)
    np.testing.assert_array_equal(segmented.cells["cell_id"], ensemble.store.cells["cell_id"].iloc[rows])
    np.testing.assert_array_equal(segmented.crops, ensemble.store.crops(np.arange(rows.start, rows.stop)))


@pytest.mark.parametrize("member", sorted(MODEL_SPECS))
def test_training_feeds_a_network_what_serving_feeds_it(ensemble, member):
    spec = MODEL_SPECS[member]
    rows = ensemble.store.image_slice(ensemble.image_id)
    dataset = CellDataset(ensemble.store, rows=np.arange(rows.start, rows.stop))  # no augmentation: as validated
    batch = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    trained_on = _inputs(batch, spec, torch.device("cpu"))
    crops = ensemble.model.unwrap_python_model().segment(ensemble.image_id, ensemble.image).crops
    served = cell_input(torch.from_numpy(np.ascontiguousarray(crops)), spec.cell_size)
    assert trained_on.shape == (len(dataset), 4, spec.cell_size, spec.cell_size)
    assert trained_on.dtype == served.dtype == torch.float32
    torch.testing.assert_close(trained_on, served, rtol=0, atol=0)


def reference_predictions(store: CellStore, spec, members) -> pd.DataFrame:
    """The ensemble on the store's cells through the training code: predict_rows per fold network,
    the mean over a member's fold networks, then apply_spec."""
    frames = {}
    for name, member in members.items():
        tables = []
        for path in member.folds.values():
            network = build_model(member.spec)
            network.load_state_dict(torch.load(path, weights_only=True))
            table = predict_rows(network, store, np.arange(len(store)), member.spec, torch.device("cpu"))
            tables.append(table.sort_values(["image_id", "cell_id"], ignore_index=True))
        columns = [c for c in (*CELL_COLUMNS, *IMAGE_COLUMNS) if c in tables[0]]
        frames[name] = tables[0].drop(columns="fold").assign(
            **dict(zip(columns, np.mean([t[columns].to_numpy() for t in tables], axis=0).T)))
    return apply_spec(spec, frames)


def test_served_predictions_are_the_training_codes(ensemble):
    ids = sorted(ensemble.store.cells["image_id"].unique())
    served = ensemble.model.predict(pd.DataFrame({"image_id": ids, "root": str(ensemble.root), "split": "train"}))
    assert list(served.columns) == SERVING_COLUMNS, "the served output names each probability by its class"
    out = served.rename(columns=dict(zip(CLASS_NAMES, CELL_COLUMNS)))
    assert list(out.columns) == OUTPUT_COLUMNS
    assert (out[CELL_COLUMNS].dtypes == np.float32).all() and out["integrity"].dtype == np.float32
    assert (out["integrity"] == 1).all(), "no integrity model: every cell weighs 1"
    reference = reference_predictions(ensemble.store, ensemble.spec, ensemble.members)
    merged = reference.merge(out, on=["image_id", "cell_id"], suffixes=("_reference", ""), validate="1:1")
    assert len(merged) == len(out) == len(ensemble.store)
    np.testing.assert_allclose(merged[CELL_COLUMNS].to_numpy(),
                               merged[[f"{c}_reference" for c in CELL_COLUMNS]].to_numpy(), atol=1e-5)
    cells = ensemble.model.unwrap_python_model().segmenter(ensemble.image).cells
    first = out[out["image_id"] == ensemble.image_id]
    for cell_id, rle in zip(first["cell_id"], first["rle"]):
        np.testing.assert_array_equal(decode_mask(rle, *cells.shape), cells == cell_id)
