"""The cluster entry points: cluster.yaml passes Ray's own checks; train_all.py runs as a Ray job on a
``ray start --head`` cluster; attached to it, killed mid-way and re-run, it leaves no duplicate MLflow runs."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ensemble import tracking

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] >= 1
    assert "/home/ubuntu/ensemble" in config["file_mounts"]
    assert any("pip install -e /home/ubuntu/ensemble" in c for c in config["setup_commands"])


def wait_for_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering (401 without the token is an answer)
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def head():
    """A real Ray head started with `ray start`, as on a cluster.

    ``--block`` keeps it in the foreground in a process group of its own, so the teardown stops
    this head only (``ray stop`` would stop every Ray on the machine).
    """
    port, dashboard = free_port(), free_port()
    # Ray 2.60 clusters require a token: the head, the job client and drivers share this one.
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    process = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         # The job agent's HTTP port is fixed (52365) by default: a Ray still shutting down on this
         # machine would keep it, and this head's job agent would never start.
         f"--dashboard-agent-listen-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", 120)
    yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def train_all_command(data, zoo, workdir):
    return [str(BIN / "python"), str(REPO / "train_all.py"), "--zoo", str(zoo), "--data", str(data),
            "--workdir", str(workdir)]


def job_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_train_all_as_a_ray_job(head, small_dataset, tiny_zoo_file, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # A job runs in the head's environment, not the submitter's: pass the tracking URI along.
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}})
    # The head's job agent starts after its dashboard answers: seconds on a quiet machine, minutes
    # on a busy one. Until then submissions are refused with "No available agent".
    deadline = time.monotonic() + 300
    while True:
        done = subprocess.run([BIN / "ray", "job", "submit", "--address", head["dashboard"],
                               "--runtime-env-json", runtime_env, "--",
                               *train_all_command(small_dataset, tiny_zoo_file, tmp_path / "work")],
                              env=head["env"], capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    runs = [r for r in job_runs(uri) if r.data.tags.get(tracking.TAG_KIND) == "job"]
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "work" / "oof" / "dsa_tiny.parquet").exists()


def test_killed_train_all_resumes_without_duplicate_runs(head, small_dataset, tiny_zoo_file, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**head["env"], "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": head["gcs"]}
    command = train_all_command(small_dataset, tiny_zoo_file, tmp_path / "work")
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        finished = [r for r in job_runs(uri) if r.data.tags.get(tracking.TAG_KIND) == "job"
                    and r.info.status == "FINISHED"]
        if finished:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "train_all finished before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = job_runs(uri)
    assert any(r.info.status != "FINISHED" for r in before), "some work was left unfinished"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    runs = job_runs(uri)
    jobs = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "job"]
    keys = [(r.data.tags[tracking.TAG_MODEL], r.data.tags[tracking.TAG_FOLD]) for r in jobs]
    assert len(keys) == len(set(keys)) == 6, "one run per (model, fold), no duplicates"
    assert all(r.info.status == "FINISHED" for r in jobs)
    parents = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "train_all"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
