"""Selection's view of the served form: the fold networks' noise and the served average's expectation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ensemble.oof import CELL_COLUMNS, NUM_CLASSES, OOFSet
from ensemble.selectors.served import fold_noise, load_validation_dir, served_form

N_FOLDS, N_IMAGES, CELLS_PER_IMAGE = 3, 300, 4
SPREAD = {"noisy": 0.08, "steady": 0.02}  # sd of one fold network's noise, per model


def simulated(seed: int = 0):
    """Two models' fold networks on the same cells: signal, noise shared by a fold's networks, and each
    model's own noise. Returns the OOF, the validation tables (a second network on a quarter of the
    cells) and the served average (every fold network) the OOF cannot show."""
    rng = np.random.default_rng(seed)
    n = N_IMAGES * CELLS_PER_IMAGE
    image = np.repeat(np.arange(N_IMAGES), CELLS_PER_IMAGE)
    fold = image % N_FOLDS
    signal = rng.uniform(0.2, 0.8, (NUM_CLASSES, n))
    shared = rng.normal(0, 0.02, (N_FOLDS, NUM_CLASSES, n))  # what a fold's sample teaches every model
    networks = {m: signal + shared + rng.normal(0, sd, (N_FOLDS, NUM_CLASSES, n)) for m, sd in SPREAD.items()}
    index = pd.DataFrame({"image_id": [f"img{i:03d}" for i in image], "cell_id": np.tile(np.arange(CELLS_PER_IMAGE),
                                                                                          N_IMAGES), "fold": fold})
    cells = np.arange(n)
    oof = OOFSet(index=index, cell={m: nets[fold, :, cells].T.astype(np.float32) for m, nets in networks.items()})
    served = {m: nets.mean(axis=0) for m, nets in networks.items()}
    second = cells[image % 4 == 0]
    network = (fold[second] + 1 + (image[second] // 4) % 2) % N_FOLDS  # never the cell's own fold
    validation = {m: index.iloc[second][["image_id", "cell_id"]].assign(network=network).reset_index(drop=True)
                  .join(pd.DataFrame(nets[network, :, second], columns=CELL_COLUMNS)) for m, nets in networks.items()}
    return oof, validation, served


def test_fold_noise_is_measured_without_labels_from_two_networks_per_cell():
    oof, validation, _ = simulated()
    noise = fold_noise(oof, validation)
    assert noise.n_pairs == N_IMAGES // 4 * CELLS_PER_IMAGE and noise.n_folds == N_FOLDS
    # One network's noise: the model's own plus the fold's shared part (sd 0.02).
    spread = noise.spread()
    for model, sd in SPREAD.items():
        assert spread[model] == pytest.approx(np.hypot(sd, 0.02), rel=0.05)
    # The fold's shared part is the covariance across models.
    across = noise.covariance[:, noise.models.index("noisy"), noise.models.index("steady")].mean()
    assert across == pytest.approx(0.02 ** 2, rel=0.15)


def test_served_form_moves_each_cell_toward_the_average_of_the_fold_networks():
    oof, validation, served = simulated()
    noise = fold_noise(oof, validation)
    seen = served_form(oof, noise)
    assert seen.models == oof.models and seen.index is oof.index
    for model in oof.models:
        before = np.mean((oof.cell[model] - served[model]) ** 2)
        after = np.mean((seen.cell[model] - served[model]) ** 2)
        # The noisier network has more to take out; neither gets worse.
        assert after < (0.5 if model == "noisy" else 1.0) * before
        assert seen.cell[model].min() >= 0 and seen.cell[model].max() <= 1
    # In place: the same numbers, in the OOF's own arrays.
    arrays = dict(oof.cell)
    in_place = served_form(oof, noise, copy=False)
    for model in oof.models:
        assert in_place.cell[model] is arrays[model] and oof.cell[model] is arrays[model]
        np.testing.assert_array_equal(in_place.cell[model], seen.cell[model])


def test_validation_is_read_for_a_sample_of_images_shared_by_every_model(tmp_path):
    oof, validation, _ = simulated()
    (tmp_path / "validation").mkdir()
    for model, table in validation.items():
        table.to_parquet(tmp_path / "validation" / f"{model}.parquet")
    assert load_validation_dir(str(tmp_path), [*oof.models, "absent"]) is None
    whole = load_validation_dir(str(tmp_path), oof.models)
    assert all(len(whole[m]) == len(validation[m]) for m in oof.models)
    sample = load_validation_dir(str(tmp_path), oof.models, max_cells=50)
    images = [set(t["image_id"]) for t in sample.values()]
    # Whole images, about 50 rows (the last image may cross it), the same images for every model.
    assert images[0] == images[1] and 50 <= len(sample["noisy"]) < 50 + CELLS_PER_IMAGE
    assert all(len(t) == CELLS_PER_IMAGE * len(i) for t, i in zip(sample.values(), images))
    assert fold_noise(oof, sample).n_pairs == len(sample["noisy"])


def test_fold_noise_refuses_a_missing_model_and_a_cell_predicted_by_its_own_fold():
    oof, validation, _ = simulated()
    with pytest.raises(ValueError, match=r"no validation predictions of \['steady'\]"):
        fold_noise(oof, {"noisy": validation["noisy"]})
    own = {m: table.assign(network=oof.index.set_index(["image_id", "cell_id"]).loc[
        pd.MultiIndex.from_frame(table[["image_id", "cell_id"]]), "fold"].to_numpy()) for m, table in validation.items()}
    with pytest.raises(ValueError, match="network of its own fold"):
        fold_noise(oof, own)
