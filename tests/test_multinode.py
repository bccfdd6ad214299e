"""The cluster path, proven on one machine with real parts: a Ray cluster of a head and two worker
nodes (``ray start`` on 127.0.0.1, each with its own CPU and temp dir), an S3-protocol server as
the bucket (moto's server mode), and a real ``mlflow server`` with its artifacts in that bucket.

``train_all.py`` is submitted as a Ray job with ``s3://`` data and workdir, the data as Kaggle
gives it (16-bit, no cell truth; ``bench/rehearsal.sh`` runs the same path with the hcpl zoo at
2048 px); one worker node is killed mid-training (its raylet, by pid); the run completes on the
other node, its OOF tables cover every cell once, no MLflow run is duplicated, and a fresh process
predicts ``s3://`` images into the bucket with the registered champion.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time

import numpy as np
import psutil
import pytest
from mlflow.tracking import MlflowClient

from ensemble import tracking
from ensemble.sim.images import simulate
from ensemble.oof import CELL_COLUMNS
from rehearsal import start, stop
from test_cluster import BIN, REPO, free_port, wait_for_http

pytestmark = pytest.mark.slow
BUCKET = "hpa"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """An S3 server on 127.0.0.1 holding a Kaggle-shaped dataset under s3://hpa/data (and test images)."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    # fsspec caches filesystems by their arguments, not the environment: one made for another
    # test's server (now stopped) would be handed back here.
    s3fs.S3FileSystem.clear_instance_cache()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the bucket too
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    local = tmp_path_factory.mktemp("bucket-data")
    # As the Kaggle data comes (16-bit, image labels only, no truth/), at a size CPU tests afford.
    simulate(local / "data", n_images=12, seed=11, size=160, difficulty="easy", bit_depth=16, truth=False)
    simulate(local / "test", n_images=2, seed=12, size=160, difficulty="easy", split="test")
    fs = s3fs.S3FileSystem()
    fs.put(f"{local}/data/", f"{BUCKET}/data/", recursive=True)
    fs.put(f"{local}/test/", f"{BUCKET}/test/", recursive=True)
    yield {"env": env, "fs": fs}
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def mlflow_server(bucket, tmp_path_factory):
    """A real MLflow server on 127.0.0.1: runs in SQLite, artifacts in the bucket."""
    work = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process = start([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", port,
                     "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                     "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
                    {**os.environ, **bucket["env"]}, work / "server.log")
    wait_for_http(f"http://127.0.0.1:{port}/health", 300)
    yield f"http://127.0.0.1:{port}"
    stop(process)


@pytest.fixture(scope="module")
def cluster(bucket, tmp_path_factory):
    """A head (no CPU: it schedules) and two worker nodes of one CPU each, all with ``ray start``."""
    work = tmp_path_factory.mktemp("ray")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, **bucket["env"], "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def node_ports(first_worker_port: int) -> list[str]:
        # Several nodes on one machine: every port a node opens must be its own.
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--min-worker-port={first_worker_port}", f"--max-worker-port={first_worker_port + 999}"]

    head = start([BIN / "ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                  "--disable-usage-stats", f"--temp-dir={work}/head", *node_ports(20000)], env, work / "head.log")
    wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", 300)
    workers = {}
    for i, first in ((1, 21000), (2, 22000)):
        ports = node_ports(first)
        process = start([BIN / "ray", "start", "--block", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                         "--disable-usage-stats", f"--temp-dir={work}/worker{i}", *ports], env, work / f"worker{i}.log")
        workers[i] = {"process": process, "node_manager_port": ports[0].split("=")[1]}
    wait_for_nodes(f"127.0.0.1:{port}", 3, env, timeout=300)
    yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env,
           "workers": workers}
    for process in [w["process"] for w in workers.values()] + [head]:
        stop(process)


def wait_for_nodes(address: str, count: int, env: dict, timeout: float) -> None:
    """Until ``count`` nodes have joined: a worker's raylet runs seconds before the head knows it."""
    probe = f"import ray; ray.init(address={address!r}, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run([str(BIN / "python"), "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"{count} Ray nodes did not join within {timeout} s")


def raylet_of(worker: dict) -> psutil.Process:
    """The raylet process of a worker node, found by the node manager port it was given."""
    flag = f"--node_manager_port={worker['node_manager_port']}"
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "raylet" and flag in (process.info["cmdline"] or []):
            return process
    raise AssertionError(f"no raylet with {flag}")


def ray_job(cluster: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command, *rest = args
    done = subprocess.run([str(BIN / "ray"), "job", command, "--address", cluster["dashboard"], *rest],
                          env=cluster["env"], capture_output=True, text=True, timeout=timeout)
    done.stdout += done.stderr  # the CLI says some things on one, some on the other
    return done


def job_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "job"]


def test_a_local_tracking_uri_on_several_nodes_is_refused_before_any_job(cluster, bucket, tiny_zoo_file, tmp_path):
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    done = subprocess.run([str(BIN / "python"), str(REPO / "train_all.py"), "--zoo", str(tiny_zoo_file), "--data",
                           f"s3://{BUCKET}/data", "--workdir", f"s3://{BUCKET}/refused"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "is a file on this machine" in done.stderr and "MLFLOW_TRACKING_URI" in done.stderr
    assert not bucket["fs"].exists(f"{BUCKET}/refused"), "nothing was written: refused before the store"


@pytest.mark.timeout(1800)
def test_train_all_on_two_worker_nodes_survives_a_lost_node(cluster, mlflow_server, bucket, tiny_zoo_file, tmp_path):
    started = time.monotonic()
    # Submitting may be refused until the head's job agent is up (seconds quiet, minutes loaded).
    deadline = time.monotonic() + 300
    while True:
        done = ray_job(cluster, "submit", "--no-wait", "--submission-id", "train-all", "--",
                       str(BIN / "python"), str(REPO / "train_all.py"), "--zoo", str(tiny_zoo_file),
                       "--data", f"s3://{BUCKET}/data", "--workdir", f"s3://{BUCKET}/runs",
                       "--tracking-uri", mlflow_server)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Once a job has finished on the second worker node and others are running, that node is lost.
    raylet = raylet_of(cluster["workers"][2])
    node = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))
    deadline, polls = time.monotonic() + 600, 0
    while True:
        runs = job_runs(mlflow_server)
        finished_there = any(r.data.tags.get(tracking.TAG_NODE) == node for r in runs if r.info.status == "FINISHED")
        if finished_there and any(r.info.status == "RUNNING" for r in runs):
            break
        polls += 1
        if polls % 10 == 0:  # the CLI takes seconds; ask it now and then
            status = ray_job(cluster, "status", "train-all").stdout
            assert not re.search(r"failed|stopped|succeeded", status, re.I) and time.monotonic() < deadline, \
                "no moment with a job finished on node 2 and others running:\n" + \
                ray_job(cluster, "logs", "train-all").stdout[-4000:]
        time.sleep(1)
    raylet.kill()

    deadline = time.monotonic() + 900
    while not re.search("succeeded", status := ray_job(cluster, "status", "train-all").stdout, re.I):
        assert not re.search(r"failed|stopped", status, re.I) and time.monotonic() < deadline, \
            ray_job(cluster, "logs", "train-all").stdout[-4000:]
        time.sleep(5)
    seconds = time.monotonic() - started
    print(f"train_all on 2 worker nodes with one lost: {seconds:.0f} s")

    runs = job_runs(mlflow_server)
    keys = [(r.data.tags[tracking.TAG_MODEL], r.data.tags[tracking.TAG_FOLD]) for r in runs]
    assert len(keys) == len(set(keys)) == 6, "one run per (model, fold), none duplicated by the lost node"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags[tracking.TAG_NODE] for r in runs}) == 2, "jobs ran on both worker nodes"
    champion = MlflowClient(mlflow_server).get_model_version_by_alias("hpa-ensemble", "champion")
    assert champion.status == "READY"

    from ensemble.data.store import CellStore
    from ensemble.storage import read_parquet

    cells = CellStore(f"s3://{BUCKET}/runs/store").cells[["image_id", "cell_id"]]
    for model in ("dsa_tiny", "cla_tiny"):
        oof = read_parquet(f"s3://{BUCKET}/runs/oof/{model}.parquet")
        assert not oof[["image_id", "cell_id"]].duplicated().any()
        merged = cells.merge(oof, on=["image_id", "cell_id"], how="outer", indicator=True)
        assert (merged["_merge"] == "both").all(), f"{model}: the OOF covers every store cell once"

    # Serving in another process, bucket to bucket, with the champion from the server.
    env = {**os.environ, **bucket["env"], "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run([str(BIN / "ensemble"), "predict", f"s3://{BUCKET}/test", "--engine", "local",
                           "--out", f"s3://{BUCKET}/predictions/test.parquet"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = read_parquet(f"s3://{BUCKET}/predictions/test.parquet")
    assert predictions["image_id"].nunique() == 2 and np.isfinite(predictions[CELL_COLUMNS].to_numpy()).all()


def test_prepare_from_the_cli_reads_and_writes_the_bucket(cluster, bucket, tmp_path):
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    done = subprocess.run([str(BIN / "ensemble"), "prepare", f"s3://{BUCKET}/data", "--out", f"s3://{BUCKET}/cli-store",
                           "--cell-size", "24", "--folds", "2"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from ensemble.data.store import CellStore

    store = CellStore(f"s3://{BUCKET}/cli-store")
    assert len(store) > 0 and store.crops([0]).shape == (1, 4, 24, 24)
