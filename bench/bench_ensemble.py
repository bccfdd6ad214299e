"""Does the ensemble beat its members where users score it? A protocol no choice was tuned to.

Per training seed, the main job's own chain (``train_all`` with the built-in default: the quick
zoo on a simulated training set of that seed), then the registered champion predicts a fresh
test set of ``--test-images`` images simulated with a seed of its own (``TEST_SEED_BASE + seed``;
no setting of the project was chosen on these images), and is scored with the competition metric
and cell mAP beside each member network alone.

The comparator is fixed before any test image is seen: the member with the best OOF score under
the selection's objective (``oof_best``). The member best on the test images (``hindsight``) is
reported beside it, as are greedy selection and the mean of all models (cell streams, as
selection scores them), and the two ways of combining a member's fold networks: averaged before
fusion (what the registered model serves, checked equal to its output) or each fold's networks
fused as selection saw them, then averaged (``hcpl_fold_fused``). Beside the ensemble as
registered, which was selected on the served form of the OOF (:mod:`ensemble.selectors.served`),
``one_network`` is the ensemble selected on the OOF as it is, one network per cell: the selection
this replaces, on the same networks and images. These come from one pass of every network of the
zoo over the same segmented test cells.

Differences are paired over images (:func:`ensemble.serving.evaluate.compare`, 90 % percentile
bootstrap), per seed and pooled over seeds (the seeds' test images resampled together).

    python bench/bench_ensemble.py                         # 3 seeds x 240 images, 200 test images each
    python bench/bench_ensemble.py --stage train           # only train (resumable), e.g. while coding
    python bench/bench_ensemble.py --stage folds           # scored seeds: each fold network alone and in bags
    python bench/bench_ensemble.py --stage ceiling         # scored seeds: the best weighting in hindsight
    python bench/bench_ensemble.py --seeds 0 --images 60 --epochs 1 --test-images 8 --workdir /tmp/ens-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from ensemble.data import hpa
from ensemble.sim.images import simulate
from ensemble.metrics import CompetitionScores
from ensemble.serving.evaluate import compare_pairs, evaluate, match_images
from ensemble.models.inference import predict_cells
from ensemble.data.store import CellStore
from ensemble.oof import CELL_COLUMNS, IMAGE_COLUMNS, KEYS, align_labels, load_oof_dir, member_columns
from ensemble import tracking
from ensemble.pipeline import select_step, store_labels, store_uri, train_all
from ensemble.serving.predict import predict_images
from ensemble.serving.registry import member_checkpoints, save_ensemble
from ensemble.selectors import OBJECTIVES, EnsembleSpec, Objective, apply_spec
from ensemble.serving.model import Preprocessing, batched, load_ensemble
from ensemble.zoo import load_zoo

# Test images of seed s are simulated with TEST_SEED_BASE + s: a range no demo, test or other
# benchmark uses (the demo's test images are 1000 + seed). 7000 + s served the figures of an
# earlier selection and the diagnosis that followed, so they are no longer unseen.
TEST_SEED_BASE = 8_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--zoo", default="quick", help="built-in zoo name or YAML file")
    parser.add_argument("--images", type=int, default=240, help="training images per seed (the demo's)")
    parser.add_argument("--image-px", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=None, help="default: the zoo's")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--stage", choices=("train", "all", "folds", "ceiling"), default="all",
                        help="on seeds already scored: folds, what averaging fold networks adds (fold_networks); "
                             "ceiling, the best weighting of the models chosen on the test images")
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


def all_models_spec(spec: EnsembleSpec) -> EnsembleSpec:
    """The spec with every candidate a member: a model that loads every network of the zoo."""
    return dataclasses.replace(spec, groups={"all": list(spec.models)}, weights=dict.fromkeys(spec.models, 1.0),
                               members={m: m for m in spec.models})


def fold_predictions(model, test_root: Path) -> tuple[pd.DataFrame, dict[str, list[pd.DataFrame]]]:
    """Every network of every model on the test cells: (index, model -> one frame per fold network)."""
    ids = hpa.read_index(test_root, "test")["ID"].tolist()
    index, frames = [], {name: [[] for _ in nets] for name, nets in model.networks.items()}
    for batch in batched(model.iter_segmented(str(test_root), ids, "test", hpa.BatchReport()), 16):
        counts = [len(s.cells) for s in batch]
        if not sum(counts):
            continue
        crops = np.concatenate([s.crops for s in batch])
        keys = pd.DataFrame({"image_id": np.repeat([s.image_id for s in batch], counts).astype(object),
                             "cell_id": np.concatenate([s.cells["cell_id"].to_numpy() for s in batch]).astype(np.int64)})
        index.append(keys)
        for name, networks in model.networks.items():
            for k, network in enumerate(networks):
                cell, image = predict_cells(model.member_specs[name], [network], crops, counts, model.device)
                frame = keys.assign(**dict(zip(CELL_COLUMNS, cell.T)))
                if image is not None:
                    frame = frame.assign(**dict(zip(IMAGE_COLUMNS, image.T)))
                frames[name][k].append(frame)
    return (pd.concat(index, ignore_index=True),
            {name: [pd.concat(parts, ignore_index=True) for parts in folds] for name, folds in frames.items()})


def variants(spec: EnsembleSpec, index: pd.DataFrame, folds: dict[str, list[pd.DataFrame]],
             one_network: EnsembleSpec) -> dict[str, np.ndarray]:
    """Each score set of the table, (n_cells, 19) in ``index``'s row order.

    ``hcpl``: the fold networks of each member averaged, then aggregated and fused (what the
    registered model serves); ``hcpl_fold_fused``: each fold's networks aggregated and fused as
    selection saw them, then the folds averaged; ``one_network``: selected on the OOF's one network
    per cell, served alike; each model alone; ``mean_all`` and ``greedy``.
    """
    def ordered(table: pd.DataFrame) -> np.ndarray:
        return index.merge(table, on=KEYS, how="left")[CELL_COLUMNS].to_numpy(np.float32)

    averaged = {name: parts[0][KEYS].assign(**{c: np.mean([p[c].to_numpy() for p in parts], axis=0)
                                               for c in parts[0].columns if c not in KEYS})
                for name, parts in folds.items()}
    n_folds = len(next(iter(folds.values())))
    out = {"hcpl": ordered(apply_spec(spec, averaged)),
           "hcpl_fold_fused": np.mean([ordered(apply_spec(spec, {m: parts[k] for m, parts in folds.items()}))
                                       for k in range(n_folds)], axis=0),
           "one_network": ordered(apply_spec(one_network, averaged))}
    models = {name: ordered(table) for name, table in averaged.items()}
    out |= models
    out["mean_all"] = np.mean(list(models.values()), axis=0)
    if spec.greedy is not None:
        out["greedy"] = sum(w * models[m] for m, w in spec.greedy.weights.items()) / sum(spec.greedy.weights.values())
    return out


def score_seed(args: argparse.Namespace, seed: int) -> dict:
    """Select and register on the seed's OOF, then score every score set on its fresh test images."""
    workdir = Path(args.workdir) / f"seed{seed}"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    zoo = load_zoo(args.zoo, {"epochs": args.epochs} if args.epochs else None)
    pipeline = train_all(zoo, data=str(workdir / "data"), workdir=str(workdir))
    spec, version = pipeline.ensemble, pipeline.model_version
    store = CellStore(store_uri(str(workdir)))
    oof = load_oof_dir(str(workdir / "oof"), models=spec.models)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*selection sees one network per cell")
        one_network = select_step(oof, store, str(workdir / "one_network"),
                                  tracking.ensure_experiment("one_network"), validation=None)
    test_root = workdir / "test_data"
    if not (test_root / "test.csv").exists():
        simulate(test_root, n_images=args.test_images, seed=TEST_SEED_BASE + seed, size=args.image_px, split="test")
    served = predict_images(f"models:/{version.name}/{version.version}", str(test_root), split="test",
                            out=str(workdir / "served.parquet"), members=True, engine="local").out
    table = pd.read_parquet(served)
    everything = all_models_spec(spec)
    members = member_checkpoints(zoo.name, everything.models)
    shutil.rmtree(workdir / "all_models", ignore_errors=True)  # a seed scored again (a changed selection) starts over
    save_ensemble(workdir / "all_models", everything, members, Preprocessing.from_store(store))
    index, folds = fold_predictions(load_ensemble(str(workdir / "all_models")), test_root)
    scores = variants(spec, index, folds, one_network)
    at = index.merge(table[KEYS].reset_index(), on=KEYS, how="left")["index"].to_numpy()
    if np.isnan(at.astype(float)).any():
        raise RuntimeError("the served table and the networks' pass cut different cells")
    served_scores = np.empty_like(scores["hcpl"])
    served_scores[:] = table[CELL_COLUMNS].to_numpy(np.float32)[at]
    np.testing.assert_allclose(served_scores, scores["hcpl"], atol=1e-5, err_msg="served != recomputed ensemble")
    out = table.drop(columns=[c for c in table.columns if "." in c])
    order = np.argsort(at)
    for name, values in scores.items():
        out[member_columns(name)] = values[order]
    path = workdir / "test_scores.parquet"
    out.to_parquet(path)

    plots = workdir / "plots"
    plots.mkdir(exist_ok=True)
    test = {name: evaluate(path, test_root, member=name, plot=plots / f"{name}.png") for name in scores}
    test = pd.DataFrame({"competition_map": {n: r.competition.map for n, r in test.items()},
                         "cell_map": {n: r.cell.map for n, r in test.items()}})
    member_names = sorted(set(spec.members.values()))
    oof_best = max(member_names, key=spec.model_map.get)   # fixed before any test image is seen
    hindsight = test.loc[member_names, "competition_map"].idxmax()
    # The two comparators under names every seed's table shares, so that seeds pool.
    out[member_columns("oof_best")] = out[member_columns(oof_best)].to_numpy()
    out[member_columns("hindsight")] = out[member_columns(hindsight)].to_numpy()
    out.to_parquet(path)
    truth = align_labels(store_labels(store), oof).truth
    folds = oof.index["fold"].to_numpy()
    oof_scores = {kind: {m: Objective.build(kind, truth, oof.index["image_id"].to_numpy(), folds).map(oof.cell[m])
                         for m in oof.models} for kind in OBJECTIVES}
    return {"seed": seed, "path": str(path), "test_root": str(test_root), "objective": spec.objective,
            "members": member_names, "oof_best": oof_best, "hindsight": hindsight,
            "one_network_members": sorted(set(one_network.members.values())),
            "oof_best_one_network": max(one_network.models, key=one_network.model_map.get),
            "n_images": int(out["image_id"].nunique()), "n_cells": len(out),
            "test": test.round(4).to_dict(), "oof_model_map": spec.model_map,
            # Does each OOF metric order the models as the competition's metric does on the test images?
            "rank_agreement": {kind: float(spearmanr([oof_scores[kind][m] for m in oof.models],
                                                     test.loc[oof.models, "competition_map"]).statistic)
                               for kind in OBJECTIVES},
            "oof_scores": oof_scores,
            "nested": {m: s.nested_mean for m, s in spec.scores.items()},
            "nested_one_network": {m: s.nested_mean for m, s in one_network.scores.items()},
            "nested_cell": {m: s.nested_mean for m, s in spec.metric_scores.get("cell", {}).items()}}


