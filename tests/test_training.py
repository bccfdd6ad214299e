"""Training jobs under a real local Ray: DDP, complete OOF, MLflow records, resumable zoos, sweeps."""

from __future__ import annotations

import dataclasses
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ensemble import tracking
from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.models import build_model
from ensemble.serving.model import load_ensemble
from ensemble.selectors import EnsembleSpec, load_oof_dir
from ensemble.storage import read_parquet
from ensemble.selectors.served import load_validation_dir, load_validation_mlflow
from ensemble.trainers.fit import RunContext, fit_job, oof_uri, trainer_for, validation_uri
from ensemble.oof import CELL_COLUMNS, IMAGE_COLUMNS
from ensemble.pipeline import relabel_step, select_step, sweep_step, train_all
from ensemble.trainers import loop
from ensemble.zoo import IntegritySettings, ModelSpec, RelabelSettings, SpecError, TrainSettings, load_zoo
from ensemble.trainers.sweep import load_search_space, sweep
from ensemble.trainers.jobs import train_zoo


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def store(small_dataset, tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("store") / "store")
    prepare(str(small_dataset), uri, cell_size=32, n_folds=3, progress=False)
    return uri


def context(tmp_path, store, zoo="tiny") -> RunContext:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return RunContext(zoo=zoo, store=store, workdir=str(tmp_path / "work"),
                      experiment_id=tracking.ensure_experiment(zoo, uri), tracking_uri=uri, fingerprint="test")


def assert_complete_oof(table: pd.DataFrame, store: CellStore, folds) -> None:
    expected = store.cells[store.cells["fold"].isin(folds)]
    keys = set(zip(table["image_id"], table["cell_id"]))
    assert len(table) == len(expected) == len(keys), "every cell exactly once"
    assert keys == set(zip(expected["image_id"], expected["cell_id"]))
    probabilities = table[CELL_COLUMNS].to_numpy()
    assert np.isfinite(probabilities).all() and (probabilities >= 0).all() and (probabilities <= 1).all()


@pytest.mark.slow
def test_two_worker_ddp_job_writes_complete_oof(tmp_path, store, tiny_zoo_file):
    spec = load_zoo(tiny_zoo_file).model("dsa_tiny")
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=2),
                               placement=dataclasses.replace(spec.placement, num_workers=2, cpus_per_worker=1.0))
    ctx = context(tmp_path, store)
    result = trainer_for(spec, 1, ctx).fit()
    summary = result.return_value
    assert summary["world_size"] == 2
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    oof = read_parquet(oof_uri(ctx.workdir, spec.name, 1))
    assert_complete_oof(oof, CellStore(store), [1])
    assert set(IMAGE_COLUMNS) <= set(oof.columns), "DSA OOF carries the image stream"
    # every cell of an image carries the same image-stream prediction
    assert (oof.groupby("image_id")[IMAGE_COLUMNS].nunique() == 1).all().all()


def test_fit_job_records_run_and_is_skipped_when_done(tmp_path, store, tiny_zoo_file):
    spec = load_zoo(tiny_zoo_file).model("cla_tiny")
    ctx = context(tmp_path, store)
    first = fit_job(spec, 0, ctx)
    assert not first.skipped and 0 <= first.best_val_map <= 1
    client = MlflowClient(ctx.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_MODEL] == "cla_tiny" and run.data.tags[tracking.TAG_FOLD] == "0"
    assert run.data.tags[tracking.TAG_FAMILY] == "test"
    assert run.data.params["head"] == "cla"
    history = client.get_metric_history(first.run_id, "val_map")
    assert [m.step for m in history] == [0]
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"oof", "checkpoint", "curves.png"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="oof/oof.parquet",
                                                tracking_uri=ctx.tracking_uri)
    assert_complete_oof(pd.read_parquet(local), CellStore(store), [0])

    again = fit_job(spec, 0, ctx)
    assert again.skipped and again.run_id == first.run_id
    assert len(tracking.find_runs(ctx.experiment_id, {tracking.TAG_MODEL: "cla_tiny"}, ctx.tracking_uri)) == 1


