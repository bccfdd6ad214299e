"""Bad inputs as a user meets them, through the CLI: one line that names the file and key (or the
tracking URI and the cause), said soon and before Ray starts, and nothing left half-written.

The configuration tests come first and check that no Ray was started: the data tests after them
share one local Ray for the module.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from PIL import Image

from ensemble import tracking
from ensemble.cli.main import main
from ensemble.data.store import CellStore
from ensemble.oof import CELL_COLUMNS

TINY_ZOO = """\
name: tiny
n_folds: 3
cell_size: 32
train: {epochs: 1, batch_size: 32}
models:
  - {name: dsa_tiny, head: dsa, backbone: test_resnet, cells_per_image: 4}
  - {name: cla_tiny, head: cla, backbone: test_efficientnet}
"""


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    return lines[0]


def error_line(err: str) -> str:
    """The CLI's error line: the last of stderr, after Ray's logs and progress bars of a data command."""
    line = err.strip().splitlines()[-1]
    assert line.startswith("ensemble "), err
    return line


@pytest.fixture
def zoo_file(tmp_path):
    """Write a zoo YAML: the tiny zoo with ``{model_extra}`` added to its CLA model, or any text."""

    def write(text: str = TINY_ZOO, name: str = "zoo.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def tiny_with(cla: str, backbone: str = "test_efficientnet") -> str:
    """The tiny zoo with settings ``cla`` added to its CLA model (and another backbone)."""
    return TINY_ZOO.replace("backbone: test_efficientnet}", f"backbone: {backbone}, {cla}}}")


# --- configuration: checked in seconds, before Ray -------------------------------------------------

def test_misspelt_backbone_fails_before_ray(tmp_path, capsys, zoo_file, monkeypatch):
    """Its seconds are bench/bench_errors.py's to measure; here, that nothing starts first."""
    monkeypatch.chdir(tmp_path)
    zoo = zoo_file(TINY_ZOO.replace("test_efficientnet", "test_efficientnett"))
    code, _, err = run(capsys, "train-all", "--zoo", zoo, "--workdir", tmp_path / "work")
    line = one_line(err)
    assert code == 2
    assert "zoo.yaml: models[1]" in line and "backbone: 'test_efficientnett' is not a timm model" in line
    assert "did you mean test_efficientnet" in line
    assert not ray.is_initialized(), "the zoo is checked before Ray starts"
    assert not (tmp_path / "work").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("cla, expected", [
    ("head_kwargs: {weibull_init: 1.0}", r"models\[1\] \(cla_tiny\): head_kwargs: .*unexpected keyword argument 'weibull_init'"),
    ("head_kwargs: {pool: max}", r"head_kwargs: unknown pool 'max'"),
    ("train: {lr: fast}", r"models\[1\]\.train\.lr: expected a number, got 'fast'"),
    ("train: {loss: hinge}", r"train\.loss must be one of \['bce', 'focal'\]"),
    ("placement: {num_workers: 0}", r"models\[1\]\.placement: num_workers must be >= 1"),
    ("cell_size: 100", r"models\[1\]\.cell_size: 'cla_tiny' would see the store's 32 px crops enlarged to 100 px"),
])
def test_model_settings_are_checked_with_file_and_key(capsys, zoo_file, cla, expected):
    code, _, err = run(capsys, "check", "--zoo", zoo_file(tiny_with(cla)), "--no-build")
    assert code == 2 and re.search(expected, one_line(err)), err
    assert not ray.is_initialized()


def test_pretrained_weights_must_exist_in_timm(capsys, zoo_file):
    code, _, err = run(capsys, "check", "--zoo", zoo_file(tiny_with("pretrained: true", "test_vit4")), "--no-build")
    assert code == 2 and "backbone: timm has no pretrained weights for 'test_vit4'" in one_line(err)


def test_dsa_bag_must_fit_its_batch(capsys, zoo_file):
    code, _, err = run(capsys, "check", "--zoo", zoo_file(TINY_ZOO.replace("cells_per_image: 4", "cells_per_image: 64")))
    assert code == 2 and "train.batch_size 32 holds no bag of cells_per_image 64" in one_line(err)


def test_a_yaml_1e_number_is_taken_as_the_number_it_means(capsys, zoo_file):
    code, out, _ = run(capsys, "check", "--zoo", zoo_file(tiny_with("train: {lr: 1e-4}")), "--no-build")
    assert code == 0 and "2 models x 3 folds = 6 training jobs" in out


