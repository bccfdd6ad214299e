"""The selected ensemble into the MLflow model registry: save, register, alias.

The model itself, and how it predicts, is :mod:`ensemble.serving.model`; this module gathers what it
packs (the members' fold networks from their training runs, the spec, the preprocessing of the
store they trained on, the VID) and writes it as an MLflow model, saved "from code"
(:mod:`ensemble.serving.from_code`) with this package as its ``code_paths``, the input signature and
a self-contained input example of :mod:`ensemble.serving.inputs`, so ``mlflow models serve`` runs it
anywhere the package's requirements are installed. Its artifacts::

    ensemble_spec   ensemble_spec.json          EnsembleSpec.to_json
    config          config.json                 preprocessing, members' ModelSpecs, integrity hook
    members         members/{model}/fold{k}.pt  each fold network's state_dict (checkpoint/best.pt)
    segmenter       files the segmenter reads (hpacellseg weights), when its settings name any,
                    copied from wherever they are (a path or any URL: s3://...)
    integrity       optional: the directory handed to the integrity loader

Its requirements are this package's, and hpacellseg's when it segments with it: a server
needs nothing but the registry.

Which version is the champion, and what each version records, is :mod:`ensemble.serving.governance`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.artifacts import download_artifacts

import ensemble
from ensemble import storage, tracking
from ensemble.selectors import EnsembleSpec
from ensemble.serving import governance
from ensemble.serving.model import (CONFIG_VERSION, DEFAULT_INTEGRITY_LOADER, LOAD_NETWORKS, Preprocessing,
                                    load_integrity_hook)
# Re-exported: models pickled in the older form name their python_model
# ensemble.serving.registry.EnsembleModel, and unpickling looks it up here.
from ensemble.serving.model import EnsembleModel  # noqa: F401
from ensemble.serving.inputs import SIGNATURE, example_input
from ensemble.zoo import ModelSpec

# Head settings that act only while training: fold networks that differ in them serve alike.
TRAINING_ONLY = ("drop_rate", "drop_path_rate")
CHECKPOINT_ARTIFACT = "checkpoint"  # training runs log checkpoint/best.pt and checkpoint/spec.json
SEGMENTER_REQUIREMENTS = {
    "hpacellseg": ["pytorch_zoo", "hpacellseg @ https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip"],
}
"""What a serving environment installs for a segmenter beyond this package (hpacellseg is not on
PyPI: README, "Segmentation")."""


@dataclass(frozen=True)
class MemberCheckpoints:
    """The K fold networks of one model.

    Attributes
    ----------
    spec : ModelSpec
    folds : dict of int to Path
        Fold -> its network's state_dict file (``torch.save``; loaded with ``weights_only=True``).
    runs : dict of int to str
        Fold -> the MLflow run it came from (empty for files given by hand).
    store : str or None
        The cell store the runs trained on (their ``store`` parameter), if known.
    tags : dict of str to str
        The runs' zoo and data fingerprint tags, when they have them (a version records them).
    """

    spec: ModelSpec
    folds: dict[int, Path]
    runs: dict[int, str] = field(default_factory=dict)
    store: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def needed_models(spec: EnsembleSpec) -> list[str]:
    """Models whose networks inference runs: the members and, when a class fuses, the image models."""
    members = [m for group in spec.groups.values() for m in group]
    fuses = any(rule.rule == "product" for rule in spec.fusion.values())
    return list(dict.fromkeys([*members, *(spec.image_models if fuses else [])]))


def member_checkpoints(experiment: str, model_names: Sequence[str], tracking_uri: str | None = None,
                       dst: str | Path | None = None) -> dict[str, MemberCheckpoints]:
    """Download the fold networks of models trained in an MLflow experiment.

    Contract with training (``trainers.fit``): one FINISHED run per (model, fold), tagged
    ``ensemble.kind=job``, ``model``, ``fold`` and ``spec_hash`` (:meth:`ModelSpec.fingerprint`), with the artifacts
    ``checkpoint/best.pt`` and ``checkpoint/spec.json``. Of repeated runs of a (model, fold), the
    latest wins.

    Parameters
    ----------
    experiment : str
        Experiment name (one per zoo).
    model_names : sequence of str
        Models to fetch, e.g. :func:`needed_models` of an ensemble spec.
    tracking_uri : str, optional
    dst : str or Path, optional
        Download directory (default: a new temporary directory).

    Raises
    ------
    ValueError
        Unknown experiment, a model without finished runs, or fold runs whose networks differ in
        more than their train settings (which each outer fold may choose for itself).
    """
    uri = tracking.tracking_uri(tracking_uri)
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r}")
    dst = Path(dst or tempfile.mkdtemp(prefix="ensemble-members-"))
    members = {}
    for name in model_names:
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=(f"tags.`{tracking.TAG_KIND}` = 'job' and tags.`{tracking.TAG_MODEL}` = {tracking.quote(name)} "
                           "and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"],
        )
        latest = {}
        for run in runs:  # newest first
            latest.setdefault(int(run.data.tags[tracking.TAG_FOLD]), run)
        if not latest:
            raise ValueError(f"experiment {experiment!r} has no finished training run of model {name!r}")
        folds, served = {}, []
        for fold, run in sorted(latest.items()):
            local = Path(download_artifacts(run_id=run.info.run_id, artifact_path=CHECKPOINT_ARTIFACT,
                                            dst_path=str(dst / name / f"fold{fold}"), tracking_uri=uri))
            folds[fold] = local / "best.pt"
            spec = ModelSpec.from_dict(json.loads((local / "spec.json").read_text()))
            # A fold may learn with its own train settings (its outer fold's sweep config and CRA
            # labels) and dropout (off in eval, no weight of its own); serving runs every fold
            # network with one spec, so the rest must agree.
            served.append({k: v for k, v in dataclasses.asdict(spec).items() if k not in ("train", "placement")}
                          | {"head_kwargs": {k: v for k, v in spec.head_kwargs.items() if k not in TRAINING_ONLY}})
        differ = sorted(k for k in served[0] if any(s[k] != served[0][k] for s in served))
        if differ:
            raise ValueError(f"model {name!r}: its latest fold runs differ in {differ}, which serving runs one "
                             "value of per model: train every fold with the same (a per-fold sweep may search "
                             "only train settings for it)")
        newest = next(iter(latest.values()))
        members[name] = MemberCheckpoints(spec=spec, folds=folds, runs={f: r.info.run_id for f, r in latest.items()},
                                          store=newest.data.params.get("store"),
                                          tags={k: newest.data.tags[k] for k in (tracking.TAG_ZOO, tracking.TAG_FINGERPRINT)
                                                if k in newest.data.tags})
    return members


def save_ensemble(path: str | Path, spec: EnsembleSpec, members: Mapping[str, MemberCheckpoints],
                  preprocessing: Preprocessing, *, integrity_dir: str | Path | None = None,
                  integrity_loader: str = DEFAULT_INTEGRITY_LOADER) -> Path:
    """Write the ensemble as a local MLflow model directory (no tracking server needed).

    Useful offline (a Kaggle notebook) and in tests; ``load_ensemble(path)`` reads it. Arguments
    as for :func:`register_ensemble`.
    """
    with tempfile.TemporaryDirectory() as staging:
        mlflow.pyfunc.save_model(str(path), **_model_arguments(spec, members, preprocessing, integrity_dir,
                                                               integrity_loader, Path(staging)))
    return Path(path)


def register_ensemble(spec: EnsembleSpec | str | Path, members: Mapping[str, MemberCheckpoints],
                      preprocessing: Preprocessing, *, tracking_uri: str | None = None, name: str = "hpa-ensemble",
                      alias: str = "champion", experiment: str | None = None,
                      integrity_dir: str | Path | None = None,
                      integrity_loader: str = DEFAULT_INTEGRITY_LOADER, promote: str = "if-better",
                      zoo: str | None = None, data_fingerprint: str | None = None):
    """Log the ensemble as a pyfunc model, register it as a new version of ``name``, tag it, and
    point ``alias`` at it if the promotion rule says so.

    Parameters
    ----------
    spec : EnsembleSpec or path of its JSON
    members : mapping of model name to MemberCheckpoints
        At least :func:`needed_models` of the spec (see :func:`member_checkpoints`).
    preprocessing : Preprocessing
        Usually ``Preprocessing.from_store(store)`` of the store the members trained on.
    tracking_uri : str, optional
        Default: ``MLFLOW_TRACKING_URI`` or local SQLite (``tracking.tracking_uri``).
    name, alias : str
        Registered model and the alias the new version may take.
    experiment : str, optional
        Experiment of the registering run (tag ``ensemble.kind=register``); default ``name``.
    integrity_dir : str or Path, optional
        The VID model's directory; packed and loaded with ``integrity_loader``. Required when
        ``spec.integrity_weighting`` is on.
    integrity_loader : str
        ``"module:function"`` taking the directory and returning an object with ``weights``.
    promote : {"if-better", "always", "never"}
        Whether the new version takes ``alias``: always, never, or when it scores better than the
        version holding it (:func:`ensemble.serving.governance.decide_promotion`). The reason is recorded
        in the version's ``promotion`` tag.
    zoo, data_fingerprint : str, optional
        Recorded as the version's tags; default: the members' training runs' tags.

    Returns
    -------
    mlflow.entities.model_registry.ModelVersion
        With its tags and aliases as they stand after promotion.
    """
    if promote not in governance.PROMOTE:
        raise ValueError(f"promote must be one of {', '.join(governance.PROMOTE)}, got {promote!r}")
    spec = spec if isinstance(spec, EnsembleSpec) else EnsembleSpec.from_json(spec)
    uri = tracking.tracking_uri(tracking_uri)
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(experiment or name, uri)
    with tempfile.TemporaryDirectory() as staging:
        arguments = _model_arguments(spec, members, preprocessing, integrity_dir, integrity_loader, Path(staging))
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{name}",
                              tags={tracking.TAG_KIND: "register"}, nested=mlflow.active_run() is not None):
            mlflow.log_params({
                "members": ",".join(needed_models(spec)),
                "folds": ",".join(f"{m}:{len(members[m].folds)}" for m in needed_models(spec)),
                "aggregation": spec.aggregation, "fusion_mode": spec.fusion_mode,
                "integrity_weighting": spec.integrity_weighting, "integrity_model": integrity_dir is not None,
                "segmenter": preprocessing.segmenter["name"], "cell_size": preprocessing.cell_size,
            })
            runs = {f"{m}/fold{f}": r for m in needed_models(spec) for f, r in members[m].runs.items()}
            if runs:
                mlflow.log_dict(runs, "member_runs.json")
            info = mlflow.pyfunc.log_model(name="model", registered_model_name=name, **arguments)
    version = str(info.registered_model_version)
    tags = governance.version_tags(spec, needed_models(spec), zoo or _members_tag(members, tracking.TAG_ZOO),
                                   data_fingerprint or _members_tag(members, tracking.TAG_FINGERPRINT))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    governance.promote_version(name, version, alias, promote, uri)
    return client.get_model_version(name, version)


def _members_tag(members: Mapping[str, MemberCheckpoints], key: str) -> str | None:
    """The members' value of a run tag (their values joined when they differ), or None."""
    return ",".join(sorted({m.tags[key] for m in members.values() if key in m.tags})) or None


