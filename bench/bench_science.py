"""The paper's ablations, measured against cell truth on held-out simulated images (issue 19).

Per seed, the main job's own chain (:func:`ensemble.cli.demo.run_demo`) on a simulated training set:
the zoo with two CRA rounds and the VID, selection, registration, then the champion predicting
simulated test images of another seed. Besides, the zoo's CLAs train once more on the weak
labels, so CRA's effect on the final models is measured too. Printed, per seed and as the mean
over seeds, with the paper's figure beside each row:

1. streams: each DSA's image stream, cell stream and fused output (their product), and the CLA
   of its backbone (OOF cell mAP, mean of the folds' held-out scores);
2. CRA: each label version's AP against cell truth (weak, after round 1, after round 2), the
   DSAs trained on each, and the CLAs on the weak and on the last labels (CRA is nested in the
   folds: a round's figures are means over the outer folds);
3. VID: the ensemble's nested cell mAP without and with the held-out integrity weights, and the
   champion's test-image scores without and with them;
4. selection: best single model, hcpl, greedy and the mean of all, nested (fold mean), and the
   champion against each of its networks alone on the test images (competition mAP and cell mAP),
   each without and with the VID's weights.

Everything is kept under ``--workdir`` (one folder per seed, each with its own MLflow database):
a re-run resumes every finished job and step. Figures go to ``{workdir}/science.json`` too.

    python bench/bench_science.py                 # defaults: quick zoo, 2 seeds x 400 images x 6 epochs
                                                  # (1.7 x the demo's images, more epochs; about 2 h 25 min on
                                                  # 2 cores: seed 0 took 71 min, BENCHMARKS.md)
    python bench/bench_science.py --seeds 0 --images 60 --epochs 1 --test-images 6 --workdir /tmp/sci-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from bench_vid import machine, markdown
from ensemble.data.store import CellStore, evaluation_labels
from ensemble.cli.demo import run_demo
from ensemble.serving.evaluate import compare, evaluate, prediction_members
from ensemble.metrics import cell_map
from ensemble.oof import CELL_COLUMNS, IMAGE_COLUMNS, KEYS, member_columns
from ensemble.pipeline import store_uri
from ensemble.storage import read_parquet
from ensemble.trainers.relabel import zoo_trainer
from ensemble.zoo import load_zoo

# The paper's figures (HCPL, mAP % on the HPA test set): Fig. 3a for streams and CRA, Fig. 5a for selection.
PAPER = {
    "image stream": 42.1, "cell stream": 51.1, "DSA fused": 55.1,
    "DSA on weak labels": 52.5, "DSA on round-1 labels": 55.2,
    "CLA on round-2 labels - CLA on weak": "+4 or more",
    "best single": 55.8, "hcpl": 57.1,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--zoo", default="quick", help="built-in zoo name or YAML file")
    parser.add_argument("--images", type=int, default=400, help="training images per seed")
    parser.add_argument("--image-px", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="CRA rounds")
    parser.add_argument("--test-images", type=int, default=80)
    parser.add_argument("--workdir", default="/tmp/ensemble-science")
    return parser.parse_args()


def fold_mean_map(table: pd.DataFrame, store: CellStore, truth: np.ndarray, scores: np.ndarray) -> float:
    """Mean over the table's folds of the cell mAP of ``scores`` (rows of ``table``) against cell truth."""
    at = pd.MultiIndex.from_frame(store.cells[KEYS]).get_indexer(pd.MultiIndex.from_frame(table[KEYS]))
    folds = table["fold"].to_numpy()
    with warnings.catch_warnings():  # a class without positives in a fold is left out of that fold's mean
        warnings.simplefilter("ignore")
        return float(np.mean([cell_map(truth[at[folds == f]], scores[folds == f]).map for f in np.unique(folds)]))


def streams(table: pd.DataFrame, store: CellStore, truth: np.ndarray) -> dict[str, float]:
    """Fold-mean OOF cell mAP of a model's cell stream, and for a DSA of its image stream and their product."""
    cell = table[CELL_COLUMNS].to_numpy()
    out = {"cell stream": fold_mean_map(table, store, truth, cell)}
    if IMAGE_COLUMNS[0] in table:
        image = table[IMAGE_COLUMNS].to_numpy()
        out["image stream"] = fold_mean_map(table, store, truth, image)
        out["DSA fused"] = fold_mean_map(table, store, truth, image * cell)
    return out


def oof_table(workdir: Path, name: str, version: str | None = None) -> pd.DataFrame:
    """A model's OOF table: of the final zoo, or of the run trained on label ``version``."""
    folder = workdir / "oof" if version is None else workdir / f"labels-{version}" / "oof"
    return read_parquet(str(folder / f"{name}.parquet"))


