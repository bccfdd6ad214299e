"""The package's architecture as rules: rooms by concern, of readable size, and imports that run one way.

cli -> pipeline -> trainers | selectors | serving -> models | data -> contracts; sim beside data;
checks and cluster (a run's configuration and where it runs) are read by every stage that starts work.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ensemble

PACKAGE = Path(ensemble.__file__).resolve().parent
MODULES = {p: ".".join(("ensemble", *p.relative_to(PACKAGE).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
MAX_LINES = 500


def imported(path: Path) -> set[str]:
    """Every ``ensemble...`` module a file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in names if name.startswith("ensemble.")}


def importers_of(prefix: str) -> set[str]:
    return {module for path, module in MODULES.items()
            if not module.startswith(prefix) and any(n == prefix or n.startswith(prefix + ".") for n in imported(path))}


# The top level holds the pipeline and the contracts every room shares (the zoo is a room of its
# own: specs and search spaces); the rest lives in rooms.
TOP_LEVEL = {"pipeline", "labels", "oof", "storage", "tracking", "metrics"}
ROOMS = {"checks", "cli", "cluster", "data", "integrity", "models", "selectors", "serving", "sim", "trainers", "zoo"}


def test_the_top_level_holds_the_pipeline_the_contracts_and_the_rooms():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    rooms = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == TOP_LEVEL, f"give these a room: {sorted(modules - TOP_LEVEL)}"
    assert rooms == ROOMS


def test_no_module_is_over_500_lines():
    long = {module: n for path, module in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules by responsibility: {long}"


def test_trainers_are_imported_only_by_the_pipeline():
    assert importers_of("ensemble.trainers") == {"ensemble.pipeline"}


@pytest.mark.parametrize("layer", ["ensemble.serving", "ensemble.selectors"])
def test_trainers_import_neither_selection_nor_serving(layer):
    trainers = {m for m in importers_of(layer) if m.startswith("ensemble.trainers")}
    assert not trainers, f"{sorted(trainers)} import {layer}"


def test_only_the_cli_calls_the_pipeline():
    assert importers_of("ensemble.pipeline") <= {"ensemble.cli.main", "ensemble.cli.demo"}


def test_models_and_data_import_no_stage_above_them():
    above = ("ensemble.cli", "ensemble.pipeline", "ensemble.trainers", "ensemble.selectors", "ensemble.serving")
    for path, module in MODULES.items():
        if module.startswith(("ensemble.models", "ensemble.data")):
            assert not {n for n in imported(path) if n.startswith(above)}, module
