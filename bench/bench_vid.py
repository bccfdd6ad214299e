"""VID on simulated cells: held-out accuracy and AUC of each module and of the combined weight.

Per difficulty: simulate images with cell truth, build the cell store, then run
``cross_validate_integrity`` (k folds grouped by image, stratified on good/bad; good = matched to a
true cell and at least half of it captured). Reported per score: accuracy at 0.5 and ROC AUC
against good/bad; for the capture CNN also its 4-class accuracy against the true captured fraction.
If ``bench/bench_relabel.py`` has left OOF tables in the same work directory, the cell mAP of each
with and without the held-out integrity weights is reported too (the paper's "+0.8 % mAP").

    python bench/bench_vid.py                                   # medium and hard, 150 images, 5 folds, ~8 min
    python bench/bench_vid.py --difficulties hard --images 60 --splits 3 --epochs 8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.sim.images import simulate
from ensemble.integrity import cross_validate_integrity, simulated_good
from ensemble.metrics import cell_map
from ensemble.storage import read_parquet
from ensemble.data.store import evaluation_labels
from ensemble.oof import CELL_COLUMNS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--difficulties", nargs="+", default=["medium", "hard"])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--size", type=int, default=384, help="image side (px)")
    parser.add_argument("--cell-size", type=int, default=48, help="crop side S of the store")
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--backbone", default="test_efficientnet")
    parser.add_argument("--epochs", type=int, default=8, help="of the capture CNN (IntegrityModel default: 15)")
    parser.add_argument("--cuts", type=int, default=2, help="border cuts per whole cell and epoch (default: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workdir", default="/tmp/ensemble-bench", help="simulated data and stores are cached here")
    return parser.parse_args()


def simulated_store(workdir: str, difficulty: str, n_images: int, size: int, cell_size: int, n_folds: int = 3) -> str:
    """A cell store of simulated images, made once per setting and reused (also by bench_relabel)."""
    import ray

    base = Path(workdir) / f"{difficulty}-{n_images}x{size}"
    if not (base / "data" / "train.csv").exists():
        simulate(base / "data", n_images=n_images, seed=7, size=size, difficulty=difficulty)
    store = base / f"store-{cell_size}-f{n_folds}"
    if not (store / "cells.parquet").exists():
        started = not ray.is_initialized()
        if started:
            ray.init(address="local", num_cpus=2, log_to_driver=False)
        prepare(str(base / "data"), str(store), cell_size=cell_size, n_folds=n_folds, progress=False)
        if started:
            ray.shutdown()
    return str(store)


def markdown(rows: list[dict]) -> str:
    """A markdown table of dicts with the same keys (floats to 4 significant digits)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"


def weighted_maps(store: CellStore, weights: pd.DataFrame) -> list[dict]:
    """Cell mAP of each OOF table left by bench_relabel, without and with the held-out weights."""
    labels, _ = evaluation_labels(store)
    keys = pd.MultiIndex.from_frame(store.cells[["image_id", "cell_id"]])
    w = weights.set_index(["image_id", "cell_id"]).reindex(keys)
    rows = []
    for path in sorted(Path(f"{store.uri}-work").glob("*/labels-*/oof/*.parquet")):
        table = read_parquet(str(path))
        at = pd.MultiIndex.from_frame(table[["image_id", "cell_id"]]).get_indexer(keys)
        scores = table[CELL_COLUMNS].to_numpy()[at]
        # Cells without a good/bad label (none on the simulator) keep their scores.
        row = {"oof": f"{path.parts[-4]}/{path.parts[-3]}/{path.stem}", "map": cell_map(labels, scores).map}
        for rule in ("product", "expected"):
            row[f"map_{rule}"] = cell_map(labels, scores * w[f"w_{rule}"].fillna(1).to_numpy()[:, None]).map
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"`{' '.join([Path(sys.executable).name, *sys.argv])}`  \nmachine: {machine()}\n")
    results, map_rows = [], []
    for difficulty in args.difficulties:
        uri = simulated_store(args.workdir, difficulty, args.images, args.size, args.cell_size)
        store = CellStore(uri)
        started, cpu = time.perf_counter(), time.process_time()
        cv = cross_validate_integrity(store, n_splits=args.splits, backbone=args.backbone, epochs=args.epochs,
                                      cuts_per_cell=args.cuts)
        row = {"difficulty": difficulty, "cells": len(store), "bad": f"{1 - simulated_good(store.cells).mean():.1%}"}
        for score, values in cv.scores.iterrows():
            row[f"{score} acc"], row[f"{score} AUC"] = float(values["accuracy"]), float(values["auc"])
        row["capture 4-class acc"] = cv.capture_accuracy
        row["wall s"], row["cpu s"] = round(time.perf_counter() - started), round(time.process_time() - cpu)
        results.append(row)
        map_rows += [{"difficulty": difficulty, **r} for r in weighted_maps(store, cv.cells)]
    print(f"{args.images} images of {args.size} px per difficulty, crops {args.cell_size} px, {args.splits}-fold CV "
          f"grouped by image; capture CNN {args.backbone}, {args.epochs} epochs x {args.cuts} cuts per whole cell. "
          "xgb = P_xgb(good); "
          "cnn = P(captured >= 50 %); product = xgb * cnn; expected = xgb * E[captured] / 0.9\n")
    print(markdown(results))
    if map_rows:
        print("\nOOF cell mAP (vs cell truth) without and with held-out integrity weights:\n")
        print(markdown(map_rows))


if __name__ == "__main__":
    main()