def test_scores(out: Path, weighting: bool) -> tuple[dict[str, dict[str, float]], dict[str, dict]]:
    """The champion and each of its networks alone on the test images, each without and with the VID's
    weights; and the champion against its best network there, with a paired bootstrap interval.

    The integrity weight is a property of the cell, not of the ensemble, so a member weighted by it
    is the fair single-model baseline for a champion registered with weighting on.
    """
    file = out / "test_predictions.parquet"
    predictions = read_parquet(str(file))
    w = predictions["integrity"].to_numpy()[:, None]
    columns = {"ensemble": CELL_COLUMNS} | {m: member_columns(m) for m in prediction_members(file)}
    own = {name: predictions[c].to_numpy() for name, c in columns.items()}
    if weighting:  # the file's probabilities, the members' too, carry the weights
        own = {name: np.divide(v, w, out=np.zeros_like(v), where=w > 0) for name, v in own.items()}
    scores, versus, path = {}, {}, out / "test_predictions_variant.parquet"
    for vid, factor in (("", 1.0), (" x VID", w)):
        variant = predictions.copy()
        for name, values in own.items():
            variant[columns[name]] = values * factor
        variant.to_parquet(path)
        for name in columns:
            result = evaluate(path, out / "test_data", plot=out / "test_predictions_variant.png",
                              member=None if name == "ensemble" else name)
            scores[name + vid] = {"competition": result.competition.map, "cell": result.cell.map}
        best = max(list(columns)[1:], key=lambda m: scores[m + vid]["cell"])
        versus["ensemble" + vid] = {"baseline": best,
                                    **compare(path, out / "test_data", best).table.to_dict("index")}
    return scores, versus


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    out = Path(args.workdir).resolve() / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"  # one database per seed
    started = time.perf_counter()
    demo = run_demo(out, images=args.images, image_px=args.image_px, epochs=args.epochs,
                    test_images=args.test_images, relabel_rounds=args.rounds, integrity=True, zoo=args.zoo,
                    seed=seed)
    pipeline, spec = demo.pipeline, demo.pipeline.ensemble
    store = CellStore(store_uri(str(out)))
    truth, _ = evaluation_labels(store)
    base = load_zoo(args.zoo, {"epochs": args.epochs})
    clas = [m for m in base.models if m.head == "cla"]
    dsas = [m for m in base.models if m.head == "dsa"]
    zoo_trainer(base, store.uri, str(out), heads=("cla",), progress=False)("weak")  # CLAs on the weak labels
    rounds = pipeline.relabel

    stream_rows = []
    for dsa in dsas:
        row = {"backbone": dsa.backbone, **streams(oof_table(out, dsa.name), store, truth)}
        sibling = next((m for m in clas if m.backbone == dsa.backbone), None)
        row["CLA"] = streams(oof_table(out, sibling.name), store, truth)["cell stream"] if sibling else float("nan")
        stream_rows.append(row)

    # CRA is nested in the folds: a round's "labels" are each outer fold's version, its label AP and
    # its DSAs' scores the means over the outer folds (each on the other folds' cells).
    cra_rows = []
    for r in [*rounds, None] if rounds else []:  # round r trained on r.trained_on; the final zoo on the last labels
        final = r is None
        row = {"labels": rounds[-1].version if final else r.trained_on,
               "label AP": rounds[-1].quality if final else r.trained_on_quality}
        for dsa in dsas:
            tables = [oof_table(out, dsa.name)] if final else [read_parquet(t[dsa.name]) for t in r.oof.values()]
            row[dsa.name] = float(np.mean([streams(t, store, truth).get("DSA fused", float("nan")) for t in tables]))
        for cla in clas:
            table = oof_table(out, cla.name) if final else oof_table(out, cla.name, "weak") if r.round == 1 else None
            row[cla.name] = streams(table, store, truth)["cell stream"] if table is not None else float("nan")
        cra_rows.append(row)

    integrity = pipeline.integrity
    vid = {"oof_without": integrity.decision.without, "oof_with": integrity.decision.with_weights,
           "oof_as_decided": integrity.decision.nested, "weighting": integrity.weighting}

    selection = {m: {"nested_fold_mean": s.nested_mean, "in_sample_fold_mean": s.in_sample_mean}
                 for m, s in spec.scores.items()}
    members = sorted(set(spec.members.values()), key=lambda m: -spec.model_map[m])
    test, versus = test_scores(out, spec.integrity_weighting)
    return {"seed": seed, "minutes": (time.perf_counter() - started) / 60, "streams": stream_rows, "cra": cra_rows,
            "vid": vid, "selection": selection, "members": members,
            "fused_classes": sum(rule.rule == "product" for rule in spec.fusion.values()),
            "best_single": max(spec.model_map, key=spec.model_map.get), "test": test, "versus": versus,
            "test_cells": demo.n_cells, "train_cells": len(store.cells)}


