"""Datasets over the cell store (single cells, bags, the training stream) and crop augmentation."""

import gc
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ensemble.data.augment import build_augment
from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.data.datasets import BagDataset, CellDataset, CellStream, ImageChunks, make_loader, worker_init
from ensemble.sim.images import simulate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    simulate(root, 6, seed=11, size=256)
    return root


@pytest.fixture(scope="module")
def store(local_ray, dataset, tmp_path_factory) -> CellStore:
    path = tmp_path_factory.mktemp("store") / "store"
    prepare(dataset, str(path), cell_size=16, n_folds=2, chunk_size=3, progress=False)
    return CellStore(path)


def test_cell_dataset_items(store):
    data = CellDataset(store, folds=[1])
    fold = store.cells["fold"].to_numpy()
    assert len(data) == (fold == 1).sum() and (fold[data.rows] == 1).all()
    item = data[0]
    assert item["image"].shape == (4, 16, 16) and item["image"].dtype == torch.uint8  # as stored
    np.testing.assert_array_equal(item["image"].numpy(), store.crops([item["index"]])[0])
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
    draws = [[build_augment(1.0, seed=seed)(image=crop)["image"] for _ in range(3)] for seed in (7, 7, 8)]
    assert all(np.array_equal(a, b) for a, b in zip(draws[0], draws[1], strict=True)), "a seed fixes the draws"
    assert not all(np.array_equal(a, b) for a, b in zip(draws[0], draws[2], strict=True))


def test_datasets_apply_the_transform_per_cell(store):
    data = BagDataset(store, bag_size=4, transform=build_augment(1.0))
    bag = data[0]
    assert bag["cells"].shape == (4, 4, 16, 16) and bag["cells"].dtype == torch.uint8


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


def _epoch(stream: CellStream, epoch: int, workers: int) -> list[dict]:
    stream.set_epoch(epoch)
    return list(make_loader(stream, batch_size=None, workers=workers))


