"""The `ensemble` command line: each step of the pipeline as a subcommand.

    ensemble simulate OUT --images 200 --seed 0 [--kaggle]
    ensemble prepare DATA --out STORE --cell-size 64 --folds 3
    ensemble check --zoo quick [--space SPACE] [--sweep]   # validate, list the jobs; starts nothing
    ensemble train-all [--zoo quick] [--data DATA] [--workdir runs] [--integrity on|off|auto] [--dry-run]
    ensemble sweep --model cla_resnet10t --samples 8
    ensemble select --store runs/store --oof-dir runs/oof
    ensemble register --experiment NAME --spec ensemble.json [--name hpa-ensemble]
    ensemble predict IMAGES --model models:/hpa-ensemble@champion --out preds.parquet|submission.csv
    ensemble evaluate PREDICTIONS DATA
    ensemble demo                     # the whole pipeline on a simulated dataset

Configuration is checked before Ray starts; a bad input ends in one line naming the file and
key (exit 2), an MLflow or training failure in one line or a list of failed jobs (exit 1).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _ray_init() -> None:
    """:func:`ensemble.cluster.connect`: the running cluster, or a local Ray; called after every check."""
    from ensemble.cluster import connect

    connect()


def _absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers run elsewhere); URIs as they are."""
    return uri if "://" in uri else str(Path(uri).resolve())


