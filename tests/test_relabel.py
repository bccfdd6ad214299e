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
from ensemble.trainers.relabel import (cra_rounds, fold_specs, label_quality, nested_trainer, power_normalise, relabel,
                                       relabelled_zoo, zoo_trainer)
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


def oracle_oof(store: CellStore, workdir, version: str, outer: int, noise: float) -> dict[str, str]:
    """OOF tables over the folds but ``outer`` of a model that knows the truth up to noise: stands in
    for the DSAs of an outer fold."""
    others = store.cells["fold"].to_numpy() != outer
    truth = np.nan_to_num(store.labels("truth"))[others]
    rng = np.random.default_rng(len(version))
    probabilities = np.clip(0.8 * truth + noise * rng.random(truth.shape), 0, 1)
    table = store.cells.loc[others, ["image_id", "cell_id", "fold"]]
    table[CELL_COLUMNS] = probabilities
    uri = f"{workdir}/{version}-outer{outer}.parquet"
    write_parquet(table.sample(frac=1.0, random_state=outer), uri)
    return {"oracle": uri}


def test_cra_rounds_chain_label_versions_per_outer_fold(store, tmp_path):
    calls = []

    def train_dsas(versions):
        calls.append(dict(versions))
        return {j: oracle_oof(store, tmp_path, version, j, noise=0.3) for j, version in versions.items()}

    rounds = cra_rounds(store, train_dsas, rounds=2, beta=0.5, prefix="chain")
    # Each outer fold's second round trains on its own first-round labels, never another fold's.
    assert calls == [{0: "weak", 1: "weak", 2: "weak"}, {0: "chain1-f0", 1: "chain1-f1", 2: "chain1-f2"}]
    assert [(r.round, r.trained_on, r.version) for r in rounds] == [(1, "weak", "chain1"), (2, "chain1", "chain2")]
    assert rounds[-1].versions == {0: "chain2-f0", 1: "chain2-f1", 2: "chain2-f2"}
    fold = store.cells["fold"].to_numpy()
    weak = store.labels("weak")
    for j in (0, 1, 2):
        labels = store.labels(f"chain2-f{j}")
        np.testing.assert_array_equal(labels[fold == j], weak[fold == j])  # no model of outer fold j trains on them
        assert not np.array_equal(labels[fold != j], weak[fold != j])
    quality = np.mean([label_quality(store, f"chain2-f{j}", np.flatnonzero(fold != j)) for j in (0, 1, 2)])
    assert rounds[-1].quality == pytest.approx(quality)
    assert rounds[1].trained_on_quality == rounds[0].quality
    assert rounds[0].quality > rounds[0].trained_on_quality, "near-oracle models improve the labels"
    assert 0 < rounds[0].model_map["oracle"] <= 1
    # An outer fold's tables must cover exactly the other folds.
    with pytest.raises(ValueError, match="store cell"):
        cra_rounds(store, lambda versions: {j: oracle_oof(store, tmp_path, v, (j + 1) % 3, 0.3)
                                            for j, v in versions.items()}, rounds=1, prefix="wrong")
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
    with pytest.raises(ValueError, match="no model"):
        nested_trainer(zoo, "unused", "unused", heads=("clh",))
    specs = fold_specs(zoo, {0: "cra2-f0", 1: "cra2-f1"})
    assert sorted(specs) == [("cla_tiny", 0), ("cla_tiny", 1), ("dsa_tiny", 0), ("dsa_tiny", 1)]
    assert specs["cla_tiny", 1].train.labels == "cra2-f1" and specs["cla_tiny", 1].name == "cla_tiny"


@pytest.mark.slow
def test_nested_trainer_shares_round_one_jobs_between_outer_folds(store, tmp_path, tiny_zoo_file):
    zoo = load_zoo(tiny_zoo_file)
    train = nested_trainer(zoo, store.uri, str(tmp_path / "work"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                           progress=False)
    rounds = cra_rounds(store, train, rounds=1, prefix="zoo")
    fold = store.cells["fold"].to_numpy()
    for j in (0, 1, 2):
        assert list(rounds[0].oof[j]) == ["dsa_tiny"], "only the zoo's DSA models re-label"
        table = read_parquet(rounds[0].oof[j]["dsa_tiny"])
        assert len(table) == (fold != j).sum() and set(table["fold"]) == {0, 1, 2} - {j}
    labels, weak = store.labels("zoo1-f0"), store.labels("weak")
    assert (labels[weak == 0] == 0).all() and 0 <= labels.min() and labels.max() <= 1
    client = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    jobs = tracking.find_runs(client.get_experiment_by_name("tiny-weak").experiment_id, {tracking.TAG_KIND: "job"},
                              f"sqlite:///{tmp_path}/mlflow.db")
    # K (K - 1) / 2 jobs, one per pair of folds left out, each serving both outer folds of its pair.
    assert sorted(r.data.tags[tracking.TAG_FOLD] for r in jobs) == ["0+1", "0+2", "1+2"]
    assert {r.data.params["train.labels"] for r in jobs} == {"weak"}
    # Outer fold 0's table on fold 1 is the prediction of the job that left out folds 0 and 1.
    pair = read_parquet(str(tmp_path / "work" / "labels-weak" / "oof" / "dsa_tiny" / "fold0+1.parquet"))
    assert set(pair["fold"]) == {0, 1}
    outer0 = read_parquet(rounds[0].oof[0]["dsa_tiny"]).set_index(["image_id", "cell_id"])
    on_fold1 = pair[pair["fold"] == 1].set_index(["image_id", "cell_id"])
    pd.testing.assert_frame_equal(outer0.loc[on_fold1.index], on_fold1)
