"""The champion as a served product: the real ``mlflow models serve`` on 127.0.0.1 answers the
model's own ``serving_input_example.json``, a request with the images as base64 bytes (and a
given mask), and one with paths and a dataset root; the rows are per cell, named by class, and
the same as predicting in this process. The model loads its networks when it is loaded, and
after ``ray down`` a new MLflow server on the cluster's database and artifacts serves it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.artifacts import download_artifacts
from PIL import Image

from ensemble.data.hpa import stack_channels
from ensemble.data.segment import create_segmenter
from ensemble.sim.images import simulate, simulate_image, to_uint
from ensemble.labels import CHANNELS, CLASS_NAMES
from ensemble.oof import CELL_COLUMNS
from ensemble.serving.registry import register_ensemble
from ensemble.serving.model import Preprocessing, load_ensemble
from ensemble.serving.inputs import SERVING_COLUMNS, image_row, png_base64
from ensemble.serving.submission import decode_mask
from test_registry import MlflowServer, tiny_members, tiny_spec

CHAMPION = "models:/hpa-ensemble@champion"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> SimpleNamespace:
    """Tiny members registered in a SQLite registry and served by ``mlflow models serve``."""
    tmp = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{tmp}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    register_ensemble(tiny_spec(), tiny_members(tmp / "checkpoints"),
                      Preprocessing(create_segmenter("classical").describe(), cell_size=32), tracking_uri=uri,
                      experiment="serving")
    port, log = free_port(), open(tmp / "serve.log", "w")
    # The command of the README, in the environment this test runs in (--env-manager local), with
    # that environment's bin/ on PATH as an activated venv has it: MLflow starts `uvicorn` by name.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}, stdout=log, stderr=subprocess.STDOUT,
        cwd=tmp, start_new_session=True,  # its own process group: uvicorn's worker stops with it
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            pytest.fail(f"mlflow models serve did not start:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        time.sleep(1)
    mlflow.set_tracking_uri(uri)
    model_dir = Path(download_artifacts(artifact_uri=CHAMPION, dst_path=str(tmp / "model")))
    yield SimpleNamespace(url=url, tmp=tmp, model_dir=model_dir, model=load_ensemble(str(model_dir)))
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    log.close()
    mlflow.set_tracking_uri(previous)


def invoke(url: str, body: dict | str) -> pd.DataFrame:
    """POST to /invocations; the answer's rows as a DataFrame."""
    data = body if isinstance(body, str) else json.dumps(body)
    request = urllib.request.Request(f"{url}/invocations", data=data.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return pd.DataFrame(json.loads(answer.read())["predictions"])
    except urllib.error.HTTPError as error:
        pytest.fail(f"/invocations answered {error.code}: {error.read().decode()[-3000:]}")


def check_cells(cells: pd.DataFrame, image_id: str, shape: tuple[int, int]) -> list[np.ndarray]:
    """The rows of one image: class-named probabilities, and RLEs of disjoint cell masks of its size."""
    rows = cells[cells["image_id"] == image_id]
    assert len(rows) > 0
    assert (rows[["width", "height"]].to_numpy() == [shape[1], shape[0]]).all()
    probabilities = rows[list(CLASS_NAMES)].to_numpy()
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    masks = [decode_mask(rle, *shape) for rle in rows["rle"]]
    assert all(m.any() for m in masks) and (np.sum(masks, axis=0) <= 1).all(), "one non-empty mask per cell"
    return masks


def test_the_model_carries_its_code_an_example_and_a_signature_named_by_class(served):
    model_dir = served.model_dir
    assert (model_dir / "code" / "ensemble" / "serving" / "model.py").exists() and not (model_dir / "python_model.pkl").exists()
    assert not list((model_dir / "code").rglob("__pycache__"))
    meta = mlflow.models.Model.load(str(model_dir))
    assert meta.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model", "no pickle"
    assert meta.signature.outputs.input_names() == SERVING_COLUMNS
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    assert set(example["dataframe_split"]["columns"]) == {"image_id", *CHANNELS}, "the image itself, no path"


def test_the_server_answers_its_own_input_example(served):
    text = (served.model_dir / "serving_input_example.json").read_text()
    cells = invoke(served.url, text)
    assert list(cells.columns) == SERVING_COLUMNS
    example = json.loads(text)["dataframe_split"]
    here = served.model.predict(None, pd.DataFrame(example["data"], columns=example["columns"]))
    check_cells(cells, "example", (128, 128))
    np.testing.assert_allclose(cells[list(CLASS_NAMES)].to_numpy(), here[list(CLASS_NAMES)].to_numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def image(served) -> SimpleNamespace:
    """A 160 px simulated image with its true cell mask, as arrays and as files."""
    sim = simulate_image(7, size=160)
    channels = [to_uint(sim.image, 8)[..., k] for k in range(len(CHANNELS))]
    folder = served.tmp / "files"
    folder.mkdir()
    paths = {c: str(folder / f"sim_{c}.png") for c in CHANNELS}
    for channel, array in zip(CHANNELS, channels):
        Image.fromarray(array).save(paths[channel])
    Image.fromarray(sim.cell_mask).save(folder / "sim_mask.png")
    return SimpleNamespace(channels=channels, mask=sim.cell_mask, paths=paths, mask_path=str(folder / "sim_mask.png"))


def test_images_as_bytes_with_a_given_mask_and_a_bad_row(served, image):
    truncated = base64.b64encode(base64.b64decode(png_base64(image.channels[0]))[:60]).decode()
    bad = {"image_id": "bad", **{c: truncated for c in CHANNELS}}
    body = {"dataframe_records": [image_row("sim", image.channels, image.mask), bad]}
    cells = invoke(served.url, body)
    assert set(cells["image_id"]) == {"sim"}, "the unreadable image is skipped, the other answered"
    masks = check_cells(cells, "sim", image.mask.shape)
    assert sorted(cells["cell_id"]) == sorted(set(np.unique(image.mask)) - {0}), "the given cells, not segmented"
    for cell_id, mask in zip(cells["cell_id"], masks):
        np.testing.assert_array_equal(mask, image.mask == cell_id)
    pixels = stack_channels(image.channels, list(CHANNELS), "sim")
    here = served.model.predict_arrays({"sim": pixels}, {"sim": image.mask})
    np.testing.assert_allclose(cells[list(CLASS_NAMES)].to_numpy(), here[CELL_COLUMNS].to_numpy(), atol=1e-6)
    # A request of which no image can be read is answered with the reasons.
    request = urllib.request.Request(f"{served.url}/invocations", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"dataframe_records": [bad]}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=120)
    answer = refused.value.read().decode()
    assert refused.value.code == 400 and "no image could be read" in answer and "bad red: unreadable" in answer


def test_images_as_paths_and_a_dataset_root(served, image):
    root = served.tmp / "dataset"
    simulate(root, n_images=1, seed=3, size=128, split="test")
    records = [{"image_id": "sim", **image.paths, "mask": image.mask_path},
               {"image_id": "sim3-00000", "root": str(root), "split": "test"}]
    cells = invoke(served.url, {"dataframe_records": records})
    assert set(cells["image_id"]) == {"sim", "sim3-00000"}
    check_cells(cells, "sim3-00000", (128, 128))
    from_bytes = invoke(served.url, {"dataframe_records": [image_row("sim", image.channels, image.mask)]})
    pd.testing.assert_frame_equal(cells[cells["image_id"] == "sim"].reset_index(drop=True), from_bytes)


def test_the_networks_load_with_the_model_and_only_once(served, image, tmp_path):
    """`mlflow models serve` answers /ping once the model is loaded: the networks must be loaded
    then, not by the first request under MLflow's scoring timeout (and not twice by two)."""
    copy = Path(shutil.copytree(served.model_dir, tmp_path / "model"))
    pixels = {"sim": stack_channels(image.channels, list(CHANNELS), "sim")}
    deferred = load_ensemble(str(copy), networks=False)
    start, loaded = threading.Barrier(2), []

    def first_request():
        start.wait()
        loaded.append(deferred.networks)

    threads = [threading.Thread(target=first_request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loaded[0] is loaded[1], "two concurrent first requests share one loading"

    model = load_ensemble(str(copy))
    shutil.rmtree(next(copy.rglob("members")))  # what it needs after loading is in memory
    np.testing.assert_allclose(model.predict_arrays(pixels, {"sim": image.mask})[CELL_COLUMNS].to_numpy(),
                               served.model.predict_arrays(pixels, {"sim": image.mask})[CELL_COLUMNS].to_numpy())
    with pytest.raises(FileNotFoundError):
        load_ensemble(str(copy), networks=False).predict_arrays(pixels, {"sim": image.mask})


@pytest.mark.slow
def test_after_ray_down_a_server_on_the_same_database_and_artifacts_serves_the_champion(served, image, tmp_path):
    """The cluster's MLflow server stops with its head; its database and bucket stay. Its models'
    artifacts are mlflow-artifacts:/ URIs, so the database alone cannot load them: a new server
    on both can (README, "Serving")."""
    first = MlflowServer(tmp_path)
    try:
        register_ensemble(tiny_spec(), tiny_members(tmp_path / "checkpoints"),
                          Preprocessing(create_segmenter("classical").describe(), cell_size=32),
                          tracking_uri=first.url(), experiment="cluster")
    finally:
        first.stop()
    pixels = {"sim": stack_channels(image.channels, list(CHANNELS), "sim")}
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/server.db")
        with pytest.raises(Exception, match="mlflow-artifacts"):
            load_ensemble(CHAMPION)
        second = MlflowServer(tmp_path)
        try:
            mlflow.set_tracking_uri(second.url())
            cells = load_ensemble(CHAMPION).predict_arrays(pixels, {"sim": image.mask})
        finally:
            second.stop()
    finally:
        mlflow.set_tracking_uri(previous)
    np.testing.assert_allclose(cells[CELL_COLUMNS].to_numpy(),
                               served.model.predict_arrays(pixels, {"sim": image.mask})[CELL_COLUMNS].to_numpy())
