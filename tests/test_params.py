"""workshop.base.params: rules read from a parameters cell's comments, and values checked against them; records
are strict JSON (records.finite_only)."""

import json

import nbformat
import pytest

from helpers import REPO
from workshop.base import params, records
from workshop.measure import metrics


def test_rules_read_from_comments():
    assert params.parse_rule("passes over the data [at least 1]").bounds == (("at least", 1.0),)
    assert params.parse_rule("SGD lr (momentum 0.9) [above 0, at most 10]").bounds == (("above", 0.0), ("at most", 10.0))
    assert params.parse_rule("the model [one of: small_cnn, resnet18]").choices == ("small_cnn", "resnet18")
    assert params.parse_rule("no rule here (a parenthesis)") is None
    with pytest.raises(ValueError, match="cannot read the rule"):
        params.parse_rule("a [between 1 and 2]")


@pytest.mark.parametrize("rule,value,why", [
    ("[at least 1]", -1, "must be at least 1"), ("[at least 1]", 0, "must be at least 1"),
    ("[above 0, at most 10]", float("nan"), "is not a number"),
    ("[above 0, at most 10]", 11.0, "must be above 0, at most 10"), ("[above 0, below 1]", 1.0, "must be above 0, below 1"),
    ("[above 0, at most 10]", "fast", "must be a number"),
    ("[at least 1]", True, "must be a number"), ("[one of: a, b]", "c", "must be one of a, b")])
def test_values_outside_their_rule(rule, value, why):
    assert why in params.parse_rule(rule).problem(value)


@pytest.mark.parametrize("rule,value", [("[at least 1]", 1), ("[above 0, at most 10]", 0.05), ("[one of: a, b]", "b")])
def test_values_inside_their_rule(rule, value):
    assert params.parse_rule(rule).problem(value) is None


def test_a_notebook_checks_its_own_globals(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    cell = nbformat.v4.new_code_cell('epochs = 2  # passes [at least 1]\n'
                                     'lr = 0.1  # SGD [above 0, at most 10]\n'
                                     'name = "x"  # free text')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert set(params.declared(path)) == {"epochs", "lr"}
    params.validate(path, {"epochs": 2, "lr": 0.1, "name": "anything"})
    with pytest.raises(params.ParameterError, match=r"epochs = -1 must be at least 1; parameter lr = nan is not a number"):
        params.validate(path, {"epochs": -1, "lr": float("nan")})


def test_records_hold_no_nan(tmp_path):
    found = {}
    clean = records.finite_only({"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "nan"}, found=found)
    assert clean == {"a": [1.0, None], "b": {"c": None}, "d": "nan"}
    assert found == {"a[1]": "nan", "b.c": "-inf"}
    path = metrics.write_record(tmp_path, notebook="t", params={"lr": float("nan")}, results={"val_loss": float("inf")})
    record = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a record"))
    assert record["params"]["lr"] is None and record["results"]["val_loss"] is None
    assert set(record["non_finite"]) == {"params.lr", "results.val_loss"}


@pytest.mark.parametrize("notebook", sorted(REPO.glob("notebooks/*.ipynb")) + sorted(REPO.glob("tests/notebooks/*.ipynb")),
                         ids=lambda p: p.name)
def test_parameters_are_read_as_papermill_reads_them(notebook):
    import papermill

    assert params.inspect(notebook) == papermill.inspect_notebook(str(notebook))


def test_the_launcher_checks_parameters_without_running(runs, capsys):
    """`python -m workshop.launch.runner check` (what scripts/gpu_check.sh --check-only calls): the launcher's own
    checks, no run folder."""
    from workshop.launch import runner

    nb = str(REPO / "notebooks" / "06_sharding.ipynb")
    assert runner.main(["check", nb, "-p", "steps", "3"]) == 0
    assert "1 parameter(s) checked against the notebook's rules; nothing ran" in capsys.readouterr().out
    assert runner.main(["check", nb, "-p", "steps", "0"]) == 2
    assert "steps = 0 must be at least 1" in capsys.readouterr().err
    assert not runs.exists()
