"""Shared fixtures: one small simulated dataset per test session (simulating is the slow part)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep Ray quiet and its workers single-threaded: the suite runs on 2 cores.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# A loaded 2-core machine can take over Ray Train's default 60 s to start a worker group; a
# timed-out start is retried from scratch, which under load can repeat without end.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for one test module (or the one an outer fixture already started).

    ``address="local"`` always starts a new instance: left to look for "the existing cluster", Ray
    would join any other Ray running on this machine.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """24 simulated 256 px images with cell truth (Kaggle layout)."""
    from ensemble.sim.images import simulate

    root = tmp_path_factory.mktemp("small_dataset")
    simulate(root, n_images=24, seed=3, size=256, difficulty="easy")
    return root


@pytest.fixture(scope="session")
def tiny_zoo_file(tmp_path_factory) -> Path:
    """A zoo of two tiny timm models (one DSA, one CLA), one epoch each."""
    path = tmp_path_factory.mktemp("zoo") / "tiny.yaml"
    path.write_text(
        "name: tiny\n"
        "n_folds: 3\n"
        "cell_size: 32\n"
        "train: {epochs: 1, batch_size: 32, lr: 1.0e-3, augment: 0.0}\n"
        "placement: {in_memory: true, torch_threads: 1}\n"
        "models:\n"
        "  - {name: dsa_tiny, head: dsa, backbone: test_resnet, cells_per_image: 4}\n"
        "  - {name: cla_tiny, head: cla, backbone: test_efficientnet}\n"
    )
    return path


@pytest.fixture(scope="module")
def s3_bucket():
    """An S3-protocol server (moto) on 127.0.0.1 with one empty bucket, for one test module.

    Yields the bucket's URL, ``s3://bucket``. This process reaches it through the ``AWS_*``
    variables (s3fs reads them), restored afterwards.
    """
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    # fsspec caches filesystems by their arguments, not the environment: one made for another
    # module's server (now stopped) would be handed back.
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    yield "s3://bucket"
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
