"""The cell store: contents, bad images, folds, resuming after a real kill, URIs, label versions."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from ensemble.data import hpa
from ensemble.data.crops import process_image
from ensemble.data.store import CellStore
from ensemble.data.store_build import StoreMismatchError, prepare
from ensemble.data.folds import assign_folds
from ensemble.data.segment import create_segmenter
from ensemble.sim.images import simulate
from ensemble.labels import CHANNELS

SETTINGS = dict(cell_size=24, n_folds=3, seed=0, chunk_size=2, progress=False)


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """10 simulated images, plus one truncated, one missing a channel and one blank."""
    root = tmp_path_factory.mktemp("data")
    simulate(root, 10, seed=5, size=256)
    for image_id in ("bad-truncated", "bad-missing", "blank"):
        for channel in CHANNELS:
            Image.fromarray(np.zeros((256, 256), np.uint8)).save(root / "train" / f"{image_id}_{channel}.png")
    red = root / "train" / "bad-truncated_red.png"
    red.write_bytes(red.read_bytes()[:40])
    (root / "train" / "bad-missing_yellow.png").unlink()
    with open(root / "train.csv", "a") as csv:
        csv.write("bad-truncated,0\nbad-missing,3\nblank,16\n")
    return root


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory) -> str:
    """A store built in one go, through a file:// URI (the code path of remote stores)."""
    uri = f"file://{tmp_path_factory.mktemp('stores') / 'one-go'}"
    prepare(dataset, uri, max_workers=2, **SETTINGS)
    return uri


def test_store_layout_and_contents(store, dataset):
    cells = CellStore(store)
    meta = cells.meta
    assert meta["cell_size"] == 24 and meta["dtype"] == "uint8" and meta["channels"] == list(CHANNELS)
    assert meta["segmenter"]["name"] == "classical" and "nucleus_diameter" in meta["segmenter"]["settings"]
    table = cells.cells
    index = hpa.read_index(dataset).sort_values("ID")
    good = sorted(set(index["ID"]) - {"bad-truncated", "bad-missing", "blank"})
    assert sorted(table["image_id"].unique()) == good
    # Cells of an image are contiguous and in image id order; rows point into the shards.
    assert list(table["image_id"]) == sorted(table["image_id"])
    assert list(cells.crops(np.arange(len(table))).shape) == [len(table), 4, 24, 24]
    image_id = good[3]
    part = table.iloc[cells.image_slice(image_id)]
    assert (part["image_id"] == image_id).all() and len(part) == (table["image_id"] == image_id).sum()
    # The weak labels are the image labels; truth comes from the simulator's cells.
    expected = hpa.label_matrix(index.set_index("ID").loc[[image_id], "labels"])[0]
    np.testing.assert_array_equal(cells.labels("weak")[cells.image_slice(image_id)], np.tile(expected, (len(part), 1)))
    truth = cells.labels("truth")
    # Cells cut by the border are left out of the simulator's truth: their segmented cells have none.
    matched = np.isfinite(truth).all(axis=1)
    assert matched.mean() > 0.6
    assert table["touches_border"].to_numpy()[~matched].mean() > table["touches_border"].to_numpy()[matched].mean()
    assert {"truth_iou", "truth_captured", "touches_border", "perimeter", "intensity_flag"} <= set(table.columns)
    # A crop is its cell only: pixels outside the crop's own mask are zero, inside mostly not.
    crops = cells.crops(np.arange(len(table)))
    assert crops.reshape(len(crops), -1).max(axis=1).min() > 0
    assert (crops[:, :, 0, 0] == 0).mean() > 0.5  # corners are padding or neighbours: mostly zero


def test_folds_are_per_image_and_stratified(store, dataset):
    table = CellStore(store).cells
    assert (table.groupby("image_id")["fold"].nunique() == 1).all()
    index = hpa.read_index(dataset).sort_values("ID", ignore_index=True)
    folds = dict(zip(index["ID"], assign_folds(hpa.label_matrix(index["labels"]), 3, 0)))
    assert all(folds[i] == f for i, f in table.groupby("image_id")["fold"].first().items())