def _settings(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` options (segmenter settings) as a dict; values read as YAML scalars (0.25 is a number,
    paths and URLs stay strings)."""
    import yaml

    settings = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--segmenter-setting takes KEY=VALUE, got {pair!r}")
        settings[key] = yaml.safe_load(value)
    return settings


# What --kaggle changes: the competition's images are 16-bit, mostly 2048 px.
KAGGLE_PX, KAGGLE_BITS = 2048, 16


def cmd_simulate(args) -> int:
    from ensemble.sim.images import simulate
    from ensemble.sim.sheet import contact_sheet

    size = args.image_px or (KAGGLE_PX if args.kaggle else 512)
    bits = args.bit_depth or (KAGGLE_BITS if args.kaggle else 8)
    result = simulate(args.out, n_images=args.images, seed=args.seed, size=size, difficulty=args.difficulty,
                      bit_depth=bits, rare_oversample=args.rare_oversample, split=args.split,
                      min_captured=args.min_captured, truth=not args.kaggle)
    print(f"simulated {len(result.image_ids)} images of {size} px ({bits}-bit) in {result.seconds:.1f} s -> {args.out}")
    if args.kaggle:  # a contact sheet would be one more file than the competition gives
        print(f"as Kaggle gives it: {args.split}.csv and {args.split}/ only, no truth/ (cells cannot be scored)")
        return 0
    print(f"{result.n_cells} cells in the truth; contact sheet: "
          f"{contact_sheet(args.out, Path(args.out) / 'contact_sheet.png', split=args.split)}")
    return 0


def cmd_prepare(args) -> int:
    from ensemble.checks import check_data, check_segmenter, has_truth, truth_note
    from ensemble.data import hpa
    from ensemble.data.store_build import prepare

    settings = _settings(args.segmenter_setting)
    check_data(_absolute(args.data))
    check_segmenter(args.segmenter, settings)
    # Said once, up front, for a dataset with images to prepare (one without is an error of its own).
    if not has_truth(_absolute(args.data)) and len(hpa.read_index(_absolute(args.data), args.split)):
        warnings.warn(truth_note(args.data), stacklevel=1)
    # prepare() attaches to Ray itself, only once it has images to segment: a dataset without
    # images or a store of other settings is said before Ray starts.
    report = prepare(_absolute(args.data), _absolute(args.out), cell_size=args.cell_size, n_folds=args.folds,
                     seed=args.seed, segmenter=args.segmenter, segmenter_settings=settings,
                     max_workers=args.workers, split=args.split, chunk_size=args.chunk_size, force=args.force)
    print(report)
    return 0


def _zoo(args):
    """The zoo of a training command, with its command-line overrides."""
    from ensemble.zoo import load_zoo, zoo_with

    return zoo_with(load_zoo(args.zoo, {"epochs": args.epochs} if args.epochs else None),
                    relabel_rounds=args.relabel_rounds)


def _plan(args, zoo, *, sweep: bool, space: str | None = None, build: bool = True):
    """:func:`ensemble.checks.check_training` with a training command's options: all before Ray starts."""
    from ensemble.checks import check_training

    return check_training(zoo, sweep=sweep, space=space, data=_absolute(args.data) if args.data else None,
                          workdir=_absolute(args.workdir), tracking_uri=args.tracking_uri,
                          cluster_config=args.cluster_config, segmenter=args.segmenter,
                          segmenter_settings=_settings(args.segmenter_setting), build=build,
                          integrity=args.integrity)


def cmd_check(args) -> int:
    print(_plan(args, _zoo(args), sweep=args.sweep, space=args.space, build=not args.no_build).report())
    return 0


def cmd_train_all(args) -> int:
    zoo = _zoo(args)
    # A dry run is the quick look (seconds): building the paper's models takes a minute on 2 cores.
    plan = _plan(args, zoo, sweep=args.sweep, build=not args.dry_run)
    if args.dry_run:
        print(plan.report())
        return 0
    from ensemble.cli.demo import default_dataset
    from ensemble.pipeline import JobsFailedError, train_all

    _ray_init()
    data = args.data or default_dataset(args.workdir, args.images, args.seed, args.image_px, args.difficulty)
    try:
        result = train_all(zoo, data=_absolute(data), workdir=_absolute(args.workdir), experiment=args.experiment,
                           tracking_uri=args.tracking_uri, sweep=args.sweep, sweep_samples=args.sweep_samples,
                           max_concurrent=args.max_concurrent, segmenter=args.segmenter,
                           segmenter_settings=_settings(args.segmenter_setting), cluster_config=args.cluster_config,
                           integrity=args.integrity)
    except JobsFailedError as error:
        print(f"ensemble train-all: {error}", file=sys.stderr)  # its own lines: one per failed job
        return 1
    print(result.report())
    return 0


def cmd_sweep(args) -> int:
    import dataclasses

    from ensemble.checks import check_spaces, check_zoo
    from ensemble.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    zoo = dataclasses.replace(zoo, models=(zoo.model(args.model),))
    check_zoo(zoo)
    check_spaces(zoo, args.space)
    from ensemble.pipeline import sweep_model  # seconds of imports, after the checks

    _ray_init()
    result = sweep_model(zoo, args.model, workdir=_absolute(args.workdir), space=args.space,
                         num_samples=args.samples, fold=args.fold, experiment=args.experiment,
                         tracking_uri=args.tracking_uri)
    print(result.trials.to_string())
    print(f"best val mAP {result.best_val_map:.4f} with {result.best_config} -> {result.config_uri}")
    return 0


def cmd_select(args) -> int:
    from ensemble import tracking

    if bool(args.oof_dir) == bool(args.experiment):
        raise ValueError("give one source of OOF tables: --oof-dir DIR or --experiment NAME")
    uri = tracking.tracking_uri(args.tracking_uri)
    if args.experiment:
        tracking.client(uri, create=False)  # a server that answers, a database that exists: before reading
    from ensemble.oof import load_oof_dir, load_oof_mlflow
    from ensemble.pipeline import select_step  # seconds of imports, after the checks
    from ensemble.selectors.served import load_validation_dir, load_validation_mlflow

    if args.oof_dir:
        oof = load_oof_dir(args.oof_dir)
        validation = load_validation_dir(args.oof_dir, oof.models)
    else:
        oof = load_oof_mlflow(args.experiment, uri)
        validation = load_validation_mlflow(args.experiment, oof.models, uri)
    experiment = args.experiment or "select"
    options = {"nested": not args.no_nested, "threshold": args.threshold, "correlation": args.correlation,
               "prune": not args.no_prune, "blocks_by_kind": not args.blocks_across_kinds, "strict": args.strict,
               "objective": args.objective}
    if args.fusion:
        options["fusion"] = args.fusion
    spec = select_step(oof, _absolute(args.store), _absolute(args.out),
                       tracking.ensure_experiment(experiment, uri), uri, validation=validation, copy=False,
                       **options)
    print(spec.report())
    print(f"ensemble spec and correlation plot -> {args.out}")
    return 0


def cmd_check_cluster(args) -> int:
    from ensemble.cluster import check_cluster_file

    problems = check_cluster_file(args.config, iam=not args.no_iam)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{args.config}: {len(problems)} problem(s); fix them before `ray up`", file=sys.stderr)
        return 2
    print(f"{args.config}: Ray accepts it, every placeholder is filled in, every mounted file is there"
          f"{'' if args.no_iam else ' and the head may launch the workers'}")
    return 0


def cmd_demo(args) -> int:
    from ensemble.cli.demo import run_demo

    _ray_init()
    result = run_demo(args.out, images=args.images, image_px=args.image_px, difficulty=args.difficulty,
                      epochs=args.epochs, test_images=args.test_images, relabel_rounds=args.relabel_rounds,
                      integrity=args.integrity)
    print(result.report())
    return 0


# ensemble.checks.INTEGRITY_MODES, spelled out: importing it would load pandas for every command.
INTEGRITY_MODES = ("on", "off", "auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write a simulated HPA-like dataset (Kaggle layout + cell truth)")
    p.add_argument("out")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kaggle", action="store_true",
                   help=f"write only what the Kaggle competition gives: SPLIT.csv and {KAGGLE_BITS}-bit PNGs of "
                        f"{KAGGLE_PX} px (unless --image-px, --bit-depth), no truth/")
    p.add_argument("--image-px", type=_at_least(64), default=None,
                   help=f"image side in pixels (default 512; {KAGGLE_PX} with --kaggle)")
    p.add_argument("--difficulty", choices=["easy", "medium", "hard"], default="medium")
    p.add_argument("--bit-depth", type=int, choices=[8, 16], default=None,
                   help=f"default 8; {KAGGLE_BITS} with --kaggle")
    p.add_argument("--rare-oversample", type=float, default=1.0, help="boost rare classes (1 = real rates)")
    p.add_argument("--split", default="train")
    p.add_argument("--min-captured", type=float, default=0.5,
                   help="cells less inside the image are left out of the truth, as HPA's annotators did (0: keep all)")
    p.set_defaults(func=cmd_simulate)

    def segmenter_options(p):
        p.add_argument("--segmenter", choices=["classical", "hpacellseg"], default="classical")
        p.add_argument("--segmenter-setting", action="append", metavar="KEY=VALUE",
                       help="a segmenter setting, repeatable; hpacellseg: nuclei_model=URL cell_model=URL")

    p = sub.add_parser("prepare", help="segment images and build the cell-crop store")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--cell-size", type=_at_least(16), default=64, help="side S of the cell crops, in pixels")
    p.add_argument("--folds", type=_at_least(2), default=5)
    p.add_argument("--seed", type=int, default=0)
    segmenter_options(p)
    p.add_argument("--workers", type=_at_least(1), default=None,
                   help="most segmentation actors of the autoscaling pool (default: the cluster's most CPUs)")
    p.add_argument("--split", default="train")
    p.add_argument("--chunk-size", type=_at_least(1), default=64,
                   help="images per chunk (and crop shard): the unit a killed build resumes from")
    p.add_argument("--force", action="store_true",
                   help="replace a finished store at --out built from other data or settings "
                        "(an unfinished one is always replaced)")
    p.set_defaults(func=cmd_prepare)

    def training_options(p):
        p.add_argument("--zoo", default="quick", help="built-in zoo name or a zoo YAML file")
        p.add_argument("--workdir", default="runs", help="path or URI for the store, checkpoints and OOF")
        p.add_argument("--experiment", default=None, help="MLflow experiment (default: the zoo's name)")
        p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")

    def plan_options(p):
        """What decides the jobs of a training run: the options `train-all` and `check` share."""
        training_options(p)
        p.add_argument("--data", default=None, help="dataset root (Kaggle layout); default: a simulated one")
        p.add_argument("--epochs", type=_at_least(1), default=None, help="override every model's epochs")
        p.add_argument("--sweep", action="store_true", help="sweep each model once per outer fold first (on the other folds), train each fold with its best")
        p.add_argument("--relabel-rounds", type=_at_least(0), default=None,
                       help="CRA rounds (default: the zoo's relabel.rounds)")
        p.add_argument("--integrity", choices=INTEGRITY_MODES, default="auto",
                       help="fit the VID: on (even if the zoo does not enable it; fails without cell labels), off, "
                            "or auto: when the zoo enables it and the data has cell truth or the zoo "
                            "integrity.labels_csv (default)")
        segmenter_options(p)
        p.add_argument("--cluster-config", default=None,
                       help="the Ray launcher config (default: ~/ray_bootstrap_config.yaml on a `ray up` head)")

    p = sub.add_parser("train-all", help="prepare, (sweep,) train every model x fold, select, register")
    plan_options(p)
    p.add_argument("--images", type=_at_least(1), default=240, help="images to simulate when no --data is given")
    p.add_argument("--image-px", type=_at_least(64), default=384, help="size of simulated images")
    p.add_argument("--difficulty", choices=["easy", "medium", "hard"], default="medium")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-samples", type=_at_least(1), default=8)
    p.add_argument("--max-concurrent", type=_at_least(1), default=None,
                   help="jobs handed to Ray at once (default: all on an autoscaling cluster, what fits on a fixed one)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and list the jobs, as `ensemble check --no-build`; starts nothing")
    p.set_defaults(func=cmd_train_all)

    p = sub.add_parser("check", help="check a zoo, its search spaces and settings, and list its jobs; starts nothing")
    plan_options(p)
    p.add_argument("--space", default=None, help="search-space YAML to check against every model (implies --sweep)")
    p.add_argument("--no-build", action="store_true",
                   help="skip building each model once on the CPU (a minute for the hcpl zoo on 2 cores)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("check-cluster", help="check a Ray cluster launcher config before `ray up`")
    p.add_argument("config", nargs="?", default="cluster.yaml")
    p.add_argument("--no-iam", action="store_true",
                   help="do not ask AWS whether the head's instance profile may launch workers")
    p.set_defaults(func=cmd_check_cluster)

    p = sub.add_parser("sweep", help="Ray Tune sweep (ASHA + Optuna) of one model of a zoo on one fold")
    training_options(p)
    p.add_argument("--model", required=True)
    p.add_argument("--space", default=None, help="search-space YAML (default: search_spaces/{head}.yaml)")
    p.add_argument("--samples", type=_at_least(1), default=8)
    p.add_argument("--fold", type=_at_least(0), default=0)
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
    p.add_argument("--objective", choices=["competition", "cell"], default="competition",
                   help="what every choice maximises: the OOF estimate of the competition's metric (each class "
                        "ranked within the images that carry it) or cell mAP over all cells")
    p.add_argument("--no-nested", action="store_true", help="skip the out-of-sample (nested) scores")
    p.add_argument("--strict", action="store_true",
                   help="fail, rather than warn, when the OOF tables miss cells of the store")
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

    from ensemble.cli.product import add_commands

    add_commands(sub)
    return parser


def _at_least(smallest: int):
    """An argparse type: a whole number >= ``smallest`` (argparse's own message otherwise)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < smallest:
            raise argparse.ArgumentTypeError(f"must be at least {smallest}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in "invalid ... value"
    return parse


def explain(error: BaseException, tracking_uri: str | None = None) -> tuple[str, int] | None:
    """``(one line, exit status)`` for an error the user can act on, or None for a bug (left a traceback).

    Bad input is the user's to fix (status 2): a file and key, a row, an image. MLflow trouble
    names the tracking URI and the cause (status 1). An error raised inside a Ray task arrives
    wrapped, its remote traceback in its text: the cause is what is said.
    """
    cause = getattr(error, "cause", None)
    if type(error).__module__.startswith("ray.") and isinstance(cause, BaseException):
        error = cause
    if "mlflow" in sys.modules:  # else no MLflow error can have happened: importing it costs seconds
        from ensemble import tracking

        said = tracking.explain(error, tracking_uri)
        if said is not None:
            return said, 1
    if isinstance(error, KeyError):
        return str(error.args[0] if error.args else error), 2
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError)):
        return str(error), 2
    return None


def _warnings_of(command: str, show):
    """A ``warnings.showwarning`` that says the package's own warnings in one line, others as ``show`` does."""
    package = Path(__file__).resolve().parents[1]  # the whole ensemble package, not only cli/

    def one_line(message, category, filename, lineno, file=None, line=None):
        if not Path(filename).resolve().is_relative_to(package):
            return show(message, category, filename, lineno, file, line)
        print(f"ensemble {command}: warning: {message}", file=file or sys.stderr)

    return one_line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show = warnings.showwarning
    warnings.showwarning = _warnings_of(args.command, show)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        resumes = args.command in ("prepare", "train-all", "demo")
        print(f"ensemble {args.command}: interrupted" + ("; the same command resumes where this one stopped"
                                                         if resumes else ""), file=sys.stderr)
        return 130
    except Exception as error:
        said = explain(error, getattr(args, "tracking_uri", None))
        if said is None:
            raise
        print(f"ensemble {args.command}: error: {said[0]}", file=sys.stderr)
        return said[1]
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
