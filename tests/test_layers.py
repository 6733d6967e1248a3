"""The package's layers are its folders: workshop/base, workshop/estimate, the lesson core (workshop/*.py),
workshop/measure, workshop/launch. Imports only run downwards, and the torch-free layers import without torch."""

import ast
import subprocess
import sys

from helpers import REPO

PACKAGE = REPO / "workshop"
ORDER = ("base", "estimate", "core", "measure", "launch")  # from the bottom up
SUBPACKAGES = {"base", "estimate", "measure", "launch"}
TORCH_FREE = ("base", "estimate")


def layer_of(path) -> str:
    return "core" if path.parent == PACKAGE else path.parent.name


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def imported_layers(path) -> set[str]:
    """The layers that a file imports from, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "workshop":
            parts = node.module.split(".")
            if len(parts) > 1:
                names = [parts[1]]
            else:
                names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("workshop.")]
        found |= {n if n in SUBPACKAGES else "core" for n in names}
    return found


def test_every_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == SUBPACKAGES
    assert {layer_of(p) for p in modules()} == set(ORDER)


def test_imports_only_run_downwards():
    upward = [f"{p.relative_to(REPO)} ({layer_of(p)}) imports from {dep}"
              for p in modules() for dep in imported_layers(p) if ORDER.index(dep) > ORDER.index(layer_of(p))]
    assert upward == []


def test_no_module_is_much_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in modules() if (n := len(p.read_text().splitlines())) > 520}
    assert long == {}


def test_torch_free_layers_and_the_launcher_import_without_torch():
    names = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in modules() if layer_of(p) in TORCH_FREE]
    names += [f"workshop.launch.{m}" for m in ("runner", "options", "preflight", "rundir", "ranks", "series", "slurm",
                                               "regenerate")]  # the launcher: a bad input refused in a fraction of a second
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now raises ImportError
            f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
