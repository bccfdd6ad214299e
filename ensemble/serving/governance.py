"""Which registered version is the champion, and the record each version carries.

Every version of the registered ensemble is tagged when it is registered (:func:`version_tags`)::

    zoo, data_fingerprint   what its members were trained on (their training runs' tags)
    members                 the models whose networks it runs
    nested_score            the selection's nested (out-of-sample) OOF cell mAP of the ensemble
    code_version            the package version, and the git commit where the code is a checkout
    promotion               why the alias moved to it, or did not

and, once ``ensemble evaluate --model-version`` has scored it on a labelled test set
(:func:`record_evaluation`), ``test_score`` (competition mAP), ``test_cell_map``, ``test_data``
(the fingerprint of that test set's truth) and ``test_run``.

Promotion (:func:`decide_promotion`): ``always`` moves the alias to the new version, ``never``
leaves it where it is, ``if-better`` (the default) moves it when the new version is no worse
than the champion on every score both carry and better on at least one. Only like is compared
with like: nested scores of versions trained on the same data (fingerprint) with the same zoo,
test scores measured on the same test set; the reason, recorded in the ``promotion`` tag and
shown by ``ensemble models``, says which were not compared and why. A champion registered
before versions carried scores gives way to any new version; a new version with no score to
compare keeps the champion where it is (``--promote always`` moves it).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

import ensemble
from ensemble import tracking
from ensemble.storage import join, read_bytes

if TYPE_CHECKING:  # the CLI imports this module to build its parser: the selectors cost seconds
    from ensemble.selectors import EnsembleSpec

PROMOTE = ("if-better", "always", "never")
"""The promotion rules, for ``register_ensemble(promote=...)`` and the CLI's ``--promote``."""

ENSEMBLE_METHOD = "hcpl"  # the selected ensemble's entry in EnsembleSpec.scores


@dataclass(frozen=True)
class VersionScores:
    """The scores a version carries (None where not measured), and what they were measured on.

    Attributes
    ----------
    nested, test : float or None
        The selection's nested score; the test score.
    test_data : str or None
        Fingerprint of the test set of ``test``.
    zoo, data : str or None
        The zoo and the training data's fingerprint of ``nested``.
    """

    nested: float | None = None
    test: float | None = None
    test_data: str | None = None
    zoo: str | None = None
    data: str | None = None

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> VersionScores:
        def number(key):
            return float(tags[key]) if key in tags else None

        return cls(number(tracking.TAG_NESTED_SCORE), number(tracking.TAG_TEST_SCORE), tags.get(tracking.TAG_TEST_DATA),
                   tags.get(tracking.TAG_ZOO), tags.get(tracking.TAG_FINGERPRINT))


def _unlike(new: VersionScores, champion: VersionScores, fields: tuple[tuple[str, str], ...]) -> str:
    """Why two versions' scores measured on ``fields`` are not comparable ("" when they are)."""
    reasons = []
    for field, said in fields:
        ours, theirs = getattr(new, field), getattr(champion, field)
        if ours is None or theirs is None:
            reasons.append(f"{said} not recorded")
        elif ours != theirs:
            reasons.append(f"{said} {ours[:16]} vs {theirs[:16]}")
    return ", ".join(reasons)


def nested_score(spec: EnsembleSpec) -> float | None:
    """The ensemble's nested mean mAP (None when selection ran without nested scoring)."""
    score = spec.scores.get(ENSEMBLE_METHOD)
    value = None if score is None else score.nested_mean
    return value if value is not None and math.isfinite(value) else None


