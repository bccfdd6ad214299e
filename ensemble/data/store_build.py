"""Build the cell store of a dataset with a Ray Data pipeline: segment, cut, write in chunks.

:func:`prepare` builds a store (layout: :mod:`ensemble.data.store`) from a dataset in the Kaggle
layout; :class:`~ensemble.data.store.CellStore` reads it. Images are processed in fixed chunks of sorted image ids; chunk i becomes shard i. Each chunk is
written atomically (temporary name, then rename) and marked complete last, so an interrupted
build resumes with the unfinished chunks and ends byte-for-byte equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm.auto import tqdm

from ensemble.cluster import cluster_shape, connect
from ensemble.data import hpa
from ensemble.data.crops import CROP_DTYPE, ImageCells, process_image
from ensemble.data.features import FeatureSettings
from ensemble.data.segment import create_segmenter
from ensemble.data.store import STORE_VERSION, chunk_path, parquet_bytes, read_meta, shard_path, write_atomic
from ensemble.labels import CHANNELS
from ensemble.storage import exists, join, list_files, name, read_bytes


class StoreMismatchError(ValueError):
    """A finished store exists at the path but was built from other data or with other settings."""


class EmptyStoreError(ValueError):
    """The dataset gives no cell: no images, every image skipped, or no cell found in any."""


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


class _CellExtractor:
    """Ray Data worker: holds one segmenter and turns a batch of image ids into ImageCells."""

    def __init__(self, root, split, cell_size, segmenter, segmenter_settings, features, with_truth):
        self.root, self.split, self.cell_size, self.features = root, split, cell_size, features
        self.segmenter = create_segmenter(segmenter, **segmenter_settings)
        self.truth = hpa.read_truth(root) if with_truth else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [
            process_image(self.root, str(image_id), self.segmenter, self.cell_size, self.split, self.truth, self.features)
            for image_id in batch["image_id"]
        ]
        # An object column travels through Ray Data pickled; ImageCells keeps the per-image
        # variable-length tables and crops together without a ragged-tensor schema.
        return {"image_id": batch["image_id"], "result": np.array(results, dtype=object)}


def source_fingerprint(root: str | Path, split: str = "train") -> str:
    """Hash of the split's CSV and of the names and sizes of its image, mask and truth files.

    Names and sizes rather than modification times, so a copied dataset (to a bucket, say) keeps
    its fingerprint.
    """
    digest = hashlib.sha256()
    csv = join(root, f"{split}.csv")
    digest.update(read_bytes(csv) if exists(csv) else b"")
    for folder in (split, "masks", "truth", "truth/masks"):
        for entry, size in sorted(list_files(join(root, folder)).items()):
            digest.update(f"{name(folder)}/{entry}:{size}\n".encode())
    return digest.hexdigest()


def prepare(
    data_root: str | Path,
    store: str | Path,
    cell_size: int = 64,
    n_folds: int = 5,
    seed: int = 0,
    segmenter: str = "classical",
    segmenter_settings: dict | None = None,
    max_workers: int | None = None,
    min_workers: int = 1,
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
    cell_size : int
        Crop side S in pixels.
    n_folds, seed : int
        Folds over images, stratified on the image labels (in sorted image id order).
    segmenter : {"classical", "hpacellseg"}
    segmenter_settings : dict, optional
        Keyword arguments of :func:`~ensemble.data.segment.create_segmenter`.
    max_workers, min_workers : int
        Ray actors segmenting images: an autoscaling pool between the two (default maximum: the
        most CPUs the cluster can hold, :func:`ensemble.cluster.cluster_shape`). Equal values
        give a fixed pool.
    split : str
        Image sub-directory and CSV name.
    progress : bool
        Show a progress bar (images/s, cells/s).
    chunk_size : int
        Images per chunk (and per crop shard); part of the store's identity.
    features : FeatureSettings, optional
    force : bool
        Replace a finished store built from other data or with other settings at ``store``
        instead of raising. An unfinished one (an interrupted or failed build) is always
        replaced: nothing in it was ever read.

    Returns
    -------
    PrepareReport

    Raises
    ------
    StoreMismatchError
        ``store`` holds a finished store of other data or settings and ``force`` is False.
    EmptyStoreError
        The split lists no image, every image was skipped, or no cell was found in any; the
        store is then left unfinished (no ``cells.parquet``), so a re-run with fixed data
        replaces it.
    """
    start = time.perf_counter()
    features = features or FeatureSettings()
    segmenter_settings = dict(segmenter_settings or {})
    fs, path = fsspec.core.url_to_fs(str(store))
    index = hpa.read_index(data_root, split).sort_values("ID", ignore_index=True)
    if index.empty:
        listed = join(data_root, f"{split}.csv")
        raise EmptyStoreError(f"{listed} lists no images" if exists(listed) else
                              f"{join(data_root, split)} holds no images ({{ID}}_{CHANNELS[0]}.png, ...)")
    image_labels = hpa.label_matrix(index["labels"]).astype(np.int8)
    with_truth = hpa.read_truth(data_root) is not None
    meta = {
        "version": STORE_VERSION,
        "cell_size": cell_size,
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
    write_atomic(fs, f"{path}/meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())

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
            extractor_kwargs=dict(root=str(data_root), split=split, cell_size=cell_size, segmenter=segmenter,
                                  segmenter_settings=segmenter_settings, features=features, with_truth=with_truth),
            pool=(min_workers, max_workers), progress=progress,
        )
    report = _assemble(fs, path, len(chunks), str(data_root))
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
    """True if ``path`` holds a store with the same meta (finished or to resume); False if there is none.

    An unfinished store of other settings (a build that failed on bad data, say, now fixed) is
    removed; a finished one only with ``force``.
    """
    if not fs.exists(f"{path}/meta.json"):
        return False
    existing = read_meta(fs.cat_file(f"{path}/meta.json"))
    if existing == meta:
        return True
    finished = fs.exists(f"{path}/cells.parquet")
    if force or not finished:
        fs.rm(path, recursive=True)
        return False
    differ = sorted(key for key in meta.keys() | existing.keys() if meta.get(key) != existing.get(key))
    raise StoreMismatchError(
        f"{path} holds a finished cell store built from other data or with other settings (differing: {differ}); "
        "choose another store path, or replace it with --force (prepare(force=True))"
    )


def _build_chunks(fs, path, chunks, pending, images, extractor_kwargs, pool, progress) -> float:
    """Run the Ray Data pipeline over the images of the pending chunks, writing each chunk.

    Returns the seconds until the first image came back.
    """
    start = time.perf_counter()
    connect()  # only now: a store that is finished, or a dataset without images, needs no Ray
    smallest, largest = pool
    largest = largest or max(smallest, int(cluster_shape().most("CPU")))
    chunk_of = {image_id: i for i in pending for image_id in chunks[i]}
    # One block per image so idle actors pick up single images and the driver sees each result.
    dataset = ray.data.from_items([{"image_id": image_id} for image_id in chunk_of], override_num_blocks=len(chunk_of))
    dataset = dataset.map_batches(
        _CellExtractor,
        fn_constructor_kwargs=extractor_kwargs,
        # An autoscaling pool: idle actors go, and on an autoscaling cluster the actors waiting
        # for a CPU are the demand that adds nodes.
        compute=ray.data.ActorPoolStrategy(min_size=smallest, max_size=largest),
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
    write_atomic(fs, shard_path(path, chunk), buffer.getvalue())
    write_atomic(fs, chunk_path(path, chunk, "parquet"), parquet_bytes(_arrow_table(columns)))
    status = {
        "images": [r.image_id for r in results],
        "skipped": {r.image_id: r.error for r in results if r.error is not None},
        "no_cells": [r.image_id for r in results if r.error is None and len(r.table) == 0],
        "n_cells": len(table),
    }
    write_atomic(fs, chunk_path(path, chunk, "json"), json.dumps(status, indent=2).encode())


def _assemble(fs, path: str, n_chunks: int, source: str) -> dict:
    """Concatenate the chunk tables into cells.parquet and the chunk statuses into report.json.

    Raises EmptyStoreError, before writing either, when no image gave a cell.
    """
    statuses = [json.loads(fs.cat_file(chunk_path(path, i, "json"))) for i in range(n_chunks)]
    report = {
        "n_images": sum(len(s["images"]) for s in statuses),
        "n_cells": sum(s["n_cells"] for s in statuses),
        "chunks": n_chunks,
        "skipped": {k: v for s in statuses for k, v in s["skipped"].items()},
        "no_cells": [i for s in statuses for i in s["no_cells"]],
    }
    if report["n_cells"] == 0:
        skipped = report["skipped"]
        shown = "; ".join(f"{image}: {reason}" for image, reason in list(skipped.items())[:3])
        if len(skipped) == report["n_images"]:
            raise EmptyStoreError(f"every one of the {len(skipped)} images of {source} was skipped, so there is no "
                                  f"cell to store ({shown}{'; ...' if len(skipped) > 3 else ''})")
        raise EmptyStoreError(f"no cell found in any of the {report['n_images'] - len(skipped)} readable images of "
                              f"{source} ({len(skipped)} skipped): check that the blue channel holds the nuclei, "
                              "or give masks/ or another --segmenter")
    tables = [pq.read_table(io.BytesIO(fs.cat_file(chunk_path(path, i, "parquet")))) for i in range(n_chunks)]
    write_atomic(fs, f"{path}/report.json", json.dumps(report, indent=2).encode())
    # Written last: its presence marks the store complete.
    write_atomic(fs, f"{path}/cells.parquet", parquet_bytes(pa.concat_tables(tables)))
    return report


def _arrow_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Columns -> Arrow table; 2-D arrays become fixed-size list columns (one vector per cell)."""
    arrays = {}
    for column, values in columns.items():
        values = np.asarray(values)
        if values.ndim == 2:
            arrays[column] = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
        else:
            arrays[column] = pa.array(values, type=pa.string() if values.dtype == object else None)
    return pa.table(arrays)
