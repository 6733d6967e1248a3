"""environment.yml (conda, clusters) and pyproject.toml (pip, .venv) install the same things."""

import re
import subprocess
import sys

import pytest
import tomllib
import yaml

from conftest import REPO


def _normalise(spec: str) -> str:
    name, rest = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", spec.strip()).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_normalise(s) for s in project["dependencies"] + project["optional-dependencies"]["dev"]}

    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_normalise(s) for s in pip_section if not s.startswith("-")}
    assert listed == wanted
    assert any(s.startswith("--editable .") for s in pip_section), "the pip section must install the package itself"
    plain = [d for d in env["dependencies"] if isinstance(d, str)]
    assert plain.index("pip") < [i for i, d in enumerate(env["dependencies"]) if isinstance(d, dict)][0]
    assert "python=3.11" in plain


def test_python_floor_is_the_same():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"


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
