"""The registered ensemble: checkpoints from training runs, the MLflow registry (SQLite and a real
server), promotion by score and the tags each version carries, evaluation logged against a
version, a fresh process loading ``models:/hpa-ensemble@champion`` (with the code the model
carries) and the Ray prediction pipeline on it. (``mlflow models serve`` runs in test_serving.py;
serving against the training code, cell for cell, in test_parity.py.)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from ensemble import tracking
from ensemble.cli.product import PROMOTE as CLI_PROMOTE
from ensemble.cli.product import add_commands
from ensemble.serving.governance import PROMOTE, VersionScores, decide_promotion, list_versions
from ensemble.data.store_build import prepare
from ensemble.data.hpa import read_image
from ensemble.sim.images import simulate
from ensemble.labels import CHANNELS, CLASS_NAMES
from ensemble.serving.predict import predict_images
from ensemble.models import build_model
from ensemble.oof import CELL_COLUMNS
from ensemble.serving.registry import MemberCheckpoints, member_checkpoints, register_ensemble, save_ensemble
from ensemble.serving.model import Preprocessing, load_ensemble
from ensemble.sim.oof import make_synthetic_oof
from ensemble.selectors import MethodScore, select_ensemble
from ensemble.zoo import ModelSpec

NAME = "hpa-ensemble"
CHAMPION = f"models:/{NAME}@champion"
MODEL_SPECS = {  # the DSA runs at 24 px on 32 px crops: inference must resize as training does
    "dsa_resnet_0": ModelSpec("dsa_resnet_0", "dsa", "test_resnet", cell_size=24, cells_per_image=4),
    "cla_effnet_0": ModelSpec("cla_effnet_0", "cla", "test_efficientnet", cell_size=32),
}


def tiny_members(folder: Path, n_folds: int = 2) -> dict[str, MemberCheckpoints]:
    """Untrained tiny networks saved as training saves them (checkpoint/best.pt + spec.json)."""
    members = {}
    for name, spec in MODEL_SPECS.items():
        folds = {}
        for fold in range(n_folds):
            torch.manual_seed(fold)
            directory = folder / name / f"fold{fold}"
            directory.mkdir(parents=True)
            torch.save(build_model(spec).state_dict(), directory / "best.pt")
            (directory / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
            folds[fold] = directory / "best.pt"
        members[name] = MemberCheckpoints(spec, folds)
    return members


def tiny_spec(**changes):
    """An ensemble selected from synthetic OOF of two models named like MODEL_SPECS (one DSA)."""
    synthetic = make_synthetic_oof(n_images=40, cells_per_image=5, n_folds=2,
                                   families={"resnet": ("dsa", 1), "effnet": ("cla", 1)})
    options = dict(fusion="paper", aggregation="hierarchical", nested=False, greedy=False)
    spec = select_ensemble(synthetic.oof, synthetic.labels, **options)
    # A threshold in the middle of the classes' correlations, so that both rules are used.
    middle = float(np.median([rule.correlation for rule in spec.fusion.values()]))
    spec = select_ensemble(synthetic.oof, synthetic.labels, rho_th=middle, **options)
    assert sorted(spec.members.values()) == sorted(MODEL_SPECS)
    assert {r.rule for r in spec.fusion.values()} == {"product", "cell"}, "both fusion rules are exercised"
    return dataclasses.replace(spec, **changes)


def scored(spec, nested: float):
    """``spec`` as if its nested selection had scored the ensemble ``nested``."""
    return dataclasses.replace(spec, scores={**spec.scores, "hcpl": MethodScore(in_sample=nested, nested_mean=nested)})


class MlflowServer:
    """A real ``mlflow server`` on a free port, started at once; :meth:`url` waits until it answers.

    As on a cluster's head: runs and the registry in a database (``folder/server.db``), artifacts
    served by the server from ``folder/artifacts`` (their URIs are ``mlflow-artifacts:/``). A
    second server on the same folder serves what the first one recorded.
    """

    def __init__(self, folder: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log_path = folder / "server.log"
        self.log = open(self.log_path, "a")
        # One web worker and no background job runners (seven more processes by default): a test
        # server needs neither, and on a small machine they make start-up take minutes.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: workers stop with it
        )

    def url(self, timeout: float = 180.0) -> str:
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return url
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory):
    """Started before everything else, so it boots while the store is built."""
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module", autouse=True)
def keep_tracking_uri():
    """Registering makes a tracking URI the process default: restore it for later modules."""
    previous = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A cell store of 6 simulated images and training-like MLflow runs of two members x 2 folds."""
    tmp = tmp_path_factory.mktemp("trained")
    simulate(tmp / "data", n_images=6, seed=1, size=256)
    store = str(tmp / "store")
    prepare(tmp / "data", store, cell_size=32, n_folds=2, progress=False)
    uri = f"sqlite:///{tmp}/mlflow.db"
    members = tiny_members(tmp / "checkpoints")
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment("tiny", uri)
    for name, member in members.items():
        for fold, path in member.folds.items():
            tags = {tracking.TAG_KIND: "job", tracking.TAG_MODEL: name, tracking.TAG_FOLD: str(fold),
                    tracking.TAG_SPEC: member.spec.fingerprint(), tracking.TAG_HEAD: member.spec.head,
                    tracking.TAG_ZOO: "tiny", tracking.TAG_FINGERPRINT: "data-0123"}
            run = client.create_run(experiment_id, run_name=f"tiny-{name}-fold{fold}", tags=tags)
            client.log_param(run.info.run_id, "store", store)
            client.log_artifact(run.info.run_id, str(path), artifact_path="checkpoint")
            client.log_artifact(run.info.run_id, str(path.parent / "spec.json"), artifact_path="checkpoint")
            client.set_terminated(run.info.run_id, "FINISHED")
    return SimpleNamespace(tmp=tmp, root=tmp / "data", store=store, uri=uri, members=members)


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> SimpleNamespace:
    """Two new simulated test images, and a truncated one."""
    root = tmp_path_factory.mktemp("new")
    good = simulate(root, n_images=2, seed=11, size=256, split="test").image_ids
    for channel in CHANNELS:
        Image.fromarray(np.zeros((256, 256), np.uint8)).save(root / "test" / f"bad-truncated_{channel}.png")
    red = root / "test" / "bad-truncated_red.png"
    red.write_bytes(red.read_bytes()[:40])
    return SimpleNamespace(root=root, good=good, ids=[*good, "bad-truncated"])