def _model_arguments(spec: EnsembleSpec, members: Mapping[str, MemberCheckpoints], preprocessing: Preprocessing,
                     integrity_dir, integrity_loader: str, staging: Path) -> dict:
    """Stage the artifacts and return the keyword arguments of ``save_model`` / ``log_model``."""
    needed = needed_models(spec)
    absent = [m for m in needed if m not in members]
    if absent:
        raise ValueError(f"no checkpoints for the ensemble's models {absent}")
    empty = [m for m in needed if not members[m].folds]
    if empty:
        raise ValueError(f"models {empty} have no fold checkpoints")
    if spec.integrity_weighting and integrity_dir is None:
        raise ValueError("the ensemble spec weights cells by integrity, but no integrity model (integrity_dir) was given")
    spec.to_json(staging / "ensemble_spec.json")
    for m in needed:
        for fold, path in members[m].folds.items():
            (staging / "members" / m).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staging / "members" / m / f"fold{fold}.pt")
    # Files the segmenter reads (hpacellseg's U-Net weights, local or in a bucket) travel with the
    # model; load_context points the settings at the packed copies.
    sources = {key: value for key, value in preprocessing.segmenter["settings"].items() if _names_a_file(value)}
    segmenter_files = {key: storage.name(source) for key, source in sources.items()}
    artifacts = {"ensemble_spec": str(staging / "ensemble_spec.json"), "members": str(staging / "members"),
                 "config": str(staging / "config.json")}
    if sources:
        (staging / "segmenter").mkdir()
        for key, source in sources.items():
            with storage.open_file(source) as read, open(staging / "segmenter" / segmenter_files[key], "wb") as write:
                shutil.copyfileobj(read, write)
        artifacts["segmenter"] = str(staging / "segmenter")
    if integrity_dir is not None:
        load_integrity_hook(integrity_loader, integrity_dir)  # fail now, not on a user's machine
        artifacts["integrity"] = str(integrity_dir)
    config = {
        "version": CONFIG_VERSION,
        "preprocessing": dataclasses.asdict(preprocessing),
        "segmenter_files": segmenter_files,
        "members": {m: dataclasses.asdict(members[m].spec) for m in needed},
        "member_folds": {m: sorted(members[m].folds) for m in needed},
        "integrity_loader": integrity_loader,
    }
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    # The package travels with the model (its code_paths), without caches, so a server runs the
    # code the ensemble was registered with and needs nothing of this machine's disk.
    package = Path(ensemble.__file__).resolve().parent
    code = staging / "code" / package.name
    shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dict(python_model=str(package / "serving" / "from_code.py"), code_paths=[str(code)], artifacts=artifacts,
                signature=SIGNATURE, input_example=example_input(),
                pip_requirements=_requirements(preprocessing.segmenter["name"]),
                model_config={LOAD_NETWORKS: True})  # named, so that load_ensemble(networks=False) may change it


def _names_a_file(value) -> bool:
    """Whether a segmenter setting is a path or URL of an existing file."""
    if not isinstance(value, str) or not value:
        return False
    if storage.is_local(value):
        return Path(value.removeprefix("file://")).is_file()
    fs, path = storage.filesystem(value)
    return fs.isfile(path)


def _requirements(segmenter: str) -> list[str] | None:
    """The installed ``ensemble`` distribution's own requirements and the segmenter's
    (:data:`SEGMENTER_REQUIREMENTS`), so MLflow need not infer them (inference loads the model in
    a subprocess: slow). The package itself travels as the model's code (``code_paths``), so the
    requirements are what a serving environment installs."""
    try:
        requires = metadata.requires("ensemble") or []
    except metadata.PackageNotFoundError:
        return None
    return [r for r in requires if "extra ==" not in r] + SEGMENTER_REQUIREMENTS.get(segmenter, [])