@pytest.mark.slow
def test_train_zoo_trains_every_model_and_fold(tmp_path, store, tiny_zoo_file, monkeypatch):
    zoo = load_zoo(tiny_zoo_file, {"val_fraction": 0.5})  # cells enough for a second network's predictions
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"  # relative, as the CLI's default; Ray workers run in another directory
    result = train_zoo(zoo, store, str(tmp_path / "work"), tracking_uri=uri, progress=False)
    assert sorted(result.oof) == ["cla_tiny", "dsa_tiny"]
    cells = CellStore(store)
    for model, path in result.oof.items():
        assert_complete_oof(read_parquet(path), cells, [0, 1, 2])
    assert set(result.summary["model"]) == {"cla_tiny", "dsa_tiny"}
    assert (result.summary["labels"] == "truth").all()
    runs = tracking.find_runs(result.experiment_id, {tracking.TAG_KIND: "job"}, uri)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags[tracking.TAG_PARENT] == result.parent_run_id for r in runs)

    rerun = train_zoo(zoo, store, str(tmp_path / "work"), tracking_uri=uri, progress=False)
    assert all(job.skipped for job in rerun.jobs)
    assert len(tracking.find_runs(result.experiment_id, {tracking.TAG_KIND: "job"}, uri)) == 6

    # The OOF directory train_zoo leaves is what the selector reads, with the jobs' predictions of
    # their validation splits: each cell of them a second time, by another fold's network.
    oof_dir = str(tmp_path / "work" / "oof")
    validation = load_validation_dir(oof_dir, ["cla_tiny", "dsa_tiny"])
    for model, table in validation.items():
        assert sorted(table["network"].unique()) == [0, 1, 2] and (table["network"] != table["fold"]).all()
        for fold in range(3):
            _, rows, _ = loop.job_rows(cells, fold, zoo.model(model).train)
            assert sorted(map(tuple, table.loc[table["network"] == fold, ["image_id", "cell_id"]].to_numpy())) == \
                sorted(map(tuple, cells.cells.iloc[rows][["image_id", "cell_id"]].to_numpy()))
    # The jobs' MLflow runs hold the same tables, for selection from an experiment (`select --experiment`).
    experiment = tracking.client(uri).get_experiment(result.experiment_id).name
    logged = load_validation_mlflow(experiment, ["cla_tiny", "dsa_tiny"], uri)
    keys = ["network", "image_id", "cell_id"]
    for model, table in validation.items():
        pd.testing.assert_frame_equal(logged[model].sort_values(keys, ignore_index=True),
                                      table.sort_values(keys, ignore_index=True))
    spec = select_step(load_oof_dir(oof_dir), store, str(tmp_path / "ensemble"), result.experiment_id, uri,
                       result.parent_run_id, validation=validation, nested=False, greedy=False)
    assert sorted(spec.models) == ["cla_tiny", "dsa_tiny"] and spec.members
    assert EnsembleSpec.from_json(tmp_path / "ensemble" / "ensemble_spec.json").members == spec.members
    assert (tmp_path / "ensemble" / "correlation.png").stat().st_size > 0
    (select_run,) = tracking.find_runs(result.experiment_id, {tracking.TAG_KIND: "select"}, uri)
    assert select_run.info.status == "FINISHED" and "map_hcpl_in_sample_fold_mean" in select_run.data.metrics
    assert select_run.data.params["served_form"] == "True" and select_run.data.metrics["fold_noise_pairs"] >= 100
    assert 0 < select_run.data.metrics["fold_noise.cla_tiny"] < 0.5

    # A zoo without a DSA head has no image stream to fuse: the step selects without fusion. Without
    # the validation tables selection sees the OOF's one network per cell, and says so.
    cla_only = tmp_path / "cla_only"
    cla_only.mkdir()
    (cla_only / "cla_tiny.parquet").write_bytes((tmp_path / "work" / "oof" / "cla_tiny.parquet").read_bytes())
    assert load_validation_dir(str(cla_only), ["cla_tiny"]) is None
    with pytest.warns(UserWarning, match="selection sees one network per cell"):
        spec = select_step(load_oof_dir(cla_only), store, str(tmp_path / "ensemble-cla"), result.experiment_id, uri,
                           nested=False, greedy=False)
    assert spec.fusion_mode == "off" and list(spec.members.values()) == ["cla_tiny"]


