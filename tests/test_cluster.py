"""The cluster entry points: cluster.yaml passes Ray's own checks once its placeholders are filled and
``ensemble check-cluster`` says which are not; train_all.py attached to a ``ray start --head`` cluster,
killed mid-way and re-run, leaves no duplicate MLflow runs. (A Ray job on a multi-node cluster with a
bucket: test_multinode.py.)"""

from __future__ import annotations

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


def test_cluster_yaml_is_checked_before_ray_up(tmp_path):
    check = [str(BIN / "ensemble"), "check-cluster"]
    shipped = subprocess.run([*check, str(REPO / "cluster.yaml")], capture_output=True, text=True, timeout=120)
    assert shipped.returncode == 2
    unfilled = [line for line in shipped.stderr.splitlines() if "fill in" in line]
    assert {"region", "ImageId", "IamInstanceProfile", "--artifacts-destination"} <= \
        {word.rstrip(":") for line in unfilled for word in line.split()}

    text = (REPO / "cluster.yaml").read_text()
    for marker, value in (("FILL_IN-region", "us-west-2"), ("FILL_IN-ami-id", "ami-0123456789abcdef0"),
                          ("FILL_IN-instance-profile", "hpa-s3"), ("FILL_IN-bucket", "my-bucket")):
        text = text.replace(marker, value)
    filled = tmp_path / "cluster.yaml"
    filled.write_text(text)
    assert subprocess.run([*check, str(filled)], capture_output=True, timeout=120).returncode == 0
    config = yaml.safe_load(text)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] >= 1
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-py311-gpu")
    assert "/home/ray/ensemble" in config["file_mounts"]
    assert any("pip install -e /home/ray/ensemble" in c for c in config["setup_commands"])
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "sqlite" not in mlflow and "s3://my-bucket" in mlflow, "runs outlive `ray down`, artifacts in the bucket"

    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace('resources: {"CPU": 8, "GPU": 1}', 'resources: {"CPU": "eight"}'))
    rejected = subprocess.run([*check, str(broken)], capture_output=True, text=True, timeout=120)
    assert rejected.returncode == 2 and "Ray rejects the config" in rejected.stderr


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
        process.wait(timeout=10)  # then killed: a graceful Ray stop can take half a minute
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def train_all_command(data, zoo, workdir):
    return [str(BIN / "python"), str(REPO / "train_all.py"), "--zoo", str(zoo), "--data", str(data),
            "--workdir", str(workdir)]


def job_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_killed_train_all_resumes_without_duplicate_runs(head, small_dataset, tiny_zoo_file, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**head["env"], "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": head["gcs"]}
    zoo = yaml.safe_load(tiny_zoo_file.read_text())
    zoo["models"] = [m for m in zoo["models"] if m["name"] == "cla_tiny"]  # 3 jobs are enough to interrupt
    zoo_file = tmp_path / "one-model.yaml"
    zoo_file.write_text(yaml.safe_dump(zoo))
    command = train_all_command(small_dataset, zoo_file, tmp_path / "work")
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
    assert len(keys) == len(set(keys)) == 3, "one run per (model, fold), no duplicates"
    assert all(r.info.status == "FINISHED" for r in jobs)
    parents = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "train_all"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_a_job_no_node_type_can_offer_fails_at_once_and_autoscaling_gets_every_job():
    from ensemble.cluster import ClusterShape, NodeType, check_jobs_fit, default_concurrency
    from ensemble.zoo import load_zoo

    text = (REPO / "cluster.yaml").read_text()
    aws = ClusterShape.from_config(yaml.safe_load(text), "cluster.yaml")
    hcpl, quick = load_zoo("hcpl"), load_zoo("quick")
    assert aws.autoscaling and aws.most("GPU") == 8
    check_jobs_fit(hcpl, aws)  # one GPU and 6 CPUs per job: the g5 workers offer it
    assert default_concurrency(hcpl, aws, 45) == 45, "an autoscaler must see the whole demand"

    laptop = ClusterShape((NodeType("local", {"CPU": 2.0}),), autoscaling=False, source="the nodes alive now")
    with pytest.raises(ValueError, match=r"model 'dsa_effb4' asks for \{'CPU': 6.0, 'GPU': 1.0\}.*--cluster-config"):
        check_jobs_fit(hcpl, laptop)
    check_jobs_fit(quick, laptop)
    assert default_concurrency(quick, laptop, 24) == 2, "a fixed cluster gets what its nodes hold"


def test_files_on_the_driver_are_refused_on_several_nodes():
    from ensemble.cluster import ClusterShape, NodeType, check_shared

    one = ClusterShape((NodeType("local", {"CPU": 2.0}),), autoscaling=False, source="now", nodes_alive=1)
    three = ClusterShape(one.node_types * 3, autoscaling=False, source="now", nodes_alive=3)
    check_shared(one, "sqlite:///mlflow.db", "runs")
    check_shared(three, "http://head:5000", "s3://bucket/runs")
    with pytest.raises(ValueError, match="is a file on this machine.*MLFLOW_TRACKING_URI"):
        check_shared(three, "sqlite:////tmp/mlflow.db", "s3://bucket/runs")
    with pytest.raises(ValueError, match="workdir /tmp/runs is a local path.*s3://"):
        check_shared(three, "http://head:5000", "/tmp/runs")