def test_bad_images_are_skipped_and_reported_and_blank_recorded(store):
    fs, path = fsspec.core.url_to_fs(store)
    report = json.loads(fs.cat_file(f"{path}/report.json"))
    assert set(report["skipped"]) == {"bad-truncated", "bad-missing"}
    assert "bad-truncated_red.png" in report["skipped"]["bad-truncated"]
    assert "bad-missing_yellow.png" in report["skipped"]["bad-missing"]
    assert report["no_cells"] == ["blank"]


def test_rerun_on_a_finished_store_builds_nothing(store, dataset):
    report = prepare(dataset, store, **SETTINGS)
    assert report.chunks_built == 0 and report.chunks_reused > 0
    with pytest.raises(StoreMismatchError, match="cell_size"):
        prepare(dataset, store, **{**SETTINGS, "cell_size": 32})


def test_store_written_before_cell_size_had_its_name_still_loads(store, dataset, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(store.removeprefix("file://"), old)
    meta = json.loads((old / "meta.json").read_text())
    meta["size"] = meta.pop("cell_size")  # the meta.json of stores written before the rename
    (old / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    assert CellStore(old).cell_size == 24 and CellStore(old).crops([0]).shape == (1, 4, 24, 24)
    assert prepare(dataset, str(old), **SETTINGS).chunks_built == 0, "an old store is reused, not rebuilt"


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_bytes(store, dataset, tmp_path):
    resumed = tmp_path / "resumed"
    # The child starts its own local Ray: left to find "the existing cluster" it may pick up a
    # stale address from an earlier Ray on this machine and wait minutes for a GCS that is gone.
    script = textwrap.dedent(f"""
        import ray
        from ensemble.data.store_build import prepare
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        prepare({str(dataset)!r}, {str(resumed)!r}, max_workers=1, **{SETTINGS!r})
    """)
    # Its own session (process group), so the kill takes the driver and the Ray it started.
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    marker = resumed / "chunks" / "chunk-00000.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert marker.exists() and not (resumed / "cells.parquet").exists()

    report = prepare(dataset, str(resumed), max_workers=2, **SETTINGS)
    assert report.chunks_reused >= 1 and report.chunks_built >= 1
    one_go = Path(fsspec.core.url_to_fs(store)[1])
    for name in ["cells.parquet", "report.json", "meta.json", *sorted(os.listdir(one_go / "crops"))]:
        path = name if not name.startswith("shard") else f"crops/{name}"
        assert (resumed / path).read_bytes() == (one_go / path).read_bytes(), path
    assert sorted(os.listdir(resumed / "crops")) == sorted(os.listdir(one_go / "crops"))


def test_remote_store_reads_by_byte_range(store):
    local = CellStore(store)
    memory = fsspec.filesystem("memory")
    memory.put(fsspec.core.url_to_fs(store)[1], "/remote-store", recursive=True)
    remote = CellStore("memory://remote-store")
    rows = np.array([7, 0, len(local) - 1, 3])
    np.testing.assert_array_equal(remote.crops(rows), local.crops(rows))


def test_label_versions(store, tmp_path):
    cells = CellStore(store)
    soft = np.random.default_rng(0).random((len(cells), 19)).astype(np.float32)
    cells.write_labels("relabel-1", soft)
    np.testing.assert_array_equal(CellStore(store).labels("relabel-1"), soft)
    assert cells.label_versions() == ["weak", "truth", "relabel-1"]
    with pytest.raises(ValueError):
        cells.write_labels("weak", soft)
    with pytest.raises(ValueError):
        cells.write_labels("short", soft[:3])
    with pytest.raises(KeyError):
        cells.labels("missing")


def test_given_masks_are_used_as_they_are(tmp_path):
    simulate(tmp_path, 1, seed=2, size=128)
    image_id = hpa.read_index(tmp_path)["ID"][0]
    given = np.zeros((128, 128), np.uint16)
    given[10:60, 10:60], given[70:120, 20:100] = 7, 300
    (tmp_path / "masks").mkdir()
    Image.fromarray(given).save(tmp_path / "masks" / f"{image_id}.png")
    cells = process_image(tmp_path, image_id, create_segmenter(), cell_size=16)
    assert list(cells.table["cell_id"]) == [7, 300] and list(cells.table["area"]) == [2500, 4000]
    assert cells.crops.shape == (2, 4, 16, 16)
