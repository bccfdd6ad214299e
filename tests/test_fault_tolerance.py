"""A training job survives a killed worker process, resumes from its checkpoint, and ends with complete OOF.

Uses Ray's own multi-node test harness (``ray.cluster_utils.Cluster``): real Ray nodes on this
machine. A lost node is proven end to end in test_multinode.py (a worker node's raylet killed
while train_all runs on a cluster started with ``ray start``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from ensemble import tracking
from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.storage import read_parquet
from ensemble.trainers.fit import RunContext, oof_uri, trainer_for
from ensemble.zoo import load_zoo

EPOCHS = 4


@pytest.fixture(scope="module")
def cluster():
    # The head holds no CPU, so training can only run on the worker nodes added below.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def store(cluster, small_dataset, tmp_path_factory) -> str:
    node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    uri = str(tmp_path_factory.mktemp("store") / "store")
    prepare(str(small_dataset), uri, cell_size=32, n_folds=3, max_workers=2, progress=False)
    cluster.remove_node(node)
    return uri


def slow_spec(tiny_zoo_file):
    spec = load_zoo(tiny_zoo_file).model("cla_tiny")
    # Several epochs, so there is a checkpoint to resume from and epochs left after the failure.
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=EPOCHS, batch_size=8))


def checkpoints(workdir: str, name: str) -> list[Path]:
    return sorted(Path(workdir, "ray", name).glob("checkpoint_*"))


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def fit_in_background(trainer):
    outcome = {}

    def run():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # surfaced by the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def context(tmp_path, store) -> RunContext:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return RunContext(zoo="tiny", store=store, workdir=str(tmp_path / "work"),
                      experiment_id=tracking.ensure_experiment("tiny", uri), tracking_uri=uri, fingerprint="test")


def assert_resumed_and_complete(result, ctx, name, fold, store):
    history = result.return_value["history"]
    # Resumed, not restarted: each epoch ran exactly once across the two worker lives.
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    oof = read_parquet(oof_uri(ctx.workdir, name, fold))  # a named run writes its OOF under its name
    expected = CellStore(store).cells.query("fold == @fold")
    assert len(oof) == len(expected) == len(set(zip(oof["image_id"], oof["cell_id"])))


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(cluster, store, tmp_path, tiny_zoo_file):
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    spec, ctx, name = slow_spec(tiny_zoo_file), context(tmp_path, store), "kill-worker"
    thread, outcome = fit_in_background(trainer_for(spec, 0, ctx, name=name))
    wait_for(lambda: checkpoints(ctx.workdir, name), 180, "the first checkpoint")
    victims = wait_for(train_worker_pids, 30, "the train worker")
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert victims[0] not in train_worker_pids()
    assert_resumed_and_complete(outcome["result"], ctx, name, 0, store)
    cluster.remove_node(node)
