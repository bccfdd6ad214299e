"""Train every (model, fold) of a zoo and assemble the OOF tables.

Jobs are Ray tasks that each drive a ``TorchTrainer``. Ray places each job's workers where the
resources its placement declares are free and queues the rest, so the same call fills one laptop
or a GPU cluster (where the queued demand is what makes an autoscaler add nodes).

Every model is first built and run once on the driver (:func:`ensemble.checks.preflight_zoo`):
a model that cannot be fails there in seconds, with no job started and no run recorded, rather
than after Ray Train has retried each of its jobs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from ensemble import tracking
from ensemble.cluster import cluster_shape, default_concurrency
from ensemble.data.store import CellStore, evaluation_labels, open_store
from ensemble.metrics import cell_map
from ensemble.models.backbones import family_of
from ensemble.oof import CELL_COLUMNS, KEYS
from ensemble.storage import exists, filesystem, join, read_parquet, write_bytes, write_parquet
from ensemble.checks import preflight_zoo
from ensemble.trainers.fit import JobResult, RunContext, fit_job, fold_key, oof_uri, validation_uri
from ensemble.zoo import ModelSpec, Zoo

FoldSpecs = Mapping[tuple[str, int], ModelSpec]
"""The spec of (model name, fold) jobs that do not train with the zoo's own: each outer fold's
sweep config and CRA label version."""


class JobsFailedError(RuntimeError):
    """Jobs of a zoo failed; the message has one line per job and says whether a re-run can help."""


# Errors that a retry or a re-run repeats (code or configuration); others (a lost node or
# process, memory, storage, network) may pass on a re-run, which resumes from the last checkpoint.
REPEATING = (TypeError, ValueError, KeyError, AttributeError, IndexError, NotImplementedError, AssertionError)


def _root_cause(error: BaseException) -> BaseException:
    """The error behind Ray's wrappers: a task's cause, a Ray Train worker group's first worker failure."""
    while True:
        cause = getattr(error, "cause", None)
        failures = getattr(error, "worker_failures", None) or {}
        inner = cause if isinstance(cause, BaseException) else next(iter(failures.values()), None)
        if inner is None or inner is error:
            return error
        error = inner


def failure_report(failures: list[tuple[str, int | None, BaseException]], source: str) -> str:
    """The message of :class:`JobsFailedError`: each job, its cause in one line, and what to do."""
    lines, repeat, transient = [], False, False
    for name, fold, error in failures:
        cause = _root_cause(error)
        first = (str(cause).strip().splitlines() or [""])[0]
        where = f"{name}" + ("" if fold is None else f" fold {fold}")
        lines.append(f"  {where}: {type(cause).__name__}: {first}")
        repeat |= isinstance(cause, REPEATING)
        transient |= not isinstance(cause, REPEATING)
    advice = []
    if repeat:
        advice.append(f"a re-run repeats errors of code or configuration: change what their line says in {source}")
    if transient:
        advice.append(f"{'the others' if repeat else 'these'} may pass on a re-run, which skips finished jobs and "
                      "resumes failed ones from their last checkpoint")
    return f"{len(failures)} job(s) failed:\n" + "\n".join(lines) + "\n" + "; ".join(advice)


@dataclass(frozen=True)
class Job:
    """One training job: ``spec`` trained on every fold but ``fold`` and ``without``, recorded in ``ctx``."""

    spec: ModelSpec
    fold: int
    ctx: RunContext
    without: tuple[int, ...] = ()


@dataclass
class TrainAllResult:
    zoo: str
    experiment_id: str
    parent_run_id: str
    jobs: list[JobResult]
    oof: dict[str, str]                       # model -> URI of its OOF table over all folds
    summary: pd.DataFrame = field(repr=False)


