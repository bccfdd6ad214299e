"""CRA relabelling: power normalisation, image classes only, OOF validation, label quality, rounds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ensemble import tracking
from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.labels import NUM_CLASSES
from ensemble.storage import read_parquet, write_parquet
from ensemble.oof import CELL_COLUMNS
from ensemble.trainers.relabel import cra_rounds, label_quality, power_normalise, relabel, relabelled_zoo, zoo_trainer
from ensemble.zoo import load_zoo


@pytest.fixture(scope="module")
def store(local_ray, small_dataset, tmp_path_factory) -> CellStore:
    uri = str(tmp_path_factory.mktemp("relabel") / "store")
    prepare(str(small_dataset), uri, cell_size=32, n_folds=3, progress=False)
    return CellStore(uri)


def oof_table(store: CellStore, probabilities) -> pd.DataFrame:
    table = store.cells[["image_id", "cell_id", "fold"]].copy()
    table[CELL_COLUMNS] = np.broadcast_to(probabilities, (len(store), NUM_CLASSES))
    return table


def test_power_normalisation_hand_computed():
    np.testing.assert_allclose(power_normalise(np.array([0.0, 0.01, 0.09, 0.25, 1.0]), 0.5), [0, 0.1, 0.3, 0.5, 1],
                               rtol=1e-6)
    np.testing.assert_allclose(power_normalise(np.array([0.5, 0.1]), 2.0), [0.25, 0.01], rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        power_normalise(np.array([0.5]), 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        power_normalise(np.array([1.5]), 0.5)


def test_relabel_keeps_only_image_classes_and_averages_models(store):
    weak = store.labels("weak")
    # Two models, 0.16 and 0.64 everywhere: mean 0.4, then 0.4 ** 0.5 on the image's classes only.
    result = relabel(store, {"a": oof_table(store, 0.16), "b": oof_table(store, 0.64)}, beta=0.5, version="avg")
    np.testing.assert_allclose(result.labels, weak * np.sqrt(0.4), rtol=1e-6)
    np.testing.assert_array_equal(store.labels("avg"), result.labels)
    assert "avg" in store.label_versions() and result.models == ("a", "b")

    rng = np.random.default_rng(0)
    noisy = relabel(store, {"r": oof_table(store, rng.random((len(store), NUM_CLASSES)))}, version="noisy").labels
    assert (noisy[weak == 0] == 0).all(), "relabelling never adds a class the image does not have"
    assert (noisy <= weak).all() and (noisy[weak == 1] > 0).any()
    # Certain models give back the weak labels exactly.
    np.testing.assert_array_equal(relabel(store, {"one": oof_table(store, 1.0)}, version="ones").labels, weak)


def test_relabel_rejects_misaligned_oof(store, tmp_path):
    good = oof_table(store, 0.5)
    with pytest.raises(ValueError, match=r"'short'.*1 store cell\(s\) missing"):
        relabel(store, {"fine": good, "short": good.iloc[1:]})
    with pytest.raises(ValueError, match=r"'twice'.*more than once"):
        relabel(store, {"twice": pd.concat([good, good.iloc[:2]])})
    extra = pd.concat([good, good.iloc[:1].assign(image_id="nowhere")])
    with pytest.raises(ValueError, match=r"'extra'.*1 cell\(s\) not in the store"):
        relabel(store, {"extra": extra})
    with pytest.raises(ValueError, match=r"'columns'.*cell_18"):
        relabel(store, {"columns": good.drop(columns="cell_18")})
    with pytest.raises(ValueError, match=r"'range'.*outside"):
        relabel(store, {"range": oof_table(store, 1.5)})
    with pytest.raises(ValueError, match="empty"):
        relabel(store, {})
    # A URI works like a DataFrame; a shuffled table is aligned by (image_id, cell_id).
    uri = str(tmp_path / "oof.parquet")
    write_parquet(good.sample(frac=1.0, random_state=0), uri)
    np.testing.assert_allclose(relabel(store, {"uri": uri}, version="uri").labels, store.labels("weak") * np.sqrt(0.5),
                               rtol=1e-6)


def test_label_quality_of_truth_is_one_and_weak_is_lower(store):
    assert label_quality(store, "truth") == pytest.approx(1.0)
    assert 0 < label_quality(store, "weak") < 1


def oracle_oof(store: CellStore, workdir, version: str, noise: float) -> dict[str, str]:
    """OOF tables of a model that knows the truth up to noise: stands in for trained DSAs."""
    truth = np.nan_to_num(store.labels("truth"))
    rng = np.random.default_rng(len(version))
    probabilities = np.clip(0.8 * truth + noise * rng.random(truth.shape), 0, 1)
    uri = f"{workdir}/{version}.parquet"
    write_parquet(oof_table(store, probabilities), uri)
    return {"oracle": uri}


def test_cra_rounds_chain_label_versions(store, tmp_path):
    calls = []

    def train_dsas(version):
        calls.append(version)
        return oracle_oof(store, tmp_path, version, noise=0.3)

    rounds = cra_rounds(store, train_dsas, rounds=2, beta=0.5, prefix="chain")
    assert calls == ["weak", "chain1"]
    assert [(r.round, r.trained_on, r.version) for r in rounds] == [(1, "weak", "chain1"), (2, "chain1", "chain2")]
    assert rounds[-1].quality == pytest.approx(label_quality(store, "chain2"))
    assert rounds[0].trained_on_quality == pytest.approx(label_quality(store, "weak"))
    assert rounds[1].trained_on_quality == rounds[0].quality
    assert rounds[0].quality > rounds[0].trained_on_quality, "near-oracle models improve the labels"
    assert 0 < rounds[0].model_map["oracle"] <= 1
    with pytest.raises(ValueError, match="rounds"):
        cra_rounds(store, train_dsas, rounds=0)


def test_relabelled_zoo_trains_dsas_on_the_version(tiny_zoo_file):
    zoo = load_zoo(tiny_zoo_file)
    sub = relabelled_zoo(zoo, "cra1")
    assert sub.name == "tiny-cra1" and [m.name for m in sub.models] == ["dsa_tiny"]
    assert sub.models[0].train.labels == "cra1" and sub.n_folds == zoo.n_folds
    assert [m.name for m in relabelled_zoo(zoo, "cra1", heads=("dsa", "cla")).models] == ["dsa_tiny", "cla_tiny"]
    with pytest.raises(ValueError, match="no model"):
        zoo_trainer(zoo, "unused", "unused", heads=("clh",))


@pytest.mark.slow
def test_zoo_trainer_trains_dsas_on_the_label_version(store, tmp_path, tiny_zoo_file):
    zoo = load_zoo(tiny_zoo_file)
    train = zoo_trainer(zoo, store.uri, str(tmp_path / "work"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                        progress=False)
    rounds = cra_rounds(store, train, rounds=1, prefix="zoo")
    assert list(rounds[0].oof) == ["dsa_tiny"], "only the zoo's DSA models re-label"
    assert read_parquet(rounds[0].oof["dsa_tiny"]).shape[0] == len(store)
    labels = store.labels("zoo1")
    weak = store.labels("weak")
    assert (labels[weak == 0] == 0).all() and 0 <= labels.min() and labels.max() <= 1
    client = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    jobs = tracking.find_runs(client.get_experiment_by_name("tiny-weak").experiment_id, {tracking.TAG_KIND: "job"},
                              f"sqlite:///{tmp_path}/mlflow.db")
    assert len(jobs) == 3 and {r.data.params["train.labels"] for r in jobs} == {"weak"}
