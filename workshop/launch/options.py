"""A run's papermill options, read as papermill reads them, and checked against the notebook before anything runs.

    values, other = parse_options(["-p", "epochs", "2", "-f", "params.yaml"])   # ({"epochs": 2, ...}, {"kernel": ...})
    check_notebook(Path("notebooks/05_ddp.ipynb"), ["-p", "epochs", "2"])       # RunError naming what is wrong

A parameter the notebook does not have, a value of another type than its default, or one its declared rule refuses
(`workshop.base.params`) is refused here, in a fraction of a second, rather than by a kernel minutes later.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path

import yaml

from workshop.base import params
from workshop.base.runs import RunError, display_path
from workshop.launch.preflight import check_environment


def cli_value(text: str):
    """A -p value as papermill's command line reads it: True/False/None, an int, a float, else the string."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _options_parser() -> argparse.ArgumentParser:
    """The papermill options that a run takes, as papermill's own command line spells them."""
    p = argparse.ArgumentParser(prog="scripts/run_notebook.sh NOTEBOOK", add_help=False, allow_abbrev=False,
                                exit_on_error=False)
    p.add_argument("-p", "--parameters", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("-r", "--parameters_raw", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("-f", "--parameters_file", action="append", default=[])
    p.add_argument("-y", "--parameters_yaml", action="append", default=[])
    p.add_argument("-b", "--parameters_base64", action="append", default=[])
    p.add_argument("-k", "--kernel", default=None)
    p.add_argument("--cwd", default=None)
    return p


def _yaml_mapping(text: str, where: str) -> dict:
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RunError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise RunError(f"{where} must give a mapping of parameter names to values")
    return loaded


def parse_options(papermill_args: list[str]) -> tuple[dict, dict]:
    """The parameters that papermill options set, with their values as papermill would pass them
    (files, then YAML, then -p, then -r, as papermill merges them), and the other options (kernel, cwd)."""
    try:
        opts, rest = _options_parser().parse_known_args(papermill_args)
    except argparse.ArgumentError as err:
        raise RunError(f"{err} (e.g. -p epochs 1 -f params.yaml; scripts/run_notebook.sh --help)") from None
    if rest:
        raise RunError(f"unknown option or stray value {' '.join(rest)!r}: a run takes -p NAME VALUE, -r NAME VALUE, "
                       "-f FILE.yaml, -y YAML, -b BASE64, -k KERNEL and --cwd DIR after the notebook")
    import base64
    import binascii

    values: dict = {}
    for text in opts.parameters_base64:
        try:
            values.update(_yaml_mapping(base64.b64decode(text).decode(), "-b"))
        except (binascii.Error, UnicodeDecodeError):
            raise RunError("-b: not base64-encoded YAML") from None
    for name in opts.parameters_file:
        path = Path(name)
        if not path.is_file():
            raise RunError(f"parameters file {path} does not exist")
        values.update(_yaml_mapping(path.read_text(), f"-f {name}"))
    for text in opts.parameters_yaml:
        values.update(_yaml_mapping(text, f"-y {text}"))
    values.update({name: cli_value(value) for name, value in opts.parameters})
    values.update(dict(opts.parameters_raw))
    return values, {"kernel": opts.kernel, "cwd": opts.cwd}


def parameter_values(papermill_args: list[str]) -> dict:
    """The parameters that papermill options set, by name."""
    return parse_options(papermill_args)[0]


# A parameter's type as papermill infers it from the default, and the value types it accepts. A
# string parameter takes numbers too (papermill turns `-p lrs 0.1` into a float; the notebooks
# read such parameters with str()).
ACCEPTS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str, int, float)}


def default_type(param: dict) -> str | None:
    """The type of a parameter: its annotation, else its default's (a literal), else None."""
    if param.get("inferred_type_name") in ACCEPTS:
        return param["inferred_type_name"]
    try:
        value = ast.literal_eval(param.get("default", ""))
    except (ValueError, SyntaxError):
        return None
    return type(value).__name__ if type(value).__name__ in ACCEPTS else None


def check_types(notebook: Path, known: dict, given: dict) -> None:
    """Raise RunError for a value whose type the notebook's default does not have."""
    for name, value in given.items():
        expected = default_type(known[name])
        accepted = ACCEPTS.get(expected)
        if accepted is None or value is None:
            continue
        ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
        if not ok:
            raise RunError(f"parameter {name} of {notebook.name} is {'an' if expected == 'int' else 'a'} {expected} "
                           f"(default {known[name]['default']}), got {value!r} ({type(value).__name__}): "
                           f"pass a value of that type, e.g. -p {name} {known[name]['default']}")


def check_notebook(notebook: Path, papermill_args: list[str]) -> dict:
    """Raise RunError unless the notebook exists, has every parameter the options set, and the values
    keep its rules; the parameters' values, by name."""
    if not notebook.is_file():
        raise RunError(f"notebook {notebook} does not exist (notebooks are under notebooks/, e.g. notebooks/01_baseline.ipynb)")
    if notebook.suffix != ".ipynb":
        raise RunError(f"{notebook} is not a notebook (.ipynb)")
    if not os.access(notebook, os.R_OK):
        raise RunError(f"notebook {notebook} cannot be read (permission denied): check its permissions "
                       "(ls -l) or copy it somewhere you can read")
    try:
        cells = json.loads(notebook.read_text()).get("cells")
        known = params.inspect(notebook)
    except (ValueError, AttributeError, UnicodeDecodeError, SyntaxError) as err:
        raise RunError(f"{notebook} is not a valid notebook ({type(err).__name__}: {str(err).splitlines()[0]}): "
                       "restore it, e.g. git checkout -- " + display_path(notebook)) from None
    given = parameter_values(papermill_args)
    if given and params.parameters_cell(cells) is None:
        raise RunError(f"{notebook.name} is not parameterised (no cell tagged 'parameters'), so "
                       f"{', '.join(given)} cannot be set: tag the cell of defaults 'parameters' "
                       "(JupyterLab: property inspector, cell tags), or run it without -p/-f/-y")
    unknown = [n for n in given if n not in known]
    if unknown:
        listing = "\n".join(f"  {name} = {p['default']}  {p.get('help') or ''}".rstrip() for name, p in known.items())
        raise RunError(
            f"{notebook.name} has no parameter {', '.join(map(repr, unknown))}. Its parameters:\n"
            + (listing or "  (none)")
        )
    check_types(notebook, known, given)
    try:
        broken = params.problems(params.rules(known), given)
    except ValueError as err:  # a rule the notebook declares but nobody can read
        raise RunError(f"{notebook.name}: {err}") from None
    if broken:
        raise RunError("; ".join(broken) + f" (the rules are in {notebook.name}'s parameters cell)")
    check_environment(given, papermill_args)
    return given
