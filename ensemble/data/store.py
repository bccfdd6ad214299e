"""Read a cell store: the cell table, crops by row without loading a shard, label versions.

Layout (a local directory or any fsspec URI: ``s3://``, ``gs://``, ``file://``; built by
:func:`ensemble.data.store_build.prepare`)::

    STORE/meta.json               cell_size S, dtype, channels, segmenter + settings, source
                                  fingerprint, version, n_folds, seed, chunk size
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
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import merge_offset_ranges

from ensemble.labels import CHANNELS, NUM_CLASSES
from ensemble.oof import LABEL_COLUMNS

STORE_VERSION = 1
RESERVED_LABELS = ("weak", "truth")
# Rows of a remote shard closer than this are read in one request, the rows between them
# included: an object-store request costs 20-40 ms before its first byte, about what one
# connection transfers in 4 MiB (S3 gives 100-200 MB/s per connection).
GAP_BYTES = 4 << 20
HEADER_BYTES = 4096  # a shard's .npy header (magic, version, shape) lies within its first bytes
# The shard cache leaves this share of its disk free: checkpoints, Ray's spill and logs share it.
CACHE_FREE_FRACTION = 0.1


def default_shard_cache() -> str:
    """The node-local folder of cached shards: ``$ENSEMBLE_SHARD_CACHE``, else ``{tmp}/ensemble-shards``."""
    return os.environ.get("ENSEMBLE_SHARD_CACHE") or str(Path(tempfile.gettempdir()) / "ensemble-shards")


def read_meta(data: bytes) -> dict:
    """meta.json of a store; stores written before the crop side was named ``cell_size`` say ``size``."""
    meta = json.loads(data)
    if "size" in meta:
        meta["cell_size"] = meta.pop("size")
    return meta


def chunk_path(path: str, chunk: int, kind: str) -> str:
    return f"{path}/chunks/chunk-{chunk:05d}.{kind}"


def shard_path(path: str, shard: int) -> str:
    return f"{path}/crops/shard-{shard:05d}.npy"


def vectors(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size list column -> (n, k) array, without a Python-level loop."""
    column = table.column(name).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise ``table`` as parquet; the same table always gives the same bytes."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(temporary, data)
    fs.mv(temporary, path)


def open_store(store: CellStore | str | Path) -> CellStore:
    """``store`` as it is when opened, else opened from its URI: a run's steps share one store."""
    return store if isinstance(store, CellStore) else CellStore(store)


