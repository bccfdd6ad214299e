"""Model specs and zoos: what to train, as data.

A zoo is a YAML file (``ensemble/zoos/*.yaml``) listing model specs and the settings they share.
Errors name the file and the key, because a zoo is edited by hand.

What a job learns (:class:`TrainSettings`, the model's shape) is kept apart from where it runs
(:class:`Placement`): only the former goes into :meth:`ModelSpec.fingerprint`, so moving a job to
other hardware never makes a finished job look unfinished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HEADS = ("dsa", "cla", "clh")
ZOO_DIR = Path(__file__).resolve().parent / "zoos"


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
    labels: str = "weak"          # label version in the cell store used as training targets
    prior_init: bool = True       # classifiers start at the classes' positive rates, not at p = 0.5
    mixed_precision: bool = True  # bf16 autocast on GPU
    seed: int = 0


@dataclass(frozen=True)
class Placement:
    """Where and how fast one (model, fold) job runs; changes no learnt weight."""

    num_workers: int = 1          # Ray Train workers (DDP when > 1)
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None   # None: use a GPU when the cluster has one
    torch_threads: int | None = None
    in_memory: bool = False       # read the job's crops into memory once (small stores)


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
        return cls(**data, train=TrainSettings(**train), placement=Placement(**placement))

    def fingerprint(self) -> str:
        """Short hash of everything that shapes the trained weights, placement left out.

        A job is done when a finished run of the same model, fold, data and fingerprint exists.
        """
        learnt = {k: v for k, v in dataclasses.asdict(self).items() if k != "placement"}
        return hashlib.sha256(json.dumps(learnt, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RelabelSettings:
    """CRA (``ensemble.trainers.relabel``): rounds of DSA training and re-labelling before the zoo.

    With ``rounds`` > 0 every model of the zoo trains on the last round's labels; 0 keeps the
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
    weighting: str = "auto"       # on | off | auto: on when it raises the ensemble's OOF cell mAP

    def __post_init__(self):
        if self.weighting not in ("on", "off", "auto"):
            raise SpecError(f"integrity.weighting must be on, off or auto, got {self.weighting!r}")
        if self.epochs < 1 or self.cv_splits < 2:
            raise SpecError(f"integrity: epochs must be >= 1 and cv_splits >= 2, got {self.epochs}, {self.cv_splits}")


@dataclass(frozen=True)
class Zoo:
    """A named set of model specs trained on the same cell store and folds.

    ``cell_size`` is the side of the store's crops; each model may see them resized to its own.
    """

    name: str
    models: tuple[ModelSpec, ...]
    n_folds: int = 3
    cell_size: int = 64
    source: str = ""
    relabel: RelabelSettings = field(default_factory=RelabelSettings)
    integrity: IntegritySettings = field(default_factory=IntegritySettings)

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
    for key, value in values.items():
        default = known[key].default
        if isinstance(default, bool) or default is None or value is None:
            continue
        if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise SpecError(f"{where}.{key}: expected a number, got {value!r}")
    try:
        return cls(**values)
    except SpecError as err:
        raise SpecError(f"{where}: {err}") from None


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
    models = []
    for i, entry in enumerate(data["models"]):
        where = f"{path}: models[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise SpecError(f"{where}: each model needs a 'name'")
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
    return Zoo(name=data.get("name", path.stem), models=tuple(models), n_folds=int(data.get("n_folds", 3)),
               cell_size=int(data.get("cell_size", 64)), source=str(path),
               relabel=_build(RelabelSettings, data.get("relabel") or {}, f"{path}: relabel"),
               integrity=_build(IntegritySettings, data.get("integrity") or {}, f"{path}: integrity"))


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
