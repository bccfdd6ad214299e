"""Every check a training command can make before Ray starts, and the jobs it would run.

``ensemble check``, ``train-all --dry-run`` and the CLI before ``ray.init`` call
:func:`check_training`: a misspelt backbone, a head argument no head takes, a search space that
cannot fit its zoo, a segmenter setting, a missing dataset, a job no node of the cluster can hold
or an MLflow server that does not answer are all said in seconds, naming the file and the key,
instead of after Ray has started (20-80 s on 2 cores) or inside a job that Ray Train retries.

What :mod:`ensemble.zoo` and :mod:`ensemble.zoo.search_space` check when they read a file needs
timm's registry only; the checks here also build each head on a tiny stand-in backbone (its own
argument checks, in milliseconds) and then each whole model, running two of its cells through it
on the CPU (:func:`preflight_zoo`): a backbone that cannot take the zoo's cell size fails there,
not in a Ray Train job that would be retried. The trainers call :func:`preflight_zoo` too.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ensemble.checks.data import check_data, check_data_file, check_segmenter, data_notes
from ensemble.zoo import ModelSpec, SpecError, Zoo

STAND_IN_BACKBONE = "test_efficientnet"
"""A tiny timm EfficientNet: every head (CLH's scattering fusion included) can be built on it."""


@dataclass
class Plan:
    """What a training command would run once its checks pass.

    Attributes
    ----------
    zoo : Zoo
    spaces : dict of str to str
        Model -> the search space file its sweep would search (empty without a sweep).
    cluster : str
        What the cluster check found ("" when no launcher config was given).
    notes : list of str
        What the run will do differently from the zoo's word, and why (the dataset has no cell
        truth, the VID is off): said once, before anything starts.
    built : bool
        Whether every model was built and run once (:func:`preflight_zoo`).
    """

    zoo: Zoo
    spaces: dict[str, str] = field(default_factory=dict)
    cluster: str = ""
    notes: list[str] = field(default_factory=list)
    built: bool = True

    def jobs(self) -> pd.DataFrame:
        """One row per model: what it is, where each of its jobs runs, and how many jobs it has."""
        from ensemble.cluster import job_bundle

        rows = [{"model": spec.name, "head": spec.head, "backbone": spec.backbone, "cell_size": spec.cell_size,
                 "folds": self.zoo.n_folds, "workers": spec.placement.num_workers,
                 "per_worker": ", ".join(f"{k} {v:g}" for k, v in job_bundle(spec).items()),
                 "sweep": Path(self.spaces[spec.name]).name if spec.name in self.spaces else "-",
                 "spec_hash": spec.fingerprint()} for spec in self.zoo.models]
        return pd.DataFrame(rows)

    def report(self) -> str:
        zoo = self.zoo
        n_jobs = len(zoo.models) * zoo.n_folds
        dsas = [m for m in zoo.models if m.head == "dsa"]
        lines = [f"zoo {zoo.name} ({zoo.source}): {len(zoo.models)} models x {zoo.n_folds} folds = {n_jobs} "
                 f"training jobs on {zoo.cell_size} px crops",
                 self.jobs().to_string(index=False)]
        if self.spaces:
            lines.append(f"sweeps first: one per model and outer fold, on the other folds "
                         f"({len(self.spaces)} x {zoo.n_folds} sweeps)")
        if zoo.relabel.rounds:
            # Nested in the folds: round 1 (weak labels) trains one job per pair of held-out folds,
            # later rounds one per outer fold and inner fold, each on that outer fold's labels.
            k, rounds = zoo.n_folds, zoo.relabel.rounds
            per_dsa = k * (k - 1) // 2 + (rounds - 1) * k * (k - 1)
            lines.append(f"CRA before them, nested in the folds: {rounds} rounds x {len(dsas)} DSA models = "
                         f"{per_dsa * len(dsas)} jobs")
        if zoo.integrity.enabled:
            lines.append(f"VID after selection: capture CNN {zoo.integrity.backbone}, {zoo.integrity.cv_splits} splits, "
                         f"learning good and bad cells from {zoo.integrity.labels_csv or 'the cell truth'}")
        if self.cluster:
            lines.append(self.cluster)
        lines += self.notes
        if not self.built:
            lines.append("models not built: `ensemble check` builds and runs each once (a minute for the hcpl zoo "
                         "on 2 cores), as train-all does before any job")
        lines.append("all checks passed; nothing was started")
        return "\n".join(lines)


def head_problem(spec: ModelSpec) -> str | None:
    """What would stop ``spec``'s head from being built (its ``head_kwargs``, CLH's needs), or None.

    The head is built on :data:`STAND_IN_BACKBONE`, so its own argument checks run without
    building (or downloading) the real backbone.
    """
    from timm.models import model_entrypoint

    from ensemble.models.backbones import create_backbone
    from ensemble.models.factory import HEADS
    from ensemble.models.scattering import HybridEfficientNet

    size = spec.cell_size
    if spec.head == "clh":
        if model_entrypoint(spec.backbone).__module__ != "timm.models.efficientnet":
            return f"backbone: CLH needs a timm EfficientNet, got {spec.backbone!r}"
        scales = spec.head_kwargs.get("J", inspect.signature(HybridEfficientNet).parameters["J"].default)
        if not isinstance(scales, int) or scales < 1:
            return f"head_kwargs.J: expected a whole number >= 1, got {scales!r}"
        if spec.cell_size % 2**scales:
            return f"cell_size {spec.cell_size} must be a multiple of 2**J = {2**scales} for CLH's scattering"
        size = 4 * 2**scales  # the smallest size the scattering takes: its filters cost seconds at 256 px
    try:
        HEADS[spec.head](create_backbone(STAND_IN_BACKBONE, img_size=size), **spec.head_kwargs)
    except (TypeError, ValueError) as error:
        return f"head_kwargs: {error}"
    return None


class JobConfigError(SpecError):
    """A model no retry can train: it cannot be built, or cannot take a batch of its own cells."""


def preflight_zoo(zoo: Zoo) -> None:
    """Build every model of ``zoo`` on the CPU and run one of its cells through it, one model at a time.

    Without pretrained weights (nothing is downloaded) and in eval mode: under a second for each
    of the quick zoo's models, a few seconds for each of the paper's on 2 cores. A network that
    passed once in this process (the same head, backbone, cell size and head arguments: CRA
    rounds train the same networks on other labels) is not built again.

    Raises
    ------
    JobConfigError
        Naming the zoo file, the model, what failed and what to change.
    """
    import torch

    from ensemble.models.factory import load_network

    for i, spec in enumerate(zoo.models):
        network_key = json.dumps([spec.head, spec.backbone, spec.cell_size, spec.head_kwargs], sort_keys=True,
                                 default=str)
        if network_key in _BUILT:
            continue
        try:
            network = load_network(spec)
            cell = torch.zeros(1, 4, spec.cell_size, spec.cell_size)
            with torch.no_grad():
                network(cell.unsqueeze(0) if spec.head == "dsa" else cell)  # DSA: a bag of one cell
        except Exception as error:  # whatever fails here fails in every job and every retry
            first = (str(error).strip().splitlines() or [""])[0]
            raise JobConfigError(f"{zoo.source or zoo.name}: models[{i}] ({spec.name}): {spec.backbone} at "
                                 f"{spec.cell_size} px cannot be built or run ({type(error).__name__}: {first}); "
                                 "change its cell_size, backbone or head_kwargs") from None
        _BUILT.add(network_key)


_BUILT: set[str] = set()


def check_zoo(zoo: Zoo) -> None:
    """Raise SpecError naming the zoo file and model for a head that cannot be built, or CRA without DSA."""
    for i, spec in enumerate(zoo.models):
        problem = head_problem(spec)
        if problem:
            raise SpecError(f"{zoo.source}: models[{i}] ({spec.name}): {problem}")
    if zoo.relabel.rounds and not any(m.head == "dsa" for m in zoo.models):
        raise SpecError(f"{zoo.source}: relabel.rounds: CRA re-labels with DSA models and the zoo has none: "
                        "add one or set relabel.rounds: 0")


def check_spaces(zoo: Zoo, space: str | None = None) -> dict[str, str]:
    """Check the search space of every model (``space``, else its head's built-in one) against it.

    Returns
    -------
    dict
        Model -> the space file it would sweep.
    """
    from ensemble.zoo.search_space import proposals, apply_config, check_space_fits, read_search_space, \
        search_space_path

    files = {}
    for spec in zoo.models:
        path = search_space_path(space or spec.head)
        domains = read_search_space(path)
        where = f"{path} (for {zoo.source}: {spec.name})"
        check_space_fits(domains, spec, zoo.cell_size, where)
        for key, domain in domains.items():
            for value in proposals(domain) if key.startswith("head.") else ():
                problem = head_problem(apply_config(spec, {key: value}))
                if problem:
                    raise SpecError(f"{where}: {key}: {value!r}: {problem}")
        files[spec.name] = str(path)
    return files


def check_training(zoo: Zoo, *, sweep: bool = False, space: str | None = None, data: str | None = None,
                   workdir: str | None = None, tracking_uri: str | None = None, cluster_config: str | None = None,
                   segmenter: str = "classical", segmenter_settings: dict | None = None,
                   build: bool = True, integrity: str = "auto") -> Plan:
    """Check everything a training command depends on that can be checked without Ray.

    Parameters
    ----------
    zoo : Zoo
        As :func:`ensemble.zoo.load_zoo` read (and checked) it.
    sweep, space
        Check the search space each model would sweep (``space``, else its head's built-in one).
    data : str, optional
        The dataset root; None when train-all simulates one.
    workdir, tracking_uri, cluster_config
        With a launcher config, every job must fit a node type of it, and on more than one node
        the workdir and tracking URI must reach every node (:mod:`ensemble.cluster`). An HTTP
        tracking server must answer.
    segmenter, segmenter_settings
        The segmenter, and the settings it is given (their names; hpacellseg's weight files).
    build : bool
        Also build and run every model once (:func:`preflight_zoo`).
    integrity : {"on", "off", "auto"}
        Whether the VID is fitted (:func:`resolve_integrity`); the plan's zoo says what was decided.

    Returns
    -------
    Plan

    Raises
    ------
    SpecError, ValueError, FileNotFoundError, ensemble.tracking.TrackingError
    """
    # The dataset first: it costs a file listing, and the models' builds below take seconds.
    if data is not None:
        check_data(data)
    asked, (zoo, notes) = zoo.integrity.enabled, data_notes(zoo, data, integrity)
    if asked and integrity == "off":
        notes.append("VID off (--integrity off)")
    check_segmenter(segmenter, segmenter_settings or {})
    check_zoo(zoo)
    spaces = check_spaces(zoo, space) if sweep or space else {}
    if build:
        preflight_zoo(zoo)
    from ensemble import tracking  # MLflow costs seconds to import: after the checks that need none

    cluster = ""
    uri = tracking.tracking_uri(tracking_uri)
    if cluster_config is not None:
        import yaml

        from ensemble.cluster import ClusterShape, check_jobs_fit, check_shared

        check_data_file(cluster_config, "--cluster-config")
        shape = ClusterShape.from_config(yaml.safe_load(Path(cluster_config).read_text()), cluster_config)
        check_jobs_fit(zoo, shape)
        check_shared(shape, uri, workdir or "runs")
        cluster = f"cluster ({cluster_config}): every job fits a node type ({shape.describe()})"
    tracking.check_reachable(uri)  # a SQLite file is not created by a check: the first run creates it
    return Plan(zoo=zoo, spaces=spaces, cluster=cluster, notes=notes, built=build)