class CellStore:
    """Read a cell store: the cell table, crops by row, label versions.

    Crop shards are opened lazily (memory-mapped for local stores, byte-range reads for remote
    ones) and the handles are not pickled, so each DataLoader worker opens its own.

    With ``shard_cache``, a remote store's shards are downloaded whole, once per node, into that
    local folder where its disk has room (``cache_free_fraction`` of it kept free), and read from
    there memory-mapped: a job then reads the bucket once, not once per epoch, and the jobs on a
    node share the copies. Shards never change once a store is built; the folder is named after
    the store's URI and its ``meta.json``, so a rebuilt store gets a folder of its own.

    Parameters
    ----------
    uri : str
        Store directory or URI, as given to :func:`prepare`.
    shard_cache : str, optional
        Local folder for a remote store's shards (e.g. :func:`default_shard_cache`); ignored for
        a local store.
    cache_free_fraction : float, default :data:`CACHE_FREE_FRACTION`
        Share of the cache's disk a download must leave free; a shard that does not fit is read
        from the bucket by ranges instead.
    """

    def __init__(self, uri: str | Path, shard_cache: str | Path | None = None,
                 cache_free_fraction: float = CACHE_FREE_FRACTION):
        if not 0 <= cache_free_fraction < 1:
            raise ValueError(f"cache_free_fraction must be in [0, 1), got {cache_free_fraction}")
        self.uri = str(uri)
        self._fs, self._path = fsspec.core.url_to_fs(self.uri)
        if not self._fs.exists(f"{self._path}/cells.parquet"):
            raise FileNotFoundError(f"{self.uri} is not a complete cell store (no cells.parquet); run prepare()")
        meta = self._fs.cat_file(f"{self._path}/meta.json")
        self.meta = read_meta(meta)
        self._cache: Path | None = None
        self._cache_free_fraction = cache_free_fraction
        if shard_cache is not None and not isinstance(self._fs, LocalFileSystem):
            self._cache = Path(shard_cache) / hashlib.sha1(self.uri.encode() + meta).hexdigest()[:16]
        self._table: pa.Table | None = None
        self._cells: pd.DataFrame | None = None
        self._locations: tuple[np.ndarray, np.ndarray] | None = None
        self._shards: dict[int, object] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_table=None, _cells=None, _locations=None, _shards={})
        return state

    @property
    def cell_size(self) -> int:
        """Crop side S."""
        return int(self.meta["cell_size"])

    @property
    def cell_bytes(self) -> int:
        """Bytes of one stored crop."""
        return len(CHANNELS) * self.cell_size**2 * np.dtype(self.meta["dtype"]).itemsize

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
        out = np.empty((len(rows), len(CHANNELS), self.cell_size, self.cell_size), dtype=self.meta["dtype"])
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
        size = self.cell_bytes
        # One request per run of nearby rows (GAP_BYTES), not one per row: a bag, a chunk of whole
        # images or a training window costs a few requests; cat_ranges sends them concurrently.
        wanted = np.unique(rows)
        path = shard_path(self._path, shard)
        _, starts, ends = merge_offset_ranges([path] * len(wanted), (offset + wanted * size).tolist(),
                                              (offset + (wanted + 1) * size).tolist(), max_gap=GAP_BYTES, sort=False)
        out = np.empty((len(rows), *cell_shape), dtype=self.meta["dtype"])
        for start, blob in zip(starts, self._fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise")):
            first = (start - offset) // size
            block = np.frombuffer(blob, dtype=out.dtype).reshape(-1, *cell_shape)
            inside = np.flatnonzero((rows >= first) & (rows < first + len(block)))
            out[inside] = block[rows[inside] - first]  # each byte copied once, from the response into place
        return out

    def _open(self, shard: int):
        """A memmap for a local (or cached) shard; for a remote one, the data offset and cell shape."""
        path = shard_path(self._path, shard)
        local = path if isinstance(self._fs, LocalFileSystem) else self._cached(shard)
        if local is not None:
            # A plain array over the mapping: indexing an np.memmap wraps every result in memmap.
            return np.load(local, mmap_mode="r").view(np.ndarray)
        # One small range, not fs.open: its read-ahead fetches a whole block (s3fs: 50 MiB).
        file = io.BytesIO(self._fs.cat_file(path, start=0, end=HEADER_BYTES))
        fmt = np.lib.format
        version = fmt.read_magic(file)
        shape, _, _ = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(file)
        return file.tell(), shape[1:]

    def _cached(self, shard: int) -> str | None:
        """The node-local copy of a remote shard, downloaded now if needed; None without a cache or room for it."""
        if self._cache is None:
            return None
        target = self._cache / f"shard-{shard:05d}.npy"
        if target.exists():
            return str(target)
        self._cache.mkdir(parents=True, exist_ok=True)
        with open(f"{target}.lock", "w") as lock:
            # One download per node: the node's other readers (loader workers, other jobs) wait
            # for it and then map the same file.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.exists():
                return str(target)
            remote = shard_path(self._path, shard)
            disk = shutil.disk_usage(self._cache)
            if disk.free - self._fs.size(remote) < self._cache_free_fraction * disk.total:
                return None
            temporary = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
            try:
                self._fs.get_file(remote, str(temporary))
                os.replace(temporary, target)
            finally:
                temporary.unlink(missing_ok=True)
        return str(target)

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
            return vectors(self.table, "image_labels").astype(np.float32)
        if version == "truth":
            if "truth_labels" not in self.table.column_names:
                raise KeyError(f"{self.uri} has no truth labels (its dataset has no truth/)")
            return vectors(self.table, "truth_labels").astype(np.float32)
        path = f"{self._path}/labels/{version}.parquet"
        if not self._fs.exists(path):
            raise KeyError(f"label version {version!r} not in {self.uri}; have {self.label_versions()}")
        table = pq.read_table(path, filesystem=self._fs)
        if not (table.column("image_id").equals(self.table.column("image_id"))
                and table.column("cell_id").equals(self.table.column("cell_id"))):
            raise ValueError(f"label version {version!r} does not list the store's cells in order")
        return np.stack([table.column(column).to_numpy() for column in LABEL_COLUMNS], axis=1)

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
        columns.update({column: labels[:, k] for k, column in enumerate(LABEL_COLUMNS)})
        write_atomic(self._fs, f"{self._path}/labels/{version}.parquet", parquet_bytes(pa.table(columns)))


def evaluation_labels(store: CellStore) -> tuple[np.ndarray, str]:
    """Labels to score cells against, in store row order, and their source.

    Cell truth where the store knows it (a segmented cell that matches no true cell has no class:
    its predictions are false positives); otherwise the image labels, with a warning.
    """
    if "truth" in store.label_versions():
        return np.nan_to_num(store.labels("truth"), nan=0.0), "truth"
    warnings.warn("the cell store has no cell truth: cells are scored against their image labels, which "
                  "over-label cells; read these mAPs as a rough guide", stacklevel=2)
    return store.labels("weak"), "image"