def fold_networks(seed: dict) -> pd.DataFrame:
    """What averaging networks adds on the seed's test images (competition mAP), and where from.

    Per model: each of its fold networks alone and the mean of their predictions (the member as
    served, a bag of networks trained on different folds); then, per fold, the mean of every
    model's network of that fold (networks of different architectures trained on the same
    images), and the mean of every network. The OOF holds one network per cell, so selection sees
    the first and the third kind of prediction, never the bags it serves.
    """
    workdir = Path(seed["path"]).parent
    index, folds = fold_predictions(load_ensemble(str(workdir / "all_models")), Path(seed["test_root"]))
    n_folds = len(next(iter(folds.values())))
    sets = {f"{name}@{k}": parts[k][CELL_COLUMNS].to_numpy() for name, parts in folds.items() for k in range(n_folds)}
    sets |= {name: np.mean([sets[f"{name}@{k}"] for k in range(n_folds)], axis=0) for name in folds}
    sets |= {f"fold {k}": np.mean([sets[f"{name}@{k}"] for name in folds], axis=0) for k in range(n_folds)}
    sets["every network"] = np.mean([sets[name] for name in folds], axis=0)
    served = pd.read_parquet(seed["path"])
    table = index.merge(served[[c for c in served.columns if "." not in c]], on=KEYS, how="left")
    table = pd.concat([table, pd.DataFrame({f"{name}.{c}": values[:, j] for name, values in sets.items()
                                            for j, c in enumerate(CELL_COLUMNS)})], axis=1)
    path = workdir / "fold_networks.parquet"
    table.to_parquet(path)
    scores = {name: CompetitionScores() for name in sets}
    for image in match_images(path, hpa.read_truth(seed["test_root"]), [c for n in sets for c in member_columns(n)]):
        if image is not None:
            for name, values in zip(sets, np.split(image.scores, len(sets), axis=1), strict=True):
                scores[name].add(image.overlap, values, image.true_labels)
    maps = {name: score.result().map for name, score in scores.items()}
    rows = [{"seed": seed["seed"], "networks": name, "alone": np.mean([maps[f"{name}@{k}"] for k in range(n_folds)]),
             "min": min(maps[f"{name}@{k}"] for k in range(n_folds)), "max": max(maps[f"{name}@{k}"] for k in range(n_folds)),
             "averaged": maps[name]} for name in folds]
    rows.append({"seed": seed["seed"], "networks": "one fold's networks of every model (mean over folds)",
                 "averaged": np.mean([maps[f"fold {k}"] for k in range(n_folds)])})
    rows.append({"seed": seed["seed"], "networks": "every network", "averaged": maps["every network"]})
    return pd.DataFrame(rows).assign(gain=lambda t: t["averaged"] - t["alone"])