def parent_run(zoo: Zoo, experiment_id: str, fingerprint: str, uri: str | None):
    """The train_all run of this zoo and data: an unfinished one is reopened, else a new one."""
    tags = {tracking.TAG_KIND: "train_all", tracking.TAG_ZOO: zoo.name, tracking.TAG_FINGERPRINT: fingerprint}
    runs = [r for r in tracking.find_runs(experiment_id, tags, uri) if r.info.status != "FINISHED"]
    if runs:
        tracking.client(uri).update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0]
    return tracking.client(uri).create_run(experiment_id, run_name=f"train_all-{zoo.name}", tags=tags)


def open_zoo(zoo: Zoo, store: CellStore | str, workdir: str, experiment: str | None = None,
             tracking_uri: str | None = None) -> RunContext:
    """The context of a zoo's jobs: its MLflow experiment and train_all run (reopened if unfinished)."""
    store = open_store(store)
    uri = tracking.tracking_uri(tracking_uri)
    experiment_id = tracking.ensure_experiment(experiment or zoo.name, uri)
    fingerprint = store.meta["source"]["fingerprint"]
    parent = parent_run(zoo, experiment_id, fingerprint, uri)
    return RunContext(zoo=zoo.name, store=store.uri, workdir=workdir, experiment_id=experiment_id,
                      tracking_uri=uri, fingerprint=fingerprint, parent_run_id=parent.info.run_id)


def run_jobs(jobs: list[Job], source: str, progress: bool = True, max_concurrent: int | None = None,
             desc: str = "train") -> list[JobResult]:
    """Every job as a Ray task, at most ``max_concurrent`` in flight (default: all).

    A job's task only drives its trainer (``num_cpus=0``: the trainer's workers hold the CPUs and
    GPUs; a CPU for the driver as well deadlocks small machines). It runs on this node,
    beside the driver, and is retried if its process or node dies: the retry finds the job's
    MLflow run and Ray Train's checkpoints, and resumes them.
    """
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    remote_fit = ray.remote(num_cpus=0, max_retries=2, scheduling_strategy=here)(fit_job)
    queue = list(jobs)
    limit = max_concurrent or len(queue)
    pending, results, failures = {}, [], []
    with tqdm(total=len(queue), desc=desc, unit="job", disable=not progress) as bar:
        while queue or pending:
            while queue and len(pending) < limit:
                job = queue.pop(0)
                pending[remote_fit.remote(job.spec, job.fold, job.ctx, job.without)] = (
                    job.spec.name, fold_key(job.fold, job.without))
            done, _ = ray.wait(list(pending), num_returns=1)
            name, fold = pending.pop(done[0])
            try:
                result = ray.get(done[0])
                results.append(result)
                bar.set_postfix_str(f"{name} fold {fold}: val mAP {result.best_val_map:.3f}, "
                                    f"held-out {result.oof_map:.3f}"
                                    + (" (done before)" if result.skipped else ""))
            except Exception as err:  # one failed job must not lose the others' work
                failures.append((name, fold, err))
                bar.set_postfix_str(f"{name} fold {fold}: FAILED")
            bar.update()
    if failures:
        raise JobsFailedError(failure_report(failures, source))
    return sorted(results, key=lambda r: (r.model, r.fold, r.without))


def assemble_oof(zoo: Zoo, workdir: str, folds: list[int]) -> dict[str, str]:
    """Concatenate each model's per-fold OOF tables into ``oof/{model}.parquet``, tags in ``oof/models.json``.

    The directory is then what :func:`ensemble.oof.load_oof_dir` reads. The jobs' predictions of
    their inner validation splits go to ``oof/validation/{model}.parquet``
    (:func:`ensemble.selectors.served.load_validation_dir`), for models whose every job wrote them.
    """
    tags = {spec.name: {"head": spec.head, "backbone": spec.backbone, "family": family_of(spec.backbone)}
            for spec in zoo.models}
    write_bytes(json.dumps(tags, indent=1).encode(), join(workdir, "oof", "models.json"))
    paths = {}
    for spec in zoo.models:
        table = pd.concat([read_parquet(oof_uri(workdir, spec.name, f)) for f in folds], ignore_index=True)
        table = table.sort_values(KEYS, kind="stable").reset_index(drop=True)
        paths[spec.name] = join(workdir, "oof", f"{spec.name}.parquet")
        write_parquet(table, paths[spec.name])
        parts = [validation_uri(workdir, spec.name, f) for f in folds]
        assembled = join(workdir, "oof", "validation", f"{spec.name}.parquet")
        if all(exists(part) for part in parts):
            write_parquet(pd.concat([read_parquet(part) for part in parts], ignore_index=True), assembled)
        elif exists(assembled):  # an earlier run's, not of these jobs
            fs, path = filesystem(assembled)
            fs.rm(path)
    return paths