@pytest.mark.slow
def test_changed_spec_is_trained_again(tmp_path, store, tiny_zoo_file):
    ctx = context(tmp_path, store)
    spec = load_zoo(tiny_zoo_file).model("cla_tiny")
    first = fit_job(spec, 2, ctx)
    changed = fit_job(dataclasses.replace(spec, train=dataclasses.replace(spec.train, lr=3e-3)), 2, ctx)
    assert not changed.skipped and changed.run_id != first.run_id
    # Trained, not resumed from the first spec's last checkpoint (the Ray run has the same name).
    assert len(MlflowClient(ctx.tracking_uri).get_metric_history(changed.run_id, "val_map")) == 1
    # Where a job runs is not what it learns: other placement finds the finished job.
    moved = fit_job(dataclasses.replace(spec, placement=dataclasses.replace(spec.placement, cpus_per_worker=0.5,
                                                                            in_memory=False)), 2, ctx)
    assert moved.skipped and moved.run_id == first.run_id


@pytest.mark.slow
def test_sweep_asha_stops_weak_trials_and_records_best(tmp_path, store, tiny_zoo_file):
    space_file = tmp_path / "space.yaml"
    # lr 1e-9 cannot learn: ASHA should cut those trials at its first rung.
    space_file.write_text("lr: {type: choice, values: [1.0e-9, 3.0e-3]}\n"
                          "weight_decay: {type: loguniform, low: 1.0e-6, high: 1.0e-4}\n")
    spec = load_zoo(tiny_zoo_file).model("cla_tiny")
    # One trial at a time (max_concurrent=1): later trials are measured against the earlier ones at
    # each ASHA rung. A worker holds 0.45 CPU so that the next trial still fits on 2 CPUs beside the
    # placement groups of up to three ASHA-stopped trials, which Ray Train V2 sometimes leaks under
    # load (ray-project/ray#54305; BENCHMARKS.md "Not yet measured").
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=4),
                               placement=dataclasses.replace(spec.placement, cpus_per_worker=0.45))
    ctx = context(tmp_path, store)
    result = sweep(spec, ctx, load_search_space(space_file), num_samples=4, max_concurrent=1)
    epochs_run = result.trials["epochs_run"]
    assert len(result.trials) == 4
    assert epochs_run.min() < 4 <= epochs_run.max(), "ASHA stopped some trials before the last epoch"
    assert (result.trials["training_iteration"] <= epochs_run).all()  # the row of each trial's best epoch
    assert result.best_val_map == pytest.approx(result.trials["val_map"].max())
    assert yaml.safe_load(open(result.config_uri)) == result.best_config
    trial_runs = tracking.find_runs(ctx.experiment_id, {tracking.TAG_KIND: "trial"}, ctx.tracking_uri)
    assert len(trial_runs) == 4


def test_search_space_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: {type: uniform, low: 0.1, high: 0.2}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: lrr: unknown key"):
        load_search_space(bad)
    bad.write_text("lr: {type: gaussian, low: 0.1}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: lr: needs 'type'"):
        load_search_space(bad)
    bad.write_text("lr: {type: uniform, low: 0.1}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: lr: .*missing \['high'\]"):
        load_search_space(bad)
    for head in ("dsa", "cla", "clh"):
        assert "lr" in load_search_space(head)


