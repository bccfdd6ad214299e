"""Hyperparameter sweeps: Ray Tune with ASHA and Optuna, each trial a Ray Train job on one fold.

Tune + Train under Ray Train V2: the trainable is a driver function that builds a
``TorchTrainer`` whose ``TuneReportCallback`` forwards each epoch's report to Tune (STACK.md).
Search spaces are YAML (:mod:`ensemble.search_space`); the best config is written beside the
zoo's runs and recorded in MLflow, and ``train_all --sweep`` trains with it. Trials are scored on
the job's inner validation split (``val_map``), never on its held-out fold, so the config chosen
here leaves that fold's OOF out of sample.
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
from ensemble.storage import arrow_filesystem, join, read_bytes, write_bytes
from ensemble.search_space import DOMAIN_ARGUMENTS, apply_config, read_search_space
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
    """A search space (:func:`ensemble.search_space.read_search_space`) as Ray Tune domains."""
    return {key: DOMAINS[domain["type"]](*(domain[name] for name in DOMAIN_ARGUMENTS[domain["type"]]))
            for key, domain in read_search_space(path).items()}


@dataclass
class SweepResult:
    model: str
    best_config: dict[str, Any]
    best_val_map: float
    trials: pd.DataFrame
    config_uri: str


def best_config_uri(workdir: str, model: str) -> str:
    return join(workdir, "sweeps", f"{model}.yaml")


def read_best_config(workdir: str, model: str) -> dict[str, Any] | None:
    """The best config a sweep recorded for ``model``, or None if none was run."""
    from ensemble.storage import exists

    uri = best_config_uri(workdir, model)
    return yaml.safe_load(read_bytes(uri)) if exists(uri) else None


def sweep(spec: ModelSpec, ctx: RunContext, space: dict[str, Any], *, fold: int = 0, num_samples: int = 8,
          max_concurrent: int = 2, grace_period: int = 1, seed: int = 0) -> SweepResult:
    """Search ``space`` for ``spec`` on one fold: Optuna proposes, ASHA stops weak trials early.

    Each trial is a MLflow child run of a sweep run (params, per-epoch metrics); the best config is
    written to ``{workdir}/sweeps/{model}.yaml`` and logged on the sweep run.
    """
    sweep_tags = {tracking.TAG_KIND: "sweep", tracking.TAG_ZOO: ctx.zoo, tracking.TAG_MODEL: spec.name}
    client = tracking.client(ctx.tracking_uri)
    parent = client.create_run(ctx.experiment_id, run_name=f"sweep-{spec.name}", tags=sweep_tags)

    def trial(config: dict[str, Any]) -> None:
        trial_spec = apply_config(spec, config)
        name = f"sweep-{ctx.zoo}-{spec.name}-{tune.get_context().get_trial_id()}"
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
        # CPUs. A whole CPU per driver as well deadlocks small machines (STACK.md): give workers
        # fractional CPUs there (TrainSettings.cpus_per_worker) so drivers and workers both fit.
        tune.with_resources(trial, {"CPU": TRIAL_DRIVER_CPU}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_map", mode="max", scheduler=scheduler, search_alg=searcher,
                                    num_samples=num_samples, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=f"sweep-{ctx.zoo}-{spec.name}", storage_path=storage_path,
                                  storage_filesystem=storage_filesystem,
                                  callbacks=[mlflow_callback]),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="val_map", mode="max", scope="all")
    # One row per trial at its best epoch, plus how many epochs it ran (fewer: ASHA stopped it).
    trials = results.get_dataframe(filter_metric="val_map", filter_mode="max")
    epochs_run = {r.metrics["trial_id"]: r.metrics["training_iteration"] for r in results if r.metrics}
    trials["epochs_run"] = trials["trial_id"].map(epochs_run)
    best_config = {k: v for k, v in best.config.items()}
    best_map = float(trials["val_map"].max())
    uri = best_config_uri(ctx.workdir, spec.name)
    write_bytes(yaml.safe_dump(best_config, sort_keys=True).encode(), uri)
    client.log_dict(parent.info.run_id, best_config, "best_config.yaml")
    client.log_metric(parent.info.run_id, "best_val_map", best_map)
    client.log_text(parent.info.run_id, trials.to_csv(index=False), "trials.csv")
    tracking.end_run(parent.info.run_id, "FINISHED", ctx.tracking_uri)
    return SweepResult(model=spec.name, best_config=best_config, best_val_map=best_map, trials=trials,
                       config_uri=uri)
