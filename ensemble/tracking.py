"""MLflow conventions: where runs go, how they are named and tagged, and how finished work is found.

One experiment per zoo; one parent run per ``train_all``; one child run per (model, fold) and per
sweep trial. A (model, fold) run is identified by its tags (zoo, model, fold, data fingerprint),
never by its name, so a re-run finds the run it must skip or resume instead of creating another.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Tag keys, in one place because the selector and the registry search runs by them.
TAG_KIND = "ensemble.kind"          # train_all | job | trial | sweep | select
TAG_ZOO = "zoo"
TAG_MODEL = "model"
TAG_FOLD = "fold"
TAG_HEAD = "head"
TAG_BACKBONE = "backbone"
TAG_FAMILY = "family"
TAG_FINGERPRINT = "data_fingerprint"
TAG_SPEC = "spec_hash"
TAG_PARENT = "mlflow.parentRunId"


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: the argument, else ``MLFLOW_TRACKING_URI``, else local SQLite in the cwd.

    A relative SQLite path (``sqlite:///mlflow.db``) is made absolute: Ray workers run in another
    directory, where it would name another, empty database.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def client(uri: str | None = None) -> MlflowClient:
    """A client on :func:`tracking_uri`; also makes it the process default for ``mlflow.*`` calls."""
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str, uri: str | None = None, artifact_location: str | None = None) -> str:
    """Id of experiment ``name``, created when missing.

    With a local SQLite store, artifacts go beside the database (``mlartifacts/``) unless
    ``artifact_location`` says otherwise; with a server, the server decides.
    """
    c = client(uri)
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_location
    uri = tracking_uri(uri)
    if location is None and uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()
    return c.create_experiment(name, artifact_location=location)


def _filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in sorted(tags.items()))


def find_runs(experiment_id: str, tags: dict[str, str], uri: str | None = None) -> list:
    """Runs of an experiment whose tags equal ``tags``, newest first."""
    return client(uri).search_runs([experiment_id], filter_string=_filter(tags), order_by=["attributes.start_time DESC"])


def start_or_resume_run(experiment_id: str, tags: dict[str, str], run_name: str, uri: str | None = None,
                        parent_run_id: str | None = None):
    """The run identified by ``tags``: ``(run, finished)``.

    A finished run is returned as is (the caller skips the work); an unfinished one (killed,
    failed or still marked running by a dead process) is reopened; otherwise a new run is created.
    """
    c = client(uri)
    runs = find_runs(experiment_id, tags, uri)
    finished = [r for r in runs if r.info.status == RunStatus.to_string(RunStatus.FINISHED)]
    if finished:
        return finished[0], True
    if runs:
        run = runs[0]
        c.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return c.get_run(run.info.run_id), False
    all_tags = dict(tags)
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    return c.create_run(experiment_id, run_name=run_name, tags=all_tags), False


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    client(uri).set_terminated(run_id, status=status)
