"""The whole chain behind ``train_all.py``: prepare cells -> (sweep) -> (CRA rounds) -> train the zoo
-> select -> (VID) -> register.

The only module that knows the whole chain: it calls down into the data build, the trainers,
the selectors and the registry, which know nothing of each other. Each step skips what an
earlier call finished, so re-running after an interruption resumes.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from ensemble import tracking
from ensemble.checks import data_notes
from ensemble.cluster import check_jobs_fit, check_shared, cluster_shape, default_concurrency
from ensemble.data.store import CellStore, evaluation_labels, open_store
from ensemble.data.store_build import PrepareReport, prepare
from ensemble.integrity import IntegrityCV
from ensemble.integrity.remote import fit_integrity
from ensemble.metrics import POSITIVE_THRESHOLD
from ensemble.oof import CELL_COLUMNS, KEYS, LABEL_COLUMNS, OOFSet, load_oof_dir
from ensemble.serving.registry import member_checkpoints, needed_models, register_ensemble
from ensemble.selectors import EnsembleSpec, Objective, apply_spec, log_to_mlflow, plot_correlation, select_ensemble
from ensemble.selectors.served import as_served, load_validation_dir
from ensemble.selectors.weighting import WeightingDecision, decide_weighting
from ensemble.serving.model import Preprocessing
from ensemble.storage import join, write_bytes
from ensemble.trainers.fit import RunContext
from ensemble.trainers.relabel import RoundResult, cra_rounds, fold_specs, nested_trainer
from ensemble.trainers.sweep import SweepResult, apply_config, load_search_space, read_best_config, sweep
from ensemble.trainers.jobs import FoldSpecs, JobsFailedError, TrainAllResult, train_zoo  # noqa: F401  (the CLI's)
from ensemble.zoo import ModelSpec, Zoo, load_zoo


@dataclass
class IntegrityResult:
    """The VID step of :func:`train_all`.

    Attributes
    ----------
    uri : str
        The saved :class:`~ensemble.integrity.IntegrityModel` (packed with the ensemble).
    cv : IntegrityCV
        Held-out scores of the detector (cross-validated by image).
    decision : WeightingDecision
        The ensemble's nested predictions scored under the selection's objective without the
        held-out integrity weights, with them, and as each outer fold's decision (taken on the
        other folds) says, on the cells with cell labels; ``decision.weighting`` is whether the
        registered ensemble multiplies its probabilities by the weights.
    objective : str
        The metric of those scores (the selection's).
    """

    uri: str
    cv: IntegrityCV
    decision: WeightingDecision
    objective: str

    @property
    def weighting(self) -> bool:
        return self.decision.weighting

    def metrics(self) -> dict[str, float]:
        """Figures logged to the train_all run."""
        held_out = {f"vid_{name}_{column}": float(value) for (name, column), value in self.cv.scores.stack().items()}
        return {**held_out, "vid_capture_accuracy": float(self.cv.capture_accuracy),
                "ensemble_nested_map_without_integrity": self.decision.without,
                "ensemble_nested_map_with_integrity": self.decision.with_weights,
                "ensemble_nested_map_integrity_as_decided": self.decision.nested}

    def report(self) -> str:
        scores = self.cv.scores.to_string(float_format=lambda v: f"{v:.4f}")
        return (f"Visual integrity (VID, held out by image):\n{scores}\n"
                f"capture-class accuracy {self.cv.capture_accuracy:.4f}\n"
                f"ensemble nested {self.objective} mAP without weighting {self.decision.without:.4f}, "
                f"with {self.decision.with_weights:.4f}, as each fold's decision on the other folds says "
                f"{self.decision.nested:.4f} (weighting per fold: "
                f"{', '.join(f'{f}: ' + ('on' if on else 'off') for f, on in self.decision.fold_decisions.items())})"
                f" -> weighting {'on' if self.weighting else 'off'}")


@dataclass
class PipelineResult:
    zoo: Zoo
    prepare: PrepareReport
    training: TrainAllResult
    ensemble: EnsembleSpec | None = None
    model_version: object | None = None       # mlflow ModelVersion of the registered ensemble
    sweeps: dict[tuple[str, int], SweepResult] = field(default_factory=dict)   # (model, outer fold) ->
    relabel: list[RoundResult] = field(default_factory=list)
    integrity: IntegrityResult | None = None

    def report(self) -> str:
        lines = [f"cell store: {self.prepare.store} ({self.prepare.n_images} images, {self.prepare.n_cells} cells, "
                 f"{len(self.prepare.skipped)} skipped)",
                 f"MLflow experiment {self.training.experiment_id}, train_all run {self.training.parent_run_id}"]
        if self.relabel:
            # One row per label version: its quality, then the OOF mAP of the DSAs trained on it.
            final = self.training.summary.set_index("model")["oof_cell_map"]
            last = self.relabel[-1]
            table = pd.DataFrame([{"labels": r.trained_on, "label_ap": r.trained_on_quality, **r.model_map}
                                  for r in self.relabel]
                                 + [{"labels": last.version, "label_ap": last.quality,
                                     **{model: final[model] for model in last.model_map}}])
            lines += ["", "CRA rounds: each label version's AP against cell truth, and the OOF cell mAP of the DSAs "
                          "trained on it (the last one's are the final zoo's):",
                      table.to_string(index=False, float_format=lambda v: f"{v:.4f}")]
        lines += ["", "Out-of-fold predictions per model:",
                  self.training.summary.to_string(index=False, float_format=lambda v: f"{v:.4f}")]
        if self.ensemble is not None:
            lines += ["", self.ensemble.report()]
        if self.integrity is not None:
            lines += ["", self.integrity.report()]
        if self.model_version is not None:
            lines += ["", f"registered: models:/{self.model_version.name}/{self.model_version.version} "
                          f"({self.model_version.tags.get(tracking.TAG_PROMOTION, '')})"]
        return "\n".join(lines)


def store_uri(workdir: str) -> str:
    return join(workdir, "store")


def context_for(zoo: Zoo, workdir: str, experiment: str | None, tracking_uri: str | None,
                fingerprint: str) -> RunContext:
    uri = tracking.tracking_uri(tracking_uri)
    return RunContext(zoo=zoo.name, store=store_uri(workdir), workdir=workdir,
                      experiment_id=tracking.ensure_experiment(experiment or zoo.name, uri), tracking_uri=uri,
                      fingerprint=fingerprint)


def store_labels(store: CellStore) -> pd.DataFrame:
    """The selector's labels: one row per store cell, cell truth where known (``cell_truth``)."""
    labels, source = evaluation_labels(store)
    frame = store.cells[[*KEYS, "fold"]].copy()
    frame[LABEL_COLUMNS] = labels
    frame["cell_truth"] = np.full(len(frame), source == "truth")
    return frame


def select_step(oof: OOFSet, store: CellStore | str, out_dir: str, experiment_id: str,
                tracking_uri: str | None = None, parent_run_id: str | None = None, *, strict: bool = False,
                validation: Mapping[str, pd.DataFrame] | None = None, copy: bool = True,
                **options) -> EnsembleSpec:
    """``select_ensemble`` on OOF tables (:func:`load_oof_dir`, :func:`load_oof_mlflow`), scored
    against the store's labels.

    Without cell truth the per-class fusion rule cannot be fitted, so the paper's threshold rule
    is used; a zoo with no image stream (no DSA head) has nothing to fuse. The spec (JSON) and the
    correlation plot go to ``out_dir`` (a path or URI) and to a MLflow run.

    OOF tables that together miss cells of the store (a fold never trained, tables of another
    store) are scored on the cells they have: a warning says how many and which images, or with
    ``strict`` a ValueError.

    With the jobs' ``validation`` predictions (:func:`~ensemble.selectors.served.load_validation_dir`)
    selection sees each cell as serving predicts it, by the average of the fold networks
    (:mod:`ensemble.selectors.served`); without them, by the one network of the OOF, and a warning
    says so. ``copy=False`` writes that served form into ``oof``'s arrays rather than beside them
    (a large OOF is then not held twice).
    """
    store = open_store(store)
    labels = store_labels(store)
    missing = ~pd.MultiIndex.from_frame(labels[KEYS]).isin(pd.MultiIndex.from_frame(oof.index[KEYS]))
    if missing.any():
        images = labels.loc[missing, "image_id"].unique()
        message = (f"the OOF tables together miss {int(missing.sum())} of the {len(labels)} cells of {store.uri}, "
                   f"in {len(images)} images ({', '.join(map(str, images[:5]))}{', ...' if len(images) > 5 else ''}): "
                   "selection scores only the cells they cover")
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    options.setdefault("fusion", "off" if not oof.image else "fit" if labels["cell_truth"].all() else "paper")
    options.setdefault("aggregation", "hierarchical")
    oof, noise = as_served(oof, validation, copy=copy)
    spec = select_ensemble(oof, labels, **options)
    tags = {tracking.TAG_KIND: "select", **({tracking.TAG_PARENT: parent_run_id} if parent_run_id else {})}
    tracking.client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        files = [spec.to_json(Path(tmp) / "ensemble_spec.json"), plot_correlation(spec, Path(tmp) / "correlation.png")]
        for file in files:
            write_bytes(file.read_bytes(), join(out_dir, file.name))
        with mlflow.start_run(experiment_id=experiment_id, run_name="select_ensemble", tags=tags):
            log_to_mlflow(spec, files[1:])
            mlflow.log_param("served_form", noise is not None)
            if noise is not None:
                mlflow.log_metrics({f"fold_noise.{m}": v for m, v in noise.spread().items()} | {
                    "fold_noise_pairs": noise.n_pairs})
    return spec


def relabel_step(zoo: Zoo, workdir: str, *, tracking_uri: str | None = None, progress: bool = True,
                 max_concurrent: int | None = None, folds: list[int] | None = None,
                 store: CellStore | None = None) -> tuple[FoldSpecs, list[RoundResult]]:
    """CRA rounds of ``zoo.relabel``, nested in the folds (:mod:`ensemble.trainers.relabel`).

    Returns each (model, fold) job of the zoo set to train on its outer fold's last label
    version (``cra{R}-f{j}``, made from the other folds alone), and the rounds; no job and no
    round without ``zoo.relabel.rounds``. Each round's DSAs train as their own zoo
    (``{zoo}-{label version}``, its own MLflow experiment and ``{workdir}/labels-{version}``), so
    they never mix with the final models. ``folds``: the outer folds to re-label for (default: all);
    ``store``: the workdir's store, when already open.
    """
    if not zoo.relabel.rounds:
        return {}, []
    store = store if store is not None else CellStore(store_uri(workdir))  # a store has a len()
    train = nested_trainer(zoo, store, workdir, tracking_uri=tracking_uri, progress=progress,
                           max_concurrent=max_concurrent)
    rounds = cra_rounds(store, train, rounds=zoo.relabel.rounds, beta=zoo.relabel.beta, folds=folds)
    return fold_specs(zoo, rounds[-1].versions), rounds


def integrity_step(zoo: Zoo, workdir: str, spec: EnsembleSpec, oof: OOFSet,
                   store: CellStore | None = None) -> IntegrityResult:
    """Fit the VID of ``zoo.integrity`` on the store, score it held out, decide the weighting.

    The held-out weights (cross-validated by image) multiply the ensemble's nested predictions
    (each fold's cells predicted by the selection fitted without that fold; the in-sample ones
    when the spec was selected without nesting). ``weighting: auto`` turns weighting on where it
    raises the selection's objective, decided per outer fold on the other folds and reported
    nested (:func:`~ensemble.selectors.weighting.decide_weighting`). Resumable: the held-out
    table and the model are kept under ``{workdir}/integrity``. ``store``: the workdir's store,
    when already open.
    """
    settings = zoo.integrity
    store = store if store is not None else CellStore(store_uri(workdir))  # a store has a len()
    # A Ray task with the zoo's placement: a GPU worker on a cluster, not the head's CPU.
    cv, model_uri = fit_integrity(store.uri, join(workdir, "integrity"), settings, zoo.placement)
    fused = spec.nested_predictions if spec.nested_predictions is not None else apply_spec(spec, oof)
    weights = cv.cells.set_index(KEYS)[f"w_{settings.rule}"]
    # Cells without a good/bad label were not held out: they keep weight 1.
    w = weights.reindex(pd.MultiIndex.from_frame(fused[KEYS])).fillna(1.0).to_numpy()
    labels = store_labels(store).set_index(KEYS).reindex(pd.MultiIndex.from_frame(fused[KEYS]))
    y = labels[LABEL_COLUMNS].to_numpy()
    known = np.isfinite(y).all(axis=1)
    objective = Objective.build(spec.objective, y[known].T > POSITIVE_THRESHOLD, fused["image_id"].to_numpy()[known])
    decision = decide_weighting(fused[CELL_COLUMNS].to_numpy()[known], w[known], objective,
                                fused["fold"].to_numpy()[known], settings.weighting)
    return IntegrityResult(uri=model_uri, cv=cv, decision=decision, objective=spec.objective)


def sweep_model(zoo: str | Zoo, model: str, workdir: str, *, space: str | None = None, num_samples: int = 8,
                fold: int = 0, experiment: str | None = None, tracking_uri: str | None = None,
                spec: ModelSpec | None = None, max_concurrent: int = 2) -> SweepResult:
    """Sweep one model of a zoo for one outer fold of an existing store (``ensemble sweep``).

    The trials train on the other folds, ``max_concurrent`` at a time; the best config is the one
    the model's job on ``fold`` trains with. ``spec``: the model's spec for that fold, when not the
    zoo's (its CRA labels).
    """
    zoo = load_zoo(zoo) if not isinstance(zoo, Zoo) else zoo
    spec = spec or zoo.model(model)
    ctx = context_for(zoo, workdir, experiment, tracking_uri, CellStore(store_uri(workdir)).meta["source"]["fingerprint"])
    return sweep(spec, ctx, load_search_space(space or spec.head), fold=fold, num_samples=num_samples,
                 max_concurrent=max_concurrent)


def sweep_step(zoo: Zoo, workdir: str, specs: FoldSpecs, *, num_samples: int = 8, experiment: str | None = None,
               tracking_uri: str | None = None, folds: list[int] | None = None,
               max_concurrent: int = 2) -> tuple[FoldSpecs, dict[tuple[str, int], SweepResult]]:
    """A sweep per model and outer fold (``train_all --sweep``); returns each job's spec with its fold's best config.

    The sweep of fold j tunes the spec its job will train with (``specs``, else the zoo's: its
    CRA labels), on the other folds, so no label of fold j chooses the settings that predict it:
    K sweeps per model. A fold whose config is recorded (``{workdir}/sweeps/{model}/fold{j}.yaml``)
    is not swept again. ``folds``: the outer folds to sweep (default: all); ``max_concurrent``
    trials at a time.
    """
    tuned, sweeps = {}, {}
    for spec in zoo.models:
        for fold in range(zoo.n_folds) if folds is None else folds:
            own = specs.get((spec.name, fold), spec)
            if read_best_config(workdir, spec.name, fold) is None:
                sweeps[spec.name, fold] = sweep_model(zoo, spec.name, workdir, num_samples=num_samples, fold=fold,
                                                      experiment=experiment, tracking_uri=tracking_uri, spec=own,
                                                      max_concurrent=max_concurrent)
            tuned[spec.name, fold] = apply_config(own, read_best_config(workdir, spec.name, fold))
    return tuned, sweeps


def train_all(zoo: str | Zoo, data: str, workdir: str, *, experiment: str | None = None,
              tracking_uri: str | None = None, overrides: dict | None = None, sweep: bool = False,
              sweep_samples: int = 8, progress: bool = True, max_concurrent: int | None = None,
              segmenter: str = "classical", segmenter_settings: dict | None = None,
              cluster_config: str | None = None, select: bool = True, register: bool = True,
              integrity: str = "auto") -> PipelineResult:
    """Prepare the store of ``data``, optionally sweep, train every model of ``zoo`` on every fold,
    select the ensemble on the OOF predictions and register it (``models:/hpa-ensemble@champion``).

    Before anything starts, the VID's labels are looked for (``integrity``: on, off, or auto: when
    the zoo enables it and the dataset has cell truth or the zoo ``integrity.labels_csv``;
    :func:`ensemble.checks.resolve_integrity`) and what the run cannot do on ``data`` (no cell truth:
    Kaggle's data) is warned once; the cluster is checked (:mod:`ensemble.cluster`): every job fits
    some node type, and on several nodes the tracking URI and ``workdir`` reach them all.
    ``max_concurrent`` jobs are handed to Ray at once (default: every job on an autoscaling
    cluster, what the nodes hold on a fixed one). ``segmenter`` and its settings cut the cells
    (``hpacellseg`` with its two weight files as URLs, on real HPA data).
    """
    zoo = load_zoo(zoo, overrides) if not isinstance(zoo, Zoo) else zoo
    zoo, notes = data_notes(zoo, data, integrity)  # before prepare, which takes hours on real data
    for note in notes:
        warnings.warn(note, stacklevel=2)
    shape = cluster_shape(cluster_config)
    check_jobs_fit(zoo, shape)
    check_shared(shape, tracking.tracking_uri(tracking_uri), workdir)
    report = prepare(data, store_uri(workdir), cell_size=zoo.cell_size, n_folds=zoo.n_folds, segmenter=segmenter,
                     segmenter_settings=segmenter_settings, progress=progress)
    # The store's fold count is the zoo's: prepare refuses a store built with another.
    store = CellStore(store_uri(workdir))  # opened once: every step below reads this one
    max_concurrent = max_concurrent or default_concurrency(zoo, shape, len(zoo.models) * zoo.n_folds)
    # Each outer fold's job trains on labels (CRA) and settings (sweep) its own labels did not choose.
    specs, rounds = relabel_step(zoo, workdir, tracking_uri=tracking_uri, progress=progress,
                                 max_concurrent=max_concurrent, store=store)
    sweeps = {}
    if sweep:
        specs, sweeps = sweep_step(zoo, workdir, specs, num_samples=sweep_samples, experiment=experiment,
                                   tracking_uri=tracking_uri)
    training = train_zoo(zoo, store, workdir, experiment=experiment, tracking_uri=tracking_uri,
                         progress=progress, max_concurrent=max_concurrent, specs=specs)
    ensemble = version = integrity = None
    if select and len(zoo.models) > 1:
        # The zoo's own models: the workdir may hold tables of models an earlier zoo trained.
        models = [m.name for m in zoo.models]
        oof = load_oof_dir(join(workdir, "oof"), models=models)
        # copy=False: from here on ``oof`` is the served form selection scored, also for the VID.
        ensemble = select_step(oof, store, join(workdir, "ensemble"), training.experiment_id,
                               tracking_uri, training.parent_run_id,
                               validation=load_validation_dir(join(workdir, "oof"), models), copy=False)
        if zoo.integrity.enabled:
            integrity = integrity_step(zoo, workdir, ensemble, oof, store)
            client = tracking.client(tracking_uri)
            for key, value in integrity.metrics().items():
                client.log_metric(training.parent_run_id, key, value)
            ensemble = dataclasses.replace(ensemble, integrity_weighting=integrity.weighting)
        if register:
            experiment_name = experiment or zoo.name
            members = member_checkpoints(experiment_name, needed_models(ensemble), tracking_uri)
            version = register_ensemble(ensemble, members, Preprocessing.from_store(store),
                                        tracking_uri=tracking_uri, experiment=experiment_name,
                                        integrity_dir=integrity.uri if integrity else None, zoo=zoo.name)
    return PipelineResult(zoo=zoo, prepare=report, training=training, ensemble=ensemble, model_version=version,
                          sweeps=sweeps, relabel=rounds, integrity=integrity)
