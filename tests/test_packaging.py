"""environment.yml (conda, clusters) and pyproject.toml (pip, .venv) install the same things, for the same
Python floor; the code passes the linter; papermill sees every parameter."""

import re
import subprocess
import sys

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, the floor: the same parser, as a package (a dev dependency)
    import tomli as tomllib

from helpers import REPO


def test_environment_yml_installs_the_package_with_its_extras():
    """conda's environment installs this package with pip, extras included, so that pyproject.toml is the
    one list of dependencies."""
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    plain = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["--editable .[dev]"]
    assert "pip" in plain
    python = next(d for d in plain if d.startswith("python="))
    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert tuple(map(int, python.removeprefix("python=").split("."))) >= tuple(map(int, floor.removeprefix(">=").split(".")))


def test_the_python_floor_is_the_one_the_makefile_and_the_linter_use():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    major, minor = project["project"]["requires-python"].removeprefix(">=").split(".")
    assert f"sys.version_info < ({major}, {minor})" in (REPO / "Makefile").read_text()
    assert project["tool"]["ruff"]["target-version"] == f"py{major}{minor}"


def test_code_and_notebooks_pass_the_linter():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "workshop", "tests", "notebooks", "conftest.py"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name)
def test_every_parameter_of_a_notebook_is_seen_by_papermill(notebook):
    """A parameter papermill cannot parse (an `=` in its comment, say) could not be set with -p."""
    import nbformat
    import papermill

    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = [line.split("=")[0].strip() for line in cell.source.splitlines() if re.match(r"^\w+\s*=", line)]
    assert list(papermill.inspect_notebook(str(notebook))) == assigned
