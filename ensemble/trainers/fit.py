"""One training job, (model spec, fold), as a Ray Train ``TorchTrainer`` with its MLflow run.

The job's MLflow run is found by its tags before anything starts: a finished job is skipped, an
interrupted one is reopened and Ray Train resumes it from its latest checkpoint (the Ray run name
is stable, ``{zoo}-{model}-fold{k}``, so the new trainer finds the old run's checkpoints).
A job of nested CRA holds out a pair of folds (``without``): it is named, tagged and stored as
``fold{i}+{j}``.

Ray Train retries a failed job (``FailureConfig``), which helps a lost node and cannot help a
model that cannot be built or run: :func:`ensemble.checks.preflight_zoo` finds those before any
job is handed to Ray.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ensemble import tracking
from ensemble.models.backbones import family_of
from ensemble.trainers.curves import training_curves
from ensemble.cluster import job_bundle
from ensemble.storage import arrow_filesystem, join, read_bytes
from ensemble.trainers.loop import OOF_METRICS, JobConfig, train_loop_per_worker
from ensemble.zoo import ModelSpec, spec_params


@dataclass(frozen=True)
class RunContext:
    """Where a zoo's jobs read, write and record."""

    zoo: str
    store: str
    workdir: str
    experiment_id: str
    tracking_uri: str
    fingerprint: str
    parent_run_id: str | None = None
    max_failures: int = 3


@dataclass(frozen=True)
class JobResult:
    model: str
    fold: int
    run_id: str
    best_val_map: float   # on the job's inner validation split, which chose the epoch
    best_epoch: int
    epochs: int
    oof_map: float        # on the held-out fold, measured once, after the choice
    seconds: float
    skipped: bool
    oof_uri: str
    without: tuple[int, ...] = ()


def fold_key(fold: int, without: tuple[int, ...] = ()) -> str:
    """A job's held-out folds as its name, OOF path and fold tag show them: ``"2"``, or ``"0+2"`` with ``without``."""
    return "+".join(str(f) for f in sorted({fold, *without}))


def job_name(zoo: str, model: str, fold: int, without: tuple[int, ...] = ()) -> str:
    return f"{zoo}-{model}-fold{fold_key(fold, without)}"


def oof_uri(workdir: str, model: str, fold: int, without: tuple[int, ...] = ()) -> str:
    return join(workdir, "oof", model, f"fold{fold_key(fold, without)}.parquet")


def validation_uri(workdir: str, model: str, fold: int) -> str:
    """Where a job's predictions of its inner validation split go (outer-fold jobs only)."""
    return join(workdir, "oof", model, f"fold{fold}.validation.parquet")


def job_tags(ctx: RunContext, spec: ModelSpec, fold: int, without: tuple[int, ...] = ()) -> dict[str, str]:
    """The tags that identify a job's MLflow run (found again by a re-run)."""
    return {tracking.TAG_KIND: "job", tracking.TAG_ZOO: ctx.zoo, tracking.TAG_MODEL: spec.name,
            tracking.TAG_FOLD: fold_key(fold, without), tracking.TAG_FINGERPRINT: ctx.fingerprint,
            tracking.TAG_SPEC: spec.fingerprint()}


def scaling_for(spec: ModelSpec) -> ScalingConfig:
    """Workers of a job, with the resources its placement declares."""
    placement = spec.placement
    return ScalingConfig(num_workers=placement.num_workers, use_gpu=placement.use_gpu,
                         resources_per_worker=job_bundle(spec))


def trainer_for(spec: ModelSpec, fold: int, ctx: RunContext, run_id: str | None = None,
                callbacks: list | None = None, name: str | None = None,
                without: tuple[int, ...] = ()) -> TorchTrainer:
    """The ``TorchTrainer`` of one job; also used by sweeps, with their own run name and callbacks.

    The job trains on every fold but ``fold`` and the folds ``without``, and predicts those.
    """
    storage_filesystem, storage_path = arrow_filesystem(join(ctx.workdir, "ray"))
    config = JobConfig(spec=dataclasses.asdict(spec), fold=fold, store=ctx.store,
                       oof_path=oof_uri(ctx.workdir, name or spec.name, fold, without), tracking_uri=ctx.tracking_uri,
                       run_id=run_id, without=tuple(without),
                       validation_path=None if name or without else validation_uri(ctx.workdir, spec.name, fold))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(config),
        scaling_config=scaling_for(spec),
        run_config=RunConfig(
            name=name or job_name(ctx.zoo, spec.name, fold, without),
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=ctx.max_failures),
            callbacks=callbacks,
        ),
    )