def summary(results: list[dict]) -> str:
    """Markdown tables: each row's mean over seeds (and each seed's), the paper's figure beside it."""
    def cell(values):
        values = [v for v in values if v is not None and np.isfinite(v)]
        if not values:
            return "-"
        spread = f" ({', '.join(f'{v:.4f}' for v in values)})" if len(values) > 1 else ""
        return f"{np.mean(values):.4f}{spread}"

    parts = []
    rows = []
    for i, first in enumerate(results[0]["streams"]):
        row = {"backbone": first["backbone"]}
        for key in ("image stream", "cell stream", "DSA fused", "CLA"):
            row[key] = cell([r["streams"][i][key] for r in results])
        rows.append(row)
    rows.append({"backbone": "paper (HPA, %)", **{k: str(PAPER.get(k, "-")) for k in
                                                 ("image stream", "cell stream", "DSA fused")}, "CLA": "55.8 (best CLA)"})
    parts += ["Streams: OOF cell mAP (fold mean) of each DSA's outputs and its backbone's CLA", markdown(rows)]

    rows = []
    for i, first in enumerate(results[0]["cra"]):
        row = {"labels": first["labels"]}
        for key in first:
            if key != "labels":
                row[key] = cell([r["cra"][i][key] for r in results])
        rows.append(row)
    parts += ["CRA: label AP against cell truth; OOF cell mAP (fold mean) of the models trained on each version"
              " (DSAs: fused output); paper: DSA 52.5 on weak, 55.2 on round-1 labels; CLA/CLH +4 on round-2 labels",
              markdown(rows)]

    rows = [{"VID weighting": "off", "ensemble nested cell mAP": cell([r["vid"]["oof_without"] for r in results]),
             "test competition mAP": cell([r["test"]["ensemble"]["competition"] for r in results]),
             "test cell mAP": cell([r["test"]["ensemble"]["cell"] for r in results])},
            {"VID weighting": "on", "ensemble nested cell mAP": cell([r["vid"]["oof_with"] for r in results]),
             "test competition mAP": cell([r["test"]["ensemble x VID"]["competition"] for r in results]),
             "test cell mAP": cell([r["test"]["ensemble x VID"]["cell"] for r in results])}]
    parts += ["VID (auto decided: " + ", ".join(str(r["vid"]["weighting"]) for r in results) + ")", markdown(rows)]

    rows = []
    for method in ("best_single", "hcpl", "greedy", "mean_all", "hcpl_unfused"):
        rows.append({"method": method, "nested (fold mean)": cell([r["selection"][method]["nested_fold_mean"]
                                                                   for r in results]),
                     "in-sample (fold mean)": cell([r["selection"][method]["in_sample_fold_mean"] for r in results]),
                     "paper": str(PAPER.get(method.replace("best_single", "best single"), "-"))})
    parts += ["Selection (members: " + "; ".join(", ".join(r["members"]) for r in results) + ")", markdown(rows)]

    rows = []
    for r in results:
        for model in [k for k in r["test"] if not k.endswith(" x VID")]:
            plain, weighted = r["test"][model], r["test"][f"{model} x VID"]
            rows.append({"seed": r["seed"], "model": model + (" (best single)" if model == r["best_single"] else ""),
                         "competition mAP": plain["competition"], "cell mAP": plain["cell"],
                         "x VID: competition mAP": weighted["competition"], "x VID: cell mAP": weighted["cell"]})
    parts += ["Test images: the champion and each network in it alone (members, and DSAs lending their image"
              " stream), without and with the VID's integrity weights", markdown(rows)]

    rows = []
    for r in results:
        for variant, row in r["versus"].items():
            rows.append({"seed": r["seed"], "champion": variant, "best network on the test images": row["baseline"],
                         **{f"{metric.removesuffix('_map')}: difference [90 % interval]":
                            f"{row[metric]['difference']:+.4f} [{row[metric]['low']:+.4f}, {row[metric]['high']:+.4f}]"
                            for metric in ("competition_map", "cell_map")}})
    parts += ["Test images: the champion minus its best network alone (by test cell mAP), paired bootstrap over"
              " the images", markdown(rows)]
    return "\n\n".join(parts)


def main() -> None:
    args = parse_args()
    print(f"# bench_science: {machine()}\n{vars(args)}", flush=True)
    results = []
    for seed in args.seeds:
        results.append(run_seed(args, seed))
        print(f"seed {seed}: {results[-1]['minutes']:.1f} min", flush=True)
        path = Path(args.workdir) / "science.json"
        path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=float))
    print(summary(results))


if __name__ == "__main__":
    main()
