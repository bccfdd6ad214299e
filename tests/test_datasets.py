"""Datasets over the cell store (single cells, bags) and crop augmentation."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ensemble.data.augment import build_augment
from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.data.datasets import BagDataset, CellDataset, ImageChunks, make_loader
from ensemble.data.synthetic import simulate


@pytest.fixture(scope="module")
def store(local_ray, tmp_path_factory) -> CellStore:
    root = tmp_path_factory.mktemp("data")
    simulate(root, 6, seed=11, size=256)
    path = tmp_path_factory.mktemp("store") / "store"
    prepare(root, str(path), cell_size=16, n_folds=2, chunk_size=3, progress=False)
    return CellStore(path)


def test_cell_dataset_items(store):
    data = CellDataset(store, folds=[1])
    fold = store.cells["fold"].to_numpy()
    assert len(data) == (fold == 1).sum() and (fold[data.rows] == 1).all()
    item = data[0]
    assert item["image"].shape == (4, 16, 16) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    np.testing.assert_array_equal(item["image"].numpy(), store.crops([item["index"]])[0] / np.float32(255))
    np.testing.assert_array_equal(item["target"].numpy(), store.labels("weak")[item["index"]])
    truth = CellDataset(store, rows=[0, 1], labels="truth")
    assert truth[1]["target"].shape == (19,) and truth[1]["index"] == 1


def test_in_memory_and_worker_processes_give_the_same_items(store):
    lazy = CellDataset(store, rows=np.arange(len(store)))
    memory = CellDataset(store, rows=np.arange(len(store)), in_memory=True)
    batches = list(DataLoader(lazy, batch_size=8, num_workers=2))
    images = torch.cat([b["image"] for b in batches])
    np.testing.assert_array_equal(images.numpy(), np.stack([memory[i]["image"].numpy() for i in range(len(memory))]))


def test_training_bags_deal_every_cell_of_an_image_once_per_epoch_and_anew_each_epoch(store):
    counts = store.cells.groupby("image_id").size()
    bag_size = int(counts.median())
    data = BagDataset(store, bag_size=bag_size, train=True, seed=1)
    assert len(data) == int(np.ceil(counts / bag_size).sum()) > len(counts)
    image_of_cell = store.cells["image_id"].to_numpy()
    dealt = {}
    for epoch in range(3):
        data.set_epoch(epoch)
        bags = [data[i] for i in range(len(data))]
        for (image, _), bag in zip(data.items, bags):
            n = int(bag["valid"].sum())
            assert bag["cells"].shape == (bag_size, 4, 16, 16) and bag["valid"][:n].all()
            assert (bag["rows"][n:] == -1).all() and (bag["cells"][n:] == 0).all() and (bag["cell_targets"][n:] == 0).all()
            rows = bag["rows"][:n].numpy()
            assert (image_of_cell[rows] == data.image_ids[image]).all()
            np.testing.assert_array_equal(bag["image_target"].numpy(), store.labels("weak")[rows[0]])
            np.testing.assert_array_equal(bag["cell_targets"][:n].numpy(), store.labels("weak")[rows])
        rows = np.concatenate([b["rows"][b["valid"]].numpy() for b in bags])
        np.testing.assert_array_equal(np.sort(rows), np.arange(len(store.cells)))  # each cell once
        sizes = np.array([int(b["valid"].sum()) for b in bags])
        starts = np.r_[0, np.cumsum([n for _, n in zip(*np.unique([i for i, _ in data.items], return_counts=True))])]
        assert all(np.ptp(sizes[a:b]) <= 1 for a, b in zip(starts[:-1], starts[1:]))  # near-equal bags
        dealt[epoch] = [tuple(b["rows"].tolist()) for b in bags]
    assert dealt[0] != dealt[1] != dealt[2]


def test_prediction_bags_cover_every_cell_exactly_once(store):
    data = BagDataset(store, folds=[0], bag_size=5, train=False)
    counts = store.cells[store.cells["fold"] == 0].groupby("image_id").size()
    assert len(data) == int(np.ceil(counts / 5).sum())
    rows = np.concatenate([b["rows"][b["valid"]].numpy() for b in data])
    np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(store.cells["fold"].to_numpy() == 0))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augmentation_keeps_shape_and_dtype_and_zero_strength_is_identity(dtype):
    crop = np.random.default_rng(0).integers(0, 255, (32, 32, 4)).astype(dtype)
    if dtype == np.float32:
        crop /= 255
    np.testing.assert_array_equal(build_augment(0)(image=crop)["image"], crop)
    strong = build_augment(1.0)
    for _ in range(5):
        out = strong(image=crop)["image"]
        assert out.shape == crop.shape and out.dtype == crop.dtype


def test_datasets_apply_the_transform_per_cell(store):
    data = BagDataset(store, bag_size=4, transform=build_augment(1.0))
    bag = data[0]
    assert bag["cells"].shape == (4, 4, 16, 16) and bag["cells"].dtype == torch.float32


def test_bags_differ_between_epochs_in_persistent_worker_processes(store):
    """set_epoch() in the training process reaches workers that hold their own copy of the dataset."""
    data = BagDataset(store, bag_size=3, train=True, seed=2)
    assert (data.counts > 3).any(), "some image must have more cells than a bag"
    loader = make_loader(data, batch_size=4, workers=2, persistent=True)
    epochs = []
    for epoch in range(3):
        data.set_epoch(epoch)
        rows = torch.cat([batch["rows"] for batch in loader])
        # What this process draws for the epoch is what the workers drew.
        np.testing.assert_array_equal(rows.numpy(), np.stack([data[i]["rows"].numpy() for i in range(len(data))]))
        epochs.append(rows)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_image_chunks_hold_whole_images_and_every_cell_once(store):
    chunks = ImageChunks(store, folds=[1], max_cells=10)
    fold_rows = np.flatnonzero(store.cells["fold"].to_numpy() == 1)
    np.testing.assert_array_equal(chunks.rows, fold_rows)
    ids = store.cells["image_id"].to_numpy()[fold_rows]
    covered = []
    for item in chunks:
        start, stop, counts = item["start"], item["stop"], item["counts"]
        assert counts.sum() == stop - start and (stop - start <= 10 or len(counts) == 1)
        assert start == 0 or ids[start] != ids[start - 1], "a chunk starts with an image's first cell"
        np.testing.assert_array_equal(item["crops"].numpy(), store.crops(fold_rows[start:stop]))
        covered.extend(range(start, stop))
    assert covered == list(range(len(fold_rows)))


@pytest.fixture
def s3_store(store, monkeypatch, tmp_path):
    """The store, uploaded to a local S3 server (moto): read through s3fs, an async fsspec filesystem."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("cells")
    fs.put(store.uri, "cells/store", recursive=True)
    yield CellStore("s3://cells/store")
    server.stop()
    # fsspec caches filesystems by their arguments, not the environment: the next test's server
    # would be given this one's (stopped) filesystem.
    s3fs.S3FileSystem.clear_instance_cache()


def test_remote_store_is_read_in_worker_processes(store, s3_store):
    """A forked worker cannot use its parent's s3fs instance: each worker opens the store anew."""
    remote = CellDataset(s3_store, folds=[0])
    local = CellDataset(store, folds=[0])
    remote[0]  # the parent has used its filesystem before the workers fork
    images = torch.cat([batch["image"] for batch in make_loader(remote, batch_size=16, workers=2)])
    np.testing.assert_array_equal(images.numpy(), np.stack([local[i]["image"].numpy() for i in range(len(local))]))