def ceiling(seed: dict, step: float = 0.1) -> dict:
    """The most any weighted mean of the models (each its fold networks' average, as served) scores
    on the seed's test images, competition mAP, with weights on a grid of ``step`` chosen on those
    images: a bound on what selection could reach with this zoo, not a method."""
    models = sorted(seed["oof_model_map"])
    images = [image for image in match_images(seed["path"], hpa.read_truth(seed["test_root"]),
                                              [c for m in models for c in member_columns(m)]) if image is not None]
    parts = [np.split(image.scores, len(models), axis=1) for image in images]
    units = round(1 / step)
    grid = [w for w in itertools.product(range(units + 1), repeat=len(models)) if sum(w) == units]

    def score(weights) -> float:
        result = CompetitionScores()
        for image, scores in zip(images, parts):
            result.add(image.overlap, sum(w * s for w, s in zip(weights, scores)) / units, image.true_labels)
        return result.result().map

    maps = {w: score(w) for w in grid}
    best = max(maps, key=maps.get)
    alone = maps[tuple(units * (m == seed["oof_best"]) for m in models)]
    return {"seed": seed["seed"], "weights": dict(zip(models, np.array(best) / units)), "best": maps[best],
            "oof_best": alone, "gain": maps[best] - alone}


def comparisons(seeds: list[dict]) -> pd.DataFrame:
    """Per seed and pooled over seeds: the ensemble minus the OOF-best member and minus the best
    member in hindsight; greedy, the mean of all and the selection on one network per cell minus the
    OOF-best, and the ensemble minus that selection; the two ways of combining fold networks; each
    with a paired bootstrap interval over the images."""
    pairs = [("ensemble", "oof_best"), ("ensemble", "hindsight"), ("greedy", "oof_best"), ("mean_all", "oof_best"),
             ("one_network", "oof_best"), ("ensemble", "one_network"), ("hcpl_fold_fused", "ensemble")]
    groups = [[s] for s in seeds] + ([seeds] if len(seeds) > 1 else [])
    rows = []
    for group in groups:
        seed = group[0]["seed"] if len(group) == 1 else "pooled"
        for result in compare_pairs([s["path"] for s in group], [s["test_root"] for s in group], pairs):
            rows += [{"seed": seed, "comparison": f"{result.candidate} - {result.baseline}", "metric": metric,
                      **r.to_dict()} for metric, r in result.table.iterrows()]
    return pd.DataFrame(rows)


