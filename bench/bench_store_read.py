"""Benchmark reading random cells from the cell store against decoding the same crops from PNGs.

Builds a store of 64 px crops from a simulated dataset (cached under ``--workdir``), writes every
crop again as PNG files, once as one 4-channel PNG per cell and once as four grayscale PNGs per
cell (the Kaggle layout), then reads the same random cells each way:

- ``CellStore.crops`` on batches of 64 random rows (memory-mapped shards), as a batch sampler would;
- ``CellStore.crops`` one row per call, as a map-style dataset's ``__getitem__`` does;
- ``CellDataset[i]``: the same plus the conversion to a float tensor;
- ``cv2.imread`` of the cell's one 4-channel PNG, and of its four grayscale PNGs.

Files are in the page cache for every reader (all were just written). Each figure is the best of
``--repeats`` passes, the readers taking turns. Prints a markdown table.

    python bench/bench_store_read.py [--images 30] [--cells 3000] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import ray

from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.data.datasets import CellDataset
from ensemble.sim.images import simulate

BATCH = 64


def build_store(workdir: Path, n_images: int) -> CellStore:
    root, store = workdir / f"sim-{n_images}", workdir / f"store-{n_images}"
    if not (root / "train.csv").exists():
        simulate(root, n_images, seed=7, size=512)
    ray.init(include_dashboard=False, log_to_driver=False)
    prepare(root, str(store), cell_size=64, progress=False)
    ray.shutdown()
    return CellStore(store)


def write_pngs(store: CellStore, folder: Path) -> None:
    """Every crop as ``{row}.png`` (4 channels) and ``{row}_{c}.png`` (one channel each)."""
    folder.mkdir(parents=True, exist_ok=True)
    crops = store.crops(np.arange(len(store)))
    for row, crop in enumerate(crops):
        cv2.imwrite(str(folder / f"{row}.png"), np.ascontiguousarray(crop.transpose(1, 2, 0)))
        for c, channel in enumerate(crop):
            cv2.imwrite(str(folder / f"{row}_{c}.png"), channel)


def cells_per_second(readers: dict[str, Callable[[np.ndarray], object]], rows: np.ndarray, repeats: int) -> dict:
    """Best-of-``repeats`` cells/s of each reader over ``rows``, readers taking turns."""
    best = dict.fromkeys(readers, float("inf"))
    for _ in range(repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            read(rows)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(rows) / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--cells", type=int, default=3000, help="random cells read per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ensemble-bench-store-read")
    args = parser.parse_args()

    store = build_store(args.workdir, args.images)
    pngs = args.workdir / f"png-{args.images}"
    write_pngs(store, pngs)
    dataset = CellDataset(store)
    rows = np.random.default_rng(0).integers(0, len(store), args.cells)

    def store_batches(rows):
        for i in range(0, len(rows), BATCH):
            store.crops(rows[i : i + BATCH])

    readers = {
        f"CellStore.crops, batches of {BATCH}": store_batches,
        "CellStore.crops, one cell per call": lambda rows: [store.crops(rows[i : i + 1]) for i in range(len(rows))],
        "CellDataset[i] (float tensor)": lambda rows: [dataset[int(r)] for r in rows],
        "PNG, one 4-channel file per cell": lambda rows: [
            cv2.imread(str(pngs / f"{r}.png"), cv2.IMREAD_UNCHANGED) for r in rows
        ],
        "PNG, four 1-channel files per cell": lambda rows: [
            np.stack([cv2.imread(str(pngs / f"{r}_{c}.png"), cv2.IMREAD_UNCHANGED) for c in range(4)]) for r in rows
        ],
    }
    rates = cells_per_second(readers, rows, args.repeats)
    baseline = rates["PNG, one 4-channel file per cell"]
    print(f"{len(store)} cells of 4 x 64 x 64 uint8, {args.cells} random cells per pass\n")
    print("| reader | cells/s | x 4-channel PNG |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.1f} |")


if __name__ == "__main__":
    main()
