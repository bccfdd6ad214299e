"""Hyperparameter sweeps: Ray Tune with ASHA and Optuna, each trial a Ray Train job on one fold.

Tune + Train under Ray Train V2: the trainable is a driver function that builds a
``TorchTrainer`` whose ``TuneReportCallback`` forwards each epoch's report to Tune.
Search spaces are YAML (:mod:`ensemble.zoo.search_space`).

A sweep is nested in the folds: the sweep of outer fold j trains its trials on the other folds
and scores them on their inner validation split (``val_map``), and its best config, written to
``{workdir}/sweeps/{model}/fold{j}.yaml`` and recorded in MLflow, trains only the job that
predicts fold j (``train_all --sweep``). No label of fold j reaches the settings that predict
it; the price is a sweep per fold, K x ``num_samples`` trials per model instead of
``num_samples`` (a config shared by all folds would be chosen with every fold's labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from ensemble import tracking
from ensemble.storage import arrow_filesystem, exists, join, read_bytes, write_bytes
from ensemble.zoo.search_space import DOMAIN_ARGUMENTS, apply_config, read_search_space
from ensemble.trainers.fit import RunContext, trainer_for
from ensemble.zoo import ModelSpec

DOMAINS = {
    "loguniform": tune.loguniform,
    "uniform": tune.uniform,
    "quniform": tune.quniform,
    "randint": tune.randint,
    "choice": tune.choice,
}
TRIAL_DRIVER_CPU = 0.01


def load_search_space(path: str | Path) -> dict[str, Any]:
    """A search space (:func:`ensemble.zoo.search_space.read_search_space`) as Ray Tune domains."""
    return {key: DOMAINS[domain["type"]](*(domain[name] for name in DOMAIN_ARGUMENTS[domain["type"]]))
            for key, domain in read_search_space(path).items()}


@dataclass
class SweepResult:
    model: str
    fold: int                     # the outer fold whose job trains with ``best_config``
    best_config: dict[str, Any]
    best_val_map: float
    trials: pd.DataFrame
    config_uri: str


def best_config_uri(workdir: str, model: str, fold: int) -> str:
    return join(workdir, "sweeps", model, f"fold{fold}.yaml")


def read_best_config(workdir: str, model: str, fold: int) -> dict[str, Any] | None:
    """The best config the sweep of outer fold ``fold`` recorded for ``model``, or None if none was run."""
    uri = best_config_uri(workdir, model, fold)
    return yaml.safe_load(read_bytes(uri)) if exists(uri) else None


def sweep(spec: ModelSpec, ctx: RunContext, space: dict[str, Any], *, fold: int = 0, num_samples: int = 8,
          max_concurrent: int = 2, grace_period: int = 1, seed: int = 0) -> SweepResult:
    """Search ``space`` for ``spec`` on outer fold ``fold``: Optuna proposes, ASHA stops weak trials early.

    Trials train on every fold but ``fold`` and are scored on their inner validation split. Each
    trial is a MLflow child run of a sweep run (params, per-epoch metrics); the best config is
    written to ``{workdir}/sweeps/{model}/fold{fold}.yaml`` and logged on the sweep run.
    """
    sweep_tags = {tracking.TAG_KIND: "sweep", tracking.TAG_ZOO: ctx.zoo, tracking.TAG_MODEL: spec.name,
                  tracking.TAG_FOLD: str(fold)}
    client = tracking.client(ctx.tracking_uri)
    parent = client.create_run(ctx.experiment_id, run_name=f"sweep-{spec.name}-fold{fold}", tags=sweep_tags)

    def trial(config: dict[str, Any]) -> None:
        trial_spec = apply_config(spec, config)
        name = f"sweep-{ctx.zoo}-{spec.name}-fold{fold}-{tune.get_context().get_trial_id()}"
        trainer_for(trial_spec, fold, ctx, callbacks=[TuneReportCallback()], name=name).fit()

    searcher = ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=max_concurrent)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.train.epochs,
                              grace_period=grace_period, reduction_factor=2)
    mlflow_callback = MLflowLoggerCallback(
        tracking_uri=ctx.tracking_uri, experiment_name=client.get_experiment(ctx.experiment_id).name,
        tags={**sweep_tags, tracking.TAG_KIND: "trial", tracking.TAG_PARENT: parent.info.run_id},
        save_artifact=False)
    storage_filesystem, storage_path = arrow_filesystem(join(ctx.workdir, "ray"))
    tuner = tune.Tuner(
        # The driver holds a token CPU share (Tune refuses none); its Train workers hold the real
        # CPUs. A whole CPU per driver as well deadlocks small machines: give workers
        # fractional CPUs there (TrainSettings.cpus_per_worker) so drivers and workers both fit.
        tune.with_resources(trial, {"CPU": TRIAL_DRIVER_CPU}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_map", mode="max", scheduler=scheduler, search_alg=searcher,
                                    num_samples=num_samples, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=f"sweep-{ctx.zoo}-{spec.name}-fold{fold}", storage_path=storage_path,
                                  storage_filesystem=storage_filesystem,
                                  callbacks=[mlflow_callback]),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="val_map", mode="max", scope="all")
    # One row per trial at its best epoch, plus how many epochs it ran (fewer: ASHA stopped it; none:
    # it failed before its first report, and Tune goes on without it).
    trials = results.get_dataframe(filter_metric="val_map", filter_mode="max")
    epochs_run = {r.metrics["trial_id"]: r.metrics["training_iteration"] for r in results
                  if r.metrics and "training_iteration" in r.metrics}
    trials["epochs_run"] = trials["trial_id"].map(epochs_run)
    best_config = {k: v for k, v in best.config.items()}
    best_map = float(trials["val_map"].max())
    uri = best_config_uri(ctx.workdir, spec.name, fold)
    write_bytes(yaml.safe_dump(best_config, sort_keys=True).encode(), uri)
    client.log_dict(parent.info.run_id, best_config, "best_config.yaml")
    client.log_metric(parent.info.run_id, "best_val_map", best_map)
    client.log_text(parent.info.run_id, trials.to_csv(index=False), "trials.csv")
    tracking.end_run(parent.info.run_id, "FINISHED", ctx.tracking_uri)
    return SweepResult(model=spec.name, fold=fold, best_config=best_config, best_val_map=best_map, trials=trials,
                       config_uri=uri)
