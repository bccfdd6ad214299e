"""MLflow conventions: where runs go, how they are named and tagged, and how finished work is found.

One experiment per zoo; one parent run per ``train_all``; one child run per (model, fold) and per
sweep trial. A (model, fold) run is identified by its tags (zoo, model, fold, data fingerprint),
never by its name, so a re-run finds the run it must skip or resume instead of creating another.

Trouble with MLflow is said in one line that names the URI and the cause (:class:`TrackingError`,
:func:`explain`), and soon: a server that does not answer is found by one probe before the first
call (:func:`client`), and MLflow's HTTP retries are bounded (:data:`HTTP_DEFAULTS`) so a server
that goes away later is reported after about half a minute of retries rather than four minutes. A SQLite database that another
process holds locked is retried with backoff for :data:`LOCK_WAIT_S` seconds, then reported.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import time
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# MLflow's own defaults (7 retries, backoff factor 2, 120 s timeout) wait over four minutes on a
# server that is down. Set for this process and its Ray workers unless the user set them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
PROBE_TIMEOUT_S = 10.0
LOCK_WAIT_S = float(os.environ.get("ENSEMBLE_SQLITE_LOCK_WAIT_S", "120"))
"""How long a locked SQLite database is retried (each try also waits SQLite's own busy timeout)."""


class TrackingError(RuntimeError):
    """MLflow cannot serve a request: the message is one line naming the tracking URI and the cause."""


def _locked(error: BaseException) -> bool:
    return "database is locked" in str(error)


def _os_cause(text: str) -> str | None:
    """The operating system's words in a connection error's text (``Connection refused``), if any."""
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return found.group(1).strip() if found else None


class _LockNoise(logging.Filter):
    """Drops MLflow's logged traceback of a locked SQLite database: the lock is retried, then reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_locked(record.getMessage()) or (record.exc_info and _locked(record.exc_info[1])))


logging.getLogger("mlflow.store.db.utils").addFilter(_LockNoise())

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
TAG_NODE = "ray_node_id"
TAG_PARENT = "mlflow.parentRunId"
# Run tags of an evaluation against a registered version (ensemble.kind=evaluate).
TAG_REGISTERED_MODEL = "registered_model"
TAG_MODEL_VERSION = "model_version"

# Tags of each registered model version (ensemble.serving.governance), beside TAG_ZOO and TAG_FINGERPRINT.
TAG_MEMBERS = "members"
TAG_NESTED_SCORE = "nested_score"        # the selection's nested out-of-sample OOF cell mAP
TAG_TEST_SCORE = "test_score"            # competition mAP on a labelled test set (ensemble evaluate)
TAG_TEST_CELL_MAP = "test_cell_map"
TAG_TEST_DATA = "test_data"              # fingerprint of that test set's truth
TAG_TEST_RUN = "test_run"
TAG_CODE_VERSION = "code_version"
TAG_PROMOTION = "promotion"              # why the alias moved to the version, or did not


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow filter (search_runs, search_model_versions).

    MLflow's parser takes a literal in single or double quotes and has no escape inside one, so a
    value is wrapped in the quote it does not contain.

    Raises
    ------
    ValueError
        The value holds both quote characters (no MLflow filter can name it).
    """
    value = str(value)
    for mark in ("'", '"'):
        if mark not in value:
            return f"{mark}{value}{mark}"
    raise ValueError(f"{value!r} holds both ' and \": MLflow filter strings cannot name it")


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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_reachable(uri: str) -> None:
    """Raise TrackingError if an HTTP(S) tracking server gives no answer at all (any status counts).

    One request with a short timeout, once per process and URI: MLflow's client would retry a
    refused connection for a minute, and wait its full timeout on each try of a silent host.
    """
    if not uri.startswith(("http://", "https://")) or uri in _REACHED:
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S)
    except requests.Timeout:
        cause = f"no answer within {PROBE_TIMEOUT_S:.0f} s"
    except requests.RequestException as error:
        cause = _os_cause(str(error)) or type(error).__name__
    else:
        _REACHED.add(uri)
        return
    raise TrackingError(f"MLflow tracking server {uri} cannot be reached ({cause}): start it, or point "
                        "--tracking-uri / MLFLOW_TRACKING_URI at a running one")


_REACHED: set[str] = set()


