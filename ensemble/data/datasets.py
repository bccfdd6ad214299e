"""PyTorch datasets over a cell store: single cells (CLA, CLH), bags of an image's cells (DSA),
and whole images' cells in chunks (prediction).

Crops are read by row from the store's shards without loading whole shards; the store's file
handles are opened lazily and never pickled. DataLoader workers are forked with a copy of the
dataset, handles included, and a remote (fsspec async) filesystem refuses to run in a forked
process: :func:`make_loader` starts each worker with :func:`worker_init`, which gives it a store
of its own. With ``in_memory=True`` the selected crops are read once up front instead (fast for
small stores).

A ``transform`` is an albumentations-style callable, ``transform(image=hwc)["image"]``, applied to
each (S, S, 4) crop before it becomes a (4, S, S) float32 tensor in [0, 1]
(see :func:`ensemble.data.augment.build_augment`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ensemble.data.store import CellStore


def _open(store: CellStore | str) -> CellStore:
    return store if isinstance(store, CellStore) else CellStore(store)


def _rows(store: CellStore, rows: np.ndarray | None, folds: Iterable[int] | None) -> np.ndarray:
    """Store rows to use: ``rows`` as given, or the cells of ``folds``, or every cell; in store order."""
    if rows is not None and folds is not None:
        raise ValueError("give rows or folds, not both")
    if rows is not None:
        return np.asarray(rows, dtype=np.int64)
    if folds is None:
        return np.arange(len(store), dtype=np.int64)
    return np.flatnonzero(np.isin(store.table.column("fold").to_numpy(), list(folds))).astype(np.int64)


def _image_runs(store: CellStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images of ``rows`` (store order): their ids, and the position and number of each one's cells in ``rows``.

    Cells of an image are contiguous in the store, so an image is a run of equal ids.
    """
    ids = store.table.column("image_id").to_numpy(zero_copy_only=False)[rows]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
    return ids[starts], starts, np.diff(np.r_[starts, len(ids)])


class _Crops:
    """Crops of a fixed list of store rows, read by position in that list."""

    def __init__(self, store: CellStore, rows: np.ndarray, in_memory: bool):
        self.store = store
        self.shard = store.table.column("shard").to_numpy()[rows]
        self.row = store.table.column("row").to_numpy()[rows]
        self.memory = store.read_crops(self.shard, self.row) if in_memory else None

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        if self.memory is not None:
            return self.memory[positions]
        return self.store.read_crops(self.shard[positions], self.row[positions])


def _to_tensor(crop: np.ndarray, transform: Callable | None) -> torch.Tensor:
    """(4, S, S) integer crop -> (4, S, S) float32 tensor in [0, 1], after the transform."""
    top = np.float32(np.iinfo(crop.dtype).max)
    if transform is not None:
        crop = transform(image=np.ascontiguousarray(crop.transpose(1, 2, 0)))["image"].transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32) / top)


class CellDataset(Dataset):
    """Single cells with their labels.

    Parameters
    ----------
    store : CellStore or str
    rows : array of int, optional
        Store rows to use (row i = row i of cells.parquet). Exclusive with ``folds``.
    folds : iterable of int, optional
        Use the cells of these folds. Neither ``rows`` nor ``folds``: every cell.
    labels : str
        Label version: "weak" (image labels), "truth" (NaN where a cell has no true match), or
        one written with ``CellStore.write_labels``.
    transform : callable, optional
    in_memory : bool
        Read all selected crops up front.

    Items are dicts: ``image`` (4, S, S) float32, ``target`` (19,) float32, ``index`` (the store
    row, to join predictions back to cells.parquet).
    """

    def __init__(
        self,
        store: CellStore | str,
        rows: np.ndarray | None = None,
        folds: Iterable[int] | None = None,
        labels: str = "weak",
        transform: Callable | None = None,
        in_memory: bool = False,
    ):
        self.store = _open(store)
        self.rows = _rows(self.store, rows, folds)
        self.targets = self.store.labels(labels)[self.rows]
        self.transform = transform
        self._crops = _Crops(self.store, self.rows, in_memory)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        crop = self._crops(np.array([i]))[0]
        return {
            "image": _to_tensor(crop, self.transform),
            "target": torch.from_numpy(self.targets[i]),
            "index": int(self.rows[i]),
        }


