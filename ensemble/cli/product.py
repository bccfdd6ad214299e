"""The product commands of the ``ensemble`` CLI: register, models, predict, evaluate.

    ensemble register --experiment NAME --spec ensemble.json [--name hpa-ensemble] [--promote if-better]
    ensemble models [--name hpa-ensemble]
    ensemble predict IMAGES --model models:/hpa-ensemble@champion --out preds.parquet|submission.csv [--masks DIR]
    ensemble evaluate PREDICTIONS DATA [--model-version N] [--against MEMBER]

``cli.py`` wires them in with :func:`add_commands`.
"""

from __future__ import annotations

import argparse

from ensemble.labels import CHANNELS

# ensemble.serving.governance.PROMOTE, spelled out: importing it would load MLflow for every command.
PROMOTE = ("if-better", "always", "never")


def cmd_register(args) -> int:
    import tempfile

    from ensemble import tracking
    from ensemble.serving.registry import member_checkpoints, needed_models, register_ensemble
    from ensemble.serving.model import Preprocessing
    from ensemble.selectors import EnsembleSpec

    spec = EnsembleSpec.from_json(args.spec)
    uri = tracking.tracking_uri(args.tracking_uri)
    with tempfile.TemporaryDirectory() as downloads:
        members = member_checkpoints(args.experiment, needed_models(spec), uri, dst=downloads)
        stores = {m.store for m in members.values()} - {None}
        store = args.store or (stores.pop() if len(stores) == 1 else None)
        if store is None:
            raise ValueError(f"cannot tell which cell store the members trained on "
                             f"({sorted(stores) or 'none recorded'}); give --store")
        version = register_ensemble(spec, members, Preprocessing.from_store(store), tracking_uri=uri, name=args.name,
                                    alias=args.alias, experiment=args.experiment, integrity_dir=args.integrity,
                                    promote=args.promote)
    print(f"registered {args.name} version {version.version}: {version.tags.get(tracking.TAG_PROMOTION)} "
          f"({len(members)} models: {', '.join(members)}) in {uri}")
    return 0


def cmd_models(args) -> int:
    from ensemble.serving.governance import list_versions

    table = list_versions(args.name, args.tracking_uri)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    return 0


def cmd_predict(args) -> int:
    import mlflow

    from ensemble.serving.predict import predict_images

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    from ensemble import tracking
    from ensemble.storage import read_bytes

    tracking.check_model_uri(args.model, args.tracking_uri)  # one line, before Ray; creates no database
    root, split = image_root(args.images, args.split)
    ids = read_bytes(args.ids).decode().split() if args.ids else None
    result = predict_images(args.model, root, ids, split=split, out=args.out, engine=args.engine,
                            batch_size=args.batch_size, num_workers=args.workers, members=args.members,
                            device=args.device, masks=args.masks)
    print(result.summary())
    return 0


def cmd_evaluate(args) -> int:
    from ensemble.serving.evaluate import compare, evaluate

    # First, so that a wrong --against name ends the command before the longer scoring.
    comparison = compare(args.predictions, args.data, args.against, candidate=args.member or "ensemble",
                         iou=args.iou) if args.against else None
    result = evaluate(args.predictions, args.data, iou=args.iou, plot=args.plot, member=args.member)
    print(result.report())
    if comparison is not None:
        print("\n" + comparison.report())
    if args.model_version is not None:
        from ensemble import tracking
        from ensemble.serving.governance import record_evaluation, resolve_version

        run_id = record_evaluation(result, args.data, args.model_name, args.model_version,
                                   tracking_uri=args.tracking_uri, promote=args.promote)
        version = resolve_version(args.model_name, args.model_version, args.tracking_uri)
        print(f"\nlogged to MLflow run {run_id} against {args.model_name} version {version.version} "
              f"(test_score {version.tags[tracking.TAG_TEST_SCORE]}); promotion: "
              f"{version.tags.get(tracking.TAG_PROMOTION, '-')}")
    return 0


def image_root(images: str, split: str) -> tuple[str, str]:
    """``(root, split)`` of IMAGES (a path or URL): a dataset root holding ``{split}/``, or the image folder itself."""
    from ensemble.storage import is_dir, join, list_files, name

    if not is_dir(join(images, split)) and any(f.endswith(f"_{CHANNELS[0]}.png") for f in list_files(images)):
        return images.rstrip("/").rsplit("/", 1)[0], name(images)
    return images, split


def add_commands(subparsers) -> None:
    """Add ``register``, ``models``, ``predict`` and ``evaluate`` to the CLI's subparsers."""
    p = subparsers.add_parser("register", help="register the selected ensemble as an MLflow model with an alias")
    p.add_argument("--experiment", required=True, help="MLflow experiment of the training runs")
    p.add_argument("--spec", required=True, help="ensemble spec JSON written by `ensemble select`")
    p.add_argument("--name", default="hpa-ensemble", help="registered model name")
    p.add_argument("--alias", default="champion")
    p.add_argument("--store", default=None, help="cell store the members trained on (default: from their runs)")
    p.add_argument("--integrity", default=None, help="VID model directory (integrity weighting)")
    p.add_argument("--promote", choices=PROMOTE, default="if-better",
                   help="move the alias to the new version: if it scores better than the current one, always, never")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.set_defaults(func=cmd_register)

    p = subparsers.add_parser("models", help="versions of the registered ensemble with their scores and aliases")
    p.add_argument("--name", default="hpa-ensemble", help="registered model name")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("predict", help="per-cell probabilities (parquet) or a Kaggle submission (csv)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", help="dataset root holding SPLIT/, or a folder of {ID}_{red,green,blue,yellow}.png")
    p.add_argument("--model", default="models:/hpa-ensemble@champion")
    p.add_argument("--out", required=True, help="*.parquet (one row per cell) or *.csv (submission)")
    p.add_argument("--split", default="test")
    p.add_argument("--ids", default=None, help="file of image IDs, whitespace-separated (default: all)")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="images per network batch")
    p.add_argument("--workers", type=int, default=None, help="most Ray segmentation actors (autoscaling pool)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the networks run (with --engine ray, cuda asks the cluster for a GPU)")
    p.add_argument("--members", action="store_true", help="also keep each member's own probabilities (parquet)")
    p.add_argument("--masks", default=None,
                   help="folder of given cell masks {ID}.png used instead of segmenting; 'auto': the dataset's masks/")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("evaluate", help="cell mAP and competition mAP of predictions against DATA/truth")
    p.add_argument("predictions", help="preds.parquet or submission.csv")
    p.add_argument("data", help="dataset root with truth/")
    p.add_argument("--iou", type=float, default=0.6)
    p.add_argument("--plot", default=None, help="per-class bar plot PNG (default: beside PREDICTIONS)")
    p.add_argument("--member", default=None, help="score this member's own probabilities (predict --members)")
    p.add_argument("--against", default=None, metavar="MEMBER",
                   help="also the difference from this member (or 'ensemble'), with a 90%% interval from a paired "
                        "bootstrap over the images")
    p.add_argument("--model-version", default=None,
                   help="registered version (number or alias) the predictions came from: log the scores to MLflow "
                        "against it and set its test score")
    p.add_argument("--model-name", default="hpa-ensemble", help="registered model of --model-version")
    p.add_argument("--promote", choices=PROMOTE, default="never",
                   help="with --model-version: then apply this promotion rule to it, with the test score just measured")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_evaluate)