def decide_promotion(rule: str, new: VersionScores, champion: VersionScores | None,
                     champion_version: str | None = None) -> tuple[bool, str]:
    """Whether a new version takes the alias under ``rule`` (:data:`PROMOTE`), and why."""
    if rule not in PROMOTE:
        raise ValueError(f"promote must be one of {', '.join(PROMOTE)}, got {rule!r}")
    if rule != "if-better":
        return rule == "always", f"promote={rule}"
    if champion is None:
        return True, "no champion before"
    if champion.nested is None and champion.test is None:
        return True, f"champion v{champion_version} carries no score"
    pairs, unlike = [], []
    for score, fields in (("nested", (("zoo", "zoo"), ("data", "data"))), ("test", (("test_data", "test data"),))):
        ours, theirs = getattr(new, score), getattr(champion, score)
        if ours is None or theirs is None:
            continue
        why = _unlike(new, champion, fields)
        if why:
            unlike.append(f"{score} not compared ({why})")
        else:
            pairs.append((score, ours, theirs))
    skipped = "".join(f"; {reason}" for reason in unlike)
    if not pairs:
        return False, f"no score to compare with champion v{champion_version}{skipped}"
    shown = ", ".join(f"{score} {a:.4f} vs {b:.4f}" for score, a, b in pairs)
    better = all(a >= b for _, a, b in pairs) and any(a > b for _, a, b in pairs)
    return better, f"{'better' if better else 'not better'} than champion v{champion_version}: {shown}{skipped}"


def promote_version(name: str, version: str, alias: str = "champion", rule: str = "if-better",
                    tracking_uri: str | None = None) -> tuple[bool, str]:
    """Apply ``rule`` to ``version`` against the version ``alias`` points at; record why on it."""
    client = tracking.client(tracking_uri)
    new = client.get_model_version(name, str(version))
    current = alias_version(name, alias, tracking_uri)
    if current is not None and current.version == new.version:
        return True, f"already @{alias}"
    champion = None if current is None else VersionScores.from_tags(current.tags)
    promoted, reason = decide_promotion(rule, VersionScores.from_tags(new.tags), champion,
                                        None if current is None else current.version)
    if promoted:
        client.set_registered_model_alias(name, alias, new.version)
    client.set_model_version_tag(name, new.version, tracking.TAG_PROMOTION,
                                 f"{'@' + alias if promoted else 'not @' + alias}: {reason}")
    return promoted, reason


def alias_version(name: str, alias: str, tracking_uri: str | None = None):
    """The ModelVersion ``alias`` points at, or None (no such model or alias)."""
    try:
        return tracking.client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def resolve_version(name: str, version: str, tracking_uri: str | None = None):
    """A ModelVersion by number or by alias (``3`` or ``champion``)."""
    client = tracking.client(tracking_uri)
    if str(version).isdigit():
        return client.get_model_version(name, str(version))
    found = alias_version(name, str(version), tracking_uri)
    if found is None:
        raise ValueError(f"registered model {name!r} has no version or alias {version!r}")
    return found


def version_tags(spec: EnsembleSpec, members: list[str], zoo: str | None, data_fingerprint: str | None) -> dict[str, str]:
    """The tags a new version carries (see the module docstring); unknown ones are left out."""
    tags = {tracking.TAG_ZOO: zoo, tracking.TAG_FINGERPRINT: data_fingerprint, tracking.TAG_MEMBERS: ",".join(members),
            tracking.TAG_CODE_VERSION: code_version()}
    nested = nested_score(spec)
    if nested is not None:
        tags[tracking.TAG_NESTED_SCORE] = f"{nested:.6f}"
    return {key: value for key, value in tags.items() if value}


def code_version() -> str:
    """``ensemble``'s version, with ``git describe`` of its checkout when it runs from one."""
    package = Path(ensemble.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=30)

    try:
        # Only a checkout that tracks this very package says which code this is (an installed
        # copy under some other repository's tree must not borrow that repository's commit).
        if git("ls-files", "--error-unmatch", "__init__.py").returncode == 0:
            described = git("describe", "--always", "--dirty", "--abbrev=12").stdout.strip()
            if described:
                return f"{ensemble.__version__} (git {described})"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ensemble.__version__


def truth_fingerprint(data_root: str | Path) -> str:
    """Identity of a labelled test set: a hash of its ``truth/cell_labels.csv``."""
    return hashlib.sha256(read_bytes(join(str(data_root), "truth", "cell_labels.csv"))).hexdigest()[:16]