def test_a_model_that_cannot_take_its_cell_size_fails_the_build_check(capsys, zoo_file):
    """Passes the static checks; building it and running one cell through it does not."""
    zoo = zoo_file(TINY_ZOO.replace("test_efficientnet}", "test_vit, cell_size: 20}"))
    assert run(capsys, "check", "--zoo", zoo, "--no-build")[0] == 0
    code, _, err = run(capsys, "check", "--zoo", zoo)
    line = one_line(err)
    assert code == 2 and "models[1] (cla_tiny): test_vit at 20 px cannot be built or run" in line
    assert "divisible by patch size" in line and "change its cell_size, backbone or head_kwargs" in line
    assert not ray.is_initialized()


@pytest.mark.parametrize("space, expected", [
    ("lr: {type: loguniform, low: abc, high: 1.0e-3}", r"space\.yaml: lr: low: expected a number, got 'abc'"),
    ("lr: {type: loguniform, low: 0, high: 1.0e-3}", r"space\.yaml: lr: loguniform needs low > 0"),
    ("epochs: {type: choice, values: [2, three]}", r"space\.yaml: epochs: values\[1\]: expected a whole number"),
    ("loss: {type: uniform, low: 0, high: 1}", r"space\.yaml: loss: a str setting cannot take type uniform"),
    ("cells_per_image: {type: uniform, low: 2, high: 8}", r"cells_per_image: a int setting cannot take type uniform"),
    ("cell_size: {type: choice, values: [8, 32]}", r"cell_size: 8 px is far from the 32 px of model 'dsa_tiny'"),
    ("cells_per_image: {type: choice, values: [4, 64]}", r"cells_per_image: 64 does not fit: .*holds no bag"),
    ("head.pool: {type: choice, values: [weibull, max]}", r"head\.pool: 'max': head_kwargs: unknown pool 'max'"),
    ("optimizer: {type: choice, values: [adam, adamm]}", r"optimizer: 'adamm' does not fit: .*not a timm optimizer"),
])
def test_search_space_errors_name_file_and_key(tmp_path, capsys, zoo_file, space, expected):
    (tmp_path / "space.yaml").write_text(space + "\n")
    code, _, err = run(capsys, "check", "--zoo", zoo_file(), "--space", tmp_path / "space.yaml", "--no-build")
    assert code == 2 and re.search(expected, one_line(err)), err


def test_search_space_bounds_written_1e_are_numbers(tmp_path, capsys, zoo_file):
    (tmp_path / "space.yaml").write_text("lr: {type: loguniform, low: 1e-5, high: 1e-3}\n")
    code, out, _ = run(capsys, "check", "--zoo", zoo_file(), "--space", tmp_path / "space.yaml", "--no-build")
    assert code == 0 and "space.yaml" in out


@pytest.mark.parametrize("zoo", ["quick", "hcpl"])
def test_built_in_spaces_fit_built_in_zoos(capsys, zoo):
    """The hcpl zoo's cell sizes (224-256 px) would contradict a space of 48 and 64 px cells."""
    code, out, err = run(capsys, "check", "--zoo", zoo, "--sweep", "--no-build")
    assert code == 0, err
    assert "sweeps first" in out


def test_dry_run_lists_the_jobs_and_starts_nothing(tmp_path, capsys, zoo_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "train-all", "--zoo", zoo_file(), "--dry-run", "--epochs", "2")
    assert code == 0
    assert "2 models x 3 folds = 6 training jobs" in out and "dsa_tiny" in out and "cla_tiny" in out
    assert "nothing was started" in out
    assert not ray.is_initialized() and sorted(p.name for p in tmp_path.iterdir()) == ["zoo.yaml"]


@pytest.fixture(scope="module")
def kaggle_data(tmp_path_factory) -> Path:
    """A dataset as Kaggle gives it: images and image labels, no cell truth."""
    from ensemble.sim.images import simulate

    root = tmp_path_factory.mktemp("kaggle")
    simulate(root, n_images=1, seed=0, size=96, truth=False)
    return root