def _result_of(run, spec: ModelSpec, fold: int, ctx: RunContext, seconds: float, skipped: bool,
               without: tuple[int, ...]) -> JobResult:
    metrics = run.data.metrics
    return JobResult(model=spec.name, fold=fold, run_id=run.info.run_id,
                     best_val_map=float(metrics.get("best_val_map", float("nan"))),
                     best_epoch=int(metrics.get("best_epoch", -1)), epochs=int(metrics.get("epochs", 0)),
                     oof_map=float(metrics.get("oof_map", float("nan"))),
                     seconds=seconds, skipped=skipped, oof_uri=oof_uri(ctx.workdir, spec.name, fold, without),
                     without=without)


def fit_job(spec: ModelSpec, fold: int, ctx: RunContext, without: tuple[int, ...] = ()) -> JobResult:
    """Train ``spec`` on every fold but ``fold`` (and ``without``), write its OOF table, record it all in MLflow."""
    without = tuple(sorted(without))
    client = tracking.client(ctx.tracking_uri)
    name = job_name(ctx.zoo, spec.name, fold, without)
    run, finished = tracking.start_or_resume_run(ctx.experiment_id, job_tags(ctx, spec, fold, without), name,
                                                 ctx.tracking_uri, ctx.parent_run_id)
    if finished:
        return _result_of(run, spec, fold, ctx, 0.0, skipped=True, without=without)
    run_id = run.info.run_id
    started = time.perf_counter()
    try:
        client.set_tag(run_id, tracking.TAG_HEAD, spec.head)
        client.set_tag(run_id, tracking.TAG_BACKBONE, spec.backbone)
        client.set_tag(run_id, tracking.TAG_FAMILY, family_of(spec.backbone))
        # The client API throughout: `mlflow.start_run` would mark the run FINISHED on exit, and
        # FINISHED must mean "OOF and checkpoint logged", or a re-run would skip a broken job.
        if not run.data.params:
            params = {**spec_params(spec), "fold": fold_key(fold, without), "store": ctx.store}
            client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        result = trainer_for(spec, fold, ctx, run_id=run_id, without=without).fit()
        summary = result.return_value
        client.set_tag(run_id, tracking.TAG_NODE, summary["node_id"])  # the Ray node its (last) workers ran on
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(summary[k]), now, 0)
                                          for k in ("best_val_map", "best_epoch", "epochs", *OOF_METRICS)
                                          if k in summary])
        with tempfile.TemporaryDirectory() as tmp:
            tables = {"oof.parquet": oof_uri(ctx.workdir, spec.name, fold, without)}
            if not without:  # an outer-fold job also predicted its inner validation split
                tables["validation.parquet"] = validation_uri(ctx.workdir, spec.name, fold)
            for file, uri in tables.items():
                (Path(tmp) / file).write_bytes(read_bytes(uri))
                client.log_artifact(run_id, str(Path(tmp) / file), artifact_path="oof")
            client.log_artifact(run_id, training_curves(summary["history"], Path(tmp) / "curves.png",
                                                        title=name))
            with result.checkpoint.as_directory() as directory:
                client.log_artifact(run_id, str(Path(directory) / "best.pt"), artifact_path="checkpoint")
                client.log_artifact(run_id, str(Path(directory) / "spec.json"), artifact_path="checkpoint")
    except BaseException:
        tracking.end_run(run_id, "FAILED", ctx.tracking_uri)
        raise
    tracking.end_run(run_id, "FINISHED", ctx.tracking_uri)
    return _result_of(client.get_run(run_id), spec, fold, ctx, time.perf_counter() - started, skipped=False,
                      without=without)