def list_versions(name: str = "hpa-ensemble", tracking_uri: str | None = None) -> pd.DataFrame:
    """Every version of ``name`` with its aliases, scores and provenance tags, newest first."""
    client = tracking.client(tracking_uri)
    versions = client.search_model_versions(f"name = {tracking.quote(name)}")
    if not versions:
        raise ValueError(f"no registered model named {name!r} (or it has no versions)")
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in versions:
        tags = v.tags
        rows.append({"version": int(v.version), "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                     "nested": _number(tags.get(tracking.TAG_NESTED_SCORE)),
                     "test": _number(tags.get(tracking.TAG_TEST_SCORE)),
                     "test_cell": _number(tags.get(tracking.TAG_TEST_CELL_MAP)),
                     "zoo": tags.get(tracking.TAG_ZOO, ""), "data": tags.get(tracking.TAG_FINGERPRINT, "")[:12],
                     "members": tags.get(tracking.TAG_MEMBERS, ""),
                     "code": tags.get(tracking.TAG_CODE_VERSION, ""),
                     "registered": pd.Timestamp(v.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
                     "promotion": tags.get(tracking.TAG_PROMOTION, "")})
    return pd.DataFrame(rows).sort_values("version", ascending=False, ignore_index=True)


def record_evaluation(result, data_root: str | Path, name: str, version: str, *, tracking_uri: str | None = None,
                      promote: str = "never", alias: str = "champion") -> str:
    """Log an :class:`~ensemble.serving.evaluate.EvaluationResult` against a registered version.

    A run tagged with the model and version (``ensemble.kind=evaluate``), in the experiment of
    the run that registered it, holds the metrics, the per-class table and plot; the version
    gets the test-score tags. ``promote`` then applies a rule (:data:`PROMOTE`) with the score
    just measured. Returns the run id.
    """
    if promote not in PROMOTE:
        raise ValueError(f"promote must be one of {', '.join(PROMOTE)}, got {promote!r}")
    uri = tracking.tracking_uri(tracking_uri)
    client = tracking.client(uri)
    found = resolve_version(name, version, uri)
    experiment_id = (client.get_run(found.run_id).info.experiment_id if found.run_id
                     else tracking.ensure_experiment(name, uri))
    data = truth_fingerprint(data_root)
    tags = {tracking.TAG_KIND: "evaluate", tracking.TAG_REGISTERED_MODEL: name,
            tracking.TAG_MODEL_VERSION: str(found.version), tracking.TAG_TEST_DATA: data}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"evaluate-{name}-v{found.version}", tags=tags,
                          nested=mlflow.active_run() is not None) as run:
        mlflow.log_param("data", str(data_root))
        mlflow.log_metrics(result.metrics())
        mlflow.log_text(result.per_class.to_csv(), "evaluation/per_class_ap.csv")
        mlflow.log_text(result.report(), "evaluation/report.txt")
        if result.plot is not None and "://" not in str(result.plot):
            mlflow.log_artifact(str(result.plot), "evaluation")
        elif result.plot is not None:  # a URL (s3://...): MLflow logs local files only
            with tempfile.TemporaryDirectory() as tmp:
                plot = Path(tmp) / Path(str(result.plot)).name
                plot.write_bytes(read_bytes(str(result.plot)))
                mlflow.log_artifact(str(plot), "evaluation")
    for key, value in {tracking.TAG_TEST_SCORE: f"{result.competition.map:.6f}",
                       tracking.TAG_TEST_CELL_MAP: f"{result.cell.map:.6f}", tracking.TAG_TEST_DATA: data,
                       tracking.TAG_TEST_RUN: run.info.run_id}.items():
        client.set_model_version_tag(name, str(found.version), key, value)
    if promote != "never":
        promote_version(name, str(found.version), alias, promote, uri)
    return run.info.run_id


def _number(text: str | None) -> float:
    return float(text) if text else math.nan
