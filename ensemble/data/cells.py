"""The cell store: every cell of a dataset as a fixed-size crop plus one table row.

:func:`prepare` builds a store from a dataset in the Kaggle layout with a Ray Data pipeline;
:class:`CellStore` reads it. Layout (a local directory or any fsspec URI: ``s3://``, ``gs://``,
``file://``)::

    STORE/meta.json               size S, dtype, channels, segmenter + settings, source fingerprint,
                                  version, n_folds, seed, chunk size
    STORE/cells.parquet           one row per cell (see below), cells of one image contiguous
    STORE/crops/shard-00000.npy   (n, 4, S, S) uint8: a cell's own mask applied, other cells
                                  zeroed, padded to square, resized to S
    STORE/report.json             images skipped (with the reason) and images without cells
    STORE/labels/{version}.parquet  extra cell-label versions (image_id, cell_id, label_0..18)
    STORE/chunks/                 per-chunk tables and completion markers (for resuming)

``cells.parquet`` columns: ``image_id, cell_id, fold, y0, x0, y1, x1, area``, the morphology and
intensity features of :mod:`ensemble.data.features`, ``touches_border``, ``image_labels`` (19 x
int8), ``cell_labels`` (19 x float32, initially the image labels: the weak labels), ``shard``,
``row``; and, when the dataset has ``truth/``, ``truth_labels`` (19 x float32, NaN where no true
cell overlaps at IoU >= 0.5), ``truth_iou`` and ``truth_captured``. Truth is for evaluation and
VID only; nothing reads it for training unless asked to (``labels="truth"``).

Images are processed in fixed chunks of sorted image ids; chunk i becomes shard i. Each chunk is
written atomically (temporary name, then rename) and marked complete last, so an interrupted
build resumes with the unfinished chunks and ends byte-for-byte equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from ensemble.data import hpa
from ensemble.data.features import FeatureSettings, cell_features
from ensemble.data.segment import create_segmenter, from_given_mask, match_cells
from ensemble.labels import CHANNELS, NUM_CLASSES

STORE_VERSION = 1
CROP_DTYPE = np.uint8
TRUTH_IOU = 0.5  # a segmented cell takes the labels of the true cell it overlaps at this IoU
RESERVED_LABELS = ("weak", "truth")


class StoreMismatchError(ValueError):
    """A store exists at the path but was built from other data or with other settings."""


@dataclass
class PrepareReport:
    """Outcome of :func:`prepare`.

    Attributes
    ----------
    store : str
        Store URI.
    n_images, n_cells : int
        Images in the index and cells in the store.
    skipped : dict
        Image id -> reason, for images that could not be read.
    no_cells : list of str
        Images read but with no cell found.
    chunks_built, chunks_reused : int
        Chunks processed by this call and chunks found complete from an earlier one.
    seconds : float
        Wall time of this call.
    startup_seconds : float
        Of which until the first image came back from a worker (starting Ray and the actors);
        0 when nothing was built.
    """

    store: str
    n_images: int
    n_cells: int
    skipped: dict[str, str]
    no_cells: list[str]
    chunks_built: int
    chunks_reused: int
    seconds: float
    startup_seconds: float = 0.0


@dataclass
class ImageCells:
    """The cells of one image, as a worker hands them to the driver.

    Attributes
    ----------
    image_id : str
    table : pandas.DataFrame
        Features per cell (:func:`~ensemble.data.features.cell_features`), plus ``truth_iou``
        and ``truth_captured`` when truth is known.
    crops : ndarray of uint8, shape (n, 4, S, S)
    truth_labels : ndarray of float32, shape (n, 19), or None when the dataset has no truth
    error : str or None
        Why the image was skipped (then it has no cells).
    """

    image_id: str
    table: pd.DataFrame
    crops: np.ndarray
    truth_labels: np.ndarray | None = None
    error: str | None = None


def crop_cells(image: np.ndarray, cells: np.ndarray, table: pd.DataFrame, size: int) -> np.ndarray:
    """Cut every cell out of an image as an S x S crop.

    Each crop is the cell's bounding box with the cell's own mask applied (so neighbours are
    zero), zero-padded to a centred square and resized to ``size`` with area interpolation.

    Parameters
    ----------
    image : ndarray of shape (H, W, 4), float in [0, 1]
    cells : ndarray of shape (H, W), instance labels
    table : DataFrame with ``cell_id, y0, x0, y1, x1``
    size : int

    Returns
    -------
    ndarray of uint8, shape (n, 4, size, size)
    """
    crops = np.zeros((len(table), len(CHANNELS), size, size), dtype=CROP_DTYPE)
    for i, (cell_id, y0, x0, y1, x1) in enumerate(table[["cell_id", "y0", "x0", "y1", "x1"]].itertuples(index=False)):
        patch = image[y0:y1, x0:x1] * (cells[y0:y1, x0:x1] == cell_id)[..., None]
        height, width = patch.shape[:2]
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        patch = cv2.copyMakeBorder(
            patch, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0
        )
        patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
        crops[i] = np.rint(np.clip(patch, 0, 1) * 255).astype(CROP_DTYPE).transpose(2, 0, 1)
    return crops


def process_image(
    root: str | Path,
    image_id: str,
    segmenter,
    size: int,
    split: str = "train",
    truth: hpa.Truth | None = None,
    features: FeatureSettings | None = None,
) -> ImageCells:
    """Read, segment (or take the given mask), measure and crop one image.

    A bad image does not raise: the result carries its ``error`` and no cells.

    Parameters
    ----------
    root : dataset root
    image_id : str
    segmenter : callable image -> Segmentation
    size : int
        Crop side S.
    split : str
    truth : hpa.Truth, optional
        Ground truth: adds ``truth_labels``, ``truth_iou``, ``truth_captured``.
    features : FeatureSettings, optional
    """
    try:
        image = hpa.read_image(root, image_id, split)
        given = hpa.read_given_mask(root, image_id)
        if given is not None and given.shape != image.shape[:2]:
            raise hpa.DatasetError(f"mask of {image_id!r} has shape {given.shape}, image {image.shape[:2]}")
    except hpa.DatasetError as error:
        # A blank 1-pixel image yields the cell table's columns, typed and empty.
        image, cells, reason = np.zeros((1, 1, len(CHANNELS)), np.float32), np.zeros((1, 1), np.uint16), str(error)
    else:
        cells = (from_given_mask(image, given) if given is not None else segmenter(image)).cells
        reason = None
    table = cell_features(image, cells, features)
    truth_labels = None
    if truth is not None:
        truth_labels = _attach_truth(table, cells, truth, image_id)
    return ImageCells(image_id, table, crop_cells(image, cells, table, size), truth_labels, reason)


def _attach_truth(table: pd.DataFrame, cells: np.ndarray, truth: hpa.Truth, image_id: str) -> np.ndarray:
    """Add ``truth_iou``/``truth_captured`` to ``table``; return the (n, 19) truth labels.

    A segmented cell takes the labels of the true cell it matches at IoU >= 0.5 (NaN if none).
    ``truth_captured`` is the share of that true cell which is both in the image (the truth's
    ``captured``) and inside the segmented cell: what the VID's capture-ratio model predicts.
    """
    n = len(table)
    labels = np.full((n, NUM_CLASSES), np.nan, np.float32)
    table["truth_iou"] = np.zeros(n, np.float32)
    table["truth_captured"] = np.zeros(n, np.float32)
    true_ids, true_labels = truth.cell_labels(image_id)
    if n == 0 or len(true_ids) == 0:
        return labels
    matches = match_cells(cells, truth.mask(image_id), iou=TRUTH_IOU)
    rows = pd.Index(true_ids).get_indexer(matches.true_id)  # -1: background or unlabelled cell
    known = rows >= 0
    captured = np.ones(len(true_ids))
    if "captured" in truth.cells:
        per_image = truth.cells[truth.cells["ID"] == image_id].set_index("cell_id")["captured"]
        captured = per_image.reindex(true_ids).fillna(1.0).to_numpy()
    labels[matches.matched & known] = true_labels[rows[matches.matched & known]]
    table["truth_iou"] = matches.iou.astype(np.float32)
    table["truth_captured"] = np.where(known, captured[rows] * matches.true_share, 0.0).astype(np.float32)
    return labels


class _CellExtractor:
    """Ray Data worker: holds one segmenter and turns a batch of image ids into ImageCells."""

    def __init__(self, root, split, size, segmenter, segmenter_settings, features, with_truth):
        self.root, self.split, self.size, self.features = root, split, size, features
        self.segmenter = create_segmenter(segmenter, **segmenter_settings)
        self.truth = hpa.read_truth(root) if with_truth else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [
            process_image(self.root, str(image_id), self.segmenter, self.size, self.split, self.truth, self.features)
            for image_id in batch["image_id"]
        ]
        # An object column travels through Ray Data pickled; ImageCells keeps the per-image
        # variable-length tables and crops together without a ragged-tensor schema.
        return {"image_id": batch["image_id"], "result": np.array(results, dtype=object)}


def source_fingerprint(root: str | Path, split: str = "train") -> str:
    """Hash of the split's CSV and of the names and sizes of its image, mask and truth files.

    Names and sizes rather than modification times, so a copied dataset keeps its fingerprint.
    """
    root = Path(root)
    digest = hashlib.sha256()
    csv = root / f"{split}.csv"
    digest.update(csv.read_bytes() if csv.exists() else b"")
    for folder in (root / split, root / "masks", root / "truth", root / "truth" / "masks"):
        if folder.is_dir():
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.is_file():
                    digest.update(f"{folder.name}/{entry.name}:{entry.stat().st_size}\n".encode())
    return digest.hexdigest()


def prepare(
    data_root: str | Path,
    store: str | Path,
    size: int = 64,
    n_folds: int = 5,
    seed: int = 0,
    segmenter: str = "classical",
    segmenter_settings: dict | None = None,
    num_workers: int | None = None,
    split: str = "train",
    progress: bool = True,
    chunk_size: int = 64,
    features: FeatureSettings | None = None,
    force: bool = False,
) -> PrepareReport:
    """Build (or resume, or reuse) the cell store of a dataset.

    Parameters
    ----------
    data_root : str or Path
        Dataset in the Kaggle layout (a path every Ray worker can read).
    store : str or Path
        Store directory or URI.
    size : int
        Crop side S in pixels.
    n_folds, seed : int
        Folds over images, stratified on the image labels (in sorted image id order).
    segmenter : {"classical", "hpacellseg"}
    segmenter_settings : dict, optional
        Keyword arguments of :func:`~ensemble.data.segment.create_segmenter`.
    num_workers : int, optional
        Ray actors segmenting images (default: the cluster's CPUs).
    split : str
        Image sub-directory and CSV name.
    progress : bool
        Show a progress bar (images/s, cells/s).
    chunk_size : int
        Images per chunk (and per crop shard); part of the store's identity.
    features : FeatureSettings, optional
    force : bool
        Delete a store built with other settings at ``store`` instead of raising.

    Returns
    -------
    PrepareReport

    Raises
    ------
    StoreMismatchError
        ``store`` holds a store of other data or settings and ``force`` is False.
    """
    start = time.perf_counter()
    features = features or FeatureSettings()
    segmenter_settings = dict(segmenter_settings or {})
    fs, path = fsspec.core.url_to_fs(str(store))
    index = hpa.read_index(data_root, split).sort_values("ID", ignore_index=True)
    image_labels = hpa.label_matrix(index["labels"]).astype(np.int8)
    with_truth = hpa.read_truth(data_root) is not None
    meta = {
        "version": STORE_VERSION,
        "size": size,
        "dtype": np.dtype(CROP_DTYPE).name,
        "channels": list(CHANNELS),
        "segmenter": create_segmenter(segmenter, **segmenter_settings).describe(),
        "features": dataclasses.asdict(features),
        "source": {"split": split, "fingerprint": source_fingerprint(data_root, split), "n_images": len(index)},
        "n_folds": n_folds,
        "seed": seed,
        "chunk_size": chunk_size,
        "truth": with_truth,
    }
    if _check_existing(fs, path, meta, force) and fs.exists(f"{path}/cells.parquet"):
        report = json.loads(fs.cat_file(f"{path}/report.json"))
        return _prepare_report(store, report, built=0, seconds=time.perf_counter() - start)
    for folder in ("crops", "chunks", "labels"):
        fs.makedirs(f"{path}/{folder}", exist_ok=True)
    _write_atomic(fs, f"{path}/meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())

    # Imported here: Ray workers import this module, and only the driver needs scikit-learn.
    from ensemble.data.folds import assign_folds

    folds = assign_folds(image_labels, n_folds, seed)
    images = {image_id: (fold, labels) for image_id, fold, labels in zip(index["ID"], folds, image_labels)}
    chunks = [list(index["ID"][i : i + chunk_size]) for i in range(0, len(index), chunk_size)]
    # One listing rather than a request per chunk (object stores answer each in milliseconds).
    done = {int(re.search(r"chunk-(\d+)\.json$", p).group(1)) for p in fs.glob(f"{path}/chunks/chunk-*.json")}
    pending = [i for i in range(len(chunks)) if i not in done]
    startup = 0.0
    if pending:
        startup = _build_chunks(
            fs, path, chunks, pending, images,
            extractor_kwargs=dict(root=str(data_root), split=split, size=size, segmenter=segmenter,
                                  segmenter_settings=segmenter_settings, features=features, with_truth=with_truth),
            num_workers=num_workers, progress=progress,
        )
    report = _assemble(fs, path, len(chunks))
    return _prepare_report(store, report, built=len(pending), seconds=time.perf_counter() - start, startup=startup)


def _prepare_report(store, report: dict, built: int, seconds: float, startup: float = 0.0) -> PrepareReport:
    """A PrepareReport from the contents of report.json and this call's own figures."""
    return PrepareReport(
        store=str(store),
        n_images=report["n_images"],
        n_cells=report["n_cells"],
        skipped=report["skipped"],
        no_cells=report["no_cells"],
        chunks_built=built,
        chunks_reused=report["chunks"] - built,
        seconds=seconds,
        startup_seconds=startup,
    )


def _check_existing(fs, path: str, meta: dict, force: bool) -> bool:
    """True if ``path`` holds a store with the same meta; False if empty (or wiped by ``force``)."""
    if not fs.exists(f"{path}/meta.json"):
        return False
    existing = json.loads(fs.cat_file(f"{path}/meta.json"))
    if existing == meta:
        return True
    if force:
        fs.rm(path, recursive=True)
        return False
    differ = sorted(key for key in meta.keys() | existing.keys() if meta.get(key) != existing.get(key))
    raise StoreMismatchError(
        f"{path} holds a cell store built from other data or with other settings (differing: {differ}); "
        "choose another store path or pass force=True to rebuild it"
    )


def _build_chunks(fs, path, chunks, pending, images, extractor_kwargs, num_workers, progress) -> float:
    """Run the Ray Data pipeline over the images of the pending chunks, writing each chunk.

    Returns the seconds until the first image came back.
    """
    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init()  # a local Ray, or the cluster this process runs in
    num_workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk_of = {image_id: i for i in pending for image_id in chunks[i]}
    # One block per image so idle actors pick up single images and the driver sees each result.
    dataset = ray.data.from_items([{"image_id": image_id} for image_id in chunk_of], override_num_blocks=len(chunk_of))
    dataset = dataset.map_batches(
        _CellExtractor,
        fn_constructor_kwargs=extractor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        batch_size=1,
        num_cpus=1,
    )
    dataset.context.enable_progress_bars = False  # ours below counts cells too
    dataset.context.enable_fallback_to_arrow_object_ext_type = True  # ImageCells travel pickled
    waiting: dict[int, dict[str, ImageCells]] = {i: {} for i in pending}
    n_cells, startup = 0, None
    with tqdm(total=len(chunk_of), unit="img", desc="cells", disable=not progress) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            startup = startup or time.perf_counter() - start
            for image_id, result in zip(batch["image_id"], batch["result"]):
                chunk = chunk_of[str(image_id)]
                waiting[chunk][str(image_id)] = result
                if len(waiting[chunk]) == len(chunks[chunk]):
                    results = waiting.pop(chunk)
                    _write_chunk(fs, path, chunk, [results[i] for i in chunks[chunk]], images)
                n_cells += len(result.table)
                bar.update(1)
                bar.set_postfix(cells_per_s=f"{n_cells / (time.perf_counter() - start):.0f}", refresh=False)
    return startup


def _chunk_path(path: str, chunk: int, kind: str) -> str:
    return f"{path}/chunks/chunk-{chunk:05d}.{kind}"


def _shard_path(path: str, shard: int) -> str:
    return f"{path}/crops/shard-{shard:05d}.npy"


def _write_chunk(fs, path: str, chunk: int, results: list[ImageCells], images: dict) -> None:
    """Write a chunk's crop shard, then its cell table, then its completion marker, atomically."""
    crops = np.concatenate([r.crops for r in results])
    table = pd.concat([r.table for r in results], ignore_index=True)
    counts = [len(r.table) for r in results]

    def per_cell(values) -> np.ndarray:  # one value per image -> one per cell
        return np.repeat(np.asarray(values), counts, axis=0)

    labels = per_cell([images[r.image_id][1] for r in results])
    columns = {
        "image_id": per_cell([r.image_id for r in results]).astype(object),
        "cell_id": table["cell_id"].to_numpy(),
        "fold": per_cell([images[r.image_id][0] for r in results]).astype(np.int32),
        **{name: table[name].to_numpy() for name in table.columns if name != "cell_id"},
        "image_labels": labels,
        "cell_labels": labels.astype(np.float32),
    }
    if results[0].truth_labels is not None:
        columns["truth_labels"] = np.concatenate([r.truth_labels for r in results])
    columns["shard"] = np.full(len(table), chunk, np.int32)
    columns["row"] = np.arange(len(table), dtype=np.int32)
    buffer = io.BytesIO()
    np.save(buffer, crops)
    _write_atomic(fs, _shard_path(path, chunk), buffer.getvalue())
    _write_atomic(fs, _chunk_path(path, chunk, "parquet"), _parquet_bytes(_arrow_table(columns)))
    status = {
        "images": [r.image_id for r in results],
        "skipped": {r.image_id: r.error for r in results if r.error is not None},
        "no_cells": [r.image_id for r in results if r.error is None and len(r.table) == 0],
        "n_cells": len(table),
    }
    _write_atomic(fs, _chunk_path(path, chunk, "json"), json.dumps(status, indent=2).encode())


def _assemble(fs, path: str, n_chunks: int) -> dict:
    """Concatenate the chunk tables into cells.parquet and the chunk statuses into report.json."""
    statuses = [json.loads(fs.cat_file(_chunk_path(path, i, "json"))) for i in range(n_chunks)]
    report = {
        "n_images": sum(len(s["images"]) for s in statuses),
        "n_cells": sum(s["n_cells"] for s in statuses),
        "chunks": n_chunks,
        "skipped": {k: v for s in statuses for k, v in s["skipped"].items()},
        "no_cells": [i for s in statuses for i in s["no_cells"]],
    }
    tables = [pq.read_table(io.BytesIO(fs.cat_file(_chunk_path(path, i, "parquet")))) for i in range(n_chunks)]
    _write_atomic(fs, f"{path}/report.json", json.dumps(report, indent=2).encode())
    # Written last: its presence marks the store complete.
    _write_atomic(fs, f"{path}/cells.parquet", _parquet_bytes(pa.concat_tables(tables)))
    return report


def _arrow_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Columns -> Arrow table; 2-D arrays become fixed-size list columns (one vector per cell)."""
    arrays = {}
    for name, values in columns.items():
        values = np.asarray(values)
        if values.ndim == 2:
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
        else:
            arrays[name] = pa.array(values, type=pa.string() if values.dtype == object else None)
    return pa.table(arrays)


def _vectors(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size list column -> (n, k) array, without a Python-level loop."""
    column = table.column(name).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def _parquet_bytes(table: pa.Table) -> bytes:
    """Serialise ``table`` as parquet; the same table always gives the same bytes."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(temporary, data)
    fs.mv(temporary, path)


class CellStore:
    """Read a cell store: the cell table, crops by row, label versions.

    Crop shards are opened lazily (memory-mapped for local stores, byte-range reads for remote
    ones) and the handles are not pickled, so each DataLoader worker opens its own.

    Parameters
    ----------
    uri : str
        Store directory or URI, as given to :func:`prepare`.
    """

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self._fs, self._path = fsspec.core.url_to_fs(self.uri)
        if not self._fs.exists(f"{self._path}/cells.parquet"):
            raise FileNotFoundError(f"{self.uri} is not a complete cell store (no cells.parquet); run prepare()")
        self.meta = json.loads(self._fs.cat_file(f"{self._path}/meta.json"))
        self._table: pa.Table | None = None
        self._cells: pd.DataFrame | None = None
        self._locations: tuple[np.ndarray, np.ndarray] | None = None
        self._shards: dict[int, object] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_table=None, _cells=None, _locations=None, _shards={})
        return state

    @property
    def size(self) -> int:
        """Crop side S."""
        return int(self.meta["size"])

    @property
    def table(self) -> pa.Table:
        """cells.parquet as an Arrow table (read once)."""
        if self._table is None:
            self._table = pq.read_table(f"{self._path}/cells.parquet", filesystem=self._fs)
        return self._table

    @property
    def cells(self) -> pd.DataFrame:
        """cells.parquet as a DataFrame; row i is the cell at store row index i."""
        if self._cells is None:
            self._cells = self.table.to_pandas()
        return self._cells

    def __len__(self) -> int:
        return self.table.num_rows

    def image_slice(self, image_id: str) -> slice:
        """Rows of one image's cells (contiguous); an empty slice if it has none."""
        ids = self.cells["image_id"].to_numpy()
        start, stop = np.searchsorted(ids, image_id, side="left"), np.searchsorted(ids, image_id, side="right")
        return slice(int(start), int(stop))

    def crops(self, rows) -> np.ndarray:
        """Crops (n, 4, S, S) of the cells at the given store rows, in that order."""
        if self._locations is None:
            self._locations = (self.table.column("shard").to_numpy(), self.table.column("row").to_numpy())
        rows = np.asarray(rows, dtype=np.int64)
        return self.read_crops(self._locations[0][rows], self._locations[1][rows])

    def read_crops(self, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Crops by (shard, row-in-shard) pairs, reading only those rows of each shard."""
        shards, rows = np.asarray(shards), np.asarray(rows)
        if len(shards) and (shards == shards[0]).all():  # one cell, or one image's bag
            return self._read_rows(int(shards[0]), rows)
        out = np.empty((len(rows), len(CHANNELS), self.size, self.size), dtype=self.meta["dtype"])
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            out[where] = self._read_rows(int(shard), rows[where])
        return out

    def _read_rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        if shard not in self._shards:
            self._shards[shard] = self._open(shard)
        handle = self._shards[shard]
        if isinstance(handle, np.ndarray):
            return handle[rows]
        offset, cell_shape = handle
        cell_bytes = int(np.prod(cell_shape)) * np.dtype(self.meta["dtype"]).itemsize
        starts = [offset + int(r) * cell_bytes for r in rows]
        path = _shard_path(self._path, shard)
        blobs = self._fs.cat_ranges([path] * len(rows), starts, [s + cell_bytes for s in starts])
        return np.frombuffer(b"".join(blobs), dtype=self.meta["dtype"]).reshape(len(rows), *cell_shape)

    def _open(self, shard: int):
        """A memmap for a local shard; for a remote one, the data offset and cell shape."""
        path = _shard_path(self._path, shard)
        if isinstance(self._fs, LocalFileSystem):
            # A plain array over the mapping: indexing an np.memmap wraps every result in memmap.
            return np.load(path, mmap_mode="r").view(np.ndarray)
        with self._fs.open(path, "rb") as file:
            fmt = np.lib.format
            version = fmt.read_magic(file)
            shape, _, _ = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(file)
            return file.tell(), shape[1:]

    def label_versions(self) -> list[str]:
        """Names accepted by :meth:`labels`: "weak", "truth" (if known), then written versions."""
        written = sorted(Path(p).stem for p in self._fs.glob(f"{self._path}/labels/*.parquet"))
        return ["weak", *(["truth"] if "truth_labels" in self.table.column_names else []), *written]

    def labels(self, version: str = "weak") -> np.ndarray:
        """(n_cells, 19) float32 cell labels of a version, in store row order.

        "weak": the image labels given to every cell of the image; "truth": the labels of the
        matched true cell (NaN where none matched); any other name: a version written by
        :meth:`write_labels`.
        """
        if version == "weak":
            return _vectors(self.table, "image_labels").astype(np.float32)
        if version == "truth":
            if "truth_labels" not in self.table.column_names:
                raise KeyError(f"{self.uri} has no truth labels (its dataset has no truth/)")
            return _vectors(self.table, "truth_labels").astype(np.float32)
        path = f"{self._path}/labels/{version}.parquet"
        if not self._fs.exists(path):
            raise KeyError(f"label version {version!r} not in {self.uri}; have {self.label_versions()}")
        table = pq.read_table(path, filesystem=self._fs)
        if not (table.column("image_id").equals(self.table.column("image_id"))
                and table.column("cell_id").equals(self.table.column("cell_id"))):
            raise ValueError(f"label version {version!r} does not list the store's cells in order")
        return np.stack([table.column(f"label_{k}").to_numpy() for k in range(NUM_CLASSES)], axis=1)

    def write_labels(self, version: str, labels: np.ndarray) -> None:
        """Save a cell-label version (e.g. relabelled soft labels) as ``labels/{version}.parquet``.

        Parameters
        ----------
        version : str
            Letters, digits, ``_``, ``-``, ``.``; not "weak" or "truth". Overwrites a version of
            the same name.
        labels : array of shape (n_cells, 19)
            In store row order.
        """
        if version in RESERVED_LABELS or not re.fullmatch(r"[\w.-]+", version):
            raise ValueError(f"invalid label version name {version!r}")
        labels = np.asarray(labels, dtype=np.float32)
        if labels.shape != (len(self), NUM_CLASSES):
            raise ValueError(f"labels must have shape {(len(self), NUM_CLASSES)}, got {labels.shape}")
        columns = {"image_id": self.table.column("image_id"), "cell_id": self.table.column("cell_id")}
        columns.update({f"label_{k}": labels[:, k] for k in range(NUM_CLASSES)})
        _write_atomic(self._fs, f"{self._path}/labels/{version}.parquet", _parquet_bytes(pa.table(columns)))