@pytest.fixture(scope="module")
def registered(trained) -> SimpleNamespace:
    """The ensemble registered from the training runs, in the SQLite registry."""
    members = member_checkpoints("tiny", list(MODEL_SPECS), trained.uri, dst=trained.tmp / "fetched")
    spec = tiny_spec()
    version = register_ensemble(spec, members, Preprocessing.from_store(trained.store), tracking_uri=trained.uri,
                                experiment="tiny")
    return SimpleNamespace(spec=spec, members=members, version=version)


def test_member_checkpoints_fetch_every_fold_of_the_latest_runs(trained, registered):
    for name, member in registered.members.items():
        assert member.spec == MODEL_SPECS[name]
        assert sorted(member.folds) == [0, 1] and sorted(member.runs) == [0, 1]
        assert member.store == trained.store
        for fold, path in member.folds.items():
            fetched = torch.load(path, weights_only=True)
            original = torch.load(trained.members[name].folds[fold], weights_only=True)
            assert all(torch.equal(fetched[k], original[k]) for k in original)
    with pytest.raises(ValueError, match="no finished training run of model 'absent'"):
        member_checkpoints("tiny", ["absent"], trained.uri, dst=trained.tmp / "none")


def test_fold_networks_may_differ_in_what_only_training_uses(trained, tmp_path):
    """Each outer fold's sweep picks its own train settings and dropout: those fold networks serve
    with one spec. Fold networks that differ in what inference runs (the DSA's bag size) are refused."""
    client = tracking.client(trained.uri)
    spec = MODEL_SPECS["dsa_resnet_0"]
    for changed, fetched in ((dict(head_kwargs={"drop_rate": 0.3}, train=dataclasses.replace(spec.train, lr=0.1)), True),
                             (dict(cells_per_image=2), False)):
        experiment = f"per-fold-{fetched}"
        experiment_id = tracking.ensure_experiment(experiment, trained.uri)
        for fold, fold_spec in ((0, spec), (1, dataclasses.replace(spec, **changed))):
            folder = tmp_path / experiment / f"fold{fold}"
            folder.mkdir(parents=True)
            (folder / "spec.json").write_text(json.dumps(dataclasses.asdict(fold_spec)))
            shutil.copyfile(trained.members["dsa_resnet_0"].folds[fold], folder / "best.pt")
            run = client.create_run(experiment_id, tags={tracking.TAG_KIND: "job", tracking.TAG_MODEL: spec.name,
                                                         tracking.TAG_FOLD: str(fold)})
            client.log_artifacts(run.info.run_id, str(folder), artifact_path="checkpoint")
            client.set_terminated(run.info.run_id, "FINISHED")
        if fetched:
            members = member_checkpoints(experiment, [spec.name], trained.uri, dst=tmp_path / "fetched")
            assert sorted(members[spec.name].folds) == [0, 1]
        else:
            with pytest.raises(ValueError, match=r"differ in \['cells_per_image'\]"):
                member_checkpoints(experiment, [spec.name], trained.uri, dst=tmp_path / "refused")


