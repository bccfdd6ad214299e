"""PyTorch datasets over a cell store: single cells (CLA, CLH), bags of an image's cells (DSA),
whole images' cells in chunks (prediction), and :class:`CellStream`, the training input that reads
either of the first two a window of whole images at a time.

Crops are read by row from the store's shards without loading whole shards; the store's file
handles are opened lazily and never pickled. DataLoader workers are forked with a copy of the
dataset, handles included, and a remote (fsspec async) filesystem refuses to run in a forked
process: :func:`make_loader` starts each worker with :func:`worker_init`, which gives it a store
of its own. With ``in_memory=True`` the selected crops are read once up front instead (fast for
small stores).

A ``transform`` is an albumentations-style callable, ``transform(image=hwc)["image"]``, applied to
each (S, S, 4) crop (see :func:`ensemble.data.augment.build_augment`). Items hold crops as the store
does (integers); :func:`ensemble.models.cell_input` makes them the networks' input, on the device,
as it does for prediction and serving.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from ensemble.data.store import CellStore, open_store


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


def _transformed(crop: np.ndarray, transform: Callable | None) -> torch.Tensor:
    """(4, S, S) integer crop -> (4, S, S) tensor of its dtype, after the transform."""
    if transform is not None:
        crop = transform(image=np.ascontiguousarray(crop.transpose(1, 2, 0)))["image"].transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(crop))


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

    Items are dicts: ``image`` (4, S, S) integers as stored, ``target`` (19,) float32, ``index`` (the store
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
        self.store = open_store(store)
        self.rows = _rows(self.store, rows, folds)
        self.targets = self.store.labels(labels)[self.rows]
        self.transform = transform
        self._crops = _Crops(self.store, self.rows, in_memory)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self._item(i, self._crops)

    def _item(self, i: int, crops: Callable[[np.ndarray], np.ndarray]) -> dict:
        """Item ``i``, its crop taken from ``crops`` (positions in ``rows`` -> crops)."""
        crop = crops(np.array([i]))[0]
        return {
            "image": _transformed(crop, self.transform),
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

    Items are dicts: ``cells`` (N, 4, S, S) integers as stored, ``valid`` (N,) bool, ``image_target``
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
        self.store = open_store(store)
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
        return self._item(i, self._crops)

    def _item(self, i: int, crops: Callable[[np.ndarray], np.ndarray]) -> dict:
        """Item ``i``, its crops taken from ``crops`` (positions in ``rows`` -> crops)."""
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
        crops = crops(positions)
        cells = torch.zeros((size, *crops.shape[1:]), dtype=torch.from_numpy(crops[:0]).dtype)
        for j, crop in enumerate(crops):
            cells[j] = _transformed(crop, self.transform)
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


class _Window:
    """Crops of some positions of a dataset's ``rows``, read together; looked up like ``_Crops``."""

    def __init__(self, positions: np.ndarray, crops: np.ndarray):
        self.positions, self.crops = positions, crops

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self.crops[np.searchsorted(self.positions, positions)]


