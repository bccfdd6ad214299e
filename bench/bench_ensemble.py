"""Does the ensemble beat its members where users score it? A protocol no choice was tuned to.

Per training seed, the main job's own chain (``train_all`` with the built-in default: the quick
zoo on a simulated training set of that seed), then the registered champion predicts a fresh
test set of ``--test-images`` images simulated with a seed of its own (``TEST_SEED_BASE + seed``;
no setting of the project was chosen on these images), and is scored with the competition metric
and cell mAP beside each member network alone.

The comparator is fixed before any test image is seen: the member with the best OOF score under
the selection's objective (``oof_best``). The member best on the test images (``hindsight``) is
reported beside it, as are greedy selection and the mean of all models, which are served through
the same registered-model path (their specs registered as other versions, never promoted).

Differences are paired over images (:func:`ensemble.evaluate.compare`, 90 % percentile
bootstrap), per seed and pooled over seeds (the seeds' test images resampled together).

    python bench/bench_ensemble.py                         # 3 seeds x 240 images, 200 test images each
    python bench/bench_ensemble.py --stage train           # only train (resumable), e.g. while coding
    python bench/bench_ensemble.py --seeds 0 --images 60 --epochs 1 --test-images 8 --workdir /tmp/ens-smoke
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ensemble.data.synthetic import simulate
from ensemble.pipeline import train_all
from ensemble.zoo import load_zoo

# Test images of seed s are simulated with TEST_SEED_BASE + s: a range no demo, test or other
# benchmark uses (the demo's test images are 1000 + seed).
TEST_SEED_BASE = 7_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--zoo", default="quick", help="built-in zoo name or YAML file")
    parser.add_argument("--images", type=int, default=240, help="training images per seed (the demo's)")
    parser.add_argument("--image-px", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=None, help="default: the zoo's")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--stage", choices=("train", "all"), default="all")
    parser.add_argument("--workdir", default="/tmp/ensemble-bench")
    return parser.parse_args()


def train_seed(args: argparse.Namespace, seed: int) -> Path:
    """Simulate the seed's training set and train its zoo (finished jobs are skipped)."""
    workdir = Path(args.workdir) / f"seed{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    data = workdir / "data"
    if not (data / "train.csv").exists():
        simulate(data, n_images=args.images, seed=seed, size=args.image_px)
    zoo = load_zoo(args.zoo, {"epochs": args.epochs} if args.epochs else None)
    train_all(zoo, data=str(data), workdir=str(workdir), select=False, register=False)
    return workdir


def main() -> None:
    args = parse_args()
    for seed in args.seeds:
        start = time.perf_counter()
        train_seed(args, seed)
        print(f"seed {seed}: trained in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