def test_a_version_records_what_it_is_and_the_first_becomes_champion(trained, registered):
    client = MlflowClient(trained.uri)
    assert client.get_model_version_by_alias(NAME, "champion").version == registered.version.version
    run = client.get_run(registered.version.run_id)
    assert run.data.tags[tracking.TAG_KIND] == "register"
    members = ",".join(registered.spec.groups["image_stream"] + registered.spec.groups["cell_level"])
    assert run.data.params["members"] == members
    tags = registered.version.tags
    assert tags[tracking.TAG_ZOO] == "tiny" and tags[tracking.TAG_FINGERPRINT] == "data-0123", "from the training runs"
    assert tags[tracking.TAG_MEMBERS] == members and tags[tracking.TAG_CODE_VERSION].startswith("0.1.0")
    assert tracking.TAG_NESTED_SCORE not in tags, "selected without nested scoring: no score is made up"
    assert tags[tracking.TAG_PROMOTION] == "@champion: no champion before"


def test_promotion_compares_scores_with_the_champion(trained, registered, tmp_path, capsys):
    """A worse version does not take champion; ``always`` overrides; ``never`` never moves it."""
    client = MlflowClient(trained.uri)
    name = "governed 'ensemble'"  # a quote in the name: the registry's filters must quote it right

    def register(nested, promote="if-better", data=None):
        version = register_ensemble(scored(registered.spec, nested), registered.members,
                                    Preprocessing.from_store(trained.store), tracking_uri=trained.uri, name=name,
                                    experiment="tiny", promote=promote, data_fingerprint=data)
        return version.version, client.get_model_version_by_alias(name, "champion").version

    first, champion = register(0.40)
    assert champion == first
    worse, champion = register(0.35)
    assert champion == first
    assert client.get_model_version(name, worse).tags[tracking.TAG_PROMOTION] == \
        f"not @champion: not better than champion v{first}: nested 0.3500 vs 0.4000"
    forced, champion = register(0.35, promote="always")
    assert champion == forced
    kept, champion = register(0.90, promote="never")
    assert champion == forced, "never leaves the champion, however good the new version"
    better, champion = register(0.36)
    assert champion == better and "better than champion" in client.get_model_version(name, better).tags["promotion"]
    smoke, champion = register(0.99, data="data-4567")  # a smoke run on other data scores high
    assert champion == better
    unlike = f"not @champion: no score to compare with champion v{better}; nested not compared (data data-4567 vs data-0123)"
    assert client.get_model_version(name, smoke).tags[tracking.TAG_PROMOTION] == unlike

    table = list_versions(name, trained.uri)
    assert list(table["version"]) == [int(v) for v in (smoke, better, kept, forced, worse, first)]
    assert list(table["nested"]) == [0.99, 0.36, 0.90, 0.35, 0.35, 0.40]
    assert list(table["data"][:2]) == ["data-4567", "data-0123"]
    assert table.set_index("version")["aliases"].to_dict()[int(better)] == "champion"
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["models", "--name", name, "--tracking-uri", trained.uri])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "champion" in printed and "0.9000" in printed and "nested" in printed and unlike in printed