def test_zoo_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "zoo.yaml"
    bad.write_text("models:\n  - {name: a, head: xyz, backbone: test_resnet}\n")
    with pytest.raises(SpecError, match=r"zoo\.yaml: models\[0\].*head must be one of"):
        load_zoo(bad)
    bad.write_text("models:\n  - {name: a, head: cla, backbone: test_resnet, train: {epoch: 3}}\n")
    with pytest.raises(SpecError, match=r"models\[0\]\.train: unknown key\(s\) \['epoch'\]"):
        load_zoo(bad)
    bad.write_text("integrity: {enabled: true, weighting: sometimes}\n"
                   "models:\n  - {name: a, head: cla, backbone: test_resnet}\n")
    with pytest.raises(SpecError, match=r"zoo\.yaml: integrity: integrity\.weighting must be on, off or auto"):
        load_zoo(bad)
    bad.write_text("relabel: {rounds: 2, bta: 0.5}\nmodels:\n  - {name: a, head: cla, backbone: test_resnet}\n")
    with pytest.raises(SpecError, match=r"zoo\.yaml: relabel: unknown key\(s\) \['bta'\]"):
        load_zoo(bad)
    bad.write_text("train: {epochs: 2, cpus_per_worker: 4}\nmodels:\n  - {name: a, head: cla, backbone: test_resnet}\n")
    with pytest.raises(SpecError, match=r"zoo\.yaml: train: \['cpus_per_worker'\] .* under 'placement:'"):
        load_zoo(bad)
    with pytest.raises(SpecError, match="built-in zoos"):
        load_zoo("no_such_zoo")
    quick, hcpl = load_zoo("quick"), load_zoo("hcpl")
    assert len({m.backbone.split("_")[0] for m in quick.models}) >= 3 and {m.head for m in quick.models} >= {"dsa", "cla"}
    assert len(hcpl.models) == 9 and [m.head for m in hcpl.models].count("dsa") == 4
    assert hcpl.relabel.rounds == 2 and hcpl.integrity.enabled  # the paper's system