class BagDataset(Dataset):
    """Bags of up to ``bag_size`` cells of one image, for multiple-instance heads (DSA).

    An image with M cells yields ceil(M / bag_size) items that together hold every cell exactly
    once, so an epoch sees every cell, as a cell-level model's epoch does. In training
    (``train=True``) the image's cells are shuffled anew each epoch (:meth:`set_epoch`) and dealt
    into bags of near-equal size; in prediction (``train=False``) bags are consecutive runs of
    ``bag_size`` cells in store order. Bags with fewer cells than ``bag_size`` are padded: padded
    slots have ``valid`` False, zero crops and targets, and ``rows`` -1.

    Parameters
    ----------
    store : CellStore or str
    rows : array of int, optional
        Store rows to use, whole images of them in store order. Exclusive with ``folds``.
    folds : iterable of int, optional
        Images of these folds. Neither ``rows`` nor ``folds``: every image.
    bag_size : int
    labels : str
        Label version of the cell targets (see :class:`CellDataset`).
    train : bool
    transform : callable, optional
        Applied to every cell of a bag independently.
    seed : int
        Seed of the per-epoch cell sampling.
    in_memory : bool
        Read all selected crops up front.

    Items are dicts: ``cells`` (N, 4, S, S) float32, ``valid`` (N,) bool, ``image_target``
    (19,) float32, ``cell_targets`` (N, 19) float32, ``rows`` (N,) int64.
    """

    def __init__(
        self,
        store: CellStore | str,
        rows: np.ndarray | None = None,
        folds: Iterable[int] | None = None,
        bag_size: int = 16,
        labels: str = "weak",
        train: bool = True,
        transform: Callable | None = None,
        seed: int = 0,
        in_memory: bool = False,
    ):
        if bag_size < 1:
            raise ValueError(f"bag_size must be >= 1, got {bag_size}")
        self.store = _open(store)
        self.rows = _rows(self.store, rows, folds)
        self.bag_size, self.train, self.transform, self.seed = bag_size, train, transform, seed
        # In shared memory: persistent DataLoader workers hold their own copy of the dataset, and
        # set_epoch() in the training process must reach them.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.cell_targets = self.store.labels(labels)[self.rows]
        self.image_ids, self.starts, self.counts = _image_runs(self.store, self.rows)
        self.image_targets = self.store.labels("weak")[self.rows[self.starts]]
        bags = -(-self.counts // bag_size)
        self.items = [(image, k) for image, n in enumerate(bags) for k in range(n)]
        self._crops = _Crops(self.store, self.rows, in_memory)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose how this epoch deals each image's cells into bags (training only); seen by DataLoader workers too.

        Call it before iterating the loader for the epoch: workers read the epoch when they
        make an item, and a loader's iterator starts prefetching as soon as it is created.
        """
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, k = self.items[i]
        start, count, size = self.starts[image], self.counts[image], self.bag_size
        if self.train:
            # Every item of the image draws the same permutation, so the bags partition its cells.
            order = np.random.default_rng([self.seed, self.epoch, image]).permutation(count)
            picked = np.sort(np.array_split(order, -(-count // size))[k])
        else:
            picked = np.arange(k * size, min((k + 1) * size, count))
        positions = start + picked
        n = len(positions)
        crops = self._crops(positions)
        cells = torch.zeros((size, *crops.shape[1:]), dtype=torch.float32)
        for j, crop in enumerate(crops):
            cells[j] = _to_tensor(crop, self.transform)
        cell_targets = np.zeros((size, self.cell_targets.shape[1]), np.float32)
        cell_targets[:n] = self.cell_targets[positions]
        rows = np.full(size, -1, np.int64)
        rows[:n] = self.rows[positions]
        return {
            "cells": cells,
            "valid": torch.from_numpy(np.arange(size) < n),
            "image_target": torch.from_numpy(self.image_targets[image]),
            "cell_targets": torch.from_numpy(cell_targets),
            "rows": torch.from_numpy(rows),
        }


class ImageChunks(Dataset):
    """Every cell of the selected images, whole images at a time: the input of prediction.

    Images are taken in store order and grouped into chunks of up to ``max_cells`` cells (an
    image with more cells is a chunk of its own); an item is what one call of
    :func:`ensemble.models.inference.predict_cells` sees, so the same chunks give the same
    predictions however many processes read them.

    Parameters
    ----------
    store : CellStore or str
    rows : array of int, optional
        Store rows to use, whole images of them in store order. Exclusive with ``folds``.
    folds : iterable of int, optional
        Images of these folds. Neither ``rows`` nor ``folds``: every image.
    max_cells : int

    Items are dicts: ``crops`` (n, 4, S, S) integer tensor as stored, ``counts`` (images,) int64
    cells per image, ``start`` and ``stop``: the chunk's cells are ``rows[start:stop]``.
    """

    def __init__(self, store: CellStore | str, rows: np.ndarray | None = None, folds: Iterable[int] | None = None,
                 max_cells: int = 1024):
        if max_cells < 1:
            raise ValueError(f"max_cells must be >= 1, got {max_cells}")
        self.store = _open(store)
        self.rows = _rows(self.store, rows, folds)
        _, starts, counts = _image_runs(self.store, self.rows)
        ends = starts + counts
        self.chunks = []
        first = 0  # the chunk's first image
        while first < len(ends):
            start = int(starts[first])
            last = max(first + 1, int(np.searchsorted(ends, start + max_cells, side="right")))
            self.chunks.append((start, int(ends[last - 1]), counts[first:last]))
            first = last
        self._crops = _Crops(self.store, self.rows, in_memory=False)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        start, stop, counts = self.chunks[i]
        return {"crops": torch.from_numpy(self._crops(np.arange(start, stop))), "counts": counts,
                "start": start, "stop": stop}


def worker_init(worker_id: int) -> None:
    """Start a DataLoader worker with a store of its own and augmentation draws of its own.

    A forked worker holds its parent's store, whose fsspec filesystem (for a remote store) refuses
    to run in another process. A pickled copy has no handles (``CellStore`` drops them) and a new
    filesystem (fsspec makes one per process), so the worker opens its own. Albumentations draws
    from a generator seeded when the pipeline was built, which every forked worker would repeat:
    each worker reseeds it from its own torch seed.
    """
    info = get_worker_info()
    dataset = info.dataset
    dataset.store = dataset._crops.store = pickle.loads(pickle.dumps(dataset.store))
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def make_loader(dataset: Dataset, batch_size: int | None, workers: int, pin_memory: bool = False,
                sampler: Sampler | None = None, drop_last: bool = False, persistent: bool = False,
                prefetch: int = 2) -> DataLoader:
    """A DataLoader over one of these datasets, read by ``workers`` processes (0: by the caller).

    Parameters
    ----------
    dataset : CellDataset, BagDataset or ImageChunks
    batch_size : int or None
        None: items as they are (ImageChunks).
    workers : int
    pin_memory : bool
        Page-locked batches, so copies to a GPU can run asynchronously (``non_blocking``).
    sampler, drop_last
        As for ``DataLoader``.
    persistent : bool
        Keep the workers between epochs (the training loader: set the sampler's and the
        dataset's epoch before each pass).
    prefetch : int
        Items each worker prepares ahead.
    """
    extra = dict(worker_init_fn=worker_init, persistent_workers=persistent, prefetch_factor=prefetch) if workers else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                      pin_memory=pin_memory, **extra)