def oof_summary(zoo: Zoo, store: CellStore, oof: dict[str, str], jobs: list[JobResult]) -> pd.DataFrame:
    """One row per model: head, backbone, OOF cell mAP over all folds (against cell truth when known)."""
    labels, source = evaluation_labels(store)
    row_of = pd.Series(np.arange(len(store)), index=pd.MultiIndex.from_frame(store.cells[KEYS]))
    rows = []
    for spec in zoo.models:
        table = read_parquet(oof[spec.name])
        at = row_of.loc[list(zip(table["image_id"], table["cell_id"]))].to_numpy()
        rows.append({"model": spec.name, "head": spec.head, "backbone": spec.backbone,
                     "oof_cell_map": cell_map(labels[at], table[CELL_COLUMNS].to_numpy()).map,
                     "labels": source,
                     # per-fold means, the form of the selector's nested scores
                     "fold_oof_map_mean": float(np.mean([r.oof_map for r in jobs if r.model == spec.name])),
                     "fold_val_map_mean": float(np.mean([r.best_val_map for r in jobs if r.model == spec.name])),
                     "train_minutes": sum(r.seconds for r in jobs if r.model == spec.name) / 60})
    return pd.DataFrame(rows)


def train_zoo(zoo: Zoo, store: CellStore | str, workdir: str, *, experiment: str | None = None,
              tracking_uri: str | None = None, progress: bool = True,
              max_concurrent: int | None = None, specs: FoldSpecs | None = None) -> TrainAllResult:
    """Train every model of ``zoo`` on every fold of the store; resumable; returns the OOF tables.

    Every model is first built and run on a batch (:func:`ensemble.checks.preflight_zoo`): one
    that cannot be stops the call before any job starts or any MLflow run is recorded.
    ``specs`` gives the (model, fold) jobs that train with another spec than the zoo's (an outer
    fold's sweep config or CRA labels); each keeps its model's name.
    """
    preflight_zoo(zoo)
    store = open_store(store)
    n_folds = int(store.cells["fold"].max()) + 1
    folds = list(range(n_folds))
    ctx = open_zoo(zoo, store, workdir, experiment, tracking_uri)
    client = tracking.client(ctx.tracking_uri)
    try:
        limit = max_concurrent or default_concurrency(zoo, cluster_shape(), len(zoo.models) * len(folds))
        queue = [Job((specs or {}).get((spec.name, fold), spec), fold, ctx) for spec in zoo.models for fold in folds]
        jobs = run_jobs(queue, zoo.source or f"zoo {zoo.name}", progress, limit, desc=f"train {zoo.name}")
        oof = assemble_oof(zoo, workdir, folds)
        summary = oof_summary(zoo, store, oof, jobs)
        for row in summary.itertuples():
            client.log_metric(ctx.parent_run_id, f"oof_cell_map.{row.model}", float(row.oof_cell_map))
        client.log_text(ctx.parent_run_id, summary.to_csv(index=False), "summary.csv")
    except BaseException:
        tracking.end_run(ctx.parent_run_id, "FAILED", ctx.tracking_uri)
        raise
    tracking.end_run(ctx.parent_run_id, "FINISHED", ctx.tracking_uri)
    return TrainAllResult(zoo=zoo.name, experiment_id=ctx.experiment_id, parent_run_id=ctx.parent_run_id,
                          jobs=jobs, oof=oof, summary=summary)