def scores(nested=None, test=None, test_data=None, zoo="tiny", data="data-0123"):
    """A version's scores, by default trained on the same zoo and data as the others."""
    return VersionScores(nested, test, test_data, zoo, data)


@pytest.mark.parametrize("new, champion, promoted, reason", [
    (scores(0.5), None, True, "no champion before"),
    (scores(0.5), scores(), True, "champion v1 carries no score"),
    (scores(), scores(0.4), False, "no score to compare with champion v1"),
    (scores(0.5), scores(0.5), False, "not better than champion v1: nested 0.5000 vs 0.5000"),
    # Measured on the same test set, the test score counts too: better nested, worse test.
    (scores(0.5, 0.70, "t1"), scores(0.4, 0.75, "t1"), False,
     "not better than champion v1: nested 0.5000 vs 0.4000, test 0.7000 vs 0.7500"),
    (scores(0.5, 0.80, "t1"), scores(0.4, 0.75, "t1"), True,
     "better than champion v1: nested 0.5000 vs 0.4000, test 0.8000 vs 0.7500"),
    # Test scores of different test sets are not compared.
    (scores(0.5, 0.70, "t2"), scores(0.4, 0.75, "t1"), True,
     "better than champion v1: nested 0.5000 vs 0.4000; test not compared (test data t2 vs t1)"),
    (scores(0.4, 0.80, "t1"), scores(None, 0.75, "t1"), True, "better than champion v1: test 0.8000 vs 0.7500"),
    # Nested scores of other training data or another zoo are not compared: a smoke run's high
    # score on a small dataset cannot keep or take champion.
    (scores(0.5, data="data-4567"), scores(0.9), False,
     "no score to compare with champion v1; nested not compared (data data-4567 vs data-0123)"),
    (scores(0.9, zoo="quick"), scores(0.5, zoo="hcpl"), False,
     "no score to compare with champion v1; nested not compared (zoo quick vs hcpl)"),
    (scores(0.5, zoo=None, data=None), scores(0.4), False,
     "no score to compare with champion v1; nested not compared (zoo not recorded, data not recorded)"),
    (scores(0.3, 0.80, "t1", data="data-4567"), scores(0.5, 0.75, "t1"), True,
     "better than champion v1: test 0.8000 vs 0.7500; nested not compared (data data-4567 vs data-0123)"),
])
def test_if_better_compares_the_scores_both_versions_carry(new, champion, promoted, reason):
    assert CLI_PROMOTE == PROMOTE
    assert decide_promotion("if-better", new, champion, "1") == (promoted, reason)
    assert decide_promotion("always", new, champion, "1")[0] and not decide_promotion("never", new, champion, "1")[0]
    with pytest.raises(ValueError, match="promote must be one of"):
        decide_promotion("sometimes", new, champion, "1")


