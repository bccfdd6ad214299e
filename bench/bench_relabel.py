"""CRA on simulated cells: label quality per round and models trained on weak vs re-labelled cells.

Per difficulty: a simulated dataset with cell truth and its cell store (shared with bench_vid),
a small zoo (one DSA and one CLA on the same backbone) written to a YAML file, then

1. ``cra_rounds``, nested in the 3 folds: for each outer fold, train the DSA on the weak labels
   of the other folds (inner OOF), re-label them, retrain on the new labels, re-label again;
2. train the CLA on the weak labels and, each fold, on its outer fold's last labels.

Printed per round's labels: their AP against the cell truth (:func:`label_quality`), their Brier
score on the image's classes (mean squared error against the truth; the AP is blind to beta
because ``c -> c ** beta`` keeps each class's ranking, the Brier score is not), both on the cells
each outer fold's models train on and averaged over the outer folds, and the OOF cell mAP of the
DSA and the CLA trained on them. Trained jobs are kept in the work directory: a re-run resumes.

    python bench/bench_relabel.py --difficulties medium     # ~15 min per difficulty on 2 busy cores
    python bench/bench_relabel.py --images 80 --dsa-epochs 4 --cla-epochs 4 --backbone test_resnet
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

from bench_vid import machine, markdown, simulated_store
from ensemble.data.store import CellStore
from ensemble.storage import join
from ensemble.trainers.relabel import (DEFAULT_BETA, combined_confidence, cra_rounds, fold_specs, nested_trainer,
                                       oof_maps, power_normalise, relabelled_zoo, zoo_trainer)
from ensemble.trainers.jobs import train_zoo
from ensemble.zoo import load_zoo

BETAS = (0.25, 0.5, 1.0, 2.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--difficulties", nargs="+", default=["medium", "hard"])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--size", type=int, default=384, help="image side (px)")
    parser.add_argument("--cell-size", type=int, default=48, help="crop side S of the store")
    parser.add_argument("--backbone", default="regnetx_002")
    parser.add_argument("--dsa-epochs", type=int, default=16)
    parser.add_argument("--cla-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA)
    parser.add_argument("--workdir", default="/tmp/ensemble-bench", help="data, stores and trained jobs are kept here")
    return parser.parse_args()


def write_zoo(path: Path, args: argparse.Namespace) -> Path:
    """One DSA and one CLA on the same backbone; no early stopping, so every run trains as long."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "name: bench\n"
        f"cell_size: {args.cell_size}\n"
        f"train: {{batch_size: 48, lr: {args.lr}, augment: 0.3}}\n"
        "placement: {in_memory: true, torch_threads: 1}\n"
        "models:\n"
        f"  - {{name: dsa, head: dsa, backbone: {args.backbone}, cells_per_image: 8,"
        f" train: {{epochs: {args.dsa_epochs}, patience: {args.dsa_epochs}}}}}\n"
        f"  - {{name: cla, head: cla, backbone: {args.backbone},"
        f" train: {{epochs: {args.cla_epochs}, patience: {args.cla_epochs}}}}}\n"
    )
    return path


def brier(store: CellStore, labels: np.ndarray, rows: np.ndarray) -> float:
    """Mean squared error of the labels of store ``rows`` against the cell truth, over matched cells and the
    image's classes."""
    truth, weak = store.labels("truth")[rows], store.labels("weak")[rows]
    known = ~np.isnan(truth).any(axis=1)
    on = (weak > 0) & known[:, None]
    return float(np.mean((labels[on] - truth[on]) ** 2))


def outer_mean(store: CellStore, score) -> float:
    """Mean over outer folds j of ``score(j, rows of the other folds)``."""
    fold = store.cells["fold"].to_numpy()
    return float(np.mean([score(j, np.flatnonzero(fold != j)) for j in np.unique(fold)]))


def run_difficulty(args, difficulty: str) -> tuple[list[dict], list[dict]]:
    uri = simulated_store(args.workdir, difficulty, args.images, args.size, args.cell_size)
    store = CellStore(uri)
    work = Path(f"{uri}-work") / f"{args.backbone}-e{args.dsa_epochs}-{args.cla_epochs}-lr{args.lr:g}"
    zoo = load_zoo(write_zoo(work / "zoo.yaml", args))
    tracking = f"sqlite:///{work}/mlflow.db"
    prefix = f"cra-b{args.beta:g}-"
    rounds = cra_rounds(store, nested_trainer(zoo, uri, str(work), tracking_uri=tracking, progress=False),
                        rounds=args.rounds, beta=args.beta, prefix=prefix)
    final = rounds[-1]
    weak_cla = zoo_trainer(zoo, uri, str(work), heads=("cla",), tracking_uri=tracking, progress=False)("weak")
    cla_zoo = relabelled_zoo(zoo, final.version, heads=("cla",))
    final_cla = train_zoo(cla_zoo, uri, join(str(work), f"labels-{final.version}"), tracking_uri=tracking,
                          progress=False, specs=fold_specs(cla_zoo, final.versions)).oof
    cla = {"weak": oof_maps(store, weak_cla)["cla"], final.version: oof_maps(store, final_cla)["cla"]}
    dsa = {r.trained_on: r.model_map["dsa"] for r in rounds}
    weak = store.labels("weak")
    rows = [{"difficulty": difficulty, "labels": "weak", "label AP vs truth": rounds[0].trained_on_quality,
             "Brier (image classes)": outer_mean(store, lambda j, rows: brier(store, weak[rows], rows))}]
    for r in rounds:
        rows.append({"difficulty": difficulty, "labels": r.version, "label AP vs truth": r.quality,
                     "Brier (image classes)": outer_mean(
                         store, lambda j, rows: brier(store, store.labels(r.versions[j])[rows], rows))})
    for row in rows:
        row.update({"DSA OOF mAP": dsa.get(row["labels"], "-"), "CLA OOF mAP": cla.get(row["labels"], "-")})
    # Beta changes the targets, not their ranking: the Brier score of round 1's labels per beta.
    def round_one(j: int, rows: np.ndarray, beta: float) -> float:
        confidence = combined_confidence(store, rounds[0].oof[j], rows) * weak[rows]
        return brier(store, power_normalise(confidence, beta), rows)

    betas = [{"difficulty": difficulty,
              **{f"beta={b:g}": outer_mean(store, lambda j, rows: round_one(j, rows, b)) for b in BETAS}}]
    return rows, betas


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(f"`{' '.join([Path(sys.executable).name, *sys.argv])}`  \nmachine: {machine()}\n")
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    rows, betas, seconds = [], [], {}
    for difficulty in args.difficulties:
        started = time.perf_counter()
        found, beta_rows = run_difficulty(args, difficulty)
        rows += found
        betas += beta_rows
        seconds[difficulty] = round(time.perf_counter() - started)
    ray.shutdown()
    print(f"{args.images} images of {args.size} px, crops {args.cell_size} px, 3 folds; "
          f"DSA ({args.dsa_epochs} epochs) and CLA ({args.cla_epochs} epochs) on {args.backbone}, lr {args.lr:g}; "
          f"CRA beta {args.beta:g}, {args.rounds} rounds; OOF mAP against cell truth. "
          f"Wall seconds per difficulty: {seconds}\n")
    print(markdown(rows))
    print("\nBrier score of round-1 labels (image classes, matched cells) per beta:\n")
    print(markdown(betas))


if __name__ == "__main__":
    main()
