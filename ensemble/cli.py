"""The `ensemble` command line: each step of the pipeline as a subcommand.

    ensemble simulate OUT --images 200 --seed 0
    ensemble prepare DATA --out STORE --cell-size 64 --folds 3
    ensemble train-all [--zoo quick] [--data DATA] [--workdir runs]
    ensemble sweep --model cla_regnet --samples 8
    ensemble select --store runs/store --oof-dir runs/oof
    ensemble register --experiment NAME --spec ensemble.json [--name hpa-ensemble]
    ensemble predict IMAGES --model models:/hpa-ensemble@champion --out preds.parquet|submission.csv
    ensemble evaluate PREDICTIONS DATA
    ensemble demo                     # the whole pipeline on a simulated dataset
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _ray_init() -> None:
    """Attach to a running cluster (``ray submit``, ``ray job submit``, ``ray start``) or start a local one.

    Workers' own logs stay in Ray's log directory unless ENSEMBLE_WORKER_LOGS=1: progress bars and
    MLflow carry what a user follows, and failures still reach the driver as exceptions.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=os.environ.get("ENSEMBLE_WORKER_LOGS") == "1")


def _absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers run elsewhere); URIs as they are."""
    return uri if "://" in uri else str(Path(uri).resolve())


def cmd_simulate(args) -> int:
    from ensemble.data.synthetic import simulate
    from ensemble.plots import contact_sheet

    result = simulate(args.out, n_images=args.images, seed=args.seed, size=args.image_px, difficulty=args.difficulty,
                      bit_depth=args.bit_depth, rare_oversample=args.rare_oversample, split=args.split)
    sheet = contact_sheet(args.out, Path(args.out) / "contact_sheet.png", split=args.split)
    print(f"simulated {len(result.image_ids)} images, {result.n_cells} cells in {result.seconds:.1f} s -> {args.out}")
    print(f"contact sheet: {sheet}")
    return 0


def cmd_prepare(args) -> int:
    from ensemble.data.store_build import prepare

    _ray_init()
    report = prepare(_absolute(args.data), _absolute(args.out), cell_size=args.cell_size, n_folds=args.folds,
                     seed=args.seed, segmenter=args.segmenter, num_workers=args.workers, split=args.split)
    print(report)
    return 0


def cmd_train_all(args) -> int:
    from ensemble.demo import default_dataset
    from ensemble.pipeline import train_all
    from ensemble.zoo import load_zoo, zoo_with

    zoo = zoo_with(load_zoo(args.zoo, {"epochs": args.epochs} if args.epochs else None),
                   relabel_rounds=args.relabel_rounds, integrity=args.integrity)
    _ray_init()
    data = args.data or default_dataset(args.workdir, args.images, args.seed, args.image_px, args.difficulty)
    result = train_all(zoo, data=_absolute(data), workdir=_absolute(args.workdir), experiment=args.experiment,
                       tracking_uri=args.tracking_uri, sweep=args.sweep, sweep_samples=args.sweep_samples)
    print(result.report())
    return 0


def cmd_sweep(args) -> int:
    from ensemble.pipeline import sweep_model

    _ray_init()
    result = sweep_model(args.zoo, args.model, workdir=_absolute(args.workdir), space=args.space,
                         num_samples=args.samples, fold=args.fold, experiment=args.experiment,
                         tracking_uri=args.tracking_uri)
    print(result.trials.to_string())
    print(f"best val mAP {result.best_val_map:.4f} with {result.best_config} -> {result.config_uri}")
    return 0


def cmd_select(args) -> int:
    from ensemble import tracking
    from ensemble.oof import load_oof_dir, load_oof_mlflow
    from ensemble.pipeline import select_step

    if bool(args.oof_dir) == bool(args.experiment):
        raise ValueError("give one source of OOF tables: --oof-dir DIR or --experiment NAME")
    oof = load_oof_dir(args.oof_dir) if args.oof_dir else load_oof_mlflow(args.experiment, args.tracking_uri)
    experiment = args.experiment or "select"
    options = {"nested": not args.no_nested, "threshold": args.threshold, "correlation": args.correlation,
               "prune": not args.no_prune, "blocks_by_kind": not args.blocks_across_kinds}
    if args.fusion:
        options["fusion"] = args.fusion
    spec = select_step(oof, _absolute(args.store), _absolute(args.out),
                       tracking.ensure_experiment(experiment, args.tracking_uri), args.tracking_uri, **options)
    print(spec.report())
    print(f"ensemble spec and correlation plot -> {args.out}")
    return 0


def cmd_demo(args) -> int:
    from ensemble.demo import run_demo

    _ray_init()
    result = run_demo(args.out, images=args.images, image_px=args.image_px, difficulty=args.difficulty,
                      epochs=args.epochs, test_images=args.test_images, relabel_rounds=args.relabel_rounds,
                      integrity=args.integrity)
    print(result.report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write a simulated HPA-like dataset (Kaggle layout + cell truth)")
    p.add_argument("out")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-px", type=int, default=512, help="image side in pixels")
    p.add_argument("--difficulty", choices=["easy", "medium", "hard"], default="medium")
    p.add_argument("--bit-depth", type=int, choices=[8, 16], default=8)
    p.add_argument("--rare-oversample", type=float, default=1.0, help="boost rare classes (1 = real rates)")
    p.add_argument("--split", default="train")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("prepare", help="segment images and build the cell-crop store")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--cell-size", type=int, default=64, help="side S of the cell crops, in pixels")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segmenter", default="classical")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per CPU)")
    p.add_argument("--split", default="train")
    p.set_defaults(func=cmd_prepare)

    def training_options(p):
        p.add_argument("--zoo", default="quick", help="built-in zoo name or a zoo YAML file")
        p.add_argument("--workdir", default="runs", help="path or URI for the store, checkpoints and OOF")
        p.add_argument("--experiment", default=None, help="MLflow experiment (default: the zoo's name)")
        p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")

    p = sub.add_parser("train-all", help="prepare, (sweep,) train every model x fold, select, register")
    training_options(p)
    p.add_argument("--data", default=None, help="dataset root (Kaggle layout); default: a simulated one")
    p.add_argument("--images", type=int, default=240, help="images to simulate when no --data is given")
    p.add_argument("--image-px", type=int, default=384, help="size of simulated images")
    p.add_argument("--difficulty", choices=["easy", "medium", "hard"], default="medium")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
    p.add_argument("--sweep", action="store_true", help="sweep each model on fold 0 first, train with the best")
    p.add_argument("--sweep-samples", type=int, default=8)
    p.add_argument("--relabel-rounds", type=int, default=None, help="CRA rounds (default: the zoo's relabel.rounds)")
    p.add_argument("--integrity", action="store_true", help="fit the VID even if the zoo does not enable it")
    p.set_defaults(func=cmd_train_all)

    p = sub.add_parser("sweep", help="Ray Tune sweep (ASHA + Optuna) of one model of a zoo on one fold")
    training_options(p)
    p.add_argument("--model", required=True)
    p.add_argument("--space", default=None, help="search-space YAML (default: search_spaces/{head}.yaml)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--fold", type=int, default=0)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("select", help="select_ensemble on the OOF predictions of trained models")
    p.add_argument("--store", required=True, help="the cell store the models were trained on (its labels)")
    p.add_argument("--oof-dir", default=None, help="directory of {model}.parquet OOF tables")
    p.add_argument("--experiment", default=None, help="or: the MLflow experiment of the training runs")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", default="ensemble", help="where the spec JSON and plots go")
    p.add_argument("--correlation", choices=["within_class", "flat"], default="within_class",
                   help="mean of per-class correlations, or one over cells x classes flattened")
    p.add_argument("--threshold", type=float, default=None, help="fixed block cut (1 - correlation)")
    p.add_argument("--blocks-across-kinds", action="store_true",
                   help="let a block mix DSA and cell-level models (default: blocks are found within each kind)")
    p.add_argument("--no-prune", action="store_true", help="keep one member from every block, as the paper does")
    p.add_argument("--fusion", choices=["fit", "paper", "off"], default=None)
    p.add_argument("--no-nested", action="store_true", help="skip the out-of-sample (nested) scores")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("demo", help="the whole pipeline on a simulated dataset, on this machine")
    p.add_argument("--out", default="demo")
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--image-px", type=int, default=384)
    p.add_argument("--difficulty", choices=["easy", "medium", "hard"], default="medium")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--test-images", type=int, default=40, help="held-out simulated images to score the ensemble on")
    p.add_argument("--relabel-rounds", type=int, default=None, help="CRA rounds before the zoo (default: none)")
    p.add_argument("--integrity", action="store_true", help="fit the VID and pack it with the ensemble")
    p.set_defaults(func=cmd_demo)

    from ensemble.cli_product import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"ensemble {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
