"""Model specs and zoos: what to train, as data.

A zoo is a YAML file (``ensemble/zoos/*.yaml``) listing model specs and the settings they share.
Errors name the file and the key, because a zoo is edited by hand.

What a job learns (:class:`TrainSettings`, the model's shape) is kept apart from where it runs
(:class:`Placement`): only the former goes into :meth:`ModelSpec.fingerprint`, so moving a job to
other hardware never makes a finished job look unfinished.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HEADS = ("dsa", "cla", "clh")
LOSSES = ("bce", "focal")
MIN_CELL_SIZE = 16            # px; below it a backbone's first strides leave nothing to see
MAX_UPSAMPLING = 2            # a model may see the store's crops enlarged at most this much
# timm schedules whose shape the epoch count alone defines (step/multistep would need decay settings)
SCHEDULES = ("cosine", "tanh", "poly", "wsd", "constant")
ZOO_DIR = Path(__file__).resolve().parents[1] / "zoos"


class SpecError(ValueError):
    """A zoo or model spec that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class TrainSettings:
    """How one (model, fold) job learns. Defaults follow the HCPL paper (Adam, cosine, lr 2e-4)."""

    epochs: int = 8
    batch_size: int = 64          # cells per step (CLA/CLH); bags per step = batch_size // cells_per_image (DSA)
    lr: float = 2e-4
    weight_decay: float = 1e-5
    loss: str = "bce"             # bce | focal
    focal_gamma: float = 2.0
    class_weight_power: float = 0.5   # rare classes heavier: weight ~ rate ** -power
    image_loss_weight: float = 1.0    # W1 (DSA)
    cell_loss_weight: float = 0.2     # W2 = 0.2 * W1 (DSA, paper)
    augment: float = 0.5          # augmentation strength, 0 = none
    patience: int = 3             # early stopping: epochs without a better validation mAP
    val_fraction: float = 0.125   # training images set aside to choose the epoch; the held-out fold never is
    labels: str = "weak"          # label version in the cell store used as training targets
    prior_init: bool = True       # classifiers start at the classes' positive rates, not at p = 0.5
    mixed_precision: bool = True  # bf16 autocast on GPU
    seed: int = 0
    optimizer: str = "adam"       # any timm.optim.create_optimizer_v2 name (adamw, sgd, lamb, ...)
    schedule: str = "cosine"      # timm.scheduler.create_scheduler_v2 name, one of SCHEDULES, stepped per epoch
    warmup_epochs: int = 0        # linear warm-up from 1e-5 to lr, within epochs

    def __post_init__(self):
        # Checked here so a misspelt name fails when the zoo is read, not inside a Ray job.
        from timm.optim import list_optimizers

        name = self.optimizer.lower()
        if name.removeprefix("lookahead_") not in list_optimizers():
            raise SpecError(f"optimizer: {self.optimizer!r} is not a timm optimizer (see timm.optim.list_optimizers())")
        if self.schedule not in SCHEDULES:
            raise SpecError(f"schedule: {self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.warmup_epochs < 0:
            raise SpecError(f"warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if not 0 < self.val_fraction < 1:
            raise SpecError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class Placement:
    """Where and how fast one (model, fold) job runs; changes no learnt weight."""

    num_workers: int = 1          # Ray Train workers (DDP when > 1)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False         # declared, never sniffed: an autoscaling cluster starts with no GPU node
    gpus_per_worker: float = 1.0  # with use_gpu
    torch_threads: int | None = None
    in_memory: bool = False       # read the job's crops into memory once (small stores)
    shard_cache: bool = True      # a remote store's shards kept on the node's disk where it has room
    loader_workers: int | None = None  # DataLoader processes per worker; None: one per CPU held beyond the first

    def __post_init__(self):
        # What Ray would refuse (or wait on for ever) only once a job starts.
        problems = [f"{key} must be {rule}, got {value}" for key, value, rule, ok in (
            ("num_workers", self.num_workers, ">= 1", self.num_workers >= 1),
            ("cpus_per_worker", self.cpus_per_worker, "> 0", self.cpus_per_worker > 0),
            ("gpus_per_worker", self.gpus_per_worker, "> 0", self.gpus_per_worker > 0),
            ("torch_threads", self.torch_threads, ">= 1 or null", self.torch_threads is None or self.torch_threads >= 1),
            ("loader_workers", self.loader_workers, ">= 0 or null",
             self.loader_workers is None or self.loader_workers >= 0),
        ) if not ok]
        if problems:
            raise SpecError("; ".join(problems))


PLACEMENT_KEYS = tuple(f.name for f in dataclasses.fields(Placement))


@dataclass(frozen=True)
class ModelSpec:
    """One network of a zoo: a head on a timm backbone, at a cell size."""

    name: str
    head: str
    backbone: str
    cell_size: int = 64           # side of the cell crops the network sees (store crops are resized to it)
    cells_per_image: int = 8      # bag size N of DSA
    pretrained: bool = False
    checkpoint_path: str | None = None
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    placement: Placement = field(default_factory=Placement)

    def __post_init__(self):
        if self.head not in HEADS:
            raise SpecError(f"model {self.name!r}: head must be one of {HEADS}, got {self.head!r}")
        problem = _model_problem(self)
        if problem:
            raise SpecError(f"model {self.name!r}: {problem}")

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        """A spec from its JSON form (``dataclasses.asdict``), as checkpoints and registered models hold it.

        Reads the forms written before placement had its own section (``image_size`` for
        ``cell_size``, placement keys inside ``train``).
        """
        data = dict(data)
        if "image_size" in data:
            data["cell_size"] = data.pop("image_size")
        train = dict(data.pop("train", {}))
        placement = {**{k: train.pop(k) for k in PLACEMENT_KEYS if k in train}, **data.pop("placement", {})}
        placement["use_gpu"] = bool(placement.get("use_gpu"))  # older specs: None meant "if the cluster has one"
        return cls(**data, train=TrainSettings(**train), placement=Placement(**placement))

    def fingerprint(self) -> str:
        """Short hash of everything that shapes the trained weights, placement left out.

        A job is done when a finished run of the same model, fold, data and fingerprint exists.
        """
        learnt = {k: v for k, v in dataclasses.asdict(self).items() if k != "placement"}
        return hashlib.sha256(json.dumps(learnt, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _backbone_problem(name: str, pretrained: bool) -> str | None:
    """What is wrong with a backbone name, from timm's registry alone (no model is built)."""
    import timm
    from timm.models import split_model_name_tag

    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3)
        return (f"backbone: {name!r} is not a timm model"
                + (f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"))
    arch, tag = split_model_name_tag(name)
    if tag and name not in timm.list_pretrained():
        return f"backbone: timm has no weights {tag!r} for {arch} (see timm.list_pretrained({arch + '.*'!r}))"
    if pretrained and not timm.list_pretrained(f"{arch}.*"):
        return (f"backbone: timm has no pretrained weights for {name!r}: set pretrained: false "
                "or give checkpoint_path")
    return None


def _model_problem(spec: ModelSpec) -> str | None:
    """The first thing about ``spec`` that would fail inside a training job, or None."""
    backbone = _backbone_problem(spec.backbone, spec.pretrained and spec.checkpoint_path is None)
    if backbone:
        return backbone
    if not isinstance(spec.cell_size, int) or spec.cell_size < MIN_CELL_SIZE:
        return f"cell_size must be a whole number of pixels >= {MIN_CELL_SIZE}, got {spec.cell_size!r}"
    if not isinstance(spec.cells_per_image, int) or spec.cells_per_image < 1:
        return f"cells_per_image must be a whole number >= 1, got {spec.cells_per_image!r}"
    if not isinstance(spec.head_kwargs, dict):
        return f"head_kwargs must be a mapping, got {spec.head_kwargs!r}"
    train = spec.train
    if train.loss not in LOSSES:
        return f"train.loss must be one of {list(LOSSES)}, got {train.loss!r}"
    for key, ok in (("epochs", train.epochs >= 1), ("batch_size", train.batch_size >= 1), ("lr", train.lr > 0),
                    ("weight_decay", train.weight_decay >= 0), ("patience", train.patience >= 1),
                    ("augment", 0 <= train.augment <= 1)):
        if not ok:
            rule = "between 0 and 1" if key == "augment" else ">= 0" if key == "weight_decay" else "positive"
            return f"train.{key} must be {rule}, got {getattr(train, key)}"
    if spec.head == "dsa" and train.batch_size < spec.cells_per_image:
        return (f"train.batch_size {train.batch_size} holds no bag of cells_per_image {spec.cells_per_image} "
                "(a DSA step takes batch_size // cells_per_image bags): raise batch_size or lower cells_per_image")
    return None


@dataclass(frozen=True)
class RelabelSettings:
    """CRA (``ensemble.trainers.relabel``): rounds of DSA training and re-labelling before the zoo.

    With ``rounds`` > 0 the rounds run nested in the folds (for each outer fold, on the other
    folds only) and each fold's jobs train on its outer fold's last-round labels; 0 keeps the
    weak (image) labels.
    """

    rounds: int = 0               # the paper: 2
    beta: float = 0.5             # power normalisation c -> c ** beta

    def __post_init__(self):
        if self.rounds < 0 or not self.beta > 0:
            raise SpecError(f"relabel: rounds must be >= 0 and beta > 0, got {self.rounds}, {self.beta}")


@dataclass(frozen=True)
class IntegritySettings:
    """VID (``ensemble.integrity``): fitted on the store after training and packed with the ensemble."""

    enabled: bool = False
    backbone: str = "test_efficientnet"   # the capture CNN (the paper: efficientnet_b2, pretrained)
    pretrained: bool = False
    epochs: int = 15
    rule: str = "product"
    cv_splits: int = 3            # held-out figures (AUC, accuracy) and the weighting decision
    labels_csv: str | None = None  # hand labels image_id,cell_id,good; default: the simulator's truth
    weighting: str = "auto"       # on | off | auto: on when it raises the ensemble's nested cell mAP

    def __post_init__(self):
        if self.weighting not in ("on", "off", "auto"):
            raise SpecError(f"integrity.weighting must be on, off or auto, got {self.weighting!r}")
        if self.epochs < 1 or self.cv_splits < 2:
            raise SpecError(f"integrity: epochs must be >= 1 and cv_splits >= 2, got {self.epochs}, {self.cv_splits}")


@dataclass(frozen=True)
class Zoo:
    """A named set of model specs trained on the same cell store and folds.

    ``cell_size`` is the side of the store's crops; each model may see them resized to its own.
    ``placement`` is the zoo's own ``placement:`` section (each model's default): where the VID,
    which belongs to no model, trains.
    """

    name: str
    models: tuple[ModelSpec, ...]
    n_folds: int = 3
    cell_size: int = 64
    source: str = ""
    relabel: RelabelSettings = field(default_factory=RelabelSettings)
    integrity: IntegritySettings = field(default_factory=IntegritySettings)
    placement: Placement = field(default_factory=Placement)

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(f"zoo {self.name!r} has no model {name!r}; it has {[m.name for m in self.models]}")


def _build(cls, values: dict, where: str):
    """Make a dataclass from a YAML mapping, naming the unknown or bad key."""
    if not isinstance(values, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    values = dict(values)
    for key, value in values.items():
        default = known[key].default
        if default is None or value is None or default is dataclasses.MISSING:
            continue
        values[key] = setting_value(value, type(default), f"{where}.{key}")
    try:
        return cls(**values)
    except SpecError as err:
        raise SpecError(f"{where}: {err}") from None


def setting_value(value: Any, kind: type, where: str) -> Any:
    """``value`` as a setting of type ``kind`` (bool, int, float or str), or a SpecError naming ``where``.

    YAML 1.1 reads ``1e-5`` (no dot) as a string: a float setting takes it as the number it means.
    """
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = {bool: isinstance(value, bool), float: numeric, str: isinstance(value, str),
            int: numeric and float(value).is_integer()}.get(kind, True)
    if not fits:
        expected = {bool: "true or false", float: "a number", int: "a whole number", str: "a string"}[kind]
        raise SpecError(f"{where}: expected {expected}, got {value!r}")
    return int(value) if kind is int else value


def load_zoo(name_or_path: str | Path, overrides: dict | None = None) -> Zoo:
    """Load a zoo by name (``quick``, ``hcpl``) or from a YAML file.

    ``overrides`` are train settings applied to every model (e.g. ``{"epochs": 1}``).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = ZOO_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in ZOO_DIR.glob("*.yaml"))
        raise SpecError(f"zoo {str(name_or_path)!r} not found (no file {path}); built-in zoos: {known}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or "models" not in data:
        raise SpecError(f"{path}: a zoo needs a top-level 'models' list")
    defaults = {section: data.get(section, {}) or {} for section in ("train", "placement")}
    for section, values in defaults.items():
        if not isinstance(values, dict):
            raise SpecError(f"{path}: {section!r} must be a mapping")
    misplaced = sorted(set(defaults["train"]) & set(PLACEMENT_KEYS))
    if misplaced:
        raise SpecError(f"{path}: train: {misplaced} say where a job runs, not what it learns: "
                        "move them under 'placement:'")
    if not isinstance(data["models"], list) or not data["models"]:
        raise SpecError(f"{path}: models: expected a non-empty list of models, got {data['models']!r}")
    models = []
    for i, entry in enumerate(data["models"]):
        where = f"{path}: models[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise SpecError(f"{where}: each model needs a 'name'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(entry["name"])):
            # The name becomes file names (oof/{name}.parquet) and MLflow tags.
            raise SpecError(f"{where}.name: {entry['name']!r} may hold only letters, digits, '_', '.' and '-'")
        entry = dict(entry)
        train = _build(TrainSettings, {**defaults["train"], **(entry.pop("train", None) or {}), **(overrides or {})},
                       f"{where}.train")
        placement = _build(Placement, {**defaults["placement"], **(entry.pop("placement", None) or {})},
                           f"{where}.placement")
        entry.setdefault("cell_size", data.get("cell_size", 64))
        models.append(_build(ModelSpec, {**entry, "train": train, "placement": placement}, where))
    names = [m.name for m in models]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SpecError(f"{path}: model names must be unique, repeated: {duplicated}")
    extra = sorted(set(data) - {"name", "models", "train", "placement", "n_folds", "cell_size", "description",
                                "relabel", "integrity"})
    if extra:
        raise SpecError(f"{path}: unknown top-level key(s) {extra}")
    n_folds = setting_value(data.get("n_folds", 3), int, f"{path}: n_folds")
    cell_size = setting_value(data.get("cell_size", 64), int, f"{path}: cell_size")
    if n_folds < 2 or cell_size < MIN_CELL_SIZE:
        raise SpecError(f"{path}: n_folds must be >= 2 and cell_size >= {MIN_CELL_SIZE}, got {n_folds}, {cell_size}")
    for i, spec in enumerate(models):
        if spec.cell_size > MAX_UPSAMPLING * cell_size:
            raise SpecError(f"{path}: models[{i}].cell_size: {spec.name!r} would see the store's {cell_size} px crops "
                            f"enlarged to {spec.cell_size} px, which adds no detail: raise the zoo's cell_size "
                            f"(the crops' side) to at least {spec.cell_size // MAX_UPSAMPLING} or lower the model's")
    return Zoo(name=data.get("name", path.stem), models=tuple(models), n_folds=n_folds, cell_size=cell_size,
               source=str(path),
               relabel=_build(RelabelSettings, data.get("relabel") or {}, f"{path}: relabel"),
               integrity=_build(IntegritySettings, data.get("integrity") or {}, f"{path}: integrity"),
               placement=_build(Placement, defaults["placement"], f"{path}: placement"))


def spec_params(spec: ModelSpec) -> dict[str, Any]:
    """Flat parameters of a spec, as logged to MLflow."""
    flat = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("train", "placement", "head_kwargs")}
    flat.update({f"train.{k}": v for k, v in dataclasses.asdict(spec.train).items()})
    flat.update({f"placement.{k}": v for k, v in dataclasses.asdict(spec.placement).items()})
    flat.update({f"head.{k}": v for k, v in spec.head_kwargs.items()})
    return flat


def zoo_with(zoo: Zoo, *, relabel_rounds: int | None = None, integrity: bool = False) -> Zoo:
    """``zoo`` with CRA rounds set (``None``: the zoo's own) and the VID turned on when ``integrity``."""
    if relabel_rounds is not None:
        zoo = dataclasses.replace(zoo, relabel=dataclasses.replace(zoo.relabel, rounds=relabel_rounds))
    if integrity:
        zoo = dataclasses.replace(zoo, integrity=dataclasses.replace(zoo.integrity, enabled=True))
    return zoo
