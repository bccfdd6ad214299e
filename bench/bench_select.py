"""Benchmark of ensemble selection: time and peak memory on a large synthetic OOF set.

Each measurement runs in a fresh subprocess that first generates the OOF (float32, chunked) and
notes its resident memory, then runs one step and reports wall and CPU time and ``ru_maxrss``
(the process's peak RSS; tracemalloc misses numpy's buffers). ``extra`` = peak - RSS after
generation, an upper bound on what the step itself added (the peak may date from the
generation). On a shared machine wall time depends on the load, printed beside it; CPU time
(all threads) much less.

``served`` is the default ``ensemble select`` on a trained zoo's OOF directory: ``nested`` after
reading the jobs' validation tables (written by the child before it is timed: the rows a 5-fold
job with ``val_fraction`` 0.125 predicts, half the OOF's cells) and replacing the cell streams by
their served form in place (:mod:`ensemble.selectors.served`).

    python bench/bench_select.py                          # 50 models x 1.2M cells x 19 classes
    python bench/bench_select.py --steps nested,served    # the default path, without and with the served form
    python bench/bench_select.py --models 12 --cells 60000 --steps select,greedy,nested
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

STEPS = ("correlation", "select", "greedy", "nested", "served")
DESCRIPTIONS = {
    "correlation": "streamed correlation matrix only",
    "select": "select_ensemble(nested=False, greedy=False)",
    "greedy": "greedy baseline alone (GreedyParams defaults, sampled rows)",
    "nested": "select_ensemble(nested=True, greedy=True): everything, refitted per fold",
    "served": "nested, on the served form: validation tables read, cell streams replaced in place",
}
VALIDATION_SHARE = 0.5  # validation rows per model / OOF cells: val_fraction 0.125 x (5 - 1) training folds
FAMILIES = [("effnet", "dsa"), ("nfnet", "dsa"), ("effnetb4", "cla"), ("swin", "cla"), ("resnet200d", "cla"),
            ("resnet50d", "cla"), ("densenet", "cla"), ("regnet", "cla"), ("convnext", "cla"), ("scatter", "clh")]


def families_for(n_models: int) -> dict[str, tuple[str, int]]:
    """About five models per family (at least two families); the first two families are DSA."""
    n_families = max(2, min(len(FAMILIES), math.ceil(n_models / 5)))
    sizes = np.diff(np.linspace(0, n_models, n_families + 1).round().astype(int))
    return {name: (head, int(size)) for (name, head), size in zip(FAMILIES, sizes, strict=False) if size > 0}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def write_validation(oof, folder: str, seed: int = 0) -> None:
    """Per model, a second network's predictions of a share of the images: the OOF's, plus noise."""
    import pandas as pd

    from ensemble.oof import CELL_COLUMNS

    rng = np.random.default_rng(seed)
    image_ids = oof.index["image_id"].to_numpy()
    images = np.unique(image_ids)
    rows = np.flatnonzero(np.isin(image_ids, rng.choice(images, int(VALIDATION_SHARE * len(images)), replace=False)))
    keys = oof.index.iloc[rows][["image_id", "cell_id"]].reset_index(drop=True)
    network = (oof.index["fold"].to_numpy()[rows] + 1) % oof.index["fold"].nunique()
    os.makedirs(f"{folder}/validation")
    for name in oof.models:
        values = oof.cell[name][:, rows].T + 0.04 * rng.standard_normal((len(rows), len(CELL_COLUMNS)), np.float32)
        table = keys.assign(network=network).join(pd.DataFrame(np.clip(values, 0, 1), columns=CELL_COLUMNS))
        table.to_parquet(f"{folder}/validation/{name}.parquet")


def child(step: str, n_models: int, n_cells: int, n_folds: int, n_jobs: int) -> dict:
    from ensemble.sim.oof import make_synthetic_oof
    from ensemble.selectors import (
        GreedyParams,
        Objective,
        correlation_matrix,
        greedy_selection,
        select_ensemble,
    )
    from ensemble.selectors.served import as_served, load_validation_dir

    cells_per_image = 30
    start = time.perf_counter()
    synthetic = make_synthetic_oof(n_cells // cells_per_image, cells_per_image, n_folds, families_for(n_models), seed=0)
    oof, labels = synthetic.oof, synthetic.labels
    oof_bytes, cell_bytes = oof.nbytes, sum(a.nbytes for a in oof.cell.values())
    oof_dir = tempfile.TemporaryDirectory()
    if step == "served":
        write_validation(oof, oof_dir.name)
    generated = time.perf_counter() - start
    baseline = current_rss()
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    if step == "correlation":
        correlation_matrix(oof)
        result = {}
    elif step == "greedy":
        params = GreedyParams()
        size = min(params.sample_rows, oof.n_cells)
        rows = np.sort(np.random.default_rng(0).choice(oof.n_cells, size=size, replace=False))
        truth = labels[[f"label_{k}" for k in range(19)]].to_numpy(dtype=bool)[rows].T
        predictions = np.stack([oof.cell[m][:, rows] for m in oof.models])
        objective = Objective.build("competition", truth, oof.index["image_id"].to_numpy()[rows])
        greedy = greedy_selection(predictions, objective, oof.models, params, n_jobs=n_jobs)
        result = {"greedy_steps": [len(h) - 1 for h in greedy.history], "greedy_models": len(greedy.weights)}
    else:
        if step == "served":
            oof, _ = as_served(oof, load_validation_dir(oof_dir.name, oof.models), copy=False)
        nested = step != "select"
        spec = select_ensemble(oof, labels, nested=nested, greedy=nested, n_jobs=n_jobs)
        result = {"blocks": len(spec.blocks), "members": sorted(spec.members.values()),
                  "map": {m: [round(s.in_sample, 4), None if s.nested_pooled is None else round(s.nested_pooled, 4)]
                          for m, s in spec.scores.items()}}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    oof_dir.cleanup()
    return {"step": step, "seconds": seconds, "cpu_seconds": cpu_seconds, "load": [load_before, os.getloadavg()[0]],
            "generate_seconds": generated, "oof_bytes": oof_bytes, "cell_bytes": cell_bytes,
            "baseline_rss": baseline, "peak_rss": peak, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--cells", type=int, default=1_200_000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--n-jobs", type=int, default=-1, help="threads for scoring (-1: all cores)")
    parser.add_argument("--steps", default="correlation,select,greedy", help=f"comma-separated subset of {STEPS}")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.models, args.cells, args.folds, args.n_jobs)))
        return

    gib = 1024**3
    print(f"{args.models} models x {args.cells:,} cells x 19 classes, {args.folds} folds, "
          f"families {families_for(args.models)}")
    for step in args.steps.split(","):
        command = [sys.executable, __file__, "--child", step, "--models", str(args.models), "--cells", str(args.cells),
                   "--folds", str(args.folds), "--n-jobs", str(args.n_jobs)]
        finished = subprocess.run(command, check=True, capture_output=True, text=True)
        out = json.loads(finished.stdout.strip().splitlines()[-1])
        extra = out["peak_rss"] - out["baseline_rss"]
        print(f"\n[{step}] {DESCRIPTIONS[step]}")
        print(f"  time {out['seconds']:.1f} s wall, {out['cpu_seconds']:.1f} s CPU (all threads); machine load "
              f"{out['load'][0]:.1f} -> {out['load'][1]:.1f} on {os.cpu_count()} cores; "
              f"generating the OOF (and validation tables) took {out['generate_seconds']:.1f} s, not counted")
        print(f"  OOF arrays {out['oof_bytes'] / gib:.2f} GiB (cell streams {out['cell_bytes'] / gib:.2f} GiB); "
              f"RSS after generation {out['baseline_rss'] / gib:.2f} GiB; peak RSS {out['peak_rss'] / gib:.2f} GiB")
        print(f"  extra peak memory {extra / gib:.2f} GiB = {extra / out['oof_bytes']:.2f} x OOF; "
              f"total peak = {out['peak_rss'] / out['oof_bytes']:.2f} x OOF")
        for key in ("blocks", "members", "map", "greedy_steps", "greedy_models"):
            if key in out:
                print(f"  {key}: {out[key]}")


if __name__ == "__main__":
    main()
