"""Search spaces for sweeps, as data: YAML files of ``key: {type: ..., ...}`` domains.

Read and checked here without Ray, so a bad space fails before anything starts and a built
wheel can list its spaces; :mod:`ensemble.trainers.sweep` turns a checked space into Ray Tune
domains. Built-in spaces live in ``ensemble/search_spaces/{head}.yaml``.

A space is checked twice: alone (:func:`read_search_space`: every key a setting, every domain of
a type that setting takes, bounds numbers, ``choice`` values of the setting's type) and against
each model it will sweep (:func:`check_space_fits`: every value it can propose makes a valid
model spec, and cell sizes stay near the model's own).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ensemble.zoo.spec import MAX_UPSAMPLING, ModelSpec, SpecError, TrainSettings, setting_value

SEARCH_SPACE_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
DOMAIN_ARGUMENTS = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "randint": ("low", "high"),
    "choice": ("values",),
}
MODEL_KEYS = ("cell_size", "cells_per_image")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainSettings))
# The type of every setting a space may search (head.<argument> keys: any type).
SETTING_TYPES = {**{f.name: type(f.default) for f in dataclasses.fields(TrainSettings)},
                 **{f.name: type(f.default) for f in dataclasses.fields(ModelSpec) if f.name in MODEL_KEYS}}
# Domains each setting type accepts: Tune's uniform and quniform propose floats, randint whole numbers.
DOMAINS_OF_TYPE = {float: ("loguniform", "uniform", "quniform", "randint", "choice"),
                   int: ("randint", "choice"), str: ("choice",), bool: ("choice",)}
CELL_SIZE_FACTOR = 2
"""A sweep may move a model's cell size at most this factor from the zoo's."""


def list_search_spaces() -> list[str]:
    """Names of the built-in search spaces (one per head)."""
    return sorted(p.stem for p in SEARCH_SPACE_DIR.glob("*.yaml"))


def search_space_path(path: str | Path) -> Path:
    """The file of a space: a YAML path as given, or a built-in space's by name."""
    path = Path(path)
    return SEARCH_SPACE_DIR / f"{path}.yaml" if not path.suffix else path


def read_search_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a search space; errors name the file and the key.

    Parameters
    ----------
    path : str or Path
        A YAML file, or the name of a built-in space (``dsa``, ``cla``, ``clh``).

    Returns
    -------
    dict
        Key -> domain mapping (``{"type": ..., "low": ..., ...}``), bounds and choice values of
        the type of the setting they search.
    """
    path = search_space_path(path)
    if not path.exists():
        raise SpecError(f"search space {path} not found; built-in spaces: {list_search_spaces()}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not data:
        raise SpecError(f"{path}: a search space is a non-empty mapping of key -> domain")
    return {key: _domain(f"{path}: {key}", key, domain) for key, domain in data.items()}


def _domain(where: str, key: str, domain: Any) -> dict[str, Any]:
    if key not in TRAIN_KEYS and key not in MODEL_KEYS and not str(key).startswith("head."):
        raise SpecError(f"{where}: unknown key; use a train setting {sorted(TRAIN_KEYS)}, "
                        f"a model setting {list(MODEL_KEYS)} or head.<argument>")
    if not isinstance(domain, dict) or domain.get("type") not in DOMAIN_ARGUMENTS:
        raise SpecError(f"{where}: needs 'type' among {sorted(DOMAIN_ARGUMENTS)}, got {domain!r}")
    names = DOMAIN_ARGUMENTS[domain["type"]]
    missing = [n for n in names if n not in domain]
    extra = sorted(set(domain) - {"type", *names})
    if missing or extra:
        raise SpecError(f"{where}: type {domain['type']} takes {list(names)}; missing {missing}, unknown {extra}")
    kind = SETTING_TYPES.get(key)
    if kind is not None and domain["type"] not in DOMAINS_OF_TYPE[kind]:
        raise SpecError(f"{where}: a {kind.__name__} setting cannot take type {domain['type']} "
                        f"(which proposes {'whole numbers' if domain['type'] == 'randint' else 'numbers'}); "
                        f"use one of {list(DOMAINS_OF_TYPE[kind])}")
    if domain["type"] == "choice":
        if not isinstance(domain["values"], list) or not domain["values"]:
            raise SpecError(f"{where}: 'values' must be a non-empty list")
        values = [setting_value(v, kind, f"{where}: values[{i}]") if kind else v
                  for i, v in enumerate(domain["values"])]
        return {"type": "choice", "values": values}
    bound_kind = int if domain["type"] == "randint" else float
    bounds = {name: setting_value(domain[name], bound_kind, f"{where}: {name}") for name in names}
    if not bounds["low"] < bounds["high"]:
        raise SpecError(f"{where}: low ({bounds['low']}) must be below high ({bounds['high']})")
    if domain["type"] == "loguniform" and bounds["low"] <= 0:
        raise SpecError(f"{where}: loguniform needs low > 0, got {bounds['low']}")
    if domain["type"] == "quniform" and bounds["q"] <= 0:
        raise SpecError(f"{where}: q must be > 0, got {bounds['q']}")
    return {"type": domain["type"], **bounds}


def apply_config(spec: ModelSpec, config: dict[str, Any]) -> ModelSpec:
    """``spec`` with a trial's (or the best) config applied; a value it cannot take raises SpecError."""
    train = {k: v for k, v in config.items() if k in TRAIN_KEYS}
    model = {k: v for k, v in config.items() if k in MODEL_KEYS}
    head = {k.removeprefix("head."): v for k, v in config.items() if k.startswith("head.")}
    return dataclasses.replace(spec, **model, head_kwargs={**spec.head_kwargs, **head},
                               train=dataclasses.replace(spec.train, **train))


def proposals(domain: dict[str, Any]) -> list[Any]:
    """The values of a domain to try a spec with: every choice, or both ends of a range."""
    if domain["type"] == "choice":
        return domain["values"]
    # randint's high is exclusive.
    return [domain["low"], domain["high"] - 1 if domain["type"] == "randint" else domain["high"]]


def check_space_fits(space: dict[str, dict[str, Any]], spec: ModelSpec, store_cell_size: int, where: str) -> None:
    """Raise SpecError if ``space`` (:func:`read_search_space`) would propose a config ``spec`` cannot take.

    Every choice and both ends of every range are applied to the spec, so each setting's own
    checks run (a DSA bag that no longer fits its batch, say); cell sizes must stay within
    :data:`CELL_SIZE_FACTOR` of the model's own, and within what the store's crops
    (``store_cell_size``) can give.

    Parameters
    ----------
    where : str
        The space's file, for messages.
    """
    for key, domain in space.items():
        for value in proposals(domain):
            if key == "cell_size":
                low, high = spec.cell_size / CELL_SIZE_FACTOR, min(spec.cell_size * CELL_SIZE_FACTOR,
                                                                    store_cell_size * MAX_UPSAMPLING)
                if not low <= value <= high:
                    raise SpecError(
                        f"{where}: cell_size: {value} px is far from the {spec.cell_size} px of model {spec.name!r} "
                        f"(crops of {store_cell_size} px): a sweep may search {int(low)}-{int(high)} px for it; "
                        "give a search space for this zoo or drop cell_size from it")
            try:
                apply_config(spec, {key: value})
            except SpecError as err:
                raise SpecError(f"{where}: {key}: {value!r} does not fit: {err}") from None