def test_evaluate_logs_its_scores_against_the_version(trained, registered, new_images, tmp_path, capsys):
    mlflow.set_tracking_uri(trained.uri)
    out = tmp_path / "preds.parquet"
    predict_images(CHAMPION, new_images.root, new_images.good, out=out, engine="local", progress=False)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["evaluate", str(out), str(new_images.root), "--model-version", "champion",
                              "--tracking-uri", trained.uri])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(trained.uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    run = client.get_run(version.tags[tracking.TAG_TEST_RUN])
    assert f"logged to MLflow run {run.info.run_id} against {NAME} version {version.version}" in printed
    assert run.data.tags[tracking.TAG_KIND] == "evaluate" and run.data.tags[tracking.TAG_MODEL_VERSION] == str(version.version)
    assert run.data.tags[tracking.TAG_REGISTERED_MODEL] == NAME
    assert run.info.experiment_id == client.get_run(version.run_id).info.experiment_id, "beside the registering run"
    metrics = run.data.metrics
    assert 0 <= metrics["competition_map"] <= 1 and metrics["n_images"] == 2 and metrics["n_missed_images"] == 0
    assert float(version.tags[tracking.TAG_TEST_SCORE]) == pytest.approx(metrics["competition_map"], abs=1e-6)
    assert float(version.tags[tracking.TAG_TEST_CELL_MAP]) == pytest.approx(metrics["cell_map"], abs=1e-6)
    assert any(name.startswith("competition_ap/") for name in metrics)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/preds_per_class_ap.png", "evaluation/per_class_ap.csv", "evaluation/report.txt"} <= logged


def test_segmenter_weights_travel_with_the_model_from_a_bucket(tmp_path, monkeypatch):
    """hpacellseg's weight files, one in a bucket and one on disk, are packed into the model, and
    hpacellseg is among its requirements: a server needs nothing but the registry."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # one cached for another server would be handed back
    try:
        nuclei, cells = os.urandom(3000), tmp_path / "dpn_unet_cell_3ch_v1.pth"
        cells.write_bytes(os.urandom(2000))
        boto3.client("s3").create_bucket(Bucket="weights")
        boto3.client("s3").put_object(Bucket="weights", Key="hpa/dpn_unet_nuclei_v1.pth", Body=nuclei)
        settings = {"nuclei_model_path": "s3://weights/hpa/dpn_unet_nuclei_v1.pth", "cell_model_path": str(cells),
                    "scale_factor": 0.25, "device": "cpu"}
        model = save_ensemble(tmp_path / "model", tiny_spec(), tiny_members(tmp_path / "members", n_folds=1),
                              Preprocessing({"name": "hpacellseg", "settings": settings}, cell_size=32))
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    config = json.loads(next(model.rglob("config.json")).read_text())
    assert config["segmenter_files"] == {"nuclei_model_path": "dpn_unet_nuclei_v1.pth",
                                         "cell_model_path": "dpn_unet_cell_3ch_v1.pth"}
    packed = next(model.rglob("dpn_unet_nuclei_v1.pth")).parent
    assert (packed / "dpn_unet_nuclei_v1.pth").read_bytes() == nuclei
    assert (packed / "dpn_unet_cell_3ch_v1.pth").read_bytes() == cells.read_bytes()
    requirements = (model / "requirements.txt").read_text().splitlines()
    assert {"pytorch_zoo", "hpacellseg @ https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip"} \
        <= set(requirements)
    assert any(line.startswith("torch==") for line in requirements)


def test_registration_refuses_incomplete_ensembles(trained, registered):
    preprocessing = Preprocessing.from_store(trained.store)
    partial = {"cla_effnet_0": registered.members["cla_effnet_0"]}
    with pytest.raises(ValueError, match="no checkpoints for the ensemble's models"):
        register_ensemble(registered.spec, partial, preprocessing, tracking_uri=trained.uri, name="broken")
    with pytest.raises(ValueError, match="no integrity model"):
        register_ensemble(dataclasses.replace(registered.spec, integrity_weighting=True), registered.members,
                          preprocessing, tracking_uri=trained.uri, name="broken")


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import mlflow, pandas as pd
    root, out = sys.argv[1], sys.argv[2]
    ids = sys.argv[3].split(",")
    for i, uri in enumerate(sys.argv[4:]):
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model("models:/hpa-ensemble@champion")
        frame = pd.DataFrame({"image_id": ids, "root": root, "split": "test"})
        model.predict(frame).to_parquet(f"{out}/from_{i}.parquet")
        print(json.dumps(model.unwrap_python_model().last_report.skipped))
    import ensemble
    print(ensemble.__file__)  # where the code came from: the first model's own copy
""")


