"""The package's layers (workshop.LAYERS): every module is in one, and imports only run downwards."""

import ast

import workshop
from conftest import REPO

ORDER = list(workshop.LAYERS)  # from the bottom up


def imported_modules(path) -> set[str]:
    """The workshop modules that a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "workshop":
            found |= {a.name for a in node.names} if node.module == "workshop" else {node.module.split(".")[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("workshop.")}
    return found


def test_every_module_is_in_one_layer():
    modules = sorted(p.stem for p in (REPO / "workshop").glob("*.py") if p.stem != "__init__")
    placed = sorted(m for layer in workshop.LAYERS.values() for m in layer)
    assert placed == modules


def test_imports_only_run_downwards():
    level = {m: ORDER.index(layer) for layer, mods in workshop.LAYERS.items() for m in mods}
    upward = [f"{m} ({ORDER[level[m]]}) imports {dep} ({ORDER[level[dep]]})"
              for m in level for dep in imported_modules(REPO / "workshop" / f"{m}.py")
              if dep in level and level[dep] > level[m]]
    assert upward == []