def patiently(uri: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, retried with backoff while the SQLite database of ``uri`` is locked.

    Raises
    ------
    TrackingError
        Still locked after :data:`LOCK_WAIT_S` seconds.
    """
    start, delay = time.monotonic(), 0.5
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as error:  # sqlalchemy's OperationalError, or MLflow's exception around it
            waited = time.monotonic() - start
            if not _locked(error):
                raise
            if waited + delay > LOCK_WAIT_S:
                raise TrackingError(f"MLflow database {sqlite_path(uri) or uri} is locked by another process "
                                    f"(still after {waited:.0f} s of retries): wait for it to finish, or stop it "
                                    "(an `mlflow ui` or a run of another user on the same file)") from None
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


def _patient(function):
    """:func:`patiently` around a function of this module whose ``uri`` argument names the store."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        uri = signature.bind(*args, **kwargs).arguments.get("uri")
        return patiently(tracking_uri(uri), function, *args, **kwargs)

    return wrapper


def client(uri: str | None = None, *, create: bool = True) -> MlflowClient:
    """A client on :func:`tracking_uri`; also makes it the process default for ``mlflow.*`` calls.

    Parameters
    ----------
    create : bool
        False for commands that only read: a SQLite database that does not exist is then an
        error, rather than an empty file created where nothing was asked.

    Raises
    ------
    TrackingError
        The server cannot be reached, the database is missing (``create=False``) or locked.
    """
    uri = tracking_uri(uri)
    path = sqlite_path(uri)
    if not create and path is not None and not path.exists():
        raise TrackingError(f"no MLflow database at {path}: nothing was tracked there; give --tracking-uri "
                            "(or MLFLOW_TRACKING_URI) where train-all recorded its runs")
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return patiently(uri, MlflowClient, tracking_uri=uri, registry_uri=uri)


def explain(error: BaseException, uri: str | None = None) -> str | None:
    """One line for an MLflow failure (naming ``uri`` and the cause), or None if ``error`` is no such failure."""
    if isinstance(error, TrackingError):
        return str(error)
    module = type(error).__module__
    if not (isinstance(error, MlflowException) or module.startswith(("sqlalchemy", "requests", "urllib3"))):
        return None
    uri = tracking_uri(uri)
    text = str(error.message if isinstance(error, MlflowException) else error).strip()
    if _locked(text):
        return f"MLflow database {sqlite_path(uri) or uri} is locked by another process: retry when it is done"
    unreachable = _os_cause(text)
    if unreachable:
        return f"MLflow tracking server {uri} cannot be reached ({unreachable})"
    return f"MLflow at {uri}: {text.splitlines()[0] if text else type(error).__name__}"


def check_model_uri(model_uri: str, uri: str | None = None) -> None:
    """Raise TrackingError, in one line, if ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
    ``runs:/ID/...`` names nothing in the tracking store; a local directory passes.

    Said before a model is loaded, so a typo neither starts Ray nor creates a database.
    """
    if not model_uri.startswith(("models:/", "runs:/")):
        return
    c = client(uri, create=False)
    where = tracking_uri(uri)
    target = model_uri.split(":/", 1)[1].strip("/")
    try:
        if model_uri.startswith("runs:/"):
            c.get_run(target.split("/", 1)[0])
            return
        name, by_alias, alias = target.partition("@")
        name, _, version = name.partition("/")
        if by_alias:
            c.get_model_version_by_alias(name, alias)
        elif version.isdigit():
            c.get_model_version(name, version)
        else:  # models:/NAME or models:/NAME/STAGE
            c.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in error.message:
            raise
        known = [m.name for m in c.search_registered_models(max_results=20)]
        raise TrackingError(f"{model_uri} names nothing in the registry at {where} ({error.message.splitlines()[0]}); "
                            f"registered models there: {known or 'none'}") from None


@_patient
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
    return " and ".join(f"tags.`{k}` = {quote(v)}" for k, v in sorted(tags.items()))


@_patient
def find_runs(experiment_id: str, tags: dict[str, str], uri: str | None = None) -> list:
    """Runs of an experiment whose tags equal ``tags``, newest first."""
    return client(uri).search_runs([experiment_id], filter_string=_filter(tags), order_by=["attributes.start_time DESC"])


@_patient
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


@_patient
def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    client(uri).set_terminated(run_id, status=status)