@pytest.mark.parametrize("integrity, labels, code, expected", [
    ("auto", None, 0, "VID off: zoo tiny enables it but {data} has no cell truth; give integrity.labels_csv"),
    ("off", None, 0, "VID off (--integrity off)"),
    ("on", None, 2, "--integrity on: the VID learns from good and bad cells and {data} has no cell truth "
                    "(truth/cell_labels.csv): give integrity.labels_csv"),
    ("on", "image_id,cell_id,good\n", 0, "splits, learning good and bad cells from {labels}"),
    ("auto", "image_id,cell,good\n", 2, "{zoo}: integrity.labels_csv: {labels} needs the columns "
                                         "image_id,cell_id,good; its header lacks ['cell_id']"),
])
def test_the_vid_finds_its_labels_before_any_image_is_read(tmp_path, capsys, zoo_file, kaggle_data, integrity, labels,
                                                           code, expected):
    """On data without cell truth the VID is off with the fix said, or refused when asked for; no
    dry run: the failures come before prepare (no workdir, no Ray)."""
    vid = "integrity: {enabled: true}\n"
    if labels is not None:
        (tmp_path / "good.csv").write_text(labels)
        vid = f"integrity: {{enabled: true, labels_csv: {tmp_path / 'good.csv'}}}\n"
    zoo = zoo_file(TINY_ZOO.replace("models:", vid + "models:"))
    argv = ["train-all", "--zoo", zoo, "--data", kaggle_data, "--integrity", integrity, "--workdir", tmp_path / "work"]
    said, out, err = run(capsys, *argv, *(["--dry-run"] if code == 0 else []))
    expected = expected.format(data=kaggle_data, labels=tmp_path / "good.csv", zoo=zoo)
    assert said == code and expected in (out if code == 0 else one_line(err)), (out, err)
    if code == 0:
        assert f"{kaggle_data} has no cell truth (truth/cell_labels.csv), as Kaggle's data" in out
        assert "models not built: `ensemble check` builds" in out, "a dry run is the quick look"
    assert not ray.is_initialized() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--segmenter-setting", "sigma=2"], "--segmenter-setting: ClassicalSettings.__init__() got an unexpected"),
    (["--data", "/no/such/dataset"], "no dataset at /no/such/dataset"),
    (["--cluster-config", "/no/such/cluster.yaml"], "--cluster-config: /no/such/cluster.yaml does not exist"),
])
def test_settings_are_checked_before_ray(capsys, zoo_file, argv, expected):
    code, _, err = run(capsys, "train-all", "--zoo", zoo_file(), "--dry-run", *argv)
    assert code == 2 and expected in one_line(err)
    assert not ray.is_initialized()


def test_a_job_no_node_type_can_hold_is_refused_by_the_cluster_config(tmp_path, capsys, zoo_file):
    config = tmp_path / "cluster.yaml"
    config.write_text("available_node_types:\n  head: {resources: {CPU: 4}, max_workers: 0}\n"
                      "  cpu: {resources: {CPU: 8}, min_workers: 0, max_workers: 4}\nhead_node_type: head\n")
    zoo = zoo_file(TINY_ZOO.replace("models:", "placement: {use_gpu: true}\nmodels:"))
    code, _, err = run(capsys, "check", "--zoo", zoo, "--cluster-config", config, "--no-build")
    assert code == 2 and "asks for {'CPU': 1.0, 'GPU': 1.0} per worker, which no node type" in one_line(err)


# --- MLflow: one line naming the URI and the cause -----------------------------------------------