@pytest.mark.slow
def test_train_all_relabels_trains_on_the_final_labels_and_packs_the_vid(tmp_path, small_dataset, tiny_zoo_file):
    zoo = dataclasses.replace(load_zoo(tiny_zoo_file), relabel=RelabelSettings(rounds=1),
                              integrity=IntegritySettings(enabled=True, epochs=1, cv_splits=2, weighting="on"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_all(zoo, str(small_dataset), str(tmp_path / "work"), tracking_uri=uri, progress=False)

    (round_1,) = result.relabel
    assert (round_1.trained_on, round_1.version, list(round_1.model_map)) == ("weak", "cra1", ["dsa_tiny"])
    assert round_1.versions == {0: "cra1-f0", 1: "cra1-f1", 2: "cra1-f2"}
    store = CellStore(str(tmp_path / "work" / "store"))
    relabelled, weak = store.labels("cra1-f0"), store.labels("weak")
    assert ((relabelled > 0) <= (weak > 0)).all() and not np.array_equal(relabelled, weak)
    # The round's DSA trained in an experiment of its own, one job per pair of folds left out
    # (shared by the pair's two outer folds); each final job on its outer fold's labels.
    round_runs = tracking.find_runs(tracking.ensure_experiment("tiny-weak", uri), {tracking.TAG_KIND: "job"}, uri)
    assert sorted(r.data.tags[tracking.TAG_MODEL] for r in round_runs) == ["dsa_tiny"] * 3
    final_runs = tracking.find_runs(result.training.experiment_id, {tracking.TAG_KIND: "job"}, uri)
    assert len(final_runs) == 6
    assert {(r.data.tags[tracking.TAG_FOLD], r.data.params["train.labels"]) for r in final_runs} == {
        ("0", "cra1-f0"), ("1", "cra1-f1"), ("2", "cra1-f2")}

    vid = result.integrity
    assert vid.weighting and 0.5 < vid.cv.scores.loc["xgb", "auc"] <= 1 and 0 <= vid.decision.with_weights <= 1
    report = result.report()
    assert "Visual integrity" in report
    # The CRA table: the weak labels' AP and the DSA trained on them, then cra1 and the final DSA on it.
    rows = {line.split()[0]: line.split()[1:] for line in report.splitlines() if line.startswith(("  weak", "  cra1"))}
    assert rows["weak"] == [f"{round_1.trained_on_quality:.4f}", f"{round_1.model_map['dsa_tiny']:.4f}"]
    final_dsa = result.training.summary.set_index("model").loc["dsa_tiny", "oof_cell_map"]
    assert rows["cra1"] == [f"{round_1.quality:.4f}", f"{final_dsa:.4f}"]
    mlflow.set_tracking_uri(uri)
    model = load_ensemble("models:/hpa-ensemble@champion")
    assert model.integrity is not None and model.spec.integrity_weighting


def test_predict_rows_reads_with_worker_processes_and_predicts_the_same(store, monkeypatch):
    monkeypatch.setattr(loop, "PREDICT_CHUNK_CELLS", 24)  # several chunks for the workers to share
    cells = CellStore(store)
    for spec in (ModelSpec(name="d", head="dsa", backbone="test_resnet", cell_size=32, cells_per_image=4),
                 ModelSpec(name="c", head="cla", backbone="test_efficientnet", cell_size=32)):
        torch.manual_seed(0)
        network = build_model(spec)
        rows = np.flatnonzero(cells.cells["fold"] == 2)
        alone = loop.predict_rows(network, cells, rows, spec, torch.device("cpu"))
        read_by_workers = loop.predict_rows(network, cells, rows, spec, torch.device("cpu"), workers=2)
        pd.testing.assert_frame_equal(read_by_workers, alone, check_exact=True)
        assert_complete_oof(alone, cells, [2])


@pytest.mark.slow
def test_loader_workers_and_a_timm_optimizer_from_the_zoo_train_a_job(tmp_path, store, tiny_zoo_file):
    zoo_file = tmp_path / "adamw.yaml"
    zoo = yaml.safe_load(tiny_zoo_file.read_text())
    zoo["train"].update(epochs=3, optimizer="adamw", warmup_epochs=1, patience=9)
    zoo["placement"].update(loader_workers=2)
    zoo_file.write_text(yaml.safe_dump(zoo))
    spec = load_zoo(zoo_file).model("dsa_tiny")
    assert type(loop.build_optimizer(build_model(spec), spec.train)[0]) is torch.optim.AdamW
    ctx = context(tmp_path, store)
    summary = trainer_for(spec, 0, ctx).fit().return_value
    # timm's warm-up from 1e-5 for one epoch, then the cosine over the 3 epochs
    lr = spec.train.lr
    np.testing.assert_allclose([h["lr"] for h in summary["history"]],
                               [1e-5, lr * (1 + np.cos(np.pi / 3)) / 2, lr * (1 + np.cos(2 * np.pi / 3)) / 2])
    oof = read_parquet(oof_uri(ctx.workdir, spec.name, 0))
    cells = CellStore(store)
    assert_complete_oof(oof, cells, [0])
    # The same table as an in-process prediction writes: columns, types, row order.
    reference = loop.predict_rows(build_model(spec), cells, np.flatnonzero(cells.cells["fold"] == 0), spec,
                                  torch.device("cpu"))
    assert list(oof.columns) == list(reference.columns) and (oof.dtypes == reference.dtypes).all()
    pd.testing.assert_frame_equal(oof[["image_id", "cell_id", "fold"]], reference[["image_id", "cell_id", "fold"]])
    # The chosen epoch's predictions of the validation split: cells of the other folds, by this job.
    validation = read_parquet(validation_uri(ctx.workdir, spec.name, 0))
    _, rows, _ = loop.job_rows(cells, 0, spec.train)
    assert len(validation) == len(rows) and (validation["network"] == 0).all() and (validation["fold"] != 0).all()


def test_resumed_job_continues_the_optimiser_and_schedule(tmp_path):
    settings = TrainSettings(epochs=5, lr=1e-3, optimizer="adamw", warmup_epochs=2)
    spec = ModelSpec(name="c", head="cla", backbone="test_efficientnet", cell_size=32, train=settings)
    batch = torch.rand(4, 4, 32, 32)

    def epoch(model, optimizer, scheduler, e):  # as the loop: train at the optimiser's lr, then step the schedule
        lr = optimizer.param_groups[0]["lr"]
        model(batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(e + 1)
        return lr

    torch.manual_seed(0)
    model = build_model(spec)
    optimizer, scheduler = loop.build_optimizer(model, settings)
    uninterrupted = [epoch(model, optimizer, scheduler, e) for e in range(settings.epochs)]
    weights = model.state_dict()

    torch.manual_seed(0)
    model = build_model(spec)
    optimizer, scheduler = loop.build_optimizer(model, settings)
    resumed = [epoch(model, optimizer, scheduler, e) for e in range(2)]
    loop.save_state(tmp_path, model, optimizer, scheduler, {"epoch": 2}, {}, {})
    model = build_model(spec)  # a new worker: fresh weights, optimiser and schedule (lr back at 1e-5)
    optimizer, scheduler = loop.build_optimizer(model, settings)
    state, _ = loop.restore_state(tmp_path, model, optimizer, scheduler)
    assert state == {"epoch": 2} and scheduler.state_dict() == torch.load(tmp_path / "state.pt")["scheduler"]
    resumed += [epoch(model, optimizer, scheduler, e) for e in range(state["epoch"], settings.epochs)]
    assert resumed == uninterrupted and uninterrupted[0] == 1e-5 < uninterrupted[2]
    for name, value in model.state_dict().items():  # the optimiser's moments came back too
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def test_unknown_optimizer_or_schedule_fails_when_the_zoo_is_loaded(tmp_path):
    bad = tmp_path / "zoo.yaml"
    bad.write_text("train: {optimizer: adamm}\nmodels:\n  - {name: a, head: cla, backbone: test_resnet}\n")
    with pytest.raises(SpecError, match=r"zoo\.yaml: models\[0\]\.train: optimizer: 'adamm' is not a timm optimizer"):
        load_zoo(bad)
    bad.write_text("models:\n  - {name: a, head: cla, backbone: test_resnet, train: {schedule: cosin}}\n")
    with pytest.raises(SpecError, match=r"zoo\.yaml: models\[0\]\.train: schedule: 'cosin' is not one of"):
        load_zoo(bad)
    bad.write_text("train: {optimizer: lookahead_adamw, schedule: wsd, warmup_epochs: 1}\n"
                   "models:\n  - {name: a, head: cla, backbone: test_resnet}\n")
    assert load_zoo(bad).models[0].train.optimizer == "lookahead_adamw"


def shuffled_store(store: str, out, fold: int) -> np.ndarray:
    """A copy of ``store`` with every label of ``fold``'s cells (weak, cell and truth) shuffled among them;
    returns the rows of those cells."""
    import pyarrow.parquet as pq

    shutil.copytree(store, out)
    table = pq.read_table(out / "cells.parquet")
    held = np.flatnonzero(table.column("fold").to_numpy() == fold)
    order = np.arange(table.num_rows)
    order[held] = np.random.default_rng(0).permutation(held)
    for name in ("image_labels", "cell_labels", "truth_labels"):
        table = table.set_column(table.column_names.index(name), name, table.column(name).take(order))
    pq.write_table(table, out / "cells.parquet")
    assert not np.array_equal(CellStore(str(out)).labels("truth")[held], CellStore(store).labels("truth")[held])
    assert not np.array_equal(CellStore(str(out)).labels("weak")[held], CellStore(store).labels("weak")[held])
    return held


@pytest.mark.slow
def test_held_out_labels_cannot_reach_the_oof_of_a_job(tmp_path, store, tiny_zoo_file):
    """A job's OOF is out of sample: with every label of the held-out fold shuffled (weak, cell and
    truth), the scores that choose the epoch and the fold's OOF predictions are the same to the bit."""
    shuffled = tmp_path / "shuffled-store"
    shuffled_store(store, shuffled, 0)

    spec = load_zoo(tiny_zoo_file).model("cla_tiny")
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=2, patience=9))
    tables, choices, held_out = [], [], []
    for name, uri in (("original", store), ("shuffled", str(shuffled))):
        ctx = context(tmp_path / name, uri)
        summary = trainer_for(spec, 0, ctx).fit().return_value
        assert summary["epochs"] == 2
        tables.append(read_parquet(oof_uri(ctx.workdir, spec.name, 0)))
        choices.append([(h["train_loss"], h["val_map"]) for h in summary["history"]] + [summary["best_epoch"]])
        held_out.append(summary["oof_map"])
    assert choices[0] == choices[1], "validation scores must not depend on the held-out fold's labels"
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)
    assert held_out[0] != held_out[1], "the held-out score does read them, once, after the choice"


