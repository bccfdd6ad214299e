"""Search spaces for sweeps, as data: YAML files of ``key: {type: ..., ...}`` domains.

Read and checked here without Ray, so a bad space fails before anything starts and a built
wheel can list its spaces; :mod:`ensemble.trainers.sweep` turns a checked space into Ray Tune
domains. Built-in spaces live in ``ensemble/search_spaces/{head}.yaml``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ensemble.zoo import SpecError, TrainSettings

SEARCH_SPACE_DIR = Path(__file__).resolve().parent / "search_spaces"
DOMAIN_ARGUMENTS = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "randint": ("low", "high"),
    "choice": ("values",),
}
MODEL_KEYS = ("cell_size", "cells_per_image")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainSettings))


def list_search_spaces() -> list[str]:
    """Names of the built-in search spaces (one per head)."""
    return sorted(p.stem for p in SEARCH_SPACE_DIR.glob("*.yaml"))


def read_search_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a search space; errors name the file and the key.

    Parameters
    ----------
    path : str or Path
        A YAML file, or the name of a built-in space (``dsa``, ``cla``, ``clh``).

    Returns
    -------
    dict
        Key -> domain mapping (``{"type": ..., "low": ..., ...}``), bounds as numbers.
    """
    path = Path(path)
    if not path.suffix:
        path = SEARCH_SPACE_DIR / f"{path}.yaml"
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
    if domain["type"] == "choice":
        if not isinstance(domain["values"], list) or not domain["values"]:
            raise SpecError(f"{where}: 'values' must be a non-empty list")
        return dict(domain)
    # YAML 1.1 reads 1e-5 (no dot) as a string: take it as the number it is meant to be.
    bounds = {}
    for name in names:
        try:
            bounds[name] = float(domain[name]) if isinstance(domain[name], str) else domain[name]
        except ValueError:
            raise SpecError(f"{where}: {name} must be a number, got {domain[name]!r}") from None
        if isinstance(bounds[name], bool) or not isinstance(bounds[name], (int, float)):
            raise SpecError(f"{where}: {name} must be a number, got {domain[name]!r}")
    if not bounds["low"] < bounds["high"]:
        raise SpecError(f"{where}: low ({bounds['low']}) must be below high ({bounds['high']})")
    return {"type": domain["type"], **bounds}
