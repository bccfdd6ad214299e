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


def fill_in(text: str) -> str:
    """cluster.yaml with its placeholders filled as a user would."""
    for marker, value in (("FILL_IN-region", "us-west-2"), ("FILL_IN-ami-id", "ami-0123456789abcdef0"),
                          ("FILL_IN-bucket", "my-bucket")):
        text = text.replace(marker, value)
    return text


@pytest.fixture(scope="module")
def iam():
    """An AWS API on 127.0.0.1 (moto's server) holding the instance profiles of docs/aws/README.md,
    and two heads that could not launch a worker: one with the bucket only, one that may pass
    another role than the workers'."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-west-2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("iam")
    docs = REPO / "docs" / "aws"
    bucket = (docs / "bucket-policy.json").read_text().replace("FILL_IN-bucket", "my-bucket")
    launch = (docs / "head-launch-policy.json").read_text()
    for name, policies in {"hpa-ensemble-head": [bucket, launch], "hpa-ensemble-worker": [bucket],
                           "bucket-only": [bucket],
                           "wrong-pass": [bucket, launch.replace("role/hpa-ensemble-worker", "role/other")]}.items():
        client.create_role(RoleName=name, AssumeRolePolicyDocument=(docs / "ec2-trust.json").read_text())
        for number, policy in enumerate(policies):
            client.put_role_policy(RoleName=name, PolicyName=f"policy{number}", PolicyDocument=policy)
        client.create_instance_profile(InstanceProfileName=name)
        client.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    yield env
    server.stop()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def test_cluster_yaml_is_checked_before_ray_up(tmp_path, iam):
    home = tmp_path / "home"  # the user's machine: where the MLflow secret file is looked for
    env = {**os.environ, **iam, "HOME": str(home)}
    check = [str(BIN / "ensemble"), "check-cluster"]
    shipped = subprocess.run([*check, str(REPO / "cluster.yaml")], capture_output=True, text=True, timeout=120, env=env)
    assert shipped.returncode == 2
    unfilled = [line for line in shipped.stderr.splitlines() if "fill in" in line]
    assert {"region", "ImageId", "--artifacts-destination"} <= \
        {word.rstrip(":") for line in unfilled for word in line.split()}
    assert "~/.config/hpa-ensemble/mlflow_backend_uri does not exist" in shipped.stderr
    assert "lost with `ray down`" in shipped.stderr

    filled = tmp_path / "cluster.yaml"
    filled.write_text(fill_in((REPO / "cluster.yaml").read_text()))
    secret = home / ".config" / "hpa-ensemble" / "mlflow_backend_uri"
    secret.parent.mkdir(parents=True)
    secret.write_text("\n")
    empty = subprocess.run([*check, str(filled)], capture_output=True, text=True, timeout=120, env=env)
    assert empty.returncode == 2 and "mlflow_backend_uri is empty" in empty.stderr, empty.stderr
    secret.write_text("postgresql://user:password@db:5432/mlflow\n")
    accepted = subprocess.run([*check, str(filled)], capture_output=True, text=True, timeout=120, env=env)
    assert accepted.returncode == 0, accepted.stderr
    assert "the head may launch the workers" in accepted.stdout

    config = yaml.safe_load(filled.read_text())
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] >= 1
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-py311-gpu")
    assert "/home/ray/ensemble" in config["file_mounts"]
    assert {".git", "/runs"} <= set(config["rsync_exclude"]), "neither history nor local runs go to every node"
    assert any("pip install -e /home/ray/ensemble" in c for c in config["setup_commands"])
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "sqlite" not in mlflow and "s3://my-bucket" in mlflow, "runs outlive `ray down`, artifacts in the bucket"

    broken = tmp_path / "broken.yaml"
    broken.write_text(filled.read_text().replace('resources: {"CPU": 8, "GPU": 1}', 'resources: {"CPU": "eight"}'))
    rejected = subprocess.run([*check, str(broken)], capture_output=True, text=True, timeout=120, env=env)
    assert rejected.returncode == 2 and "Ray rejects the config" in rejected.stderr


def test_the_head_profile_must_let_the_autoscaler_launch_workers(iam):
    from ensemble.cluster import HEAD_LAUNCH_ACTIONS, check_head_profile

    config = yaml.safe_load(fill_in((REPO / "cluster.yaml").read_text()))

    def head(profile: dict | None) -> dict:
        changed = yaml.safe_load(yaml.safe_dump(config))
        node = changed["available_node_types"]["head"]["node_config"]
        node.pop("IamInstanceProfile")
        if profile:
            node["IamInstanceProfile"] = profile
        return changed

    assert check_head_profile(config, "c.yaml") == [], "the profiles docs/aws/README.md creates"
    assert check_head_profile(head(None), "c.yaml") == [], "Ray's own head role"
    [bucket_only] = check_head_profile(head({"Name": "bucket-only"}), "c.yaml")
    assert bucket_only.startswith("c.yaml: head instance profile 'bucket-only' does not allow ")
    assert all(action in bucket_only for action in HEAD_LAUNCH_ACTIONS)
    assert "iam:PassRole on arn:aws:iam::123456789012:role/hpa-ensemble-worker ('gpu_worker')" in bucket_only
    assert "attach docs/aws/head-launch-policy.json" in bucket_only
    [wrong] = check_head_profile(head({"Arn": "arn:aws:iam::123456789012:instance-profile/wrong-pass"}), "c.yaml")
    assert "does not allow iam:PassRole on arn:aws:iam::123456789012:role/hpa-ensemble-worker" in wrong
    assert "ec2:" not in wrong
    [absent] = check_head_profile(head({"Name": "no-such-profile"}), "c.yaml")
    assert "cannot read head instance profile 'no-such-profile' from IAM" in absent and "--no-iam" in absent


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
    # Token authentication on (`ray start` turns it on only when asked): the head, the job client
    # and drivers share this token.
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


@pytest.mark.slow
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


def test_the_driver_nodes_memory_caps_the_jobs_handed_to_ray():
    import dataclasses

    from ensemble.cluster import ClusterShape, default_concurrency
    from ensemble.cluster.shape import HEAD_BYTES_PER_QUEUED_JOB, QUEUE_MEMORY_SHARE
    from ensemble.zoo import load_zoo

    hcpl = load_zoo("hcpl")
    head = 32 * 2**30  # cluster.yaml's head, an m5.2xlarge
    aws = ClusterShape.from_config(yaml.safe_load((REPO / "cluster.yaml").read_text()), "cluster.yaml",
                                   driver_memory=head)
    fits_in_head = int(head * QUEUE_MEMORY_SHARE // HEAD_BYTES_PER_QUEUED_JOB)
    assert 1 < fits_in_head < 45, "the hcpl zoo's 45 jobs would not all fit on the head at once"
    assert default_concurrency(hcpl, aws, 45) == fits_in_head
    assert default_concurrency(hcpl, aws, 3) == 3
    assert default_concurrency(hcpl, dataclasses.replace(aws, driver_memory=2**30), 45) == 1, "at least one job"


@pytest.mark.slow
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
