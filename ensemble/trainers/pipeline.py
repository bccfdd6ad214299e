"""The whole chain behind ``train_all.py``: prepare cells -> (sweep) -> train the zoo -> select -> register.

Each step skips what an earlier call finished, so re-running after an interruption resumes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from ensemble import tracking
from ensemble.data.cells import CellStore, PrepareReport, prepare
from ensemble.labels import NUM_CLASSES
from ensemble.registry import Preprocessing, member_checkpoints, needed_models, register_ensemble
from ensemble.selectors import EnsembleSpec, OOFSet, load_oof_dir, log_to_mlflow, plot_correlation, select_ensemble
from ensemble.storage import join, write_bytes
from ensemble.trainers.fit import RunContext
from ensemble.trainers.loop import evaluation_labels
from ensemble.trainers.spec import Zoo, load_zoo
from ensemble.trainers.sweep import SweepResult, apply_config, load_search_space, read_best_config, sweep
from ensemble.trainers.zoo import TrainAllResult, train_zoo


@dataclass
class PipelineResult:
    zoo: Zoo
    prepare: PrepareReport
    training: TrainAllResult
    ensemble: EnsembleSpec | None = None
    model_version: object | None = None       # mlflow ModelVersion of the registered ensemble
    sweeps: dict[str, SweepResult] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"cell store: {self.prepare.store} ({self.prepare.n_images} images, {self.prepare.n_cells} cells, "
                 f"{len(self.prepare.skipped)} skipped)",
                 f"MLflow experiment {self.training.experiment_id}, train_all run {self.training.parent_run_id}",
                 "", "Out-of-fold predictions per model:",
                 self.training.summary.to_string(index=False, float_format=lambda v: f"{v:.4f}")]
        if self.ensemble is not None:
            lines += ["", self.ensemble.report()]
        if self.model_version is not None:
            lines += ["", f"registered: models:/{self.model_version.name}@champion "
                          f"(version {self.model_version.version})"]
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
    frame = store.cells[["image_id", "cell_id", "fold"]].copy()
    frame[[f"label_{k}" for k in range(NUM_CLASSES)]] = labels
    frame["cell_truth"] = np.full(len(frame), source == "truth")
    return frame


def select_step(oof: OOFSet, store: str, out_dir: str, experiment_id: str, tracking_uri: str | None = None,
                parent_run_id: str | None = None, **options) -> EnsembleSpec:
    """``select_ensemble`` on OOF tables (:func:`load_oof_dir`, :func:`load_oof_mlflow`), scored
    against the store's labels.

    Without cell truth the per-class fusion rule cannot be fitted, so the paper's threshold rule
    is used. The spec (JSON) and the correlation plot go to ``out_dir`` (a path or URI) and to a
    MLflow run.
    """
    labels = store_labels(CellStore(store))
    options.setdefault("fusion", "fit" if labels["cell_truth"].all() else "paper")
    options.setdefault("aggregation", "hierarchical")
    spec = select_ensemble(oof, labels, **options)
    tags = {tracking.TAG_KIND: "select", **({tracking.TAG_PARENT: parent_run_id} if parent_run_id else {})}
    tracking.client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        files = [spec.to_json(Path(tmp) / "ensemble_spec.json"), plot_correlation(spec, Path(tmp) / "correlation.png")]
        for file in files:
            write_bytes(file.read_bytes(), join(out_dir, file.name))
        with mlflow.start_run(experiment_id=experiment_id, run_name="select_ensemble", tags=tags):
            log_to_mlflow(spec, files[1:])
    return spec


def sweep_model(zoo: str | Zoo, model: str, workdir: str, *, space: str | None = None, num_samples: int = 8,
                fold: int = 0, experiment: str | None = None, tracking_uri: str | None = None) -> SweepResult:
    """Sweep one model of a zoo on one fold of an existing store (``ensemble sweep``)."""
    from ensemble.data.cells import CellStore

    zoo = load_zoo(zoo) if not isinstance(zoo, Zoo) else zoo
    spec = zoo.model(model)
    ctx = context_for(zoo, workdir, experiment, tracking_uri, CellStore(store_uri(workdir)).meta["source"]["fingerprint"])
    return sweep(spec, ctx, load_search_space(space or spec.head), fold=fold, num_samples=num_samples)


def train_all(zoo: str | Zoo, data: str, workdir: str, *, experiment: str | None = None,
              tracking_uri: str | None = None, overrides: dict | None = None, sweep: bool = False,
              sweep_samples: int = 8, progress: bool = True, max_concurrent: int | None = None,
              select: bool = True, register: bool = True) -> PipelineResult:
    """Prepare the store of ``data``, optionally sweep, train every model of ``zoo`` on every fold,
    select the ensemble on the OOF predictions and register it (``models:/hpa-ensemble@champion``)."""
    zoo = load_zoo(zoo, overrides) if not isinstance(zoo, Zoo) else zoo
    report = prepare(data, store_uri(workdir), size=zoo.cell_size, n_folds=zoo.n_folds, progress=progress)
    sweeps = {}
    if sweep:
        for spec in zoo.models:
            if read_best_config(workdir, spec.name) is None:
                sweeps[spec.name] = sweep_model(zoo, spec.name, workdir, num_samples=sweep_samples,
                                                experiment=experiment, tracking_uri=tracking_uri)
        zoo = dataclasses.replace(zoo, models=tuple(apply_config(spec, read_best_config(workdir, spec.name))
                                                    for spec in zoo.models))
    training = train_zoo(zoo, store_uri(workdir), workdir, experiment=experiment, tracking_uri=tracking_uri,
                         progress=progress, max_concurrent=max_concurrent)
    ensemble = version = None
    if select and len(zoo.models) > 1:
        ensemble = select_step(load_oof_dir(join(workdir, "oof")), store_uri(workdir), join(workdir, "ensemble"),
                               training.experiment_id, tracking_uri, training.parent_run_id)
        if register:
            experiment_name = experiment or zoo.name
            members = member_checkpoints(experiment_name, needed_models(ensemble), tracking_uri)
            version = register_ensemble(ensemble, members, Preprocessing.from_store(store_uri(workdir)),
                                        tracking_uri=tracking_uri, experiment=experiment_name)
    return PipelineResult(zoo=zoo, prepare=report, training=training, ensemble=ensemble, model_version=version,
                          sweeps=sweeps)
