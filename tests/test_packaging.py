"""The built wheel carries everything the package reads at run time (zoos, search spaces)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import sys
sys.path.append({site!r})  # the dependencies, after the wheel: the wheel's ensemble must win
import ensemble
from ensemble.zoo.search_space import list_search_spaces, read_search_space
from ensemble.zoo import ZOO_DIR, load_zoo
assert ensemble.__file__.startswith({venv!r}), ensemble.__file__
zoos = sorted(p.stem for p in ZOO_DIR.glob("*.yaml"))
spaces = list_search_spaces()
for name in zoos:
    load_zoo(name)
for name in spaces:
    read_search_space(name)
print(",".join(zoos), ",".join(spaces))
"""


def test_wheel_installs_and_loads_every_zoo_and_search_space(tmp_path):
    # Built from a copy of what the wheel is made of, so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "ensemble", source / "ensemble", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("ensemble-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("zoos", "search_spaces"):
        expected = {f"ensemble/{folder}/{p.name}" for p in (REPO / "ensemble" / folder).glob("*.yaml")}
        assert expected and expected <= shipped, f"the wheel lacks {sorted(expected - shipped)}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    code = CHECK.format(site=sysconfig.get_paths()["purelib"], venv=str(venv))
    out = subprocess.run([str(python), "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True).stdout
    zoos, spaces = out.split()
    assert zoos == "hcpl,quick" and spaces == "cla,clh,dsa"