@pytest.mark.slow
def test_a_fresh_process_loads_the_champion_from_sqlite_and_from_a_server(trained, registered, new_images,
                                                                           mlflow_server):
    server = mlflow_server.url()
    register_ensemble(registered.spec, registered.members, Preprocessing.from_store(trained.store),
                      tracking_uri=server, experiment="tiny")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(new_images.root), str(trained.tmp), ",".join(new_images.ids),
         trained.uri, server],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *lines, code_file = done.stdout.splitlines()
    skipped = [json.loads(line) for line in lines[-2:]]
    assert [[image_id for image_id, _ in s] for s in skipped] == [["bad-truncated"]] * 2
    # Nothing had imported the package, so it came from the model's code_paths, not this checkout.
    assert Path(code_file).parts[-3:] == ("code", "ensemble", "__init__.py")
    assert not Path(code_file).is_relative_to(Path(__file__).parents[1])
    from_sqlite = pd.read_parquet(trained.tmp / "from_0.parquet")
    from_server = pd.read_parquet(trained.tmp / "from_1.parquet")
    assert len(from_sqlite) > 0 and set(from_sqlite["image_id"]) == set(new_images.good)
    pd.testing.assert_frame_equal(from_sqlite, from_server)
    mlflow.set_tracking_uri(trained.uri)
    here = load_ensemble(CHAMPION).predict_arrays({i: read_image(new_images.root, i, "test") for i in new_images.good})
    np.testing.assert_allclose(from_sqlite[list(CLASS_NAMES)].to_numpy(), here[CELL_COLUMNS].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_ray_pipeline_predicts_like_the_local_path(trained, registered, new_images):
    """The Ray path's actors resolve models:/ against the driver's tracking URI, and skip bad images."""
    mlflow.set_tracking_uri(trained.uri)
    local = predict_images(CHAMPION, new_images.root, new_images.ids, engine="local", progress=False)
    streamed = predict_images(CHAMPION, new_images.root, new_images.ids, engine="ray", batch_size=2, num_workers=1,
                              progress=False)
    for result in (local, streamed):
        assert [image_id for image_id, _ in result.report.skipped] == ["bad-truncated"] and result.report.n_ok == 2
    pd.testing.assert_frame_equal(streamed.images.sort_values("image_id", ignore_index=True), local.images)
    pd.testing.assert_frame_equal(streamed.cells, local.cells, check_dtype=False, atol=1e-6)
    assert streamed.timings is None and local.timings.cells == len(local.cells) > 0


def test_cli_registers_from_an_experiment(trained, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    spec_path = tiny_spec().to_json(tmp_path / "ensemble.json")
    args = parser.parse_args(["register", "--experiment", "tiny", "--spec", str(spec_path), "--name", "cli-ensemble",
                              "--tracking-uri", trained.uri])
    assert args.func(args) == 0
    assert "registered cli-ensemble version 1: @champion: no champion before" in capsys.readouterr().out
    assert int(MlflowClient(trained.uri).get_model_version_by_alias("cli-ensemble", "champion").version) == 1


@pytest.fixture(scope="module")
def in_bucket(s3_bucket, new_images, tmp_path_factory) -> SimpleNamespace:
    """Inputs of every CLI command that takes a path, in the S3 bucket: the new images (with truth),
    an ID list and a given mask of one of them, a spec, predictions that are the truth itself, and
    a dataset as Kaggle gives it (no truth)."""
    from ensemble.data.hpa import read_truth
    from ensemble.serving.predict import write_predictions
    from ensemble.storage import filesystem, write_bytes
    from ensemble.serving.submission import encode_cells

    fs, _ = filesystem(s3_bucket)
    fs.put(f"{new_images.root}/", f"{s3_bucket}/new/", recursive=True)
    kaggle = tmp_path_factory.mktemp("kaggle")
    simulate(kaggle, n_images=2, seed=5, size=128, truth=False)
    fs.put(f"{kaggle}/", f"{s3_bucket}/kaggle/", recursive=True)
    first = new_images.good[0]
    fs.put(str(new_images.root / "truth" / "masks" / f"{first}.png"), f"{s3_bucket}/masks/{first}.png")
    write_bytes(f"{first}\n".encode(), f"{s3_bucket}/ids.txt")
    tiny_spec().to_json(f"{s3_bucket}/spec.json")
    truth = read_truth(new_images.root)
    cells, images = [], []
    for image_id in truth.image_ids:
        mask = truth.mask(image_id)
        ids, labels = truth.cell_labels(image_id)
        cells.append(pd.DataFrame(labels, columns=CELL_COLUMNS).assign(
            image_id=image_id, cell_id=ids, rle=encode_cells(mask, ids), height=mask.shape[0], width=mask.shape[1]))
        images.append((image_id, mask.shape[1], mask.shape[0]))
    perfect = SimpleNamespace(cells=pd.concat(cells, ignore_index=True),
                              images=pd.DataFrame(images, columns=["image_id", "width", "height"]))
    for suffix in ("parquet", "csv"):
        write_predictions(perfect, f"{s3_bucket}/perfect.{suffix}")
    given = np.unique(np.asarray(Image.open(new_images.root / "truth" / "masks" / f"{first}.png")))
    return SimpleNamespace(url=s3_bucket, fs=fs, n_given=int((given > 0).sum()))


@pytest.mark.parametrize("command", ["register", "predict", "submission", "evaluate", "evaluate-csv", "check"])
def test_every_path_the_cli_takes_may_be_a_url(command, in_bucket, trained, registered, tmp_path, monkeypatch,
                                               capsys):
    """Each command reads its inputs from, and writes its outputs to, the bucket, and nothing here
    (a URL taken for a local path would make a folder named ``s3:``)."""
    from ensemble.cli.main import main

    monkeypatch.chdir(tmp_path)
    b = in_bucket.url
    predict = ["predict", f"{b}/new", "--model", CHAMPION, "--tracking-uri", trained.uri, "--engine", "local",
               "--ids", f"{b}/ids.txt", "--masks", f"{b}/masks"]
    argv, said, written = {
        "register": (["register", "--experiment", "tiny", "--spec", f"{b}/spec.json", "--name", "url-ensemble",
                      "--tracking-uri", trained.uri], "registered url-ensemble version 1", None),
        "predict": ([*predict, "--out", f"{b}/preds.parquet"], f"1 images, {in_bucket.n_given} cells",
                    f"{b}/preds.parquet"),
        "submission": ([*predict, "--out", f"{b}/submission.csv"], "1 images", f"{b}/submission.csv"),
        # Scored against a registered version too: its run logs the plot from the bucket.
        "evaluate": (["evaluate", f"{b}/perfect.parquet", f"{b}/new", "--model-version", "champion",
                      "--tracking-uri", trained.uri], "cell mAP 1.0000", f"{b}/perfect_per_class_ap.png"),
        "evaluate-csv": (["evaluate", f"{b}/perfect.csv", f"{b}/new", "--plot", f"{b}/plots/ap.png"],
                         "cell mAP 1.0000", f"{b}/plots/ap.png"),
        "check": (["check", "--zoo", "quick", "--no-build", "--data", f"{b}/kaggle", "--workdir", f"{b}/runs",
                   "--tracking-uri", trained.uri], f"{b}/kaggle has no cell truth", None),
    }[command]
    assert main(argv) == 0
    assert said in capsys.readouterr().out
    assert written is None or in_bucket.fs.exists(written)
    assert list(tmp_path.iterdir()) == []
