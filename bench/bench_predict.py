"""Benchmark the registered ensemble end to end: images/s and cells/s, and where the time goes.

A small ensemble of the quick zoo's families (by default DSA-RegNet, CLA-MobileNet, CLA-LCNet at
48 px, each with its 3 fold networks, untrained: speed does not depend on the weights) predicts
simulated 512 px images through :func:`ensemble.serving.predict.predict_images` (in process). Printed:

- the baseline, measured in the same run on the same images: segmentation alone (the classical
  segmenter on images already in memory);
- end to end: wall time including loading the model, and the steady rate (the stages' sum, after
  a warm-up image), with each stage's share (read, segment, crop = features + crops + mask RLEs,
  members, fuse = aggregation + fusion + integrity) and the ratio to segmentation alone.

On a shared machine other processes' load moves every figure; the ratio to the baseline of the
same run moves less. ``--device cuda`` runs the member networks on a GPU (not available here).

    python bench/bench_predict.py [--images 6] [--size 512] [--folds 3] [--device cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ensemble.data.hpa import read_image
from ensemble.data.segment import create_segmenter
from ensemble.sim.images import simulate
from ensemble.serving.predict import predict_images
from ensemble.serving.registry import MemberCheckpoints, save_ensemble
from ensemble.serving.model import Preprocessing
from ensemble.sim.oof import make_synthetic_oof
from ensemble.selectors import OOFSet, select_ensemble
from ensemble.models import build_model
from ensemble.zoo import ModelSpec, load_zoo

MEMBERS = ("dsa_regnet", "cla_mobilenet", "cla_lcnet")


def ensemble_spec(members: list[ModelSpec]):
    """An ensemble of exactly these members, selected on synthetic OOF named after them."""
    synthetic = make_synthetic_oof(200, 5, n_folds=3, families={m.name: (m.head, 1) for m in members})
    name = {f"{m.head}_{m.name}_0": m.name for m in members}  # the generator's model names
    oof = synthetic.oof
    oof = OOFSet(index=oof.index, cell={name[k]: v for k, v in oof.cell.items()},
                 image={name[k]: v for k, v in oof.image.items()}, tags={name[k]: v for k, v in oof.tags.items()})
    # threshold 0: every model is its own block, so every one is a member (none pruned).
    return select_ensemble(oof, synthetic.labels, threshold=0.0, prune=False, fusion="paper",
                           aggregation="hierarchical", nested=False, greedy=False)


def build(workdir: Path, members: list[ModelSpec], n_folds: int, cell_size: int) -> Path:
    """Save the ensemble (untrained fold networks) as a local MLflow model directory."""
    checkpoints = {}
    for spec in members:
        folds = {}
        for fold in range(n_folds):
            folds[fold] = workdir / f"{spec.name}-fold{fold}.pt"
            torch.save(build_model(spec).state_dict(), folds[fold])
        checkpoints[spec.name] = MemberCheckpoints(spec, folds)
    preprocessing = Preprocessing(create_segmenter("classical").describe(), cell_size=cell_size)
    return save_ensemble(workdir / "model", ensemble_spec(members), checkpoints, preprocessing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--folds", type=int, default=3, help="fold networks per member")
    parser.add_argument("--members", nargs="+", default=list(MEMBERS), help="model names of the quick zoo")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = load_zoo("quick")
    members = [zoo.model(name) for name in args.members]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = simulate(workdir / "data", args.images + 1, seed=7, size=args.size, split="test")
        warm_up, ids = data.image_ids[0], data.image_ids[1:]
        model = build(workdir, members, args.folds, zoo.cell_size)

        segmenter = create_segmenter("classical")
        images = [read_image(data.root, i, "test") for i in ids]
        segmenter(images[0])  # first-call costs out of the baseline
        start = time.perf_counter()
        for image in images:
            segmenter(image)
        segment_only = (time.perf_counter() - start) / len(ids)

        predict_images(str(model), data.root, [warm_up], split="test", engine="local", device=args.device,
                       progress=False)
        start = time.perf_counter()
        result = predict_images(str(model), data.root, ids, split="test", engine="local", device=args.device,
                                batch_size=8, progress=False)
        wall = time.perf_counter() - start

    t = result.timings
    n_cells = len(result.cells)
    networks = len(members) * args.folds
    print(f"# predict: {len(ids)} images of {args.size} px, {n_cells} cells ({n_cells / len(ids):.1f}/image); "
          f"{len(members)} members x {args.folds} folds = {networks} networks at {zoo.cell_size} px "
          f"({', '.join(args.members)}); device {args.device}, torch threads {torch.get_num_threads()}\n")
    print("| path | s/image | images/s | cells/s | read | segment | crop | members | fuse | x segmentation |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| segmentation alone (baseline) | {segment_only:.3f} | {1 / segment_only:.2f} | "
          f"{n_cells / len(ids) / segment_only:.0f} | | 100% | | | | 1.00 |")
    shares = " | ".join(f"{v:.0%}" for v in t.shares().values())
    steady = t.total / len(ids)
    print(f"| ensemble, steady (stages' sum) | {steady:.3f} | {1 / steady:.2f} | {n_cells / t.total:.0f} | "
          f"{shares} | {steady / segment_only:.2f} |")
    print(f"| ensemble, wall incl. model load | {wall / len(ids):.3f} | {len(ids) / wall:.2f} | {n_cells / wall:.0f} | "
          f"| | | | | {wall / len(ids) / segment_only:.2f} |")
    print(f"\nmembers: {t.members / t.cells * 1000:.2f} ms/cell over {networks} networks "
          f"({t.members / t.cells / networks * 1000:.2f} ms per cell per network)")


if __name__ == "__main__":
    main()