@pytest.mark.slow
def test_held_out_labels_cannot_reach_the_oof(tmp_path, store, tiny_zoo_file):
    """OOF predictions are out of sample, CRA and sweeps included: with every label of fold 1
    shuffled (weak, cell and truth), the labels CRA writes for fold 1's job, the config fold 1's
    sweep chooses, the scores that choose the final job's epoch and fold 1's OOF predictions are
    all the same to the bit. The old chain would fail each: one sweep on fold 0 (which trains on
    fold 1) for every fold, and CRA rounds whose DSAs trained on every fold."""
    zoo = dataclasses.replace(load_zoo(tiny_zoo_file), relabel=RelabelSettings(rounds=1))
    # The DSA alone (CRA's model); a worker holds 0.45 CPU so that a trial fits beside the placement
    # groups Ray Train V2 sometimes leaks (see the ASHA test above).
    (dsa,) = [m for m in zoo.models if m.head == "dsa"]
    zoo = dataclasses.replace(zoo, models=(dataclasses.replace(
        dsa, placement=dataclasses.replace(dsa.placement, cpus_per_worker=0.45)),))
    fold = 1
    runs = {}
    for name in ("original", "shuffled"):
        workdir = tmp_path / name
        if name == "original":
            shutil.copytree(store, workdir / "store")
        else:
            held = shuffled_store(store, workdir / "store", fold)
        uri = f"sqlite:///{workdir}/mlflow.db"
        # What train_all does, for outer fold 1 alone: CRA, then the sweep, then the job.
        specs, rounds = relabel_step(zoo, str(workdir), tracking_uri=uri, progress=False, folds=[fold])
        # One trial at a time: the second's config depends on the first's score, so the choice reads them.
        specs, sweeps = sweep_step(zoo, str(workdir), specs, num_samples=2, tracking_uri=uri, folds=[fold],
                                   max_concurrent=1)
        spec = specs["dsa_tiny", fold]
        assert spec.train.labels == f"cra1-f{fold}" and rounds[0].versions == {fold: f"cra1-f{fold}"}
        ctx = context(workdir, str(workdir / "store"))
        result = fit_job(spec, fold, ctx)
        labels = CellStore(str(workdir / "store")).labels(spec.train.labels)
        runs[name] = dict(spec=spec, labels=labels, trials=sorted(sweeps["dsa_tiny", fold].trials["val_map"]),
                          val=[m.value for m in MlflowClient(uri).get_metric_history(result.run_id, "val_map")],
                          oof=read_parquet(result.oof_uri), oof_map=result.oof_map)
    original, shuffled = runs["original"], runs["shuffled"]
    others = np.setdiff1d(np.arange(len(original["labels"])), held)
    np.testing.assert_array_equal(shuffled["labels"][others], original["labels"][others])
    assert shuffled["trials"] == original["trials"] and shuffled["spec"] == original["spec"]
    assert shuffled["val"] == original["val"], "validation scores must not depend on the held-out fold's labels"
    pd.testing.assert_frame_equal(shuffled["oof"], original["oof"], check_exact=True)
    assert set(original["oof"]["fold"]) == {fold}
    assert shuffled["oof_map"] != original["oof_map"], "the held-out score does read them, once, after the choice"