def main() -> None:
    args = parse_args()
    if args.stage == "folds":
        seeds = json.loads((Path(args.workdir) / "seeds.json").read_text())
        table = pd.concat([fold_networks(seed) for seed in seeds if seed["seed"] in args.seeds], ignore_index=True)
        table.to_csv(Path(args.workdir) / "fold_networks.csv", index=False)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return
    if args.stage == "ceiling":
        seeds = json.loads((Path(args.workdir) / "seeds.json").read_text())
        table = pd.DataFrame([ceiling(seed) for seed in seeds if seed["seed"] in args.seeds])
        table.to_csv(Path(args.workdir) / "ceiling.csv", index=False)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return
    results = []
    for seed in args.seeds:
        start = time.perf_counter()
        train_seed(args, seed)
        print(f"seed {seed}: trained in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        if args.stage == "all":
            # A seed scored before is read back: its test images and registered version are fixed.
            done = Path(args.workdir) / f"seed{seed}" / "result.json"
            if not done.exists():
                result = score_seed(args, seed) | {"minutes": (time.perf_counter() - start) / 60}
                done.write_text(json.dumps(result, indent=1, default=str))
            results.append(json.loads(done.read_text()))
            print(json.dumps(results[-1], indent=1, default=str), flush=True)
    if args.stage == "all":
        table = comparisons(results)
        table.to_csv(Path(args.workdir) / "comparisons.csv", index=False)
        (Path(args.workdir) / "seeds.json").write_text(json.dumps(results, indent=1, default=str))
        print(table.to_string(index=False, float_format=lambda v: f"{v:+.4f}"))


if __name__ == "__main__":
    main()