class CellStream(IterableDataset):
    """The training input: a :class:`CellDataset` or :class:`BagDataset` read a window of images at a time.

    Read cell by cell, a store in a bucket costs one request (20-40 ms) per cell, and a loader
    worker waits on each. This stream reads long runs of whole images instead, and shuffles
    within a window of them:

    - the images are grouped, in store order, into blocks of up to ``block_cells`` cells of one
      shard: contiguous in the shard, so a block is one range request (a few where rows of other
      folds lie between);
    - each epoch the blocks are shuffled with ``(seed, epoch)`` and laid end to end; a rank takes
      a contiguous slice of their items (cells, or bags) (equal slices, padded with the epoch's
      first items as ``DistributedSampler`` pads, so DDP ranks take the same number of steps),
      cut into batches; loader worker w of W makes the w-th contiguous run of those batches;
    - a worker reads its run a window of about ``window_cells`` cells at a time (a whole number
      of batches, and at most a quarter of its run, so that a small job too has a next window to
      read in a thread while the worker augments the current one; :meth:`window`) and shuffles
      each window's items among themselves before batching them.

    Every item is in the epoch once (less the last partial batch with ``drop_last``), in an order
    fixed by the seed, the epoch, the number of ranks and of loader workers. A bag's cells are all
    of one image, which never spans blocks. Bucket requests per epoch: about one per block (and
    per run of other folds' rows within it); with the store's shard cache
    (``CellStore(shard_cache=...)``) the first epoch downloads whole shards and later ones read
    the node's copies.

    Why not Ray Data (``iter_torch_batches`` with a local shuffle buffer): the store's crops live
    in ``.npy`` shards read by row range, which Ray Data reads only whole or through a datasource
    of our own; it would run a second pipeline on the CPUs the job's loader workers use, and the
    DSA bags, augmentation and items would need a second implementation. A torch
    ``IterableDataset`` keeps the DataLoader (worker processes, pinned memory) and the datasets'
    own items, and its order is a plain function of the seed and epoch.

    Parameters
    ----------
    dataset : CellDataset or BagDataset
        Read lazily (``in_memory=False``).
    batch_size : int
        Items per batch; the stream yields batches (use a DataLoader with ``batch_size=None``).
    seed : int
    world_size, rank : int
        Ray Train workers of the job, and this one's rank.
    drop_last : bool
        Leave out the rank's last partial batch when the rank has more than one batch's items (a
        batch of one cell breaks batch normalisation).
    block_cells : int
        Cells per block at most (an image with more is a block of its own).
    window_cells : int
        Cells per window: the span of the shuffle; a loader worker holds about two windows (1024
        cells of 256 px are 256 MiB).
    """

    def __init__(self, dataset: CellDataset | BagDataset, batch_size: int, seed: int = 0, world_size: int = 1,
                 rank: int = 0, drop_last: bool = True, block_cells: int = 128, window_cells: int = 1024):
        if min(batch_size, block_cells, window_cells) < 1:
            raise ValueError("batch_size, block_cells and window_cells must be >= 1")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.world_size, self.rank = world_size, rank
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # reaches persistent workers
        _, self._starts, self._counts = _image_runs(dataset.store, dataset.rows)
        bags = isinstance(dataset, BagDataset)
        per_image = -(-self._counts // dataset.bag_size) if bags else self._counts
        first_item = np.r_[0, np.cumsum(per_image)].astype(np.int64)
        # A bag needs its whole image's cells; a cell, itself.
        self._image_of_item = np.repeat(np.arange(len(per_image)), per_image) if bags else None
        shard = dataset.store.table.column("shard").to_numpy()[dataset.rows[self._starts]]
        edges, cells = [0], 0  # each block's first image
        for image, count in enumerate(self._counts):
            if image > edges[-1] and (shard[image] != shard[edges[-1]] or cells + count > block_cells):
                edges.append(image)
                cells = 0
            cells += count
        edges.append(len(per_image))
        self._blocks = [np.arange(first_item[a], first_item[b]) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        self.per_rank = -(-int(first_item[-1]) // world_size)
        full = self.per_rank // batch_size
        self.batches = full if drop_last and self.per_rank > batch_size else -(-self.per_rank // batch_size)
        self._window_batches = max(1, round(window_cells / (dataset.bag_size if bags else 1) / batch_size))

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's order (and, for bags, how images' cells are dealt); call before iterating."""
        self._epoch.fill_(epoch)
        if isinstance(self.dataset, BagDataset):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch of this rank."""
        return self.batches

    def window(self, batches: int) -> int:
        """Items per window of a worker's run of ``batches`` batches: whole batches (none spans two windows)."""
        return self.batch_size * max(1, min(self._window_batches, batches // 4))

    def order(self, epoch: int) -> np.ndarray:
        """This rank's items of an epoch, block by block, before the shuffle within windows."""
        blocks = np.random.default_rng([self.seed, epoch]).permutation(len(self._blocks))
        items = np.concatenate([self._blocks[b] for b in blocks]) if len(blocks) else np.zeros(0, np.int64)
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        # np.resize repeats from the start: DistributedSampler's padding.
        return np.resize(items, self.per_rank * self.world_size)[mine]

    def _cells(self, items: np.ndarray) -> np.ndarray:
        """Sorted positions (in ``dataset.rows``) of the cells that ``items`` need."""
        if self._image_of_item is None:
            return np.unique(items)
        images = np.unique(self._image_of_item[items])
        return np.concatenate([np.arange(self._starts[i], self._starts[i] + self._counts[i]) for i in images])

    def _read(self, items: np.ndarray) -> _Window:
        positions = self._cells(items)
        return _Window(positions, self.dataset._crops(positions))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        epoch = int(self._epoch)
        size = self.batch_size
        lo = worker * self.batches // workers * size
        hi = (worker + 1) * self.batches // workers * size
        items = self.order(epoch)[lo:hi]
        window = self.window(-(-len(items) // size))
        windows = [items[start:start + window] for start in range(0, len(items), window)]
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        with ThreadPoolExecutor(max_workers=1) as pool:
            reads = [pool.submit(self._read, window) for window in windows[:1]]
            for k, window in enumerate(windows):
                if k + 1 < len(windows):
                    reads.append(pool.submit(self._read, windows[k + 1]))  # read ahead while this one is augmented
                crops = reads[k].result()
                reads[k] = None  # let the window go once its batches are made
                window = rng.permutation(window)
                for start in range(0, len(window), size):
                    yield default_collate([self.dataset._item(int(i), crops) for i in window[start:start + size]])


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
        self.store = open_store(store)
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
    filesystem (fsspec makes one per process), so the worker opens its own. The parent's store
    stays referenced, never used: freed here, its filesystem's finalizer would close the parent's
    kept-alive connections, which takes their sockets out of the event loop's epoll instance that
    the fork shares, and the parent's next request on one would wait for ever. A worker ends with
    ``os._exit``, so that finalizer never runs. Albumentations draws from a generator seeded when
    the pipeline was built, which every forked worker would repeat: each worker reseeds it from its
    own torch seed.
    """
    info = get_worker_info()
    dataset = info.dataset.dataset if isinstance(info.dataset, CellStream) else info.dataset
    dataset.parent_store = dataset.store
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
    dataset : CellDataset, BagDataset, ImageChunks or CellStream
    batch_size : int or None
        None: items as they are (ImageChunks, and CellStream, which yields batches).
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
