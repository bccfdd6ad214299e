"""Seconds from a command to its error, for each kind of bad input, through the installed CLI.

Writes every bad input into a temporary directory (a small simulated dataset, broken zoos and
search spaces, a store, OOF tables that miss cells, a SQLite database held locked by another
process), then runs ``.venv/bin/ensemble ...`` on each, one at a time, and times it from start
to exit, as ``time`` would. The baseline row is ``ensemble --help``: the CLI's own start, paid by
every command. Prints a markdown table: the input, the seconds, the exit status and the message
(the CLI's last line on stderr).

    python bench/bench_errors.py [--lock-wait 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENSEMBLE = str(Path(sys.executable).parent / "ensemble")
# The commands' environment, taken before MLflow's set_tracking_uri (which sets MLFLOW_TRACKING_URI
# in this process) can leak the inputs' registry into them.
ENVIRONMENT = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

BAD_ZOOS = {
    "typo.yaml": "cell_size: 32\nmodels:\n  - {name: cla_a, head: cla, backbone: resnet50dd}\n",
    "headarg.yaml": "cell_size: 32\nmodels:\n  - {name: cla_a, head: cla, backbone: test_resnet, "
                    "head_kwargs: {weibull_init: 1.0}}\n",
    "vit.yaml": "cell_size: 32\nmodels:\n  - {name: cla_vit, head: cla, backbone: test_vit, cell_size: 20}\n",
}
BAD_SPACES = {
    "bound.yaml": "lr: {type: loguniform, low: abc, high: 1.0e-3}\n",
    "choice.yaml": "epochs: {type: choice, values: [2, three]}\n",
    "cells.yaml": "lr: {type: loguniform, low: 5.0e-5, high: 2.0e-3}\ncell_size: {type: choice, values: [48, 64]}\n",
}


def inputs(root: Path) -> dict[str, Path]:
    """Write the bad inputs under ``root``; return the paths the cases name."""
    from ensemble.cli.main import main
    from ensemble.data.store import CellStore
    from ensemble.sim.images import simulate
    from ensemble.oof import CELL_COLUMNS

    for name, text in {**BAD_ZOOS, **BAD_SPACES}.items():
        (root / name).write_text(text)
    data = root / "data"
    simulate(data, 6, seed=1, size=128)
    skipped = root / "skipped"
    subprocess.run(["cp", "-r", str(data), str(skipped)], check=True)
    for green in (skipped / "train").glob("*_green.png"):
        green.write_bytes(green.read_bytes()[:40])
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "train.csv").write_text("ID,Label\n")
    store = root / "store"
    assert main(["prepare", str(data), "--out", str(store), "--cell-size", "32", "--folds", "2", "--workers", "1"]) == 0
    cells = CellStore(store).cells
    missing = cells["image_id"].isin(sorted(cells["image_id"].unique())[:2])
    for name, rows in (("oof_all", cells), ("oof", cells[~missing])):
        (root / name).mkdir()
        for model in ("cla_a", "cla_b"):
            table = rows[["image_id", "cell_id", "fold"]].copy()
            table[CELL_COLUMNS] = np.random.default_rng(0).random((len(table), len(CELL_COLUMNS))).astype(np.float32)
            table.to_parquet(root / name / f"{model}.parquet")
    # A real ensemble spec (for `register`), and a registry database without the model predict asks for.
    assert main(["select", "--store", str(store), "--oof-dir", str(root / "oof_all"), "--out", str(root / "ensemble"),
                 "--no-nested", "--tracking-uri", f"sqlite:///{root / 'registry.db'}"]) == 0
    import ray

    ray.shutdown()  # each timed command starts its own, as a user's would
    return {"data": data, "skipped": skipped, "empty": root / "empty", "store": store, "oof": root / "oof",
            "registry": root / "registry.db", "spec": root / "ensemble" / "ensemble_spec.json"}


def cases(root: Path, paths: dict[str, Path]) -> list[tuple[str, list[str]]]:
    data, store = str(paths["data"]), str(paths["store"])
    registry = f"sqlite:///{paths['registry']}"
    return [
        ("(baseline: `ensemble --help`, the CLI's start)", ["--help"]),
        ("zoo: misspelt backbone (`train-all`)", ["train-all", "--zoo", str(root / "typo.yaml"), "--data", data]),
        ("zoo: a head argument no head takes", ["check", "--zoo", str(root / "headarg.yaml")]),
        ("zoo: a backbone that cannot take its cell size (`train-all`)",
         ["train-all", "--zoo", str(root / "vit.yaml"), "--data", data]),
        ("search space: a word where a bound belongs", ["check", "--zoo", "quick", "--space", str(root / "bound.yaml")]),
        ("search space: a `choice` value of the wrong type",
         ["check", "--zoo", "quick", "--space", str(root / "choice.yaml")]),
        ("search space: cell sizes far from the zoo's", ["check", "--zoo", "hcpl", "--space", str(root / "cells.yaml"),
                                                         "--no-build"]),
        ("MLflow server unreachable (`select --experiment`)",
         ["select", "--experiment", "quick", "--store", store, "--tracking-uri", "http://127.0.0.1:9"]),
        ("MLflow server unreachable (`register`)",
         ["register", "--experiment", "quick", "--spec", str(paths["spec"]), "--tracking-uri",
          "http://127.0.0.1:9"]),
        ("`predict` a missing model, no database here", ["predict", data, "--model", "models:/no-such-model@champion",
                                                          "--out", str(root / "p.parquet")]),
        ("`predict` a model the registry lacks", ["predict", data, "--model", "models:/no-such-model@champion",
                                                   "--out", str(root / "p.parquet"), "--tracking-uri", registry]),
        ("`prepare`: every image skipped", ["prepare", str(paths["skipped"]), "--out", str(root / "s1"),
                                            "--cell-size", "32", "--folds", "2", "--workers", "1"]),
        ("`prepare`: no images", ["prepare", str(paths["empty"]), "--out", str(root / "s2")]),
        ("`prepare`: a finished store of other settings", ["prepare", data, "--out", store, "--cell-size", "24",
                                                           "--folds", "2"]),
        ("`select --strict`: OOF tables miss cells of the store",
         ["select", "--store", store, "--oof-dir", str(paths["oof"]), "--out", str(root / "sel"), "--no-nested",
          "--strict", "--tracking-uri", f"sqlite:///{root / 'sel.db'}"]),
    ]


def timed(argv: list[str], cwd: Path, env: dict | None = None) -> tuple[float, int, str]:
    """Seconds from start to exit of ``ensemble ARGV`` run in ``cwd``, its exit status and its last line."""
    start = time.perf_counter()
    done = subprocess.run([ENSEMBLE, *argv], capture_output=True, text=True, env=env or ENVIRONMENT, cwd=cwd)
    seconds = time.perf_counter() - start
    said = [line for line in done.stderr.splitlines() if line.startswith("ensemble ")]
    return seconds, done.returncode, said[-1] if said else ""


def row(label: str, seconds: float, code: int, message: str) -> str:
    message = message.replace("|", "\\|")
    return f"| {label} | {seconds:.1f} | {code} | {message[:300] + (' ...' if len(message) > 300 else '')} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock-wait", type=float, default=10.0, help="ENSEMBLE_SQLITE_LOCK_WAIT_S for the lock row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = inputs(root)
        print("| bad input | seconds | exit | message |\n|---|---|---|---|")
        for label, argv in cases(root, paths):
            # From a directory without mlflow.db: predict without --tracking-uri looks for one there.
            print(row(label, *timed(argv, root / "ensemble")), flush=True)
        assert not (root / "ensemble" / "mlflow.db").exists(), "predict created a database where none was asked"
        locked = root / "locked.db"
        holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time; "
                                   f"db = sqlite3.connect({str(locked)!r}, isolation_level=None); "
                                   "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(300)"],
                                  stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
        try:
            env = {**ENVIRONMENT, "ENSEMBLE_SQLITE_LOCK_WAIT_S": str(args.lock_wait)}
            print(row(f"MLflow SQLite database locked by another process (`ENSEMBLE_SQLITE_LOCK_WAIT_S={args.lock_wait:g}`)",
                      *timed(["select", "--experiment", "quick", "--store", str(paths["store"]), "--tracking-uri",
                              f"sqlite:///{locked}"], root, env)))
        finally:
            holder.kill()
            holder.wait()


if __name__ == "__main__":
    main()