def test_unreachable_tracking_server_is_said_in_one_line(tmp_path):
    """Through the installed command, as a user runs it (imports included); bench/bench_errors.py
    measures how soon."""
    done = subprocess.run([str(Path(sys.executable).parent / "ensemble"), "select", "--experiment", "quick",
                           "--store", str(tmp_path / "store"), "--tracking-uri", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    line = one_line(done.stderr)
    assert done.returncode == 1, done.stderr
    assert line.startswith("ensemble select: error: MLflow tracking server http://127.0.0.1:9 cannot be reached")
    assert "Connection refused" in line


def test_predict_with_a_missing_model_says_so_and_creates_no_database(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = run(capsys, "predict", tmp_path / "images", "--model", "models:/no-such-model@champion",
                       "--out", tmp_path / "p.parquet")
    assert code == 1 and f"no MLflow database at {tmp_path / 'mlflow.db'}" in one_line(err)
    assert not (tmp_path / "mlflow.db").exists() and not ray.is_initialized()

    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    tracking.ensure_experiment("quick", registry)
    capsys.readouterr()  # MLflow's own lines about creating the database
    code, _, err = run(capsys, "predict", tmp_path / "images", "--model", "models:/no-such-model@champion",
                       "--out", tmp_path / "p.parquet", "--tracking-uri", registry)
    line = one_line(err)
    assert code == 1 and "models:/no-such-model@champion names nothing in the registry at" in line
    assert "registered models there: none" in line and not ray.is_initialized()


@contextlib.contextmanager
def locked(path: Path, seconds: float):
    """Another process holding an exclusive lock on the SQLite file ``path`` for ``seconds``."""
    script = textwrap.dedent(f"""
        import sqlite3, time
        db = sqlite3.connect({str(path)!r}, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep({seconds})
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline().strip() == "locked"
        try:
            yield
        finally:
            holder.kill()


@pytest.mark.slow
def test_a_locked_database_is_waited_for(tmp_path):
    """SQLite answers "locked" after 5 s; the retry then finds it free (released at 8 s)."""
    db = tmp_path / "mlflow.db"
    start = time.perf_counter()
    with locked(db, 8):
        assert tracking.ensure_experiment("quick", f"sqlite:///{db}")
    assert time.perf_counter() - start > 7, "it waited for the lock rather than failing"


def test_a_database_locked_for_longer_is_reported_in_one_line(tmp_path, capsys, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setattr(tracking, "LOCK_WAIT_S", 1.0)
    with locked(db, 60):
        code, _, err = run(capsys, "select", "--experiment", "quick", "--store", tmp_path / "store",
                           "--tracking-uri", f"sqlite:///{db}")
    line = one_line(err)
    assert code == 1 and f"MLflow database {db} is locked by another process" in line


def test_filter_strings_quote_names(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment("quick", uri)
    for name in ("o'brien", 'say "hi"', "a' or '1'='1"):
        tracking.client(uri).create_run(experiment, tags={tracking.TAG_MODEL: name})
        assert [r.data.tags[tracking.TAG_MODEL] for r in tracking.find_runs(experiment, {tracking.TAG_MODEL: name}, uri)] \
            == [name]
    with pytest.raises(ValueError, match="MLflow filter strings cannot name it"):
        tracking.find_runs(experiment, {tracking.TAG_MODEL: "both ' and \""}, uri)


# --- training jobs: no retry for what a retry cannot fix -------------------------------------------

def test_a_model_that_cannot_run_stops_training_before_any_job_or_run(tmp_path, zoo_file):
    from ensemble.checks import JobConfigError
    from ensemble.trainers.jobs import train_zoo
    from ensemble.zoo import load_zoo

    zoo = load_zoo(zoo_file(TINY_ZOO.replace("test_efficientnet}", "test_vit, cell_size: 20}")))
    with pytest.raises(JobConfigError, match=r"models\[1\] \(cla_tiny\): test_vit at 20 px cannot be built or run"):
        train_zoo(zoo, str(tmp_path / "store"), str(tmp_path / "work"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "work").exists(), "no run, no job"


def test_the_failure_report_says_re_run_only_where_it_helps():
    from ensemble.trainers.jobs import failure_report

    mixed = failure_report([("cla_a", 0, ValueError("shapes (2, 3) and (4,) differ")), ("cla_b", 1, OSError("disk full"))],
                           "zoo.yaml")
    assert "cla_a fold 0: ValueError: shapes (2, 3) and (4,) differ" in mixed and "cla_b fold 1: OSError: disk full" in mixed
    assert "a re-run repeats errors of code or configuration: change what their line says in zoo.yaml" in mixed
    assert "the others may pass on a re-run" in mixed
    lost = failure_report([("cla_b", 1, ConnectionError("node lost"))], "zoo.yaml")
    assert "these may pass on a re-run" in lost and "repeats" not in lost
    config = failure_report([("cla_a", 0, TypeError("bad argument"))], "zoo.yaml")
    assert "re-run" in config and "may pass" not in config


# --- data: bad images skipped by name; nothing half-written ----------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from ensemble.sim.images import simulate

    root = tmp_path_factory.mktemp("data")
    simulate(root, 6, seed=1, size=128)
    return root


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "data"))


def prepare_args(data, out, *extra):
    return ["prepare", data, "--out", out, "--cell-size", "32", "--folds", "2", "--workers", "1", *extra]


@pytest.mark.usefixtures("local_ray")
def test_bad_truth_skips_the_image_and_names_it(copy, tmp_path, capsys):
    ids = sorted(p.stem for p in (copy / "truth" / "masks").iterdir())
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(copy / "truth" / "masks" / f"{ids[0]}.png")
    (copy / "truth" / "masks" / f"{ids[1]}.png").unlink()
    code, out, _ = run(capsys, *prepare_args(copy, tmp_path / "store"))
    assert code == 0
    skipped = CellStore(tmp_path / "store")
    assert set(skipped.cells["image_id"]) == set(ids[2:]) | (set(pd.read_csv(copy / "train.csv")["ID"]) - set(ids))
    assert f"{ids[0]}.png: truth mask of shape (64, 64), image (128, 128)" in out
    assert f"masks/{ids[1]}.png: file not found" in out


@pytest.mark.usefixtures("local_ray")
def test_every_image_skipped_is_an_error_and_the_fixed_data_rebuilds(copy, dataset, tmp_path, capsys):
    for green in (copy / "train").glob("*_green.png"):
        green.write_bytes(green.read_bytes()[:40])
    store = tmp_path / "store"
    code, _, err = run(capsys, *prepare_args(copy, store))
    line = error_line(err)
    assert code == 2 and "every one of the 6 images of" in line and "unreadable or truncated PNG" in line
    assert not (store / "cells.parquet").exists(), "an empty store is never marked finished"
    for green in (dataset / "train").glob("*_green.png"):
        shutil.copy(green, copy / "train" / green.name)
    code, _, err = run(capsys, *prepare_args(copy, store))
    assert code == 0, err
    assert CellStore(store).cells["image_id"].nunique() == 6


@pytest.mark.usefixtures("local_ray")
def test_an_empty_dataset_is_an_error_that_writes_nothing(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train.csv").write_text("ID,Label\n")
    code, _, err = run(capsys, *prepare_args(tmp_path / "data", tmp_path / "store"))
    assert code == 2 and f"{tmp_path / 'data' / 'train.csv'} lists no images" in one_line(err)
    assert not (tmp_path / "store").exists()


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory) -> Path:
    """A finished store of the clean dataset, two images a chunk."""
    path = tmp_path_factory.mktemp("stores") / "store"
    assert main([str(a) for a in prepare_args(dataset, path, "--chunk-size", "2")]) == 0
    return path


@pytest.mark.usefixtures("local_ray")
def test_chunk_size_and_force_on_the_command_line(store, dataset, tmp_path, capsys):
    assert CellStore(store).meta["chunk_size"] == 2 and len(list((store / "crops").iterdir())) == 3
    other = tmp_path / "other"
    shutil.copytree(store, other)
    code, _, err = run(capsys, *prepare_args(dataset, other, "--chunk-size", "2", "--cell-size", "24"))
    assert code == 2 and "differing: ['cell_size']" in error_line(err) and "--force" in error_line(err)
    code, _, _ = run(capsys, *prepare_args(dataset, other, "--chunk-size", "2", "--cell-size", "24", "--force"))
    assert code == 0 and CellStore(other).cell_size == 24


def write_oof(directory: Path, cells: pd.DataFrame) -> Path:
    directory.mkdir()
    rng = np.random.default_rng(0)
    for model in ("cla_a", "cla_b"):
        table = cells[["image_id", "cell_id", "fold"]].copy()
        table[CELL_COLUMNS] = rng.random((len(cells), len(CELL_COLUMNS))).astype(np.float32)
        table.to_parquet(directory / f"{model}.parquet")
    return directory


@pytest.mark.usefixtures("local_ray")
def test_select_says_when_the_oof_tables_miss_cells_of_the_store(store, tmp_path, capsys):
    cells = CellStore(store).cells
    missing = sorted(cells["image_id"].unique())[:2]
    oof = write_oof(tmp_path / "oof", cells[~cells["image_id"].isin(missing)])
    n_missing = int(cells["image_id"].isin(missing).sum())
    argv = ["select", "--store", store, "--oof-dir", oof, "--out", tmp_path / "ensemble", "--no-nested",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    code, _, err = run(capsys, *argv)
    warning = [line for line in err.splitlines() if line.startswith("ensemble select: warning: ")]
    # Tables without the jobs' validation predictions: selection also says it sees one network per cell.
    assert code == 0 and len(warning) == 2 and "selection sees one network per cell" in warning[1], err
    assert f"the OOF tables together miss {n_missing} of the {len(cells)} cells" in warning[0]
    assert f"in 2 images ({missing[0]}, {missing[1]})" in warning[0]
    code, _, err = run(capsys, *argv, "--strict")
    assert code == 2 and f"miss {n_missing} of the {len(cells)} cells" in error_line(err)
