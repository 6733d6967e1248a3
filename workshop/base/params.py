"""A notebook's parameters and their valid values, declared once, beside each parameter.

The parameters cell of a notebook ends a parameter's comment with its rule in brackets:

    epochs = 2  # passes over the training set [at least 1]
    lr = 0.05  # SGD learning rate [above 0, at most 10]
    model_name = "small_cnn"  # the model [one of: small_cnn, resnet18, vit_tiny]

Words, not `>=`: papermill skips a parameter line with a second `=` in it (its parser splits on `=`).

`scripts/run_notebook.sh` checks the values it is given against these rules before a run folder exists
(`workshop.launch.runner`), and the notebook checks its own values in its setup cell, where there is
no launcher (JupyterLab): `validate("01_baseline", globals())` (`from workshop.base.params import validate`; the
notebooks keep the name `params` for the dict their record holds). A value outside its rule is an error that
names the parameter, the value and what is valid. NaN is outside every range. This module imports neither torch nor
papermill (a launcher refuses a bad value in a fraction of a second); `inspect` reads a parameters cell as papermill's
`inspect_notebook` does: the names, defaults, annotated types and comments of its assignments.
"""

from __future__ import annotations

import ast
import io
import json
import math
import operator
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
_OPS = {"at least": operator.ge, "above": operator.gt, "at most": operator.le, "below": operator.lt}
_RULE = re.compile(r"\[([^\[\]]+)\]\s*$")  # the last bracket of a comment


class ParameterError(ValueError):
    """A parameter value outside what its notebook declares valid."""


@dataclass(frozen=True)
class Rule:
    text: str  # as declared: "at least 1", "above 0, at most 10", "one of: a, b"
    bounds: tuple[tuple[str, float], ...] = ()
    choices: tuple[str, ...] = ()

    def problem(self, value) -> str | None:
        """Why `value` breaks this rule, or None when it keeps it."""
        if self.choices:
            return None if str(value) in self.choices else f"must be one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number {self.text}"
        if isinstance(value, float) and math.isnan(value):
            return f"is not a number; it must be {self.text}"
        for op, bound in self.bounds:
            if not _OPS[op](value, bound):
                return f"must be {self.text}"
        return None


def parse_rule(comment: str) -> Rule | None:
    """The rule at the end of a parameter's comment, or None where it declares none."""
    m = _RULE.search(comment or "")
    if not m:
        return None
    text = m.group(1).strip()
    if text.startswith("one of:"):
        return Rule(text, choices=tuple(c.strip() for c in text.removeprefix("one of:").split(",") if c.strip()))
    bounds = []
    for part in text.split(","):
        bm = re.fullmatch(r"\s*(at least|above|at most|below)\s+(-?[\d.]+(?:e-?\d+)?)\s*", part)
        if not bm:
            raise ValueError(f"cannot read the rule [{text}]: write [at least 1], [above 0, at most 10] or [one of: a, b]")
        bounds.append((bm.group(1), float(bm.group(2))))
    return Rule(text, bounds=tuple(bounds))


def declared(notebook: str | Path) -> dict[str, Rule]:
    """The rules of a notebook's parameters cell, by parameter name ("01_baseline" or a path)."""
    path = Path(notebook)
    if not path.suffix:  # a name: the notebook beside the running one (a kernel runs in its notebook's folder),
        here = Path.cwd() / f"{notebook}.ipynb"  # else the repository's, for a package installed elsewhere
        path = here if here.is_file() else NOTEBOOKS / f"{notebook}.ipynb"
    return rules(inspect(path))


def parameters_cell(cells: list) -> str | None:
    """The source of the first cell tagged 'parameters', or None."""
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell.get("source", "")
            return "".join(source) if isinstance(source, list) else source
    return None


def inspect(notebook: str | Path) -> dict[str, dict]:
    """The parameters of a notebook, by name, as papermill's `inspect_notebook` gives them: "name",
    "default" (its source text), "inferred_type_name" (the annotation, else "None") and "help" (the
    comment on its line). Raises ValueError for a file that is not a notebook or a cell that is not Python."""
    cells = json.loads(Path(notebook).read_text()).get("cells")
    if not isinstance(cells, list):
        raise ValueError("no list of cells")
    source = parameters_cell(cells)
    if source is None:
        return {}
    tree = ast.parse(source)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or not isinstance(target, ast.Name) or node.value is None:
            continue
        annotation = ast.get_source_segment(source, node.annotation) if isinstance(node, ast.AnnAssign) else "None"
        found[target.id] = {"name": target.id, "default": ast.get_source_segment(source, node.value),
                            "inferred_type_name": annotation, "help": comments.get(node.end_lineno, "")}
    return found


def rules(inspected: dict) -> dict[str, Rule]:
    """The rules of the parameters that `inspect` found (their comments are its "help")."""
    found = {name: parse_rule(p.get("help", "")) for name, p in inspected.items()}
    return {name: rule for name, rule in found.items() if rule is not None}


def problems(rules: dict[str, Rule], values: dict) -> list[str]:
    """One message per value that breaks its rule."""
    out = []
    for name, rule in rules.items():
        if name in values:
            why = rule.problem(values[name])
            if why:
                out.append(f"parameter {name} = {values[name]!r} {why}")
    return out


def validate(notebook: str | Path, values: dict) -> None:
    """Raise ParameterError naming every parameter of `notebook` whose value in `values` (the notebook's
    globals(), or the values a launcher was given) breaks its declared rule."""
    found = problems(declared(notebook), values)
    if found:
        raise ParameterError("; ".join(found) + " (see the notebook's parameters cell)")


def positive(kind):
    """An argparse type for the package's command lines (doctor, faults, costmodel): `kind` (int or float) of a
    finite value above 0; anything else is argparse's usage error (exit 2) naming the value."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
        return value
    return parse