def test_stream_gives_every_cell_once_per_epoch_in_a_new_order_fixed_by_the_seed(store):
    data = CellDataset(store, folds=[0, 1])
    stream = CellStream(data, batch_size=8, seed=3, drop_last=False, block_cells=12, window_cells=24)
    assert len(stream._blocks) > 3, "the store must make several blocks"
    orders = []
    for epoch in range(2):
        batches = _epoch(stream, epoch, workers=2)
        assert len(batches) == len(stream) == -(-len(data) // 8)
        index = torch.cat([b["index"] for b in batches]).numpy()
        np.testing.assert_array_equal(np.sort(index), data.rows)  # each cell once
        # Items as the dataset makes them: the crop, its target.
        first = batches[0]
        position = int(np.searchsorted(data.rows, first["index"][0]))
        np.testing.assert_array_equal(first["image"][0].numpy(), data[position]["image"].numpy())
        np.testing.assert_array_equal(first["target"][0].numpy(), data[position]["target"].numpy())
        orders.append(index)
    assert not np.array_equal(orders[0], orders[1])
    again = CellStream(data, batch_size=8, seed=3, drop_last=False, block_cells=12, window_cells=24)
    np.testing.assert_array_equal(torch.cat([b["index"] for b in _epoch(again, 1, workers=2)]).numpy(), orders[1])
    other_seed = CellStream(data, batch_size=8, seed=4, drop_last=False, block_cells=12, window_cells=24)
    assert not np.array_equal(torch.cat([b["index"] for b in _epoch(other_seed, 1, workers=2)]).numpy(), orders[1])


def test_stream_windows_mix_whole_blocks_and_drop_last_keeps_full_batches(store):
    data = CellDataset(store)
    stream = CellStream(data, batch_size=8, seed=0, block_cells=10, window_cells=32)
    batches = _epoch(stream, 0, workers=0)
    assert len(batches) == len(data) // 8 and all(len(b["index"]) == 8 for b in batches)
    # A window holds the cells of whole blocks, in the epoch's block order: 4 batches here, or
    # fewer, so that a worker reads at least 4 windows.
    window = stream.window(len(batches))
    assert window == 8 * max(1, min(4, len(batches) // 4))
    index = torch.cat([b["index"] for b in batches]).numpy()
    blocks = np.concatenate([stream._blocks[b] for b in np.random.default_rng([0, 0]).permutation(len(stream._blocks))])
    for start in range(0, len(index) - window, window):
        np.testing.assert_array_equal(np.sort(index[start:start + window]), np.sort(blocks[start:start + window]))
    assert not np.array_equal(index[:window], blocks[:window])  # shuffled within the window


def test_stream_bags_hold_one_image_each_and_every_cell_once(store):
    data = BagDataset(store, bag_size=3, train=True, seed=2)
    stream = CellStream(data, batch_size=4, seed=2, drop_last=False, block_cells=12, window_cells=24)
    image_of_cell = store.cells["image_id"].to_numpy()
    for epoch in range(2):
        batches = _epoch(stream, epoch, workers=2)
        rows = torch.cat([b["rows"] for b in batches]).numpy()
        valid = torch.cat([b["valid"] for b in batches]).numpy()
        np.testing.assert_array_equal(np.sort(rows[valid]), np.arange(len(store)))
        for bag, ok in zip(rows, valid):
            assert len(set(image_of_cell[bag[ok]])) == 1
        # The epoch's dealing is the dataset's own: each streamed bag is one of its items.
        dealt = {tuple(data[i]["rows"].tolist()) for i in range(len(data))}
        assert {tuple(bag.tolist()) for bag in rows} == dealt


def test_stream_gives_ranks_equal_steps_and_together_every_cell(store):
    data = CellDataset(store)
    ranks = [CellStream(data, batch_size=8, seed=1, world_size=2, rank=r, drop_last=False, block_cells=12,
                        window_cells=16) for r in range(2)]
    batches = [_epoch(stream, 0, workers=0) for stream in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0])
    index = np.concatenate([torch.cat([b["index"] for b in rank]).numpy() for rank in batches])
    assert set(index) == set(range(len(store))) and len(index) == 2 * -(-len(store) // 2)


def _range_server():
    """bench_ingest's HTTP server of a folder: range reads, a delay per request, requests and bytes counted."""
    path = Path(__file__).parents[1] / "bench" / "bench_ingest.py"
    spec = importlib.util.spec_from_file_location("bench_ingest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DelayedRangeServer


def _served(server, epoch_of: Callable[[], list[dict]]) -> tuple[list[dict], int, int]:
    """Batches of one epoch, and the requests and bytes the server answered meanwhile."""
    requests, sent = server.counts()
    batches = epoch_of()
    after = server.counts()
    return batches, after[0] - requests, after[1] - sent


def test_remote_stream_reads_windows_not_cells_and_the_shard_cache_reads_the_bucket_once(store, tmp_path):
    shards = sorted((Path(store.uri) / "crops").glob("*.npy"))
    local = CellDataset(store)
    with _range_server()(Path(store.uri).parent, delay_ms=1) as server:
        url = f"{server.url}/{Path(store.uri).name}"
        per_cell, before, _ = _served(server, lambda: list(make_loader(CellDataset(url), batch_size=8, workers=2)))
        stream = CellStream(CellDataset(url), batch_size=8, drop_last=False, block_cells=12, window_cells=24)
        batches, requests, _ = _served(server, lambda: _epoch(stream, 0, workers=2))
        index = torch.cat([b["index"] for b in batches]).numpy()
        np.testing.assert_array_equal(torch.cat([b["image"] for b in batches]).numpy(),
                                      np.stack([local[int(i)]["image"].numpy() for i in index]))
        # Per worker: a header per shard, then a request per shard a window touches (a window is at
        # least a batch).
        assert before >= len(store) and requests <= 2 * len(shards) + len(stream) * len(shards) < before / 3

        # A disk without room (all of it to be kept free) declines the cache: range reads, nothing written.
        full = tmp_path / "full"
        declined = CellStream(CellDataset(CellStore(url, shard_cache=full, cache_free_fraction=0.999999)),
                              batch_size=8, drop_last=False, block_cells=12, window_cells=24)
        ranged, requests, _ = _served(server, lambda: _epoch(declined, 0, workers=2))
        assert requests > 2 * len(shards) and not list(full.glob("*/*.npy"))

        # No share kept free here: whether the cache is used must not depend on this machine's disk.
        cache = tmp_path / "cache"
        cached = CellStream(CellDataset(CellStore(url, shard_cache=cache, cache_free_fraction=0)),
                            batch_size=8, drop_last=False)
        first, requests, sent = _served(server, lambda: _epoch(cached, 0, workers=2))
        # Each shard once (a size and a download), though both workers wanted it.
        assert sent == sum(p.stat().st_size for p in shards) and requests == 2 * len(shards)
        second, requests, _ = _served(server, lambda: _epoch(cached, 1, workers=2))
        assert requests == 0
        for batch in ranged + first + second:
            np.testing.assert_array_equal(batch["image"][0].numpy(), local[int(batch["index"][0])]["image"].numpy())
    (folder,) = cache.iterdir()
    assert sorted(p.name for p in folder.glob("*.npy")) == [p.name for p in shards]


def _worker_init_then_collect(worker_id: int) -> None:
    worker_init(worker_id)
    gc.collect()  # what a worker's allocations bring about sooner or later: what it no longer references is freed


def test_the_parent_reads_a_remote_store_on_after_its_loader_workers_are_gone(store, monkeypatch):
    """A forked worker must not close the parent's kept-alive connections: closing them there takes
    their sockets out of the event loop's epoll, which the fork shares, and the parent's next read
    then waits for an answer it is never told of."""
    import aiohttp
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "http", {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=20)}})
    with _range_server()(Path(store.uri).parent, delay_ms=1) as server:
        url = f"{server.url}/{Path(store.uri).name}"
        loader = DataLoader(CellDataset(url), batch_size=8, num_workers=2, worker_init_fn=_worker_init_then_collect)
        assert sum(len(batch["index"]) for batch in loader) == len(store)
        np.testing.assert_array_equal(CellDataset(url)[0]["image"].numpy(), CellDataset(store)[0]["image"].numpy())


def test_training_input_equals_what_serving_cuts_after_the_same_scaling(store, dataset):
    """Parity: a cell read by the training stream (from a remote store) is the cell serving cuts."""
    from ensemble.data import hpa
    from ensemble.data.crops import cut_cells
    from ensemble.data.features import FeatureSettings
    from ensemble.data.segment import create_segmenter
    from ensemble.models import cell_input
    from ensemble.serving.model import Preprocessing
    from ensemble.trainers.loop import _inputs
    from ensemble.zoo import ModelSpec

    image_id = store.cells["image_id"].iloc[0]
    preprocessing = Preprocessing.from_store(store.uri)  # what the registered ensemble cuts with
    image = hpa.read_image(dataset, image_id, "train")
    cells = create_segmenter(preprocessing.segmenter["name"], **preprocessing.segmenter["settings"])(image).cells
    table, served = cut_cells(image, cells, preprocessing.cell_size, FeatureSettings(**preprocessing.features))
    spec = ModelSpec(name="c", head="cla", backbone="test_efficientnet", cell_size=24)  # resized from the store's 16
    rows = np.flatnonzero(store.cells["image_id"].to_numpy() == image_id)
    with _range_server()(Path(store.uri).parent, delay_ms=0) as server:
        stream = CellStream(CellDataset(f"{server.url}/{Path(store.uri).name}", rows=rows), batch_size=len(rows))
        stream.set_epoch(0)
        (batch,) = list(stream)
    trained = _inputs(batch["image"], spec, torch.device("cpu"))
    cell_ids = store.cells["cell_id"].to_numpy()[batch["index"].numpy()]
    position = {cell: i for i, cell in enumerate(table["cell_id"])}
    serving_input = cell_input(torch.from_numpy(served), spec.cell_size)  # what predict_cells feeds its networks
    torch.testing.assert_close(trained, serving_input[[position[c] for c in cell_ids]], rtol=0, atol=0)


@pytest.mark.parametrize("in_memory", [False, True])
def test_the_jobs_training_loader_streams_the_store_unless_in_memory(store, in_memory):
    from ensemble.trainers.loop import start_epoch, train_epoch, train_loader
    from ensemble.models import build_model
    from ensemble.models.losses import WeightedBCELoss
    from ensemble.zoo import ModelSpec, Placement, TrainSettings

    spec = ModelSpec(name="c", head="cla", backbone="test_efficientnet", cell_size=16,
                     train=TrainSettings(batch_size=8, augment=0.5),
                     placement=Placement(loader_workers=2, in_memory=in_memory))
    rows = np.flatnonzero(store.cells["fold"].to_numpy() == 1)
    loader = train_loader(store, rows, spec, torch.device("cpu"))
    assert isinstance(loader.dataset, CellStream) != in_memory
    model = build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for epoch in range(2):
        start_epoch(loader, epoch)
        seen = torch.cat([batch["index"] for batch in loader]).numpy()
        assert len(seen) == len(rows) // 8 * 8 and len(set(seen)) == len(seen) and set(seen) <= set(rows)
        start_epoch(loader, epoch)
        loss, steps = train_epoch(model, loader, WeightedBCELoss(), optimizer, spec, torch.device("cpu"))
        assert steps == len(loader) == len(rows) // 8 and np.isfinite(loss)
